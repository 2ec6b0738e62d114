"""The trainer end to end: CLI, reports, devices, processes, SIGKILL + resume, bad input.

Runs go through the real command line (`python -m tlflax.main train ...`) on
tests/tiny_config.py (resnet_tiny on sklearn's digits, 16 px, 4 + 4 steps); most in a
subprocess, so that each can choose its own device count or be killed.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from tlflax import config_lib, experiment, main, optim, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "tiny_config.py")


def _env(n_devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _train_cmd(workdir, *flags) -> list[str]:
    cmd = [sys.executable, "-m", "tlflax.main", "train", "--config", TINY]
    return cmd + ["--workdir", str(workdir), *flags]


def _run(cmd, *, n_devices: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(
        cmd, env=_env(n_devices), capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def _history(workdir) -> list[dict]:
    from tlflax import metrics_io

    return metrics_io.read_history(workdir)


def _train_losses(workdir) -> dict[int, float]:
    return {h["step"]: h["train/loss"] for h in _history(workdir) if "train/loss" in h}


def _final_params(workdir) -> tuple[dict[str, np.ndarray], int]:
    """The last checkpoint's params and batch_stats, flattened, as numpy (no model needed)."""
    import orbax.checkpoint as ocp

    ckpt_dir = pathlib.Path(workdir) / "checkpoints"
    step = max(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    restored = ocp.StandardCheckpointer().restore(ckpt_dir / str(step) / "state")
    from tlflax import tree

    flat = tree.flatten({"params": restored["params"], "batch_stats": restored["batch_stats"]})
    return {k: np.asarray(v) for k, v in flat.items()}, step


def _n_eval(workdir) -> int:
    manifest = json.loads((pathlib.Path(workdir) / "data_manifest.json").read_text())
    return manifest["splits"]["eval"]["n_images"]


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    done = _run(_train_cmd(workdir))
    return workdir, done.stdout, done.stderr


def test_run_writes_the_record_and_reports(finished_run):
    workdir, stdout, _ = finished_run
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["model"] == "resnet_tiny"
    assert [r["strategy"] for r in summary["phases"]] == ["linear_probe", "finetune"]
    n = summary["final"]["n"]
    assert n == _n_eval(workdir) > 170  # 10 % of the 1,797 digits, each exactly once
    assert summary["final"]["errors"] == round((1 - summary["final"]["val/top1"]) * n)
    assert f"/{n}" in stdout and "linear_probe" in stdout and "finetune" in stdout
    for name in ("config.json", "classes.json", "preprocessing.json", "data_manifest.json"):
        assert (workdir / name).is_file(), name
    for name in ("curves.png", "confusion.png", "errors.png", "eval.json", "per_class.csv"):
        assert (workdir / "reports" / name).is_file(), name
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    losses = _train_losses(workdir)
    assert sorted(losses) == list(range(1, 9))
    # The new head starts at zero: the first step's loss is log(10) exactly (to float32).
    assert losses[1] == pytest.approx(math.log(10), abs=1e-5)
    lrs = [h for h in _history(workdir) if any(k.startswith("lr/") for k in h)]
    assert {"lr/head"} <= set(lrs[0]) and "lr/stage0" in lrs[-1]
    assert all("train/images_per_sec" in h for h in _history(workdir) if "train/loss" in h)
    evals = {h["step"]: h for h in _history(workdir) if "val/top1" in h}
    assert sorted(evals) == [4, 8]  # eval_every=4
    assert all(0 <= e["val/top1"] <= e["val/top5"] <= 1 for e in evals.values())
    best = max(evals.values(), key=lambda h: h["val/top1"])
    assert summary["best"]["val/top1"] == best["val/top1"] and summary["best_step"] in evals
    assert summary["final"]["val/top5"] == evals[8]["val/top5"]
    assert re.fullmatch(r"[0-9a-f]{8,64}", summary["config_hash"])
    assert summary["wall_time_s"] > 0 and summary["steps_per_epoch"] >= 1


def test_log_without_a_terminal_has_a_line_per_interval_and_per_evaluation(finished_run):
    """A run under Slurm / nohup / CI (stderr is a pipe) says how it goes, as it goes."""
    workdir, _, stderr = finished_run
    evals = re.findall(r"step (\d+)/8  epoch \S+  phase (\w+)  validation top-1 (\S+)", stderr)
    top1 = {h["step"]: h["val/top1"] for h in _history(workdir) if "val/top1" in h}
    assert [(int(s), p) for s, p, _ in evals] == [(4, "linear_probe"), (8, "finetune")]
    assert [float(t) for *_, t in evals] == [
        pytest.approx(top1[4], abs=1e-4),
        pytest.approx(top1[8], abs=1e-4),
    ]
    intervals = re.findall(r"step (\d+)/8  epoch .* loss \S+  lr \S+  \S+ images/s  ETA", stderr)
    assert [int(s) for s in intervals] == list(range(1, 9))  # log_every=1
    assert "\r" not in stderr  # no progress bar without a terminal


def test_eval_and_predict_restore_the_best(finished_run, tmp_path, capsys):
    workdir, *_ = finished_run
    assert main.main(["tlflax", "eval", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "errors" in out and f"/{_n_eval(workdir)}" in out
    good = tmp_path / "digit.png"
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(good)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    argv = ["tlflax", "predict", "--workdir", str(workdir), "--top_k", "3", str(bad), str(good)]
    assert main.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"{bad}: cannot read image")
    assert lines[1].startswith(f"{good}: ") and lines[1].count("%") == 3


def test_eval_and_predict_of_a_run_whose_weights_source_is_gone(
    finished_run, tmp_path, monkeypatch
):
    """A finished run is evaluated from its workdir alone: the weights source it started
    from (a wheel, a hub cache, a file) is never looked up again."""
    from tlflax import weights as weights_lib

    workdir = tmp_path / "run"
    shutil.copytree(finished_run[0], workdir)
    saved = json.loads((workdir / "config.json").read_text())
    saved["weights"]["source"] = str(tmp_path / "gone" / "resnet_tiny.pth")  # deleted since
    (workdir / "config.json").write_text(json.dumps(saved))

    def gone(*args, **kwargs):
        raise AssertionError("the weights source was looked up")

    for name in ("peek_preprocessing", "load_pretrained"):
        monkeypatch.setattr(weights_lib, name, gone)
    assert main.main(["tlflax", "eval", "--workdir", str(workdir)]) == 0
    image = tmp_path / "digit.png"
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(image)
    assert main.main(["tlflax", "predict", "--workdir", str(workdir), str(image)]) == 0


def _colour_folder(root: pathlib.Path) -> dict[str, int]:
    """train/ and test/ folders of three noisy solid colours (easy, but not at once)."""
    rng = np.random.default_rng(0)
    colours = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    sizes = {"train": 16, "test": 5}
    for split, n in sizes.items():
        for name, rgb in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.array(rgb) + rng.normal(0, 60, (20, 20, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return {split: n * len(colours) for split, n in sizes.items()}


@pytest.mark.slow
def test_a_train_plus_val_folder_validates_on_val_through_the_cli(tmp_path):
    """The PyTorch tutorial's layout, as a user types the command: every file of val/
    validates and none is carved out of train/ (the folder config's val_fraction is auto)."""
    sizes = _colour_folder(tmp_path / "photos")
    (tmp_path / "photos" / "test").rename(tmp_path / "photos" / "val")
    workdir = tmp_path / "run"
    config = f"configs/folder.py:path={tmp_path / 'photos'},runlocal"
    cmd = [sys.executable, "-m", "tlflax.main", "train", "--config", config]
    done = _run([*cmd, "--workdir", str(workdir), "--config.model.name=resnet_tiny"])
    manifest = json.loads((workdir / "data_manifest.json").read_text())
    assert manifest["roles"]["eval"] == str(tmp_path / "photos" / "val")
    assert manifest["roles"]["test"] is None and manifest["roles"]["unused"] == []
    assert manifest["splits"]["eval"]["n_images"] == sizes["test"]  # all of val/
    assert manifest["splits"]["train"]["n_images"] == sizes["train"]  # nothing carved
    assert f"/{sizes['test']}" in done.stdout
    assert "not used" not in done.stderr


@pytest.mark.slow
def test_eval_restores_the_best_not_the_latest_and_takes_a_split(tmp_path, capsys):
    """A fine-tune at lr 1 spoils the probe: the best checkpoint (by val top-1) is the one at
    the phase switch, not the last. `eval --split test` then reads the held-out folder
    instead of the validation split carved out of train/, and leaves the run's own data
    report alone. The run itself evaluated test/ once at its end, on that same checkpoint:
    a final, separate test evaluation that model selection never saw."""
    sizes = _colour_folder(tmp_path / "photos")
    workdir = tmp_path / "run"
    flags = [
        "--config.data.source=folder",
        f"--config.data.path={tmp_path / 'photos'}",
        "--config.data.val_fraction=0.25",
        "--config.data.batch_size=8",
        "--config.train.eval_every=2",
        "--config.optim.finetune_lr=1.0",
    ]
    done = _run(_train_cmd(workdir, *flags))
    top1 = {h["step"]: h["val/top1"] for h in _history(workdir) if "val/top1" in h}
    assert sorted(top1) == [2, 4, 6, 8]  # a checkpoint with metrics at each of them
    best = max(top1, key=lambda s: (top1[s], s))  # orbax: the latest of equal values
    assert best != 8, top1  # else this test would not tell best from latest
    test = json.loads((workdir / "summary.json").read_text())["test"]
    assert (test["split"], test["step"], test["n"]) == ("test", best, sizes["test"])
    assert f"test: test (step {best})  {100 * test['top1']:.2f} %" in done.stdout
    errors = json.loads((workdir / f"eval_test_step{best}" / "eval.json").read_text())["errors"]
    assert len(errors) == test["errors"]
    for err in errors:  # each misclassified file, found on disk, in its true class's folder
        path = pathlib.Path(err["file"])
        assert path.is_file() and path.parent.name == err["true"], err
    manifest = (workdir / "data_manifest.json").read_text()
    n_val = round(0.25 * sizes["train"])

    assert main.main(["tlflax", "eval", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert f"reports in {workdir / f'eval_val_step{best}'}" in out
    assert f"{100 * top1[best]:.2f} %" in out and f"/{n_val}" in out

    assert main.main(["tlflax", "eval", "--workdir", str(workdir), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert f"/{sizes['test']}" in out and f"{100 * test['top1']:.2f} %" in out
    report = workdir / f"eval_test_step{best}"
    assert (
        json.loads((report / "data_manifest.json").read_text())["splits"]["eval"]["n_images"]
        == sizes["test"]
    )
    assert (workdir / "data_manifest.json").read_text() == manifest

    assert main.main(["tlflax", "eval", "--workdir", str(workdir), "--split", "nope"]) == 2
    assert "has no 'nope' folder (found ['test', 'train'])" in capsys.readouterr().err


def test_a_tie_in_validation_top1_gives_one_best_step_everywhere(tmp_path):
    """Ties go to the latest of equal values, as orbax ranks them: the step the summary's
    best_step and best, the final test split, eval, predict and export all use."""
    from tlflax import checkpointing

    ckpt = checkpointing.Checkpointer(
        tmp_path / "ckpt", keep_last=1, keep_best=3, best_metric="val/top1", best_mode="max",
        async_save=False,
    )  # fmt: skip
    history = []
    for step, top1 in ((2, 0.5), (4, 0.75), (6, 0.75), (8, 0.6)):
        ckpt.save(step, {"x": np.zeros(3, np.float32) + step}, metrics={"val/top1": top1})
        history += [{"step": step, "train/loss": 1.0}, {"step": step, "val/top1": top1}]
    assert experiment.chosen_step(ckpt) == 6
    assert train._metrics_at(history, experiment.chosen_step(ckpt)) == {"step": 6, "val/top1": 0.75}
    ckpt.close()

    ckpt = checkpointing.Checkpointer(
        tmp_path / "ckpt", keep_last=1, keep_best=3, best_metric="val/top1", best_mode="max",
        async_save=False,
    )  # fmt: skip
    assert experiment.need_chosen_step(ckpt, tmp_path) == 6  # eval / predict, after a restart
    ckpt.close()


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_parameters(finished_run, tmp_path):
    """model.compute_dtype='bfloat16': the step computes in bf16, the checkpointed parameters,
    BatchNorm statistics and the loss curve stay float32 and near the float32 run's."""
    reference, *_ = finished_run
    workdir = tmp_path / "bf16"
    _run(_train_cmd(workdir, "--config.model.compute_dtype=bfloat16"))
    params, step = _final_params(workdir)
    assert step == 8
    assert {str(v.dtype) for v in params.values()} == {"float32"}
    fp32, bf16 = _train_losses(reference), _train_losses(workdir)
    assert sorted(bf16) == sorted(fp32) == list(range(1, 9))
    assert bf16[1] == pytest.approx(math.log(10), abs=1e-5)  # zero head: logits exactly 0
    diffs = {s: abs(bf16[s] - fp32[s]) for s in fp32}
    assert 0 < max(diffs.values()) < 0.05, diffs  # bf16 really ran, and stayed close


# ----------------------------------------------------------------------------- devices


@pytest.mark.slow
def test_one_device_and_eight_give_the_same_loss_curve(tmp_path):
    """1 device; 8 on the data axis; 4 data x 2 model with the large leaves split (resnet_tiny
    has none of the default 2**18 values, hence shard_min_size=1024)."""
    steps = ["--config.optim.probe_steps=10", "--config.optim.finetune_steps=10"]
    steps += ["--config.train.eval_every=20"]
    one, eight, split = tmp_path / "one", tmp_path / "eight", tmp_path / "split"
    _run(_train_cmd(one, *steps), n_devices=1)
    _run(_train_cmd(eight, *steps), n_devices=8)
    mesh = ["--config.train.mesh_model=2", "--config.train.shard_min_size=1024"]
    done = _run(_train_cmd(split, *steps, *mesh), n_devices=8)
    layout = re.search(r"mesh (\{.*?\}); parameters split over 'model': (\d+) of", done.stderr)
    assert layout, done.stderr[-3000:]
    assert layout.group(1) == "{'data': 4, 'model': 2}" and int(layout.group(2)) >= 5
    a, b, c = _train_losses(one), _train_losses(eight), _train_losses(split)
    assert sorted(a) == sorted(b) == sorted(c) == list(range(1, 21))
    for other in (b, c):
        diff = max(abs(a[s] - other[s]) for s in a)
        assert diff <= 1e-4, (diff, a, other)
    assert a[20] < a[1]  # it learns, so the curves compared are not flat


@pytest.mark.slow
def test_accumulation_and_gradual_unfreezing_give_one_curve_on_every_mesh(tmp_path):
    """optim.accum_steps=2 under gradual unfreezing (moments carried over two switches, each
    stage's state sharded like its leaves) on 1 device, 8 on the data axis and 4 x 2."""
    flags = ["--config.optim.strategy=gradual", "--config.optim.k=2"]
    flags += ["--config.optim.unfreeze_steps=6", "--config.train.steps=16"]
    flags += ["--config.optim.accum_steps=2", "--config.train.eval_every=16"]
    one, eight, split = tmp_path / "one", tmp_path / "eight", tmp_path / "split"
    _run(_train_cmd(one, *flags), n_devices=1)
    _run(_train_cmd(eight, *flags), n_devices=8)
    mesh = ["--config.train.mesh_model=2", "--config.train.shard_min_size=1024"]
    _run(_train_cmd(split, *flags, *mesh), n_devices=8)
    a, b, c = _train_losses(one), _train_losses(eight), _train_losses(split)
    assert sorted(a) == sorted(b) == sorted(c) == list(range(1, 17))
    for other in (b, c):
        diff = max(abs(a[s] - other[s]) for s in a)
        assert diff <= 1e-4, (diff, a, other)
    assert a[16] < a[1]
    table = (one / "optimizer_groups.txt").read_text()
    assert table.count(optim.CARRY_NOTE) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- kill + resume


def _wait_for(predicate, proc, *, timeout=300.0, poll=0.002):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def _logged_steps(workdir) -> int:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line]
    return max(steps, default=0)


def _saving(workdir) -> bool:
    ckpt = pathlib.Path(workdir) / "checkpoints"
    return ckpt.is_dir() and any(p.name.endswith("orbax-checkpoint-tmp") for p in ckpt.iterdir())


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bitwise_identical(tmp_path):
    reference = tmp_path / "reference"
    _run(_train_cmd(reference))
    expected, last = _final_params(reference)
    assert last == 8

    # Killed at a random step of the fine-tuning phase (steps 5..8), and during the first
    # asynchronous save (step 2, feature extraction): resume works on both sides of the switch.
    kill_at = random.Random(os.getpid()).randint(5, 7)
    for name, killed_when in (("in_training", "step"), ("in_a_save", "save")):
        workdir = tmp_path / name
        proc = subprocess.Popen(
            _train_cmd(workdir),
            env=_env(1),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        )
        if killed_when == "step":
            hit = _wait_for(lambda w=workdir: _logged_steps(w) >= kill_at, proc)
        else:
            hit = _wait_for(lambda w=workdir: _saving(w), proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert hit, f"{name}: the run ended before it could be killed"
        if killed_when == "save":
            assert _saving(workdir), "the kill landed after the save had finished"
        _run(_train_cmd(workdir))  # the same command resumes
        got, last = _final_params(workdir)
        assert last == 8
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{name}: {key}")
        losses, ref_losses = _train_losses(workdir), _train_losses(reference)
        assert losses == ref_losses  # the replayed steps' records replace the first ones

    # The kill during the first save mostly leaves no complete checkpoint (the rerun starts
    # from step 0), so resume from inside feature extraction is also tested for certain: the
    # reference's workdir cut back to its step-2 checkpoint, as if stopped at step 3.
    cut = tmp_path / "from_step2"
    shutil.copytree(reference, cut)
    for path in (cut / "checkpoints").iterdir():
        if path.name.isdigit() and int(path.name) > 2:
            shutil.rmtree(path)
    done = _run(_train_cmd(cut))
    assert "resuming from the checkpoint at step 2" in done.stderr
    got, last = _final_params(cut)
    assert last == 8
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=f"from step 2: {key}")


# ----------------------------------------------------------------------------- bad input


def test_unknown_config_key_is_named(tmp_path, capsys):
    argv = ["tlflax", "train", "--config", TINY, "--workdir", str(tmp_path)]
    assert main.main(argv + ["--config.model.num_clases=3"]) == 2
    assert "num_clases" in capsys.readouterr().err


def test_unknown_key_in_a_config_file_is_named(tmp_path, capsys):
    """The base config is locked before a config file edits it: a typo there is an error
    that names the key and the file's line, not a new key nobody reads."""
    cfg = tmp_path / "typo.py"
    cfg.write_text(
        "from tlflax import config_lib\n"
        "def get_config(arg=None):\n"
        "    c = config_lib.get_base_config()\n"
        "    c.model.overrides.pool = 'gap'  # family options stay free-form\n"
        "    c.optim.finetune_epoch = 8.0\n"
        "    return config_lib.lock(c)\n"
    )
    argv = ["tlflax", "train", "--config", str(cfg), "--workdir", str(tmp_path / "w")]
    assert main.main(argv) == 2
    err = capsys.readouterr().err
    assert f"bad config ({cfg}:5)" in err
    assert 'Did you mean "finetune_epochs"' in err
    assert "Other fields present" not in err
    assert not (tmp_path / "w").exists()


def test_num_classes_that_disagrees_with_the_data(tmp_path):
    config = config_lib.get_base_config()
    config.update_from_flattened_dict(
        {"data.source": "digits", "data.val_fraction": 0.1, "data.image_size": 16}
    )
    config.model.name = "resnet_tiny"
    config.model.num_classes = 7
    with pytest.raises(ValueError, match=r"num_classes=7 but the data has 10 classes"):
        experiment.from_config(config, tmp_path)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"optim.strategy": "last_k", "optim.k": 9}, "k=9 but resnet_tiny has 5 stages"),
        ({"train.bn_mode": "Train"}, "bn_mode='Train'; use one of \\('frozen', 'train'\\)"),
        ({"train.select_ema": True}, "select_ema=True picks checkpoints by the EMA weights"),
    ],
)
def test_bad_config_fails_before_the_data_is_read(tmp_path, values, message):
    config = config_lib.get_base_config()
    config.model.name = "resnet_tiny"
    config.data.update({"source": "folder", "path": str(tmp_path / "no_such_folder")})
    config.update_from_flattened_dict(values)
    with pytest.raises(ValueError, match=message):  # not the DataError about the folder
        experiment.from_config(config, tmp_path)
    assert not (tmp_path / "data_manifest.json").exists()


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    """Saves every step, logs rarely, keeps 2: the NaN must still be caught before any save,
    so a finite checkpoint from before the bad step survives retention."""
    config = config_lib.get_base_config()
    config.update_from_flattened_dict(
        {
            "model.name": "resnet_tiny",
            "data.source": "digits",
            "data.val_fraction": 0.1,
            "data.image_size": 16,
            "data.batch_size": 16,
            "optim.strategy": "full",
            "optim.name": "sgd",
            "optim.lr": 1e30,
            "train.steps": 8,
            "train.log_every": 100,
            "train.checkpoint_every": 1,
            "train.keep_last": 2,
            "train.async_checkpoints": True,
        }
    )
    with pytest.raises(
        FloatingPointError,
        match=r"(training (loss|grad_norm) is \S+ at|is not finite after) step \d+",
    ) as info:
        train.train_and_evaluate(config, tmp_path)
    message = info.value.args[0]
    bad_step = int(message.split("step ")[1].split(";")[0])
    ckpts = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert ckpts, "the last good checkpoint was not kept"
    assert all(step < bad_step for step in ckpts)  # nothing from the bad step on was kept
    params, _ = _final_params(tmp_path)
    assert all(np.isfinite(v).all() for v in params.values())


@pytest.mark.slow
def test_a_plan_of_hand_written_phases_trains_phase_after_phase(tmp_path):
    """optim.phases: groups written by hand, two phases (refused before the plan table)."""
    config = config_lib.get_base_config()
    config.update_from_flattened_dict(
        {
            "model.name": "resnet_tiny",
            "data.source": "digits",
            "data.val_fraction": 0.1,
            "data.image_size": 16,
            "data.batch_size": 16,
            "optim.strategy": "",
            "train.log_every": 1,
            "train.checkpoint_every": 100,
        }
    )
    config.optim.phases = (
        dict(name="head", groups=(("head/.*", {}), (".*", None)), steps=2),
        dict(name="top", groups=(("(head|backbone/stage4)/.*", {}), (".*", None)), steps=3),
    )
    summary = train.train_and_evaluate(config, tmp_path)
    assert [(r["strategy"], r["step"]) for r in summary["phases"]] == [("head", 2), ("top", 5)]
    assert summary["steps"] == 5
    ckpts = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts == [2, 5]  # each phase's end
    table = (tmp_path / "optimizer_groups.txt").read_text()
    assert "phase head (steps 0..2)" in table and "phase top (steps 2..5)" in table
    lrs = {h["step"]: h for h in _history(tmp_path) if "train/loss" in h}
    assert sorted(lrs) == [1, 2, 3, 4, 5] and "lr/rule0" in lrs[5]


def test_saves_fall_each_epoch_but_a_cached_probe_saves_at_its_end():
    """A cached probe's epochs take milliseconds and a checkpoint holds the whole model:
    by default it saves at its end only; train.checkpoint_every still applies to it."""
    c = config_lib.get_base_config().train

    def saves(kind, end, every):
        due = [every.due(s, phase_end=s == end, kind=kind) for s in range(1, end + 1)]
        return [s for s, d in enumerate(due, 1) if d.save], [
            s for s, d in enumerate(due, 1) if d.eval
        ]

    every = train.Periodic.from_config(c, steps_per_epoch=3)
    assert saves("train", 9, every) == ([3, 6, 9], [3, 6, 9])
    assert saves("cached_probe", 9, every) == ([9], [3, 6, 9])  # evaluated each epoch still
    c.checkpoint_every = 2
    every = train.Periodic.from_config(c, steps_per_epoch=3)
    assert saves("cached_probe", 5, every)[0] == saves("train", 5, every)[0] == [2, 4, 5]


def test_the_finite_check_before_a_save_reads_what_the_phase_changes():
    import jax.numpy as jnp

    from tlflax import state

    nan = jnp.array([np.nan], jnp.float32)
    st = state.TrainState(
        step=jnp.array(3),
        params={"backbone": {"w": nan}, "head": {"w": jnp.ones(2)}},  # a frozen NaN ...
        batch_stats={"backbone": {"mean": nan}},
        opt_state=(jnp.ones(2),),
        rng=jnp.zeros(2, jnp.uint32),
    )
    trainable = {"backbone": {"w": False}, "head": {"w": True}}
    # ... that no step of the phase wrote: the loss would have shown it (tested above).
    train.check_finite_state(st, 3, trainable=trainable, bn_train=False)
    with pytest.raises(train.NonFiniteLossError, match="not finite after step 3"):
        train.check_finite_state(st, 3, trainable=trainable, bn_train=True)  # BatchNorm trains
    for bad in (
        st.replace(params={**st.params, "head": {"w": jnp.array([1.0, np.inf])}}),
        st.replace(opt_state=(jnp.array([np.nan, 0.0]),)),
    ):
        with pytest.raises(train.NonFiniteLossError, match="not finite after step 3"):
            train.check_finite_state(bad, 3, trainable=trainable, bn_train=False)


def test_the_finite_check_on_the_host_and_on_the_device_agree():
    """CPU arrays are checked by numpy in place, others by a jitted reduction: the same
    answers, bfloat16 leaves and integer leaves (skipped) included."""
    import jax
    import jax.numpy as jnp

    ok = {"a": jnp.ones((3, 2)), "b": jnp.ones(4, jnp.bfloat16), "n": jnp.arange(3)}
    trees = [ok, {**ok, "a": ok["a"].at[1, 1].set(np.inf)}, {**ok, "b": ok["b"].at[0].set(np.nan)}]
    for tree, expected in zip(trees, (True, False, False), strict=True):
        assert train._state_is_finite(tree) is expected
        leaves = [x for x in jax.tree_util.tree_leaves(tree) if x.dtype != jnp.int32]
        assert bool(train._device_state_is_finite(leaves)) is expected
    assert train._in_host_memory(ok["a"])


def test_a_step_on_the_heads_part_of_the_state_is_the_step_on_the_whole_state():
    """What a cached probe's jitted step carries (state.head_part: no backbone, no
    statistics) gives the head, optimizer state (clipping, EMA) and metrics of a step on
    the whole state; the learning rate in the metrics is the schedule's at the new step."""
    import jax

    from tlflax import features, losses, state
    from tlflax.models import create_model

    config = config_lib.get_base_config()
    config.optim.update({"strategy": "linear_probe", "grad_clip_norm": 0.5, "ema_decay": 0.9,
                         "warmup_steps": 2})  # fmt: skip
    config.train.steps = 6
    spec = create_model("resnet_tiny", num_classes=3, head_hidden=4)
    variables = spec.init(jax.random.key(0), 16)
    (phase,) = optim.make_phases(
        config.optim, train_config=config.train, params=variables["params"], spec=spec,
        steps_per_epoch=2,
    )  # fmt: skip

    def apply_fn(v, feats, *, train, bn_train, rngs):
        return features.head_logits(spec.module, v, feats, train=train, rngs=rngs)

    step = jax.jit(train.make_train_step(
        apply_fn=apply_fn, loss_fn=losses.softmax_xent, tx=phase.tx,
        train_transform=lambda rng, x, y: (x, jax.nn.one_hot(y, 3)),
        trainable=phase.trainable, bn_train=False, lr_fns=phase.lr_fns,
    ))  # fmt: skip
    whole = state.create(variables=variables, tx=phase.tx, seed=0)
    part = state.head_part(whole)
    assert not jax.tree_util.tree_leaves(part.params["backbone"]) and part.batch_stats == {}
    rng = np.random.default_rng(0)
    for i in range(1, 4):
        batch = {"image": rng.normal(size=(8, spec.feature_dim)).astype(np.float32),
                 "label": rng.integers(0, 3, 8), "mask": np.ones(8, bool)}  # fmt: skip
        whole, m_whole = step(whole, batch)
        part, m_part = step(part, batch)
        assert float(m_part["lr"]["head"]) == pytest.approx(float(phase.lr_fns["head"](i)))
        assert float(m_part["lr"]["head"]) == float(m_whole["lr"]["head"])
        np.testing.assert_allclose(float(m_part["loss"]), float(m_whole["loss"]), rtol=1e-6)
    joined = state.with_head(whole, part)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        (joined.params, joined.opt_state, joined.step), (whole.params, whole.opt_state, whole.step),
    )  # fmt: skip
    assert optim.ema_params(joined.params, joined.opt_state) is not None


def _tiny_config():
    return config_lib.load(TINY)


def _losses(workdir) -> list[float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.mark.parametrize("probe", ["in_loop", "cached"])
def test_the_next_phases_step_compiles_in_the_background_to_the_same_run(
    probe, tmp_path, monkeypatch, caplog
):
    """two_phase: the fine-tuning step compiles while the probe trains (on images, or on
    cached features: the image batch's shapes then come from the train split) and is the
    one the fine-tuning phase runs; the run is the one it is without compiling ahead,
    bitwise."""
    import logging

    caplog.set_level(logging.INFO, logger="tlflax")

    def config():
        c = _tiny_config()
        c.optim.probe = probe
        return c

    compiled = []
    step_ahead = train._StepAhead.__call__

    def spy(self, st, batch):
        out = step_ahead(self, st, batch)
        compiled.append(self.fn is not self.jitted)
        return out

    monkeypatch.setattr(train._StepAhead, "__call__", spy)
    ahead = train.train_and_evaluate(config(), tmp_path / "ahead")
    assert "phase finetune: its step compiled in the background" in caplog.text
    assert compiled == [True] * 4  # the 4 fine-tuning steps, all on the compiled-ahead step

    monkeypatch.setattr(train, "_compiles_ahead", lambda *args: False)
    plain = train.train_and_evaluate(config(), tmp_path / "plain")
    assert len(compiled) == 4  # no _StepAhead without a step compiled ahead
    assert _losses(tmp_path / "ahead") == _losses(tmp_path / "plain")
    assert ahead["final"] == plain["final"]


def test_no_image_batch_is_read_ahead_from_a_streaming_split():
    """A split that streams opens one pipeline per run: the fine-tuning step is then not
    compiled ahead of a cached probe (no spec), rather than opening it to look."""
    import types

    run = types.SimpleNamespace(datasets=types.SimpleNamespace(train=types.SimpleNamespace(
        train_stream=lambda **kw: (_ for _ in ()).throw(AssertionError("opened"))
    )))  # fmt: skip
    assert train._image_batch_spec(run) is None


def test_a_run_with_model_remat_trains_the_same(tmp_path):
    """model.remat through the trainer: the same losses and result as without."""
    results = {}
    for remat in (False, True):
        config = _tiny_config()
        config.model.remat = remat
        results[remat] = train.train_and_evaluate(config, tmp_path / str(remat))
    np.testing.assert_allclose(
        _losses(tmp_path / "True"), _losses(tmp_path / "False"), rtol=1e-5, atol=1e-6
    )
    assert results[True]["final"]["val/top1"] == results[False]["final"]["val/top1"]


def test_a_step_compiled_ahead_that_failed_or_does_not_fit_is_compiled_then(caplog):
    """_StepAhead falls back to the phase's own jitted step: when compiling ahead raised
    (a warning), when it was compiled for other shardings, or when the state's avals
    differ from those it was compiled for (the call is refused before it runs)."""
    import logging
    from concurrent import futures

    def ready(value=None, error=None):
        f = futures.Future()
        f.set_exception(error) if error else f.set_result(value)
        return f

    jitted = lambda st, batch: ("jitted", st)  # noqa: E731
    compiled = lambda st, batch: ("ahead", st)  # noqa: E731

    def refuses(st, batch):
        raise TypeError("Argument types differ from the types for which this was compiled")

    cases = [
        (ready((compiled, "sh")), "ahead"),
        (ready(error=RuntimeError("XLA ran out of host memory")), "jitted"),
        (ready((compiled, "other")), "jitted"),
        (ready((refuses, "sh")), "jitted"),
    ]
    caplog.set_level(logging.WARNING, logger="tlflax")
    for future, expected in cases:
        step = train._StepAhead(future, jitted, "sh", "finetune")
        assert step(1, None) == (expected, 1) and step(2, None) == (expected, 2)
    assert "compiling its step ahead failed (RuntimeError: XLA ran out of" in caplog.text
