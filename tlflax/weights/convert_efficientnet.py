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

A fourth scheme, 'keras': keras.applications.EfficientNetB0..B7 files (tlflax.weights.keras:
Keras 2 .h5 from save_weights or model.save, Keras 3 .weights.h5 and .keras;
keras:efficientnetb<i>[_notop]): stem_conv, stem_bn; block{s}{letter}_{expand_conv,
expand_bn, dwconv, bn, se_reduce, se_expand, project_conv, project_bn} (stage s from 1,
block a, b, c, ...; stage 1's blocks have no expand_*); top_conv, top_bn; predictions (the
1000-class layer; *_notop files end at top_bn). The SE layers are 1x1 Conv2Ds with biases
(kernel (1, 1, C, R)), here Dense layers. A Keras 3 file that names no layer is read by
Keras' numbering of each class in model order (conv2d, depthwise_conv2d,
batch_normalization, dense, normalization), refused where its counts are not the model's.
Keras' numerics are tf_efficientnet_b*'s exactly (correct_pad + 'valid' is TF's SAME at the
size the Keras model was built for, BatchNormalization epsilon 1e-3, momentum 0.99, the
same width rounding and SE widths): a model of other numerics is refused in one line naming
tf_efficientnet_b<i>; a file of another depth is refused naming the model it fits.
The model normalises its own input (Rescaling(1/255), Normalization, and with
weights='imagenet' a Rescaling by 1/sqrt(std)): those layers' arrays are not parameters
(listed in `ignored`); `keras_preprocessing` turns them into tlflax's mean / std.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import zipfile

import numpy as np

from tlflax import preprocessing as pp
from tlflax.errors import ConfigError
from tlflax.models import efficientnet
from tlflax.weights import keras
from tlflax.weights.common import (
    TORCH_LEAVES,
    Converted,
    check_family,
    convert_each,
    target,
    torch_counter,
    unwrapped,
)
from tlflax.weights.convert_efficientnet_lite import (
    TIMM_DS,
    TIMM_IR,
    block_names,
    keras_target,
    timm_module,
    torch_target,
)
from tlflax.weights.merge import CheckpointMismatchError
from tlflax.weights.readers import CorruptCheckpointError

SCHEMES = ("timm", "torchvision", "transformers", "keras")

# timm's InvertedResidual and DepthwiseSeparableConv (a block without expansion), with SE
_TIMM_SE = {"se.conv_reduce": "se/reduce", "se.conv_expand": "se/expand"}
_TIMM_IR, _TIMM_DS = {**TIMM_IR, **_TIMM_SE}, {**TIMM_DS, **_TIMM_SE}
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


def detect_scheme(keys) -> str:
    keys = [k.removeprefix("module.") for k in keys]
    if any(_KERAS_ANY.match(k) for k in keys):
        return "keras"
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
        "('efficientnet.embeddings.convolution.weight', 'efficientnet.encoder.blocks.0...') "
        "and keras.applications ('stem_conv/kernel', 'block1a_dwconv/depthwise_kernel', ...)"
    )


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


# TORCH_LEAVES, and the squeeze-excite's 1x1 convs read as Dense layers
_LEAVES = {
    **TORCH_LEAVES,
    ("se", "weight"): ("params", "kernel", _se_kernel),
    ("se", "bias"): ("params", "bias", None),
}


# --------------------------------------------------------------------------- keras

# keras.applications.EfficientNet's numerics (tf_efficientnet_b*'s options).
KERAS_OPTIONS = {"padding": "same", "bn_eps": 1e-3}
_KERAS_TOP = {
    "stem_conv": "backbone/stem/conv",
    "stem_bn": "backbone/stem/bn",
    "top_conv": "backbone/head_conv",
    "top_bn": "backbone/head_bn",
    "predictions": "head/out",
}
_KERAS_PARTS = {
    "expand_conv": "expand_conv",
    "expand_bn": "expand_bn",
    "dwconv": "dw_conv",
    "bn": "dw_bn",
    "se_reduce": "se/reduce",
    "se_expand": "se/expand",
    "project_conv": "project_conv",
    "project_bn": "project_bn",
}
_KERAS_BLOCK = re.compile(r"block(\d+)([a-z])_(\w+)")
_KERAS_NORMALIZATION = re.compile(r"normalization(_\d+)?")
_KERAS_ANY = re.compile(
    r"(stem_conv|stem_bn|top_conv|top_bn|block\d+[a-z]_\w+|"
    r"layers/(depthwise_conv2d|conv2d|batch_normalization)(_\d+)?)/"
)
_KERAS_IGNORED = (
    "Keras' in-model input normalisation (its Normalization layer), not a parameter: "
    "tlflax normalises on the device, with convert_efficientnet.keras_preprocessing's "
    "mean / std from these values"
)


def _keras_kernel_1x1(w: np.ndarray) -> np.ndarray:
    """An SE conv's Keras kernel (1, 1, C, R) -> the Dense kernel (C, R)."""
    if w.ndim != 4 or w.shape[:2] != (1, 1):
        raise ValueError(f"expected a Keras 1x1 conv kernel (1, 1, in, out), got {w.shape}")
    return w[0, 0]


def keras_block_names(layout) -> dict[tuple[int, int], str]:
    """(stage, block), both from 1 -> Keras' block prefix ('block2b_')."""
    return {
        (s, j): f"block{s}{chr(96 + j)}_"
        for s, blocks in enumerate(layout, 1)
        for j in range(1, len(blocks) + 1)
    }


def keras_layer_order(arch: dict) -> dict[str, list[str]]:
    """Keras' layer names per class in model order (how a Keras 3 file that names no layer
    numbers them: conv2d, conv2d_1, ...), for a model of this layout."""
    convs, depthwise, norms = ["stem_conv"], [], ["stem_bn"]
    layout = efficientnet.block_layout(arch)
    for (s, j), prefix in keras_block_names(layout).items():
        block = layout[s - 1][j - 1]
        if block.expand_ratio != 1:
            convs.append(f"{prefix}expand_conv")
            norms.append(f"{prefix}expand_bn")
        depthwise.append(f"{prefix}dwconv")
        norms += [f"{prefix}bn", f"{prefix}project_bn"]
        if arch["se_ratio"] > 0:
            convs += [f"{prefix}se_reduce", f"{prefix}se_expand"]
        convs.append(f"{prefix}project_conv")
    return {
        "conv2d": [*convs, "top_conv"],
        "depthwise_conv2d": depthwise,
        "batch_normalization": [*norms, "top_bn"],
        "dense": ["predictions"],
        "normalization": ["normalization"],
    }


def _keras_kind(layer: str) -> str | None:
    if layer in ("stem_conv", "top_conv") or re.fullmatch(
        r"block\d+[a-z]_(expand_conv|se_reduce|se_expand|project_conv)", layer
    ):
        return "Conv2D"
    if re.fullmatch(r"block\d+[a-z]_dwconv", layer):
        return "DepthwiseConv2D"
    if layer in ("stem_bn", "top_bn") or re.fullmatch(r"block\d+[a-z]_\w*bn", layer):
        return "BatchNormalization"
    if _KERAS_NORMALIZATION.fullmatch(layer):
        return "Normalization"
    return "Dense" if layer == "predictions" else None


def _keras_state(state, arch) -> dict[str, np.ndarray]:
    """Keras' layer and weight names for every array, by Keras' numbering where the file
    names no layer (refused where the counts show another layout: the order would lie)."""
    order = keras_layer_order(arch)
    return keras.named_state(state, order, _keras_kind, hint="tf_efficientnet_b<i>")


def keras_module(layer: str, *, repeats) -> str | None:
    """tlflax module of a keras.applications EfficientNet layer, else None."""
    if layer in _KERAS_TOP:
        return _KERAS_TOP[layer]
    m = _KERAS_BLOCK.fullmatch(layer)
    if not m or m[3] not in _KERAS_PARTS:
        return None
    s, j = int(m[1]), ord(m[2]) - 96
    if not (1 <= s <= len(repeats) and j <= repeats[s - 1]):
        return None
    return f"backbone/stage{s}/block{j}/{_KERAS_PARTS[m[3]]}"


def keras_repeats(state) -> tuple[int, ...] | None:
    """Blocks per stage of a Keras file, from its layer names (None where it names none)."""
    last: dict[int, int] = {}
    for key in state:
        m = _KERAS_BLOCK.match(key)
        if m:
            last[int(m[1])] = max(last.get(int(m[1]), 0), ord(m[2]) - 96)
    if not last:
        return None
    return tuple(last.get(s, 0) for s in range(1, max(last) + 1))


def _variant_of(repeats, stem: int | None) -> str | None:
    """The tf_efficientnet_b<i> of these repeats and stem width, if one is."""
    for name, (variant, *_) in efficientnet.VARIANTS.items():
        if not name.startswith("tf_"):
            continue
        arch = {**efficientnet.DEFAULTS, **variant}
        layout = efficientnet.block_layout(arch)
        if tuple(map(len, layout)) == tuple(repeats) and stem in (None, layout[0][0].in_channels):
            return name
    return None


def check_keras_model(state, spec) -> None:
    """Keras' weights into a model that computes otherwise, or of another depth: refused in
    one line naming the model (or the overrides) that fits the file."""
    arch = spec.arch
    found = keras_repeats(state)
    stem = state.get("stem_conv/kernel")
    stem = np.shape(stem)[-1] if np.ndim(stem) == 4 else None
    if found is not None and found != tuple(arch["repeats"]):
        fits = _variant_of(found, stem)
        hint = f"use model {fits}" if fits else "build the model the file was saved from"
        raise CheckpointMismatchError(
            f"the Keras EfficientNet file has {found} blocks per stage"
            f"{f' (keras.applications EfficientNetB{fits[-1]})' if fits else ''}; model "
            f"{spec.name!r} has {tuple(arch['repeats'])}: {hint}"
        )
    need = {k: v for k, v in KERAS_OPTIONS.items() if arch[k] != v}
    if not need:
        return
    has = ", ".join(f"{k}={arch[k]!r}" for k in need)
    tf_name = f"tf_{spec.name}" if spec.name.startswith("efficientnet_b") else None
    given = ", ".join(f"{k}={v!r}" for k, v in need.items())
    use = f"use model {tf_name!r} (the same network with Keras' numerics), or " if tf_name else ""
    raise ConfigError(
        f"weights are keras.applications' EfficientNet, computed with TF 'same' padding and "
        f"BatchNorm epsilon 1e-3; model {spec.name!r} has {has}: {use}give the overrides "
        f"{given} (--config.model.overrides, or c.model.overrides.update({given}))"
    )


def _convert_keras(state, spec) -> Converted:
    state = _keras_state(state, spec.arch)
    check_keras_model(state, spec)
    repeats = tuple(spec.arch["repeats"])
    target_of = lambda key: _keras_target(key, repeats=repeats)
    return convert_each(state, target_of, scheme="keras", skip=_keras_ignored)


def _keras_ignored(key: str) -> str | None:
    layer = key.removesuffix(":0").rpartition("/")[0]
    return _KERAS_IGNORED if _KERAS_NORMALIZATION.fullmatch(layer.rsplit("/", 1)[-1]) else None


def _keras_target(key: str, *, repeats):
    layer, _, leaf = key.removesuffix(":0").rpartition("/")
    module = keras_module(layer, repeats=repeats)
    if module and "/se/" in module and leaf == "kernel":
        return target(module, ("params", "kernel", _keras_kernel_1x1))
    return keras_target(module, leaf)


# Keras' weights='imagenet' Normalization holds ImageNet's std as its variance (tensorflow
# issue 49930), and Keras then divides by sqrt(std) once more (a Rescaling layer).
_IMAGENET_STD = (0.229, 0.224, 0.225)
_EPSILON = 1e-7  # keras.backend.epsilon(): Normalization divides by max(sqrt(var), this)


def keras_preprocessing(checkpoint, spec) -> pp.Preprocessing:
    """The normalisation a Keras EfficientNet file's model computes inside (keras.applications'
    preprocess_input is the identity), as tlflax's mean / std in 0..255 pixel units, at the
    model's resolution (spec.preprocessing: Keras' default_size for b0..b7).

    The model's first layers map pixels x to Rescaling(1/255) -> Normalization(mean, var):
    (y - mean) / sqrt(var) -> with weights='imagenet' a Rescaling by 1 / sqrt(std): the
    composition is affine per channel, a x + b, i.e. mean -b/a and std 1/a.
      - A file with the model's config (.keras; .h5 from model.save) says which layers there
        are, and their options: that chain, exactly as the saved model computes it.
      - A file of weights alone (.weights.h5; .h5 from save_weights; keras.applications'
        own files, keras:efficientnetb<i>) gives only the Normalization's mean / variance:
        Rescaling(1/255) (always there), then the compensating Rescaling where the variance
        is ImageNet's std (0.229, 0.224, 0.225, to 1e-6): the values weights='imagenet'
        puts there, in which case Keras adds it. That gives ImageNet's mean / std for
        keras.applications' files, what the weights were trained with. (A model built with
        weights=None and given those values by load_weights computes without the
        compensation: save it whole, .keras, for its exact chain.)
    """
    path = checkpoint.files[0]
    layers = keras.read_layers(path)
    config = _keras_config(path)
    steps = _config_chain(config, layers, path) if config else _weights_chain(layers, path)
    a, b = np.ones(3), np.zeros(3)
    for _, scale, offset in steps:
        a, b = a * scale, b * scale + offset
    if not np.all(a > 0):
        raise ConfigError(f"{path}: the model's input normalisation scales by {a}, not > 0")
    mean, std = tuple(float(v) + 0.0 for v in -b / a), tuple(float(v) for v in 1 / a)
    chain = " -> ".join(kind for kind, *_ in steps)
    return dataclasses.replace(
        spec.preprocessing,
        mean=mean,
        std=std,
        source=f"{checkpoint.source} (Keras efficientnet, in the model: {chain})",
    )


def _keras_config(path) -> dict | None:
    """The model's config saved with the weights (.keras: config.json; model.save's .h5:
    model_config), or None."""
    import h5py

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = set(zf.namelist())
                return json.loads(zf.read("config.json")) if "config.json" in names else None
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
        if raw is None:
            return None
        return json.loads(raw.decode("utf8") if isinstance(raw, bytes) else str(raw))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise CorruptCheckpointError(f"{path}: its model config cannot be read ({e})") from e


def _flat_layers(model_config: dict):
    """A model config's layers in model order, nested models' layers in their place."""
    for layer in (model_config.get("config") or {}).get("layers") or ():
        if isinstance(layer, dict) and (layer.get("config") or {}).get("layers"):
            yield from _flat_layers(layer)
        elif isinstance(layer, dict):
            yield layer


def _config_value(value, path):
    """A Rescaling's scale / offset as saved: a number, a list, or a serialised array."""
    if isinstance(value, dict):
        value = (value.get("config") or {}).get("value", value)
    try:
        return np.broadcast_to(np.asarray(value, np.float64), (3,))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: a Rescaling scale / offset not understood: {value!r}") from e


def _normalization_step(options: dict, arrays: dict | None, path) -> tuple:
    """('Normalization', 1 / sqrt(var), -mean / sqrt(var)) from the config's mean / variance
    where given, else the layer's arrays."""
    if options.get("invert"):
        raise ConfigError(f"{path}: a Normalization with invert=True; not an input normalisation")
    if options.get("mean") is not None and options.get("variance") is not None:
        mean, var = options["mean"], options["variance"]
    elif arrays and "mean" in arrays and "variance" in arrays:
        mean, var = arrays["mean"], arrays["variance"]
    else:
        raise CheckpointMismatchError(
            f"{path}: the Normalization layer's mean / variance are neither in its config nor "
            "in the file"
        )
    try:
        mean = np.broadcast_to(np.asarray(mean, np.float64).reshape(-1), (3,))
        var = np.broadcast_to(np.asarray(var, np.float64).reshape(-1), (3,))
    except ValueError as e:
        raise CheckpointMismatchError(
            f"{path}: a Normalization of {np.size(mean)} values, not 3 (RGB channels)"
        ) from e
    inv = 1 / np.maximum(np.sqrt(var), _EPSILON)
    return "Normalization", inv, -mean * inv


def _arrays_by_name(layers) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for layer in layers:
        names = layer.weight_names() or ()
        out[layer.path[-1]] = dict(zip(names, layer.arrays, strict=False))
    return out


def _config_chain(config: dict, layers, path) -> list[tuple]:
    """The Rescaling / Normalization layers before the model's first other layer."""
    arrays = _arrays_by_name(layers)
    steps = []
    for layer in _flat_layers(config):
        kind, options = layer.get("class_name"), layer.get("config") or {}
        name = options.get("name") or layer.get("name")
        if kind == "InputLayer":
            continue
        if kind == "Rescaling":
            scale = _config_value(options.get("scale", 1.0), path)
            steps.append(("Rescaling", scale, _config_value(options.get("offset", 0.0), path)))
        elif kind == "Normalization":
            steps.append(_normalization_step(options, arrays.get(name), path))
        else:
            break
    if not any(kind == "Normalization" for kind, *_ in steps):
        raise ConfigError(
            f"{path}: the saved model does not start with keras.applications EfficientNet's "
            f"Rescaling + Normalization layers ({[s[0] for s in steps]}); say which "
            "normalisation its weights need: weights.preprocessing='imagenet' | ..."
        )
    return steps


def _weights_chain(layers, path) -> list[tuple]:
    """Rescaling(1/255), the file's Normalization, and Keras' compensation where the
    variance is ImageNet's std (keras_preprocessing's docstring)."""
    found = [
        layer
        for layer in layers
        if layer.kind == "Normalization"
        or _KERAS_NORMALIZATION.fullmatch(layer.path[-1].rsplit("/", 1)[-1])
    ]
    if len(found) != 1:
        raise ConfigError(
            f"{path}: {len(found)} Normalization layers, where keras.applications' EfficientNet "
            "has one (its input normalisation); say which normalisation the weights need: "
            "weights.preprocessing='imagenet' | 'minus_one_to_one' | ..."
        )
    arrays = dict(zip(keras.weight_names("Normalization", len(found[0].arrays)),
                      found[0].arrays, strict=True))  # fmt: skip
    steps = [("Rescaling", np.full(3, 1 / 255), np.zeros(3))]
    steps.append(_normalization_step({}, arrays, path))
    var = np.asarray(arrays["variance"], np.float64).reshape(-1)
    if var.shape == (3,) and np.allclose(var, _IMAGENET_STD, rtol=0, atol=1e-6):
        compensation = np.array([1 / math.sqrt(s) for s in _IMAGENET_STD])
        steps.append(("Rescaling (weights='imagenet')", compensation, np.zeros(3)))
    return steps


def convert(state: dict[str, np.ndarray], *, spec, shapes) -> Converted:
    """An EfficientNet checkpoint in tlflax names. `shapes` is unused: nothing is adapted."""
    del shapes
    check_family(spec, "efficientnet")
    scheme = detect_scheme(state)
    if scheme == "keras":
        return _convert_keras(state, spec)
    keys = unwrapped(state)
    if scheme == "timm":
        module_of = lambda module: timm_module(module, keys=keys, ir=_TIMM_IR, ds=_TIMM_DS)
    elif scheme == "torchvision":
        head = max(int(m[1]) for k in keys if (m := re.match(r"features\.(\d+)\.", k)))
        module_of = lambda module: _torchvision_module(module, keys=keys, head=head)
    else:
        blocks = block_names(spec.arch["repeats"], first=0)
        module_of = lambda module: _hf_module(module, blocks=blocks)
    target_of = lambda key: torch_target(key, module_of, leaves=_LEAVES)
    return convert_each(state, target_of, scheme=scheme, keys=keys, skip=torch_counter)
