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
from tlflax.weights.common import TORCH_LEAVES, UNEXPECTED_PREFIX, Converted
from tlflax.weights.merge import CheckpointMismatchError

SCHEMES = ("torchvision", "timm", "keras")
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
# Keras weight -> (collection, tlflax leaf, layout change); a depthwise kernel is
# (k, k, C, 1) in Keras, (k, k, 1, C) in flax.
_KERAS_LEAVES = {
    "kernel": ("params", "kernel", None),
    "depthwise_kernel": ("params", "kernel", lambda w: np.transpose(w, (0, 1, 3, 2))),
    "gamma": ("params", "scale", None),
    "beta": ("params", "bias", None),
    "moving_mean": ("batch_stats", "mean", None),
    "moving_variance": ("batch_stats", "var", None),
    "bias": ("params", "bias", None),
}
# Keras' numerics (keras.applications.MobileNetV2: correct_pad + 'valid' before its stride-2
# convs, 'same' elsewhere; BatchNormalization(epsilon=1e-3)) and its pretrained alphas.
KERAS_OPTIONS = {"padding": "same", "bn_eps": 1e-3}
KERAS_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
_KERAS_ANY = re.compile(
    r"(Conv1|bn_Conv1|Conv_1|Conv_1_bn|expanded_conv_\w+|block_\d+_\w+|"
    r"layers/(depthwise_conv2d|conv2d|batch_normalization)(_\d+)?)/"
)


def _strip(key: str) -> str:
    return key.removeprefix("module.")


def detect_scheme(keys) -> str:
    keys = [_strip(k) for k in keys]
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


def _unnamed_counts(state, classes) -> dict[str, int]:
    """How many layers of each class a Keras 3 file that names no layer holds."""
    found: dict[str, set[str]] = {c: set() for c in classes}
    for key in state:
        m = re.match(r"layers/([a-z0-9_]+?)(?:_\d+)?/", key)
        if m and m[1] in found:
            found[m[1]].add(m[0])
    return {c: len(v) for c, v in found.items()}


def _keras_state(state, arch) -> dict[str, np.ndarray]:
    """Keras' layer and weight names for every array, by Keras' numbering where the file
    names no layer (refused where the counts show another layout: the order would lie)."""
    order = keras_layer_order(arch)
    counts = _unnamed_counts(state, order)
    if any(counts.values()):
        want = {c: len(order[c]) for c in order}
        if not counts["dense"]:
            want["dense"] = 0  # a file without the top
        if counts != want:
            raise CheckpointMismatchError(
                f"the Keras file names no layers (Keras 3 before it stored them), so tlflax "
                f"names them by their order in the model, which needs the file's layout: it "
                f"holds {counts} layers, this model {want}; build the model the file was "
                "saved from (width, stages), or save the file again with a recent Keras"
            )
    return keras.name_vars(keras.by_order(state, order), _keras_kind)


def keras_module(layer: str, *, blocks: dict[int, str]) -> str | None:
    """tlflax module of a keras.applications.MobileNetV2 layer, else None."""
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
    blocks = torchvision_block_names(spec.arch["repeats"])
    variables: dict[str, np.ndarray] = {}
    for key, value in state.items():
        value = np.asarray(value)
        layer, _, leaf = key.removesuffix(":0").rpartition("/")
        module = keras_module(layer, blocks=blocks)
        if module and leaf == "kernel" and module.endswith("dw_conv"):
            leaf = "depthwise_kernel"  # Keras 3's name for it (by its path: 'kernel')
        rule = module and _KERAS_LEAVES.get(leaf)
        name = rule and f"{rule[0]}/{module}/{rule[1]}"
        if not rule or name in variables:
            variables[UNEXPECTED_PREFIX + key] = value
            continue
        variables[name] = rule[2](value) if rule[2] else value
    return Converted(variables, "keras", {})


def convert(state: dict[str, np.ndarray], *, spec, shapes) -> Converted:
    """A MobileNetV2 checkpoint in tlflax names. `shapes` is unused: nothing is adapted."""
    del shapes
    if spec.family != "mobilenet_v2":
        raise ConfigError(
            f"convert_mobilenet_v2 got a {spec.family!r} model ({spec.name}); use its own"
        )
    scheme = detect_scheme(state)
    if scheme == "keras":
        return _convert_keras(state, spec)
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
