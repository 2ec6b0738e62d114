"""Decoded uint8 arrays on disk: <cache_dir>/<kind>-<name>-<key>/{images,labels}.npy + meta.json.

One format for both array storage modes: `memory` loads images.npy whole, `mmap` maps it
(MappedImages) and reads only the examples asked for. ArrayWriter writes an entry chunk by
chunk, so a set larger than host memory never has to be held whole.

The key is a hash of everything the pixels depend on (the file listing with sizes and
mtimes, the stored size, the decode version, ...), so a changed folder or setting builds a
new entry and a warm run reads plain .npy files without decoding (or TensorFlow) at all.
Entries appear atomically (written aside, then renamed; on an object store meta.json is
written last and marks the entry complete), so hosts sharing a cache directory never see
half an entry. The cache directory may be local or remote (gs://: see tlflax/fs.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import mmap
import os
import re

import numpy as np
from etils import epath

from tlflax import fs

FORMAT_VERSION = 2  # 2: meta.json lists the decoded files (error lists name them)


@dataclasses.dataclass
class CachedArrays:
    images: np.ndarray  # uint8 (n, S, S, 3)
    labels: np.ndarray  # int32 (n,), indices into meta['class_names']
    meta: dict  # class_names, bad / ignored files, where the pixels came from
    path: epath.Path
    status: str  # 'built' (decoded by this run) or 'loaded' (reused from disk)


def key_of(parts: dict) -> str:
    """A short stable hash of a JSON-able description."""
    text = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def entry_path(cache_dir, *, kind: str, name: str, key: str) -> epath.Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[-60:] or "data"
    return fs.path(cache_dir, what="cache directory") / f"{kind}-{slug}-{key}"


def _load_array(path: epath.Path) -> np.ndarray:
    if not fs.is_remote(path):
        return np.load(path)
    return np.load(io.BytesIO(path.read_bytes()))


def _save_array(path: epath.Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    path.write_bytes(buffer.getvalue())


def load(
    path: epath.Path, *, dtype=np.uint8, ndim: int = 4, mapped: bool = False
) -> CachedArrays | None:
    """The entry at `path`, or None when there is none (or it is unreadable, or its arrays
    are not `dtype` with `ndim` axes: rebuilt). Features are float32 (n, D). mapped: the
    images as MappedImages (a local entry only), read from disk as they are indexed."""
    if not (path / "meta.json").is_file():
        return None
    try:
        meta = json.loads((path / "meta.json").read_text())
        images = MappedImages(path / "images.npy") if mapped else _load_array(path / "images.npy")
        labels = _load_array(path / "labels.npy")
    except (OSError, ValueError):
        return None
    if images.dtype != dtype or images.ndim != ndim or len(images) != len(labels):
        return None
    return CachedArrays(images, labels.astype(np.int32), meta, path, "loaded")


def save(path: epath.Path, *, images: np.ndarray, labels: np.ndarray, meta: dict) -> CachedArrays:
    labels = labels.astype(np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fs.is_remote(path):
        # No atomic rename of a folder on an object store: meta.json, written last,
        # is what load() looks for, so an entry without it is never read.
        path.mkdir(parents=True, exist_ok=True)
        _save_array(path / "images.npy", images)
        _save_array(path / "labels.npy", labels)
        (path / "meta.json").write_text(json.dumps(meta, indent=1))
        return CachedArrays(images, labels, meta, path, "built")
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        tmp.rmtree()
    tmp.mkdir()
    np.save(tmp / "images.npy", images)
    np.save(tmp / "labels.npy", labels)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.replace(tmp, path)
    except OSError:  # another host or run finished the same entry first: keep theirs
        tmp.rmtree(missing_ok=True)
    return CachedArrays(images, labels, meta, path, "built")


class ArrayWriter:
    """An entry written chunk by chunk: images.npy grows with each add() (plain writes, so
    the pages go to the page cache, never into this process's memory), and finish() fixes
    its header to the final count, then writes labels.npy and meta.json and renames the
    folder into place (a local cache directory only: it is what mmap needs anyway)."""

    def __init__(self, path: epath.Path, *, capacity: int, shape: tuple, dtype=np.uint8):
        if fs.is_remote(path):
            raise ValueError(f"ArrayWriter: {path} is remote; write chunked entries locally")
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        if self.tmp.exists():
            self.tmp.rmtree()
        self.tmp.mkdir()
        self.file = open(self.tmp / "images.npy", "wb")  # noqa: SIM115 (closed in finish)
        self._header(capacity)
        self.n, self.labels = 0, []

    def _header(self, n: int) -> None:
        header = {"descr": self.dtype.str, "fortran_order": False, "shape": (n, *self.shape)}
        self.file.seek(0)
        # numpy pads the header for a first axis of up to 21 digits: rewriting it with the
        # final count keeps its length, and the data where it was.
        np.lib.format.write_array_header_1_0(self.file, header)
        self.data_offset = self.file.tell()

    def add(self, images: np.ndarray, labels: np.ndarray) -> None:
        images = np.ascontiguousarray(images, self.dtype)
        if images.shape[1:] != self.shape or len(images) != len(labels):
            raise ValueError(f"ArrayWriter: chunk {images.shape} / {len(labels)} labels")
        self.file.write(memoryview(images).cast("B"))
        self.n += len(images)
        self.labels.append(np.asarray(labels, np.int32))

    def finish(self, meta: dict) -> CachedArrays:
        offset = self.data_offset
        self._header(self.n)
        if self.data_offset != offset:
            raise RuntimeError(f"ArrayWriter: the .npy header of {self.path} changed length")
        self.file.truncate(offset + self.n * int(np.prod(self.shape)) * self.dtype.itemsize)
        self.file.close()
        labels = np.concatenate(self.labels) if self.labels else np.zeros(0, np.int32)
        np.save(self.tmp / "labels.npy", labels)
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(self.tmp, self.path)
        except OSError:  # another host or run finished the same entry first: keep theirs
            self.tmp.rmtree(missing_ok=True)
        return CachedArrays(
            MappedImages(self.path / "images.npy"), labels, meta, self.path, "built"
        )

    def abort(self) -> None:
        self.file.close()
        self.tmp.rmtree(missing_ok=True)


class MappedImages:
    """A .npy array of images on local disk, memory-mapped and read by index.

    Indexing with an int or an index array copies those examples out; `subset(indices)`
    is a view of some examples (a carved split) that reads nothing. After each read the
    pages are dropped from this process's mapping (madvise DONTNEED; they stay in the page
    cache), so an epoch over a set larger than memory does not grow the resident set, and
    each host touches only the examples of its own share.
    """

    def __init__(self, path, index: np.ndarray | None = None, *, _mapped=None):
        self.path = str(path)
        self._mapped = _mapped or _map_npy(self.path)
        self.index = index  # None: every example, in file order

    @property
    def base(self) -> np.ndarray:
        return self._mapped[1]

    @property
    def shape(self) -> tuple:
        n = len(self.base) if self.index is None else len(self.index)
        return (n, *self.base.shape[1:])

    dtype = property(lambda self: self.base.dtype)
    ndim = property(lambda self: self.base.ndim)

    def __len__(self) -> int:
        return self.shape[0]

    def digest(self) -> str:
        """Which examples of which entry (its folder name holds its key): the content,
        without reading it."""
        digest = hashlib.sha256(self.path.encode())
        if self.index is not None:
            digest.update(np.ascontiguousarray(self.index).tobytes())
        return digest.hexdigest()[:32]

    def subset(self, indices) -> MappedImages:
        indices = np.asarray(indices, np.int64)
        index = indices if self.index is None else self.index[indices]
        return MappedImages(self.path, index, _mapped=self._mapped)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            key = np.arange(len(self))[key]
        rows = np.asarray(key, np.int64)
        if self.index is not None:
            rows = self.index[rows]
        out = self.base[rows]  # a copy: fancy (or integer) indexing of the mapped array
        if hasattr(self._mapped[0], "madvise"):  # not on Windows
            self._mapped[0].madvise(mmap.MADV_DONTNEED)
        return out

    def __array__(self, dtype=None, copy=None):
        raise TypeError(
            f"MappedImages({self.path}) is not converted whole (it may not fit in memory); index it"
        )

    def __getstate__(self):
        return {"path": self.path, "index": self.index}

    def __setstate__(self, state):
        self.__init__(state["path"], state["index"])


def _map_npy(path: str):
    """(the mmap, the array viewing it) of a .npy file, read-only."""
    with open(path, "rb") as f:
        read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(
            np.lib.format.read_magic(f), np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
        if fortran:
            raise ValueError(f"{path}: a Fortran-ordered array; rebuild the cache entry")
        size = os.fstat(f.fileno()).st_size
        if size < offset + int(np.prod(shape)) * dtype.itemsize:
            raise ValueError(f"{path}: shorter than its header says")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    array = np.frombuffer(mapped, dtype, count=int(np.prod(shape)), offset=offset)
    return mapped, array.reshape(shape)
