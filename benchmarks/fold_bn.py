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

import contextlib
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import sides  # noqa: E402

from tlflax.models import layers  # noqa: E402

SIDES = layers.FROZEN_BN_IMPLS


@contextlib.contextmanager
def frozen_bn(impl: str):
    saved = layers.FROZEN_BN
    layers.FROZEN_BN = impl
    try:
        yield
    finally:
        layers.FROZEN_BN = saved


def parse_args(argv=None):
    return sides.parse_args(argv, description=__doc__.split("\n")[0])


def _sides() -> dict:
    return {impl: lambda config, impl=impl: frozen_bn(impl) for impl in SIDES}


def main(argv=None) -> None:
    sides.main(parse_args(argv), _sides())


if __name__ == "__main__":
    main()
