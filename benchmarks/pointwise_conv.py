"""1x1 convolutions: flax nn.Conv against tlflax's PointwiseConv (a dot), same parameters.

    .venv/bin/python benchmarks/pointwise_conv.py            # Lite0 shapes, batch 64
    .venv/bin/python benchmarks/pointwise_conv.py --batch 16 --iters 3

For the 1x1 layers of EfficientNet-Lite0 at 96 px (and ResNet-50's at 56 px) it times, on
whatever device JAX finds, the forward pass and the gradient with respect to the kernel
and the input, each jitted, side by side in this process, and checks both give the same
numbers. Prints a table, then one JSON line starting with 'RESULT '.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tlflax.models.layers import PointwiseConv  # noqa: E402

# (name, spatial side, in channels, out channels)
SHAPES = (
    ("lite0 stage3 expand 12px", 12, 40, 240),
    ("lite0 stage5 project 6px", 6, 672, 112),
    ("lite0 stage2 expand 24px", 24, 24, 144),
    ("resnet50 layer1 conv3 56px", 56, 64, 256),
)


def timed(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    start = time.perf_counter()
    for _ in range(iters):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / iters * 1000


def measure(side, c_in, c_out, *, batch: int, iters: int) -> dict:
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, side, side, c_in)), jnp.float32)
    conv = nn.Conv(c_out, (1, 1), use_bias=False)
    dot = PointwiseConv(c_out)
    params = conv.init(jax.random.key(0), x)
    row = {}
    for name, module in (("conv", conv), ("dot", dot)):

        def loss(p, x, module=module):
            return jnp.sum(jnp.square(module.apply(p, x)))

        fwd = jax.jit(module.apply)
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        row[f"{name}_fwd_ms"] = timed(fwd, params, x, iters=iters)
        row[f"{name}_grad_ms"] = timed(grad, params, x, iters=iters)
        row[f"_{name}_out"] = np.asarray(fwd(params, x))
    row["max_abs_diff"] = float(np.abs(row.pop("_conv_out") - row.pop("_dot_out")).max())
    row["grad_speedup"] = row["conv_grad_ms"] / row["dot_grad_ms"]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args(argv)
    rows = []
    for name, side, c_in, c_out in SHAPES:
        row = measure(side, c_in, c_out, batch=args.batch, iters=args.iters)
        rows.append({"layer": name, **{k: round(v, 4) for k, v in row.items()}})
    cols = ["conv_fwd_ms", "dot_fwd_ms", "conv_grad_ms", "dot_grad_ms", "grad_speedup"]
    print(f"{'layer':<28}" + "".join(f"{c:>14}" for c in cols) + f"{'max diff':>10}")
    for r in rows:
        print(f"{r['layer']:<28}" + "".join(f"{r[c]:>14.2f}" for c in cols)
              + f"{r['max_abs_diff']:>10.1e}")  # fmt: skip
    result = {"device": jax.default_backend(), "batch": args.batch, "rows": rows}
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
