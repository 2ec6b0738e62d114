"""TensorFlow Datasets: small splits become cached uint8 arrays, large ones stream via tf.data.

A split whose decoded arrays fit in config.data.tfds_cache_max_mb is decoded once (all of
it, on every host) and cached like a folder; later runs load the cache without importing
TensorFlow. Larger splits stream: each host reads its own part
(tfds.split_for_jax_process), decodes and resizes in tf.data, and yields fixed-shape
batches. The cache key holds the name as written, so pin a version in the name
('oxford_flowers102:2.1.1') when the prepared data may change under you.

Pixels: grey images become RGB, an alpha channel is composited on white (as in decode.py);
short side resized to S with antialiased bicubic, then the centre S x S.
"""

from __future__ import annotations

import numpy as np

from tlflax.data import cache, splits
from tlflax.data.folder import DataError

TF_DECODE_VERSION = 1  # bump when the pixels of _resize_crop change (invalidates caches)


def build(config, *, resize: int, seed: int, cache_dir, process_index: int, process_count: int):
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
    for role, split in roles:
        split_obj, names, report = _one_split(
            config, split, role=role, resize=resize, cache_dir=cache_dir, hosts=hosts
        )
        if class_names is not None and names != class_names:
            raise DataError(f"TFDS {config.name}: splits disagree on the class names")
        class_names, built[role] = names, split_obj
        manifest["splits"][role] = report
    manifest["class_names"] = class_names
    manifest["class_to_index"] = {name: i for i, name in enumerate(class_names)}
    return class_names, built["train"], built["eval"], built.get("test"), manifest


def _cache_entry(config, split: str, resize: int, cache_dir):
    key = cache.key_of(
        {
            "kind": "tfds",
            "name": config.name,
            "split": split,
            "data_dir": config.tfds_data_dir,
            "resize": resize,
            "decode": TF_DECODE_VERSION,
        }
    )
    return cache.entry_path(cache_dir, kind="tfds", name=f"{config.name}-{split}", key=key)


def _one_split(config, split: str, *, role: str, resize: int, cache_dir, hosts: dict):
    path = _cache_entry(config, split, resize, cache_dir)
    arrays = cache.load(path)
    if arrays is None:
        builder = _builder(config)
        n_examples = builder.info.splits[split].num_examples
        if n_examples * resize * resize * 3 > config.tfds_cache_max_mb * 2**20:
            stream = StreamSplit(
                builder,
                split=split,
                resize=resize,
                name=role,
                shuffle_buffer=config.shuffle_buffer,
                **hosts,
            )
            report = {"split": split, "n_images": n_examples, "cache": {"status": "streamed"}}
            return stream, stream.class_names, report
        arrays = _decode_whole_split(builder, split, resize=resize, path=path)
    counts = np.bincount(arrays.labels, minlength=len(arrays.meta["class_names"])).tolist()
    report = {
        "split": split,
        "n_images": int(len(arrays.labels)),
        "images_per_class": dict(zip(arrays.meta["class_names"], counts, strict=True)),
        "cache": {"path": str(arrays.path), "status": arrays.status},
    }
    names = np.asarray(arrays.meta["files"], dtype=str)
    array_split = splits.ArraySplit(arrays.images, arrays.labels, name=role, names=names, **hosts)
    return array_split, list(arrays.meta["class_names"]), report


def _decode_whole_split(builder, split: str, *, resize: int, path) -> cache.CachedArrays:
    import tensorflow_datasets as tfds

    keys = _keys(builder)
    # tfds_id ('name-split.tfrecord-00000-of-00001__12') names each example in error lists.
    read = tfds.ReadConfig(add_tfds_id=True)
    ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read)
    ds = ds.map(_example_fn(keys, resize), num_parallel_calls=-1).batch(256)
    images, labels, ids = [], [], []
    for batch in tfds.as_numpy(ds.prefetch(2)):
        images.append(batch["image"])
        labels.append(batch["label"])
        ids += [i.decode() for i in batch["tfds_id"]]
    images = np.concatenate(images) if images else np.zeros((0, resize, resize, 3), np.uint8)
    labels = np.concatenate(labels) if labels else np.zeros(0, np.int32)
    meta = {
        "files": ids,
        "source": f"tfds:{builder.info.full_name}",
        "split": split,
        "class_names": _class_names(builder, keys),
        "bad": [],
        "ignored": [],
        "n_files": int(len(labels)),
    }
    return cache.save(path, images=images, labels=labels, meta=meta)


def _builder(config):
    _import_tf()
    import tensorflow_datasets as tfds

    builder = tfds.builder(config.name, data_dir=config.tfds_data_dir or None)
    if config.tfds_download:
        builder.download_and_prepare()
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
    """A split read through tf.data, each host its own part; never held in memory whole."""

    names = None  # examples are not listed (error rows keep their index)

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

    def iterate(self, *, global_batch: int, epoch: int, shuffle: bool, drop_remainder: bool):
        import tensorflow_datasets as tfds

        local = splits.local_batch(global_batch, self.process_count)
        count = self.batches_per_epoch(global_batch, drop_remainder=drop_remainder)
        ds = self._dataset(epoch=epoch, shuffle=shuffle)
        if drop_remainder:  # repeat: every host must run the same number of steps
            ds = ds.repeat().batch(local, drop_remainder=True)
        else:
            ds = ds.concatenate(self._padding().repeat()).batch(local)
        for batch in tfds.as_numpy(ds.take(count).prefetch(2)):
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
