"""models/layers.py: the CPU's depthwise conv (shifted slices with their own backward pass)
against XLA's grouped convolution, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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
