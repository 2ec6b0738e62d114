"""ViT on the CPU: its attention and GELU forms against jax's own, side by side.

    .venv/bin/python benchmarks/attention.py                       # ViT-B/16's ops + steps
    .venv/bin/python benchmarks/attention.py --kinds eval --iters 2
    .venv/bin/python benchmarks/attention.py --models vit_tiny@32:2 --iters 1

tlflax's ViT (models/vit.py) runs two things its own way on the CPU:
  attention  'old': jax.nn.dot_product_attention (what accelerators run; tlflax's CPU path
             before 2026-12-08) against 'new': vit.heads_attention (q, k, v transposed
             heads-major once, the softmax's division after the product with v);
  GELU       'old': jax.nn.gelu(approximate=False), 0.5 x erfc(-x / sqrt 2), against
             'new': vit.gelu, 0.5 x (1 + erf(x / sqrt 2)), PyTorch's own formula.
Ops: each --models entry's attention and MLP activation shapes, jitted forward and forward +
gradient (a fixed random cotangent), the median of --op-iters runs, and the largest
difference between the two forms' outputs and gradients. Steps: the trainer's own steps with
both old forms and with both new ones (the default), one after the other in this process
(benchmarks/sides.py: float32, SGD, a random head, a synthetic batch; the first losses agree
to float32 rounding). Run as a script, it re-executes itself once with glibc's huge-page
tunable, as the tlflax command does (tlflax/host_malloc.py).

Prints tables and one JSON line starting with 'RESULT '.
"""

from __future__ import annotations

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

import sides  # noqa: E402

from tlflax import host_malloc  # noqa: E402
from tlflax.models import vit  # noqa: E402


def erfc_gelu(x):
    return jax.nn.gelu(x, approximate=False)


def jax_attention(qkv):
    return vit.attention(qkv, impl="xla")


OPS = {
    "attention": {"old": jax_attention, "new": vit.heads_attention},
    "gelu": {"old": erfc_gelu, "new": vit.gelu},
}


@contextlib.contextmanager
def old_forms():
    """ViT's attention and GELU as jax's own while models are built and traced."""
    saved = vit.attention, vit.gelu
    vit.attention, vit.gelu = functools.partial(saved[0], impl="xla"), erfc_gelu
    try:
        yield
    finally:
        vit.attention, vit.gelu = saved


SIDES = {"old": lambda config: old_forms(), "new": lambda config: contextlib.nullcontext()}


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
    for side, fn in OPS[op].items():
        fwd = jax.jit(fn)
        grad = jax.jit(lambda x, c, fn=fn: jax.vjp(fn, x)[1](c)[0])
        row[f"{side}_fwd_ms"] = timed(fwd, x, iters=iters) * 1e3
        row[f"{side}_grad_ms"] = timed(grad, x, cot, iters=iters) * 1e3
        results[side] = (np.asarray(fwd(x)), np.asarray(grad(x, cot)))
    row["max_diff_out"] = float(np.abs(results["old"][0] - results["new"][0]).max())
    row["max_diff_grad"] = float(np.abs(results["old"][1] - results["new"][1]).max())
    return row


def parse_args(argv=None):
    def extra(p):
        p.add_argument("--op-iters", type=int, default=5, help="timed runs of each op")

    args = sides.parse_args(argv, description=__doc__.split("\n")[0],
                            default_models="vit_b16@224:16", extra=extra)  # fmt: skip
    for name, _, _ in args.cases:
        if name not in vit.ARCHS:
            args.error(f"--models: {name!r} is not a ViT ({', '.join(sorted(vit.ARCHS))})")
    return args


def run(argv=None) -> dict:
    args = parse_args(argv)
    ops = [
        {"model": name, "px": px, "batch": batch, **op_row(op, shape, iters=args.op_iters)}
        for name, px, batch in args.cases
        for op, shape in model_shapes(name, px=px, batch=batch).items()
    ]
    result = sides.run(args, SIDES)
    result["env"]["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
    return {**result, "ops": ops}


def print_tables(result: dict) -> None:
    print("old = jax's attention + erfc GELU, new = tlflax's CPU forms")
    print("model | op | shape | old fwd ms | new fwd ms | old fwd+grad ms | new fwd+grad ms"
          " | max diff")  # fmt: skip
    for r in result["ops"]:
        print(f"{r['model']} @{r['px']} | {r['op']} | {tuple(r['shape'])} | {r['old_fwd_ms']:.1f}"
              f" | {r['new_fwd_ms']:.1f} | {r['old_grad_ms']:.1f} | {r['new_grad_ms']:.1f}"
              f" | {max(r['max_diff_out'], r['max_diff_grad']):.1e}")  # fmt: skip
    sides.print_table(result)


def main(argv=None) -> None:
    if argv is None:
        host_malloc.reexec_tuned()  # both sides run as the tlflax command runs them
    result = run(argv)
    print_tables(result)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
