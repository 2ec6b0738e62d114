"""Layers the families share: 1x1 convs as matrix products, depthwise convs (as shifted
slices on the CPU), kxk convs, BatchNorm folded into the conv before it when its statistics
are frozen, TF / PyTorch padding rules, stochastic depth."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import lift as nn_lift
from flax.core import scope as nn_scope


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
    def __call__(self, x, scale=None):
        """`scale` (features,): multiplies each output channel (scaled_linear)."""
        shape = (1, 1, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        if self.stride > 1:
            x = x[:, :: self.stride, :: self.stride, :]
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        return scaled_linear(_matmul, x, kernel[0, 0], scale)


def _matmul(x, kernel):
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


class Conv(nn.Module):
    """nn.Conv without bias: the same `kernel` (k, k, in, out), initialisation and numbers,
    plus an optional per-output-channel `scale` (scaled_linear).
    padding: 'SAME' or explicit ((top, bottom), (left, right))."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: Any = "SAME"
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x, scale=None):
        k = self.kernel_size
        shape = (k, k, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        padding = self.padding if isinstance(self.padding, str) else _int_pads(self.padding)
        conv = functools.partial(_conv, stride=self.stride, padding=padding)
        return scaled_linear(conv, x, kernel, scale)


def _conv(x, kernel, *, stride: int, padding, groups: int = 1):
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )  # fmt: skip


def _int_pads(pads) -> tuple:
    return tuple((int(a), int(b)) for a, b in pads)


def scaled_linear(fn: Callable, x, kernel, scale):
    """fn(x, kernel) * scale, per output channel (the kernel's last axis); fn is linear in
    the kernel (a conv or a matmul), scale None: fn(x, kernel).

    Differentiated by its own rule: the gradients are those of fn at the scaled kernel
    (kernel * scale), and scale's gradient is sum(d_kernel_scaled * kernel) over all but the
    last axis - a kernel-sized reduction where autodiff of the product would keep the
    activation fn(x, kernel) and reduce dy * it. The forward scales the output, not the
    kernel, so a step without gradients (eval, frozen stages) costs what conv then
    BatchNorm did: the scale fuses into the elementwise op after it."""
    if scale is None:
        return fn(x, kernel)
    if FROZEN_BN == "fold":  # for benchmarks/fold_bn.py
        return fn(x, kernel * scale.astype(kernel.dtype))
    return _scaled_linear(fn, x, kernel, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scaled_linear(fn, x, kernel, scale):
    y = fn(x, kernel)
    return y * scale.astype(y.dtype)


def _scaled_linear_fwd(fn, x, kernel, scale):
    return _scaled_linear(fn, x, kernel, scale), (x, kernel, scale)


def _scaled_linear_bwd(fn, res, dy):
    x, kernel, scale = res
    _, vjp = jax.vjp(fn, x, kernel * scale.astype(kernel.dtype))
    dx, dk = vjp(dy)
    acc = jnp.promote_types(dk.dtype, jnp.float32)
    axes = tuple(range(kernel.ndim - 1))
    dscale = jnp.sum(dk.astype(acc) * kernel.astype(acc), axis=axes)
    return dx, (dk * scale.astype(dk.dtype)).astype(kernel.dtype), dscale.astype(scale.dtype)


_scaled_linear.defvjp(_scaled_linear_fwd, _scaled_linear_bwd)


class FrozenBatchNorm(nn.Module):
    """nn.BatchNorm with frozen statistics, split around the conv before it (conv_norm):
    `scale()` is the per-channel factor s = scale / sqrt(var + eps) that the conv applies,
    `__call__(y)` adds the rest, bias - mean * s. Its variables are nn.BatchNorm's: params
    scale, bias and batch_stats mean, var, with the same names, shapes, dtypes and initial
    values."""

    channels: int
    epsilon: float
    scale_init: Callable = nn.initializers.ones

    def setup(self):
        shape = (self.channels,)
        self.scale_ = self.param("scale", self.scale_init, shape, jnp.float32)
        self.bias = self.param("bias", nn.initializers.zeros, shape, jnp.float32)
        self.mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(shape, jnp.float32))
        self.var = self.variable("batch_stats", "var", lambda: jnp.ones(shape, jnp.float32))

    def scale(self):
        return self.scale_ * jax.lax.rsqrt(self.var.value + self.epsilon)

    def __call__(self, y):
        return y + (self.bias - self.mean.value * self.scale()).astype(y.dtype)


# How conv_norm computes a frozen BatchNorm: 'scaled' (scaled_linear, the default), 'fold'
# (conv(x, kernel * s), plain autodiff) or 'batchnorm' (conv, then flax's nn.BatchNorm).
# benchmarks/fold_bn.py sets it to time the three in one run.
FROZEN_BN = "scaled"
FROZEN_BN_IMPLS = ("batchnorm", "fold", "scaled")


def conv_norm(conv, x, *, bn_train: bool, norm: Callable[[], nn.Module], name: str, eps: float,
              scale_init: Callable = nn.initializers.ones):  # fmt: skip
    """BatchNorm `name` of conv(x). With frozen statistics (bn_train False) the BatchNorm is
    an affine map per channel, conv(x) * s + (bias - mean * s) with s = scale / sqrt(var +
    eps), and the conv applies s itself (`conv(x, s)`: scaled_linear). The same function and
    the same variables (FrozenBatchNorm: nn.BatchNorm's names, shapes and initial values),
    but the gradients of the BatchNorm's scale and bias keep no activation-sized residual:
    they come from the kernel's gradient and a sum over dy. bn_train True: conv, then
    `norm()` (an nn.BatchNorm named `name`, with batch statistics)."""
    if bn_train or FROZEN_BN == "batchnorm":
        return norm()(conv(x))
    channels = conv.features if hasattr(conv, "features") else x.shape[-1]
    bn = FrozenBatchNorm(channels, eps, scale_init, name=name)
    return bn(conv(x, bn.scale()))


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
    def __call__(self, x, scale=None):
        """`scale` (C,): multiplies each output channel (scaled_linear)."""
        channels = x.shape[-1]
        shape = (self.kernel, self.kernel, 1, channels)
        w = self.param("kernel", self.kernel_init, shape, jnp.float32)
        x, w = x.astype(self.dtype), w.astype(self.dtype)
        pads = self.padding
        if isinstance(pads, str):
            pads = conv_padding(self.kernel, self.stride, pads)
        if pads == "SAME":
            pads = [same_pads(n, self.kernel, self.stride) for n in x.shape[1:3]]
        pads = _int_pads(pads)
        impl = self.impl
        if impl == "auto":
            impl = "shift" if jax.default_backend() == "cpu" else "conv"
        if impl == "conv":
            fn = functools.partial(_conv, stride=self.stride, padding=pads, groups=channels)
        else:
            fn = functools.partial(_depthwise_shifts, stride=self.stride, pads=pads)
        y = scaled_linear(fn, x, w, scale)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (channels,), jnp.float32).astype(
                y.dtype
            )
        return y


def _depthwise_shifts(x, kernel, *, stride: int, pads):
    return depthwise_by_shifts(x, kernel[:, :, 0, :], stride=stride, pads=pads)


def depthwise_by_shifts(x, w, *, stride: int, pads):
    """Depthwise conv of NHWC `x` with `w` (k, k, C) as a sum of k*k shifted, strided slices.

    Differentiated by its own rule (_shifts_bwd): autodiff of the sum would keep every slice
    of `x` alive for the weight gradient (k*k copies of the activation: Lite0's full step
    took 6.4 GiB), this keeps `x` alone and recomputes the slices in cache-sized row chunks.
    """
    pads = tuple((int(a), int(b)) for a, b in pads)
    return _shifts(x, w, int(stride), pads)


def _taps(xp, k: int, stride: int, out_h: int, out_w: int):
    """(i, j, slice of `xp` under tap (i, j)) for the k*k taps of a stride-`stride` window."""
    for i in range(k):
        for j in range(k):
            end = (xp.shape[0], i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1)
            yield i, j, jax.lax.slice(xp, (0, i, j, 0), (*end, xp.shape[3]), (1, stride, stride, 1))


def _shift_sum(xp, w, stride: int, out_h: int, out_w: int):
    """sum_ij slice_ij(xp) * w[i, j], in float32 at least (k*k terms)."""
    acc = jnp.promote_types(xp.dtype, jnp.float32)
    out = jnp.zeros((xp.shape[0], out_h, out_w, xp.shape[3]), acc)
    for i, j, tap in _taps(xp, w.shape[0], stride, out_h, out_w):
        out = out + tap.astype(acc) * w[i, j].astype(acc)
    return out


def _pad_hw(x, pads):
    (top, bottom), (left, right) = pads
    return jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shifts(x, w, stride: int, pads):
    xp = _pad_hw(x, pads)
    k = w.shape[0]
    out_h = (xp.shape[1] - k) // stride + 1
    out_w = (xp.shape[2] - k) // stride + 1
    return _shift_sum(xp, w, stride, out_h, out_w).astype(x.dtype)


def _shifts_fwd(x, w, stride, pads):
    return _shifts(x, w, stride, pads), (x, w)


# The weight gradient's working set per scan step (rows of the output gradient, all images
# and channels): about the size of a core's L2 cache, so that the k*k products of a chunk are
# reduced while it is in cache. Per image instead would scan over the batch axis, which a
# data-parallel mesh shards; rows are never sharded.
SHIFT_GRAD_CHUNK_BYTES = 1 << 20


def _shifts_bwd(stride, pads, res, g):
    x, w = res
    k, s = w.shape[0], stride
    n, out_h, out_w, channels = g.shape
    acc = jnp.promote_types(g.dtype, jnp.float32)
    xp = _pad_hw(x, pads)
    height, width = xp.shape[1], xp.shape[2]

    # dx: the transposed conv, a stride-1 correlation of the gradient (dilated by the stride,
    # padded by k - 1) with the flipped kernel, then the input's padding cut off.
    zero = jnp.zeros((), g.dtype)
    gd = jax.lax.pad(g, zero, (
        (0, 0, 0),
        (k - 1, k - 1 + height - ((out_h - 1) * s + k), s - 1),
        (k - 1, k - 1 + width - ((out_w - 1) * s + k), s - 1),
        (0, 0, 0),
    ))  # fmt: skip
    dxp = _shift_sum(gd, w[::-1, ::-1], 1, height, width)
    (top, _), (left, _) = pads
    dx = dxp[:, top : top + x.shape[1], left : left + x.shape[2], :].astype(x.dtype)

    # dw[i, j] = sum over (n, h, w) of slice_ij(xp) * g, over chunks of output rows: the rows
    # of g past out_h are zeros (they add nothing), xp gets the rows they would read.
    rows = max(1, min(out_h, SHIFT_GRAD_CHUNK_BYTES // (n * out_w * channels * 4)))
    chunks = -(-out_h // rows)
    g = jnp.pad(g, ((0, 0), (0, chunks * rows - out_h), (0, 0), (0, 0)))
    need = (chunks * rows - 1) * s + k
    xp = jnp.pad(xp, ((0, 0), (0, max(0, need - height)), (0, 0), (0, 0)))
    window = (rows - 1) * s + k

    def chunk(total, c):
        xc = jax.lax.dynamic_slice_in_dim(xp, c * rows * s, window, axis=1).astype(acc)
        gc = jax.lax.dynamic_slice_in_dim(g, c * rows, rows, axis=1).astype(acc)
        taps = [jnp.sum(t * gc, axis=(0, 1, 2)) for _, _, t in _taps(xc, k, s, rows, out_w)]
        return total + jnp.stack(taps), None

    dw, _ = jax.lax.scan(chunk, jnp.zeros((k * k, channels), acc), jnp.arange(chunks))
    return dx, dw.reshape(w.shape).astype(w.dtype)


_shifts.defvjp(_shifts_fwd, _shifts_bwd)


def drop_path(y, *, rate: float, rng: jax.Array):
    """Stochastic depth: zeroes the residual branch of whole examples; survivors are scaled
    by 1 / keep (timm's DropPath, EfficientNet's drop-connect)."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (y.shape[0],) + (1,) * (y.ndim - 1))
    return jnp.where(mask, y / keep, jnp.zeros_like(y)).astype(y.dtype)


def block_call(block: nn.Module, x, *, remat: bool, **flags):
    """block(x, **flags); with `remat`, the backward pass recomputes the block's activations
    from its input instead of keeping them, so a full fine-tuning step holds one block's
    activations at a time plus each block's input, for one more forward pass of compute
    (model.remat). On accelerators: nn.remat (jax.checkpoint). On the CPU, XLA's pipeline
    merges jax.checkpoint's recomputation back into the forward pass (its optimisation
    barriers are expanded before CSE, and its scheduler would run the recomputation early
    anyway: benchmarks/RESULTS.md), so there the block's backward pass recomputes it from
    its variables and input passed through a conditional on the incoming gradient
    (_tied_remat, _after), which XLA can neither merge nor run before that gradient
    exists. The flags (train, bn_train) are static. Parameters, statistics and random
    streams are the block's own either way."""
    if not remat:
        return block(x, **flags)
    names = tuple(sorted(flags))
    tied = jax.default_backend() == "cpu"
    return _rematted(names, tied)(block, tuple(flags[n] for n in names), x)


@functools.cache
def _rematted(names: tuple[str, ...], tied: bool):
    def call(block, flags, x):
        return block(x, **dict(zip(names, flags, strict=True)))

    if tied:
        return nn.transforms.lift_transform(_tied_remat, call)
    # static_argnums counts the module as argument 0 (flax's function form)
    return nn.remat(call, static_argnums=(1,))


def _tied_remat(fn, variables=True, rngs=True):
    """A lifted transform (flax.core.lift's form, as lift.checkpoint): fn(scope, flags, x)
    with a custom VJP whose forward keeps the block's variables and input, and whose
    backward pass recomputes the block and its VJP from them once the incoming gradient
    exists (_after). The random streams are the lifted rngs, the same in the forward and
    the recomputation."""

    def inner(scope_fn, repack_fn, variable_groups, rng_groups, flags, x):
        # flax counts each stream's keys in the scopes' rng_counters, shared with the
        # caller; the block is traced more than once here (forward, recomputation), so every
        # trace starts from the counters as they were and the caller's advance once.
        counters: dict = {}

        def run(groups, x):
            scopes = scope_fn(groups, rng_groups)
            found = _scopes(scopes)
            if "start" not in counters:
                counters["shared"] = [sc.rng_counters for sc in found]
                counters["start"] = copy.deepcopy(counters["shared"])
            for sc, start in zip(found, copy.deepcopy(counters["start"]), strict=True):
                sc.rng_counters = start
            y = fn(scopes, flags, x)
            counters["end"] = [sc.rng_counters for sc in found]
            return y, repack_fn(scopes)

        @jax.custom_vjp
        def tied(groups, x):
            return run(groups, x)

        def tied_fwd(groups, x):
            return run(groups, x), (groups, x)

        def tied_bwd(res, g):
            g_y, g_vars = g
            groups, x = _after(g_y, res)
            _, vjp = jax.vjp(lambda v, x: run(v, x)[0], groups, x)
            d_groups, dx = vjp(g_y)
            # the repacked variables pass through: their cotangents (zeros unless a caller
            # reads them) add to the inputs'
            d_groups = _add_where_present(d_groups, g_vars)
            return d_groups, dx

        tied.defvjp(tied_fwd, tied_bwd)
        out = tied(variable_groups, x)
        for shared, end in zip(counters["shared"], counters["end"], strict=True):
            _assign(shared, end)
        return out

    return nn_lift.pack(inner, (variables,), (variables,), (rngs,), name="remat")


def _after(g, operands):
    """`operands`, passed through a conditional on a value of `g`: whatever is computed
    from them runs after g exists, and XLA cannot merge it with the same computation on
    the operands themselves. The predicate, (v == v) | (v != v), is true for every float
    (NaN included), which XLA does not prove: the other branch (zeros) never runs."""
    v = jnp.ravel(jax.tree_util.tree_leaves(g)[0])[0]
    return jax.lax.cond((v == v) | (v != v), lambda o: o,
                        lambda o: jax.tree_util.tree_map(jnp.zeros_like, o), operands)  # fmt: skip


def _scopes(tree) -> list:
    return jax.tree_util.tree_leaves(tree, is_leaf=lambda s: isinstance(s, nn_scope.Scope))


def _assign(shared: dict, values: dict) -> None:
    """shared := values, in place, nested dicts included (scopes hold them by reference)."""
    for key, value in values.items():
        if isinstance(value, dict):
            _assign(shared.setdefault(key, {}), value)
        else:
            shared[key] = value


def _add_where_present(tree, extra):
    """tree + extra, where `extra` holds a subset of tree's collections (the mutable ones
    the block repacks) with the same structure inside each."""
    if isinstance(tree, dict):
        return {k: _add_where_present(v, extra[k]) if k in extra else v for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_add_where_present(a, b) for a, b in zip(tree, extra, strict=True))
    return tree + extra.astype(tree.dtype)
