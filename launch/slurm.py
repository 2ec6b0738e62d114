#!/usr/bin/env python3
"""Run `tlflax train` on Slurm (or locally) through submitit, one jax process per task.

  python launch/slurm.py --nodes 2 --gpus-per-node 8 --partition gpu --time 4:00:00 \\
      -- configs/X.py /shared/runs/x [--config.key=value ...]
  python launch/slurm.py --local --tasks-per-node 2 -- tests/tiny_config.py /tmp/run
  python launch/slurm.py --debug -- CONFIG WORKDIR      # one task, in this process (pdb works)

Tasks: one per GPU (the default, `--per gpu`: each process sees one GPU) or one per node
(`--per node`: each process drives all the GPUs of its node); `--tasks-per-node` overrides
both (CPU runs). With more than one task, every task calls jax.distributed.initialize()
through tlflax's train.distributed / coordinator_address / num_processes / process_id, with
the job's first host as coordinator (127.0.0.1 on one node) and a port derived from the job
id (`--port` to choose it). A preempted or timed-out Slurm job is requeued by submitit and
the same command resumes from the checkpoint in WORKDIR, which every node must see (a shared
filesystem or gs://). The submission folder (`--folder`, default runs/slurm/%j) holds each
task's log.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import submitit

PER = ("gpu", "node")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/slurm.py",
        usage="%(prog)s [options] -- CONFIG WORKDIR [--config.key=value ...]",
        description=__doc__.split("\n")[0],
    )
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0)
    parser.add_argument("--per", choices=PER, default="gpu", help="one task per GPU or per node")
    parser.add_argument("--tasks-per-node", type=int, default=0, help="0: from --per")
    parser.add_argument("--cpus-per-task", type=int, default=0)
    parser.add_argument("--mem-gb", type=float, default=0.0)
    parser.add_argument("--partition", default="")
    parser.add_argument("--account", default="")
    parser.add_argument("--qos", default="")
    parser.add_argument("--constraint", default="")
    parser.add_argument("--time", default="60", help="minutes, H:MM:SS or D-HH:MM:SS")
    parser.add_argument("--name", default="tlflax")
    parser.add_argument("--port", type=int, default=0, help="coordinator port; 0: from job id")
    parser.add_argument("--folder", default="runs/slurm/%j", help="submitit logs and pickles")
    parser.add_argument("--wait", action="store_true", help="Slurm: wait for the job to end")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="submitit's LocalExecutor")
    where.add_argument("--debug", action="store_true", help="submitit's DebugExecutor")
    return parser


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Options before '--'; after it: CONFIG WORKDIR [--config.key=value ...]."""
    parser = make_parser()
    if "--" not in argv:
        parser.parse_args(argv)  # --help prints the usage and exits
        parser.error("put the run after '--': [options] -- CONFIG WORKDIR [...]")
    cut = argv.index("--")
    args = parser.parse_args(argv[:cut])
    run = argv[cut + 1 :]
    if len(run) < 2 or run[0].startswith("-") or run[1].startswith("-"):
        parser.error(f"after '--' give CONFIG WORKDIR [--config.key=value ...], got {run}")
    return args, run


def timeout_minutes(text: str) -> int:
    """Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S; rounded up to minutes."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise SystemExit(f"--time={text!r}: use minutes, H:MM:SS or D-HH:MM:SS (e.g. 4:00:00)")
    days, a, b, c = (int(x) if x else None for x in match.groups())
    if days is not None:  # D-H[:M[:S]]
        seconds = ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    elif c is not None:  # H:M:S
        seconds = (a * 60 + b) * 60 + c
    else:  # M or M:S
        seconds = a * 60 + (b or 0)
    return max(1, -(-seconds // 60))


def tasks_per_node(args: argparse.Namespace) -> int:
    if args.tasks_per_node:
        return args.tasks_per_node
    return args.gpus_per_node if args.per == "gpu" and args.gpus_per_node else 1


def executor_parameters(args: argparse.Namespace) -> dict:
    """AutoExecutor.update_parameters(**this): generic keys, and slurm_* ones for Slurm."""
    if (args.local or args.debug) and args.nodes != 1:
        raise SystemExit(f"--nodes={args.nodes} with --local / --debug: they run one node; use 1")
    if args.debug and tasks_per_node(args) != 1:
        raise SystemExit("--debug runs one task in this process; use --local for several")
    params = dict(
        name=args.name,
        nodes=args.nodes,
        tasks_per_node=tasks_per_node(args),
        gpus_per_node=args.gpus_per_node,
        timeout_min=timeout_minutes(args.time),
    )
    if args.cpus_per_task:
        params["cpus_per_task"] = args.cpus_per_task
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(args, key):
            params[f"slurm_{key}"] = getattr(args, key)
    return params


def coordinator_of(*, hostnames, num_nodes: int, job_id: str, port: int) -> str:
    """host:port of process 0: the job's first host; a port every task derives alike."""
    host = "127.0.0.1" if num_nodes == 1 else hostnames[0]
    if not port:
        port = 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000
    return f"{host}:{port}"


def train_argv(run: list[str], *, n_tasks: int, rank: int, coordinator: str) -> list[str]:
    """`tlflax train` argv for one task (the distributed flags only with several tasks)."""
    config, workdir, *overrides = run
    argv = ["tlflax", "train", "--config", config, "--workdir", workdir, *overrides]
    if n_tasks > 1:
        argv += [
            "--config.train.distributed=True",
            f"--config.train.coordinator_address={coordinator}",
            f"--config.train.num_processes={n_tasks}",
            f"--config.train.process_id={rank}",
        ]
    return argv


def local_device_ids(*, per: str, gpus_per_node: int, local_rank: int) -> str:
    """The GPUs one task uses. Said explicitly: on Slurm, jax would otherwise give each task
    the one GPU of its SLURM_LOCALID, which is right for --per gpu only."""
    if per == "gpu":
        return str(local_rank)
    return ",".join(str(i) for i in range(gpus_per_node))


class TrainTask(submitit.helpers.Checkpointable):
    """What every task runs. Checkpointable: on preemption / timeout submitit requeues the
    same call, and tlflax resumes from the workdir's checkpoint."""

    def __init__(self, run: list[str], *, port: int, per: str, gpus_per_node: int):
        self.run, self.port, self.per, self.gpus_per_node = run, port, per, gpus_per_node
        self.cwd = os.getcwd()  # relative CONFIG / WORKDIR / data paths stay valid

    def __call__(self) -> int:
        env = submitit.JobEnvironment()
        os.chdir(self.cwd)
        if self.gpus_per_node and "JAX_LOCAL_DEVICE_IDS" not in os.environ:
            os.environ["JAX_LOCAL_DEVICE_IDS"] = local_device_ids(
                per=self.per, gpus_per_node=self.gpus_per_node, local_rank=env.local_rank
            )
        coordinator = coordinator_of(
            hostnames=env.hostnames, num_nodes=env.num_nodes, job_id=env.job_id, port=self.port
        )
        argv = train_argv(
            self.run, n_tasks=env.num_tasks, rank=env.global_rank, coordinator=coordinator
        )
        from tlflax import main  # jax is imported here, after the environment is set

        # ml_collections finds --config.key=value overrides in sys.argv, not in main()'s argv.
        sys.argv = argv
        code = main.main(argv)
        if code:
            raise RuntimeError(f"task {env.global_rank}: {' '.join(argv)} exited {code}")
        return code


def submit(args: argparse.Namespace, run: list[str]):
    cluster = "local" if args.local else "debug" if args.debug else "slurm"
    executor = submitit.AutoExecutor(folder=args.folder, cluster=cluster)
    executor.update_parameters(**executor_parameters(args))
    task = TrainTask(run, port=args.port, per=args.per, gpus_per_node=args.gpus_per_node)
    return executor.submit(task)


def main(argv: list[str] | None = None) -> int:
    args, run = parse_args(list(sys.argv[1:] if argv is None else argv))
    job = submit(args, run)
    n_tasks = args.nodes * tasks_per_node(args)
    where = f"{n_tasks} task(s) on {args.nodes} node(s); logs in {job.paths.folder}"
    print(f"job {job.job_id}: {where}")
    if not (args.local or args.debug or args.wait):
        return 0
    job.results()  # raises, with the failing task's traceback, if any task failed
    print(f"job {job.job_id}: done; the run is in {run[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
