"""One entry point for pretrained weights: `load_pretrained(spec, source, variables=...)`.

source -> files (sources.py) -> flat arrays (readers.py, torchfile.py) -> tlflax names
(convert_<family>.py) -> merged into the initialised variables, failing loudly
(merge.py) -> with the preprocessing the weights were trained with.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence

import numpy as np

from tlflax import preprocessing as pp
from tlflax import tree
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

# Naming schemes whose checkpoints always use the family's own preprocessing.
_FIXED_PREPROCESSING = {"lite_pth", "big_vision"}
# transformers checkpoints without preprocessor_config.json: the convention of every
# official checkpoint of that model_type (microsoft/resnet-*, google/vit-*).
_HF_MODEL_TYPE = {
    "resnet": lambda res: pp.imagenet(res, 0.875),
    "vit": lambda res: pp.minus_one_to_one(res, 1.0, interpolation="bilinear"),
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
    checkpoint = sources.resolve(source, cache_dir=cache_dir)
    state = read_state(checkpoint)
    converter = importlib.import_module(f"tlflax.weights.convert_{spec.family}")
    shapes = {name: tuple(np.shape(v)) for name, v in tree.flatten(variables).items()}
    converted = converter.convert(state, spec=spec, shapes=shapes)
    merged, report = merge_variables(converted, variables, reinit=reinit)
    prep = preprocessing or preprocessing_of(checkpoint, scheme=converted.scheme, spec=spec)
    return Pretrained(merged, prep, report)


def preprocessing_of(checkpoint: sources.Checkpoint, *, scheme: str, spec) -> pp.Preprocessing:
    """The preprocessing a checkpoint was trained with, from its own metadata."""
    src = checkpoint.source
    if checkpoint.preprocessor:
        return pp.from_hf(checkpoint.preprocessor, source=f"{src} preprocessor_config.json")
    config = checkpoint.config or {}
    if "pretrained_cfg" in config:
        return pp.from_timm(config["pretrained_cfg"], source=f"{src} config.json")
    if scheme in _FIXED_PREPROCESSING:
        return dataclasses.replace(spec.preprocessing, source=f"{src} ({scheme} convention)")
    if config.get("model_type") in _HF_MODEL_TYPE:
        resolution = int(config.get("image_size") or spec.preprocessing.resolution)
        prep = _HF_MODEL_TYPE[config["model_type"]](resolution)
        return dataclasses.replace(prep, source=f"{src} (transformers {config['model_type']})")
    raise ValueError(
        f"weights {src!r} ({scheme} naming) carry no preprocessing metadata "
        "(no preprocessor_config.json or timm config.json beside them); say which "
        "normalisation they were trained with: weights.preprocessing='imagenet' | "
        "'minus_one_to_one' | 'lite' (or pass preprocessing= to load_pretrained)"
    )
