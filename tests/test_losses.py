"""tlflax.losses against numpy references: cross-entropy, masking, top-k, confidence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tlflax import losses


def _np_log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _np_smoothed(labels, n_classes, eps):
    targets = np.full((len(labels), n_classes), eps / n_classes)
    targets[np.arange(len(labels)), labels] += 1.0 - eps
    return targets


def _np_topk_correct(logits, labels, k):
    # Stable sort of -logits: ties go to the lower class index, as argmax.
    order = np.argsort(-np.asarray(logits, np.float64), axis=-1, kind="stable")[:, :k]
    return (order == np.asarray(labels)[:, None]).any(axis=-1)


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(12, 7)).astype(np.float32) * 3
    labels = rng.integers(0, 7, size=12).astype(np.int32)
    mask = np.array([True] * 9 + [False] * 3)
    return logits, labels, mask


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_softmax_xent_matches_numpy_with_smoothing_and_mask(batch, eps):
    logits, labels, mask = batch
    targets = losses.onehot_targets(jnp.asarray(labels), num_classes=7, label_smoothing=eps)
    np.testing.assert_allclose(targets, _np_smoothed(labels, 7, eps), rtol=1e-6, atol=1e-7)
    per_ex = -(_np_smoothed(labels, 7, eps) * _np_log_softmax(logits)).sum(-1)
    loss = losses.softmax_xent(logits=logits, targets=targets, mask=mask)
    assert loss.shape == () and loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, per_ex[mask].mean(), rtol=1e-5)
    unmasked = losses.softmax_xent(logits=logits, targets=targets)
    np.testing.assert_allclose(unmasked, per_ex.mean(), rtol=1e-5)
    assert abs(float(loss) - float(unmasked)) > 1e-3  # the mask really changed something


def test_smoothing_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.onehot_targets(jnp.zeros(2, jnp.int32), num_classes=3, label_smoothing=1.0)


def test_masked_rows_never_leak_even_when_not_finite(batch):
    logits, labels, mask = batch
    targets = losses.onehot_targets(jnp.asarray(labels), num_classes=7)
    poisoned = logits.copy()
    poisoned[~mask] = np.nan
    clean = losses.softmax_xent(logits=logits, targets=targets, mask=mask)
    dirty = losses.softmax_xent(logits=poisoned, targets=targets, mask=mask)
    np.testing.assert_allclose(dirty, clean, rtol=1e-6)


def test_all_false_mask_gives_zero_and_finite_gradient(batch):
    logits, labels, _ = batch
    targets = losses.onehot_targets(jnp.asarray(labels), num_classes=7)
    none = jnp.zeros(12, bool)

    def loss_of(x):
        return losses.softmax_xent(logits=x, targets=targets, mask=none)

    value, grad = jax.value_and_grad(loss_of)(jnp.asarray(logits))
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def test_bf16_logits_use_float32_math(batch):
    logits, labels, mask = batch
    targets = losses.onehot_targets(jnp.asarray(labels), num_classes=7, label_smoothing=0.1)
    low = jnp.asarray(logits, jnp.bfloat16)
    loss = losses.softmax_xent(logits=low, targets=targets, mask=mask)
    assert loss.dtype == jnp.float32
    ref = -(_np_smoothed(labels, 7, 0.1) * _np_log_softmax(np.asarray(low, np.float32))).sum(-1)
    np.testing.assert_allclose(loss, ref[mask].mean(), rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 5, 7, 9])
def test_correct_topk_matches_numpy(batch, k):
    logits, labels, _ = batch
    got = losses.correct_topk(logits=jnp.asarray(logits), labels=jnp.asarray(labels), k=k)
    assert got.shape == (12,) and got.dtype == jnp.bool_
    np.testing.assert_array_equal(got, _np_topk_correct(logits, labels, k))
    if k == 1:
        np.testing.assert_array_equal(got, logits.argmax(-1) == labels)
    if k >= 7:
        assert bool(got.all())


def test_correct_topk_ties_break_like_argmax():
    # A zero-initialised head gives constant logits: top-1 must not call every label correct.
    logits = jnp.zeros((4, 5))
    labels = jnp.array([0, 1, 3, 4])
    np.testing.assert_array_equal(
        losses.correct_topk(logits=logits, labels=labels, k=1), [True, False, False, False]
    )
    np.testing.assert_array_equal(
        losses.correct_topk(logits=logits, labels=labels, k=2), [True, True, False, False]
    )
    tied = jnp.array([[1.0, 3.0, 3.0, 0.0]])
    assert bool(losses.correct_topk(logits=tied, labels=jnp.array([1]), k=1)[0])
    assert not bool(losses.correct_topk(logits=tied, labels=jnp.array([2]), k=1)[0])
    assert bool(losses.correct_topk(logits=tied, labels=jnp.array([2]), k=2)[0])
    with pytest.raises(ValueError, match="k=0"):
        losses.correct_topk(logits=tied, labels=jnp.array([2]), k=0)


def test_correct_topk_agrees_with_lax_top_k_and_jits(batch):
    logits, labels, _ = batch
    fn = jax.jit(lambda x, y: losses.correct_topk(logits=x, labels=y, k=3))
    _, idx = jax.lax.top_k(jnp.asarray(logits), 3)
    ref = (np.asarray(idx) == labels[:, None]).any(-1)
    np.testing.assert_array_equal(fn(logits, labels), ref)


def test_non_finite_label_logit_is_never_correct():
    logits = jnp.array([[np.nan, 0.0, 1.0], [0.0, 2.0, 1.0]])
    got = losses.correct_topk(logits=logits, labels=jnp.array([0, 1]), k=3)
    np.testing.assert_array_equal(got, [False, True])


def test_predicted_class_and_confidence(batch):
    logits, _, _ = batch
    np.testing.assert_array_equal(losses.predicted_class(logits), logits.argmax(-1))
    probs = np.exp(_np_log_softmax(logits))
    conf = losses.confidence(jnp.asarray(logits, jnp.bfloat16))
    assert conf.dtype == jnp.float32
    np.testing.assert_allclose(losses.confidence(logits), probs.max(-1), rtol=1e-5)
    np.testing.assert_allclose(conf, probs.max(-1), rtol=3e-2)
    big = jnp.array([[1000.0, 0.0, -1000.0]])  # no overflow on large logits
    np.testing.assert_allclose(losses.confidence(big), [1.0])
