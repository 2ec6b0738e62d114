"""Storage modes (data.storage: memory, mmap, stream, auto) in one process: the same
manifest, classes, batches and host shares in every mode; the mmap entry written in chunks
and read mapped; positions that resume without reading what they skip, saved in the
checkpoint. Process-level checks (SIGKILL, two processes, no TensorFlow, peak memory) are
in tests/test_data_stream.py."""

from __future__ import annotations

import json
import logging
from itertools import islice

import numpy as np
import pytest
from PIL import Image
from test_data_bad_inputs import _rgb, write_readable, write_unreadable

from tlflax import checkpointing, config_lib, data
from tlflax import train as train_lib
from tlflax.data import cache, splits, storage, stream
from tlflax.errors import ConfigError

R = 16
MODES = ("memory", "mmap", "stream")


def folder_config(root, **overrides):
    config = config_lib.get_base_config().data
    config.update(path=str(root), workers=1, max_image_pixels=1_000_000, max_bad_fraction=0.5)
    config.update(overrides)
    return config


def build(config, workdir, **kw):
    return data.build_datasets(config, image_size=R, resize=R, seed=0, workdir=str(workdir), **kw)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """The folder of the bad-input tests: readable kinds, broken files, ignored files."""
    root = tmp_path_factory.mktemp("messy")
    write_readable(root / "train" / "good")
    write_unreadable(root / "train" / "broken", big=1100)
    for i in range(2):
        _rgb(root / "train" / "broken" / f"fine{i}.png", (0, 0, 255))
        _rgb(root / "train" / "other" / f"o{i}.png")
        _rgb(root / "test" / "good" / f"g{i}.png")
    (root / "test" / "broken").mkdir()
    (root / "train" / ".DS_Store").write_bytes(b"\0")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """48 noisy JPEGs in 3 classes (a class per colour), <class>/* layout (carved split)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir()
        for i in range(16):
            pixels = rng.integers(0, 60, (20, 24, 3)) + 80 * c
            Image.fromarray(pixels.astype(np.uint8)).save(root / f"c{c}" / f"{i:02d}.jpg")
    return root


def without_storage(manifest: dict) -> dict:
    """The manifest less what legitimately differs between modes: where the cache is."""
    out = json.loads(json.dumps(manifest))
    for report in out["splits"].values():
        report.pop("cache", None)
        report.pop("storage", None)
    return out


def labels_of(split, **kw):
    return np.concatenate([b["label"][b["mask"]] for b in split.iterate(**kw)])


def test_every_mode_gives_the_same_manifest_classes_and_batches(messy, tmp_path):
    built = {m: build(folder_config(messy, storage=m), tmp_path / m) for m in MODES}
    memory = built["memory"]
    assert isinstance(built["mmap"].train.images, cache.MappedImages)
    assert isinstance(built["stream"].train, stream.RecordSplit)
    assert len(memory.manifest["bad"]) == 5 and memory.class_names == ["broken", "good", "other"]
    train_kw = dict(global_batch=4, epoch=1, shuffle=True, drop_remainder=True)
    eval_kw = dict(global_batch=4, epoch=0, shuffle=False, drop_remainder=False)
    pixels = {}
    for mode, ds in built.items():
        assert without_storage(ds.manifest) == without_storage(memory.manifest), mode
        assert ds.manifest["splits"]["train"]["storage"]["mode"] == mode
        saved = json.loads((tmp_path / mode / data.MANIFEST).read_text())
        assert without_storage(saved) == without_storage(memory.manifest), mode
        np.testing.assert_array_equal(
            labels_of(ds.train, **train_kw), labels_of(memory.train, **train_kw)
        )
        np.testing.assert_array_equal(labels_of(ds.eval, **eval_kw), memory.eval.labels)
        pixels[mode] = np.concatenate([b["image"] for b in ds.train.iterate(**train_kw)])
    np.testing.assert_array_equal(pixels["mmap"], pixels["memory"])  # the same entry
    # stream: JPEG at the stored size, so close to the decoded pixels, not equal
    diff = np.abs(pixels["stream"].astype(int) - pixels["memory"]).mean()
    assert 0 < diff < 6, diff


def test_too_many_bad_files_stop_every_mode(messy, tmp_path):
    for mode in MODES:
        with pytest.raises(data.DataError, match=r"5 of 20 files .*max_bad_fraction=0.1"):
            build(folder_config(messy, storage=mode, max_bad_fraction=0.1), tmp_path / mode)


def test_a_carved_split_is_a_view_in_mmap_and_stream(photos, tmp_path):
    built = {m: build(folder_config(photos, storage=m, val_fraction=0.25), tmp_path) for m in MODES}
    for mode, ds in built.items():
        assert (ds.train.n_examples, ds.eval.n_examples) == (36, 12), mode
        assert (
            ds.manifest["splits"]["eval"]["files"]
            == built["memory"].manifest["splits"]["eval"]["files"]
        )
        np.testing.assert_array_equal(ds.eval.labels, built["memory"].eval.labels)
        # The reports' grids read a few eval images in every mode (one record when streamed).
        shown = train_lib.report_images(ds.eval)
        image = shown(5) if callable(shown) else shown[5]
        error = np.abs(image.astype(int) - built["memory"].eval.images[5]).mean()
        assert image.shape == (R, R, 3) and error < (6 if mode == "stream" else 1e-9), mode
    mapped = built["mmap"]
    assert mapped.train.images.base is mapped.eval.images.base  # one mapping, two views
    whole = np.load(mapped.train.images.path)
    np.testing.assert_array_equal(mapped.eval.images[np.arange(12)], built["memory"].eval.images)
    assert len(whole) == 48 and mapped.train.digest != mapped.eval.digest
    with pytest.raises(TypeError, match="is not converted whole"):
        np.asarray(mapped.train.images)


def test_memory_and_mmap_share_one_entry_written_in_chunks(photos, tmp_path):
    mmap = build(folder_config(photos, storage="mmap", val_fraction=0.25), tmp_path / "a")
    assert mmap.manifest["splits"]["train"]["cache"]["status"] == "built"
    config = folder_config(
        photos, storage="memory", val_fraction=0.25, cache_dir=str(tmp_path / "a/cache")
    )
    memory = build(config, tmp_path / "b")
    assert memory.manifest["splits"]["train"]["cache"]["status"] == "loaded"
    assert isinstance(memory.train.images, np.ndarray)
    np.testing.assert_array_equal(memory.train.images, mmap.train.images[np.arange(36)])
    # A writer fed in chunks gives a plain .npy of the final count (header fixed at the end).
    path = tmp_path / "entry"
    writer = cache.ArrayWriter(path, capacity=1000, shape=(2, 2, 3))
    chunks = [np.full((n, 2, 2, 3), n, np.uint8) for n in (3, 5, 1)]
    for chunk in chunks:
        writer.add(chunk, np.arange(len(chunk)))
    entry = writer.finish({"note": "x"})
    np.testing.assert_array_equal(np.load(path / "images.npy"), np.concatenate(chunks))
    assert cache.load(path).images.shape == (9, 2, 2, 3) and entry.status == "built"


def test_auto_chooses_by_decoded_size(monkeypatch, tmp_path):
    monkeypatch.setattr(storage, "host_memory_bytes", lambda: 100 * 2**20)  # 100 MB of RAM
    settings = storage.Settings.from_config(folder_config(tmp_path))  # shares 0.25 and 1.0
    pick = lambda n, **kw: storage.choose(  # noqa: E731
        settings, n_examples=n, resize=64, cache_dir=str(tmp_path), what="train", **kw
    )[0]
    per_image = 64 * 64 * 3
    assert pick(20 * 2**20 // per_image) == "memory"
    assert pick(60 * 2**20 // per_image) == "mmap"
    assert pick(120 * 2**20 // per_image) == "stream"
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda p: type("U", (), {"free": 2**20}))
    assert pick(60 * 2**20 // per_image) == "stream"  # no room on the disk for the mmap entry
    with pytest.raises(ConfigError, match="storage='mmap'.*local disk"):
        mmap = storage.Settings.from_config(folder_config(tmp_path, storage="mmap"))
        storage.choose(mmap, n_examples=1, resize=8, cache_dir="gs://bucket/c", what="train")
    with pytest.raises(ConfigError, match="config.data.storage='ram'"):
        storage.Settings.from_config(folder_config(tmp_path, storage="ram"))


class CountingImages(np.ndarray):
    """An image array that remembers which rows were read."""

    def __getitem__(self, key):
        self.read.extend(np.asarray(key).ravel().tolist())
        return np.asarray(super().__getitem__(key))


def test_a_resumed_position_reads_no_skipped_batch(photos, tmp_path):
    ds = build(folder_config(photos, storage="stream", val_fraction=0.25), tmp_path)
    steps = ds.train.batches_per_epoch(8)  # 4
    kw = dict(global_batch=8, steps_per_epoch=steps)
    whole = [b["label"] for b in islice(splits.train_batches(ds.train, start_step=0, **kw), 10)]
    read = []
    records = ds.train.records
    original = type(records).read
    type(records).read = lambda self, rows: read.extend(self.index[rows]) or original(self, rows)
    try:
        resumed = [
            b["label"] for b in islice(splits.train_batches(ds.train, start_step=6, **kw), 4)
        ]
    finally:
        type(records).read = original
    for a, b in zip(whole[6:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    plan = splits.Batching(36, global_batch=8, seed=0, shuffle=True, drop_remainder=True,
                           process_index=0, process_count=1)  # fmt: skip
    # Batches 6.. and the one or two the reader decodes ahead; none before 6.
    ahead = len(read) // 8
    expected = records.index[np.concatenate([plan.at_step(k) for k in range(6, 6 + ahead)])]
    assert 4 <= ahead <= 7 and sorted(read) == sorted(expected.tolist())
    # Arrays: the same, counted on the rows gathered.
    images = np.zeros((36, 2, 2, 3), np.uint8).view(CountingImages)
    images.read = []
    split = splits.ArraySplit(
        images, np.arange(36) % 3, name="t", seed=0, process_index=0, process_count=1
    )
    list(islice(splits.train_batches(split, start_step=6, **kw), 4))
    assert sorted(images.read) == sorted(
        np.concatenate([plan.at_step(k) for k in range(6, 10)]).tolist()
    )


@pytest.mark.parametrize("mode", MODES)
def test_two_hosts_read_disjoint_halves_and_every_eval_example_once(photos, tmp_path, mode):
    hosts = [
        build(
            folder_config(photos, storage=mode, val_fraction=0.25),
            tmp_path / str(p),
            process_index=p,
            process_count=2,
        )  # fmt: skip
        for p in range(2)
    ]
    for epoch in (0, 1):
        kw = dict(global_batch=12, epoch=epoch, shuffle=True, drop_remainder=True)
        halves = [np.concatenate([b["label"] for b in h.train.iterate(**kw)]) for h in hosts]
        assert [len(h) for h in halves] == [18, 18]
        plan = [splits.Batching(36, global_batch=12, seed=0, shuffle=True, drop_remainder=True,
                                process_index=p, process_count=2) for p in range(2)]  # fmt: skip
        rows = [np.concatenate([plan[p].indices(epoch, b) for b in range(3)]) for p in range(2)]
        assert not set(rows[0]) & set(rows[1]) and sorted([*rows[0], *rows[1]]) == list(range(36))
        for p in range(2):
            np.testing.assert_array_equal(halves[p], hosts[p].train.labels[rows[p]])
    kw = dict(global_batch=8, epoch=0, shuffle=False, drop_remainder=False)
    shares = [list(h.eval.iterate(**kw)) for h in hosts]
    assert len(shares[0]) == len(shares[1]) == 2  # 12 examples: 16 slots, 4 padded
    seen = [i for p, h in enumerate(hosts) for b, batch in enumerate(shares[p])
            for i in np.flatnonzero(batch["mask"]) + 8 * b + 4 * p]  # fmt: skip
    assert sorted(seen) == list(range(12))
    for p in range(2):
        assert all((batch["image"][~batch["mask"]] == 0).all() for batch in shares[p])


def test_the_position_is_saved_with_the_checkpoint_and_checked_on_resume(photos, tmp_path, caplog):
    import jax.numpy as jnp

    ds = build(folder_config(photos, storage="mmap", val_fraction=0.25), tmp_path)
    position = splits.position(ds.train, step=9, steps_per_epoch=4, global_batch=8)
    assert (position["epoch"], position["batch"], position["storage"]) == (2, 1, "mmap")
    with checkpointing.Checkpointer(tmp_path / "ck", keep_last=2, keep_best=0, best_metric="m",
                                    best_mode="max", async_save=False) as ckpt:  # fmt: skip
        ckpt.save(8, {"x": jnp.zeros(2)})  # a checkpoint from before positions were saved
        ckpt.save(9, {"x": jnp.ones(2)}, data=position)
        assert ckpt.data_position(8) is None and ckpt.data_position(9) == position
    assert splits.check_position(position, position) == []
    assert splits.check_position(None, position) == []
    grown = splits.position(
        splits.ArraySplit(np.zeros((40, 1, 1, 3), np.uint8), np.zeros(40), name="t", seed=0,
                          process_index=0, process_count=1),
        step=9, steps_per_epoch=5, global_batch=8,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="tlflax.data"):
        changed = splits.check_position(position, grown)
    assert "n_examples 36 -> 40" in changed and "batch 1 -> 4" in changed
    assert "the training data changed since the checkpoint at step 9" in caplog.text
