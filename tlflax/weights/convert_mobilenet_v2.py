"""MobileNetV2 checkpoints -> tlflax names (tlflax.models.mobilenet_v2).

Three naming schemes, recognised from the keys (a leading 'module.' of DataParallel is dropped):
  'torchvision'  torchvision's mobilenet_v2 (mobilenet_v2-b0353104.pth, -7ebf99e0.pth):
                 features.0.{0,1} (stem conv, bn); features.{i}.conv.* for block i (numbered
                 1..N across stages): with expansion conv.0.{0,1} (expand), conv.1.{0,1}
                 (depthwise), conv.2 (project conv), conv.3 (its bn); without (the first
                 block) conv.0.{0,1} (depthwise), conv.1, conv.2; features.{N+1}.{0,1} (head
                 conv, bn); classifier.1 (the 1000-class layer; classifier.0 is the dropout).
  'timm'         timm's mobilenetv2_*: conv_stem, bn1, blocks.{s}.{j}.{conv_pw, bn1, conv_dw,
                 bn2, conv_pwl, bn3} (stage 0 is a DepthwiseSeparable block: conv_dw, bn1,
                 conv_pw, bn2), conv_head, bn2, classifier.
  'keras'        keras.applications.MobileNetV2 (tlflax.weights.keras: .h5, .weights.h5,
                 .keras; keras:mobilenet_v2_<alpha>_<rows>[_notop]): Conv1 / bn_Conv1 (stem);
                 expanded_conv_{depthwise,project}[_BN] (block 0, no expansion);
                 block_{k}_{expand,depthwise,project}[_BN] for k = 1..16; Conv_1 / Conv_1_bn
                 (head conv); predictions (the 1000-class layer; *_no_top files end at
                 Conv_1_bn). Weights kernel, depthwise_kernel (Keras 3: kernel),
                 gamma, beta, moving_mean, moving_variance, bias. A Keras 3 file that names
                 no layer is read by Keras' numbering (conv2d, depthwise_conv2d,
                 batch_normalization, dense, each in model order).
                 Keras computes with TF 'same' padding and BatchNorm epsilon 1e-3: a model
                 built otherwise (the default, PyTorch's numerics) is refused, in one line
                 that gives the overrides to set, the file's alpha (width) included.
torchvision and Keras number blocks across stages: block i is placed by the model's own stage depths
(spec.arch['repeats']); widths cannot mark the stage boundaries, as narrow models have
stages of equal width. A checkpoint of another depth therefore leaves blocks missing or
unexpected, by name, and the merge lists them.
"""

from __future__ import annotations

import re

import numpy as np

from tlflax.errors import ConfigError
from tlflax.models import mobilenet_v2
from tlflax.weights import keras
from tlflax.weights.common import Converted, check_family, convert_each, torch_counter, unwrapped
from tlflax.weights.convert_efficientnet_lite import (
    block_names,
    keras_target,
    timm_module,
    torch_target,
)

SCHEMES = ("torchvision", "timm", "keras")

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


# keras.applications.MobileNetV2: the model-level layers, and a block's layers by suffix.
_KERAS_TOP = {
    "Conv1": "backbone/stem/conv",
    "bn_Conv1": "backbone/stem/bn",
    "Conv_1": "backbone/head_conv",
    "Conv_1_bn": "backbone/head_bn",
    "predictions": "head/out",
}
_KERAS_PARTS = {
    "expand": "expand_conv",
    "expand_BN": "expand_bn",
    "depthwise": "dw_conv",
    "depthwise_BN": "dw_bn",
    "project": "project_conv",
    "project_BN": "project_bn",
}
_KERAS_BLOCK = re.compile(r"(?:expanded_conv|block_(\d+))_(expand|depthwise|project)(_BN)?")
# Keras' numerics (keras.applications.MobileNetV2: correct_pad + 'valid' before its stride-2
# convs, 'same' elsewhere; BatchNormalization(epsilon=1e-3)) and its pretrained alphas.
KERAS_OPTIONS = {"padding": "same", "bn_eps": 1e-3}
KERAS_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
_KERAS_ANY = re.compile(
    r"(Conv1|bn_Conv1|Conv_1|Conv_1_bn|expanded_conv_\w+|block_\d+_\w+|"
    r"layers/(depthwise_conv2d|conv2d|batch_normalization)(_\d+)?)/"
)


def detect_scheme(keys) -> str:
    keys = [k.removeprefix("module.") for k in keys]
    if "features.0.0.weight" in keys:
        return "torchvision"
    if "conv_stem.weight" in keys and any(k.startswith("blocks.") for k in keys):
        return "timm"
    if any(_KERAS_ANY.match(k) for k in keys):
        return "keras"
    raise ConfigError(
        f"not a MobileNetV2 checkpoint tlflax knows (keys such as {sorted(keys)[:5]}); "
        "supported: torchvision ('features.0.0.weight', 'features.1.conv.0.0.weight', ...), "
        "timm ('conv_stem.weight', 'blocks.0.0.conv_dw.weight', ...) and keras.applications "
        "('Conv1/kernel', 'block_1_expand/kernel', ...)"
    )


def _torchvision_module(module: str, *, blocks: dict[int, str], keys) -> str | None:
    """tlflax module of a torchvision module path; `blocks`: block_names(repeats, first=1)."""
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


# --------------------------------------------------------------------------- keras


def keras_layer_order(arch: dict) -> dict[str, list[str]]:
    """Keras' layer names per class, in model order (how a Keras 3 file that names no layer
    numbers them: conv2d, conv2d_1, ...), for a model of this layout."""
    convs, depthwise, norms = ["Conv1"], [], ["bn_Conv1"]
    blocks = [b for stage in mobilenet_v2.block_layout(arch) for b in stage]
    for k, block in enumerate(blocks):
        prefix = f"block_{k}_" if k else "expanded_conv_"
        if block.expand_ratio != 1:
            convs.append(f"{prefix}expand")
            norms.append(f"{prefix}expand_BN")
        depthwise.append(f"{prefix}depthwise")
        convs.append(f"{prefix}project")
        norms += [f"{prefix}depthwise_BN", f"{prefix}project_BN"]
    return {
        "conv2d": [*convs, "Conv_1"],
        "depthwise_conv2d": depthwise,
        "batch_normalization": [*norms, "Conv_1_bn"],
        "dense": ["predictions"],
    }


def _keras_kind(layer: str) -> str | None:
    if layer in ("Conv1", "Conv_1") or re.fullmatch(r".+_(expand|project)", layer):
        return "Conv2D"
    if layer.endswith("_depthwise"):
        return "DepthwiseConv2D"
    if layer in ("bn_Conv1", "Conv_1_bn") or layer.endswith("_BN"):
        return "BatchNormalization"
    return "Dense" if layer == "predictions" else None


def _keras_state(state, arch) -> dict[str, np.ndarray]:
    """Keras' layer and weight names for every array, by Keras' numbering where the file
    names no layer (refused where the counts show another layout: the order would lie)."""
    return keras.named_state(state, keras_layer_order(arch), _keras_kind, hint="width, stages")


def keras_module(layer: str, *, blocks: dict[int, str]) -> str | None:
    """tlflax module of a keras.applications.MobileNetV2 layer, else None; `blocks`:
    block_names(repeats, first=1)."""
    if layer in _KERAS_TOP:
        return _KERAS_TOP[layer]
    m = _KERAS_BLOCK.fullmatch(layer)
    if not m or (m[1] is None) != layer.startswith("expanded_conv"):
        return None
    k = int(m[1] or 0)
    if k + 1 not in blocks:
        return None
    return f"backbone/{blocks[k + 1]}/{_KERAS_PARTS[m[2] + (m[3] or '')]}"


def _widths(arch: dict) -> tuple[int, int, int]:
    """(stem, last block, head conv) widths of a model: they tell Keras' alphas apart."""
    stem, head = mobilenet_v2.stem_and_head_widths(arch)
    return stem, mobilenet_v2.block_layout(arch)[-1][-1].out_channels, head


def _file_widths(state) -> tuple[int, int, int] | None:
    stem, head = state.get("Conv1/kernel"), state.get("Conv_1/kernel")
    if np.ndim(stem) != 4 or np.ndim(head) != 4:
        return None
    return np.shape(stem)[-1], np.shape(head)[-2], np.shape(head)[-1]


def _overrides_of(spec) -> dict:
    """The model options the user set: those of spec.arch that are not its name's."""
    base = {**mobilenet_v2.DEFAULTS, **mobilenet_v2.ARCHS.get(spec.name, {})}
    return {k: spec.arch[k] for k, v in base.items() if spec.arch[k] != v}


def check_keras_options(state, spec) -> None:
    """Keras' weights into a model that computes otherwise, or of another width: refused in
    one line that gives the overrides making it Keras' model."""
    arch = spec.arch
    need = {k: v for k, v in KERAS_OPTIONS.items() if arch[k] != v}
    found = _file_widths(state)
    alphas = {_widths({**mobilenet_v2.DEFAULTS, "width": a}): a for a in KERAS_ALPHAS}
    alpha = alphas.get(found)
    if alpha is not None and found != _widths(arch):
        need = {"width": alpha, **need}
    if not need:
        return
    has = ", ".join(f"{k}={arch[k]!r}" for k in need)
    overrides = {**_overrides_of(spec), **need}
    given = ", ".join(f"{k}={v!r}" for k, v in need.items())
    raise ConfigError(
        f"weights are keras.applications' MobileNetV2{f' alpha {alpha}' if alpha else ''}, "
        f"computed with TF 'same' padding and BatchNorm epsilon 1e-3; model {spec.name!r} "
        f'has {has}: give --config.model.overrides="{overrides!r}" (in a config file: '
        f"c.model.overrides.update({given}))"
    )


def _convert_keras(state, spec) -> Converted:
    state = _keras_state(state, spec.arch)
    check_keras_options(state, spec)
    blocks = block_names(spec.arch["repeats"], first=1)
    return convert_each(state, lambda key: _keras_target(key, blocks=blocks), scheme="keras")


def _keras_target(key: str, *, blocks: dict[int, str]):
    layer, _, leaf = key.removesuffix(":0").rpartition("/")
    return keras_target(keras_module(layer, blocks=blocks), leaf)


def convert(state: dict[str, np.ndarray], *, spec, shapes) -> Converted:
    """A MobileNetV2 checkpoint in tlflax names. `shapes` is unused: nothing is adapted."""
    del shapes
    check_family(spec, "mobilenet_v2")
    scheme = detect_scheme(state)
    if scheme == "keras":
        return _convert_keras(state, spec)
    keys = unwrapped(state)
    if scheme == "torchvision":
        blocks = block_names(spec.arch["repeats"], first=1)
        module_of = lambda module: _torchvision_module(module, blocks=blocks, keys=keys)
    else:
        module_of = lambda module: timm_module(module, keys=keys)
    target_of = lambda key: torch_target(key, module_of)
    return convert_each(state, target_of, scheme=scheme, keys=keys, skip=torch_counter)
