"""Read checkpoint files into flat {name: numpy array}, with clear errors.

No torch and no TensorFlow: safetensors is parsed here (8-byte header length,
JSON header, raw little-endian data), torch pickles by tlflax.weights.torchfile.
"""

from __future__ import annotations

import json
import pathlib
import struct
import zipfile

import ml_dtypes
import numpy as np

from tlflax import tree
from tlflax.errors import UserError

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
FORMATS = {
    ".safetensors": "safetensors",
    ".bin": "torch",
    ".pth": "torch",
    ".pt": "torch",
    ".ckpt": "torch",
    ".msgpack": "msgpack",
    ".npz": "npz",
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
    data = path.read_bytes()
    if len(data) < 8:
        raise CorruptCheckpointError(f"{path}: {len(data)} bytes is too short for safetensors")
    (n_header,) = struct.unpack("<Q", data[:8])
    if 8 + n_header > len(data):
        raise CorruptCheckpointError(
            f"{path}: header says {n_header} bytes but the file has {len(data)}; truncated?"
        )
    header = json.loads(data[8 : 8 + n_header])
    body = memoryview(data)[8 + n_header :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CorruptCheckpointError(f"{path}: {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if end > len(body) or start > end:
            raise CorruptCheckpointError(
                f"{path}: tensor {name} lies at bytes {start}..{end} of a {len(body)}-byte "
                "body; the file is truncated: download or copy it again"
            )
        arr = np.frombuffer(body[start:end], dtype=dtype)
        out[name] = arr.reshape(info["shape"]).copy()
    return out


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
