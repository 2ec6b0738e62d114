"""ConvNeXt checkpoints -> tlflax names (tlflax.models.convnext).

Three naming schemes, recognised from the keys (stage and block indices from 0 in all three;
tlflax's stage{i}/block{j} count from 1):
  'timm'  timm's ConvNeXt (convnext_tiny.fb_in1k ...): stem.{0,1} (conv, norm),
          stages.{i}.downsample.{0,1} (norm, conv), stages.{i}.blocks.{j}.{conv_dw, norm,
          mlp.fc1, mlp.fc2, gamma}, head.norm, head.fc. Models built with conv_mlp=True
          (convnext_atto ... nano, tiny_hnf) keep the same names with 1x1-conv MLP weights
          (out, in, 1, 1): read as the linear layers they equal.
  'hf'    transformers ConvNextForImageClassification (facebook/convnext-*-224) and ConvNextModel
          (no 'convnext.' prefix, no classifier): embeddings.{patch_embeddings, layernorm},
          encoder.stages.{i}.downsampling_layer.{0,1}, encoder.stages.{i}.layers.{j}.{dwconv,
          layernorm, pwconv1, pwconv2, layer_scale_parameter}, layernorm, classifier.
  'fb'    the paper's own checkpoints (facebookresearch/ConvNeXt, convnext_tiny_1k_224_ema.pth;
          the {'model': ...} wrapper is unwrapped by the reader): downsample_layers.0.{0,1}
          (the stem), downsample_layers.{i}.{0,1}, stages.{i}.{j}.{dwconv, norm, pwconv1,
          pwconv2, gamma}, norm, head.
Architectures this ConvNeXt is not (ConvNeXt V2's GRN, timm's head_norm_first and overlapping
stems) are refused by name; any other key that maps nowhere is kept as '?<key>', so the merge
lists it.
"""

from __future__ import annotations

import re

import numpy as np

from tlflax.errors import ConfigError
from tlflax.weights.common import (
    UNEXPECTED_PREFIX,
    Converted,
    check_family,
    conv_kernel,
    dense_kernel,
)

SCHEMES = ("timm", "hf", "fb")
HEAD = "head/out"
_N = r"(\d+)"

# (module path regex, tlflax module: format of the indices + 1 (stage, block), kind)
_BLOCK = "stage{0}/block{1}"
_TIMM = [
    (r"stem\.0", "stem/conv", "conv"),
    (r"stem\.1", "stem/norm", "norm"),
    (rf"stages\.{_N}\.downsample\.0", "stage{0}/downsample/norm", "norm"),
    (rf"stages\.{_N}\.downsample\.1", "stage{0}/downsample/conv", "conv"),
    (rf"stages\.{_N}\.blocks\.{_N}\.conv_dw", f"{_BLOCK}/dwconv", "conv"),
    (rf"stages\.{_N}\.blocks\.{_N}\.norm", f"{_BLOCK}/norm", "norm"),
    (rf"stages\.{_N}\.blocks\.{_N}\.mlp\.fc1", f"{_BLOCK}/fc1", "dense"),
    (rf"stages\.{_N}\.blocks\.{_N}\.mlp\.fc2", f"{_BLOCK}/fc2", "dense"),
    (rf"stages\.{_N}\.blocks\.{_N}\.gamma", f"{_BLOCK}/gamma", "param"),
    (r"head\.norm", "norm", "norm"),
    (r"head\.fc", HEAD, "dense"),
]
_HF_LAYER = rf"encoder\.stages\.{_N}\.layers\.{_N}"
_HF = [
    (r"embeddings\.patch_embeddings", "stem/conv", "conv"),
    (r"embeddings\.layernorm", "stem/norm", "norm"),
    (rf"encoder\.stages\.{_N}\.downsampling_layer\.0", "stage{0}/downsample/norm", "norm"),
    (rf"encoder\.stages\.{_N}\.downsampling_layer\.1", "stage{0}/downsample/conv", "conv"),
    (rf"{_HF_LAYER}\.dwconv", f"{_BLOCK}/dwconv", "conv"),
    (rf"{_HF_LAYER}\.layernorm", f"{_BLOCK}/norm", "norm"),
    (rf"{_HF_LAYER}\.pwconv1", f"{_BLOCK}/fc1", "dense"),
    (rf"{_HF_LAYER}\.pwconv2", f"{_BLOCK}/fc2", "dense"),
    (rf"{_HF_LAYER}\.layer_scale_parameter", f"{_BLOCK}/gamma", "param"),
    (r"layernorm", "norm", "norm"),
    (r"classifier", HEAD, "dense"),
]
_FB = [
    (r"downsample_layers\.0\.0", "stem/conv", "conv"),
    (r"downsample_layers\.0\.1", "stem/norm", "norm"),
    (rf"downsample_layers\.{_N}\.0", "stage{0}/downsample/norm", "norm"),
    (rf"downsample_layers\.{_N}\.1", "stage{0}/downsample/conv", "conv"),
    (rf"stages\.{_N}\.{_N}\.dwconv", f"{_BLOCK}/dwconv", "conv"),
    (rf"stages\.{_N}\.{_N}\.norm", f"{_BLOCK}/norm", "norm"),
    (rf"stages\.{_N}\.{_N}\.pwconv1", f"{_BLOCK}/fc1", "dense"),
    (rf"stages\.{_N}\.{_N}\.pwconv2", f"{_BLOCK}/fc2", "dense"),
    (rf"stages\.{_N}\.{_N}\.gamma", f"{_BLOCK}/gamma", "param"),
    (r"norm", "norm", "norm"),
    (r"head", HEAD, "dense"),
]
_RULES = {
    scheme: [(re.compile(p), t, k) for p, t, k in table]
    for scheme, table in (("timm", _TIMM), ("hf", _HF), ("fb", _FB))
}

# Keys of ConvNeXt relatives whose features this model does not compute: refused by name.
_OTHER_ARCHS = [
    (re.compile(r"(.*\.)?grn\.(weight|bias|gamma|beta)"),
     "ConvNeXt V2 (global response norm in each block, no layer scale)"),
    (re.compile(r"norm_pre\.weight"),
     "timm's head_norm_first ConvNeXt (convnext_tiny_hnf: LayerNorm before the pooling)"),
    (re.compile(r"stem\.2\.weight"),
     "timm's overlapping stem (two 3x3 stride-2 convs: convnext_*_ols, stem_type='overlap')"),
]  # fmt: skip


def detect_scheme(state) -> str:
    keys = set(state)
    for pattern, what in _OTHER_ARCHS:
        hit = next((k for k in sorted(keys) if pattern.fullmatch(k)), None)
        if hit:
            raise ConfigError(
                f"a checkpoint of {what} (key {hit!r}); tlflax's ConvNeXt is the original "
                "v1 architecture: use a convnext_tiny/small/base/large checkpoint"
            )
    if any(k.endswith("embeddings.patch_embeddings.weight") for k in keys):
        return "hf"
    if "stem.0.weight" in keys:
        return "timm"
    if "downsample_layers.0.0.weight" in keys:
        return "fb"
    raise ConfigError(
        f"not a ConvNeXt checkpoint tlflax knows (keys such as {sorted(keys)[:5]}); supported "
        f"naming schemes: {', '.join(SCHEMES)} (timm ConvNeXt, transformers "
        "ConvNextForImageClassification / ConvNextModel, facebookresearch/ConvNeXt .pth)"
    )


def _target(key: str, scheme: str):
    """(tlflax module, kind, checkpoint leaf) of a checkpoint key, else None."""
    module, _, leaf = key.rpartition(".")
    for pattern, template, kind in _RULES[scheme]:
        m = pattern.fullmatch(key if kind == "param" else module)
        if m:
            target = template.format(*(int(g) + 1 for g in m.groups()))
            return target, kind, None if kind == "param" else leaf
    return None


def _leaf(kind: str, leaf: str | None, value: np.ndarray):
    """(tlflax leaf, array in Flax layout), or None for a leaf the module does not have."""
    if kind == "param":
        return "", value
    if leaf == "bias":
        return "bias", value
    if leaf != "weight":
        return None
    if kind == "norm":
        return "scale", value
    if kind == "conv":
        return "kernel", conv_kernel(value)
    if value.ndim == 4 and value.shape[2:] == (1, 1):  # timm conv_mlp: a 1x1 conv
        value = value[:, :, 0, 0]
    return "kernel", dense_kernel(value)


def convert(state: dict[str, np.ndarray], *, spec, shapes) -> Converted:
    """A ConvNeXt checkpoint in tlflax names. `shapes` is unused: nothing is adapted."""
    del shapes
    check_family(spec, "convnext")
    scheme = detect_scheme(state)
    variables: dict[str, np.ndarray] = {}
    for source_key, value in state.items():
        value = np.asarray(value)
        key = source_key.removeprefix("convnext.") if scheme == "hf" else source_key
        found = _target(key, scheme)
        converted = found and _leaf(found[1], found[2], value)
        if not converted:
            variables[UNEXPECTED_PREFIX + source_key] = value
            continue
        where = "params/" if found[0] == HEAD else "params/backbone/"
        name = f"{where}{found[0]}" + (f"/{converted[0]}" if converted[0] else "")
        if name in variables:  # a second key for one name
            variables[UNEXPECTED_PREFIX + source_key] = value
            continue
        variables[name] = converted[1]
    return Converted(variables, scheme)
