"""VGG checkpoints -> tlflax names (tlflax.models.vgg).

Two naming schemes, recognised from the keys:
  'torchvision'  torchvision's vgg*[_bn] state dicts (vgg16-397923af.pth ...):
                 features.{k}.{weight,bias[,running_mean,running_var]} in the order conv,
                 [bn,] relu per conv and a max pool per stage; classifier.{0,3}.* (fc1, fc2),
                 classifier.6.* (the 1000-class layer).
  'timm'         timm's vgg* (their weights are torchvision's): the same features.*, the fc
                 layers as convs, pre_logits.fc1 (4096, 512, 7, 7) and pre_logits.fc2
                 (4096, 4096, 1, 1), and head.fc.*.
fc1 reads the flattened 7 x 7 map: PyTorch flattens it channels first, tlflax (NHWC) channels
last, so its kernel's rows are reordered. With pooling 'avg' or 'flatten' the model has no fc
layers: the checkpoint's are left out, saying so.
"""

from __future__ import annotations

import re

import numpy as np

from tlflax.errors import ConfigError
from tlflax.weights.common import TORCH_LEAVES, UNEXPECTED_PREFIX, Converted

SCHEMES = ("torchvision", "timm")
_IGNORED_BN = "BatchNorm update counter; flax's BatchNorm keeps none (momentum is fixed)"


def detect_scheme(state) -> str:
    if any(k.startswith(("pre_logits.", "head.fc.")) for k in state):
        return "timm"
    if any(k.startswith("features.") for k in state):
        return "torchvision"
    raise ConfigError(
        f"not a VGG checkpoint: no 'features.*' keys (first keys: {sorted(state)[:5]}); "
        "tlflax reads torchvision and timm VGG state dicts"
    )


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


def convert(state: dict[str, np.ndarray], *, spec, shapes) -> Converted:
    """A VGG checkpoint in tlflax names. `shapes` is unused: nothing is adapted."""
    del shapes
    if spec.family != "vgg":
        raise ConfigError(f"convert_vgg got a {spec.family!r} model ({spec.name}); use its own")
    scheme = detect_scheme(state)
    arch = spec.arch
    features = feature_modules(arch["depths"], batch_norm=arch["batch_norm"])
    has_fc = arch["pooling"] == "classifier"
    variables: dict[str, np.ndarray] = {}
    ignored: dict[str, str] = {}
    for key, value in state.items():
        value = np.asarray(value)
        if key.endswith(".num_batches_tracked"):
            ignored[key] = _IGNORED_BN
            continue
        found = _module_of(key, features=features, scheme=scheme)
        leaf = key.rsplit(".", 1)[-1]
        if found and found[1] == "fc" and not has_fc:
            ignored[key] = f"pooling={arch['pooling']!r}: the model has no fc layers"
            continue
        if found and found[1] == "fc":
            rule = _fc_rule(found[0], leaf, channels=arch["widths"][-1])
        elif found and found[1] == "conv" and leaf == "bias":  # VGG's convs have biases
            rule = ("params", "bias", None)
        else:
            rule = found and TORCH_LEAVES.get((found[1], leaf))
        name = rule and f"{rule[0]}/{found[0]}/{rule[1]}"
        if not rule or name in variables:  # unknown, or a second key for one name
            variables[UNEXPECTED_PREFIX + key] = value
            continue
        variables[name] = rule[2](value) if rule[2] else value
    return Converted(variables, scheme, ignored)
