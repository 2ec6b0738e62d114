"""model.remat: full fine-tuning with every block's activations kept, or recomputed.

    .venv/bin/python benchmarks/remat.py               # Lite0 and ResNet-50: full, last_k
    .venv/bin/python benchmarks/remat.py --models efficientnet_lite_tiny@32:4 --iters 1

A full fine-tuning step keeps, for its backward pass, what every layer's gradient needs:
activation memory grows with depth, resolution and batch. With model.remat each block (a
VGG's stage) runs under jax.checkpoint (models/layers.py: block_call): the forward keeps
only the blocks' inputs, and the backward pass recomputes one block's activations at a
time from them, one more forward pass of compute. Two sides, timed one after the other in
this process on the trainer's own jitted steps (benchmarks/sides.py: float32, SGD, a
synthetic batch, a random head): `off` (the default) and `on`. The step's loss is the same.
The last_k step (only the last stage trains) is the memory a frozen backbone needs.

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

KINDS = ("full", "last_k")


def parse_args(argv=None):
    return sides.parse_args(
        argv, description=__doc__.split("\n")[0], kinds=KINDS, default_kinds="full,last_k"
    )


def _remat(on: bool):
    def prepare(config):
        config.model.remat = on
        return contextlib.nullcontext()

    return prepare


SIDES = {"off": _remat(False), "on": _remat(True)}


def main(argv=None) -> None:
    sides.main(parse_args(argv), SIDES)


if __name__ == "__main__":
    main()
