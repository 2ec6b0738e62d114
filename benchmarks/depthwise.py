"""The CPU's depthwise conv: autodiff of the shifted-slice sum against its own backward pass.

    .venv/bin/python benchmarks/depthwise.py                       # Lite0's layers + its step
    .venv/bin/python benchmarks/depthwise.py --batch 4 --px 64 --no-step   # a smoke run

tlflax runs depthwise convolutions on the CPU as sums of k*k shifted, strided slices
(models/layers.py). Three ways to differentiate them are timed side by side in this process:
  autodiff  jax.grad through the sum (tlflax before 2026-12-07): every slice of the input
            is a residual of the forward pass, k*k copies of the activation;
  shifts    layers.depthwise_by_shifts, its custom VJP: keeps the input, recomputes the
            slices for the weight gradient in ~1 MiB chunks of output rows;
  conv      XLA's grouped convolution (feature_group_count = channels), what 'conv' runs.
Per layer (EfficientNet-Lite0's 16 depthwise layers at --px), the jitted forward + both
gradients: best of --iters seconds and XLA's temporary buffer size; the three agree to 1e-4.
Then (unless --no-step) the trainer's own full fine-tuning step of Lite0 with the first two,
the same way benchmarks/throughput.py builds it (SGD, float32): step time and XLA step memory.

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
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from tlflax.models import layers  # noqa: E402

# EfficientNet-Lite0's depthwise layers at 224 px: (side, channels, kernel, stride)
LITE0 = (
    (112, 32, 3, 1), (112, 96, 3, 2), (56, 144, 3, 1), (56, 144, 5, 2), (28, 240, 5, 1),
    (28, 240, 3, 2), (14, 480, 3, 1), (14, 480, 3, 1), (14, 480, 5, 1), (14, 672, 5, 1),
    (14, 672, 5, 1), (14, 672, 5, 2), (7, 1152, 5, 1), (7, 1152, 5, 1), (7, 1152, 5, 1),
    (7, 1152, 3, 1),
)  # fmt: skip
IMPLS = ("autodiff", "shifts", "conv")


def autodiff_shifts(x, w, *, stride: int, pads):
    """The sum of shifted slices, differentiated by jax.grad (no custom VJP)."""
    xp = layers._pad_hw(x, pads)
    k = w.shape[0]
    out_h, out_w = (xp.shape[1] - k) // stride + 1, (xp.shape[2] - k) // stride + 1
    return layers._shift_sum(xp, w, stride, out_h, out_w).astype(x.dtype)


def grouped_conv(x, w, *, stride: int, pads):
    return jax.lax.conv_general_dilated(
        x, w[:, :, None, :], (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )  # fmt: skip


FNS = {"autodiff": autodiff_shifts, "shifts": layers.depthwise_by_shifts, "conv": grouped_conv}


def layer_row(side: int, channels: int, k: int, stride: int, *, batch: int, iters: int) -> dict:
    x = jax.random.normal(jax.random.key(0), (batch, side, side, channels))
    w = jax.random.normal(jax.random.key(1), (k, k, channels))
    pads = [layers.same_pads(side, k, stride)] * 2
    out = -(-side // stride)
    cot = jax.random.normal(jax.random.key(2), (batch, out, out, channels))
    row = {"side": side, "channels": channels, "kernel": k, "stride": stride}
    ref = None
    for impl in IMPLS:
        fn = FNS[impl]

        def loss(x, w, fn=fn):
            return jnp.sum(fn(x, w, stride=stride, pads=pads) * cot)

        compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(x, w).compile()
        result = jax.block_until_ready(compiled(x, w))
        flat = [np.asarray(a) for a in jax.tree.leaves(result)]
        if ref is None:
            ref = flat
        else:
            for a, b in zip(flat, ref, strict=True):
                assert np.max(np.abs(a - b)) <= 1e-4 * max(1.0, np.max(np.abs(b))), impl
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            jax.block_until_ready(compiled(x, w))
            times.append(time.perf_counter() - start)
        row[f"{impl}_s"] = min(times)
        row[f"{impl}_temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
    return row


@contextlib.contextmanager
def depthwise_impl(fn):
    saved = layers.depthwise_by_shifts
    layers.depthwise_by_shifts = fn
    try:
        yield
    finally:
        layers.depthwise_by_shifts = saved


def step_row(impl: str, *, px: int, batch: int, iters: int) -> dict:
    """The trainer's full step of Lite0 (throughput.py's build), with `impl`'s depthwise."""
    import throughput

    config = throughput.make_config(
        "efficientnet_lite0", px=px, batch=batch, kind="full", num_classes=10,
        compute_dtype="float32",
    )  # fmt: skip
    with depthwise_impl(FNS[impl]):
        run = throughput.make_run(config, devices=jax.devices())
        host_vars = jax.device_get(run.spec.init(jax.random.key(0), px))
        batch_np = throughput.host_batch(run, batch)
        fn, (st, device_batch) = throughput.step_and_args(config, run, "full", host_vars, batch_np)
        start = time.perf_counter()
        compiled = fn.lower(st, device_batch).compile()
        compile_s = time.perf_counter() - start
    st, _ = jax.block_until_ready(compiled(st, device_batch))  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        st, _ = jax.block_until_ready(compiled(st, device_batch))
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    return {
        "impl": impl, "px": px, "batch": batch, "compile_s": compile_s, "step_s": step_s,
        "img_s": batch / step_s, "step_bytes": throughput.step_memory(compiled),
    }  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--px", type=int, default=224, help="input side; layer sides scale with it")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--no-step", action="store_true", help="the layers only, not Lite0's step")
    return p.parse_args(argv)


def run(argv=None) -> dict:
    args = parse_args(argv)
    scale = args.px / 224
    layer_rows = []
    for side, channels, k, stride in LITE0:
        side = max(1, round(side * scale))
        layer_rows.append(layer_row(side, channels, k, stride, batch=args.batch, iters=args.iters))
    steps = []
    if not args.no_step:
        steps = [step_row(i, px=args.px, batch=args.batch, iters=args.iters) for i in IMPLS[:2]]
    return {
        "env": {"device": str(jax.devices()[0]), "jax": jax.__version__, "batch": args.batch},
        "layers": layer_rows, "steps": steps,
    }  # fmt: skip


def print_tables(result: dict) -> None:
    mib = 2**20
    print(f"Lite0 depthwise layers, batch {result['env']['batch']}: forward + both gradients")
    head = ["side", "C", "k", "s"] + [f"{i} ms" for i in IMPLS] + [f"{i} MiB" for i in IMPLS]
    print(" | ".join(head))
    totals = dict.fromkeys(IMPLS, 0.0)
    for r in result["layers"]:
        cells = [r["side"], r["channels"], r["kernel"], r["stride"]]
        cells += [f"{r[f'{i}_s'] * 1e3:.1f}" for i in IMPLS]
        cells += [f"{r[f'{i}_temp_bytes'] / mib:.0f}" for i in IMPLS]
        print(" | ".join(str(c) for c in cells))
        for i in IMPLS:
            totals[i] += r[f"{i}_s"]
    print("sum of layers: " + ", ".join(f"{i} {t * 1e3:.0f} ms" for i, t in totals.items()))
    for s in result["steps"]:
        print(
            f"Lite0 full step @{s['px']} batch {s['batch']}, {s['impl']}: {s['step_s']:.3f} s"
            f" ({s['img_s']:.1f} img/s), XLA step memory {s['step_bytes'] / 2**30:.2f} GiB,"
            f" compile {s['compile_s']:.1f} s"
        )


def main(argv=None) -> None:
    result = run(argv)
    print_tables(result)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
