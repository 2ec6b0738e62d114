"""The train state: arrays only, so a checkpoint is plain data and resume is exact."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    batch_stats: Any  # {} for models without BatchNorm
    opt_state: Any
    rng: jax.Array  # raw uint32 key data (jax.random.key_data), folded with the step


def create(*, variables: dict, tx, seed: int) -> TrainState:
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def variables_of(state: TrainState) -> dict:
    if state.batch_stats:
        return {"params": state.params, "batch_stats": state.batch_stats}
    return {"params": state.params}


def step_rngs(state: TrainState, names: tuple[str, ...]) -> dict[str, jax.Array]:
    """Per-step keys derived from (seed, step): a resumed run draws the same ones."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    return dict(zip(names, jax.random.split(key, len(names)), strict=True))


def head_part(state: TrainState) -> TrainState:
    """The state without the backbone: its parameters as empty optax.MaskedNode entries (the
    optimizer state has nothing for frozen leaves either) and no statistics. What a step of
    the head alone on cached features reads and writes; also maps a tree of shardings."""
    masked = jax.tree_util.tree_map(lambda _: optax.MaskedNode(), state.params["backbone"])
    return state.replace(params={**state.params, "backbone": masked}, batch_stats={})


def with_head(whole: TrainState, part: TrainState) -> TrainState:
    """`whole` with the head, optimizer state, step and rng of `part` (from head_part)."""
    params = {**whole.params, "head": part.params["head"]}
    return whole.replace(step=part.step, params=params, opt_state=part.opt_state, rng=part.rng)
