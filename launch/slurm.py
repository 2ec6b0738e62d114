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
import sys

import submitit

from tlflax import sweep

PER = sweep.PER


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
    try:
        return sweep.timeout_minutes(text)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def tasks_per_node(args: argparse.Namespace) -> int:
    return sweep.tasks_per_node(
        per=args.per, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node
    )


def executor_parameters(args: argparse.Namespace) -> dict:
    """AutoExecutor.update_parameters(**this): generic keys, and slurm_* ones for Slurm."""
    if (args.local or args.debug) and args.nodes != 1:
        raise SystemExit(f"--nodes={args.nodes} with --local / --debug: they run one node; use 1")
    if args.debug and tasks_per_node(args) != 1:
        raise SystemExit("--debug runs one task in this process; use --local for several")
    timeout_minutes(args.time)  # a bad --time is this launcher's SystemExit
    return sweep.executor_parameters(
        name=args.name,
        nodes=args.nodes,
        tasks=tasks_per_node(args),
        gpus_per_node=args.gpus_per_node,
        time_limit=args.time,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb,
        slurm={k: getattr(args, k) for k in ("partition", "account", "qos", "constraint")},
    )


# The task and what it derives from the job's environment are shared with `tlflax sweep
# --executor slurm` (tlflax/sweep.py), which submits one such job per point of a grid.
coordinator_of = sweep.coordinator_of
train_argv = sweep.train_argv
local_device_ids = sweep.local_device_ids
TrainTask = sweep.TrainTask


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
