"""Layers the families share."""

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
