"""VGG checkpoints -> tlflax names (tlflax.models.vgg).

Three naming schemes, recognised from the keys:
  'torchvision'  torchvision's vgg*[_bn] state dicts (vgg16-397923af.pth ...):
                 features.{k}.{weight,bias[,running_mean,running_var]} in the order conv,
                 [bn,] relu per conv and a max pool per stage; classifier.{0,3}.* (fc1, fc2),
                 classifier.6.* (the 1000-class layer).
  'timm'         timm's vgg* (their weights are torchvision's): the same features.*, the fc
                 layers as convs, pre_logits.fc1 (4096, 512, 7, 7) and pre_logits.fc2
                 (4096, 4096, 1, 1), and head.fc.*.
  'keras'        keras.applications' VGG16 / VGG19 (tlflax.weights.keras: .h5, .weights.h5,
                 .keras): block{i}_conv{j}/{kernel,bias}, fc1, fc2, predictions (the
                 1000-class layer); the *_notop files stop at the convs. A Keras 3 file that
                 names no layer is read by Keras' numbering (conv2d, conv2d_1, ...; dense ...).
fc1 reads the flattened 7 x 7 map: PyTorch flattens it channels first, tlflax (NHWC) channels
last, so its kernel's rows are reordered; Keras flattens NHWC as tlflax does. Keras' VGG
takes BGR images ('caffe' preprocessing): the first conv's kernel has its input channels
reversed, so that the model takes RGB (weights/__init__.py gives the RGB mean). With
pooling 'avg' or 'flatten' the model has no fc layers: the checkpoint's are left out, saying
so; with 'classifier', a checkpoint without them (Keras' notop) is refused, saying which
pooling reads it.
"""

from __future__ import annotations

import re

import numpy as np

from tlflax.errors import ConfigError
from tlflax.weights import keras
from tlflax.weights.common import (
    TORCH_LEAVES,
    UNEXPECTED_PREFIX,
    Converted,
    check_family,
    convert_each,
    target,
    torch_counter,
)
from tlflax.weights.merge import CheckpointMismatchError

SCHEMES = ("torchvision", "timm", "keras")


def detect_scheme(state) -> str:
    if any(k.startswith(("pre_logits.", "head.fc.")) for k in state):
        return "timm"
    if any(k.startswith("features.") for k in state):
        return "torchvision"
    if any(_KERAS_LAYER.match(k) for k in state):
        return "keras"
    raise ConfigError(
        f"not a VGG checkpoint: no 'features.*' or 'block1_conv1/*' keys (first keys: "
        f"{sorted(state)[:5]}); tlflax reads torchvision's, timm's and keras.applications' VGG"
    )


# keras.applications' layer names; 'layers/conv2d/': a Keras 3 file that names no layer.
_KERAS_LAYER = re.compile(r"(block\d+_conv\d+|fc[12]|predictions|layers/conv2d)/")


def feature_modules(depths, *, batch_norm: bool) -> dict[int, tuple[str, str]]:
    """torchvision's `features` index -> (tlflax module, kind) for each conv and BatchNorm."""
    out, k = {}, 0
    for i, depth in enumerate(depths, 1):
        for j in range(1, depth + 1):
            out[k], k = (f"backbone/stage{i}/conv{j}", "conv"), k + 1
            if batch_norm:
                out[k], k = (f"backbone/stage{i}/bn{j}", "bn"), k + 1
            k += 1  # ReLU
        k += 1  # max pool
    return out


def _fc1_kernel(w: np.ndarray, *, channels: int) -> np.ndarray:
    """(4096, C*7*7) channels-first, or timm's (4096, C, 7, 7) -> (7*7*C, 4096) channels-last."""
    w = w.reshape(w.shape[0], channels, -1)
    side = int(round(np.sqrt(w.shape[-1])))
    w = w.reshape(w.shape[0], channels, side, side).transpose(2, 3, 1, 0)
    return w.reshape(-1, w.shape[-1])


def _fc_rule(module: str, leaf: str, *, channels: int):
    if leaf == "bias":
        return ("params", "bias", None)
    if module.endswith("fc1"):
        return ("params", "kernel", lambda w: _fc1_kernel(w, channels=channels))
    return ("params", "kernel", lambda w: w.reshape(w.shape[0], -1).T)  # fc2 1x1 conv / dense


def _module_of(key: str, *, features: dict, scheme: str):
    """(tlflax module, kind) of a checkpoint key's module, else None."""
    module = key.rsplit(".", 1)[0]
    m = re.fullmatch(r"features\.(\d+)", module)
    if m:
        return features.get(int(m[1]))
    table = (
        {"classifier.0": "fc1", "classifier.3": "fc2", "classifier.6": "head"}
        if scheme == "torchvision"
        else {"pre_logits.fc1": "fc1", "pre_logits.fc2": "fc2", "head.fc": "head"}
    )
    name = table.get(module)
    if name == "head":
        return ("head/out", "dense")
    return (f"backbone/{name}", "fc") if name else None


def _left_out(found, arch) -> str | None:
    """Why a checkpoint's fc layer is left out: the model has none."""
    if found and found[1] == "fc" and arch["pooling"] != "classifier":
        return f"pooling={arch['pooling']!r}: the model has no fc layers"
    return None


def _torch_target(key: str, found, *, channels: int):
    leaf = key.rsplit(".", 1)[-1]
    if found and found[1] == "fc":
        rule = _fc_rule(found[0], leaf, channels=channels)
    elif found and found[1] == "conv" and leaf == "bias":  # VGG's convs have biases
        rule = ("params", "bias", None)
    else:
        rule = found and TORCH_LEAVES.get((found[1], leaf))
    return found and target(found[0], rule)


def _keras_state(state, depths) -> dict[str, np.ndarray]:
    """Keras' names for every array (by Keras' numbering where the file names no layer)."""
    convs = [f"block{i}_conv{j}" for i, d in enumerate(depths, 1) for j in range(1, d + 1)]
    state = keras.by_order(state, {"conv2d": convs, "dense": ["fc1", "fc2", "predictions"]})
    return keras.name_vars(state, lambda layer: _KERAS_KINDS.get(_keras_module(layer)[1]))


_KERAS_KINDS = {"conv": "Conv2D", "fc": "Dense", "dense": "Dense"}


def _keras_module(layer: str) -> tuple[str | None, str | None]:
    """(tlflax module, kind) of a Keras VGG layer."""
    m = re.fullmatch(r"block(\d+)_conv(\d+)", layer)
    if m:
        return f"backbone/stage{m[1]}/conv{m[2]}", "conv"
    if layer in ("fc1", "fc2"):
        return f"backbone/{layer}", "fc"
    return ("head/out", "dense") if layer == "predictions" else (None, None)


def _convert_keras(state, arch) -> Converted:
    state = _keras_state(state, arch["depths"])
    has_fc = arch["pooling"] == "classifier"
    if has_fc and not any(k.startswith(("fc1/", "fc2/")) for k in state):
        raise CheckpointMismatchError(
            "the Keras VGG checkpoint has no fc layers (fc1, fc2: a *_notop file, saved with "
            "include_top=False), and pooling='classifier' needs them; use pooling='flatten' "
            "(the last map flattened, as Keras' transfer recipes do) or pooling='avg' "
            "(config.model.overrides)"
        )
    variables: dict[str, np.ndarray] = {}
    ignored: dict[str, str] = {}
    for key, value in state.items():
        layer, _, leaf = key.rpartition("/")
        module, kind = _keras_module(layer)
        if reason := _left_out((module, kind), arch):
            ignored[key] = reason
            continue
        if module is None or leaf not in ("kernel", "bias"):
            variables[UNEXPECTED_PREFIX + key] = np.asarray(value)
            continue
        value = np.asarray(value)
        if module == "backbone/stage1/conv1" and leaf == "kernel":
            value = np.ascontiguousarray(value[:, :, ::-1, :])  # BGR input -> RGB input
        variables[f"params/{module}/{leaf}"] = value
    return Converted(variables, "keras", ignored)


def convert(state: dict[str, np.ndarray], *, spec, shapes) -> Converted:
    """A VGG checkpoint in tlflax names. `shapes` is unused: nothing is adapted."""
    del shapes
    check_family(spec, "vgg")
    scheme = detect_scheme(state)
    arch = spec.arch
    if scheme == "keras":
        return _convert_keras(state, arch)
    features = feature_modules(arch["depths"], batch_norm=arch["batch_norm"])
    module_of = lambda key: _module_of(key, features=features, scheme=scheme)
    target_of = lambda key: _torch_target(key, module_of(key), channels=arch["widths"][-1])
    skip = lambda key: torch_counter(key) or _left_out(module_of(key), arch)
    return convert_each(state, target_of, scheme=scheme, skip=skip)
