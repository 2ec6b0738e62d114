"""Workdirs on remote filesystems: gs:// end to end (tests/fake_gcs.py), unknown schemes refused.

`pathlib.Path('gs://b/run')` is a local folder 'gs:/b/run'; these tests fail if any part of
a run (checkpoints, metrics, TensorBoard, reports, caches, eval, predict) writes one.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from tlflax import fs, main

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "tiny_config.py")
FAKE_GCS = str(ROOT / "tests" / "fake_gcs.py")


def _env() -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _tlflax(store, *args) -> list[str]:
    """The tlflax command line, with gs:// stored under `store` (None: plain tlflax)."""
    if store is None:
        return [sys.executable, "-m", "tlflax.main", *args]
    return [sys.executable, FAKE_GCS, str(store), *args]


def _run(cmd, cwd) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400, cwd=cwd)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def _params(workdir: pathlib.Path) -> dict[str, np.ndarray]:
    import orbax.checkpoint as ocp

    from tlflax import tree

    ckpt = workdir / "checkpoints"
    step = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    restored = ocp.StandardCheckpointer().restore(ckpt / str(step) / "state")
    flat = tree.flatten({"params": restored["params"], "batch_stats": restored["batch_stats"]})
    return {k: np.asarray(v) for k, v in flat.items()}


def _losses(workdir: pathlib.Path) -> dict[int, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def _scheme_folders(tmp_path: pathlib.Path) -> list[str]:
    """Folders named after a scheme ('gs:' from pathlib's 'gs://b' -> 'gs:/b'), anywhere in
    the test's folders or the repository's top level (the tests' and users' cwd)."""
    found = [p for p in tmp_path.rglob("*") if p.name in ("gs:", "ftp:")]
    return [str(p) for p in found + [ROOT / "gs:", ROOT / "ftp:"] if p.exists()]


def test_paths_local_remote_and_refused(tmp_path):
    assert str(fs.path("runs/x")) == os.path.abspath("runs/x")
    assert str(fs.path("gs://bucket/run")) == "gs://bucket/run" and fs.is_remote("gs://b/r")
    for bad in ("gcs://bucket/run", "ftp://host/run", "memory://run"):
        with pytest.raises(fs.FileSystemError, match=f"scheme '{bad.split(':')[0]}://'"):
            fs.path(bad, what="workdir")


def test_a_scheme_that_cannot_be_opened_is_one_line_and_no_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["tlflax", "train", "--config", TINY, "--workdir", "ftp://host/run"]
    assert main.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tlflax train: workdir 'ftp://host/run': the scheme 'ftp://'")
    assert len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_gs_workdir_trains_is_killed_resumes_evaluates_and_predicts(tmp_path):
    reference = tmp_path / "reference"
    _run(_tlflax(None, "train", "--config", TINY, "--workdir", str(reference)), cwd=tmp_path)
    store, cwd = tmp_path / "store", tmp_path / "cwd"
    cwd.mkdir()
    workdir, run = "gs://bucket/run", store / "bucket" / "run"
    train = _tlflax(store, "train", "--config", TINY, "--workdir", workdir)

    # Killed once the step-4 checkpoint (the fine-tuning phase's first) is committed.
    proc = subprocess.Popen(
        train, env=_env(), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    committed = run / "checkpoints" / "4" / "commit_success.txt"
    end = time.time() + 300
    while not committed.exists() and proc.poll() is None and time.time() < end:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert committed.exists(), "the run ended (or stalled) before its step-4 checkpoint"
    assert not (run / "summary.json").exists(), "killed too late: the run had finished"

    done = _run(train, cwd=cwd)
    assert "resuming from the checkpoint at step" in done.stderr
    expected, got = _params(reference), _params(run)
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    assert _losses(run) == _losses(reference)
    for name in ("summary.json", "config.json", "data_manifest.json", "reports/curves.png",
                 "reports/eval.json", "reports/errors.png", "optimizer_groups.txt"):  # fmt: skip
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run / "cache").iterdir()), "the data cache lives in the gs:// workdir"

    done = _run(_tlflax(store, "eval", "--workdir", workdir), cwd=cwd)
    summary = json.loads((run / "summary.json").read_text())
    assert f"{100 * summary['final']['val/top1']:.2f} %" in done.stdout
    best = summary["best_step"]
    assert (run / f"eval_val_step{best}" / "eval.json").is_file()
    image = tmp_path / "digit.png"
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(image)
    done = _run(_tlflax(store, "predict", "--workdir", workdir, str(image)), cwd=cwd)
    assert done.stdout.startswith(f"{image}: ") and "%" in done.stdout
    assert _scheme_folders(tmp_path) == []
