"""Xception checkpoints -> tlflax names (tlflax.models.xception).

Two naming schemes, recognised from the keys:
  'timm'   timm's legacy_xception state dicts (Cadene's port of the Keras weights,
           legacy_xception.tf_in1k): conv1, bn1, conv2, bn2 (block1); block{i} for
           i = 1..12 (tlflax's block i + 1; block12 is the exit block, tlflax's block
           5 + middle_blocks), each with skip / skipbn (the shortcut) and rep.{r}: its
           Sequential of [ReLU,] SeparableConv2d (.conv1 depthwise, .pointwise), BatchNorm,
           ... (block1 has no leading ReLU); conv3 / bn3, conv4 / bn4 (the last block's
           separable convs); fc (or Cadene's last_linear), the 1000-class layer.
  'keras'  a Keras weights file read as {'<layer name>/<weight name>': array}, weight names
           kernel, bias, depthwise_kernel, pointwise_kernel, gamma, beta, moving_mean,
           moving_variance (a ':0' suffix is dropped): block1_conv{j}[_bn],
           block{b}_sepconv{k}[_bn] (tlflax's block{b}/sepconv{k}[_bn]); the shortcuts are
           the unnamed conv2d[_n] / batch_normalization[_n] layers, in the order of their
           number (no number first): blocks 2, 3, 4 and the exit block; predictions, the
           1000-class layer. Keras's Xception has 8 middle blocks: block numbers are tlflax's.
           A Keras 3 file that names no layer ('layers/separable_conv2d_5/vars/0') is read
           by Keras' numbering of each class in model order (keras_layer_order: the
           shortcut BatchNorm after its block's separable convs'), refused where the file's
           counts are not the model's.
"""

from __future__ import annotations

import re

import numpy as np

from tlflax.errors import ConfigError
from tlflax.weights import keras
from tlflax.weights.common import (
    KERAS_LEAVES,
    TORCH_LEAVES,
    Converted,
    check_family,
    convert_each,
    target,
    torch_counter,
)

SCHEMES = ("timm", "keras")
_TIMM_STEM = {"conv1": "block1/conv1", "bn1": "block1/conv1_bn",
              "conv2": "block1/conv2", "bn2": "block1/conv2_bn"}  # fmt: skip
_KERAS_LEAVES = {**KERAS_LEAVES, "pointwise_kernel": ("params", "kernel", None)}


# keras.applications' layer names, or a Keras 3 file's paths where it names no layer.
_KERAS_ANY = re.compile(
    r"(block\d+_(conv|sepconv)\d+(_bn)?|layers/(separable_conv2d|conv2d|batch_normalization)"
    r"(_\d+)?)/"
)


def detect_scheme(state) -> str:
    if any(_KERAS_ANY.match(k) for k in state):
        return "keras"
    if "conv1.weight" in state or any(k.startswith("block1.rep.") for k in state):
        return "timm"
    raise ConfigError(
        f"not an Xception checkpoint: no 'conv1.weight' / 'block1.rep.*' (timm) nor "
        f"'block1_conv1/...' (Keras) keys (first keys: {sorted(state)[:5]}); tlflax reads "
        "timm's legacy_xception state dicts and Keras Xception weights"
    )


def timm_block(i: int, *, middle_blocks: int) -> int | None:
    """tlflax's block number of timm's block{i}, None where this model has no such block."""
    if 1 <= i <= 3:
        return i + 1
    if i == 12:
        return 5 + middle_blocks
    if 4 <= i < 4 + min(middle_blocks, 8):
        return i + 1
    return None


def _timm_module(module: str, *, middle_blocks: int) -> tuple[str, str] | None:
    """(tlflax module under backbone/ or head/out, kind) of a timm module path, else None."""
    if module in _TIMM_STEM:
        return _TIMM_STEM[module], "bn" if module.startswith("bn") else "conv"
    last = f"block{6 + middle_blocks}"
    m = re.fullmatch(r"(conv|bn)([34])(\.conv1|\.pointwise)?", module)
    if m and (m[1] == "conv") == bool(m[3]):
        sep = f"{last}/sepconv{int(m[2]) - 2}"
        part = {".conv1": "/depthwise", ".pointwise": "/pointwise", None: "_bn"}[m[3]]
        return sep + part, "bn" if m[1] == "bn" else "conv"
    m = re.fullmatch(r"block(\d+)\.(skip|skipbn|rep\.(\d+)(\.conv1|\.pointwise)?)", module)
    b = m and timm_block(int(m[1]), middle_blocks=middle_blocks)
    if not b:
        return None
    if m[2] in ("skip", "skipbn"):
        return f"block{b}/shortcut{'_bn' if m[2] == 'skipbn' else ''}", (
            "bn" if m[2] == "skipbn" else "conv"
        )
    # rep: [ReLU,] SeparableConv2d, BatchNorm, per separable conv; block1 has no first ReLU.
    k, rest = divmod(int(m[3]) - (0 if m[1] == "1" else 1), 3)
    if rest == 0 and m[4]:
        return f"block{b}/sepconv{k + 1}/{'depthwise' if m[4] == '.conv1' else 'pointwise'}", "conv"
    if rest == 1 and not m[4]:
        return f"block{b}/sepconv{k + 1}_bn", "bn"
    return None


def _timm_target(key: str, *, middle_blocks: int):
    module, leaf = key.rsplit(".", 1) if "." in key else (key, "")
    if module in ("fc", "last_linear"):
        found = ("head/out", "dense")
    else:
        found = _timm_module(module, middle_blocks=middle_blocks)
        found = found and (f"backbone/{found[0]}", found[1])
    return found and target(found[0], TORCH_LEAVES.get((found[1], leaf)))


def keras_shortcuts(state, *, middle_blocks: int) -> dict[str, str]:
    """Keras's unnamed shortcut layers (conv2d, conv2d_1, ... and batch_normalization, ...)
    -> tlflax modules: in the order of their number, blocks 2, 3, 4 and the exit block."""
    blocks = (2, 3, 4, 5 + middle_blocks)
    out = {}
    for prefix, module in (("conv2d", "shortcut"), ("batch_normalization", "shortcut_bn")):
        layers = {k.split("/")[0] for k in state}
        numbered = [(int(m[1] or 0), layer) for layer in layers
                    if (m := re.fullmatch(prefix + r"(?:_(\d+))?", layer))]  # fmt: skip
        for b, (_, layer) in zip(blocks, sorted(numbered), strict=False):
            out[layer] = f"block{b}/{module}"
    return out


def keras_layer_order(*, middle_blocks: int) -> dict[str, list[str]]:
    """Keras' layer names per class in model order (how a Keras 3 file that names no layer
    numbers them): the shortcuts get Keras 3's own names (conv2d, conv2d_1, ...)."""
    last = 6 + middle_blocks
    n_seps = {**dict.fromkeys((2, 3, 4, last - 1, last), 2),
              **dict.fromkeys(range(5, last - 1), 3)}  # fmt: skip
    shortcut_after = (2, 3, 4, last - 1)
    seps, norms = [], ["block1_conv1_bn", "block1_conv2_bn"]
    for b in range(2, last + 1):
        names = [f"block{b}_sepconv{k}" for k in range(1, n_seps[b] + 1)]
        seps += names
        norms += [f"{n}_bn" for n in names]
        if b in shortcut_after:
            k = shortcut_after.index(b)
            norms.append(f"batch_normalization_{k}" if k else "batch_normalization")
    shortcuts = ["conv2d", *(f"conv2d_{k}" for k in range(1, 4))]
    return {
        "conv2d": ["block1_conv1", "block1_conv2", *shortcuts],
        "separable_conv2d": seps,
        "batch_normalization": norms,
        "dense": ["predictions"],
    }


def _keras_kind(layer: str) -> str | None:
    if layer == "predictions":
        return "Dense"
    if layer.endswith("_bn") or re.fullmatch(r"batch_normalization(_\d+)?", layer):
        return "BatchNormalization"
    if "_sepconv" in layer:
        return "SeparableConv2D"
    return "Conv2D" if re.fullmatch(r"block1_conv\d|conv2d(_\d+)?", layer) else None


def _keras_state(state, *, middle_blocks: int) -> dict[str, np.ndarray]:
    """Keras' layer and weight names for every array, by Keras' numbering where the file
    names no layer (refused where the counts show another layout: the order would lie)."""
    order = keras_layer_order(middle_blocks=middle_blocks)
    model = f"this model (middle_blocks={middle_blocks})"
    return keras.named_state(state, order, _keras_kind, model=model)


def _keras_target(key: str, *, shortcuts: dict[str, str]):
    layer, _, leaf = key.removesuffix(":0").rpartition("/")
    if layer == "predictions":
        module = "head/out"
    elif layer in shortcuts:
        module = f"backbone/{shortcuts[layer]}"
    elif re.fullmatch(r"block\d+_(conv|sepconv)\d+(_bn)?", layer):
        module = "backbone/" + layer.replace("_", "/", 1)
    else:
        return None
    if leaf in ("depthwise_kernel", "pointwise_kernel"):
        module += "/depthwise" if leaf == "depthwise_kernel" else "/pointwise"
    return target(module, _KERAS_LEAVES.get(leaf))


def convert(state: dict[str, np.ndarray], *, spec, shapes) -> Converted:
    """An Xception checkpoint in tlflax names. `shapes` is unused: nothing is adapted."""
    del shapes
    check_family(spec, "xception")
    scheme = detect_scheme(state)
    middle_blocks = spec.arch["middle_blocks"]
    if scheme == "timm":
        target_of = lambda key: _timm_target(key, middle_blocks=middle_blocks)
        return convert_each(state, target_of, scheme="timm", skip=torch_counter)
    state = _keras_state(state, middle_blocks=middle_blocks)
    shortcuts = keras_shortcuts(state, middle_blocks=middle_blocks)
    target_of = lambda key: _keras_target(key, shortcuts=shortcuts)
    return convert_each(state, target_of, scheme="keras")
