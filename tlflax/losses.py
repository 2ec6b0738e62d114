"""Losses and per-example metrics (a leaf: jax only).

All math is float32 whatever the logits' dtype: a bf16 log-softmax loses about
two digits, enough to make a 1000-class loss visibly wrong.
Masks mark real examples; padded rows (the last eval batch) never count, and
`jnp.where` (not a product) keeps their values out even when they are not finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def onehot_targets(labels, *, num_classes: int, label_smoothing: float = 0.0):
    """(B,) int labels -> (B, C) float32 targets; smoothing spreads eps over all classes."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing}; use a value in [0, 1)")
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return onehot * (1.0 - label_smoothing) + label_smoothing / num_classes


def softmax_xent_per_example(*, logits, targets):
    """(B, C) logits, (B, C) soft targets -> (B,) float32 cross-entropy."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(targets.astype(jnp.float32) * logp, axis=-1)


def masked_mean(values, mask=None):
    """Mean of (B,) values over mask=True rows; 0.0 when no row is valid."""
    values = values.astype(jnp.float32)
    if mask is None:
        return jnp.mean(values)
    mask = mask.astype(bool)
    total = jnp.sum(jnp.where(mask, values, 0.0))
    return total / jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)


def softmax_xent(*, logits, targets, mask=None):
    """Scalar mean cross-entropy over the valid examples (float32)."""
    return masked_mean(softmax_xent_per_example(logits=logits, targets=targets), mask)


def correct_topk(*, logits, labels, k: int):
    """(B,) bool: the label is among the k highest logits.

    Ties rank the lower class index first, as argmax and lax.top_k do, so a
    constant logit row (a zero-initialised head) is not "correct" for every class.
    k >= C is always correct. A non-finite label logit is never correct.
    """
    if k < 1:
        raise ValueError(f"correct_topk: k={k}; use k >= 1")
    label_logit = jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=-1)
    classes = jnp.arange(logits.shape[-1])
    ahead = (logits > label_logit) | ((logits == label_logit) & (classes < labels[:, None]))
    rank = jnp.sum(ahead, axis=-1)
    return (rank < k) & jnp.isfinite(label_logit[:, 0])


def predicted_class(logits):
    """(B,) int32 argmax (the lower index wins a tie)."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def confidence(logits):
    """(B,) float32 softmax probability of the predicted class."""
    logits = logits.astype(jnp.float32)
    return jnp.exp(jnp.max(logits, axis=-1) - jax.nn.logsumexp(logits, axis=-1))
