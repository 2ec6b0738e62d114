"""Huge pages for the host's allocations: the trainer's steps with glibc's default malloc,
then with `glibc.malloc.hugetlb=1` (what the `tlflax` command sets: tlflax/host_malloc.py).

    .venv/bin/python benchmarks/host_malloc.py            # Lite0, ResNet-50: full and eval
    .venv/bin/python benchmarks/host_malloc.py --models efficientnet_lite_tiny@32:4 --iters 1

glibc reads its tunables when a process starts, so each side runs in a process of its own
(this script again, with --side), one after the other per model and step kind and
--rounds times in turn: `default` without the tunable, `hugetlb` with it. Each process
measures as benchmarks/sides.py does (the trainer's own jitted step, float32, SGD, a
synthetic batch, a random head): compile time, the median step time, XLA's step memory,
the first loss, and per timed step the process's system CPU time and minor page faults.

Prints a table and one JSON line starting with 'RESULT '.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import sides  # noqa: E402

from tlflax import host_malloc  # noqa: E402

SIDES = ("default", "hugetlb")


def run_side(side: str, entry: str, kind: str, iters: int) -> dict:
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--side", side,
           "--models", entry, "--kinds", kind, "--iters", str(iters)]  # fmt: skip
    env = host_malloc.with_tunable(os.environ, side == "hugetlb")
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
    lines = [x for x in done.stdout.splitlines() if x.startswith("ROW ")]
    if done.returncode or not lines:
        raise SystemExit(f"the {side} process for {entry} {kind} failed (exit {done.returncode})")
    return json.loads(lines[-1][len("ROW ") :])


def worker(args) -> None:
    (name, px, batch), kind = args.cases[0], args.kind_list[0]
    as_is = lambda config: contextlib.nullcontext()  # noqa: E731 - the side is the process
    row = sides.measure(name, px=px, batch=batch, kind=kind, side=args.side, prepare=as_is,
                        iters=args.iters)  # fmt: skip
    row["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES")
    print("ROW " + json.dumps(row))


def parse_args(argv=None):
    def extra(p):
        p.add_argument("--rounds", type=int, default=1, help="each side this many times, in turn")
        p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # a side's process

    args = sides.parse_args(argv, description=__doc__.split("\n")[0], extra=extra)
    if args.rounds < 1:
        args.error("--rounds >= 1")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.side is not None:
        return worker(args)
    rows = []
    for name, px, batch in args.cases:
        for kind in args.kind_list:
            for _ in range(args.rounds):
                for side in SIDES:
                    rows.append(run_side(side, f"{name}@{px}:{batch}", kind, args.iters))
    result = {"env": {"sides": list(SIDES), "glibc": host_malloc.glibc_version(),
                      "thp": host_malloc.thp_mode()}, "rows": rows}  # fmt: skip
    sides.print_table(result)
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
