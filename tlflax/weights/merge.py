"""Merge converted checkpoint variables into initialised ones, failing loudly."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from tlflax import tree
from tlflax.errors import UserError
from tlflax.weights.common import UNEXPECTED_PREFIX, Converted

_SHOW = 20  # names listed per category in an error


@dataclasses.dataclass
class LoadReport:
    scheme: str
    loaded: list[str]
    reinitialised: list[str]  # matched `reinit`: kept at their fresh init on purpose
    dropped: list[str]  # checkpoint names matched by `reinit` (e.g. the ImageNet head)
    ignored: dict[str, str]  # checkpoint keys the converter left out on purpose, with why

    def summary(self) -> str:
        return (
            f"{len(self.loaded)} arrays loaded ({self.scheme}), "
            f"{len(self.reinitialised)} re-initialised, {len(self.dropped)} checkpoint arrays "
            f"replaced, {len(self.ignored)} ignored"
        )


class CheckpointMismatchError(UserError, ValueError):
    """The checkpoint does not fit the model: lists what is missing, unexpected or misshapen."""


def _strip_collection(name: str) -> str:
    return name.split("/", 1)[1] if "/" in name else name


def merge_variables(
    converted: Converted, variables: dict, *, reinit: Sequence[str] = ()
) -> tuple[dict, LoadReport]:
    """Returns new variables: the checkpoint's arrays where the model has them.

    `variables` may be abstract (jax.ShapeDtypeStruct leaves, from jax.eval_shape of the
    init): only shapes and dtypes are read, and the leaves `reinit` keeps stay as given
    (ModelSpec.fill_init then initialises them).

    `reinit` regexes (full match over names without the collection, e.g. 'head/.*')
    mark what is deliberately replaced by the fresh init. Everything else must be
    in the checkpoint with the same shape, and the checkpoint may hold nothing more.
    """
    patterns = [re.compile(p) for p in reinit]

    def is_reinit(name):
        return any(p.fullmatch(_strip_collection(name)) for p in patterns)

    init_flat = tree.flatten(variables)
    ckpt = converted.variables
    unconverted = sorted(k for k in ckpt if k.startswith(UNEXPECTED_PREFIX))
    unexpected = sorted(k for k in ckpt if k not in init_flat and not k.startswith("?"))
    unexpected = [k for k in unexpected if not is_reinit(k)]
    missing, mismatched, loaded, reinitialised = [], [], [], []
    merged = {}
    for name, init in init_flat.items():
        if is_reinit(name):
            merged[name] = init
            reinitialised.append(name)
        elif name not in ckpt:
            missing.append(name)
        elif tuple(np.shape(ckpt[name])) != tuple(np.shape(init)):
            shapes = f"checkpoint {np.shape(ckpt[name])} vs model {np.shape(init)}"
            mismatched.append(f"{name}: {shapes}")
        else:
            merged[name] = np.asarray(ckpt[name]).astype(np.dtype(init.dtype))
            loaded.append(name)
    problems = _describe(missing, unexpected + unconverted, mismatched)
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint ({converted.scheme} naming) does not fit the model:\n{problems}\n"
            "Check the model name and its options match the checkpoint (depth, width, patch, "
            "pooling); names deliberately replaced belong in weights.reinit."
        )
    dropped = sorted(k for k in ckpt if is_reinit(k))
    report = LoadReport(converted.scheme, loaded, reinitialised, dropped, dict(converted.ignored))
    return tree.unflatten(merged), report


def _describe(missing, unexpected, mismatched) -> str:
    parts = []
    for title, items in (
        ("missing from the checkpoint", missing),
        ("unexpected in the checkpoint", unexpected),
        ("shape mismatch", mismatched),
    ):
        if items:
            shown = "\n    ".join(items[:_SHOW])
            more = f"\n    ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
            parts.append(f"  {len(items)} {title}:\n    {shown}{more}")
    return "\n".join(parts)
