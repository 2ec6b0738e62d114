"""Orbax checkpoints of the whole train state: save, keep the last K plus the best K, restore.

A thin wrapper over `orbax.checkpoint.CheckpointManager` that adds what the trainer relies on:

- retention is "last `keep_last` OR best `keep_best` by one metric": a checkpoint that is among
  the best survives when it falls out of the last K;
- a step is visible only once it is complete: orbax writes into `<step>.orbax-checkpoint-tmp`
  and renames it at the end, so a crash mid-write (even SIGKILL during an asynchronous save)
  leaves no step that `latest_step()` reports, and stale temporary directories are removed the
  next time a Checkpointer opens the directory;
- restoring into a state of another shape fails with the names of the leaves that differ,
  instead of an orbax traceback (or, worse, a silent pad/truncate).

Every process of a multi-host run must call `save` / `wait` / `close` (orbax synchronises them).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocp_policies

from tlflax import fs
from tlflax.errors import UserError

STATE_ITEM = "state"  # <directory>/<step>/state/ holds the train state
# <directory>/<step>/data/ holds where the train split's reader stands (JSON, written by
# process 0: every host computes its own share from the same global position).
DATA_ITEM = "data"


# Orbax writes a leaf replicated over N devices as N slices, one per replica, each cut out by
# an eager slice dispatch ("replica-parallel"). That spreads a large leaf's write over the
# hosts of a pod; for the hundreds of small leaves of a transfer-learning state (biases,
# BatchNorm, the head, their optimizer moments) it is only dispatch overhead: 300 small leaves
# replicated over 8 CPU devices took 2.3 s per save, 0.9 s written whole (2026-12-07), and a
# 20-step CLI run of tests/tiny_config.py on 8 devices went from 29 s to 21 s. Leaves whose
# per-replica slice would be under this size are written by one replica.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _use_replica_parallel_for_large_leaves_only() -> None:
    default = ocp.type_handlers.get_type_handler(jax.Array)
    if getattr(default, "_min_slice_bytes_for_replica_parallel", 0):
        return  # already set (by this function, or by the user's own handler)
    try:
        handler = ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
            # orbax's default handler keeps per-array metadata; so does this one
            array_metadata_store=getattr(default, "_array_metadata_store", None),
        )
    except TypeError:  # an orbax without these options: its defaults stay
        return
    absl_logger = logging.getLogger("absl")  # orbax warns of every override it is asked for
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_logger.setLevel(level)


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint's tree does not fit the state it is restored into."""


class Checkpointer:
    """Saves and restores the train state in `directory` (one subdirectory per step)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep_last: int,
        keep_best: int,
        best_metric: str,
        best_mode: str,
        async_save: bool,
    ):
        if keep_last < 1:
            raise ValueError(
                f"Checkpointer: keep_last={keep_last}; it must be >= 1, or the checkpoint "
                "just written (the one a restart resumes from) is deleted at once"
            )
        if keep_best < 0:
            raise ValueError(f"Checkpointer: keep_best={keep_best}; it must be >= 0")
        if best_mode not in ("max", "min"):
            raise ValueError(f"Checkpointer: best_mode={best_mode!r}; use 'max' or 'min'")
        self.directory = _absolute(directory)
        self.best_metric = best_metric
        self.best_mode = best_mode
        best_fn = self._metric_value
        retention = ocp_policies.AnyPreservationPolicy(
            [
                ocp_policies.LatestN(n=keep_last),
                # Sorted ascending; BestN keeps the last n, so 'min' needs the reverse order.
                ocp_policies.BestN(
                    get_metric_fn=best_fn,
                    reverse=best_mode == "min",
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            best_fn=best_fn,  # orbax's best_step() and metrics writing need it
            best_mode=best_mode,
            preservation_policy=retention,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of a crashed save
            create=True,
        )
        _use_replica_parallel_for_large_leaves_only()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=(STATE_ITEM, DATA_ITEM),
            item_handlers={
                STATE_ITEM: ocp.StandardCheckpointHandler(),
                DATA_ITEM: ocp.JsonCheckpointHandler(),
            },
        )

    def _metric_value(self, metrics: Mapping[str, Any]) -> float:
        if self.best_metric not in metrics:
            raise KeyError(
                f"checkpoint metrics in {self.directory} have no {self.best_metric!r} "
                f"(they have {sorted(metrics)}); pass it in save(metrics=...)"
            )
        return float(metrics[self.best_metric])

    # ------------------------------------------------------------------ save

    def save(
        self,
        step: int,
        state: Any,
        *,
        metrics: Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> None:
        """Writes `state` as checkpoint `step` (in the background if async_save).

        `metrics` rank the checkpoint for keep_best / best_step (they must hold best_metric);
        a checkpoint saved without them is kept by recency only. `data`: the data position
        (JSON-able; data.splits.position), read back by data_position(step). `step` must be
        newer than the latest checkpoint; force=True writes it anyway, replacing one at the
        same step.
        """
        step = int(step)
        if metrics is not None:
            metrics = {name: _json_number(name, value) for name, value in metrics.items()}
            self._metric_value(metrics)  # fail before anything is written
        latest = self.latest_step()
        if latest is not None and step <= latest:
            if not force:
                raise ValueError(
                    f"checkpoint step {step} is not after the latest step {latest} in "
                    f"{self.directory}; pass force=True to write it anyway (replacing a "
                    "checkpoint at the same step)"
                )
            if step in self._manager.all_steps():
                self._manager.wait_until_finished()
                self._manager.delete(step)
        items = {STATE_ITEM: ocp.args.StandardSave(state)}
        if data is not None:
            items[DATA_ITEM] = ocp.args.JsonSave(dict(data))
        # force=True below only bypasses orbax's save-interval policy; the checks are above.
        self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def wait(self) -> None:
        """Blocks until an asynchronous save is complete on disk (raises its error, if any)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ------------------------------------------------------------------ query

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best best_metric; None when no checkpoint has metrics."""
        return self._manager.best_step()

    def metrics(self, step: int) -> dict | None:
        return self._manager.metrics(step)

    # ------------------------------------------------------------------ restore

    def restore(self, step: int, *, abstract_state: Any) -> Any:
        """Reads checkpoint `step` into the structure, dtypes and shardings of abstract_state.

        abstract_state: jax.eval_shape(...) of the state, or a tree of jax.ShapeDtypeStruct
        with shardings. Leaves without a sharding are restored replicated over all devices.
        """
        self.wait()  # the step may still be being written by this process
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no complete checkpoint at step {step} in {self.directory} "
                f"(complete steps: {self.all_steps()})"
            )
        abstract_state = _with_default_shardings(abstract_state)
        saved = self._manager.item_metadata(step)[STATE_ITEM]
        check_fits(saved, abstract_state, where=f"{self.directory}/{step}")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_state)}),
        )
        return restored[STATE_ITEM]

    def data_position(self, step: int) -> dict | None:
        """The data position saved with checkpoint `step`; None when it has none (saved
        before positions were, or without one)."""
        self.wait()
        if not (self.directory / str(int(step)) / DATA_ITEM).exists():
            return None
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{DATA_ITEM: ocp.args.JsonRestore()})
        )
        return dict(restored[DATA_ITEM])

    def restore_latest(self, abstract_state: Any) -> Any:
        return self.restore(self._need(self.latest_step()), abstract_state=abstract_state)

    def restore_best(self, abstract_state: Any) -> Any:
        return self.restore(self._need(self.best_step()), abstract_state=abstract_state)

    def _need(self, step: int | None) -> int:
        if step is None:
            raise FileNotFoundError(
                f"no complete checkpoint (with metrics, for the best) in {self.directory}"
            )
        return step


def _absolute(directory: str | os.PathLike) -> epath.Path:
    # Cloud paths (gs://...) pass through; a local relative path would depend on the cwd; a
    # scheme epath cannot open is an error, not a local folder named after it.
    return fs.path(directory, what="checkpoint directory")


def _json_number(name: str, value: Any) -> float:
    try:
        number = float(np.asarray(value))  # python, numpy and jax scalars alike
    except (TypeError, ValueError) as err:
        raise TypeError(f"checkpoint metric {name!r}={value!r} is not a number") from err
    if not math.isfinite(number):
        # A NaN would make the best-checkpoint ranking meaningless (NaN compares false).
        raise ValueError(f"checkpoint metric {name!r}={number} is not finite")
    return number


def _with_default_shardings(abstract_state: Any) -> Any:
    replicated = None

    def fill(leaf):
        nonlocal replicated
        if getattr(leaf, "sharding", None) is not None:
            return leaf
        if replicated is None:
            mesh = jax.sharding.Mesh(np.array(jax.devices()), ("all",))
            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated)

    return jax.tree.map(fill, abstract_state)


# ---------------------------------------------------------------------- tree check


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """'/'-joined leaf names -> (shape, dtype name); empty nodes (None, {}, ()) have no leaves."""
    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
    )
    return {"/".join(_key_name(k) for k in path): _spec(leaf) for path, leaf in flat}


def _spec(leaf: Any) -> tuple[tuple[int, ...], str]:
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        # orbax stores typed PRNG keys as their raw key data (e.g. (2,) uint32 per key)
        leaf = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    return tuple(leaf.shape), str(leaf.dtype)


def _params_first(name: str) -> tuple[bool, str]:
    # Optimizer-state leaves mirror the parameters: list the parameters themselves first.
    return name.startswith("opt_state"), name


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_fits(saved_tree: Any, abstract_state: Any, *, where: str) -> None:
    """Raises CheckpointMismatchError naming every leaf whose name, shape or dtype differs."""
    saved, wanted = _leaf_specs(saved_tree), _leaf_specs(abstract_state)
    missing = sorted(wanted.keys() - saved.keys(), key=_params_first)
    unexpected = sorted(saved.keys() - wanted.keys(), key=_params_first)
    differ = [
        f"{name} (saved {saved[name][0]} {saved[name][1]}, expected "
        f"{wanted[name][0]} {wanted[name][1]})"
        for name in sorted(wanted.keys() & saved.keys(), key=_params_first)
        if saved[name] != wanted[name]
    ]
    if not (missing or unexpected or differ):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} leaves not in the checkpoint: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} leaves only in the checkpoint: {_listing(unexpected)}")
    if differ:
        problems.append(f"{len(differ)} leaves of another shape/dtype: {_listing(differ)}")
    raise CheckpointMismatchError(
        f"checkpoint {where} does not fit the state it is restored into; "
        + "; ".join(problems)
        + ". It was written by another model or configuration: restore it with the config that "
        "wrote it, or use a fresh directory."
    )
