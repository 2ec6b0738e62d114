"""What a converter returns, and the small array helpers converters share."""

from __future__ import annotations

import dataclasses

import numpy as np

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
# (collection, tlflax leaf, layout change). Shared by the ResNet and Lite converters.
TORCH_LEAVES = {
    ("conv", "weight"): ("params", "kernel", conv_kernel),
    ("bn", "weight"): ("params", "scale", None),
    ("bn", "bias"): ("params", "bias", None),
    ("bn", "running_mean"): ("batch_stats", "mean", None),
    ("bn", "running_var"): ("batch_stats", "var", None),
    ("dense", "weight"): ("params", "kernel", dense_kernel),
    ("dense", "bias"): ("params", "bias", None),
}
