"""models/layers.py: the CPU's depthwise conv (shifted slices with their own backward pass)
against XLA's grouped convolution, forward and gradients; frozen BatchNorm folded into the
conv before it (conv_norm) against conv then nn.BatchNorm."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import refs
from jax.sharding import NamedSharding, PartitionSpec

from tlflax.models import layers


def _conv(x, w, stride, pads):
    return jax.lax.conv_general_dilated(
        x, w[:, :, None, :], (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1], precision=jax.lax.Precision.HIGHEST,
    )  # fmt: skip


def _shifts(x, w, stride, pads):
    return layers.depthwise_by_shifts(x, w, stride=stride, pads=pads)


def _value_and_grads(fn, x, w, stride, pads):
    shape = jax.eval_shape(lambda x, w: fn(x, w, stride, pads), x, w).shape
    cot = jax.random.normal(jax.random.key(9), shape)

    def loss(x, w):
        y = fn(x, w, stride, pads)
        return jnp.sum(y.astype(jnp.float32) * cot), y

    (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(x, w)
    return y, dx, dw


def _inputs(n, size, channels, k, dtype=jnp.float32):
    x = jax.random.normal(jax.random.key(0), (n, size, size, channels), dtype)
    w = jax.random.normal(jax.random.key(1), (k, k, channels), dtype)
    return x, w


def _close(a, b, tol):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b))), np.max(np.abs(a - b))


CASES = [
    # (size, kernel, stride, pads): odd sizes and TF SAME's asymmetric pads, PyTorch's
    # symmetric ones, a stride that does not divide the padded size, ConvNeXt's 7x7
    (13, 3, 1, ((1, 1), (1, 1))),
    (13, 3, 2, ((1, 1), (1, 1))),
    (12, 3, 2, ((0, 1), (0, 1))),
    (15, 5, 2, ((2, 2), (2, 2))),
    (14, 5, 1, ((2, 2), (2, 2))),
    (11, 7, 1, ((3, 3), (3, 3))),
    (9, 3, 1, ((0, 0), (2, 1))),
]


@pytest.mark.parametrize("size, k, stride, pads", CASES)
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 1])  # one scan step; one output row each
def test_shifts_match_grouped_conv(size, k, stride, pads, chunk_bytes, monkeypatch):
    monkeypatch.setattr(layers, "SHIFT_GRAD_CHUNK_BYTES", chunk_bytes)
    x, w = _inputs(3, size, 6, k)
    y, dx, dw = _value_and_grads(_shifts, x, w, stride, pads)
    y_ref, dx_ref, dw_ref = _value_and_grads(_conv, x, w, stride, pads)
    assert y.shape == y_ref.shape and dx.shape == x.shape and dw.shape == w.shape
    _close(y, y_ref, 1e-5)
    _close(dx, dx_ref, 1e-5)
    _close(dw, dw_ref, 1e-5)


def test_shifts_bfloat16_keep_dtypes_and_sum_in_float32():
    x, w = _inputs(2, 10, 4, 3, jnp.bfloat16)
    pads = ((1, 1), (1, 1))
    y, dx, dw = _value_and_grads(_shifts, x, w, 2, pads)
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    y_ref, dx_ref, dw_ref = _value_and_grads(_conv, x32, w32, 2, pads)
    _close(y, y_ref, 2e-2)  # one bf16 rounding of a float32 sum
    _close(dx, dx_ref, 2e-2)
    _close(dw, dw_ref, 2e-2)


def test_shifts_on_a_batch_sharded_mesh():
    """The weight gradient scans over rows, not the batch axis a data mesh shards."""
    devices = jax.devices()[:4]
    if len(devices) < 4:
        pytest.skip("needs 4 devices (conftest forces 8 CPU devices)")
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    x, w = _inputs(8, 12, 5, 3)
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    pads = ((1, 1), (1, 1))
    y, dx, dw = _value_and_grads(_shifts, xs, w, 1, pads)
    y_ref, dx_ref, dw_ref = _value_and_grads(_conv, x, w, 1, pads)
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(_shifts(x, w, 1, pads) ** 2), (0, 1)))
    hlo = grad.lower(xs, w).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo  # only dw's all-reduce
    assert "all-reduce" in hlo
    _close(y, y_ref, 1e-5)
    _close(dx, dx_ref, 1e-5)
    _close(dw, dw_ref, 1e-5)


# ----------------------------------------------------------------------------- conv_norm


class _ConvNorm(nn.Module):
    """One conv of each kind and its BatchNorm, as the families build them."""

    kind: str
    bn_train: bool = False
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.kind == "pointwise":
            conv = layers.PointwiseConv(6, dtype=self.dtype, name="conv")
        elif self.kind == "depthwise_shift":
            conv = layers.DepthwiseConv(3, 2, impl="shift", dtype=self.dtype, name="conv")
        elif self.kind == "depthwise_conv":
            conv = layers.DepthwiseConv(5, 1, impl="conv", dtype=self.dtype, name="conv")
        else:
            conv = layers.Conv(7, 3, stride=2, padding=((1, 1), (1, 1)), dtype=self.dtype,
                               name="conv")  # fmt: skip
        norm = functools.partial(
            nn.BatchNorm, use_running_average=not self.bn_train, epsilon=1e-3, dtype=self.dtype,
            name="bn",
        )  # fmt: skip
        return layers.conv_norm(conv, x, bn_train=self.bn_train, norm=norm, name="bn", eps=1e-3)


KINDS = ("pointwise", "depthwise_shift", "depthwise_conv", "conv")


def _random_stats(variables, seed=0):
    """Running statistics and BatchNorm parameters away from their initial values."""
    rng = np.random.default_rng(seed)
    bn = variables["params"]["bn"]
    c = bn["scale"].shape
    params = {
        **variables["params"],
        "bn": {
            "scale": rng.uniform(0.5, 2, c).astype(np.float32),
            "bias": rng.normal(0, 1, c).astype(np.float32),
        },
    }
    stats = {"bn": {"mean": rng.normal(0, 1, c).astype(np.float32),
                    "var": rng.uniform(0.2, 3, c).astype(np.float32)}}  # fmt: skip
    return {"params": params, "batch_stats": stats}


def _frozen_bn(monkeypatch, impl: str):
    monkeypatch.setattr(layers, "FROZEN_BN", impl)


@pytest.mark.parametrize("kind", KINDS)
def test_conv_norm_variables_are_batchnorms(kind, monkeypatch):
    """FrozenBatchNorm's variables are nn.BatchNorm's: names, shapes, dtypes, initial values
    (so checkpoints, converted weights and freezing rules see one tree either way)."""
    x = jnp.zeros((2, 9, 9, 4))
    trees = []
    for impl in ("batchnorm", "scaled"):
        _frozen_bn(monkeypatch, impl)
        trees.append(_ConvNorm(kind).init(jax.random.key(0), x))
    unfolded, folded = (jax.tree_util.tree_map(np.asarray, t) for t in trees)
    assert jax.tree_util.tree_structure(folded) == jax.tree_util.tree_structure(unfolded)
    for a, b in zip(
        jax.tree_util.tree_leaves(unfolded), jax.tree_util.tree_leaves(folded), strict=True
    ):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("impl", ["scaled", "fold"])
@pytest.mark.parametrize("kind", KINDS)
def test_frozen_conv_norm_matches_conv_then_batchnorm(kind, impl, monkeypatch):
    """Frozen statistics: scaled_linear (and the kernel fold) are the same function as conv
    then nn.BatchNorm, forward and every parameter's gradient (kernel, scale, bias), and the
    input's gradient."""
    x = jax.random.normal(jax.random.key(1), (2, 9, 9, 4))
    _frozen_bn(monkeypatch, "batchnorm")
    variables = _random_stats(_ConvNorm(kind).init(jax.random.key(0), x))
    cot = jax.random.normal(jax.random.key(2), _ConvNorm(kind).apply(variables, x).shape)

    def loss(params, x):
        y = _ConvNorm(kind).apply({"params": params, "batch_stats": variables["batch_stats"]}, x)
        return jnp.sum(y * cot)

    results = []
    for side in ("batchnorm", impl):
        _frozen_bn(monkeypatch, side)
        out = _ConvNorm(kind).apply(variables, x)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], x)
        results.append((out, grads))
    (out0, g0), (out1, g1) = results
    np.testing.assert_allclose(out1, out0, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_scaled_conv_norm_bfloat16_keeps_dtypes(monkeypatch):
    """bf16 compute: bf16 output and input gradient, float32 parameter gradients, close to
    the float32 BatchNorm."""
    x = jax.random.normal(jax.random.key(1), (2, 9, 9, 4))
    _frozen_bn(monkeypatch, "batchnorm")
    variables = _random_stats(_ConvNorm("conv").init(jax.random.key(0), x))
    ref = _ConvNorm("conv").apply(variables, x)
    _frozen_bn(monkeypatch, "scaled")
    model = _ConvNorm("conv", dtype=jnp.bfloat16)
    out = model.apply(variables, x.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=5e-2, atol=5e-2)

    def loss(params, x):
        y = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)
        return jnp.sum(y.astype(jnp.float32))

    grads, dx = jax.grad(loss, argnums=(0, 1))(variables["params"], x.astype(jnp.bfloat16))
    assert dx.dtype == jnp.bfloat16
    assert {g.dtype for g in jax.tree_util.tree_leaves(grads)} == {jnp.dtype(jnp.float32)}


def test_conv_norm_with_batch_statistics_is_flax_batchnorm(monkeypatch):
    """bn_train: conv, then nn.BatchNorm on the batch's statistics, which it updates."""
    _frozen_bn(monkeypatch, "scaled")
    x = jax.random.normal(jax.random.key(1), (2, 9, 9, 4))
    model = _ConvNorm("pointwise", bn_train=True)
    variables = _random_stats(model.init(jax.random.key(0), x))
    y, updated = model.apply(variables, x, mutable=["batch_stats"])
    z = layers.PointwiseConv(6).apply({"params": variables["params"]["conv"]}, x)
    mean, var = z.mean(axis=(0, 1, 2)), z.var(axis=(0, 1, 2))
    bn = variables["params"]["bn"]
    expected = (z - mean) / jnp.sqrt(var + 1e-3) * bn["scale"] + bn["bias"]
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    moved = updated["batch_stats"]["bn"]["mean"]
    assert not np.allclose(moved, variables["batch_stats"]["bn"]["mean"])


@pytest.mark.parametrize("name", ["efficientnet_lite_tiny", "resnet_tiny"])
def test_families_scaled_is_the_same_network(name, monkeypatch):
    """A whole backbone with frozen statistics: the same variables, logits and gradients
    with scaled_linear as with nn.BatchNorm."""
    from tlflax.models import common

    spec = common.create_model(name, num_classes=3)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))

    _frozen_bn(monkeypatch, "batchnorm")
    base = refs.perturbed(spec.init(jax.random.key(0), 32))

    def loss(params):
        logits = spec.module.apply({"params": params, "batch_stats": base["batch_stats"]}, x)
        return jnp.sum(logits**2), logits

    out = []
    for impl in ("batchnorm", "scaled"):
        _frozen_bn(monkeypatch, impl)
        variables = spec.init(jax.random.key(0), 32)
        assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(base)
        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(base["params"])
        out.append((logits, grads))
    np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(
        jax.tree_util.tree_leaves(out[0][1]), jax.tree_util.tree_leaves(out[1][1]), strict=True
    ):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5 * float(np.max(np.abs(a)) + 1))
