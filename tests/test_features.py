"""The cached-feature probe (optim.probe='cached', kind 'cached_probe'): the frozen backbone
runs once, the head trains on its cached features, and what it learns is what the in-loop
probe learns without augmentation."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from tlflax import config_lib, features, state, train, tree
from tlflax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(cache_dir, **values):
    """resnet_tiny on digits at 16 px, BatchNorm frozen, no augmentation (the centre crop,
    no flip): the in-loop probe then sees exactly the features the cached one caches."""
    config = config_lib.get_base_config()
    config.update_from_flattened_dict(
        {
            "model.name": "resnet_tiny",
            "data.source": "digits",
            "data.val_fraction": 0.1,
            "data.image_size": 16,
            "data.batch_size": 16,
            "data.eval_batch_size": 48,
            "data.cache_dir": str(cache_dir),
            "aug.flip": False,
            "optim.strategy": "two_phase",
            "optim.lr": 1e-2,
            "optim.probe_steps": 4,
            "optim.finetune_steps": 3,
            "optim.finetune_lr": 1e-3,
            "train.bn_mode": "frozen",
            "train.log_every": 1,
            "train.eval_every": 2,
            "train.checkpoint_every": 2,
            "train.keep_last": 20,
            **values,
        }
    )
    return config


def _losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _params(workdir, step: int) -> dict[str, np.ndarray]:
    import orbax.checkpoint as ocp

    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return {k: np.asarray(v) for k, v in tree.flatten(restored["params"]).items()}


def _entries(cache_dir) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir() if p.name.startswith("features-"))


@pytest.mark.slow
def test_a_cached_probe_then_finetune_matches_the_in_loop_two_phase(tmp_path):
    """LP-FT with the probe on cached features: the same losses step for step as the
    in-loop probe (both phases: the fine-tune reads the batches of its own steps), the same
    validation top-1 and, to float error, the same head."""
    cache = tmp_path / "cache"
    in_loop = train.train_and_evaluate(_config(cache), tmp_path / "in_loop")
    cached = train.train_and_evaluate(_config(cache, **{"optim.probe": "cached"}), tmp_path / "c")
    a, b = _losses(tmp_path / "in_loop"), _losses(tmp_path / "c")
    assert sorted(a) == sorted(b) == list(range(1, 8))
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)
    for phase_a, phase_b in zip(in_loop["phases"], cached["phases"], strict=True):
        assert phase_a["strategy"] == phase_b["strategy"]
        assert phase_a["val/top1"] == phase_b["val/top1"]
        np.testing.assert_allclose(phase_b["val/loss"], phase_a["val/loss"], rtol=1e-5)
    pa, pb = _params(tmp_path / "in_loop", 4), _params(tmp_path / "c", 4)
    for name in pa:
        if name.startswith("backbone/"):  # frozen in the probe: untouched by either
            np.testing.assert_array_equal(pb[name], pa[name])
        else:
            np.testing.assert_allclose(pb[name], pa[name], atol=1e-5, rtol=1e-5)
    assert len(_entries(cache)) == 2  # the cached run's train and eval features, no more


def test_features_are_reused_and_rebuilt_when_what_they_depend_on_changes(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    one_phase = {"optim.strategy": "linear_probe", "optim.probe": "cached", "train.steps": 2}
    train.train_and_evaluate(_config(cache, **one_phase), tmp_path / "first")
    first = _entries(cache)
    assert len(first) == 2  # train and eval

    def no_backbone_pass(*args, **kwargs):
        raise AssertionError("the backbone ran again on features that are cached")

    # Another run, another learning rate: the same features, read back, no backbone pass.
    with monkeypatch.context() as m:
        m.setattr(features, "extract", no_backbone_pass)
        again = {**one_phase, "optim.lr": 3e-2}
        summary = train.train_and_evaluate(_config(cache, **again), tmp_path / "second")
    assert summary["steps"] == 2 and _entries(cache) == first
    # What the features depend on changed (the compute dtype): new entries beside the old.
    other = {**one_phase, "model.compute_dtype": "bfloat16"}
    train.train_and_evaluate(_config(cache, **other), tmp_path / "third")
    assert len(_entries(cache)) == 4 and set(first) < set(_entries(cache))


@pytest.mark.slow
def test_a_run_resumed_inside_the_cached_probe_ends_bitwise_the_same(tmp_path):
    """Resumed at step 2 of the cached probe (its checkpoint alone copied into a fresh
    workdir): the features are read from the cache and every step after is the same."""
    cache = tmp_path / "cache"
    config = _config(cache, **{"optim.probe": "cached"})
    train.train_and_evaluate(config, tmp_path / "whole")
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "whole/checkpoints/2", resumed / "checkpoints/2")
    summary = train.train_and_evaluate(config, resumed)
    assert summary["steps"] == 7
    whole, again = _params(tmp_path / "whole", 7), _params(resumed, 7)
    for name in whole:
        np.testing.assert_array_equal(again[name], whole[name])
    assert _losses(resumed).keys() >= {3, 4, 5, 6, 7}
    for step in (3, 4, 5, 6, 7):
        assert _losses(resumed)[step] == _losses(tmp_path / "whole")[step]


# The killed run: numpy.save patched to SIGKILL the process right after the features array
# of the first entry reaches the disk (in the entry's temporary folder, before meta.json and
# the rename): the worst moment to die.
_KILL_WHILE_CACHING = """
import os, signal, sys
import numpy as np
real_save = np.save
def save_then_die(file, arr, *args, **kwargs):
    real_save(file, arr, *args, **kwargs)
    if "features-" in str(file) and str(file).endswith("images.npy"):
        os.kill(os.getpid(), signal.SIGKILL)
np.save = save_then_die
from tlflax import main
sys.exit(main.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_run_killed_while_caching_features_leaves_no_entry_that_is_used(tmp_path):
    """SIGKILL with half an entry on disk, then the same command: the half entry is never
    read, the features are extracted again and the run finishes."""
    cache, workdir = tmp_path / "cache", tmp_path / "run"
    flags = [f"--config.{k}={v}" for k, v in (("optim.probe", "cached"),
                                              ("data.cache_dir", cache))]  # fmt: skip
    argv = ["tlflax", "train", "--config", str(ROOT / "tests" / "tiny_config.py"),
            "--workdir", str(workdir), *flags]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    killed = subprocess.run([sys.executable, "-c", _KILL_WHILE_CACHING, *argv], env=env,
                            capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    partial = [p for p in cache.iterdir() if p.name.startswith("features-")]
    assert len(partial) == 1 and ".tmp-" in partial[0].name  # half an entry, never renamed
    assert not (partial[0] / "meta.json").exists() and (partial[0] / "images.npy").exists()
    again = subprocess.run([sys.executable, "-m", "tlflax.main", *argv[1:]], env=env,
                           capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert "features of train: built" in again.stderr and "loaded" not in again.stderr
    complete = [p for p in cache.iterdir() if p.name.startswith("features-") and ".tmp-" not in
                p.name]  # fmt: skip
    assert sorted(p.name.split("-")[1] for p in complete) == ["eval", "train"]
    for entry in complete:
        assert features.cache.load(entry, dtype=np.float32, ndim=2) is not None
    assert json.loads((workdir / "summary.json").read_text())["steps"] == 8


@pytest.mark.parametrize(
    "values, message",
    [
        ({"optim.strategy": "full", "optim.probe": "cached"}, "has none"),
        ({"optim.probe": "sometimes"}, "config.optim.probe"),
    ],
)
def test_a_cached_probe_where_there_is_no_probe_is_refused(tmp_path, values, message):
    with pytest.raises(ConfigError, match=message):
        train.train_and_evaluate(_config(tmp_path / "cache", **values), tmp_path / "w")


def test_a_hand_written_cached_phase_may_train_the_head_only(tmp_path):
    config = _config(tmp_path / "cache", **{"optim.strategy": ""})
    config.optim.phases = (
        dict(
            name="probe",
            kind="cached_probe",
            groups=(("(head|backbone/stage4)/.*", {}), (".*", None)),
            steps=2,
        ),
    )
    with pytest.raises(ConfigError, match="phase probe is a cached probe.*backbone/stage4"):
        train.train_and_evaluate(config, tmp_path / "w")
    config.optim.phases = (
        dict(name="probe", kind="cached_probe", groups=(("head/.*", {}), (".*", None)), steps=2),
        dict(name="top", groups=(("(head|backbone/stage4)/.*", {}), (".*", None)), steps=2),
    )
    summary = train.train_and_evaluate(config, tmp_path / "w")
    assert [r["strategy"] for r in summary["phases"]] == ["probe", "top"]
    assert len(_entries(tmp_path / "cache")) == 2


# ----------------------------------------------------------------------------- views


def test_augmented_views_are_cached_once_each_and_epoch_e_reads_view_e_mod_k(tmp_path, monkeypatch):
    """optim.probe_views=3: the eval crop and two views under config.aug (flip, rotation),
    each its own entry; epoch e batches view e mod 3 in the image split's epoch-e order; a
    view does not depend on the batch size it was extracted with."""
    from tlflax import data, experiment

    cache = tmp_path / "cache"
    values = {
        "optim.strategy": "linear_probe",
        "optim.probe": "cached",
        "optim.probe_views": 3,
        "aug.flip": True,
        "aug.rotation": 15.0,
        "train.steps": 3,
    }
    config = _config(cache, **values)
    run = experiment.from_config(config, tmp_path / "w")
    ckpt = experiment.open_checkpointer(config, tmp_path / "w")
    st, _ = experiment.init_or_restore(config, run, ckpt, cache_dir=cache)
    ckpt.close()
    feats = features.cached_features(run, st, config=config, cache_dir=cache)
    assert isinstance(feats.train, features.ViewSplit) and len(feats.train.views) == 3
    assert [e.split("-")[1] for e in _entries(cache)] == ["eval", "train", "train1", "train2"]
    v0, v1, v2 = (v.images for v in feats.train.views)
    assert not np.allclose(v0, v1) and not np.allclose(v1, v2)
    np.testing.assert_array_equal(feats.train.labels, run.datasets.train.labels)

    def first(split, epoch):
        batches = split.iterate(global_batch=16, epoch=epoch, shuffle=True, drop_remainder=True)
        return next(iter(batches))

    for epoch in (0, 1, 2, 4):
        got, view = first(feats.train, epoch), feats.train.views[epoch % 3]
        np.testing.assert_array_equal(got["image"], first(view, epoch)["image"])
        np.testing.assert_array_equal(got["label"], first(run.datasets.train, epoch)["label"])
    # The same view from batches of another size: each example's key is its own.
    key = jax.random.fold_in(jax.random.key(config.seed), features.VIEW_STREAM + 1)
    fn = features.make_view_features_fn(run, config.aug)
    other = dataclasses.replace(run, eval_batch=40)
    again = features.extract(
        fn, state.variables_of(st), run.datasets.train, run=other, view_key=key
    )
    np.testing.assert_allclose(again, v1, rtol=1e-5, atol=1e-6)
    assert isinstance(run.datasets.train, data.ArraySplit)

    def no_backbone_pass(*args, **kwargs):
        raise AssertionError("a cached view was extracted again")

    monkeypatch.setattr(features, "extract", no_backbone_pass)
    summary = train.train_and_evaluate(config, tmp_path / "run")
    assert summary["steps"] == 3 and len(_entries(cache)) == 4


@pytest.mark.parametrize(
    "values, message",
    [
        ({"optim.strategy": "full", "optim.probe_views": 2}, "this plan has none"),
        ({"optim.probe": "cached", "optim.probe_views": 2, "aug.mixup_alpha": 0.2}, "mixup"),
        ({"optim.probe": "cached", "optim.probe_views": 0}, "probe_views must be"),
    ],
)
def test_views_where_they_cannot_be_cached_are_refused(tmp_path, values, message):
    with pytest.raises(ConfigError, match=message):
        train.train_and_evaluate(_config(tmp_path / "cache", **values), tmp_path / "w")
