"""Decoded uint8 arrays on disk: <cache_dir>/<kind>-<name>-<key>/{images,labels}.npy + meta.json.

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


def load(path: epath.Path, *, dtype=np.uint8, ndim: int = 4) -> CachedArrays | None:
    """The entry at `path`, or None when there is none (or it is unreadable, or its arrays
    are not `dtype` with `ndim` axes: rebuilt). Features are float32 (n, D)."""
    if not (path / "meta.json").is_file():
        return None
    try:
        meta = json.loads((path / "meta.json").read_text())
        images = _load_array(path / "images.npy")
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
