"""A real multi-process run: 2 CPU processes x 4 fake devices train one run in one workdir.

The processes meet through jax.distributed (a loopback coordinator, gloo collectives) and run
tests/tiny_config.py for 2 + 2 steps, exactly as `tlflax train` is started on the hosts of a
pod. The run must be the same as 1 process x 8 devices: the same loss curve, one checkpoint
tree written together that a single process restores, and files written by process 0 only.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tlflax import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "tiny_config.py")
# Two steps per phase: a phase switch, two evaluations and two saves, in as little time.
SHORT = [
    "--config.optim.probe_steps=2",
    "--config.optim.finetune_steps=2",
    "--config.train.eval_every=2",
    "--config.train.checkpoint_every=2",
]

# `tlflax train`, recording every file this process opens for writing under the workdir
# (Python-level opens: metrics, TensorBoard, reports, summary; orbax's array data is
# written by tensorstore in C++ and is not seen, which is fine: every process writes its own
# shards). argv: LOG WORKDIR train ...
AUDITED_MAIN = textwrap.dedent(
    """
    import os, sys
    log_fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    root = os.path.abspath(sys.argv[2]) + os.sep
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def hook(event, args):
        if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path, mode, flags = args
        path = os.path.abspath(os.fsdecode(path))
        writes = (flags & WRITE) if isinstance(flags, int) else any(c in mode for c in "wax+")
        if writes and path.startswith(root):
            os.write(log_fd, (path[len(root):] + "\\n").encode())

    sys.addaudithook(hook)
    sys.argv = ["tlflax", *sys.argv[3:]]  # as the tlflax script sees it
    from tlflax import main
    sys.exit(main.main(sys.argv))
    """
)


def _env(n_devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    # Set before the backend starts (tlflax sets it too, in maybe_initialize_distributed).
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir, log, *flags, n_devices: int) -> subprocess.Popen:
    cmd = [sys.executable, "-c", AUDITED_MAIN, str(log), str(workdir), "train"]
    cmd += ["--config", TINY, "--workdir", str(workdir), *SHORT, *flags]
    return subprocess.Popen(
        cmd,
        env=_env(n_devices),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(procs: list[subprocess.Popen], *, timeout: float = 600) -> list[str]:
    """Every process's output; all must exit 0 (a hung peer is killed, not waited on)."""
    outs = []
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out[-4000:]}"
    return outs


def _history(workdir) -> list[dict]:
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line]


def _curve(workdir, key: str) -> dict[int, float]:
    return {h["step"]: h[key] for h in _history(workdir) if key in h}


def _checkpoint_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _checkpoint_arrays(workdir, step: int) -> dict[str, np.ndarray]:
    """params + batch_stats of one checkpoint, restored onto this (single) process's first
    device, whatever topology wrote it."""
    import jax
    import orbax.checkpoint as ocp

    from tlflax import tree

    path = workdir / "checkpoints" / str(step) / "state"
    ckpt = ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        ckpt.metadata(path).item_metadata.tree,
    )
    restored = ckpt.restore(path, target)
    flat = tree.flatten({"params": restored["params"], "batch_stats": restored["batch_stats"]})
    return {k: np.asarray(v) for k, v in flat.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(2 x 4 workdir, 1 x 8 workdir, outputs of processes 0 and 1, files each wrote)."""
    root = tmp_path_factory.mktemp("multiprocess")
    two, one = root / "two_by_four", root / "one_by_eight"
    logs = [root / f"writes_{i}.txt" for i in range(2)]
    port = _free_port()
    distributed = [
        "--config.train.distributed=True",
        f"--config.train.coordinator_address=127.0.0.1:{port}",
        "--config.train.num_processes=2",
    ]
    procs = [
        _start(two, logs[i], *distributed, f"--config.train.process_id={i}", n_devices=4)
        for i in range(2)
    ]
    procs.append(_start(one, root / "writes_single.txt", n_devices=8))
    outs = _finish(procs)
    writes = [set(log.read_text().split()) for log in logs]
    return two, one, outs[:2], writes


@pytest.mark.slow
def test_two_processes_follow_the_one_process_loss_curve(runs):
    two, one, outs, _ = runs
    assert "jax.distributed: process 1 of 2, 4 local / 8 global devices" in outs[1], outs[1][-3000:]
    for key in ("train/loss", "val/loss", "val/top1"):
        a, b = _curve(two, key), _curve(one, key)
        assert sorted(a) == sorted(b) and a, (key, a, b)
        diff = max(abs(a[s] - b[s]) for s in a)
        assert diff <= 1e-4, (key, diff, a, b)
    losses = _curve(two, "train/loss")
    assert sorted(losses) == [1, 2, 3, 4]  # one line per step: process 1 wrote none
    assert losses[4] != losses[1]  # the curves compared are not constant


@pytest.mark.slow
def test_one_checkpoint_tree_written_together_and_restored_by_one_process(runs, capsys):
    two, one, _, _ = runs
    assert _checkpoint_steps(two) == _checkpoint_steps(one) == [2, 4]
    assert [p.name for p in two.rglob("checkpoints")] == ["checkpoints"]  # no per-process tree
    leftovers = [p.name for p in (two / "checkpoints").iterdir() if not p.name.isdigit()]
    assert not [n for n in leftovers if "tmp" in n], leftovers
    a, b = _checkpoint_arrays(two, 4), _checkpoint_arrays(one, 4)
    assert sorted(a) == sorted(b)
    diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert diff <= 1e-4, diff
    # This pytest process: 8 devices, no distributed runtime; `eval` restores the best step.
    summary = json.loads((two / "summary.json").read_text())
    best = summary["best"]
    assert main.main(["tlflax", "eval", "--workdir", str(two)]) == 0
    row = re.search(r"^val +(\d+) +(\d+\.\d+) %", capsys.readouterr().out, re.M)
    assert row, "no result row in the eval output"
    assert (int(row[1]), row[2]) == (best["step"], f"{100 * best['val/top1']:.2f}"), best


@pytest.mark.slow
def test_only_process_zero_writes_the_record_and_prints(runs):
    two, _, outs, writes = runs
    primary = {"metrics.jsonl", "summary.json", "config.json", "run.json"}
    assert primary <= writes[0], sorted(writes[0])
    assert any(w.startswith("reports/") for w in writes[0]), sorted(writes[0])
    assert any(w.startswith("tensorboard/") for w in writes[0]), sorted(writes[0])
    # Process 1 writes its checkpoint shards (orbax), probes that it can write the workdir, and
    # may decode the data cache (an entry written aside, then renamed); nothing else.
    allowed = re.compile(r"checkpoints/.*|\.tlflax_write_check-\w+|cache/[^/]+\.tmp-\d+/.*")
    others = sorted(w for w in writes[1] if not allowed.fullmatch(w))
    assert others == [], others
    table_row = re.compile(r"^finetune +\d+\.\d+ %", re.M)  # the final table
    assert table_row.search(outs[0]), outs[0][-2000:]
    assert not table_row.search(outs[1]), outs[1][-2000:]
    # The log a person follows (a line per interval and per evaluation): process 0's alone.
    progress = re.compile(r"step \d+/4  epoch \S+  phase \w+  validation top-1")
    assert len(progress.findall(outs[0])) == 2, outs[0][-2000:]
    assert not progress.search(outs[1]) and "phase finetune  loss" not in outs[1], outs[1][-2000:]
