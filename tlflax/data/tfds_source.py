"""TensorFlow Datasets in every storage mode; TensorFlow only for tfrecord-only datasets.

A dataset prepared in the array_record format (the default of a download here:
config.data.tfds_file_format) is read without TensorFlow: tfds.data_source gives each
example's encoded image, which decode.py decodes and resizes as it does a folder's files
(the same pixels as a folder of the same images). Its splits stream through grain
(storage 'stream', stream.TfdsRecords) or are decoded once, by grain's workers, into the
array cache ('memory', 'mmap'). A dataset that exists only as tfrecord goes through tf.data:
cached (decoded by tf.image) or streamed (StreamSplit, each host its own part).

storage 'auto': a split whose uint8 arrays are larger than config.data.tfds_cache_max_mb
streams; a smaller one is stored as storage.choose says (memory, or mmap when host memory
is short). Later runs load a cached split without importing TensorFlow. The cache key holds
the name as written, so pin a version in the name ('oxford_flowers102:2.1.1') when the
prepared data may change under you.

Pixels through tf.data: grey images become RGB, an alpha channel is composited on white (as
in decode.py); short side resized to S with antialiased bicubic, then the centre S x S.
"""

from __future__ import annotations

import logging

import numpy as np

from tlflax import fs
from tlflax.data import cache, decode, splits, storage, stream
from tlflax.data.folder import DataError

log = logging.getLogger("tlflax.data")
TF_DECODE_VERSION = 1  # bump when the pixels of _resize_crop change (invalidates caches)
_WRITE_BATCH = 256  # examples per chunk written into a cache entry


def build(
    config, *, resize: int, seed: int, cache_dir, settings, process_index: int, process_count: int
):
    """(class_names, train, eval, test or None, manifest) for config.data.source='tfds'.

    eval_split '' is 'test'; test_split 'auto' or '' is none (name a split for a final,
    separate evaluation, e.g. eval_split='validation', test_split='test').
    """
    if not config.name:
        raise DataError("config.data.source='tfds' needs config.data.name, e.g. 'tf_flowers'")
    if config.val_fraction > 0:
        raise DataError(
            "config.data.val_fraction does not apply to TFDS; slice the splits instead, e.g. "
            "train_split='train[:90%]', eval_split='train[90%:]'"
        )
    hosts = dict(seed=seed, process_index=process_index, process_count=process_count)
    manifest = {"source": "tfds", "name": config.name, "splits": {}, "bad": [], "ignored": []}
    manifest.update(warnings=[], error=None)
    built, class_names = {}, None
    roles = [("train", config.train_split), ("eval", config.eval_split or "test")]
    if config.test_split not in ("", "auto"):
        roles.append(("test", config.test_split))
    builder = _LazyBuilder(config)  # a warm cache needs neither TFDS nor TensorFlow
    common = dict(resize=resize, cache_dir=cache_dir, settings=settings, hosts=hosts)
    for role, split in roles:
        split_obj, names, report = _one_split(config, builder, split, role=role, **common)
        if class_names is not None and names != class_names:
            raise DataError(f"TFDS {config.name}: splits disagree on the class names")
        class_names, built[role] = names, split_obj
        manifest["splits"][role] = report
    manifest["class_names"] = class_names
    manifest["class_to_index"] = {name: i for i, name in enumerate(class_names)}
    return class_names, built["train"], built["eval"], built.get("test"), manifest


def _cache_entry(config, split: str, resize: int, cache_dir, *, records: bool):
    parts = {
        "kind": "tfds",
        "name": config.name,
        "split": split,
        "data_dir": config.tfds_data_dir,
        "resize": resize,
        "decode": TF_DECODE_VERSION,
    }
    if records:  # decoded by decode.py (PIL), not tf.image: other pixels, another entry
        parts.update(decode=f"pil-{decode.DECODE_VERSION}", max_pixels=config.max_image_pixels)
    key = cache.key_of(parts)
    return cache.entry_path(cache_dir, kind="tfds", name=f"{config.name}-{split}", key=key)


def has_records(builder) -> bool:
    """Whether the prepared dataset can be read as array_record (without TensorFlow)."""
    from tensorflow_datasets.core import file_adapters

    formats = builder.info.available_file_formats()
    return file_adapters.FileFormat.ARRAY_RECORD in formats


def _mode(config, settings, *, n_examples: int, resize: int, cache_dir, what: str):
    decoded = n_examples * resize * resize * 3
    if settings.storage == "auto" and decoded > config.tfds_cache_max_mb * 2**20:
        return "stream", f"{what}: {decoded / 2**20:.0f} MB > data.tfds_cache_max_mb"
    return storage.choose(
        settings, n_examples=n_examples, resize=resize, cache_dir=cache_dir, what=what
    )


class _LazyBuilder:
    """The builder, made (TFDS imported) on first use."""

    def __init__(self, config):
        self.config, self._builder = config, None

    def __call__(self):
        if self._builder is None:
            self._builder = _builder(self.config)
        return self._builder


def _cached(config, split: str, *, role, resize, cache_dir, settings):
    """(arrays, mode, why) of a split already in the array cache (decoded by either path)
    when its size asks for an array mode, else None: read without importing TFDS."""
    if settings.storage == "stream":
        return None
    for records in (True, False):
        path = _cache_entry(config, split, resize, cache_dir, records=records)
        arrays = cache.load(path, mapped=not fs.is_remote(path))
        if arrays is None:
            continue
        mode, why = _mode(
            config,
            settings,
            n_examples=len(arrays.labels),
            resize=resize,
            cache_dir=cache_dir,
            what=role,
        )
        if mode == "memory" and not isinstance(arrays.images, np.ndarray):
            arrays = cache.load(path)
        if mode != "stream" and arrays is not None:
            return arrays, mode, why
    return None


def _one_split(config, builder_fn, split: str, *, role, resize, cache_dir, settings, hosts):
    found = _cached(config, split, role=role, resize=resize, cache_dir=cache_dir, settings=settings)
    if found is not None:
        return _array_split(*found, split=split, role=role, hosts=hosts)
    builder = builder_fn()
    records = has_records(builder)
    n_examples = builder.info.splits[split].num_examples
    mode, why = _mode(
        config, settings, n_examples=n_examples, resize=resize, cache_dir=cache_dir, what=role
    )
    if mode == "stream":
        split_obj = _stream(
            config,
            builder,
            split,
            role=role,
            resize=resize,
            records=records,
            settings=settings,
            hosts=hosts,
        )
        report = {"split": split, "n_images": n_examples, "cache": {"status": "streamed"}}
        report["storage"] = {"mode": mode, "why": why, "reader": "grain" if records else "tf.data"}
        return split_obj, split_obj.class_names, report
    arrays = _decode_whole_split(
        builder,
        split,
        resize=resize,
        mode=mode,
        records=records,
        path=_cache_entry(config, split, resize, cache_dir, records=records),
        max_pixels=config.max_image_pixels,
        workers=settings.workers,
    )
    return _array_split(arrays, mode, why, split=split, role=role, hosts=hosts)


def _array_split(arrays: cache.CachedArrays, mode: str, why: str, *, split, role, hosts):
    counts = np.bincount(arrays.labels, minlength=len(arrays.meta["class_names"])).tolist()
    report = {
        "split": split,
        "n_images": int(len(arrays.labels)),
        "images_per_class": dict(zip(arrays.meta["class_names"], counts, strict=True)),
        "cache": {"path": str(arrays.path), "status": arrays.status},
        "storage": {"mode": mode, "why": why},
    }
    names = np.asarray(arrays.meta["files"], dtype=str)
    digest = arrays.images.digest() if mode == "mmap" else None
    array_split = splits.ArraySplit(
        arrays.images, arrays.labels, name=role, names=names, digest=digest, **hosts
    )
    return array_split, list(arrays.meta["class_names"]), report


def _stream(config, builder, split, *, role, resize, records, settings, hosts):
    if not records:  # tfrecord only: tf.data in this process
        return StreamSplit(
            builder,
            split=split,
            resize=resize,
            name=role,
            shuffle_buffer=config.shuffle_buffer,
            **hosts,
        )
    split_obj = stream.RecordSplit(
        _records(builder, split, resize=resize, max_pixels=config.max_image_pixels),
        name=role,
        workers=settings.workers,
        **hosts,
    )
    split_obj.class_names = _class_names(builder, _keys(builder))
    return split_obj


def _records(builder, split, *, resize: int, max_pixels: int) -> stream.TfdsRecords:
    return stream.TfdsRecords(
        str(builder.data_dir),
        split=split,
        keys=_keys(builder),
        n=builder.info.splits[split].num_examples,
        resize=resize,
        max_pixels=max_pixels,
    )


def _decode_whole_split(builder, split: str, *, resize, path, mode, records, max_pixels, workers):
    """The split decoded once into a cache entry (chunk by chunk for mmap): by grain's
    workers from the array_record files, or by tf.data."""
    keys = _keys(builder)
    if records:
        batches = _record_batches(
            builder, split, resize=resize, max_pixels=max_pixels, workers=workers
        )
    else:
        batches = _tf_batches(builder, split, keys=keys, resize=resize)
    meta = {
        "source": f"tfds:{builder.info.full_name}",
        "split": split,
        "class_names": _class_names(builder, keys),
        "bad": [],
        "ignored": [],
        "decoded_by": "decode.py (PIL)" if records else "tf.image",
    }
    return _save_batches(batches, path=path, mode=mode, resize=resize, meta=meta)


def _record_batches(builder, split, *, resize, max_pixels, workers):
    """(images, labels, ids) chunks of a whole split, in order, decoded by grain's workers."""
    records = _records(builder, split, resize=resize, max_pixels=max_pixels)
    whole = stream.RecordSplit(
        records, name=split, seed=0, process_index=0, process_count=1, workers=workers
    )
    batches = whole.iterate(global_batch=_WRITE_BATCH, epoch=0, shuffle=False, drop_remainder=False)
    for b, batch in enumerate(batches):
        mask = batch["mask"]
        ids = [
            f"{builder.info.full_name}/{split}[{i}]"
            for i in b * _WRITE_BATCH + np.flatnonzero(mask)
        ]
        yield batch["image"][mask], batch["label"][mask], ids


def _tf_batches(builder, split, *, keys, resize):
    import tensorflow_datasets as tfds

    _import_tf()
    # tfds_id ('name-split.tfrecord-00000-of-00001__12') names each example in error lists.
    read = tfds.ReadConfig(add_tfds_id=True)
    ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read)
    ds = ds.map(_example_fn(keys, resize), num_parallel_calls=-1).batch(_WRITE_BATCH)
    for batch in tfds.as_numpy(ds.prefetch(2)):
        yield batch["image"], batch["label"], [i.decode() for i in batch["tfds_id"]]


def _save_batches(batches, *, path, mode: str, resize: int, meta: dict) -> cache.CachedArrays:
    """An entry from (images, labels, ids) chunks: appended to disk as they come (mmap), or
    gathered in memory and saved (memory, which may use a remote cache)."""
    ids = []
    if mode == "mmap":
        writer = cache.ArrayWriter(path, capacity=0, shape=(resize, resize, 3))
        try:
            for images, labels, chunk_ids in batches:
                writer.add(images, labels)
                ids += chunk_ids
            return writer.finish({**meta, "files": ids, "n_files": len(ids)})
        except BaseException:
            writer.abort()
            raise
    images, labels = [], []
    for chunk_images, chunk_labels, chunk_ids in batches:
        images.append(chunk_images)
        labels.append(chunk_labels)
        ids += chunk_ids
    images = np.concatenate(images) if images else np.zeros((0, resize, resize, 3), np.uint8)
    labels = np.concatenate(labels) if labels else np.zeros(0, np.int32)
    meta = {**meta, "files": ids, "n_files": len(ids)}
    return cache.save(path, images=images, labels=labels, meta=meta)


def _builder(config):
    """The dataset's builder; TensorFlow is imported only to prepare it (a download)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(config.name, data_dir=config.tfds_data_dir or None)
    if config.tfds_download and not builder.is_prepared():
        _import_tf()
        builder.download_and_prepare(file_format=config.tfds_file_format)
        builder = tfds.builder(config.name, data_dir=config.tfds_data_dir or None)
    return builder


def _import_tf():
    import tensorflow as tf

    # TensorFlow must not take the accelerators' memory from JAX (only matters with a
    # GPU build of TensorFlow; tensorflow-cpu sees no GPU anyway).
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # already initialised by the caller: leave it as they set it
        pass
    return tf


def _keys(builder) -> tuple[str, str]:
    keys = builder.info.supervised_keys or ("image", "label")
    features = builder.info.features
    if len(keys) != 2 or any(k not in features for k in keys):
        raise DataError(
            f"TFDS {builder.info.name}: cannot find the (image, label) features; it has "
            f"{list(features)} and supervised_keys={builder.info.supervised_keys}"
        )
    return keys


def _class_names(builder, keys) -> list[str]:
    feature = builder.info.features[keys[1]]
    names = getattr(feature, "names", None)
    if not names:
        raise DataError(f"TFDS {builder.info.name}: label feature {keys[1]!r} has no class names")
    return list(names)


def _example_fn(keys, resize: int):
    import tensorflow as tf

    image_key, label_key = keys

    def fn(example):
        image = _resize_crop(tf, example[image_key], resize)
        out = {"image": image, "label": tf.cast(example[label_key], tf.int32)}
        if "tfds_id" in example:
            out["tfds_id"] = example["tfds_id"]
        return out

    return fn


def _resize_crop(tf, image, resize: int):
    channels = image.shape[-1]
    if channels == 1:
        image = tf.image.grayscale_to_rgb(image)
    elif channels == 4:  # composite on white, as decode.py does
        rgb, alpha = tf.cast(image[..., :3], tf.float32), tf.cast(image[..., 3:], tf.float32) / 255
        image = tf.cast(tf.round(rgb * alpha + 255.0 * (1.0 - alpha)), tf.uint8)
    shape = tf.shape(image)
    side = tf.minimum(shape[0], shape[1])
    top, left = (shape[0] - side) // 2, (shape[1] - side) // 2
    square = image[top : top + side, left : left + side]
    out = tf.image.resize(square, (resize, resize), method="bicubic", antialias=True)
    out = tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)
    return tf.ensure_shape(out, (resize, resize, 3))


class StreamSplit:
    """A split read through tf.data, each host its own part; never held in memory whole.
    The fallback for datasets prepared only as tfrecord: a resume mid-epoch reads (and
    drops) the epoch's batches before it, as tf.data cannot seek."""

    names = None  # examples are not listed (error rows keep their index)
    storage = "stream"
    digest = None

    def __init__(
        self, builder, *, split, resize, name, shuffle_buffer, seed, process_index, process_count
    ):
        import tensorflow_datasets as tfds

        self.builder, self.split, self.resize, self.name = builder, split, resize, name
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.process_index, self.process_count = process_index, process_count
        self.keys = _keys(builder)
        self.class_names = _class_names(builder, self.keys)
        self.n_examples = builder.info.splits[split].num_examples
        self.host_split = tfds.split_for_jax_process(
            split, process_index=process_index, process_count=process_count
        )

    @property
    def image_shape(self) -> tuple[int, ...]:
        return (self.resize, self.resize, 3)

    def batches_per_epoch(self, global_batch: int, *, drop_remainder: bool = True) -> int:
        if drop_remainder:
            return self.n_examples // global_batch
        # Hosts hold at most ceil(n / hosts) examples each; all must yield as many batches.
        most = -(-self.n_examples // self.process_count)
        return -(-most // splits.local_batch(global_batch, self.process_count))

    def iterate(
        self, *, global_batch: int, epoch: int, shuffle: bool, drop_remainder: bool, start=0
    ):
        import tensorflow_datasets as tfds

        local = splits.local_batch(global_batch, self.process_count)
        count = self.batches_per_epoch(global_batch, drop_remainder=drop_remainder)
        ds = self._dataset(epoch=epoch, shuffle=shuffle)
        if drop_remainder:  # repeat: every host must run the same number of steps
            ds = ds.repeat().batch(local, drop_remainder=True)
        else:
            ds = ds.concatenate(self._padding().repeat()).batch(local)
        for batch in tfds.as_numpy(ds.take(count).skip(start).prefetch(2)):
            yield {"image": batch["image"], "label": batch["label"], "mask": batch["mask"]}

    def _dataset(self, *, epoch: int, shuffle: bool):
        import tensorflow as tf
        import tensorflow_datasets as tfds

        tf_seed = (abs(int(self.seed)) * 1_000_003 + int(epoch)) % 2**31
        read_config = tfds.ReadConfig(shuffle_seed=tf_seed, try_autocache=False)
        ds = self.builder.as_dataset(
            split=self.host_split, shuffle_files=shuffle, read_config=read_config
        )
        example_fn = _example_fn(self.keys, self.resize)
        ds = ds.map(lambda ex: dict(example_fn(ex), mask=tf.constant(True)), num_parallel_calls=-1)
        if shuffle:
            ds = ds.shuffle(self.shuffle_buffer, seed=tf_seed)
        return ds

    def _padding(self):
        import tensorflow as tf

        zeros = {
            "image": tf.zeros((self.resize, self.resize, 3), tf.uint8),
            "label": tf.constant(0, tf.int32),
            "mask": tf.constant(False),
        }
        return tf.data.Dataset.from_tensors(zeros)
