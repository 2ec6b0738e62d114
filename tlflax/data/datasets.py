"""build_datasets(): config.data -> class names + train / eval splits, checked and reported.

The report (`data_manifest.json` in the workdir) lists every file that was skipped and why,
the images per class and split, where the cache lives and whether this run built it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import pathlib

import numpy as np

from tlflax.data import digits, folder, splits
from tlflax.data.folder import DataError

log = logging.getLogger("tlflax.data")
MANIFEST = "data_manifest.json"


@dataclasses.dataclass
class Datasets:
    class_names: list[str]
    train: object  # splits.ArraySplit or tfds_source.StreamSplit
    eval: object
    manifest: dict

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def build_datasets(
    data_config,
    *,
    image_size: int,
    resize: int,
    seed: int,
    workdir,
    manifest_dir=None,
    process_index: int = 0,
    process_count: int = 1,
) -> Datasets:
    """Images stored at `resize` x `resize` (short side resized, centre-cropped), uint8.

    The cache lives in data_config.cache_dir or workdir/cache; the report (MANIFEST) goes
    to manifest_dir, by default the workdir.
    """
    if not 0 < image_size <= resize:
        raise ValueError(
            f"build_datasets: need 0 < image_size <= resize, got {image_size}, {resize}"
        )
    cache_dir = data_config.cache_dir or os.path.join(workdir, "cache")
    hosts = dict(process_index=process_index, process_count=process_count)
    source = data_config.source
    if source == "tfds":
        from tlflax.data import tfds_source  # imports TensorFlow only when not cached

        class_names, train, evals, manifest = tfds_source.build(
            data_config, resize=resize, seed=seed, cache_dir=cache_dir, **hosts
        )
    elif source in ("folder", "digits"):
        parts = _folder_parts if source == "folder" else _digits_parts
        train_part, eval_part = parts(data_config, resize=resize, seed=seed, cache_dir=cache_dir)
        class_names = train_part.class_names
        manifest = _manifest(data_config, train_part, eval_part)
        train = splits.ArraySplit(
            train_part.images, train_part.labels, name="train", seed=seed, **hosts
        )
        evals = splits.ArraySplit(
            eval_part.images, eval_part.labels, name="eval", seed=seed, **hosts
        )
    else:
        raise ValueError(
            f"config.data.source={source!r}; use 'folder', 'tfds' or 'digits' (offline demo)"
        )
    try:
        _check(data_config, manifest, class_names=class_names, train=train, evals=evals)
    except DataError as e:
        manifest["error"] = str(e)
        raise
    finally:
        if process_index == 0:
            write_manifest(manifest_dir or workdir, manifest)
    return Datasets(class_names, train, evals, manifest)


def write_manifest(workdir, manifest: dict) -> pathlib.Path:
    path = pathlib.Path(workdir) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1))
    return path


# ----------------------------------------------------------------------------- folder, digits


def _folder_parts(config, *, resize: int, seed: int, cache_dir):
    if not config.path:
        raise DataError("config.data.source='folder' needs config.data.path (the image root)")
    root = pathlib.Path(config.path).expanduser()
    if not root.is_dir():
        raise DataError(f"config.data.path={str(root)!r} is not a folder")
    train_dir, eval_dir = _layout(root, config)
    load = dict(
        resize=resize,
        max_pixels=config.max_image_pixels,
        workers=config.workers,
        cache_dir=cache_dir,
    )
    train = folder.load_part(train_dir, class_names=None, split="train", **load)
    if eval_dir is None:
        return _carve(train, fraction=_fraction(config), seed=seed)
    evals = folder.load_part(eval_dir, class_names=train.class_names, split="eval", **load)
    return train, evals


AUTO_VAL_FRACTION = 0.2  # config.data.val_fraction < 0 (auto) carves this much, if it must


def _layout(root: pathlib.Path, config):
    """(train folder, eval folder or None to carve a validation split out of train).

    val_fraction > 0 carves; 0 needs the folder's own eval split; < 0 (auto) uses the
    folder's eval split when there is one and carves otherwise.
    """
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    auto = config.val_fraction < 0
    if config.train_split in subdirs:
        train_dir = root / config.train_split
        if config.val_fraction > 0:
            return train_dir, None
        if config.eval_split in subdirs:
            return train_dir, root / config.eval_split
        if auto:
            log.info("%s has no %r folder: carving the validation split", root, config.eval_split)
            return train_dir, None
        raise DataError(
            f"{root} has no {config.eval_split!r} folder (found {subdirs}); set "
            "config.data.eval_split to one of them, or config.data.val_fraction > 0"
        )
    if config.val_fraction == 0:
        raise DataError(
            f"{root} has no {config.train_split!r} folder (found {subdirs[:8]}): for a "
            "<class>/* layout set config.data.val_fraction (e.g. 0.2) to carve a validation split"
        )
    return root, None


def carves_validation(config) -> bool:
    """Whether this data config's validation split is carved out of train (not its own)."""
    if config.source == "digits":
        return True
    if config.source != "folder":
        return False
    root = pathlib.Path(config.path).expanduser()
    try:
        return _layout(root, config)[1] is None
    except (DataError, OSError):
        return config.val_fraction > 0


def _fraction(config) -> float:
    return AUTO_VAL_FRACTION if config.val_fraction < 0 else config.val_fraction


def _carve(part: folder.Part, *, fraction: float, seed: int):
    train_idx, val_idx = splits.stratified_split(part.labels, fraction=fraction, seed=seed)
    report = dict(part.report, carved={"val_fraction": fraction, "seed": seed})
    train = folder.Part(part.images[train_idx], part.labels[train_idx], part.class_names, report)
    evals = folder.Part(
        part.images[val_idx], part.labels[val_idx], part.class_names, {"carved_from": "train"}
    )
    return train, evals


def _digits_parts(config, *, resize: int, seed: int, cache_dir):
    if config.val_fraction == 0:
        raise DataError(
            "config.data.source='digits' has one split; set config.data.val_fraction (e.g. 0.2)"
        )
    arrays = digits.load_digits_arrays(resize=resize, cache_dir=cache_dir)
    report = {
        "n_files": int(len(arrays.labels)),
        "n_bad": 0,
        "bad": [],
        "ignored": [],
        "files_per_class": {},
        "cache": {"path": str(arrays.path), "status": arrays.status},
    }
    whole = folder.Part(arrays.images, arrays.labels, list(digits.CLASS_NAMES), report)
    return _carve(whole, fraction=_fraction(config), seed=seed)


def _manifest(config, train: folder.Part, evals: folder.Part) -> dict:
    names = train.class_names
    manifest = {
        "source": config.source,
        "path": config.path,
        "class_names": names,
        "class_to_index": {name: i for i, name in enumerate(names)},
        "splits": {},
        "bad": [],
        "ignored": [],
        "warnings": [],
        "error": None,
    }
    for split, part in (("train", train), ("eval", evals)):
        report = {k: v for k, v in part.report.items() if k not in ("bad", "ignored")}
        counts = np.bincount(part.labels, minlength=len(names)).tolist()
        report["n_images"] = int(len(part.labels))
        report["images_per_class"] = dict(zip(names, counts, strict=True))
        manifest["splits"][split] = report
        manifest["bad"] += part.report.get("bad", [])
        manifest["ignored"] += part.report.get("ignored", [])
    return manifest


# ----------------------------------------------------------------------------- checks


def _check(config, manifest: dict, *, class_names, train, evals) -> None:
    for split, report in manifest["splits"].items():
        _check_bad_fraction(report, split=split, limit=config.max_bad_fraction, manifest=manifest)
    if len(class_names) < 2:
        raise DataError(
            f"found {len(class_names)} class(es) {class_names} in {_where(manifest, 'train')}; "
            "a classifier needs at least 2: point config.data.path at the folder that holds "
            "one sub-folder per class"
        )
    train_counts = manifest["splits"]["train"].get("images_per_class", {})  # streamed: unknown
    for name, count in train_counts.items():
        if count == 0:
            raise DataError(_empty_class_message(manifest, name))
    eval_counts = manifest["splits"]["eval"].get("images_per_class", {})
    missing = [name for name, count in eval_counts.items() if count == 0]
    if missing:
        manifest["warnings"].append(f"classes with no validation images: {missing}")
        log.warning("classes with no validation images: %s", missing)
    if evals.n_examples == 0:
        raise DataError(f"the validation split ({_where(manifest, 'eval')}) has no images")


def _check_bad_fraction(report: dict, *, split: str, limit: float, manifest: dict) -> None:
    n_files, n_bad = report.get("n_files", 0), report.get("n_bad", 0)
    if n_bad:
        log.warning(
            "%s: skipped %d of %d files that are not readable images", split, n_bad, n_files
        )
    if n_files and n_bad / n_files > limit:
        reasons = collections.Counter(b["reason"] for b in manifest["bad"] if b["split"] == split)
        raise DataError(
            f"{n_bad} of {n_files} files in {report.get('folder', split)} are not readable "
            f"images ({dict(reasons)}), more than config.data.max_bad_fraction={limit}; "
            f"see {MANIFEST} in the workdir for the list, fix or remove them, or raise the limit"
        )


def _empty_class_message(manifest: dict, name: str) -> str:
    report = manifest["splits"]["train"]
    if manifest["source"] != "folder":
        return f"class {name!r} has no examples in {_where(manifest, 'train')}"
    directory = pathlib.Path(report.get("folder", manifest.get("path") or "."), name)
    n_files = report.get("files_per_class", {}).get(name, 0)
    if n_files:
        return (
            f"class {name!r} has no usable training image: all {n_files} files in {directory} "
            f"failed to decode (reasons in {MANIFEST}); fix them or remove the folder"
        )
    return (
        f"class {name!r} has no training images: {directory} is empty; "
        "add images or remove the folder"
    )


def _where(manifest: dict, split: str) -> str:
    report = manifest["splits"][split]
    return report.get("folder") or f"{manifest['source']} split {report.get('split', split)!r}"
