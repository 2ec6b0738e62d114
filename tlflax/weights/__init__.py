"""One entry point for pretrained weights: `load_pretrained(spec, source, variables=...)`.

source -> files (sources.py) -> flat arrays (readers.py, torchfile.py, keras.py) -> tlflax names
(convert_<family>.py) -> merged into the initialised variables, failing loudly
(merge.py) -> with the preprocessing the weights were trained with.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Sequence

import numpy as np

from tlflax import preprocessing as pp
from tlflax import tree
from tlflax.errors import ConfigError
from tlflax.weights import readers, sources
from tlflax.weights.merge import CheckpointMismatchError, LoadReport, merge_variables
from tlflax.weights.readers import CorruptCheckpointError
from tlflax.weights.sources import WeightsNotFoundError

__all__ = [
    "CheckpointMismatchError",
    "CorruptCheckpointError",
    "LoadReport",
    "Pretrained",
    "WeightsNotFoundError",
    "load_pretrained",
    "merge_variables",
]

# Checkpoints that carry no metadata but whose convention is fixed: every Lite
# checkpoint uses (x - 127) / 128; Google's ViT .npz files use [-1, 1].
# Families whose every PyTorch checkpoint has one normalisation (torchvision's VGG weights,
# which timm's are too, use ImageNet's mean / std).
_FAMILY_CONVENTION = {
    "efficientnet_lite": "lite",
    "vgg": "imagenet",
    "mobilenet_v2": "imagenet",
    "xception": "minus_one_to_one",
    "convnext": "imagenet",
    "efficientnet": "imagenet",  # torchvision's, timm's ra / aa / ns (not ap, ra4: [-1, 1])
}
_FORMAT_CONVENTION = {".npz": "minus_one_to_one"}
# Keras files (.h5 .hdf5 .keras, keras:NAME) carry no preprocessing: that of keras.applications'
# preprocess_input for the family, by name, or a function (checkpoint, spec) -> Preprocessing
# for a family whose Keras models normalise inside (EfficientNet: Rescaling + Normalization
# layers, their mean / variance in the file). 'caffe' (VGG, ResNet50) feeds BGR in Keras: the
# family's converter reverses the first conv's input channels, so that tlflax feeds RGB.
_KERAS_CONVENTION = {
    "vgg": "caffe",
    "xception": "minus_one_to_one",  # Keras' 'tf' mode: x / 127.5 - 1
    # 'tf' mode, at the resolution keras.applications' file name gives (..._0.35_96.h5: 96)
    "mobilenet_v2": lambda checkpoint, spec: _keras_mobilenet_v2(checkpoint, spec),
    # The model normalises inside (Rescaling, Normalization[, Rescaling]): read from the file.
    "efficientnet": lambda checkpoint, spec: importlib.import_module(
        "tlflax.weights.convert_efficientnet"
    ).keras_preprocessing(checkpoint, spec),
    # ResNet50 (caffe) once convert_resnet reads Keras files and flips its stem conv.
}
KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")
# transformers checkpoints without preprocessor_config.json: the convention of every
# official checkpoint of that model_type (microsoft/resnet-*, google/vit-*).
_HF_MODEL_TYPE = {
    "resnet": ("imagenet", 0.875),
    "vit": ("minus_one_to_one", 1.0),
    "convnext": ("imagenet", 0.875),
    "efficientnet": ("imagenet", 1.0),  # google/efficientnet-b*: resized, not cropped
}


@dataclasses.dataclass
class Pretrained:
    variables: dict
    preprocessing: pp.Preprocessing
    report: LoadReport


def read_state(checkpoint: sources.Checkpoint) -> dict[str, np.ndarray]:
    state: dict[str, np.ndarray] = {}
    for path in checkpoint.files:
        part = readers.read(path)
        clash = sorted(set(part) & set(state))
        if clash:
            raise CorruptCheckpointError(f"{path}: shards repeat names {clash[:5]}")
        state.update(part)
    return state


def load_pretrained(
    spec,
    source: str,
    *,
    variables: dict,
    reinit: Sequence[str] = ("head/.*",),
    preprocessing: pp.Preprocessing | None = None,
    cache_dir: str | None = None,
) -> Pretrained:
    """Pretrained weights merged into `variables` (from spec.init), and their preprocessing.

    Every variable of the model must come from the checkpoint with the same shape,
    except those whose name (without collection) fully matches a `reinit` regex;
    the checkpoint may hold nothing the model lacks. Anything else raises
    CheckpointMismatchError listing missing, unexpected and misshapen names.
    """
    sources.check_fits_model(source, spec)
    checkpoint = sources.resolve(source, cache_dir=cache_dir)
    # Decided before reading the arrays: a checkpoint of unknown normalisation is refused.
    prep = preprocessing or preprocessing_of(checkpoint, spec=spec)
    state = read_state(checkpoint)
    converter = importlib.import_module(f"tlflax.weights.convert_{spec.family}")
    shapes = {name: tuple(np.shape(v)) for name, v in tree.flatten(variables).items()}
    converted = converter.convert(state, spec=spec, shapes=shapes)
    merged, report = merge_variables(converted, variables, reinit=reinit)
    return Pretrained(merged, prep, report)


def peek_preprocessing(source: str, *, spec, cache_dir: str | None = None) -> pp.Preprocessing:
    """The preprocessing of `source` without reading its arrays (the data needs it first)."""
    sources.check_fits_model(source, spec)
    return preprocessing_of(sources.resolve(source, cache_dir=cache_dir), spec=spec)


def preprocessing_of(checkpoint: sources.Checkpoint, *, spec) -> pp.Preprocessing:
    """The preprocessing a checkpoint was trained with, from its own metadata."""
    src = checkpoint.source
    resolution = spec.preprocessing.resolution
    if checkpoint.preprocessor:
        return pp.from_hf(checkpoint.preprocessor, source=f"{src} preprocessor_config.json")
    config = checkpoint.config or {}
    if "pretrained_cfg" in config:
        return pp.from_timm(config["pretrained_cfg"], source=f"{src} config.json")
    suffix = checkpoint.files[0].suffix.lower()
    if checkpoint.origin == "keras" or suffix in KERAS_SUFFIXES:
        return _keras_preprocessing(checkpoint, spec=spec)
    if spec.family in _FAMILY_CONVENTION or suffix in _FORMAT_CONVENTION:
        name = _FAMILY_CONVENTION.get(spec.family) or _FORMAT_CONVENTION[suffix]
        prep = dataclasses.replace(spec.preprocessing, source=f"{src} ({name} convention)")
        conv = pp.named(name, resolution=resolution, crop_pct=spec.preprocessing.crop_pct)
        return dataclasses.replace(prep, mean=conv.mean, std=conv.std)
    if config.get("model_type") in _HF_MODEL_TYPE:
        name, crop_pct = _HF_MODEL_TYPE[config["model_type"]]
        prep = pp.named(
            name, resolution=int(config.get("image_size") or resolution), crop_pct=crop_pct
        )
        return dataclasses.replace(prep, source=f"{src} (transformers {config['model_type']})")
    raise ConfigError(
        f"weights {src!r} carry no preprocessing metadata (no preprocessor_config.json or "
        "timm config.json beside them); say which normalisation they were trained with: "
        "weights.preprocessing='imagenet' | 'minus_one_to_one' | 'lite' | 'caffe' "
        "(or pass preprocessing= to load_pretrained)"
    )


def _keras_preprocessing(checkpoint: sources.Checkpoint, *, spec) -> pp.Preprocessing:
    """keras.applications' convention for the family, at the model's resolution."""
    convention = _KERAS_CONVENTION.get(spec.family)
    if convention is None:
        raise ConfigError(
            f"weights {checkpoint.source!r} are a Keras file, and tlflax knows no Keras "
            f"preprocessing for {spec.family} models (known: {', '.join(_KERAS_CONVENTION)}); "
            "say which normalisation they were trained with: weights.preprocessing="
            "'caffe' | 'minus_one_to_one' | 'imagenet' | 'lite'"
        )
    if callable(convention):
        return convention(checkpoint, spec)
    conv = pp.named(
        convention,
        resolution=spec.preprocessing.resolution,
        crop_pct=spec.preprocessing.crop_pct,
    )
    return dataclasses.replace(
        spec.preprocessing,
        mean=conv.mean,
        std=conv.std,
        source=f"{checkpoint.source} (Keras {spec.family}: {convention} convention)",
    )


# keras.applications.MobileNetV2's files: ..._<alpha>_<rows>.h5 or ..._<alpha>_<rows>_no_top.h5
_KERAS_MOBILENET_V2_FILE = re.compile(
    r"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_[0-9.]+_(\d+)(?:_no_top)?\.h5"
)


def _keras_mobilenet_v2(checkpoint: sources.Checkpoint, spec) -> pp.Preprocessing:
    """Keras' 'tf' mode ([-1, 1]); at the resolution the weights were trained at where the
    file is keras.applications' own (its name says it), else the model's."""
    prep = pp.minus_one_to_one(spec.preprocessing.resolution, spec.preprocessing.crop_pct)
    m = _KERAS_MOBILENET_V2_FILE.fullmatch(checkpoint.files[0].name)
    resolution = int(m[1]) if m else spec.preprocessing.resolution
    return dataclasses.replace(
        spec.preprocessing,
        mean=prep.mean,
        std=prep.std,
        source=f"{checkpoint.source} (Keras mobilenet_v2: minus_one_to_one convention)",
    ).at_resolution(resolution)
