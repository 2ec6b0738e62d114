"""Read checkpoint files into flat {name: numpy array}, with clear errors.

No torch and no TensorFlow: safetensors through the safetensors library (its numpy
API: memory-mapped, header and offsets validated before any tensor is read), torch
pickles by tlflax.weights.torchfile, Keras files (.h5, .keras) by tlflax.weights.keras
(h5py).
"""

from __future__ import annotations

import pathlib
import zipfile

import ml_dtypes  # noqa: F401 (registers bfloat16 with numpy: safetensors' BF16 tensors)
import numpy as np
import safetensors
import safetensors.numpy

from tlflax import tree
from tlflax.errors import UserError

FORMATS = {
    ".safetensors": "safetensors",
    ".bin": "torch",
    ".pth": "torch",
    ".pt": "torch",
    ".ckpt": "torch",
    ".msgpack": "msgpack",
    ".npz": "npz",
    ".h5": "keras",  # Keras 2 model.save / save_weights, Keras 3 .weights.h5
    ".hdf5": "keras",  # Keras 2 ModelCheckpoint's usual name
    ".keras": "keras",  # Keras 3 model.save
}


class CorruptCheckpointError(UserError, ValueError):
    pass


def format_of(path: pathlib.Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"{path}: unknown checkpoint format {path.suffix!r}; "
            f"supported: {', '.join(sorted(FORMATS))}"
        )
    return fmt


def read(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if path.stat().st_size == 0:
        raise CorruptCheckpointError(f"{path} is empty (0 bytes); download or copy it again")
    fmt = format_of(path)
    if fmt == "torch":
        from tlflax.weights import torchfile

        return torchfile.load_torch_file(path)
    if fmt == "keras":
        from tlflax.weights import keras  # h5py: imported only for Keras files

        return keras.read(path)
    reader = {"safetensors": read_safetensors, "msgpack": read_msgpack, "npz": read_npz}[fmt]
    try:
        return reader(path)
    except CorruptCheckpointError:
        raise
    except Exception as e:  # parsers fail in many ways on a damaged file; say which file
        raise CorruptCheckpointError(
            f"{path} could not be read as {fmt} ({type(e).__name__}: {e}); "
            "the file is probably truncated or corrupt: download or copy it again"
        ) from e


def read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """The library checks the header's size, that every tensor's offsets lie inside the
    file and cover it exactly, and each dtype; arrays are copied out of the mapping."""
    try:
        return dict(safetensors.numpy.load_file(path))
    except safetensors.SafetensorError as e:
        raise CorruptCheckpointError(
            f"{path} is not a valid safetensors file ({e}); it is probably truncated or "
            "corrupt: download or copy it again"
        ) from e


def read_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise CorruptCheckpointError(f"{path} is not a valid .npz (zip) file; truncated?")
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def read_msgpack(path: pathlib.Path) -> dict[str, np.ndarray]:
    from flax import serialization

    restored = serialization.msgpack_restore(path.read_bytes())
    if not isinstance(restored, dict):
        raise CorruptCheckpointError(f"{path}: expected a dict of arrays, got {type(restored)}")
    return {k: np.asarray(v) for k, v in tree.flatten(restored).items()}
