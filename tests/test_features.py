"""The cached-feature probe (optim.probe='cached', kind 'cached_probe'): the frozen backbone
runs once, the head trains on its cached features, and what it learns is what the in-loop
probe learns without augmentation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tlflax import config_lib, features, train, tree
from tlflax.errors import ConfigError


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
