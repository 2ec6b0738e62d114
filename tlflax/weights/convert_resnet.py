"""ResNet checkpoints -> tlflax names (tlflax.models.resnet).

Three naming schemes, recognised from the keys:
  'hf'       transformers ResNet (model.safetensors / pytorch_model.bin):
             resnet.embedder.embedder.{convolution,normalization}.*,
             resnet.encoder.stages.{i}.layers.{j}.layer.{k}.*, ...shortcut.*, classifier.1.*
             ('resnet.' is absent in ResNetModel / ResNetBackbone files; both are read).
  'timm'     timm and torchvision ResNet: conv1, bn1, layer{i}.{j}.{conv,bn}{k},
             layer{i}.{j}.downsample.{0,1}, fc.
  'hf_flax'  transformers 4.x FlaxResNetForImageClassification's flax_model.msgpack:
             {params,batch_stats}/resnet/embedder/embedder/{convolution,normalization}/...,
             .../encoder/stages/{i}/layers/{j}/layer/{k | layer_k}/..., .../shortcut/...,
             params/classifier/1/{kernel,bias}. Bottleneck convs there are named '0'..'2',
             basic ones 'layer_0', 'layer_1' (flax's names for a list built in setup).
All three put the stride on the 3x3 conv (v1.5), as tlflax does. The mapping is
structural (stage i, block j -> stage{i}/block{j}), so a checkpoint of another depth or
block type yields names the model lacks, and the merge lists them.
"""

from __future__ import annotations

import re

import numpy as np

from tlflax.errors import ConfigError
from tlflax.weights.common import TORCH_LEAVES, UNEXPECTED_PREFIX, Converted

SCHEMES = ("hf", "timm", "hf_flax")
_KIND = {"convolution": "conv", "normalization": "bn", "conv": "conv", "bn": "bn"}
_IGNORED = "BatchNorm update counter; flax's BatchNorm keeps none (momentum is fixed)"


def _hf_modules(sep: str) -> list[tuple[re.Pattern, object]]:
    """Checkpoint module path -> tlflax module path, for transformers' torch and flax names."""
    s = re.escape(sep)
    stage = rf"encoder{s}stages{s}(\d+){s}layers{s}(\d+){s}"
    kinds = "(convolution|normalization)"
    return [
        (rf"embedder{s}embedder{s}{kinds}", lambda m: f"backbone/stem/{_KIND[m[1]]}"),
        (
            rf"{stage}layer{s}(?:layer_)?(\d+){s}{kinds}",
            lambda m: f"{_block(m[1], m[2])}/{_KIND[m[4]]}{int(m[3]) + 1}",
        ),
        (rf"{stage}shortcut{s}{kinds}", lambda m: f"{_block(m[1], m[2])}/downsample/{_KIND[m[3]]}"),
        (rf"classifier{s}1", lambda m: "head/out"),
    ]


def _block(stage: str, block: str, *, first_stage: int = 0) -> str:
    return f"backbone/stage{int(stage) + 1 - first_stage}/block{int(block) + 1}"


_TIMM_MODULES = [
    (r"conv1", lambda m: "backbone/stem/conv"),
    (r"bn1", lambda m: "backbone/stem/bn"),
    (
        r"layer(\d+)\.(\d+)\.(conv|bn)(\d+)",
        lambda m: f"{_block(m[1], m[2], first_stage=1)}/{m[3]}{m[4]}",
    ),
    (
        r"layer(\d+)\.(\d+)\.downsample\.([01])",
        lambda m: f"{_block(m[1], m[2], first_stage=1)}/downsample/{('conv', 'bn')[int(m[3])]}",
    ),
    (r"fc", lambda m: "head/out"),
]

_FLAX_LEAVES = {
    ("conv", "kernel"): ("params", "kernel", None),
    ("bn", "scale"): ("params", "scale", None),
    ("bn", "bias"): ("params", "bias", None),
    ("bn", "mean"): ("batch_stats", "mean", None),
    ("bn", "var"): ("batch_stats", "var", None),
    ("dense", "kernel"): ("params", "kernel", None),
    ("dense", "bias"): ("params", "bias", None),
}


def _strip_hf(key: str) -> str:
    return key.removeprefix("resnet.")


def _strip_hf_flax(key: str) -> str:
    # The msgpack's top level is the flax collection; the leaf name says the same.
    key = re.sub(r"^(params|batch_stats)/", "", key)
    return key.removeprefix("resnet/")


_SCHEME_RULES = {
    "hf": (".", _hf_modules("."), TORCH_LEAVES, _strip_hf),
    "timm": (".", _TIMM_MODULES, TORCH_LEAVES, lambda key: key),
    "hf_flax": ("/", _hf_modules("/"), _FLAX_LEAVES, _strip_hf_flax),
}


def detect_scheme(keys) -> str:
    keys = list(keys)
    if any(k.endswith("embedder/embedder/convolution/kernel") for k in keys):
        return "hf_flax"
    if any(k.endswith("embedder.embedder.convolution.weight") for k in keys):
        return "hf"
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "timm"
    raise ConfigError(
        f"not a ResNet checkpoint tlflax knows (keys such as {sorted(keys)[:5]}); supported: "
        "transformers ('resnet.embedder.embedder.convolution.weight', ...), timm/torchvision "
        "('conv1.weight', 'layer1.0.conv1.weight', ...) and transformers-4 Flax msgpack "
        "('params/resnet/embedder/embedder/convolution/kernel', ...). Deep-stem variants "
        "(resnet50d, 'conv1.0.weight') are not implemented."
    )


def _target_kind(module: str) -> str:
    last = module.rsplit("/", 1)[-1]
    return "dense" if last == "out" else "bn" if last.startswith("bn") else "conv"


def map_key(key: str, *, scheme: str):
    """(tlflax variable name, layout change) for a checkpoint key; 'ignore'; or None."""
    sep, modules, leaves, strip = _SCHEME_RULES[scheme]
    path = strip(key)
    if sep not in path:
        return None
    module, leaf = path.rsplit(sep, 1)
    if leaf == "num_batches_tracked":
        return "ignore"
    for pattern, target_of in modules:
        m = re.fullmatch(pattern, module)
        if m:
            target = target_of(m)
            rule = leaves.get((_target_kind(target), leaf))
            if rule is None:
                return None
            collection, name, layout = rule
            return f"{collection}/{target}/{name}", layout
    return None


def convert(state: dict[str, np.ndarray], *, spec, shapes) -> Converted:
    """A ResNet checkpoint in tlflax names. `shapes` is unused: nothing is adapted."""
    del shapes
    if spec.family != "resnet":
        raise ConfigError(f"convert_resnet got a {spec.family!r} model ({spec.name}); use its own")
    scheme = detect_scheme(state)
    variables: dict[str, np.ndarray] = {}
    ignored: dict[str, str] = {}
    for key, value in state.items():
        mapped = map_key(key, scheme=scheme)
        if mapped == "ignore":
            ignored[key] = _IGNORED
            continue
        if mapped is None or mapped[0] in variables:  # unknown, or a second key for one name
            variables[UNEXPECTED_PREFIX + key] = np.asarray(value)
            continue
        name, layout = mapped
        value = np.asarray(value)
        variables[name] = layout(value) if layout else value
    return Converted(variables, scheme, ignored)
