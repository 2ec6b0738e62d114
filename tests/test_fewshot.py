"""Few-shot evaluation (tlflax/fewshot.py): closed-form ridge probes whose regulariser is
picked by exact leave-one-out error, k-shot draws over seeds, `tlflax eval --fewshot` and
train.fewshot_shots during training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny_config

from tlflax import config_lib, features, fewshot, main, metrics_io, train
from tlflax.errors import ConfigError


def _brute_force(x, y, num_classes: int, lam: float):
    """Centred ridge (unpenalised intercept) and its leave-one-out squared error, by refits."""

    def fit(xs, ys):
        mx, my = xs.mean(0), ys.mean(0)
        gram = (xs - mx).T @ (xs - mx) + lam * np.eye(xs.shape[1])
        kernel = np.linalg.solve(gram, (xs - mx).T @ (ys - my))
        return kernel, my - mx @ kernel

    targets = np.eye(num_classes)[y]
    loo = np.zeros_like(targets)
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        kernel, bias = fit(x[keep], targets[keep])
        loo[i] = x[i] @ kernel + bias
    return (*fit(x, targets), float(np.sum((targets - loo) ** 2)), loo)


@pytest.mark.parametrize("n, d", [(30, 50), (80, 12)])  # fewer examples than features, and more
def test_ridge_and_its_leave_one_out_error_match_refitting_without_each_example(n, d):
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n, d)), rng.integers(0, 4, n)
    scale = float(np.mean(np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2))
    for rel in (1e-3, 0.1, 10.0):
        ridge = fewshot.fit_ridge(x, y, 4, lambdas=(rel,))
        kernel, bias, press, loo = _brute_force(x, y, 4, rel * scale)
        np.testing.assert_allclose(ridge.loo, loo, atol=1e-9)
        np.testing.assert_allclose(ridge.kernel, kernel, atol=1e-9)
        np.testing.assert_allclose(ridge.bias, bias, atol=1e-9)
        assert ridge.press == pytest.approx(press, rel=1e-9)
    chosen = fewshot.fit_ridge(x, y, 4)
    presses = [fewshot.fit_ridge(x, y, 4, lambdas=(r,)).press for r in fewshot.LAMBDAS]
    assert chosen.press == min(presses) and chosen.lam == fewshot.LAMBDAS[int(np.argmin(presses))]


def _clusters(n_per_class: int, *, spread: float, seed: int, classes: int = 5, d: int = 32):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(classes, d)) * 3.0
    labels = np.repeat(np.arange(classes), n_per_class)
    return centres[labels] + spread * rng.normal(size=(len(labels), d)), labels


def test_few_shot_scores_separable_features_high_and_random_ones_at_chance():
    train_x, train_y = _clusters(30, spread=3.0, seed=0)
    eval_x, eval_y = _clusters(40, spread=3.0, seed=1)
    results = fewshot.evaluate(
        train_x, train_y, eval_x, eval_y, shots=(1, 5, 10), seeds=4, num_classes=5
    )
    assert [r.shots for r in results] == [1, 5, 10]
    assert all(len(r.top1) == 4 for r in results)
    assert 0.8 < results[0].mean < results[2].mean and results[2].mean > 0.95
    noise = np.random.default_rng(3).normal(size=eval_x.shape)
    chance = fewshot.evaluate(train_x, train_y, noise, eval_y, shots=(5,), seeds=4, num_classes=5)[
        0
    ]
    assert chance.mean < 0.45  # 5 classes: 20 % expected
    again = fewshot.evaluate(
        train_x, train_y, eval_x, eval_y, shots=(1, 5, 10), seeds=4, num_classes=5
    )
    assert [r.top1 for r in again] == [r.top1 for r in results]  # seeded draws
    assert len(set(results[0].top1)) > 1  # and different ones per seed


def test_draws_take_k_of_each_class_and_shots_that_cannot_be_drawn_say_why():
    labels = np.array([0] * 6 + [1] * 3 + [3] * 8)  # class 2 has no training example
    idx = fewshot.draw(labels, 3, seed=0, classes=[0, 1, 3])
    assert np.bincount(labels[idx], minlength=4).tolist() == [3, 3, 0, 3]
    x = np.random.default_rng(0).normal(size=(len(labels), 6))
    results = fewshot.evaluate(x, labels, x, labels, shots=(2, 4), seeds=2, num_classes=4)
    assert results[0].top1 and "left out: [2]" in results[0].note
    assert not results[1].top1 and results[1].note == "class 1 has 3 training examples"
    assert results[1].row()["top1"] == "-"
    assert fewshot.parse_shots("1, 5,10") == (1, 5, 10)
    for bad in ("", "1,x", "0,5"):
        with pytest.raises(ValueError):
            fewshot.parse_shots(bad)


# ----------------------------------------------------------------------------- a real run


def _config(**values):
    config = config_lib.get_base_config()
    config.update_from_flattened_dict(
        {
            **tiny_config.DIGITS,
            "data.eval_batch_size": 64,
            "optim.strategy": "full",
            "optim.lr": 1e-2,
            "train.steps": 4,
            "train.eval_every": 2,
            "train.checkpoint_every": 2,
            "train.log_every": 2,
            **values,
        }
    )
    return config


@pytest.fixture(scope="module")
def fewshot_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fewshot")
    config = _config()
    config.train.fewshot_shots = (1, 5)
    config.train.fewshot_seeds = 2
    summary = train.train_and_evaluate(config, workdir)
    return workdir, summary


def test_few_shot_during_training_is_logged_at_each_evaluation(fewshot_run):
    workdir, _ = fewshot_run
    rows = {h["step"]: h for h in metrics_io.read_history(workdir) if "fewshot/1shot" in h}
    assert sorted(rows) == [2, 4]
    for row in rows.values():
        assert 0.0 <= row["fewshot/1shot"] <= 1.0 and row["fewshot/5shot_std"] >= 0.0
    assert rows[2]["fewshot/5shot"] != rows[4]["fewshot/5shot"]  # the backbone moved


def test_eval_fewshot_scores_the_chosen_checkpoint_and_reuses_its_features(
    fewshot_run, capsys, monkeypatch
):
    workdir, summary = fewshot_run
    step = summary["best_step"]
    argv = ["tlflax", "eval", "--workdir", str(workdir), "--fewshot", "1,5,1000"]
    assert main.main([*argv, "--fewshot_seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert "+-" in out and "training examples" in out  # 1000 shots cannot be drawn
    (out_dir,) = workdir.glob(f"fewshot_*_step{step}")
    report = json.loads((out_dir / "fewshot.json").read_text())
    got = {r["shots"]: r for r in report["results"]}
    assert got[1000]["top1_mean"] is None and len(got[5]["top1"]) == 2
    # The same features and draws as the evaluation during training at that step.
    logged = {h["step"]: h for h in metrics_io.read_history(workdir) if "fewshot/5shot" in h}
    assert got[5]["top1_mean"] == pytest.approx(logged[step]["fewshot/5shot"], abs=1e-6)

    def no_backbone_pass(*args, **kwargs):
        raise AssertionError("the cached features were not reused")

    monkeypatch.setattr(features, "extract", no_backbone_pass)
    assert main.main([*argv, "--fewshot_seeds", "2"]) == 0
    assert json.loads((out_dir / "fewshot.json").read_text())["results"] == report["results"]


@pytest.mark.parametrize(
    "flag", ["--fewshot=1,x", "--fewshot=0", "--fewshot_seeds=0", "--tta=flip"]
)
def test_bad_fewshot_flags_are_one_line_errors(fewshot_run, flag, capsys):
    workdir, _ = fewshot_run
    argv = ["tlflax", "eval", "--workdir", str(workdir), flag]
    if not flag.startswith("--fewshot="):
        argv.append("--fewshot=1")
    assert main.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag.split("=")[0] in err[0]


def test_bad_fewshot_shots_in_a_config_are_refused(tmp_path):
    config = _config()
    config.train.fewshot_shots = (0, 5)
    with pytest.raises(ConfigError, match="fewshot_shots"):
        train.train_and_evaluate(config, tmp_path)


# ----------------------------------------------------------------------------- ridge head


def test_a_ridge_head_is_the_closed_form_fit_of_the_cached_train_features(tmp_path):
    """weights.head_init='ridge': at step 0 the head is fewshot.linear_head of the frozen
    backbone's cached train features; an lr of 1e-9 keeps it there for one step."""
    import orbax.checkpoint as ocp

    from tlflax import tree
    from tlflax.data import cache

    config = _config(
        **{
            "aug.flip": False,  # the first batch as the features saw it: the eval crop
            "optim.strategy": "linear_probe",
            "optim.lr": 1e-9,
            "train.steps": 1,
            "train.eval_every": 1,
            "train.checkpoint_every": 1,
            "train.log_every": 1,
        }
    )
    config.weights.head_init = "ridge"
    summary = train.train_and_evaluate(config, tmp_path)
    (entry,) = (tmp_path / "cache").glob("features-train-*")
    found = cache.load(entry, dtype=np.float32, ndim=2)
    kernel, bias, info = fewshot.linear_head(found.images, found.labels, 10)
    assert info["train_top1"] > 0.3  # a random resnet_tiny's features still separate digits
    saved = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "1" / "state")
    head = tree.flatten(saved["params"])
    np.testing.assert_allclose(head["head/out/kernel"], kernel, atol=1e-5)
    np.testing.assert_allclose(head["head/out/bias"], bias, atol=1e-5)
    history = metrics_io.read_history(tmp_path)
    (first,) = [h["train/loss"] for h in history if "train/loss" in h]
    assert first < np.log(10) - 0.3  # the zero head's first loss is log(10) exactly
    (entry,) = (tmp_path / "cache").glob("features-eval-*")
    val = cache.load(entry, dtype=np.float32, ndim=2)
    ridge_top1 = np.mean(np.argmax(val.images @ kernel + bias, -1) == val.labels)
    assert summary["final"]["val/top1"] == pytest.approx(ridge_top1, abs=1.5 / len(val.labels))


def test_a_ridge_head_needs_a_linear_head(tmp_path):
    config = _config()
    config.weights.head_init = "ridge"
    config.model.head_hidden = 32
    with pytest.raises(ConfigError, match="fits a linear head"):
        train.train_and_evaluate(config, tmp_path)
    config.weights.head_init = "lstsq"
    with pytest.raises(ConfigError, match="head_init"):
        train.train_and_evaluate(config, tmp_path)
