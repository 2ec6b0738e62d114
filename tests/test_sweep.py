"""tlflax sweep: the grid (command line and get_sweep()), the checks before any point runs,
point names, the executors (local subprocesses, submitit's local executor, Slurm through
stub sbatch / sacct, printed commands), resuming after a SIGKILL, and what each run records
(summary.json, TensorBoard HParams, the carved validation split's files).

The end-to-end tests train resnet_tiny on sklearn's digits for a few steps per point; they
share one JAX compilation cache and one decoded-data cache (the first point of each
strategy compiles, the others read it back)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tlflax import compare, config_lib, data, main, sweep

try:  # imported here, not under a test's captured output: its log handlers keep the streams
    import submitit
except ImportError:  # the launch extras
    submitit = None
needs_submitit = pytest.mark.skipif(submitit is None, reason="pip install submitit ('.[launch]')")

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "tiny_config.py")
FOLDER = str(ROOT / "configs" / "folder.py")

# The grid of the end-to-end sweeps: 2 strategies x 2 seeds, a few steps each (a checkpoint
# every 2, so that a run killed in its middle has one to resume from).
GRID = ["--set", "optim.strategy=linear_probe,two_phase", "--seeds", "2"]
SHORT = [
    "--config.optim.finetune=last_k",
    "--config.optim.probe_steps=2",
    "--config.optim.finetune_steps=4",
    "--config.train.steps=6",
    "--config.train.eval_every=2",
    "--config.train.checkpoint_every=2",
    "--config.train.bn_mode=frozen",
]
NAMES = [
    "strategy=linear_probe,seed=0",
    "strategy=two_phase,seed=0",
    "strategy=linear_probe,seed=1",
    "strategy=two_phase,seed=1",
]


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    return tmp_path_factory.mktemp("caches")


def _env(caches) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # one device: faster compiles
    env["JAX_COMPILATION_CACHE_DIR"] = str(caches / "jax")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def _sweep_argv(root, caches, *extra) -> list[str]:
    return [
        sys.executable, "-m", "tlflax.main", "sweep", "--config", TINY, "--workdir", str(root),
        *GRID, *SHORT, f"--config.data.cache_dir={caches / 'data'}", *extra,
    ]  # fmt: skip


def _sweep(capsys, *args) -> tuple[int, str, str]:
    """tlflax sweep in this process (checks and the print executor only: nothing trains)."""
    code = main.main(["tlflax", "sweep", *args])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- the grid


def test_values_split_at_top_level_commas_only():
    assert sweep.split_values("a,b, c") == ["a", "b", "c"]
    assert sweep.split_values("(0.1,1.0),(0.5,1.0)") == ["(0.1,1.0)", "(0.5,1.0)"]
    assert sweep.split_values("'x,y',z") == ["'x,y'", "z"]


def test_point_names_are_readable_safe_unique_and_stable(tmp_path):
    grid = sweep.merge_grids(
        sweep.grid_from_config(None, where="x"),
        sweep.grid_from_flags(
            ["optim.lr=1e-3,3e-4", "data.path=/data/a b,/data/c", "train.epochs=2"],
            ["args.model=lite0,lite1", "args.weights=pypi:lite-0,pypi:lite-1"],
            2,
        ),
    )
    points = sweep.make_points(grid, config_arg="c.py:path=x", root=sweep.epath.Path(tmp_path))
    names = [p.name for p in points]
    assert len(names) == 2 * 2 * 2 * 2 and len(set(names)) == len(names)
    assert names[0].startswith("lr=1e-3,path=data_a_b~") and names[0].endswith(
        ",model=lite0,seed=0"
    )
    assert "weights" not in names[0]  # zipped with model, whose values tell the rows apart
    assert all(re.fullmatch(r"[A-Za-z0-9._+=,~-]+", n) for n in names)
    assert points[0].config_arg == "c.py:path=x,model=lite0,weights=pypi:lite-0"
    assert points[0].flags == [
        "--config.train.epochs=2", "--config.optim.lr=1e-3", "--config.data.path=/data/a b",
        "--config.seed=0",
    ]  # fmt: skip
    again = sweep.make_points(grid, config_arg="c.py:path=x", root=sweep.epath.Path(tmp_path))
    assert [p.name for p in again] == names
    one_seed = sweep.merge_grids(sweep.grid_from_config(None, where="x"),
                                 sweep.grid_from_flags(["optim.lr=1e-3"], [], 1))  # fmt: skip
    points = sweep.make_points(one_seed, config_arg="c.py", root=sweep.epath.Path(tmp_path))
    assert [p.name for p in points] == ["seed=0"]  # the name it keeps when --seeds grows
    assert sweep.short_keys(["optim.lr", "optim.finetune_lr", "a.lr"]) == {
        "optim.lr": "optim.lr", "optim.finetune_lr": "finetune_lr", "a.lr": "a.lr"}  # fmt: skip


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", TINY, "--set", "optim.strategyy=linear_probe,last_k"],
         "sweep key 'optim.strategyy': no such config key; did you mean 'optim.strategy'?"),
        (["--config", TINY, "--set", "optim.lr=1e-3,abc"],
         "point lr=abc: flag --config.optim.lr=abc: could not convert string to float"),
        (["--config", TINY, "--zip", "optim.k=1,2.5", "--zip", "optim.lr=1e-3,1e-4"],
         "point k=2.5: flag --config.optim.k=2.5: invalid literal for int()"),
        (["--config", TINY, "--set", "args.aug=true,false"],
         "tiny_config.py ignores its :ARGS"),
        (["--config", f"{FOLDER}:path=/x", "--set", "args.aug=true,maybe"],
         "point aug=maybe: bad config"),
        (["--config", f"{FOLDER}:path=/x", "--set", "args.agu=true,false"],
         "config argument 'agu' is unknown"),
        (["--config", TINY, "--zip", "optim.lr=1,2", "--zip", "optim.k=1,2,3"],
         "--zip lists of different lengths"),
        (["--config", TINY, "--seeds", "2", "--set", "seed=1,2"], "'seed' is given in two places"),
        (["--config", TINY, "--partition", "gpu"], "--partition: a Slurm setting"),
        (["--config", TINY, "--executor", "slurm", "--time", "4h"], "--time='4h': use minutes"),
    ],
)  # fmt: skip
def test_a_bad_key_or_value_fails_before_any_point_runs(capsys, tmp_path, args, message):
    root = tmp_path / "sweep"
    code, _, err = _sweep(capsys, *args, "--workdir", str(root))
    assert code == 2, err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not root.exists()  # nothing written, nothing run


def _config_with_sweep(tmp_path, body: str) -> str:
    path = tmp_path / "swept.py"
    path.write_text(pathlib.Path(TINY).read_text() + "\n\n" + textwrap.dedent(body))
    return str(path)


def test_get_sweep_points_product_zip_and_seeds_with_the_command_line(capsys, tmp_path):
    config = _config_with_sweep(
        tmp_path,
        """
        def get_sweep(arg=None):
            assert arg == "ignored"
            return {
                "points": [{"name": "probe", "optim.strategy": "linear_probe"},
                           {"name": "ft", "optim.strategy": "last_k", "optim.k": 2}],
                "zip": {"optim.lr": [1e-2, 1e-3], "optim.b1": [0.9, 0.8]},
                "seeds": 3,
            }
        """,
    )
    root = tmp_path / "sw"
    code, out, err = _sweep(capsys, "--config", f"{config}:ignored", "--workdir", str(root),
                            "--set", "aug.flip=true,false", "--seeds", "2",
                            "--executor", "print")  # fmt: skip
    assert code == 0, err
    commands = [line for line in out.splitlines() if line.startswith("tlflax train")]
    assert len(commands) == 2 * 2 * 2 * 2  # points x zip x flip x seeds (--seeds replaced 3)
    assert commands[0] == (
        f"tlflax train --config {config}:ignored --workdir {root}/probe,flip=true,lr=0.01,seed=0"
        " --config.optim.strategy=linear_probe --config.aug.flip=true --config.optim.lr=0.01"
        " --config.optim.b1=0.9 --config.seed=0"
    )
    record = json.loads((root / sweep.SWEEP_FILE).read_text())
    assert record["grid"]["seeds"] == [0, 1] and record["grid"]["zip"][0]["optim.b1"] == [0.9, 0.8]
    ft = next(p for p in record["points"] if p["name"] == "ft,flip=false,lr=0.001,seed=1")
    assert ft["overrides"] == {"optim.strategy": "last_k", "optim.k": 2, "optim.lr": 0.001,
                               "optim.b1": 0.8, "aug.flip": "false", "seed": 1}  # fmt: skip
    assert ft["status"] == "pending" and ft["label"] == "ft"


def test_get_sweep_values_are_checked_against_the_keys_types(capsys, tmp_path):
    config = _config_with_sweep(
        tmp_path, 'def get_sweep():\n    return [{"optim.k": 1}, {"optim.k": "two"}]\n'
    )
    code, _, err = _sweep(capsys, "--config", config, "--workdir", str(tmp_path / "r"))
    assert code == 2 and "point k=two: flag --config.optim.k=two: invalid literal" in err


def test_print_executor_lines(capsys, tmp_path):
    code, out, err = _sweep(capsys, "--config", f"{FOLDER}:path=/data", "--workdir",
                            str(tmp_path / "sw"), "--set", "args.aug=true,false", "--executor",
                            "print", "--tpu", "tpu1", "--config.train.steps=5")  # fmt: skip
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("launch/")]
    assert lines == [
        f"launch/tpu_vm.sh run tpu1 {FOLDER}:path=/data,aug=true {tmp_path}/sw/aug=true "
        "--config.train.steps=5",
        f"launch/tpu_vm.sh run tpu1 {FOLDER}:path=/data,aug=false {tmp_path}/sw/aug=false "
        "--config.train.steps=5",
    ]


# ----------------------------------------------------------------------------- Slurm, offline


STUB_SBATCH = """#!/bin/sh
for a in "$@"; do last="$a"; done
cp "$last" "$RECORD/sbatch_$(ls "$RECORD" | wc -l).sh"
echo "Submitted batch job 4242"
"""
STUB_SACCT = """#!/bin/sh
printf 'JobID|State|NodeList\\n4242_0|RUNNING|n1\\n4242_1|FAILED|n2\\n'
"""


@needs_submitit
def test_slurm_array_through_submitit_then_a_rerun_skips_live_jobs(capsys, tmp_path, monkeypatch):
    """Real submitit code against stub srun / sbatch / sacct: one job array, Slurm settings
    from flags and --slurm, job ids recorded; a rerun leaves the running job alone and
    submits the failed one again."""
    stubs, record = tmp_path / "bin", tmp_path / "record"
    stubs.mkdir(), record.mkdir()
    for name, text in (("srun", "#!/bin/sh\n"), ("sbatch", STUB_SBATCH), ("sacct", STUB_SACCT)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{stubs}:{os.environ['PATH']}")
    monkeypatch.setenv("RECORD", str(record))
    root = tmp_path / "sw"
    args = ["--config", TINY, "--workdir", str(root), "--set", "optim.lr=0.01,0.02",
            "--executor", "slurm", "--partition", "gpu", "--nodes", "2", "--gpus_per_node", "4",
            "--time", "1:30:00", "--slurm", "account=lab,per=node,array_parallelism=1",
            "--slurm", "exclusive=true"]  # fmt: skip
    code, out, err = _sweep(capsys, *args)
    assert code == 0, err
    script = (record / "sbatch_0.sh").read_text()
    for line in (
        "--array=0-1%1",
        "--partition=gpu",
        "--account=lab",
        "--nodes=2",
        "--gpus-per-node=4",
        "--ntasks-per-node=1",
        "--time=90",
        "--exclusive\n",
    ):
        assert f"#SBATCH {line}" in script + "\n" or f"#SBATCH {line}" in script, line  # fmt: skip
    points = json.loads((root / sweep.SWEEP_FILE).read_text())["points"]
    assert [(p["status"], p["job_id"]) for p in points] == [
        ("submitted", "4242_0"), ("submitted", "4242_1")]  # fmt: skip
    code, out, err = _sweep(capsys, *args)
    assert code == 0, err
    assert "lr=0.01: job 4242_0 is RUNNING; not submitted again" in out
    assert len(list(record.iterdir())) == 2  # one more job: the failed point alone
    assert "--array" not in (record / "sbatch_1.sh").read_text()
    points = json.loads((root / sweep.SWEEP_FILE).read_text())["points"]
    assert [(p["status"], p["job_id"], p["attempts"]) for p in points] == [
        ("submitted", "4242_0", 1), ("submitted", "4242", 2)]  # fmt: skip


def test_slurm_settings_and_time_formats():
    settings = sweep.slurm_settings({"partition": "a", "time": 30}, {"partition": "b"}, "qos=hi")
    assert settings == {"partition": "b", "time": "30", "qos": "hi"}
    assert sweep.timeout_minutes("1-2:00") == 26 * 60
    with pytest.raises(ValueError, match="--time='4h'"):
        sweep.timeout_minutes("4h")
    with pytest.raises(sweep.SweepError, match="per='socket'"):
        sweep.slurm_settings({}, {}, "per=socket")


# ----------------------------------------------------------------------------- seeds, splits


def _digits_config(**overrides):
    config = config_lib.get_base_config().data
    config.source, config.val_fraction, config.workers = "digits", 0.1, 1
    for key, value in overrides.items():
        config[key] = value
    return config


def test_the_seed_no_longer_moves_the_carved_validation_split(tmp_path):
    build = lambda cfg, seed, name: data.build_datasets(
        cfg, image_size=8, resize=8, seed=seed, workdir=str(tmp_path / name)
    )
    cache = str(tmp_path / "cache")
    first = build(_digits_config(cache_dir=cache), 0, "a")
    other_seed = build(_digits_config(cache_dir=cache), 5, "b")
    other_split = build(_digits_config(cache_dir=cache, split_seed=1), 0, "c")
    files = lambda ds: ds.manifest["splits"]["eval"]["files"]
    assert files(first) == files(other_seed) and len(files(first)) == first.eval.n_examples
    np.testing.assert_array_equal(first.eval.labels, other_seed.eval.labels)
    assert files(other_split) != files(first)
    assert first.manifest["splits"]["train"]["carved"] == {"val_fraction": 0.1, "split_seed": 0}
    # A run's epoch order still follows its seed.
    order = lambda ds: next(ds.train.iterate(global_batch=8, epoch=0, shuffle=True,
                                             drop_remainder=True))["label"]  # fmt: skip
    assert not np.array_equal(order(first), order(other_seed))


def test_a_config_saved_before_split_seed_keeps_the_split_it_trained_on():
    saved = json.loads(config_lib.get_base_config().to_json())
    saved["seed"] = 7
    del saved["data"]["split_seed"]
    assert config_lib.from_json(json.dumps(saved)).data.split_seed == 7


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def swept(tmp_path_factory, caches):
    """An uninterrupted sweep: 2 strategies x 2 seeds, each point a subprocess."""
    root = tmp_path_factory.mktemp("uninterrupted") / "sweep"
    done = subprocess.run(_sweep_argv(root, caches), env=_env(caches), capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return root


def _summaries(root) -> dict:
    return {n: json.loads((root / n / "summary.json").read_text()) for n in NAMES}


@pytest.mark.slow  # 4 training processes (the first of each strategy compiles)
def test_local_sweep_records_points_and_the_compare_table_matches_the_summaries(swept):
    record = json.loads((swept / sweep.SWEEP_FILE).read_text())
    assert [p["name"] for p in record["points"]] == NAMES
    assert {p["status"] for p in record["points"]} == {"done"}
    summaries = _summaries(swept)
    s = summaries["strategy=two_phase,seed=1"]
    assert (s["seed"], s["strategy"], s["resumed_at_step"]) == (1, "two_phase", 0)
    assert s["overrides"]["optim.strategy"] == "two_phase" and s["overrides"]["seed"] == 1
    assert s["config_file"] == TINY
    assert s["dataset"] == {
        "source": "digits", "name": "digits", "num_classes": 10, "n_train": 1618,
        "n_eval": 179, "n_test": None, "eval_split": "carved from train", "split_seed": 0,
    }  # fmt: skip
    assert "==== tlflax sweep: attempt 1" in (swept / NAMES[0] / sweep.LOG_FILE).read_text()

    result = compare.compare([str(swept)])
    assert result.keys == ["optim.strategy"]
    for row in result.rows:
        strategy = row["values"]["optim.strategy"]
        top1 = [summaries[f"strategy={strategy},seed={i}"]["final"]["val/top1"] for i in (0, 1)]
        assert row["n"] == 2 and row["mean"] == pytest.approx(np.mean(top1))
        assert row["std"] == pytest.approx(np.std(top1, ddof=1))
        cell = compare.fmt_stat(np.mean(top1), np.std(top1, ddof=1), percent=True)
        assert f"| {strategy} | 2 | {cell} |" in result.markdown.replace("**", "")
    two_phase = next(r for r in result.rows if r["values"]["optim.strategy"] == "two_phase")
    probes = [summaries[f"strategy=two_phase,seed={i}"]["phases"][0]["val/top1"] for i in (0, 1)]
    assert two_phase["phases"]["linear_probe"][0] == pytest.approx(np.mean(probes))
    out = swept / "compare"
    for name in ("compare.md", "compare.csv", "runs.csv", "compare_bar.png", "compare_curves.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "compare_bar.png").read_bytes()[:4] == b"\x89PNG"


def _events(path):
    from tensorboardX.proto import event_pb2

    raw, out, pos = path.read_bytes(), [], 0
    while pos < len(raw):
        (length,) = struct.unpack("<Q", raw[pos : pos + 8])
        out.append(event_pb2.Event.FromString(raw[pos + 12 : pos + 12 + length]))
        pos += 16 + length
    return out


@pytest.mark.slow  # reads the sweep of the test above
def test_every_run_writes_its_hparams_and_final_metrics(swept):
    pytest.importorskip("tensorboardX")
    workdir = swept / "strategy=two_phase,seed=1"
    summary = json.loads((workdir / "summary.json").read_text())
    hparams = json.loads((workdir / "hparams.json").read_text())
    assert hparams["optim/strategy"] == "two_phase" and hparams["seed"] == 1
    assert hparams["metrics"]["hparams/val_top1"] == pytest.approx(summary["final"]["val/top1"])
    assert hparams["metrics"]["hparams/linear_probe/val_top1"] == pytest.approx(
        summary["phases"][0]["val/top1"]
    )
    events = [e for f in (workdir / "tensorboard" / "hparams").glob("events.*") for e in _events(f)]
    plugins = {v.metadata.plugin_data.plugin_name for e in events for v in e.summary.value}
    assert "hparams" in plugins
    scalars = {v.tag: v.simple_value for e in events for v in e.summary.value if v.tag.startswith(
        "hparams/")}  # fmt: skip
    assert scalars["hparams/val_top1"] == pytest.approx(summary["final"]["val/top1"])


@pytest.mark.slow  # reads the sweep of the test above
def test_repeats_over_the_seed_validate_on_the_same_carved_files(swept):
    manifests = {n: json.loads((swept / n / "data_manifest.json").read_text()) for n in NAMES}
    files = {n: m["splits"]["eval"]["files"] for n, m in manifests.items()}
    assert len(files[NAMES[0]]) == 179
    assert all(f == files[NAMES[0]] for f in files.values())
    curves = [compare.read_run(swept / n).history for n in NAMES[::2]]  # linear_probe, seeds 0, 1
    top1 = [[h["val/top1"] for h in c if "val/top1" in h] for c in curves]
    assert top1[0] != top1[1]  # the seeds do differ: init, data order, augmentation


def _metric_columns(table: str) -> list[list[str]]:
    """The table's cells but wall time and images/s (those of the process that finished)."""
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ")]
    head = rows[0]
    drop = {head.index("wall time")} | {i for i, c in enumerate(head) if c.startswith("images/s")}
    return [[c for i, c in enumerate(r) if i not in drop] for r in rows]


@pytest.mark.slow  # one sweep killed in its third point, then run again: 5 processes
def test_sigkill_in_a_point_then_the_same_command_finishes_as_an_uninterrupted_sweep(
    swept, caches, tmp_path
):
    root = tmp_path / "sweep"
    argv, env = _sweep_argv(root, caches), _env(caches)
    victim = root / NAMES[2]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (victim / "checkpoints" / "2").is_dir():
        assert proc.poll() is None and time.time() < deadline, "the sweep ended before point 3"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    record = json.loads((root / sweep.SWEEP_FILE).read_text())
    child = next(p for p in record["points"] if p["name"] == NAMES[2])
    assert child["status"] == "running"
    _wait_gone(child["pid"])  # the run died with the sweep (no orphan racing the rerun)
    assert not (victim / "summary.json").exists()
    before = {n: (root / n / "summary.json").stat().st_mtime for n in NAMES[:2]}

    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "4 points in" in done.stdout and "(2 finished before, 2 to run)" in done.stdout
    assert {n: (root / n / "summary.json").stat().st_mtime for n in NAMES[:2]} == before
    summaries = _summaries(root)
    assert summaries[NAMES[2]]["resumed_at_step"] >= 2  # from its checkpoint, not step 0
    assert summaries[NAMES[3]]["resumed_at_step"] == 0
    assert (victim / sweep.LOG_FILE).read_text().count("==== tlflax sweep: attempt") == 2
    reference = _summaries(swept)
    for name in NAMES:
        assert summaries[name]["final"] == reference[name]["final"], name
        assert summaries[name]["phases"][-1]["val/top1"] == reference[name]["phases"][-1][
            "val/top1"]  # fmt: skip
    resumed = compare.compare([str(root)]).markdown
    uninterrupted = compare.compare([str(swept)]).markdown
    assert _metric_columns(resumed) == _metric_columns(uninterrupted)


def _wait_gone(pid: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        stat = pathlib.Path(f"/proc/{pid}/stat")
        if stat.exists() and ") Z " in stat.read_text():  # dead, not reaped yet
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} is still running after the sweep was killed")


@needs_submitit
@pytest.mark.slow  # 2 jobs on submitit's local executor (processes)
def test_submitit_local_executor_records_the_failed_point_and_finishes_the_other(caches, tmp_path):
    root = tmp_path / "sweep"
    argv = [
        sys.executable, "-m", "tlflax.main", "sweep", "--config", TINY, "--workdir", str(root),
        "--set", "optim.lr=0.01,-0.01", "--executor", "slurm", "--submitit", "local",
        "--time", "10", "--config.optim.strategy=linear_probe", *SHORT,
        f"--config.data.cache_dir={caches / 'data'}",
    ]  # fmt: skip
    done = subprocess.run(argv, env=_env(caches), capture_output=True, text=True, timeout=900)
    assert done.returncode == 1, (done.stdout + done.stderr)[-4000:]  # one point failed
    points = {p["name"]: p for p in json.loads((root / sweep.SWEEP_FILE).read_text())["points"]}
    assert points["lr=0.01"]["status"] == "done" and (root / "lr=0.01" / "summary.json").exists()
    failed = points["lr=-0.01"]
    assert failed["status"] == "failed" and failed["job_id"]
    assert failed["error"].startswith("tlflax train: ") and "-0.01" in failed["error"]
    assert "failed: lr=-0.01: tlflax train: " in done.stdout
    table = compare.compare([str(root)]).markdown
    assert "| -0.01 | 0 | - |" in table and "1 failed" in table
    assert f"- failed: `lr=-0.01`: {failed['error']}" in table
