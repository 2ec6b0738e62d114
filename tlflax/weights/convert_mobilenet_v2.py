"""MobileNetV2 checkpoints -> tlflax names (tlflax.models.mobilenet_v2).

Two naming schemes, recognised from the keys (a leading 'module.' of DataParallel is dropped):
  'torchvision'  torchvision's mobilenet_v2 (mobilenet_v2-b0353104.pth, -7ebf99e0.pth):
                 features.0.{0,1} (stem conv, bn); features.{i}.conv.* for block i (numbered
                 1..N across stages): with expansion conv.0.{0,1} (expand), conv.1.{0,1}
                 (depthwise), conv.2 (project conv), conv.3 (its bn); without (the first
                 block) conv.0.{0,1} (depthwise), conv.1, conv.2; features.{N+1}.{0,1} (head
                 conv, bn); classifier.1 (the 1000-class layer; classifier.0 is the dropout).
  'timm'         timm's mobilenetv2_*: conv_stem, bn1, blocks.{s}.{j}.{conv_pw, bn1, conv_dw,
                 bn2, conv_pwl, bn3} (stage 0 is a DepthwiseSeparable block: conv_dw, bn1,
                 conv_pw, bn2), conv_head, bn2, classifier.
torchvision numbers blocks across stages: block i is placed by the model's own stage depths
(spec.arch['repeats']); widths cannot mark the stage boundaries, as narrow models have
stages of equal width. A checkpoint of another depth therefore leaves blocks missing or
unexpected, by name, and the merge lists them.
"""

from __future__ import annotations

import re

import numpy as np

from tlflax.errors import ConfigError
from tlflax.weights.common import TORCH_LEAVES, UNEXPECTED_PREFIX, Converted

SCHEMES = ("torchvision", "timm")
_IGNORED = "BatchNorm update counter; flax's BatchNorm keeps none (momentum is fixed)"

# torchvision InvertedResidual.conv, with and without the expansion conv
_TV_EXPANDED = {
    "conv.0.0": "expand_conv",
    "conv.0.1": "expand_bn",
    "conv.1.0": "dw_conv",
    "conv.1.1": "dw_bn",
    "conv.2": "project_conv",
    "conv.3": "project_bn",
}
_TV_PLAIN = {
    "conv.0.0": "dw_conv",
    "conv.0.1": "dw_bn",
    "conv.1": "project_conv",
    "conv.2": "project_bn",
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
    if "features.0.0.weight" in keys:
        return "torchvision"
    if "conv_stem.weight" in keys and any(k.startswith("blocks.") for k in keys):
        return "timm"
    raise ConfigError(
        f"not a MobileNetV2 checkpoint tlflax knows (keys such as {sorted(keys)[:5]}); "
        "supported: torchvision ('features.0.0.weight', 'features.1.conv.0.0.weight', ...) "
        "and timm ('conv_stem.weight', 'blocks.0.0.conv_dw.weight', ...)"
    )


def torchvision_block_names(repeats) -> dict[int, str]:
    """torchvision's `features` index of each block -> 'stage{s}/block{j}'."""
    names, i = {}, 1
    for stage, n_blocks in enumerate(repeats, 1):
        for j in range(1, n_blocks + 1):
            names[i], i = f"stage{stage}/block{j}", i + 1
    return names


def _torchvision_module(path: str, *, blocks: dict[int, str], keys: set[str]) -> str | None:
    module = path.rsplit(".", 1)[0]
    head = len(blocks) + 1
    top = {
        "features.0.0": "backbone/stem/conv",
        "features.0.1": "backbone/stem/bn",
        f"features.{head}.0": "backbone/head_conv",
        f"features.{head}.1": "backbone/head_bn",
        "classifier.1": "head/out",
    }
    if module in top:
        return top[module]
    m = re.fullmatch(r"features\.(\d+)\.(conv\.\d+(?:\.\d+)?)", module)
    if not m or int(m[1]) not in blocks:
        return None
    expands = f"features.{m[1]}.conv.3.weight" in keys
    part = (_TV_EXPANDED if expands else _TV_PLAIN).get(m[2])
    return part and f"backbone/{blocks[int(m[1])]}/{part}"


def _timm_module(path: str, *, keys: set[str]) -> str | None:
    module = path.rsplit(".", 1)[0]
    if module in _TIMM_TOP:
        return f"backbone/{_TIMM_TOP[module]}"
    if module == "classifier":
        return "head/out"
    m = re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(\w+)", module)
    if not m:
        return None
    expands = f"blocks.{m[1]}.{m[2]}.conv_pwl.weight" in keys
    part = (_TIMM_IR if expands else _TIMM_DS).get(m[3])
    return part and f"backbone/stage{int(m[1]) + 1}/block{int(m[2]) + 1}/{part}"


def _kind(module: str) -> str:
    return "dense" if module == "head/out" else "bn" if module.endswith("bn") else "conv"


def convert(state: dict[str, np.ndarray], *, spec, shapes) -> Converted:
    """A MobileNetV2 checkpoint in tlflax names. `shapes` is unused: nothing is adapted."""
    del shapes
    if spec.family != "mobilenet_v2":
        raise ConfigError(
            f"convert_mobilenet_v2 got a {spec.family!r} model ({spec.name}); use its own"
        )
    scheme = detect_scheme(state)
    stripped = {_strip(k): k for k in state}
    if len(stripped) != len(state):
        raise ConfigError("checkpoint names repeat once 'module.' is removed; save it unwrapped")
    keys = set(stripped)
    if scheme == "torchvision":
        blocks = torchvision_block_names(spec.arch["repeats"])
        module_of = lambda path: _torchvision_module(path, blocks=blocks, keys=keys)
    else:
        module_of = lambda path: _timm_module(path, keys=keys)
    variables: dict[str, np.ndarray] = {}
    ignored: dict[str, str] = {}
    for path, original in stripped.items():
        value = np.asarray(state[original])
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
