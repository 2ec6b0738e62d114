"""Two or more builds of the trainer's own steps, timed side by side in one process: what
benchmarks/fold_bn.py (frozen BatchNorm forms) and benchmarks/remat.py (model.remat) share.

A side is a name and a function config -> context manager: it may change the config (a
fresh one per side) and the context holds whatever switch the side needs while the step is
built and compiled. Per model, step kind and side, one after the other: compile time, the
median step time of --iters steps after one warm-up (and their CPU time and page faults),
XLA's step memory, and the first value (train: the first step's mean loss; eval: the
batch's), against the first side's.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import throughput

KINDS = ("full", "last_k", "linear_probe", "eval")
Side = Callable[[Any], Any]  # config -> context manager, entered while building the step


def measure(name: str, *, px: int, batch: int, kind: str, side: str, prepare: Side,
            iters: int) -> dict:  # fmt: skip
    """One side: the trainer's `kind` step of `name` (throughput.py's build, float32, SGD,
    a random head, a synthetic batch)."""
    config = throughput.make_config(
        name, px=px, batch=batch, kind=kind, num_classes=10, compute_dtype="float32"
    )
    with prepare(config):
        run = throughput.make_run(config, devices=jax.devices())
        host_vars = throughput.random_head(jax.device_get(run.spec.init(jax.random.key(0), px)))
        batch_np = throughput.host_batch(run, batch)
        fn, (first, device_batch) = throughput.step_and_args(config, run, kind, host_vars, batch_np)
        start = time.perf_counter()
        compiled = fn.lower(first, device_batch).compile()
        compile_s = time.perf_counter() - start
    out = jax.block_until_ready(compiled(first, device_batch))  # warm-up; eval keeps `first`
    metrics = out if kind == "eval" else out[1]
    value = float(np.mean(jax.device_get(metrics["loss"])))
    times, usage = [], resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(iters):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(first if kind == "eval" else out[0], device_batch))
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    step_s = float(np.median(times))
    return {
        "model": name, "px": px, "batch": batch, "kind": kind, "side": side,
        "compile_s": compile_s, "step_s": step_s, "img_s": batch / step_s,
        "step_bytes": throughput.step_memory(compiled), "value": value,
        # per timed step, the whole process: CPU time in the kernel and user space, page faults
        "sys_s": (after.ru_stime - usage.ru_stime) / iters,
        "user_s": (after.ru_utime - usage.ru_utime) / iters,
        "minor_faults": (after.ru_minflt - usage.ru_minflt) / iters,
    }  # fmt: skip


def parse_args(argv, *, description: str, kinds: tuple[str, ...] = KINDS,
               default_kinds: str = "full,eval",
               default_models: str = "efficientnet_lite0@224:32,resnet50@224:16",
               extra: Callable[[argparse.ArgumentParser], Any] | None = None,
               ) -> argparse.Namespace:  # fmt: skip
    """--models, --kinds, --iters; `extra(parser)` adds a benchmark's own flags."""
    p = argparse.ArgumentParser(description=description)
    if extra is not None:
        extra(p)
    p.add_argument(
        "--models",
        default=default_models,
        help="comma-separated name[@px][:batch] (throughput.py's entries; 224 px, batch 32)",
    )
    p.add_argument("--kinds", default=default_kinds, help=f"step kinds, from {','.join(kinds)}")
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args(argv)
    args.cases = []
    for entry in filter(None, args.models.split(",")):
        try:
            name, px, batches = throughput.model_entry(entry, 224, [32])
        except ValueError:
            name, batches = "", []
        if not name or len(batches) != 1:
            p.error(f"--models: {entry!r} is not name[@px][:batch]")
        args.cases.append((name, px, batches[0]))
    args.kind_list = [k for k in args.kinds.split(",") if k]
    if not args.kind_list or set(args.kind_list) - set(kinds) or args.iters < 1:
        p.error(f"--kinds from {kinds}, --iters >= 1")
    args.error = p.error
    return args


def run(args: argparse.Namespace, sides: dict[str, Side]) -> dict:
    rows = []
    for name, px, batch in args.cases:
        for kind in args.kind_list:
            for side, prepare in sides.items():
                rows.append(measure(name, px=px, batch=batch, kind=kind, side=side,
                                    prepare=prepare, iters=args.iters))  # fmt: skip
    env = {"device": str(jax.devices()[0]), "jax": jax.__version__, "sides": list(sides)}
    return {"env": env, "rows": rows}


def print_table(result: dict) -> None:
    gib = 2**30
    sides = result["env"]["sides"]
    n = len(sides)
    head = ["model", "px", "batch", "step"] + [f"{i} s" for i in sides]
    both = " / ".join(sides)
    head += [f"{i} GiB" for i in sides] + [f"compile s ({both})", "loss diff"]
    head += [f"sys s per step ({both})", f"page faults per step ({both})"]
    print(" | ".join(head))
    rows = result["rows"]
    for i in range(0, len(rows), n):
        group = rows[i : i + n]
        base = group[0]
        mem = [f"{r['step_bytes'] / gib:.2f}" if r["step_bytes"] is not None else "?"
               for r in group]  # fmt: skip
        speed = [f"{r['step_s']:.3f}" + (f" ({base['step_s'] / r['step_s']:.2f}x)" if r is not
                 base else "") for r in group]  # fmt: skip
        diff = max(abs(r["value"] - base["value"]) for r in group)
        compile_s = " / ".join(f"{r['compile_s']:.1f}" for r in group)
        sys_s = " / ".join(f"{r['sys_s']:.3f}" for r in group)
        faults = " / ".join(f"{r['minor_faults']:,.0f}" for r in group)
        cells = [base["model"], base["px"], base["batch"], base["kind"], *speed, *mem]
        print(" | ".join(str(c) for c in [*cells, compile_s, f"{diff:.1e}", sys_s, faults]))


def main(args: argparse.Namespace, sides: dict[str, Side]) -> dict:
    result = run(args, sides)
    print_table(result)
    print("RESULT " + json.dumps(result))
    return result
