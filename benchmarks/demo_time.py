"""The demo's training command, this checkout against an older commit, in turn.

    .venv/bin/python benchmarks/demo_time.py                      # against 4da7bd2, twice each
    .venv/bin/python benchmarks/demo_time.py --against HEAD~3 --rounds 1 --set optim.probe=cached

Issue 16 measures `make demo` from its first log line to its table. The older commit is
checked out once with `git worktree add --detach` under --root (kept for later runs) and
runs with this checkout's venv (the same jax, flax and data). Each run is the command
`tlflax train --config configs/demo.py --workdir DIR` as the console script runs it (its
main() in a fresh process, from the side's own source tree and folder), fresh workdir,
one after the other: older, this, older, this..., each without a persistent XLA cache
(TLFLAX_XLA_CACHE=0, JAX_COMPILATION_CACHE_* unset), so that each compiles. Per run: the
whole process's wall time, the first log line to the end, and the result table it printed,
which should agree.

Prints a table and one JSON line starting with 'RESULT '.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
BEFORE_CPU_WORK = "4da7bd2"  # the commit before issue 16's CPU speed work
FIRST_LOG = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", re.M)
ROW = re.compile(r"^(\S+)\s+(\d+\.\d+ %)\s+(\d+\.\d+ %)\s+(\d+/\d+)\s*$", re.M)

# The console script's body, run from the side's tree: sys.argv as the command gives it.
PROGRAM = """
import sys
sys.path.insert(0, {root!r})
from tlflax.main import main
sys.argv = ["tlflax", "train", "--config", {config!r}, "--workdir", {workdir!r}, *{extra!r}]
sys.exit(main())
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--against", default=BEFORE_CPU_WORK, help="the older commit (git rev)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each side, in turn")
    p.add_argument("--config", default="configs/demo.py", help="relative to each side's tree")
    p.add_argument("--root", default="/tmp/tlflax-demo-time", help="worktree and workdirs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for both sides (--config.KEY=VALUE)")  # fmt: skip
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds >= 1")
    if any("=" not in kv for kv in args.set):
        p.error("--set KEY=VALUE")
    args.overrides = [f"--config.{kv}" for kv in args.set]
    return args


def worktree(rev: str, root: pathlib.Path) -> pathlib.Path:
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    if sha.returncode:
        raise SystemExit(f"--against {rev}: not a commit of {ROOT}")
    sha = sha.stdout.strip()
    tree = root / f"tree-{sha[:12]}"
    if not (tree / "tlflax").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(tree),
                        sha], check=True, capture_output=True)  # fmt: skip
    return tree


def fresh_compile_env() -> dict:
    """This environment without any persistent XLA cache (tlflax's, TLFLAX_XLA_CACHE=0, or
    jax's own): every run compiles its steps, as on a fresh machine, whichever side."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["TLFLAX_XLA_CACHE"] = "0"
    return env


def run_once(tree: pathlib.Path, workdir: pathlib.Path, args) -> dict:
    shutil.rmtree(workdir, ignore_errors=True)
    code = PROGRAM.format(root=str(tree), config=args.config, workdir=str(workdir),
                          extra=list(args.overrides))  # fmt: skip
    start = time.time()
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True,
                          text=True, check=False, env=fresh_compile_env())  # fmt: skip
    end = time.time()
    log = done.stdout + done.stderr
    workdir.parent.mkdir(parents=True, exist_ok=True)
    workdir.with_suffix(".log").write_text(log)
    first = FIRST_LOG.search(log)
    first_t = None
    if first:  # logging's asctime: local time
        first_t = datetime.datetime.strptime(first.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return {
        "exit": done.returncode,
        "total_s": end - start,
        "log_to_table_s": end - first_t if first_t is not None else None,
        "table": [" ".join(m.groups()) for m in ROW.finditer(done.stdout)],
        "log": str(workdir.with_suffix(".log")),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    root = pathlib.Path(args.root)
    sides = {"older": worktree(args.against, root), "this": ROOT}
    rows = []
    for i in range(1, args.rounds + 1):
        for side, tree in sides.items():
            row = run_once(tree, root / f"{side}-{i}", args)
            rows.append({"side": side, "round": i, **row})
            took = row["log_to_table_s"] or float("nan")
            print(f"{side} run {i}: exit {row['exit']}, total {row['total_s']:.1f} s, "
                  f"first log line to table {took:.1f} s", flush=True)  # fmt: skip
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    print("round | older s | this s | older / this | tables agree")
    for i in range(1, args.rounds + 1):
        older, this = (r for r in rows if r["round"] == i)
        a, b = older["log_to_table_s"], this["log_to_table_s"]
        ratio = f"{a / b:.2f}x" if a and b else "-"
        same = older["table"] == this["table"] and bool(this["table"])
        print(f"{i} | {a or float('nan'):.1f} | {b or float('nan'):.1f} | {ratio} | {same}")
    for side in sides:
        print(f"{side} table: " + "; ".join(next(r for r in rows if r["side"] == side)["table"]))
    result = {"env": {"against": args.against, "this": head, "config": args.config,
                      "overrides": args.overrides}, "rows": rows}  # fmt: skip
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
