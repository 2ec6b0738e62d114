"""Pooled backbone features, computed once and cached: the light way to train a head.

A `cached_probe` phase runs the frozen backbone (BatchNorm in inference mode, the eval
crop and normalisation, the model's compute dtype) once over the train and eval splits,
sharded over the mesh like any eval batch, and keeps the pooled features on every host as
float32 arrays in splits that batch exactly as the image splits do (same epoch order), so
a head trained on them sees what an in-loop linear probe without augmentation sees, in the
same order. With optim.probe_views = K > 1 the train split also gets K - 1 views under
config.aug (each example's drawn from its index in the split), each its own entry, and epoch
e of the probe trains on view e mod K.

Entries live beside the decoded images (config.data.cache_dir, else WORKDIR/cache) as
features-<split>-<key>/{images,labels}.npy + meta.json, written aside and renamed (meta.json
last on an object store) like the image cache, so a killed run never leaves an entry that
is read. The key hashes everything the features depend on: the backbone's weights and
statistics, the preprocessing and resolution, the model and its compute dtype, and the
split's content (its pixels, or its source report when it streams).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from tlflax import data, sharding, state, tree
from tlflax.data import cache
from tlflax.errors import ConfigError

log = logging.getLogger("tlflax")

FEATURES_VERSION = 1
VIEW_STREAM = 7_000  # view v's augmentation keys: fold_in(key(seed), VIEW_STREAM + v)


@dataclasses.dataclass
class FeatureSplits:
    train: data.ArraySplit | ViewSplit  # float32 (n, D) "images", batched as the image split
    eval: data.ArraySplit
    seconds: float  # wall time spent extracting (0 when every entry was loaded)


def make_features_fn(run):
    """jit(variables, uint8 images (B, S, S, 3)) -> float32 (B, D) pooled features."""
    eval_transform = data.augment.make_eval_transform(
        image_size=run.prep.resolution, preprocessing=run.prep
    )
    model = run.spec.module

    def features_fn(variables, images):
        x = eval_transform(images)
        feats = model.apply(variables, x, train=False, bn_train=False, method=model.features)
        return feats.astype(np.float32)

    return jax.jit(features_fn, compiler_options=sharding.compiler_options(run.mesh))


def make_view_features_fn(run, aug_config):
    """jit(variables, uint8 images, example indices (B,), key) -> float32 (B, D) features of
    augmented views (config.aug's per-example geometry and colour), each example's drawn
    from fold_in(key, its index in the split), so a view does not depend on the batching."""
    one_example = data.augment.make_example_transform(
        aug_config, image_size=run.prep.resolution, preprocessing=run.prep
    )
    model = run.spec.module

    def features_fn(variables, images, index, key):
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
        x = jax.vmap(one_example)(keys, images)
        feats = model.apply(variables, x, train=False, bn_train=False, method=model.features)
        return feats.astype(np.float32)

    return jax.jit(features_fn, compiler_options=sharding.compiler_options(run.mesh))


class ViewSplit:
    """K cached views of one split's features (view 0: the eval crop): epoch e batches view
    e mod K, in the image split's epoch-e order. Everything else is view 0's."""

    def __init__(self, views: list):
        self.views = views

    def __getattr__(self, name):
        return getattr(self.__dict__["views"][0], name)

    def iterate(
        self, *, global_batch: int, epoch: int, shuffle: bool, drop_remainder: bool, start=0
    ):
        view = self.views[epoch % len(self.views)]
        return view.iterate(
            global_batch=global_batch,
            epoch=epoch,
            shuffle=shuffle,
            drop_remainder=drop_remainder,
            start=start,
        )


def head_logits(model, variables, features, *, train: bool, rngs=None):
    """The model's head alone on pooled features (what follows `features` in __call__)."""
    return model.apply(
        variables,
        features,
        train=train,
        rngs=rngs,
        method=lambda m, f, train: m.head(f, train=train),
    )


def extract(features_fn, variables, split, *, run, view_key=None) -> np.ndarray:
    """(n, D) features of every example of `split`, in its order, on every host; with
    `view_key`, of an augmented view (features_fn from make_view_features_fn)."""
    batch_sh = sharding.batch_sharding(run.mesh)
    if view_key is not None:  # the labels carry each example's index, for its key
        split = data.ArraySplit(
            split.images,
            np.arange(split.n_examples),
            name=split.name,
            seed=split.seed,
            process_index=split.process_index,
            process_count=split.process_count,
        )
    batches = split.iterate(
        global_batch=run.eval_batch, epoch=0, shuffle=False, drop_remainder=False
    )
    out = []
    for b in data.prefetch_to_device(batches, 2, batch_sh):
        if view_key is None:
            feats = features_fn(variables, b["image"])
        else:
            feats = features_fn(variables, b["image"], b["label"], view_key)
        both = multihost_utils.process_allgather({"f": feats, "m": b["mask"]}, tiled=True)
        out.append(np.asarray(both["f"])[np.asarray(both["m"]).astype(bool)])
    return np.concatenate(out).astype(np.float32)


def backbone_digest(variables) -> str:
    """A hash of the frozen backbone's values (parameters and statistics)."""
    if jax.process_count() > 1:  # parameters may be sharded over hosts
        variables = multihost_utils.process_allgather(variables, tiled=True)
    flat = tree.flatten(jax.device_get(tree.to_plain(variables)))
    digest = hashlib.sha256()
    for name in sorted(flat):
        if name.split("/")[1] == "head":
            continue  # the head is what trains on the features
        array = np.ascontiguousarray(flat[name])
        digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:32]


def split_digest(split, report: dict) -> str:
    """The split's content: its pixels and labels when in memory; the digest of a mapped or
    streamed split (which entry, which examples: nothing read); else its source report
    (without where its image cache lives or whether this run built it)."""
    if getattr(split, "digest", None):
        return split.digest
    images = getattr(split, "images", None)
    if images is None:
        source = json.dumps(
            {k: v for k, v in report.items() if k != "cache"}, sort_keys=True, default=str
        )
        return hashlib.sha256(source.encode()).hexdigest()[:32]
    digest = hashlib.sha256()
    digest.update(f"{images.dtype}:{images.shape}".encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(split.labels).tobytes())
    return digest.hexdigest()[:32]


def cached_features(run, st, *, config, cache_dir) -> FeatureSplits:
    """The train and eval splits' features for the state's backbone: loaded when an entry
    for the same key exists, else extracted (every host) and saved (process 0). With
    optim.probe_views = K > 1 the train split also gets K - 1 augmented views (ViewSplit)."""
    variables = state.variables_of(st)
    common = {
        "version": FEATURES_VERSION,
        "backbone": backbone_digest(variables),
        "model": config.model.name,
        "overrides": dict(config.model.overrides),
        "compute_dtype": config.model.compute_dtype,
        "preprocessing": json.loads(run.prep.to_json()),
    }
    extractor = _Extractor(run, variables, config)
    reports = run.datasets.manifest.get("splits", {})
    splits = {}
    for role in ("train", "eval"):
        split = getattr(run.datasets, role)
        parts = {**common, "split": split_digest(split, reports.get(role, {}))}
        views = int(config.optim.probe_views) if role == "train" else 1
        if views > 1 and getattr(split, "images", None) is None:
            raise ConfigError(
                f"config.optim.probe_views={views} augments the train split's images before "
                f"the backbone, but {split.name} streams (no decoded images in memory); "
                "use probe_views=1"
            )
        found = [
            extractor.entry(role, split, parts, view=v, cache_dir=cache_dir) for v in range(views)
        ]
        splits[role] = found[0] if views == 1 else ViewSplit(found)
    return FeatureSplits(splits["train"], splits["eval"], extractor.seconds)


class _Extractor:
    """Feature entries of one backbone: loaded, or extracted and saved (timed)."""

    def __init__(self, run, variables, config):
        self.run, self.variables, self.config = run, variables, config
        self.fns, self.seconds = {}, 0.0

    def entry(self, role: str, split, parts: dict, *, view: int, cache_dir):
        if view:  # an augmented view: what it depends on besides view 0's
            aug = self.config.aug.to_dict()
            parts = {**parts, "view": view, "seed": self.config.seed, "aug": aug}
        key = cache.key_of(parts)
        name = role if not view else f"{role}{view}"
        path = cache.entry_path(cache_dir, kind="features", name=name, key=key)
        found = cache.load(path, dtype=np.float32, ndim=2)
        if found is None or len(found.labels) != split.n_examples:
            t0 = time.time()
            feats = self._extract(split, view)
            self.seconds += time.time() - t0
            found = _save(path, feats, labels_of(split), key=key, parts=parts)
        log.info("features of %s: %s %s (%s)", name, found.status, feats_shape(found), path)
        return data.ArraySplit(
            found.images,
            found.labels,
            name=f"{split.name}-features" + (f"-view{view}" if view else ""),
            seed=getattr(split, "seed", self.config.seed),  # the image split's epoch orders
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            names=getattr(split, "names", None),
        )

    def _extract(self, split, view: int) -> np.ndarray:
        kind = "view" if view else "eval"
        if kind not in self.fns:
            self.fns[kind] = (
                make_view_features_fn(self.run, self.config.aug)
                if view
                else make_features_fn(self.run)
            )
        key = None
        if view:
            key = jax.random.fold_in(jax.random.key(self.config.seed), VIEW_STREAM + view)
        return extract(self.fns[kind], self.variables, split, run=self.run, view_key=key)


def labels_of(split) -> np.ndarray:
    """Every label of a split, in its order (in memory, or from one pass of a stream)."""
    labels = getattr(split, "labels", None)
    if labels is not None:
        return np.asarray(labels, np.int32)
    batches = split.iterate(global_batch=256, epoch=0, shuffle=False, drop_remainder=False)
    return np.concatenate([b["label"][b["mask"]] for b in batches]).astype(np.int32)


def feats_shape(found) -> str:
    return "x".join(str(d) for d in found.images.shape)


def _save(path, feats, labels, *, key: str, parts: dict):
    meta = {"kind": "features", "key": key, "shape": list(feats.shape), "depends_on": parts}
    if jax.process_index() != 0:  # every host has them; one writes them
        return cache.CachedArrays(feats, np.asarray(labels, np.int32), meta, path, "built")
    return cache.save(path, images=feats, labels=np.asarray(labels), meta=meta)
