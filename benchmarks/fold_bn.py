"""Frozen BatchNorm: conv then nn.BatchNorm, folded into the kernel, or the conv's own scale.

    .venv/bin/python benchmarks/fold_bn.py             # Lite0 and ResNet-50: full, last_k, eval
    .venv/bin/python benchmarks/fold_bn.py --models efficientnet_lite_tiny@32:4 --iters 1

With frozen statistics (train.bn_mode 'frozen', every eval and feature pass) a BatchNorm is
an affine map per channel, conv(x) * s + (bias - mean * s). Three ways to compute it
(models/layers.py: conv_norm, layers.FROZEN_BN), timed side by side in this process:
  batchnorm  the conv, then flax's nn.BatchNorm with running averages (tlflax before
             2026-12-07): autodiff keeps an activation-sized residual for scale's gradient;
  fold       conv(x, kernel * s) with plain autodiff: no such residual, but every step
             rescales every kernel, with or without gradients;
  scaled     layers.scaled_linear, the default: the forward scales the output (fused with
             the activation after it), its own backward pass gets s's gradient from the
             kernel's (a kernel-sized sum).
Each is the trainer's own jitted step, built the way benchmarks/throughput.py builds it
(float32, SGD, synthetic batch), per model and step kind one after the other: compile time,
median step time of --iters steps after one warm-up, XLA's step memory, and the difference
of the first step's loss from batchnorm's (a random head, so that it depends on the
features).

Prints a table and one JSON line starting with 'RESULT '.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from tlflax.models import layers  # noqa: E402

SIDES = layers.FROZEN_BN_IMPLS
KINDS = ("full", "last_k", "linear_probe", "eval")


@contextlib.contextmanager
def frozen_bn(impl: str):
    saved = layers.FROZEN_BN
    layers.FROZEN_BN = impl
    try:
        yield
    finally:
        layers.FROZEN_BN = saved


def measure(name: str, *, px: int, batch: int, kind: str, impl: str, iters: int) -> dict:
    """One side: the trainer's `kind` step of `name` (throughput.py's build)."""
    import throughput

    config = throughput.make_config(
        name, px=px, batch=batch, kind=kind, num_classes=10, compute_dtype="float32"
    )
    with frozen_bn(impl):
        run = throughput.make_run(config, devices=jax.devices())
        host_vars = throughput.random_head(jax.device_get(run.spec.init(jax.random.key(0), px)))
        batch_np = throughput.host_batch(run, batch)
        fn, (first, device_batch) = throughput.step_and_args(config, run, kind, host_vars, batch_np)
        start = time.perf_counter()
        compiled = fn.lower(first, device_batch).compile()
        compile_s = time.perf_counter() - start
    out = jax.block_until_ready(compiled(first, device_batch))  # warm-up; eval keeps `first`
    value = _first_value(kind, out)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(first if kind == "eval" else out[0], device_batch))
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    return {
        "model": name, "px": px, "batch": batch, "kind": kind, "side": impl,
        "compile_s": compile_s, "step_s": step_s, "img_s": batch / step_s,
        "step_bytes": throughput.step_memory(compiled), "value": value,
    }  # fmt: skip


def _first_value(kind: str, out) -> float:
    """The first step's mean loss (train) or the eval batch's mean loss."""
    metrics = out if kind == "eval" else out[1]
    return float(np.mean(jax.device_get(metrics["loss"])))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--models",
        default="efficientnet_lite0@224:32,resnet50@224:16",
        help="comma-separated name[@px][:batch] (throughput.py's entries; 224 px, batch 32)",
    )
    p.add_argument("--kinds", default="full,eval", help=f"step kinds, from {','.join(KINDS)}")
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args(argv)
    import throughput

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
    if not args.kind_list or set(args.kind_list) - set(KINDS) or args.iters < 1:
        p.error(f"--kinds from {KINDS}, --iters >= 1")
    return args


def run(argv=None) -> dict:
    args = parse_args(argv)
    rows = []
    for name, px, batch in args.cases:
        for kind in args.kind_list:
            for impl in SIDES:
                rows.append(measure(name, px=px, batch=batch, kind=kind, impl=impl,
                                    iters=args.iters))  # fmt: skip
    return {"env": {"device": str(jax.devices()[0]), "jax": jax.__version__}, "rows": rows}


def print_table(result: dict) -> None:
    gib = 2**30
    n = len(SIDES)
    head = ["model", "px", "batch", "step"] + [f"{i} s" for i in SIDES]
    head += [f"{i} GiB" for i in SIDES] + [f"compile s ({' / '.join(SIDES)})", "loss diff"]
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
        cells = [base["model"], base["px"], base["batch"], base["kind"], *speed, *mem]
        print(" | ".join(str(c) for c in [*cells, compile_s, f"{diff:.1e}"]))


def main(argv=None) -> None:
    result = run(argv)
    print_table(result)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
