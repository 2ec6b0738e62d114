"""build_datasets(): config.data -> class names + train / eval splits, checked and reported.

The report (`data_manifest.json` in the workdir) lists every file that was skipped and why,
the images per class and split, where the cache lives and whether this run built it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import pathlib

import numpy as np
from etils import epath

from tlflax import fs
from tlflax.data import cache, digits, folder, splits, storage, stream
from tlflax.data.folder import DataError

log = logging.getLogger("tlflax.data")
MANIFEST = "data_manifest.json"


@dataclasses.dataclass
class Datasets:
    class_names: list[str]
    train: object  # splits.ArraySplit or tfds_source.StreamSplit
    eval: object
    manifest: dict
    test: object | None = None  # a final, separate evaluation (folder test/ beside val/)

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

    seed: the epoch orders (config.seed); a carved validation split is drawn with
    data_config.split_seed instead.

    The cache lives in data_config.cache_dir or workdir/cache; the report (MANIFEST) goes
    to manifest_dir, by default the workdir.
    """
    if not 0 < image_size <= resize:
        raise ValueError(
            f"build_datasets: need 0 < image_size <= resize, got {image_size}, {resize}"
        )
    cache_dir = str(cache_dir_of(data_config, workdir))
    settings = storage.Settings.from_config(data_config)
    hosts = dict(process_index=process_index, process_count=process_count)
    source = data_config.source
    if source == "tfds":
        from tlflax.data import tfds_source  # imports TensorFlow only when it must

        class_names, train, evals, test, manifest = tfds_source.build(
            data_config, resize=resize, seed=seed, cache_dir=cache_dir, settings=settings, **hosts
        )
    elif source in ("folder", "digits"):
        parts = _folder_parts if source == "folder" else _digits_parts
        *found, layout = parts(data_config, resize=resize, cache_dir=cache_dir, settings=settings)
        named = dict(zip(("train", "eval", "test"), found, strict=True))
        class_names = named["train"].class_names
        manifest = _manifest(data_config, named, layout)
        train, evals, test = (
            None
            if part is None
            else split_of(part, name=name, seed=seed, settings=settings, **hosts)
            for name, part in named.items()
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
    return Datasets(class_names, train, evals, manifest, test)


def describe(datasets: Datasets, data_config) -> dict:
    """What a run's summary says about its data: the source, the splits and their sizes."""
    sizes = {role: report.get("n_images") for role, report in datasets.manifest["splits"].items()}
    carved = datasets.manifest["splits"]["train"].get("carved")
    return {
        "source": data_config.source,
        "name": data_config.name or data_config.path or data_config.source,
        "num_classes": datasets.num_classes,
        "n_train": sizes.get("train"),
        "n_eval": sizes.get("eval"),
        "n_test": sizes.get("test"),
        "eval_split": "carved from train" if carved else _where(datasets.manifest, "eval"),
        "split_seed": carved["split_seed"] if carved else None,
    }


def split_of(part: folder.Part, *, name: str, seed: int, settings, **hosts):
    """The split that batches a part's images: from arrays (in memory or mapped), or a
    grain stream of its records."""
    if isinstance(part.images, stream.Records):
        return stream.RecordSplit(
            part.images,
            labels=part.labels,
            names=part.names,
            name=name,
            seed=seed,
            workers=settings.workers,
            **hosts,
        )
    digest = part.images.digest() if isinstance(part.images, cache.MappedImages) else None
    return splits.ArraySplit(
        part.images, part.labels, name=name, seed=seed, names=part.names, digest=digest, **hosts
    )


def write_manifest(workdir, manifest: dict) -> epath.Path:
    path = fs.path(workdir, what="workdir") / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1))
    return path


# ----------------------------------------------------------------------------- folder, digits


def cache_dir_of(data_config, workdir):
    """Where decoded images (and cached features) live: data.cache_dir, else WORKDIR/cache."""
    return fs.path(data_config.cache_dir or str(fs.path(workdir, what="workdir") / "cache"),
                   what="cache directory")  # fmt: skip


def _folder_parts(config, *, resize: int, cache_dir, settings):
    if not config.path:
        raise DataError("config.data.source='folder' needs config.data.path (the image root)")
    if fs.is_remote(config.path):
        raise DataError(
            f"config.data.path={config.path!r}: image folders are read from a local or mounted "
            "filesystem; copy it to the machine, mount the bucket (gcsfuse), or use TFDS "
            "(config.data.tfds_data_dir may be on gs://)"
        )
    root = pathlib.Path(config.path).expanduser()
    if not root.is_dir():
        raise DataError(f"config.data.path={str(root)!r} is not a folder")
    layout = folder_layout(root, config)
    load = dict(
        resize=resize,
        max_pixels=config.max_image_pixels,
        settings=settings,
        cache_dir=cache_dir,
    )
    train = folder.load_part(layout.train, class_names=None, split="train", **load)
    test = None
    if layout.test is not None:
        test = folder.load_part(layout.test, class_names=train.class_names, split="test", **load)
    if layout.eval is None:
        train, evals = _carve(train, fraction=_fraction(config), seed=config.split_seed)
    else:
        evals = folder.load_part(layout.eval, class_names=train.class_names, split="eval", **load)
    return train, evals, test, layout


AUTO_VAL_FRACTION = 0.2  # config.data.val_fraction < 0 (auto) carves this much, if it must
# config.data.eval_split '' (auto): the first of these folders next to train/ validates
# (the PyTorch tutorials' val/, Keras' validation/, test/ when there is nothing else).
VAL_FOLDERS = ("val", "valid", "validation", "test")
AUTO = "auto"  # config.data.test_split: test/ when it is not the validation folder


@dataclasses.dataclass
class Layout:
    """Which folder serves which role; eval None: carved out of train."""

    train: pathlib.Path
    eval: pathlib.Path | None
    test: pathlib.Path | None
    unused: list[str]

    def roles(self) -> dict:
        name = lambda p: None if p is None else str(p)
        return {
            "train": name(self.train),
            "eval": name(self.eval) if self.eval else "carved from train",
            "test": name(self.test),
            "unused": self.unused,
        }


def folder_layout(root: pathlib.Path, config) -> Layout:
    """The roles of root's folders for this data config.

    val_fraction > 0 carves; 0 needs the folder's own eval split; < 0 (auto) uses the
    folder's eval split when there is one and carves otherwise. Sub-folders that serve no
    role are listed as unused (and warned about), never silently dropped.
    """
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if config.train_split not in subdirs:
        if config.val_fraction == 0:
            raise DataError(
                f"{root} has no {config.train_split!r} folder (found {subdirs[:8]}): for a "
                "<class>/* layout set config.data.val_fraction (e.g. 0.2) to carve a "
                "validation split"
            )
        return Layout(root, None, None, [])
    eval_name = _eval_folder(root, config, subdirs)
    test_name = config.test_split
    if test_name == AUTO:
        test_name = "test" if "test" in subdirs and eval_name != "test" else ""
    elif test_name and test_name not in subdirs:
        raise DataError(
            f"{root} has no {test_name!r} folder for config.data.test_split (found {subdirs}); "
            "name one of them, or '' for no final test evaluation"
        )
    used = {config.train_split, eval_name, test_name}
    layout = Layout(
        root / config.train_split,
        root / eval_name if eval_name else None,
        root / test_name if test_name else None,
        [str(root / d) for d in subdirs if d not in used],
    )
    roles = ", ".join(f"{k}: {v}" for k, v in layout.roles().items() if k != "unused")
    for path in layout.unused:
        log.warning(
            "%s is not used (%s); config.data.eval_split / test_split can name it", path, roles
        )
    return layout


def _eval_folder(root: pathlib.Path, config, subdirs: list[str]) -> str:
    """The validation folder's name next to train/, or '' to carve one out of train."""
    if config.val_fraction > 0:
        return ""
    if config.eval_split:
        if config.eval_split in subdirs:
            return config.eval_split
        if config.val_fraction < 0:
            log.info("%s has no %r folder: carving the validation split", root, config.eval_split)
            return ""
        raise DataError(
            f"{root} has no {config.eval_split!r} folder (found {subdirs}); set "
            "config.data.eval_split to one of them, or config.data.val_fraction > 0"
        )
    found = [name for name in VAL_FOLDERS if name in subdirs]
    if found:
        return found[0]
    if config.val_fraction < 0:
        log.info("%s has none of the folders %s: carving the validation split", root, VAL_FOLDERS)
        return ""
    raise DataError(
        f"{root} has none of the validation folders {list(VAL_FOLDERS)} (found {subdirs}); "
        "set config.data.eval_split to one of its folders, or config.data.val_fraction > 0"
    )


def eval_split_name(config) -> str:
    """The validation split's name: its folder, the TFDS split, or 'val' when carved."""
    if config.source == "tfds":
        return config.eval_split or "test"
    if config.source != "folder":
        return "val"
    root = pathlib.Path(config.path).expanduser()
    try:
        layout = folder_layout(root, config)
    except (DataError, OSError):  # build_datasets says what is wrong with the folder
        return config.eval_split or "val"
    return "val" if layout.eval is None else layout.eval.name


def _fraction(config) -> float:
    return AUTO_VAL_FRACTION if config.val_fraction < 0 else config.val_fraction


def _carve(part: folder.Part, *, fraction: float, seed: int):
    """(train, validation) parts, stratified by class and drawn with config.data.split_seed
    (not config.seed: repeats over the seed validate on one set). The manifest lists the
    validation files, so that runs can be checked to share them."""
    train_idx, val_idx = splits.stratified_split(part.labels, fraction=fraction, seed=seed)
    report = dict(part.report, carved={"val_fraction": fraction, "split_seed": seed})
    val_report = {"carved_from": "train", "files": [str(n) for n in part.names[val_idx]]}
    val_report["storage"] = part.report.get("storage")
    train, evals = (
        folder.Part(
            storage.take(part.images, idx),
            part.labels[idx],
            part.class_names,
            rep,
            part.names[idx],
        )
        for idx, rep in ((train_idx, report), (val_idx, val_report))
    )
    return train, evals


def _digits_parts(config, *, resize: int, cache_dir, settings):
    if config.val_fraction == 0:
        raise DataError(
            "config.data.source='digits' has one split; set config.data.val_fraction (e.g. 0.2)"
        )
    mode, why = storage.choose(
        settings, n_examples=digits.N_DIGITS, resize=resize, cache_dir=cache_dir, what="digits"
    )
    if mode == "stream":
        raise DataError(
            "config.data.source='digits' is 1,797 arrays from scikit-learn, with no files to "
            "stream; use config.data.storage='memory' (or 'mmap', 'auto')"
        )
    arrays = digits.load_digits_arrays(resize=resize, cache_dir=cache_dir, mapped=mode == "mmap")
    report = {
        "n_files": int(len(arrays.labels)),
        "n_bad": 0,
        "bad": [],
        "ignored": [],
        "files_per_class": {},
        "cache": {"path": str(arrays.path), "status": arrays.status},
        "storage": {"mode": mode, "why": why},
    }
    ids = np.asarray([f"sklearn_digits[{i}]" for i in range(len(arrays.labels))], dtype=str)
    whole = folder.Part(arrays.images, arrays.labels, list(digits.CLASS_NAMES), report, ids)
    return (*_carve(whole, fraction=_fraction(config), seed=config.split_seed), None, None)


def _manifest(config, parts: dict, layout: Layout | None) -> dict:
    names = parts["train"].class_names
    manifest = {
        "source": config.source,
        "path": config.path,
        "class_names": names,
        "class_to_index": {name: i for i, name in enumerate(names)},
        "splits": {},
        "bad": [],
        "ignored": [],
        "roles": layout.roles() if layout else None,
        "warnings": [f"{path} is not used" for path in (layout.unused if layout else [])],
        "error": None,
    }
    for split, part in parts.items():
        if part is None:
            continue
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
