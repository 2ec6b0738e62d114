"""Where a split's decoded images live: config.data.storage = auto | memory | mmap | stream.

- memory: uint8 arrays in host RAM (cache.py's .npy entry, loaded whole): small sets.
- mmap: the same entry, written chunk by chunk (never whole in RAM) and memory-mapped
  (cache.MappedImages): each host reads only the examples of its own batches.
- stream: the images re-encoded once as JPEG at the stored size into ArrayRecord shards,
  written in parallel by the decode workers, read through grain (stream.py).
- auto: by the decoded size (examples x S x S x 3 bytes) against host memory: memory up
  to data.memory_share of it, mmap up to data.mmap_share of it (the page cache then holds
  the whole set after the first epoch) when the cache's disk has room, stream beyond.

A folder's bad files are found while an entry is written, in every mode, so the manifest
(bad files, classes, counts) is the same whichever mode reads the pixels.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import shutil

import numpy as np

from tlflax import fs
from tlflax.data import cache, decode, stream
from tlflax.errors import ConfigError

log = logging.getLogger("tlflax.data")
MODES = ("auto", "memory", "mmap", "stream")
STREAM_VERSION = 1  # bump when the records a stream entry holds change
_DISK_MARGIN = 1.05  # auto picks mmap only when the cache's disk has this much more room


@dataclasses.dataclass(frozen=True)
class Settings:
    """config.data's storage keys (read once; see config_lib for their meaning)."""

    storage: str
    memory_share: float
    mmap_share: float
    jpeg_quality: int
    shard_images: int
    workers: int

    @classmethod
    def from_config(cls, data_config) -> Settings:
        if data_config.storage not in MODES:
            raise ConfigError(f"config.data.storage={data_config.storage!r}; use one of {MODES}")
        if not 1 <= data_config.stream_jpeg_quality <= 100:
            raise ConfigError(
                f"config.data.stream_jpeg_quality={data_config.stream_jpeg_quality}; use 1..100"
            )
        if data_config.stream_shard_images < 1:
            raise ConfigError(
                f"config.data.stream_shard_images={data_config.stream_shard_images}; use >= 1"
            )
        return cls(
            storage=data_config.storage,
            memory_share=data_config.memory_share,
            mmap_share=data_config.mmap_share,
            jpeg_quality=data_config.stream_jpeg_quality,
            shard_images=data_config.stream_shard_images,
            workers=data_config.workers,
        )


def host_memory_bytes() -> int:
    """Physical memory, or the container's limit (cgroup v2 / v1) when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def choose(settings: Settings, *, n_examples: int, resize: int, cache_dir, what: str):
    """(mode, why) for a split of n_examples images stored at resize x resize."""
    decoded = n_examples * resize * resize * 3
    mode = settings.storage
    if mode in ("mmap", "stream") and fs.is_remote(cache_dir):
        raise ConfigError(
            f"config.data.storage={mode!r} maps or streams files of the cache, which must be "
            f"on a local disk, but config.data.cache_dir is {cache_dir}; set a local "
            "data.cache_dir, or data.storage='memory'"
        )
    if mode == "stream" and not stream_available():
        raise ConfigError(
            "config.data.storage='stream' reads through grain and array_record, which are not "
            "installed: pip install 'grain>=0.2.10' 'array_record>=0.8.1' (Linux, macOS), or "
            "use data.storage='mmap'"
        )
    if mode != "auto":
        return mode, "config.data.storage"
    ram = host_memory_bytes()
    size = f"{what}: {_gb(decoded)} decoded"
    if decoded <= settings.memory_share * ram:
        return "memory", f"{size} <= data.memory_share={settings.memory_share} of {_gb(ram)} RAM"
    if fs.is_remote(cache_dir):
        log.warning("%s, more than data.memory_share of RAM, but the cache is remote: memory", size)
        return "memory", f"{size}; the cache directory {cache_dir} is remote"
    free = shutil.disk_usage(_existing_parent(str(cache_dir))).free
    if decoded <= settings.mmap_share * ram and decoded * _DISK_MARGIN <= free:
        return "mmap", f"{size} <= data.mmap_share={settings.mmap_share} of {_gb(ram)} RAM"
    why = f"{size} > data.mmap_share of {_gb(ram)} RAM or {_gb(free)} free disk"
    if not stream_available():
        log.warning("%s, but grain / array_record are not installed: mmap", why)
        return "mmap", f"{why}; grain is not installed"
    return "stream", why


def stream_available() -> bool:
    """Whether the stream mode's readers (grain, array_record) are installed."""
    return all(importlib.util.find_spec(name) for name in ("grain", "array_record"))


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GB"


def _existing_parent(path: str) -> str:
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def take(images, rows):
    """Some examples of a split's images: a copy of an array's, a view of mapped images or
    records (nothing read)."""
    if isinstance(images, np.ndarray):
        return images[rows]
    return images.subset(rows)


# ----------------------------------------------------------------------------- folders


def load_folder_entry(path, *, mode: str) -> cache.CachedArrays | None:
    """A folder's entry in the cache for `mode`, or None when it is not there yet."""
    if mode == "stream":
        return _load_records(path)
    return cache.load(path, mapped=mode == "mmap")


def write_folder_arrays(files, labels, *, path, resize, max_pixels, workers, meta_fn):
    """The mmap entry of a folder: decoded chunk by chunk (a few chunks per worker in
    flight) and appended to images.npy; bad files listed as decode_files lists them.
    meta_fn(good mask, bad list) -> the entry's meta.json. Returns CachedArrays."""
    writer = cache.ArrayWriter(path, capacity=len(files), shape=(resize, resize, 3))
    good, bad = np.zeros(len(files), bool), []
    try:
        chunks = decode.decode_chunks(
            files,
            resize=resize,
            max_pixels=max_pixels,
            workers=workers,
            ahead=2 * decode.n_workers(workers),
        )
        for start, images, chunk_bad in chunks:
            keep = [i for i, image in enumerate(images) if image is not None]
            if keep:
                rows = start + np.asarray(keep)
                writer.add(np.stack([images[i] for i in keep]), labels[rows])
                good[rows] = True
            bad += [
                {"path": str(files[start + i]), "reason": r, "detail": d} for i, r, d in chunk_bad
            ]
        return writer.finish(meta_fn(good, bad))
    except BaseException:
        writer.abort()
        raise


def write_folder_records(files, labels, *, path, resize, max_pixels, settings: Settings,
                         meta_fn):  # fmt: skip
    """The stream entry of a folder: each worker decodes a run of files and writes the good
    ones, as JPEG at the stored size, into its own ArrayRecord shard. meta_fn as for
    write_folder_arrays. Returns CachedArrays whose images are stream.FolderRecords."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        tmp.rmtree()
    tmp.mkdir()
    size = settings.shard_images
    jobs, names = _shard_jobs(files, labels, into=tmp, settings=settings, resize=resize,
                              max_pixels=max_pixels)  # fmt: skip
    good, bad, counts = np.zeros(len(files), bool), [], []
    try:
        for k, (shard_good, shard_bad) in decode.run_jobs(jobs, workers=settings.workers):
            good[k * size : k * size + len(shard_good)] = shard_good
            counts.append(int(sum(shard_good)))
            bad += [{"path": str(files[k * size + i]), "reason": r, "detail": d}
                    for i, r, d in shard_bad]  # fmt: skip
        for name, count in zip(names, counts, strict=True):
            if not count:  # an all-bad shard: an empty file that readers need not open
                (tmp / name).unlink()
        kept = [name for name, count in zip(names, counts, strict=True) if count]
        meta = {**meta_fn(good, bad), "shards": kept, "resize": resize, "max_pixels": max_pixels}
        np.save(tmp / "labels.npy", np.asarray(labels[good], np.int32))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, path)
        except OSError:  # another host or run finished the same entry first: keep theirs
            tmp.rmtree(missing_ok=True)
    except BaseException:
        tmp.rmtree(missing_ok=True)
        raise
    return dataclasses.replace(_load_records(path), status="built")


def _shard_jobs(files, labels, *, into, settings: Settings, resize: int, max_pixels: int):
    """(decode jobs, shard file names): a run of settings.shard_images files per shard."""
    size = settings.shard_images
    n_shards = max(1, -(-len(files) // size))
    names = [f"shard-{k:05d}-of-{n_shards:05d}.array_record" for k in range(n_shards)]
    jobs = []
    for k, name in enumerate(names):
        run = slice(k * size, (k + 1) * size)
        args = ([str(f) for f in files[run]], labels[run].tolist(), resize, max_pixels,
                settings.jpeg_quality, str(into / name))  # fmt: skip
        jobs.append((k, "shard", args))
    return jobs, names


def _load_records(path) -> cache.CachedArrays | None:
    if not (path / "meta.json").is_file():
        return None
    try:
        meta = json.loads((path / "meta.json").read_text())
        labels = np.load(path / "labels.npy")
    except (OSError, ValueError):
        return None
    records = stream.FolderRecords(
        [str(path / name) for name in meta["shards"]],
        n=len(labels),
        resize=meta["resize"],
        max_pixels=meta["max_pixels"],
    )
    return cache.CachedArrays(records, labels.astype(np.int32), meta, path, "loaded")
