"""XLA's CPU optimisation level for tlflax's steps: compile time and step time, side by side.

    .venv/bin/python benchmarks/cpu_compile.py                    # Lite0 @64 (the demo's step)
    .venv/bin/python benchmarks/cpu_compile.py --models efficientnet_lite0@224:32,resnet50@224:16
    .venv/bin/python benchmarks/cpu_compile.py --models resnet_tiny@32:2 --steps 1   # smoke run

tlflax compiles its jitted steps on the CPU with `xla_backend_optimization_level` =
sharding.CPU_BACKEND_OPT_LEVEL (jax.jit's compiler_options; tlflax.sharding.compiler_options).
For each `name@px:batch` and step kind (--kinds, default full and eval) this builds the
trainer's own step as benchmarks/throughput.py does (SGD, float32), once with XLA's default
level and once per --levels value, each a fresh jit in this process (no persistent cache):
`lower().compile()` seconds, then the median of --steps step times after one warm-up step,
and the largest difference of the first step's loss between the two (eval: of the
per-example losses), with a random head (throughput.random_head) so that it depends on
the backbone.

Prints a table and one JSON line starting with 'RESULT '.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import throughput  # noqa: E402

from tlflax import sharding  # noqa: E402


def measure(name: str, px: int, batch: int, kind: str, level, *, steps: int) -> dict:
    """The trainer's `kind` step of `name` compiled with optimisation `level` (None: XLA's)."""
    saved = sharding.CPU_BACKEND_OPT_LEVEL
    sharding.CPU_BACKEND_OPT_LEVEL = level
    try:
        config = throughput.make_config(
            name, px=px, batch=batch, kind=kind, num_classes=10, compute_dtype="float32"
        )
        run = throughput.make_run(config, devices=jax.devices("cpu"))
        host_vars = throughput.random_head(jax.device_get(run.spec.init(jax.random.key(0), px)))
        host_batch = throughput.host_batch(run, batch)
        fn, (first, device_batch) = throughput.step_and_args(
            config, run, kind, host_vars, host_batch
        )
        start = time.perf_counter()
        compiled = fn.lower(first, device_batch).compile()
        compile_s = time.perf_counter() - start
    finally:
        sharding.CPU_BACKEND_OPT_LEVEL = saved
    out = jax.block_until_ready(compiled(first, device_batch))
    if kind == "eval":  # per-example losses
        probe = np.asarray(out["loss"], np.float64)
    else:
        first, metrics = out
        probe = np.asarray(metrics["loss"], np.float64)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(first, device_batch))
        times.append(time.perf_counter() - start)
        if kind != "eval":
            first = out[0]
    return {
        "model": name, "px": px, "batch": batch, "step": kind, "level": level,
        "compile_s": compile_s, "step_s": float(np.median(times)), "probe": probe,
    }  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="efficientnet_lite0@64:64", help="name@px:batch,...")
    p.add_argument("--kinds", default="full,eval")
    p.add_argument("--levels", default="1", help="levels set against XLA's default, e.g. 1,2")
    p.add_argument("--steps", type=int, default=3)
    return p.parse_args(argv)


def run(argv=None) -> dict:
    args = parse_args(argv)
    rows = []
    for entry in filter(None, args.models.split(",")):
        name, px, (batch,) = throughput.model_entry(entry, 64, [64])
        for kind in args.kinds.split(","):
            base = measure(name, px, batch, kind, None, steps=args.steps)
            for level in (int(v) for v in args.levels.split(",")):
                other = measure(name, px, batch, kind, level, steps=args.steps)
                diff = float(np.max(np.abs(other.pop("probe") - base["probe"])))
                rows.append({**other, "default_compile_s": base["compile_s"],
                             "default_step_s": base["step_s"], "max_diff": diff})  # fmt: skip
            base.pop("probe")
    return {"env": {"device": str(jax.devices("cpu")[0]), "jax": jax.__version__}, "rows": rows}


def print_table(result: dict) -> None:
    head = ("model", "px", "batch", "step", "level", "compile s (default)", "step s (default)",
            "max diff")  # fmt: skip
    print(" | ".join(head))
    for r in result["rows"]:
        print(" | ".join(str(c) for c in (
            r["model"], r["px"], r["batch"], r["step"], r["level"],
            f"{r['compile_s']:.1f} ({r['default_compile_s']:.1f})",
            f"{r['step_s']:.3f} ({r['default_step_s']:.3f})", f"{r['max_diff']:.2g}",
        )))  # fmt: skip


def main(argv=None) -> None:
    result = run(argv)
    print_table(result)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
