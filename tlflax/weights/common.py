"""What a converter returns, and what converters share: layout changes, the PyTorch and Keras
leaf tables, and the loop that places each array under its tlflax name."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

from tlflax.errors import ConfigError

UNEXPECTED_PREFIX = "?"  # converters keep keys they cannot map under '?<source key>'


@dataclasses.dataclass
class Converted:
    """A checkpoint in tlflax naming.

    variables: '/'-joined names with their collection first, e.g.
      'params/backbone/stem/conv/kernel', 'batch_stats/backbone/stem/bn/mean',
      'params/head/out/kernel' (the checkpoint's own classifier, if it has one);
      plus '?<source key>' for every key the converter could not map, so that
      merging lists them as unexpected instead of dropping them silently.
    scheme: the naming scheme recognised ('hf', 'timm', 'hf_flax', 'big_vision', 'lite_pth').
    ignored: source keys deliberately unused, with the reason (e.g. BatchNorm's
      'num_batches_tracked' counters, the HF ViT pooler that classification never uses).
    """

    variables: dict[str, np.ndarray]
    scheme: str
    ignored: dict[str, str] = dataclasses.field(default_factory=dict)


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch conv weight (O, I, kH, kW) -> Flax (kH, kW, I, O)."""
    if w.ndim != 4:
        raise ValueError(f"expected a 4-d conv weight, got shape {w.shape}")
    return np.transpose(w, (2, 3, 1, 0))


def dense_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch linear weight (out, in) -> Flax (in, out)."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-d linear weight, got shape {w.shape}")
    return np.transpose(w)


# A PyTorch conv / BatchNorm / linear leaf, by (target kind, checkpoint leaf) ->
# (collection, tlflax leaf, layout change).
TORCH_LEAVES = {
    ("conv", "weight"): ("params", "kernel", conv_kernel),
    ("bn", "weight"): ("params", "scale", None),
    ("bn", "bias"): ("params", "bias", None),
    ("bn", "running_mean"): ("batch_stats", "mean", None),
    ("bn", "running_var"): ("batch_stats", "var", None),
    ("dense", "weight"): ("params", "kernel", dense_kernel),
    ("dense", "bias"): ("params", "bias", None),
}
# A Keras weight -> (collection, tlflax leaf, layout change); a depthwise kernel is
# (k, k, C, 1) in Keras, (k, k, 1, C) in flax.
KERAS_LEAVES = {
    "kernel": ("params", "kernel", None),
    "depthwise_kernel": ("params", "kernel", lambda w: np.transpose(w, (0, 1, 3, 2))),
    "gamma": ("params", "scale", None),
    "beta": ("params", "bias", None),
    "moving_mean": ("batch_stats", "mean", None),
    "moving_variance": ("batch_stats", "var", None),
    "bias": ("params", "bias", None),
}
BN_COUNTER = "BatchNorm update counter; flax's BatchNorm keeps none (momentum is fixed)"

# (full tlflax name with its collection, layout change or None)
Target = tuple[str, Callable[[np.ndarray], np.ndarray] | None]


def target(module: str | None, rule: tuple | None) -> Target | None:
    """Where a checkpoint leaf goes: `module` ('backbone/stem/conv') and `rule` (a
    TORCH_LEAVES / KERAS_LEAVES value) -> ('params/backbone/stem/conv/kernel', change);
    None where either is missing."""
    return (f"{rule[0]}/{module}/{rule[1]}", rule[2]) if module and rule else None


def torch_counter(key: str) -> str | None:
    """Why a PyTorch key is left out: BatchNorm's update counters; None for the others."""
    return BN_COUNTER if key.endswith(".num_batches_tracked") else None


def check_family(spec, family: str) -> None:
    """convert_<family> refuses another family's model, naming both."""
    if spec.family != family:
        raise ConfigError(
            f"convert_{family} got a {spec.family!r} model ({spec.name}); use its own"
        )


def unwrapped(state: Mapping) -> dict[str, str]:
    """Each key without DataParallel's leading 'module.' -> the key as saved."""
    keys = {k.removeprefix("module."): k for k in state}
    if len(keys) != len(state):
        raise ConfigError("checkpoint names repeat once 'module.' is removed; save it unwrapped")
    return keys


def convert_each(
    state: Mapping[str, np.ndarray],
    target_of: Callable[[str], Target | None],
    *,
    scheme: str,
    keys: Mapping[str, str] | None = None,
    skip: Callable[[str], str | None] | None = None,
) -> Converted:
    """Every array under target_of(key)'s name, its layout changed; a key `skip` gives a
    reason for in `ignored`; a key with no target, or whose name an earlier key took, under
    '?<key as saved>'. `keys`: key as mapped -> key in `state` (default: the same)."""
    variables: dict[str, np.ndarray] = {}
    ignored: dict[str, str] = {}
    for key, saved in (keys or {k: k for k in state}).items():
        value = np.asarray(state[saved])
        reason = skip(key) if skip else None
        if reason:
            ignored[saved] = reason
            continue
        found = target_of(key)
        if not found or found[0] in variables:  # unknown, or a second key for one name
            variables[UNEXPECTED_PREFIX + saved] = value
            continue
        name, change = found
        variables[name] = change(value) if change else value
    return Converted(variables, scheme, ignored)
