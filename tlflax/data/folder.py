"""Image folders: root/<split>/<class>/* or root/<class>/* (+ a seeded stratified validation split).

Every non-hidden file under a class folder (recursively) is tried as an image; the ones
that do not decode are skipped and listed with their reason (see decode.py). Hidden files
(.DS_Store, ._* AppleDouble files) and files lying directly in the root are listed as
ignored. Classes are the train folder's sub-folders in sorted order, so the class indices
do not depend on the file system's listing order.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib

import numpy as np

from tlflax.data import cache, decode, storage
from tlflax.errors import UserError


class DataError(UserError, ValueError):
    """The data cannot make a usable dataset; the message says which file or folder and why."""


@dataclasses.dataclass
class Listing:
    directory: pathlib.Path
    class_names: list[str]  # sub-folders, sorted
    files: list[str]  # relative to `directory`, grouped by class, sorted
    labels: np.ndarray  # int32 index into class_names
    stats: list[tuple[int, int]]  # (size, mtime_ns): part of the cache key
    ignored: list[dict]  # {'path', 'reason'}


@dataclasses.dataclass
class Part:
    """Decoded images of one folder with labels in the dataset's class order."""

    images: object  # uint8 array, cache.MappedImages (mmap) or stream.Records (stream)
    labels: np.ndarray  # int32 index into class_names
    class_names: list[str]  # the dataset's classes (the training folder's)
    report: dict  # what the manifest says about this folder
    names: np.ndarray  # str (n,): each image's file path (or another source's id)


def list_folder(directory: pathlib.Path) -> Listing:
    if not directory.is_dir():
        raise DataError(f"{directory} is not a folder; check config.data.path")
    class_names, ignored = [], []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name.startswith("."):
            ignored.append({"path": entry.path, "reason": "hidden"})
        elif entry.is_dir():
            class_names.append(entry.name)
        else:
            ignored.append({"path": entry.path, "reason": "not in a class folder"})
    files, labels, stats = [], [], []
    for index, name in enumerate(class_names):
        for relative, st in _walk_files(str(directory), name, ignored):
            files.append(relative)
            labels.append(index)
            stats.append((st.st_size, st.st_mtime_ns))
    return Listing(directory, class_names, files, np.asarray(labels, np.int32), stats, ignored)


def _walk_files(root: str, class_name: str, ignored: list):
    """(path relative to root, stat) of every file under root/class_name, sorted.

    Plain strings and os.walk: pathlib's per-path overhead was most of a warm start.
    """
    prefix = len(root) + 1
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, class_name), followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name.startswith("."):
                ignored.append({"path": path, "reason": "hidden"})
            else:
                yield path[prefix:], os.stat(path)


def decode_listing(
    listing: Listing, *, mode: str, settings, resize: int, max_pixels: int, cache_dir
) -> cache.CachedArrays:
    """The folder's images in storage `mode` (storage.py), from the cache when nothing
    changed: uint8 arrays (memory), mapped arrays (mmap; the same entry as memory's), or
    JPEG records (stream)."""
    path = _entry_path(
        listing, mode=mode, settings=settings, resize=resize, max_pixels=max_pixels,
        cache_dir=cache_dir,
    )  # fmt: skip
    cached = storage.load_folder_entry(path, mode=mode)
    if cached is not None:
        return cached
    full = [listing.directory / f for f in listing.files]
    meta_fn = functools.partial(_meta, listing)
    write = dict(path=path, resize=resize, max_pixels=max_pixels, meta_fn=meta_fn)
    if mode == "stream":
        return storage.write_folder_records(full, listing.labels, settings=settings, **write)
    if mode == "mmap":
        return storage.write_folder_arrays(full, listing.labels, workers=settings.workers, **write)
    images, good, bad = decode.decode_files(
        full, resize=resize, max_pixels=max_pixels, workers=settings.workers
    )
    return cache.save(path, images=images, labels=listing.labels[good], meta=meta_fn(good, bad))


def _entry_path(listing: Listing, *, mode, settings, resize, max_pixels, cache_dir):
    """The entry's place in the cache: a hash of everything its content depends on."""
    parts = {
        "kind": "folder",
        "directory": str(listing.directory.resolve()),
        "class_names": listing.class_names,
        "files": listing.files,
        "labels": listing.labels.tolist(),
        "stats": listing.stats,
        "resize": resize,
        "max_pixels": max_pixels,
        "decode": decode.DECODE_VERSION,
    }
    if mode == "stream":  # records, not arrays: an entry of their own
        parts.update(stream=storage.STREAM_VERSION, quality=settings.jpeg_quality,
                     shard_images=settings.shard_images)  # fmt: skip
    kind = "stream" if mode == "stream" else "folder"
    key = cache.key_of(parts)
    return cache.entry_path(cache_dir, kind=kind, name=str(listing.directory), key=key)


def _meta(listing: Listing, good, bad) -> dict:
    """An entry's meta.json: its classes, the files decoded (good) and those that were not."""
    return {
        "directory": str(listing.directory),
        "class_names": listing.class_names,
        "n_files": len(listing.files),
        "files": [f for f, ok in zip(listing.files, good, strict=True) if ok],  # decoded ones
        "bad": bad,
        "ignored": listing.ignored,
    }


def load_part(
    directory: pathlib.Path,
    *,
    class_names: list[str] | None,
    split: str,
    resize: int,
    max_pixels: int,
    settings,
    cache_dir,
) -> Part:
    """One folder in the storage mode its size asks for (storage.choose), its labels mapped
    to `class_names` (None: its own classes)."""
    listing = list_folder(directory)
    mode, why = storage.choose(
        settings, n_examples=len(listing.files), resize=resize, cache_dir=cache_dir, what=split
    )
    arrays = decode_listing(
        listing, mode=mode, settings=settings, resize=resize, max_pixels=max_pixels,
        cache_dir=cache_dir,
    )  # fmt: skip
    own = arrays.meta["class_names"]
    if class_names is None:
        class_names = own
    extra = sorted(set(own) - set(class_names))
    if extra:
        raise DataError(
            f"{directory} has class folders {extra} that the training folder lacks; "
            "the model could never predict them: add them to the training folder or remove them"
        )
    remap = np.asarray([class_names.index(name) for name in own], np.int32)
    labels = remap[arrays.labels] if len(own) else arrays.labels
    report = _report(directory, arrays, listing, split=split, storage={"mode": mode, "why": why})
    names = np.asarray([os.path.join(str(directory), f) for f in arrays.meta["files"]], dtype=str)
    return Part(arrays.images, labels.astype(np.int32), list(class_names), report, names)


def _report(directory, arrays: cache.CachedArrays, listing: Listing, *, split, storage) -> dict:
    """What the manifest says about one folder."""
    own = arrays.meta["class_names"]
    return {
        "folder": str(directory),
        "n_files": arrays.meta["n_files"],
        "n_images": int(len(arrays.labels)),
        "n_bad": len(arrays.meta["bad"]),
        "bad": [{"split": split, **b} for b in arrays.meta["bad"]],
        "ignored": [{"split": split, **i} for i in arrays.meta["ignored"]],
        "cache": {"path": str(arrays.path), "status": arrays.status},
        "storage": storage,
        "files_per_class": dict(
            zip(own, np.bincount(listing.labels, minlength=len(own)).tolist(), strict=True)
        ),
    }
