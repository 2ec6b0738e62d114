"""TFDS source, offline: a tiny dataset prepared by the test, and tfds.testing.mock_data.

mock_data needs a dataset's metadata files (split sizes), which the installed package does
not ship (its testing/metadata folder is absent), and its fake examples ignore the split
asked for, so it cannot show a host split. Hence two offline routes:
- a tiny GeneratorBasedBuilder prepared into tmp (real TFRecords, real slicing and
  per-host splits): shapes, slicing, two hosts covering a split exactly once, the cache;
- mock_data(policy=USE_FILES) on the real catalog dataset 'beans', with metadata written
  by the test itself (DatasetInfo.write_to_directory under a USE_CODE mock): the decode +
  resize path on the catalog's own feature spec (500x500 images) and split sizes.
"""

import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tlflax import config_lib, data

tfds = pytest.importorskip("tensorflow_datasets")
tf = pytest.importorskip("tensorflow")

R = 12
N_TRAIN, N_TEST = 23, 10
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TlflaxTinyShapes(tfds.core.GeneratorBasedBuilder):
    """Constant images of random size whose pixel value is the example's id."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
            }
        )
        return tfds.core.DatasetInfo(
            builder=self, features=features, supervised_keys=("image", "label")
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {
            "train": self._generate_examples(0, N_TRAIN),
            "test": self._generate_examples(100, N_TEST),
        }

    def _generate_examples(self, first, n):
        rng = np.random.default_rng(first)
        for i in range(first, first + n):
            height, width = rng.integers(8, 40, size=2)
            yield str(i), {"image": np.full((height, width, 3), i, np.uint8), "label": i % 3}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    TlflaxTinyShapes(data_dir=str(path)).download_and_prepare()
    return str(path)


def tfds_config(data_dir, **overrides):
    config = config_lib.get_base_config().data
    config.source = "tfds"
    config.name = "tlflax_tiny_shapes"
    config.tfds_data_dir = data_dir
    config.tfds_cache_max_mb = 0  # stream
    for key, value in overrides.items():
        config[key] = value
    return config


def build(config, workdir, **kw):
    return data.build_datasets(config, image_size=R, resize=R, seed=0, workdir=str(workdir), **kw)


def ids(batch):
    return batch["image"][:, 0, 0, 0].astype(int)


def test_streaming_shapes_dtypes_and_classes(tiny_dir, tmp_path):
    ds = build(tfds_config(tiny_dir), tmp_path)
    assert ds.class_names == ["a", "b", "c"] and ds.num_classes == 3
    assert (ds.train.n_examples, ds.eval.n_examples) == (N_TRAIN, N_TEST)
    assert ds.manifest["splits"]["train"]["cache"]["status"] == "streamed"
    batches = list(ds.train.iterate(global_batch=4, epoch=0, shuffle=True, drop_remainder=True))
    assert len(batches) == ds.train.batches_per_epoch(4) == N_TRAIN // 4
    for batch in batches:
        assert batch["image"].shape == (4, R, R, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].dtype == np.int32 and batch["mask"].dtype == bool
        # Constant images stay constant through resize; labels travel with their image.
        assert (batch["image"] == batch["image"][:, :1, :1, :1]).all()
        np.testing.assert_array_equal(batch["label"], ids(batch) % 3)


def test_split_slicing(tiny_dir, tmp_path):
    config = tfds_config(tiny_dir, train_split="train[:40%]", eval_split="train[40%:]")
    ds = build(config, tmp_path)
    n_head = TlflaxTinyShapes(data_dir=tiny_dir).info.splits["train[:40%]"].num_examples
    assert ds.train.n_examples == n_head and ds.eval.n_examples == N_TRAIN - n_head
    kw = dict(global_batch=4, epoch=0, shuffle=False, drop_remainder=False)
    head = np.concatenate([ids(b)[b["mask"]] for b in ds.train.iterate(**kw)])
    tail = np.concatenate([ids(b)[b["mask"]] for b in ds.eval.iterate(**kw)])
    assert len(head) == n_head and sorted(np.concatenate([head, tail])) == list(range(N_TRAIN))


def test_two_hosts_cover_the_split_exactly_once(tiny_dir, tmp_path):
    hosts = [
        build(tfds_config(tiny_dir), tmp_path / str(p), process_index=p, process_count=2)
        for p in range(2)
    ]
    kw = dict(global_batch=4, epoch=0, shuffle=False, drop_remainder=False)
    per_host = [list(h.train.iterate(**kw)) for h in hosts]
    assert len(per_host[0]) == len(per_host[1])  # same number of steps on every host
    assert all(b["image"].shape == (2, R, R, 3) for h in per_host for b in h)
    seen = np.concatenate([ids(b)[b["mask"]] for h in per_host for b in h])
    assert sorted(seen.tolist()) == list(range(N_TRAIN))
    padding = np.concatenate([b["image"][~b["mask"]] for h in per_host for b in h])
    assert (padding == 0).all()
    kw = dict(global_batch=4, shuffle=True, drop_remainder=True)
    train = [[ids(b) for b in h.train.iterate(epoch=2, **kw)] for h in hosts]
    assert len(train[0]) == len(train[1]) == N_TRAIN // 4
    step_ids = np.concatenate([np.concatenate(t) for t in train])
    assert len(set(step_ids.tolist())) == len(step_ids)  # hosts read disjoint parts


def test_streaming_order_depends_on_seed_and_epoch(tiny_dir, tmp_path):
    ds = build(tfds_config(tiny_dir), tmp_path)
    kw = dict(global_batch=4, shuffle=True, drop_remainder=True)
    order = lambda epoch: np.concatenate([ids(b) for b in ds.train.iterate(epoch=epoch, **kw)])  # noqa: E731
    np.testing.assert_array_equal(order(1), order(1))
    assert not np.array_equal(order(1), order(2))


def test_small_split_is_cached_and_reused_without_tensorflow(tiny_dir, tmp_path):
    config = tfds_config(tiny_dir, tfds_cache_max_mb=64, cache_dir=str(tmp_path / "cache"))
    ds = build(config, tmp_path)
    assert isinstance(ds.train, data.ArraySplit)
    assert ds.manifest["splits"]["train"]["cache"]["status"] == "built"
    assert sorted(ids({"image": ds.train.images}).tolist()) == list(range(N_TRAIN))
    # Each example's TFDS id travels with it, so that error lists can name it.
    assert len(set(ds.train.names)) == N_TRAIN
    assert all(re.fullmatch(r"tlflax_tiny_shapes-train\.tfrecord-\d+-of-\d+__\d+", n)
               for n in ds.train.names), ds.train.names[:3]  # fmt: skip
    script = textwrap.dedent(
        f"""
        import sys
        from tlflax import config_lib, data
        config = config_lib.get_base_config().data
        config.update(source="tfds", name="tlflax_tiny_shapes", tfds_data_dir={tiny_dir!r},
                      tfds_cache_max_mb=64, cache_dir={str(tmp_path / "cache")!r})
        ds = data.build_datasets(config, image_size={R}, resize={R}, seed=0, workdir="{tmp_path}")
        print("STATUS", ds.manifest["splits"]["eval"]["cache"]["status"], ds.class_names)
        print("TF", any(m.startswith("tensorflow") for m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "STATUS loaded ['a', 'b', 'c']" in out.stdout and "TF False" in out.stdout


def _write_beans_metadata(data_dir, sizes: dict):
    from tensorflow_datasets.core import splits as splits_lib

    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE):
        builder = tfds.builder("beans")
        infos = [
            splits_lib.SplitInfo(name=n, shard_lengths=[k], num_bytes=0, filename_template=None)
            for n, k in sizes.items()
        ]
        builder.info.set_splits(splits_lib.SplitDict(infos))
        target = os.path.join(data_dir, "beans", str(builder.version))
        os.makedirs(target, exist_ok=True)
        builder.info.write_to_directory(target)


def test_mock_data_on_a_catalog_dataset(tmp_path):
    _write_beans_metadata(str(tmp_path / "meta"), {"train": 30, "test": 12})
    config = tfds_config("", name="beans", train_split="train[:40%]", eval_split="test")
    mock = tfds.testing.mock_data(
        num_examples=6, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(tmp_path / "meta")
    )
    with mock:
        ds = build(config, tmp_path)
        assert ds.class_names == ["angular_leaf_spot", "bean_rust", "healthy"]
        assert (ds.train.n_examples, ds.eval.n_examples) == (12, 12)
        batches = list(ds.train.iterate(global_batch=4, epoch=0, shuffle=True, drop_remainder=True))
    assert len(batches) == 3  # mock examples repeat to fill the 12 // 4 steps
    for batch in batches:
        assert batch["image"].shape == (4, R, R, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].dtype == np.int32 and batch["mask"].all()
        assert set(batch["label"].tolist()) <= {0, 1, 2}
