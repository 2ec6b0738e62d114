"""Layers the families share: 1x1 convs as matrix products, depthwise convs (as shifted
slices on the CPU), TF / PyTorch padding rules, stochastic depth."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class PointwiseConv(nn.Module):
    """A 1x1 convolution (optionally strided) computed as a matrix product.

    Same parameter as nn.Conv (`kernel` of shape (1, 1, in, out)) and the same numbers, but
    XLA's CPU backend computes a convolution's gradients far slower than the equivalent dot:
    2.6-4.6x for Lite0's and ResNet-50's 1x1 layers (benchmarks/pointwise_conv.py; a whole
    Lite0 training step at 96 px, batch 64, 2 cores: 8.8 s -> 2.3 s), and every backend
    maps a dot onto its matrix units. A stride keeps every s-th pixel from the first, as
    nn.Conv does with 1x1 kernels and no padding.
    """

    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        shape = (1, 1, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        if self.stride > 1:
            x = x[:, :: self.stride, :: self.stride, :]
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        return jax.lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))


def conv_padding(kernel: int, stride: int, padding: str):
    """'same': TensorFlow's SAME (lax's; the odd pixel after: bottom / right), what TF and Keras
    checkpoints were trained with. 'symmetric': ((stride - 1) + (kernel - 1)) // 2 on every
    side, PyTorch's usual padding (timm's get_padding)."""
    if padding == "same":
        return "SAME"
    pad = ((stride - 1) + (kernel - 1)) // 2
    return ((pad, pad), (pad, pad))


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF's SAME padding of one axis: (before, after)."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class DepthwiseConv(nn.Module):
    """A kxk conv per channel; its `kernel` (k, k, 1, C) is nn.Conv's with groups = C.

    impl 'shift' sums k*k shifted, strided slices times their weights: on CPU about 10x
    faster than XLA's grouped convolution (Lite0: 66 s -> 12 s per 1000 images on 2
    cores). 'conv' is the grouped convolution, for accelerators. 'auto' picks 'shift' when
    the default backend is the CPU. padding: 'same' | 'symmetric' (conv_padding) or explicit
    ((top, bottom), (left, right)).
    """

    kernel: int
    stride: int = 1
    padding: Any = "same"
    impl: str = "auto"
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        shape = (self.kernel, self.kernel, 1, channels)
        w = self.param("kernel", self.kernel_init, shape, jnp.float32)
        x, w = x.astype(self.dtype), w.astype(self.dtype)
        pads = self.padding
        if isinstance(pads, str):
            pads = conv_padding(self.kernel, self.stride, pads)
        if pads == "SAME":
            pads = [same_pads(n, self.kernel, self.stride) for n in x.shape[1:3]]
        impl = self.impl
        if impl == "auto":
            impl = "shift" if jax.default_backend() == "cpu" else "conv"
        if impl == "conv":
            y = jax.lax.conv_general_dilated(
                x, w, (self.stride,) * 2, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=channels,
            )  # fmt: skip
        else:
            y = depthwise_by_shifts(x, w[:, :, 0, :], stride=self.stride, pads=pads)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (channels,), jnp.float32).astype(
                y.dtype
            )
        return y


def depthwise_by_shifts(x, w, *, stride: int, pads):
    """Depthwise conv of NHWC `x` with `w` (k, k, C) as a sum of k*k shifted, strided slices."""
    (top, bottom), (left, right) = pads
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    k = w.shape[0]
    out_h = (x.shape[1] - k) // stride + 1
    out_w = (x.shape[2] - k) // stride + 1
    acc = jnp.promote_types(x.dtype, jnp.float32)  # k*k terms: sum in float32 at least
    out = jnp.zeros((x.shape[0], out_h, out_w, x.shape[3]), acc)
    for i in range(k):
        for j in range(k):
            end = (x.shape[0], i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1)
            tap = jax.lax.slice(x, (0, i, j, 0), (*end, x.shape[3]), (1, stride, stride, 1))
            out = out + tap.astype(acc) * w[i, j].astype(acc)
    return out.astype(x.dtype)


def drop_path(y, *, rate: float, rng: jax.Array):
    """Stochastic depth: zeroes the residual branch of whole examples; survivors are scaled
    by 1 / keep (timm's DropPath, EfficientNet's drop-connect)."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (y.shape[0],) + (1,) * (y.ndim - 1))
    return jnp.where(mask, y / keep, jnp.zeros_like(y)).astype(y.dtype)
