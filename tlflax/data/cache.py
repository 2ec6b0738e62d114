"""Decoded uint8 arrays on disk: <cache_dir>/<kind>-<name>-<key>/{images,labels}.npy + meta.json.

The key is a hash of everything the pixels depend on (the file listing with sizes and
mtimes, the stored size, the decode version, ...), so a changed folder or setting builds a
new entry and a warm run reads plain .npy files without decoding (or TensorFlow) at all.
Entries appear atomically (written aside, then renamed), so hosts sharing a cache
directory never see half an entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil

import numpy as np

FORMAT_VERSION = 1


@dataclasses.dataclass
class CachedArrays:
    images: np.ndarray  # uint8 (n, S, S, 3)
    labels: np.ndarray  # int32 (n,), indices into meta['class_names']
    meta: dict  # class_names, bad / ignored files, where the pixels came from
    path: pathlib.Path
    status: str  # 'built' (decoded by this run) or 'loaded' (reused from disk)


def key_of(parts: dict) -> str:
    """A short stable hash of a JSON-able description."""
    text = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def entry_path(cache_dir, *, kind: str, name: str, key: str) -> pathlib.Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[-60:] or "data"
    return pathlib.Path(cache_dir) / f"{kind}-{slug}-{key}"


def load(path: pathlib.Path) -> CachedArrays | None:
    """The entry at `path`, or None when there is none (or it is unreadable: rebuilt)."""
    if not (path / "meta.json").is_file():
        return None
    try:
        meta = json.loads((path / "meta.json").read_text())
        images = np.load(path / "images.npy")
        labels = np.load(path / "labels.npy")
    except (OSError, ValueError):
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
        return None
    return CachedArrays(images, labels.astype(np.int32), meta, path, "loaded")


def save(path: pathlib.Path, *, images: np.ndarray, labels: np.ndarray, meta: dict) -> CachedArrays:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    np.save(tmp / "images.npy", images)
    np.save(tmp / "labels.npy", labels.astype(np.int32))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.replace(tmp, path)
    except OSError:  # another host or run finished the same entry first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return CachedArrays(images, labels.astype(np.int32), meta, path, "built")
