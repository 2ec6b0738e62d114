"""EfficientNet B0..B7 checkpoints -> tlflax names (tlflax.models.efficientnet).

Three naming schemes, recognised from the keys (a leading 'module.' of DataParallel is dropped):
  'timm'          timm's efficientnet_b* / tf_efficientnet_b*: conv_stem, bn1,
                  blocks.{s}.{j}.{conv_pw,bn1,conv_dw,bn2,se.conv_reduce,se.conv_expand,
                  conv_pwl,bn3} (blocks without expansion, stage 1's DepthwiseSeparableConv:
                  conv_dw, bn1, se.*, conv_pw, bn2), conv_head, bn2, classifier.
  'torchvision'   torchvision's efficientnet_b*: features.0.{0,1} (stem conv, bn),
                  features.{s}.{j}.block.{k}.{0,1} (expand, depthwise, project: conv, bn;
                  without expansion the depthwise comes first), ...block.{k}.fc1 / fc2 (SE),
                  features.{last}.{0,1} (head conv, bn), classifier.1 (the linear layer).
  'transformers'  EfficientNetForImageClassification (google/efficientnet-b*):
                  efficientnet.embeddings.{convolution,batchnorm},
                  efficientnet.encoder.blocks.{k}.{expansion.expand_conv, expansion.expand_bn,
                  depthwise_conv.depthwise_conv, depthwise_conv.depthwise_norm,
                  squeeze_excite.reduce, squeeze_excite.expand, projection.project_conv,
                  projection.project_bn}, efficientnet.encoder.top_{conv,bn}, classifier
                  (EfficientNetModel's keys, without 'efficientnet.', are read too).
transformers numbers blocks 0..N-1 across stages: the model's own layout (spec.arch['repeats'])
says which stage each one belongs to, so a checkpoint of another depth yields names the model
lacks or misses, and the merge lists them. Which padding and BatchNorm epsilon the weights
need is not in the keys: the model name says it (efficientnet_b* for PyTorch-trained weights,
tf_efficientnet_b* for TF-trained ones; see tlflax.models.efficientnet).
"""

from __future__ import annotations

import re

import numpy as np

from tlflax.errors import ConfigError
from tlflax.weights.common import TORCH_LEAVES, UNEXPECTED_PREFIX, Converted

SCHEMES = ("timm", "torchvision", "transformers")
_IGNORED = "BatchNorm update counter; flax's BatchNorm keeps none (momentum is fixed)"

_TIMM_TOP = {"conv_stem": "stem/conv", "bn1": "stem/bn", "conv_head": "head_conv", "bn2": "head_bn"}
# timm's InvertedResidual, and DepthwiseSeparableConv (a block without expansion)
_TIMM_IR = {
    "conv_pw": "expand_conv",
    "bn1": "expand_bn",
    "conv_dw": "dw_conv",
    "bn2": "dw_bn",
    "se.conv_reduce": "se/reduce",
    "se.conv_expand": "se/expand",
    "conv_pwl": "project_conv",
    "bn3": "project_bn",
}
_TIMM_DS = {
    "conv_dw": "dw_conv",
    "bn1": "dw_bn",
    "se.conv_reduce": "se/reduce",
    "se.conv_expand": "se/expand",
    "conv_pw": "project_conv",
    "bn2": "project_bn",
}
_HF_TOP = {
    "embeddings.convolution": "stem/conv",
    "embeddings.batchnorm": "stem/bn",
    "encoder.top_conv": "head_conv",
    "encoder.top_bn": "head_bn",
}
_HF_BLOCK = {
    "expansion.expand_conv": "expand_conv",
    "expansion.expand_bn": "expand_bn",
    "depthwise_conv.depthwise_conv": "dw_conv",
    "depthwise_conv.depthwise_norm": "dw_bn",
    "squeeze_excite.reduce": "se/reduce",
    "squeeze_excite.expand": "se/expand",
    "projection.project_conv": "project_conv",
    "projection.project_bn": "project_bn",
}
# torchvision's MBConv `block` Sequential, with and without the expand conv
_TV_EXPAND = {"0": "expand", "1": "dw", "2": "se", "3": "project"}
_TV_NO_EXPAND = {"0": "dw", "1": "se", "2": "project"}


def _strip(key: str) -> str:
    return key.removeprefix("module.")


def detect_scheme(keys) -> str:
    keys = [_strip(k) for k in keys]
    if "conv_stem.weight" in keys and any(k.startswith("blocks.") for k in keys):
        return "timm"
    if "features.0.0.weight" in keys:
        return "torchvision"
    if any(k.startswith(("efficientnet.embeddings.", "embeddings.convolution.")) for k in keys):
        return "transformers"
    raise ConfigError(
        f"not an EfficientNet checkpoint tlflax knows (keys such as {sorted(keys)[:5]}); "
        "supported: timm ('conv_stem.weight', 'blocks.0.0.conv_dw.weight', ...), torchvision "
        "('features.0.0.weight', 'features.1.0.block.0.0.weight', ...) and transformers "
        "('efficientnet.embeddings.convolution.weight', 'efficientnet.encoder.blocks.0...')"
    )


def _timm_module(module: str, *, keys: set[str]) -> str | None:
    if module in _TIMM_TOP:
        return f"backbone/{_TIMM_TOP[module]}"
    if module == "classifier":
        return "head/out"
    m = re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(.+)", module)
    if not m:
        return None
    expands = f"blocks.{m[1]}.{m[2]}.conv_pwl.weight" in keys
    table = _TIMM_IR if expands else _TIMM_DS
    if m[3] not in table:
        return None
    return f"backbone/stage{int(m[1]) + 1}/block{int(m[2]) + 1}/{table[m[3]]}"


def _torchvision_module(module: str, *, keys: set[str], head: int) -> str | None:
    """features.0 is the stem, features.{head} (the last index) the head conv, between them
    the stages."""
    if module == "classifier.1":
        return "head/out"
    m = re.fullmatch(r"features\.(\d+)\.([01])", module)
    if m and int(m[1]) in (0, head):
        where = "stem/" if m[1] == "0" else "head_"  # stem/conv, stem/bn; head_conv, head_bn
        return f"backbone/{where}{'conv' if m[2] == '0' else 'bn'}"
    m = re.fullmatch(r"features\.(\d+)\.(\d+)\.block\.(\d)\.(0|1|fc1|fc2)", module)
    if not m or not 0 < int(m[1]) < head:
        return None
    expands = f"features.{m[1]}.{m[2]}.block.3.0.weight" in keys
    part = (_TV_EXPAND if expands else _TV_NO_EXPAND).get(m[3])
    if part is None or (part == "se") != (m[4] in ("fc1", "fc2")):
        return None
    leaf = {"0": "conv", "1": "bn"}.get(m[4]) or {"fc1": "reduce", "fc2": "expand"}[m[4]]
    name = f"se/{leaf}" if part == "se" else f"{part}_{leaf}"
    return f"backbone/stage{m[1]}/block{int(m[2]) + 1}/{name}"


def hf_block_names(repeats) -> dict[int, str]:
    """transformers' global block index -> 'stage{s}/block{j}' in a model of these repeats."""
    names, k = {}, 0
    for s, n in enumerate(repeats, 1):
        for j in range(1, n + 1):
            names[k], k = f"stage{s}/block{j}", k + 1
    return names


def _hf_module(module: str, *, blocks: dict[int, str]) -> str | None:
    module = module.removeprefix("efficientnet.")
    if module in _HF_TOP:
        return f"backbone/{_HF_TOP[module]}"
    if module == "classifier":
        return "head/out"
    m = re.fullmatch(r"encoder\.blocks\.(\d+)\.(.+)", module)
    if m and int(m[1]) in blocks and m[2] in _HF_BLOCK:
        return f"backbone/{blocks[int(m[1])]}/{_HF_BLOCK[m[2]]}"
    return None


def _se_kernel(w: np.ndarray) -> np.ndarray:
    """A 1x1 conv weight (out, in, 1, 1) -> the Dense kernel (in, out)."""
    if w.ndim != 4 or w.shape[2:] != (1, 1):
        raise ValueError(f"expected a 1x1 conv weight, got shape {w.shape}")
    return w[:, :, 0, 0].T


def _rule(module: str, leaf: str):
    """(collection, tlflax leaf, layout change) of a checkpoint leaf of a tlflax module."""
    if "/se/" in module:
        return {"weight": ("params", "kernel", _se_kernel), "bias": ("params", "bias", None)}.get(
            leaf
        )
    kind = "dense" if module == "head/out" else "bn" if module.endswith("bn") else "conv"
    return TORCH_LEAVES.get((kind, leaf))


def convert(state: dict[str, np.ndarray], *, spec, shapes) -> Converted:
    """An EfficientNet checkpoint in tlflax names. `shapes` is unused: nothing is adapted."""
    del shapes
    if spec.family != "efficientnet":
        raise ConfigError(
            f"convert_efficientnet got a {spec.family!r} model ({spec.name}); use its own"
        )
    scheme = detect_scheme(state)
    stripped = {_strip(k): k for k in state}
    if len(stripped) != len(state):
        raise ConfigError("checkpoint names repeat once 'module.' is removed; save it unwrapped")
    keys = set(stripped)
    if scheme == "timm":
        module_of = lambda module: _timm_module(module, keys=keys)
    elif scheme == "torchvision":
        head = max(int(m[1]) for k in keys if (m := re.match(r"features\.(\d+)\.", k)))
        module_of = lambda module: _torchvision_module(module, keys=keys, head=head)
    else:
        blocks = hf_block_names(spec.arch["repeats"])
        module_of = lambda module: _hf_module(module, blocks=blocks)
    variables: dict[str, np.ndarray] = {}
    ignored: dict[str, str] = {}
    for path, original in stripped.items():
        value = np.asarray(state[original])
        if path.endswith(".num_batches_tracked"):
            ignored[original] = _IGNORED
            continue
        module, leaf = path.rsplit(".", 1) if "." in path else ("", path)
        target = module_of(module)
        rule = target and _rule(target, leaf)
        name = rule and f"{rule[0]}/{target}/{rule[1]}"
        if not rule or name in variables:  # unknown, or a second key for one name
            variables[UNEXPECTED_PREFIX + original] = value
            continue
        variables[name] = rule[2](value) if rule[2] else value
    return Converted(variables, scheme, ignored)
