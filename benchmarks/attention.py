"""ViT on the CPU: its attention and GELU forms against jax's own, side by side.

    .venv/bin/python benchmarks/attention.py                       # ViT-B/16's ops + steps
    .venv/bin/python benchmarks/attention.py --kinds eval --steps 2
    .venv/bin/python benchmarks/attention.py --model vit_tiny --px 32 --batch 2 --steps 1

tlflax's ViT (models/vit.py) runs two things its own way on the CPU:
  attention  'jax': jax.nn.dot_product_attention (what accelerators run; tlflax's CPU path
             before 2026-12-08) against 'heads': vit.heads_attention (q, k, v transposed
             heads-major once, the softmax's division after the product with v);
  GELU       'erfc': jax.nn.gelu(approximate=False), 0.5 x erfc(-x / sqrt 2), against
             'erf': vit.gelu, 0.5 x (1 + erf(x / sqrt 2)), PyTorch's own formula.
Ops: --model's attention and MLP activation shapes at --px and --batch, jitted forward and
forward + gradient (a fixed random cotangent), the median of --iters runs, and the largest
difference between the two forms' outputs and gradients. Steps (unless --kinds is empty):
the trainer's own steps (benchmarks/throughput.py's build: SGD, float32) with both old forms
('jax'+'erfc') and with both new ones (the default), one after the other in this process:
compile seconds, the median of --steps step times after one warm-up, XLA step memory, and
the first losses of both (a random head), which agree to float32 rounding. Run as a
script, it re-executes itself once with glibc's huge-page tunable, as the tlflax command does
(tlflax/host_malloc.py).

Prints tables and one JSON line starting with 'RESULT '.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from tlflax import host_malloc  # noqa: E402
from tlflax.models import vit  # noqa: E402

SIDES = ("old", "new")  # 'old': jax's attention and erfc GELU; 'new': tlflax's CPU forms


def erfc_gelu(x):
    return jax.nn.gelu(x, approximate=False)


def jax_attention(qkv):
    return vit.attention(qkv, impl="xla")


OPS = {
    "attention": {"old": jax_attention, "new": vit.heads_attention},
    "gelu": {"old": erfc_gelu, "new": vit.gelu},
}


def model_shapes(model: str, *, px: int, batch: int) -> dict:
    """The (batch, tokens, 3, heads, head_dim) qkv and (batch, tokens, mlp) shapes."""
    arch = {**vit.DEFAULTS, **vit.ARCHS[model]}
    tokens = (px // arch["patch"]) ** 2 + 1  # the class token
    heads, width = arch["heads"], arch["width"]
    return {
        "attention": (batch, tokens, 3, heads, width // heads),
        "gelu": (batch, tokens, arch["mlp_dim"] or 4 * width),
    }


def timed(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def op_row(op: str, shape: tuple, *, iters: int) -> dict:
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    out_shape = jax.eval_shape(OPS[op]["new"], x).shape
    cot = jax.random.normal(jax.random.key(1), out_shape, jnp.float32)
    row = {"op": op, "shape": list(shape)}
    results = {}
    for side in SIDES:
        fn = OPS[op][side]
        fwd = jax.jit(fn)
        grad = jax.jit(lambda x, fn=fn: jax.vjp(fn, x)[1](cot)[0])
        row[f"{side}_fwd_ms"] = timed(fwd, x, iters=iters) * 1e3
        row[f"{side}_grad_ms"] = timed(grad, x, iters=iters) * 1e3
        results[side] = (np.asarray(fwd(x)), np.asarray(grad(x)))
    row["max_diff_out"] = float(np.abs(results["old"][0] - results["new"][0]).max())
    row["max_diff_grad"] = float(np.abs(results["old"][1] - results["new"][1]).max())
    return row


@contextlib.contextmanager
def forms(side: str):
    """ViT's attention and GELU as `side` ('old' or 'new') while models are built and traced."""
    saved = vit.attention, vit.gelu
    if side == "old":
        vit.attention, vit.gelu = functools.partial(saved[0], impl="xla"), erfc_gelu
    try:
        yield
    finally:
        vit.attention, vit.gelu = saved


def step_row(side: str, *, model: str, px: int, batch: int, kind: str, steps: int) -> dict:
    import throughput

    config = throughput.make_config(
        model, px=px, batch=batch, kind=kind, num_classes=10, compute_dtype="float32"
    )
    run = throughput.make_run(config, devices=jax.devices())
    host_vars = throughput.random_head(jax.device_get(run.spec.init(jax.random.key(0), px)))
    batch_np = throughput.host_batch(run, batch)
    with forms(side):
        fn, (first, device_batch) = throughput.step_and_args(config, run, kind, host_vars, batch_np)
        start = time.perf_counter()
        compiled = fn.lower(first, device_batch).compile()
        compile_s = time.perf_counter() - start
    out = jax.block_until_ready(compiled(first, device_batch))  # warm-up
    loss = out["loss"] if kind == "eval" else out[1]["loss"]
    probe = np.asarray(loss, np.float64).ravel()
    times = []
    for _ in range(steps):
        if kind != "eval":
            first = out[0]
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(first, device_batch))
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    return {
        "side": side, "model": model, "px": px, "batch": batch, "kind": kind,
        "compile_s": compile_s, "step_s": step_s, "img_s": batch / step_s,
        "step_bytes": throughput.step_memory(compiled), "probe": probe.tolist(),
    }  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_b16", choices=sorted(vit.ARCHS))
    p.add_argument("--px", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--iters", type=int, default=5, help="timed runs of each op")
    p.add_argument("--kinds", default="eval,full", help="trainer steps to time ('' for none)")
    p.add_argument("--steps", type=int, default=3, help="timed steps of each kind and side")
    return p.parse_args(argv)


def run(argv=None) -> dict:
    args = parse_args(argv)
    shapes = model_shapes(args.model, px=args.px, batch=args.batch)
    ops = [op_row(op, shapes[op], iters=args.iters) for op in OPS]
    steps = []
    for kind in [k for k in args.kinds.split(",") if k]:
        pair = [
            step_row(side, model=args.model, px=args.px, batch=args.batch, kind=kind,
                     steps=args.steps)
            for side in SIDES
        ]  # fmt: skip
        diff = np.abs(np.subtract(pair[0].pop("probe"), pair[1].pop("probe"))).max()
        for row in pair:
            row["max_diff_loss"] = float(diff)
        pair[1]["speedup"] = pair[0]["step_s"] / pair[1]["step_s"]
        steps += pair
    env = {"device": str(jax.devices()[0]), "jax": jax.__version__, "model": args.model,
           "px": args.px, "batch": args.batch,
           "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}  # fmt: skip
    return {"env": env, "ops": ops, "steps": steps}


def print_tables(result: dict) -> None:
    env = result["env"]
    print(f"{env['model']} @{env['px']}, batch {env['batch']}, {env['device']}: old = jax's "
          "attention + erfc GELU, new = tlflax's CPU forms")  # fmt: skip
    print("op | shape | old fwd ms | new fwd ms | old fwd+grad ms | new fwd+grad ms | max diff")
    for r in result["ops"]:
        print(f"{r['op']} | {tuple(r['shape'])} | {r['old_fwd_ms']:.1f} | {r['new_fwd_ms']:.1f}"
              f" | {r['old_grad_ms']:.1f} | {r['new_grad_ms']:.1f}"
              f" | {max(r['max_diff_out'], r['max_diff_grad']):.1e}")  # fmt: skip
    if result["steps"]:
        print("step | side | compile s | step s | img/s | XLA step memory | speedup | loss diff")
    for s in result["steps"]:
        speedup = f"{s['speedup']:.2f}x" if "speedup" in s else ""
        print(f"{s['kind']} | {s['side']} | {s['compile_s']:.1f} | {s['step_s']:.3f}"
              f" | {s['img_s']:.2f} | {s['step_bytes'] / 2**30:.2f} GiB | {speedup}"
              f" | {s['max_diff_loss']:.1e}")  # fmt: skip


def main(argv=None) -> None:
    if argv is None:
        host_malloc.reexec_tuned()  # both sides run as the tlflax command runs them
    result = run(argv)
    print_tables(result)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
