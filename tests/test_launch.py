"""The launchers in launch/, offline: SkyPilot task files through SkyPilot's own parser and
their setup / run scripts executed against stub commands, the Slurm launcher's mapping to
submitit plus a real 2-process job on submitit's local executor, and tpu_vm.sh's DRY_RUN
commands (the remote run / stop commands executed here, on a fake home)."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SKY_FILES = sorted(p.name for p in (LAUNCH / "skypilot").glob("*.yaml"))
STUB = (  # NAME<TAB>ARG<TAB>ARG... per call
    '#!/bin/sh\n{ printf %s "$(basename "$0")"; for a in "$@"; do printf "\\t%s" "$a"; done; '
    'echo; } >> "$CALLS"\n'
)


def _stub_bin(tmp_path, *names) -> pathlib.Path:
    """A folder of commands that only record how they were called (in $CALLS)."""
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir(exist_ok=True)
    for name in names:
        (stub_dir / name).write_text(STUB)
        (stub_dir / name).chmod(0o755)
    return stub_dir


def _calls(path) -> list[list[str]]:
    if not pathlib.Path(path).exists():
        return []
    return [line.split("\t") for line in pathlib.Path(path).read_text().splitlines()]


# ----------------------------------------------------------------------------- SkyPilot


SKY_PYTHON = ROOT / ".venv-sky" / "bin" / "python"  # `make setup-test` builds it


def _sky_python() -> str | None:
    """A Python with SkyPilot: TLFLAX_SKY_PYTHON, this one (the launch extras), .venv-sky."""
    if os.environ.get("TLFLAX_SKY_PYTHON"):
        return os.environ["TLFLAX_SKY_PYTHON"]
    if importlib.util.find_spec("sky") is not None:
        return sys.executable
    return str(SKY_PYTHON) if SKY_PYTHON.exists() else None


class SkyTasks:
    """Task files as SkyPilot's own parser loads them, in a SkyPilot Python (tests/sky_tasks.py);
    each distinct (file, --env) request is parsed once."""

    def __init__(self, python: str, home: pathlib.Path):
        self.python, self.home, self.answers = python, home, {}

    def load(self, requests: list[tuple[str, dict | None]]) -> None:
        todo = [r for r in dict.fromkeys(_key(*r) for r in requests) if r not in self.answers]
        if not todo:
            return
        payload = [
            {"file": str(LAUNCH / "skypilot" / f), "envs": None if e is None else dict(e)}
            for f, e in todo
        ]
        env = dict(os.environ, HOME=str(self.home), SKYPILOT_DISABLE_USAGE_COLLECTION="1")
        done = subprocess.run(
            [self.python, str(ROOT / "tests" / "sky_tasks.py")],
            input=json.dumps(payload),
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"{self.python} tests/sky_tasks.py: {done.stderr[-3000:]}"
        self.answers.update(zip(todo, json.loads(done.stdout), strict=True))

    def task(self, name: str, envs: dict | None):
        self.load([(name, envs)])
        answer = self.answers[_key(name, envs)]
        return answer if "error" in answer else SimpleNamespace(**answer)


def _key(name: str, envs: dict | None) -> tuple:
    return name, None if envs is None else tuple(sorted(envs.items()))


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    """SkyPilot's parser with its state (~/.sky) in a temporary home and no usage reports."""
    python = _sky_python()
    if python is None:
        if os.environ.get("TLFLAX_REQUIRE_SKYPILOT"):
            pytest.fail(f"TLFLAX_REQUIRE_SKYPILOT is set but {SKY_PYTHON} is missing")
        pytest.skip("no SkyPilot: make setup-test builds .venv-sky (or pip install '.[launch]')")
    tasks = SkyTasks(python, tmp_path_factory.mktemp("sky_home"))
    # Every request of this module in one process: importing SkyPilot takes seconds.
    tasks.load([(n, e) for n in EXPECTED for e in ({"WORKDIR": "gs://bucket/runs/x"}, None)])
    tasks.load([(n, {"WORKDIR": "gs://b/r", "EXTRA": "--config.optim.lr=0.1"}) for n in EXPECTED])
    tasks.load([("gpu_nodes.yaml", {"WORKDIR": "gs://b/r"}), ("spot_job.yaml", RUNS_X)])
    return tasks


RUNS_X = {"WORKDIR": "runs/x"}


def _task(sky, name: str, **envs):
    """The task `sky launch FILE --env K=V ...` would run (the CLI's own loading path)."""
    task = sky.task(name, envs)
    assert not isinstance(task, dict), task["error"]
    return task


def _run_script(tmp_path, script: str, task, **extra_env) -> subprocess.CompletedProcess:
    """Bash runs `script` as SkyPilot would on a node: the task's envs, its extra vars."""
    stubs = _stub_bin(tmp_path, "pip", "tlflax")
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(tmp_path), "CALLS": str(tmp_path / "c")}
    env.update(task.envs, **extra_env)
    return subprocess.run(
        ["bash", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )


EXPECTED = {  # file: (accelerator, count, num_nodes, use_spot, jax extra)
    "gpu_nodes.yaml": ("H100", 8, 2, False, "jax[cuda12]"),
    "spot_job.yaml": ("tpu-v5litepod-8", 1, 1, True, "jax[tpu]"),
    "tpu_pod.yaml": ("tpu-v4-32", 1, 1, False, "jax[tpu]"),
    "tpu_vm.yaml": ("tpu-v4-8", 1, 1, False, "jax[tpu]"),
}


def test_every_skypilot_file_is_tested():
    assert SKY_FILES == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_skypilot_file_parses_with_the_resources_it_names(sky, name):
    accel, count, num_nodes, use_spot, _ = EXPECTED[name]
    task = _task(sky, name, WORKDIR="gs://bucket/runs/x")
    assert task.accelerators == {accel: count}
    assert (task.num_nodes, task.use_spot) == (num_nodes, use_spot)
    assert task.workdir == "."  # the repository root, synced without .gitignore'd .venv / runs
    if accel.startswith("tpu-"):
        assert task.known_tpus == [accel]  # a TPU name SkyPilot knows (offline list)
        assert task.accelerator_args["runtime_version"]
    # No default bucket: it must be given.
    error = sky.task(name, None)
    assert error["error"].startswith("ValueError") and "WORKDIR" in error["error"], error


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_skypilot_setup_installs_the_package_and_the_jax_extra(sky, name, tmp_path):
    task = _task(sky, name, WORKDIR="gs://bucket/runs/x")
    done = _run_script(tmp_path, task.setup, task)
    assert done.returncode == 0, done.stderr
    assert _calls(tmp_path / "c") == [
        ["pip", "install", "-U", "pip"],
        ["pip", "install", "-e", ".", EXPECTED[name][4]],
    ]


def _train(*flags) -> list[str]:
    return ["tlflax", "train", "--config", "configs/demo.py", "--workdir", "gs://b/r", *flags]


@pytest.mark.parametrize(
    "name, flags",
    [
        ("tpu_vm.yaml", ["--config.optim.lr=0.1"]),
        ("tpu_pod.yaml", ["--config.train.distributed=True", "--config.optim.lr=0.1"]),
        ("spot_job.yaml", ["--config.optim.lr=0.1"]),
    ],
)
def test_skypilot_tpu_run_is_the_documented_command(sky, name, flags, tmp_path):
    task = _task(sky, name, WORKDIR="gs://b/r", EXTRA="--config.optim.lr=0.1")
    done = _run_script(tmp_path, task.run, task)
    assert done.returncode == 0, done.stderr
    assert _calls(tmp_path / "c") == [_train(*flags)]


def test_skypilot_gpu_nodes_take_the_coordinator_from_skypilot(sky, tmp_path):
    task = _task(sky, "gpu_nodes.yaml", WORKDIR="gs://b/r")
    node = dict(SKYPILOT_NODE_IPS="10.0.0.7\n10.0.0.9\n", SKYPILOT_NUM_NODES="2")
    done = _run_script(tmp_path, task.run, task, SKYPILOT_NODE_RANK="1", **node)
    assert done.returncode == 0, done.stderr
    assert _calls(tmp_path / "c") == [
        _train(
            "--config.train.distributed=True",
            "--config.train.coordinator_address=10.0.0.7:8476",
            "--config.train.num_processes=2",
            "--config.train.process_id=1",
        )
    ]


def test_skypilot_spot_job_refuses_a_workdir_that_dies_with_the_vm(sky, tmp_path):
    task = _task(sky, "spot_job.yaml", **RUNS_X)
    assert task.job_recovery["strategy"] == "EAGER_NEXT_REGION"
    done = _run_script(tmp_path, task.run, task)
    assert done.returncode == 2 and "WORKDIR=runs/x" in done.stderr and "gs://" in done.stderr
    assert _calls(tmp_path / "c") == []


# ----------------------------------------------------------------------------- Slurm


@pytest.fixture(scope="module")
def slurm():
    pytest.importorskip("submitit", reason="pip install submitit (the launch extras)")
    spec = importlib.util.spec_from_file_location("launch_slurm", LAUNCH / "slurm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "text, minutes",
    [("90", 90), ("1:30", 2), ("4:00:00", 240), ("1-00", 1440), ("2-3:30", 3090), ("0:0:1", 1)],
)
def test_slurm_time_formats(slurm, text, minutes):
    assert slurm.timeout_minutes(text) == minutes


def test_slurm_bad_time_names_the_value(slurm):
    with pytest.raises(SystemExit, match="--time='4h'"):
        slurm.timeout_minutes("4h")


def _params(slurm, *options):
    args, run = slurm.parse_args([*options, "--", "configs/demo.py", "/shared/run", "--config.x=1"])
    assert run == ["configs/demo.py", "/shared/run", "--config.x=1"]
    return slurm.executor_parameters(args)


def test_slurm_one_task_per_gpu_or_per_node(slurm, tmp_path):
    import submitit

    opts = ["--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "4:00:00"]
    per_gpu = _params(slurm, *opts, "--account", "lab")
    assert per_gpu == dict(
        name="tlflax",
        nodes=2,
        tasks_per_node=8,
        gpus_per_node=8,
        timeout_min=240,
        slurm_partition="gpu",
        slurm_account="lab",
    )
    assert _params(slurm, *opts, "--per", "node")["tasks_per_node"] == 1
    # submitit accepts every key (it raises on one its Slurm executor does not know).
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="local")
    executor.update_parameters(**{**per_gpu, "nodes": 1})


def test_slurm_local_runs_one_node(slurm):
    with pytest.raises(SystemExit, match="--nodes=2 with --local"):
        _params(slurm, "--local", "--nodes", "2")


@pytest.mark.parametrize(
    "argv, message",
    [(["--nodes", "2"], "put the run after '--'"), (["--", "c.py"], "give CONFIG WORKDIR")],
)
def test_slurm_run_must_follow_the_separator(slurm, argv, message, capsys):
    with pytest.raises(SystemExit):
        slurm.parse_args(argv)
    assert message in capsys.readouterr().err


def test_slurm_task_argv_coordinator_and_devices(slurm):
    run = ["configs/demo.py", "/shared/run", "--config.x=1"]
    base = ["tlflax", "train", "--config", "configs/demo.py", "--workdir", "/shared/run"]
    alone = slurm.train_argv(run, n_tasks=1, rank=0, coordinator="127.0.0.1:1")
    assert alone == [*base, "--config.x=1"]  # one task: no distributed runtime
    many = slurm.train_argv(run, n_tasks=16, rank=9, coordinator="node001:32345")
    assert many[len(base) + 1 :] == [
        "--config.train.distributed=True",
        "--config.train.coordinator_address=node001:32345",
        "--config.train.num_processes=16",
        "--config.train.process_id=9",
    ]
    hosts = ["node001", "node002"]
    assert slurm.coordinator_of(hostnames=hosts, num_nodes=2, job_id="12345", port=0) == (
        "node001:32345"
    )
    assert slurm.coordinator_of(hostnames=hosts, num_nodes=1, job_id="7", port=999) == (
        "127.0.0.1:999"
    )
    assert slurm.local_device_ids(per="gpu", gpus_per_node=8, local_rank=3) == "3"
    assert slurm.local_device_ids(per="node", gpus_per_node=4, local_rank=0) == "0,1,2,3"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_slurm_local_executor_runs_a_two_process_job(slurm, tmp_path):
    workdir, logs = tmp_path / "run", tmp_path / "logs"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    options = ["--local", "--tasks-per-node", "2", "--port", str(_free_port()), "--time", "10"]
    options += ["--folder", str(logs / "%j")]
    run = [str(ROOT / "tests" / "tiny_config.py"), str(workdir)]
    run += ["--config.optim.probe_steps=2", "--config.optim.finetune_steps=2"]
    run += ["--config.train.eval_every=2", "--config.train.checkpoint_every=2"]
    cmd = [sys.executable, str(LAUNCH / "slurm.py"), *options, "--", *run]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "2 task(s) on 1 node(s)" in done.stdout and "done" in done.stdout, done.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 4
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4]
    task_logs = sorted(logs.glob("*/*_1_log.err"))
    assert task_logs and "process 1 of 2" in task_logs[0].read_text()


# ----------------------------------------------------------------------------- tpu_vm.sh


def _tpu_vm(*args, **env) -> list[list[str]]:
    """The commands `DRY_RUN=1 launch/tpu_vm.sh ARGS` prints, each split as a shell would."""
    full = {k: v for k, v in os.environ.items() if k != "PROJECT"}
    full.update(DRY_RUN="1", ZONE="us-central2-b", **env)
    done = subprocess.run(
        ["bash", str(LAUNCH / "tpu_vm.sh"), *args], env=full, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return [shlex.split(line) for line in done.stdout.splitlines()]


ZONE = "--zone=us-central2-b"
SSH_ALL = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "tpu1", "--worker=all"]


def test_tpu_vm_create_plain_spot_and_queued():
    create = ["gcloud", "compute", "tpus", "tpu-vm", "create", "tpu1"]
    v4 = ["--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base"]
    assert _tpu_vm("create", "tpu1") == [[*create, *v4, ZONE]]
    assert _tpu_vm("create", "tpu1", SPOT="1", PROJECT="p") == [
        [*create, *v4, "--spot", ZONE, "--project=p"]
    ]
    queued = ["gcloud", "compute", "tpus", "queued-resources", "create", "tpu1", "--node-id=tpu1"]
    v5e = ["--accelerator-type=v5litepod-8", "--runtime-version=v2-alpha-tpuv5-lite"]
    args = ("create", "tpu1", "v5litepod-8", "v2-alpha-tpuv5-lite")
    assert _tpu_vm(*args, QUEUED="1", SPOT="1", VALID_UNTIL="6h") == [
        [*queued, *v5e, "--spot", "--valid-until-duration=6h", ZONE]
    ]
    assert _tpu_vm(*args, QUEUED="1", GUARANTEED="1") == [[*queued, *v5e, "--guaranteed", ZONE]]
    alpha = ["gcloud", "alpha", *queued[1:]]
    assert _tpu_vm(*args, QUEUED="1", BEST_EFFORT="1") == [[*alpha, *v5e, "--best-effort", ZONE]]


def test_tpu_vm_queued_flags_without_queued_are_an_error():
    env = dict(os.environ, DRY_RUN="1", GUARANTEED="1")
    done = subprocess.run(
        ["bash", str(LAUNCH / "tpu_vm.sh"), "create", "tpu1"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "add QUEUED=1" in done.stderr and not done.stdout


INSTALL = "python3 -m pip install -q -U pip && python3 -m pip install -q ~/tlflax 'jax[tpu]'"


def test_tpu_vm_setup_ships_the_committed_tree_not_the_venv():
    tarball = f"{ROOT}/dist/tlflax-src.tar.gz"
    assert _tpu_vm("setup", "tpu1") == [
        ["mkdir", "-p", f"{ROOT}/dist"],
        ["git", "-C", str(ROOT), "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "tpu1:~/tlflax-src.tar.gz"]
        + ["--worker=all", ZONE],
        SSH_ALL
        + [
            "--command=rm -rf ~/tlflax && mkdir -p ~/tlflax && tar -xzf ~/tlflax-src.tar.gz "
            f"-C ~/tlflax && {INSTALL}",
            ZONE,
        ],
    ]
    from_git = _tpu_vm(
        "setup", "tpu1", TLFLAX_GIT="https://github.com/o/tlflax.git", TLFLAX_REF="v1"
    )
    assert from_git == [
        SSH_ALL
        + [
            "--command=rm -rf ~/tlflax && git clone -q https://github.com/o/tlflax.git ~/tlflax "
            f"&& git -C ~/tlflax checkout -q v1 && {INSTALL}",
            ZONE,
        ]
    ]


def _remote(command: list[str]) -> str:
    assert command[: len(SSH_ALL)] == SSH_ALL and command[-1] == ZONE, command
    (flag,) = [a for a in command if a.startswith("--command=")]
    return flag.removeprefix("--command=")


def test_tpu_vm_run_detaches_logs_and_stops(tmp_path):
    """The remote commands, executed here on a fake home: `run` returns at once, the run
    logs to ~/tlflax-logs/RUN.log, `logs` follows that file, `stop` ends the run."""
    (run,) = _tpu_vm("run", "tpu1", "configs/demo.py", "gs://b/runs/demo", "--config.x=a b")
    (logs,) = _tpu_vm("logs", "tpu1", "demo", "2")
    (stop,) = _tpu_vm("stop", "tpu1", "demo")
    assert logs == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "tpu1", "--worker=2"] + [
        "--command=tail -n 200 -F ~/tlflax-logs/demo.log",
        ZONE,
    ]
    home = tmp_path / "home"
    (home / "tlflax").mkdir(parents=True)
    bin_dir = home / ".local" / "bin"  # where a user pip install puts the tlflax script
    bin_dir.mkdir(parents=True)
    (bin_dir / "tlflax").write_text('#!/bin/sh\nprintf "%s|" "$@"; echo; exec sleep 60\n')
    (bin_dir / "tlflax").chmod(0o755)
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    t0 = time.time()
    subprocess.run(["bash", "-c", _remote(run)], env=env, check=True, timeout=30)
    assert time.time() - t0 < 10  # detached: the ssh command does not wait for the run
    log, pid_file = home / "tlflax-logs" / "demo.log", home / "tlflax-logs" / "demo.pid"
    for _ in range(100):
        if log.exists() and log.read_text():
            break
        time.sleep(0.05)
    assert log.read_text().split("|")[:-1] == [
        "train",
        "--config",
        "configs/demo.py",
        "--workdir",
        "gs://b/runs/demo",
        "--config.train.distributed=True",
        "--config.x=a b",
    ]
    pid = int(pid_file.read_text())
    try:
        subprocess.run(["bash", "-c", _remote(stop)], env=env, check=True, timeout=30)
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.05)
        assert not _alive(pid) and not pid_file.exists()
    finally:
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    stat = pathlib.Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_tpu_vm_sweep_runs_each_value_in_turn(tmp_path):
    (sweep,) = _tpu_vm("sweep", "tpu1", "configs/demo.py", "gs://b/s", "optim.lr", "0.1", "0.01")
    remote = _remote(sweep)
    assert "~/tlflax-logs/s_optim_lr.log" in remote
    inner = shlex.split(remote.split("bash -c ", 1)[1])[0]  # the detached script
    assert [shlex.split(part) for part in inner.split(";")] == [
        ["tlflax", "train", "--config", "configs/demo.py", "--workdir", f"gs://b/s_optim_lr_{v}"]
        + ["--config.train.distributed=True", f"--config.optim.lr={v}"]
        for v in ("0.1", "0.01")
    ]


def test_tpu_vm_delete_and_status():
    vm = ["gcloud", "compute", "tpus", "tpu-vm"]
    qr = ["gcloud", "compute", "tpus", "queued-resources"]
    assert _tpu_vm("delete", "tpu1") == [[*vm, "delete", "tpu1", "--quiet", ZONE]]
    assert _tpu_vm("delete", "tpu1", QUEUED="1") == [
        [*qr, "delete", "tpu1", "--force", "--quiet", ZONE]
    ]
    assert _tpu_vm("status", "tpu1") == [[*vm, "describe", "tpu1", ZONE]]
    assert _tpu_vm("status", "tpu1", QUEUED="1") == [[*qr, "describe", "tpu1", ZONE]]
