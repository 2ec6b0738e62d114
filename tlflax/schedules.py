"""Learning-rate schedules and durations given in steps or epochs.

A duration is a pair of config keys, `<what>_steps` and `<what>_epochs`; at most one
may be set, and `steps_of` turns it into steps once, from steps_per_epoch. A schedule
is linear warmup, then one of SCHEDULES, over one optimisation phase; its lr_fn maps
the trainer's global step to the learning rate (it runs inside jit and on the host).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from tlflax.errors import ConfigError

SCHEDULES = ("constant", "cosine", "linear", "step", "inverse_time")
# The schedule keys of config.optim; a group rule's `schedule` override may set any of them.
KEYS = (
    "schedule",
    "warmup_steps",
    "warmup_epochs",
    "end_lr_mult",
    "decay_rate",
    "decay_every_steps",
    "decay_every_epochs",
)


def steps_of(values: Mapping[str, Any], what: str, *, steps_per_epoch: int, where: str) -> int:
    """`<what>_steps` or `<what>_epochs` (at most one set) in steps; 0 when neither is."""
    steps, epochs = values[f"{what}_steps"], values[f"{what}_epochs"]
    if steps < 0 or epochs < 0:
        raise ConfigError(f"{where}.{what}_steps / _epochs must be >= 0, got {steps} / {epochs}")
    if steps and epochs:
        raise ConfigError(
            f"{where}: both {what}_steps={steps} and {what}_epochs={epochs} are set; "
            "give the duration in one unit only (set the other to 0)"
        )
    if epochs:
        return max(1, round(epochs * steps_per_epoch))
    return int(steps)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A schedule with every duration in steps, over a phase of `length` steps."""

    kind: str
    length: int
    warmup: int
    end_lr_mult: float
    decay_rate: float
    decay_every: int

    def describe(self) -> str:
        text = self.kind
        if self.kind in ("step", "inverse_time"):
            text += f"(rate {self.decay_rate:g} / {self.decay_every} steps)"
        elif self.kind in ("cosine", "linear"):
            text += f"(to {self.end_lr_mult:g} x)"
        return text + (f", warmup {self.warmup}" if self.warmup else "")


def resolve(values: Mapping[str, Any], *, steps_per_epoch: int, length: int, where: str):
    """Schedule keys (config.optim, maybe with a group's overrides) -> Schedule in steps."""
    kind = values["schedule"]
    if kind not in SCHEDULES:
        raise ConfigError(f"{where}.schedule={kind!r} is unknown; use one of {SCHEDULES}")
    warmup = steps_of(values, "warmup", steps_per_epoch=steps_per_epoch, where=where)
    every = steps_of(values, "decay_every", steps_per_epoch=steps_per_epoch, where=where)
    if warmup and warmup >= length:
        raise ConfigError(
            f"{where}: warmup of {warmup} steps does not fit in a phase of {length} steps; "
            "shorten warmup_steps / warmup_epochs"
        )
    if kind in ("step", "inverse_time") and every < 1:
        raise ConfigError(
            f"{where}.schedule={kind!r} needs decay_every_steps or decay_every_epochs > 0 "
            "(Keras' legacy `decay` argument is inverse_time with decay_every_steps=1)"
        )
    if not 0 <= values["end_lr_mult"] <= 1:
        raise ConfigError(f"{where}.end_lr_mult must be in [0, 1], got {values['end_lr_mult']}")
    if values["decay_rate"] < 0:
        raise ConfigError(f"{where}.decay_rate must be >= 0, got {values['decay_rate']}")
    return Schedule(
        kind=kind,
        length=length,
        warmup=warmup,
        end_lr_mult=float(values["end_lr_mult"]),
        decay_rate=float(values["decay_rate"]),
        decay_every=every,
    )


def make_lr_fn(schedule: Schedule, *, peak_lr: float, start_step: int) -> Callable:
    """global step -> learning rate (float32): `peak_lr` x warmup x decay, from `start_step`."""
    peak = float(peak_lr)

    def lr_fn(step):
        t = jnp.asarray(step, jnp.float32) - start_step
        factor = _decay_factor(schedule, jnp.maximum(t - schedule.warmup, 0.0))
        if schedule.warmup:
            # The first step already moves (at peak / warmup); step `warmup` reaches the peak.
            factor = factor * jnp.clip((t + 1.0) / schedule.warmup, 0.0, 1.0)
        return jnp.float32(peak) * factor

    return lr_fn


def _decay_factor(s: Schedule, u):
    """The multiplier of the peak `u` steps after warmup."""
    span = max(s.length - s.warmup, 1)
    progress = jnp.clip(u / span, 0.0, 1.0)
    if s.kind == "constant":
        return jnp.ones_like(u)
    if s.kind == "cosine":
        return s.end_lr_mult + (1.0 - s.end_lr_mult) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    if s.kind == "linear":
        return 1.0 + (s.end_lr_mult - 1.0) * progress
    if s.kind == "step":  # Keras ExponentialDecay(staircase=True)
        return jnp.power(jnp.float32(s.decay_rate), jnp.floor(u / s.decay_every))
    return 1.0 / (1.0 + s.decay_rate * u / s.decay_every)  # Keras InverseTimeDecay
