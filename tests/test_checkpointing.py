"""Checkpointer: exact roundtrip, last-K + best-K retention, shardings, crash safety, mismatches.

This file is also the worker of the crash test: `python tests/test_checkpointing.py DIR` saves
step 1, starts a large asynchronous save of step 2 and waits to be killed (_crash_worker).
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from tlflax import checkpointing
from tlflax.checkpointing import Checkpointer, CheckpointMismatchError

ROOT = pathlib.Path(__file__).resolve().parents[1]
TMP_SUFFIX = ".orbax-checkpoint-tmp"
BIG_ELEMENTS = 64 * 1024 * 1024  # 256 MiB of float32: takes ~0.5 s to write, kill comes in ms


@flax.struct.dataclass
class State:
    """Stand-in for tlflax.state.TrainState: arrays only."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


def make_state(*, seed: int = 0, width: int = 8, step: int = 7, typed_key=False) -> State:
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(width, 16)).astype(np.float32)
    kernel[0, :4] = [-0.0, np.inf, 1e-42, np.nan]  # bits that a lossy path would change
    params = {
        "backbone": {"conv": {"kernel": jnp.asarray(kernel)}},
        "head": {
            "kernel": jnp.asarray(rng.normal(size=(16, 3)), jnp.bfloat16),
            "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
        },
    }
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)
    # A real update, so the moments and the count are not just zeros.
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    _, opt_state = tx.update(grads, opt_state, params)
    key = jax.random.key(seed)
    return State(
        step=jnp.asarray(step, jnp.int32),
        params=params,
        batch_stats={"bn": {"mean": jnp.asarray(rng.normal(size=(16,)), jnp.float32)}},
        opt_state=opt_state,
        rng=key if typed_key else jax.random.key_data(key),
    )


def open_ckpt(directory, *, keep_last=2, keep_best=1, mode="max", async_save=False):
    return Checkpointer(
        directory,
        keep_last=keep_last,
        keep_best=keep_best,
        best_metric="val/top1",
        best_mode=mode,
        async_save=async_save,
    )


def _bits(leaf) -> np.ndarray:
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return np.asarray(leaf).reshape(-1).view(np.uint8)  # reshape: 0-d arrays cannot view


def assert_bitwise_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(_bits(a), _bits(e))


def step_dirs(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir())


# ---------------------------------------------------------------------- roundtrip


@pytest.mark.parametrize("async_save", [False, True])
@pytest.mark.parametrize("typed_key", [False, True])
def test_roundtrip_is_bitwise_exact(tmp_path, async_save, typed_key):
    state = make_state(typed_key=typed_key)
    with open_ckpt(tmp_path, async_save=async_save) as ckpt:
        ckpt.save(7, state, metrics={"val/top1": 0.5, "val/loss": np.float32(1.25)})
        ckpt.wait()
    # A fresh Checkpointer (a restarted run) reads it back.
    with open_ckpt(tmp_path) as ckpt:
        assert ckpt.latest_step() == 7
        assert ckpt.metrics(7) == {"val/top1": 0.5, "val/loss": 1.25}
        restored = ckpt.restore_latest(jax.eval_shape(lambda: state))
    assert isinstance(restored, State)
    assert restored.step.dtype == jnp.int32 and int(restored.step) == 7
    assert_bitwise_equal(restored, state)
    # The restored key draws the same numbers.
    key = restored.rng if typed_key else jax.random.wrap_key_data(restored.rng)
    expected = state.rng if typed_key else jax.random.wrap_key_data(state.rng)
    np.testing.assert_array_equal(jax.random.normal(key, (4,)), jax.random.normal(expected, (4,)))


def test_async_save_is_safe_against_donated_buffers(tmp_path):
    """The train step donates the state: an async save must have copied it off first."""
    state = make_state(seed=3)
    expected = jax.tree.map(np.asarray, jax.tree.map(_bits, state))
    with open_ckpt(tmp_path, async_save=True) as ckpt:
        ckpt.save(1, state)
        for leaf in jax.tree.leaves(state):
            leaf.delete()  # what donation does to the buffers
        ckpt.wait()
        restored = ckpt.restore(1, abstract_state=jax.eval_shape(lambda: make_state(seed=3)))
    for a, e in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(_bits(a), e)


def test_restore_puts_arrays_on_the_given_shardings(tmp_path):
    state = make_state(width=16)
    with open_ckpt(tmp_path) as ckpt:
        ckpt.save(1, state)
    mesh = jax.make_mesh((4, 2), ("data", "model"), devices=jax.devices())
    assert mesh.devices.size == 8
    split = NamedSharding(mesh, PartitionSpec("data", "model"))
    rep = NamedSharding(mesh, PartitionSpec())
    abstract = jax.eval_shape(lambda: state)
    shardings = jax.tree.map(lambda _: rep, abstract)
    shardings = shardings.replace(
        params={**shardings.params, "backbone": {"conv": {"kernel": split}}}
    )
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    with open_ckpt(tmp_path) as ckpt:
        restored = ckpt.restore(1, abstract_state=abstract)
    kernel = restored.params["backbone"]["conv"]["kernel"]
    assert kernel.sharding == split
    assert {s.data.shape for s in kernel.addressable_shards} == {(4, 8)}
    assert len(kernel.sharding.device_set) == 8
    for leaf, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding == sh
    assert_bitwise_equal(restored, state)


def test_restore_without_shardings_replicates(tmp_path):
    state = make_state()
    with open_ckpt(tmp_path) as ckpt:
        ckpt.save(1, state)
        restored = ckpt.restore(1, abstract_state=jax.eval_shape(lambda: state))
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding.is_fully_replicated
    assert_bitwise_equal(restored, state)


def test_small_replicated_leaves_are_written_whole_and_large_ones_per_replica(
    tmp_path, monkeypatch
):
    """Orbax cuts a replicated leaf into one slice per device (jax.lax.slice_in_dim, an eager
    dispatch each); only leaves of at least MIN_REPLICA_SLICE_BYTES per slice are cut now.
    Both kinds restore bitwise."""
    mesh = jax.make_mesh((8,), ("data",), devices=jax.devices())
    rep = NamedSharding(mesh, PartitionSpec())
    big = 8 * checkpointing.MIN_REPLICA_SLICE_BYTES // 4  # float32: one threshold per slice
    rng = np.random.default_rng(0)
    tree = {f"small{i}": rng.normal(size=(64, 8)).astype(np.float32) for i in range(20)}
    tree["big"] = rng.normal(size=(big,)).astype(np.float32)
    tree = jax.device_put(tree, rep)
    cut = []
    real_slice = jax.lax.slice_in_dim

    def counting_slice(operand, *args, **kwargs):
        cut.append(operand.size)
        return real_slice(operand, *args, **kwargs)

    monkeypatch.setattr(jax.lax, "slice_in_dim", counting_slice)
    with open_ckpt(tmp_path) as ckpt:
        ckpt.save(1, tree)
        ckpt.wait()
        monkeypatch.undo()
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), tree
        )
        restored = ckpt.restore(1, abstract_state=abstract)
    assert cut == [big] * 8  # the big leaf, once per device; no small one
    assert_bitwise_equal(restored, tree)


# ---------------------------------------------------------------------- retention


def _save_series(ckpt, values, *, no_metrics_at=()):
    states = {}
    for step, value in enumerate(values, start=1):
        states[step] = make_state(seed=step)
        metrics = None if step in no_metrics_at else {"val/top1": value, "val/loss": -value}
        ckpt.save(step, states[step], metrics=metrics)
    ckpt.wait()
    return states


def test_keeps_last_k_plus_best_k_max(tmp_path):
    values = [0.1, 0.9, 0.3, 0.8, 0.2, 0.4, 0.35]
    with open_ckpt(tmp_path, keep_last=2, keep_best=2, async_save=True) as ckpt:
        states = _save_series(ckpt, values)
        # last two: 6, 7; best two: 2 (0.9), 4 (0.8)
        assert ckpt.all_steps() == [2, 4, 6, 7]
        assert ckpt.best_step() == 2
        assert ckpt.latest_step() == 7
    assert step_dirs(tmp_path) == ["2", "4", "6", "7"]
    with open_ckpt(tmp_path, keep_last=2, keep_best=2) as ckpt:  # as a restarted run sees it
        assert ckpt.all_steps() == [2, 4, 6, 7]
        assert ckpt.best_step() == 2
        abstract = jax.eval_shape(lambda: states[2])
        assert_bitwise_equal(ckpt.restore_best(abstract), states[2])
        assert_bitwise_equal(ckpt.restore_latest(abstract), states[7])


def test_keeps_best_k_min_and_skips_checkpoints_without_metrics(tmp_path):
    values = [0.5, 0.1, 0.7, 0.05, 0.6, 0.9]
    with open_ckpt(tmp_path, keep_last=1, keep_best=1, mode="min") as ckpt:
        _save_series(ckpt, values, no_metrics_at=(4,))
        # Step 4 has the lowest value but no metrics: it counts for recency only.
        assert ckpt.all_steps() == [2, 6]
        assert ckpt.best_step() == 2
    assert step_dirs(tmp_path) == ["2", "6"]


def test_best_is_not_deleted_when_it_leaves_the_last_k(tmp_path):
    with open_ckpt(tmp_path, keep_last=1, keep_best=1) as ckpt:
        _save_series(ckpt, [0.9])
        for step in range(2, 6):
            ckpt.save(step, make_state(seed=step), metrics={"val/top1": 0.1})
            assert ckpt.all_steps() == [1, step]
    assert step_dirs(tmp_path) == ["1", "5"]


def test_no_metrics_at_all_keeps_last_k_and_no_best(tmp_path):
    with open_ckpt(tmp_path, keep_last=2, keep_best=1) as ckpt:
        _save_series(ckpt, [0.0] * 4, no_metrics_at=(1, 2, 3, 4))
        assert ckpt.all_steps() == [3, 4]
        assert ckpt.best_step() is None
        with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
            ckpt.restore_best(jax.eval_shape(make_state))


# ---------------------------------------------------------------------- errors


def test_empty_or_missing_directory(tmp_path):
    with open_ckpt(tmp_path / "does" / "not" / "exist") as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.best_step() is None
        assert ckpt.all_steps() == []
        with pytest.raises(FileNotFoundError, match=str(tmp_path / "does")):
            ckpt.restore_latest(jax.eval_shape(make_state))
        with pytest.raises(FileNotFoundError, match="no complete checkpoint at step 3"):
            ckpt.restore(3, abstract_state=jax.eval_shape(make_state))


def test_mismatching_tree_names_leaves_and_directory(tmp_path):
    with open_ckpt(tmp_path) as ckpt:
        ckpt.save(5, make_state(width=8))
    other_shapes = jax.eval_shape(lambda: make_state(width=12))
    with open_ckpt(tmp_path) as ckpt:
        with pytest.raises(CheckpointMismatchError) as info:
            ckpt.restore(5, abstract_state=other_shapes)
    message = str(info.value)
    assert f"{tmp_path}/5" in message
    assert "params/backbone/conv/kernel (saved (8, 16) float32, expected (12, 16) float32)" in (
        message
    )
    assert "opt_state/0/mu/backbone/conv/kernel" in message
    assert "params/head" not in message  # leaves that fit are not listed
    assert "Traceback" not in message


def test_other_model_names_missing_and_unexpected_leaves(tmp_path):
    with open_ckpt(tmp_path) as ckpt:
        ckpt.save(1, make_state())
    other = make_state()
    params = {"backbone": other.params["backbone"], "classifier": other.params["head"]}
    other = other.replace(params=params, opt_state=optax.adam(1e-3).init(params))
    with open_ckpt(tmp_path) as ckpt:
        with pytest.raises(CheckpointMismatchError) as info:
            ckpt.restore_latest(jax.eval_shape(lambda: other))
    message = str(info.value)
    assert "leaves not in the checkpoint: params/classifier/bias, params/classifier/kernel" in (
        message
    )
    assert "leaves only in the checkpoint: params/head/bias, params/head/kernel" in message
    assert str(tmp_path) in message


def test_dtype_mismatch_is_reported(tmp_path):
    with open_ckpt(tmp_path) as ckpt:
        ckpt.save(1, make_state())
    wrong = jax.eval_shape(lambda: make_state())
    wrong = wrong.replace(step=jax.ShapeDtypeStruct((), jnp.float32))
    with open_ckpt(tmp_path) as ckpt:
        with pytest.raises(CheckpointMismatchError, match=r"step \(saved \(\) int32, expected"):
            ckpt.restore(1, abstract_state=wrong)


def test_save_rules_for_steps_and_metrics(tmp_path):
    with open_ckpt(tmp_path, keep_last=3) as ckpt:
        ckpt.save(2, make_state(seed=2), metrics={"val/top1": 0.5})
        with pytest.raises(ValueError, match="step 2 is not after the latest step 2"):
            ckpt.save(2, make_state(seed=9))
        with pytest.raises(ValueError, match="step 1 is not after"):
            ckpt.save(1, make_state(seed=9))
        with pytest.raises(KeyError, match="no 'val/top1'.*'val/loss'"):
            ckpt.save(3, make_state(seed=3), metrics={"val/loss": 0.1})
        with pytest.raises(ValueError, match="'val/top1'=nan is not finite"):
            ckpt.save(3, make_state(seed=3), metrics={"val/top1": float("nan")})
        assert ckpt.all_steps() == [2]
        replacement = make_state(seed=9)
        ckpt.save(2, replacement, metrics={"val/top1": 0.7}, force=True)
        assert ckpt.all_steps() == [2]
        assert ckpt.metrics(2) == {"val/top1": 0.7}
        assert_bitwise_equal(
            ckpt.restore(2, abstract_state=jax.eval_shape(make_state)), replacement
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep_last": 0}, "keep_last=0"),
        ({"keep_best": -1}, "keep_best=-1"),
        ({"mode": "best"}, "best_mode='best'"),
    ],
)
def test_bad_options(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        open_ckpt(tmp_path, **kwargs)


# ---------------------------------------------------------------------- crash safety


def _crash_worker(directory: str) -> None:
    """Saves step 1, starts a big async save of step 2, and waits to be SIGKILLed."""
    ckpt = open_ckpt(directory, keep_last=5, async_save=True)
    ckpt.save(1, make_state(seed=1), metrics={"val/top1": 0.5})
    ckpt.wait()
    big = make_state(seed=2)
    noise = np.random.default_rng(0).random(BIG_ELEMENTS, dtype=np.float32)  # incompressible
    big = big.replace(batch_stats={"bn": {"mean": jnp.asarray(noise)}})
    ckpt.save(2, big, metrics={"val/top1": 0.9})
    print("SAVING", flush=True)
    time.sleep(120)  # the parent kills us long before


def test_sigkill_during_async_save_leaves_only_complete_steps(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, __file__, str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # blocks until the async save is under way
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert line.strip() == "SAVING", "the worker failed before its second save"
    assert proc.returncode == -signal.SIGKILL
    names = step_dirs(tmp_path)
    assert "2" not in names, "step 2 finished before the kill: make BIG_ELEMENTS larger"
    assert f"2{TMP_SUFFIX}" in names  # killed mid-write, leaving its partial files

    with open_ckpt(tmp_path, keep_last=5) as ckpt:
        assert ckpt.all_steps() == [1]
        assert ckpt.latest_step() == 1 and ckpt.best_step() == 1
        abstract = jax.eval_shape(lambda: make_state(seed=1))
        assert_bitwise_equal(ckpt.restore_latest(abstract), make_state(seed=1))
        again = make_state(seed=22)
        ckpt.save(2, again, metrics={"val/top1": 0.6})  # the same step number, again
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2]
        assert_bitwise_equal(ckpt.restore_latest(abstract), again)
    assert step_dirs(tmp_path) == ["1", "2"]  # the partial directory is gone


def test_leftovers_of_a_crashed_save_are_removed(tmp_path):
    with open_ckpt(tmp_path) as ckpt:
        ckpt.save(1, make_state(seed=1))
    leftover = tmp_path / f"5{TMP_SUFFIX}" / "state"
    leftover.mkdir(parents=True)
    (leftover / "partial").write_bytes(b"x" * 100)
    with open_ckpt(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1]
        ckpt.save(2, make_state(seed=2))  # a run resumed at step 1 never writes step 5 again
        ckpt.wait()
    assert step_dirs(tmp_path) == ["1", "2"]


def test_check_fits_accepts_matching_trees():
    state = make_state()
    checkpointing.check_fits(jax.eval_shape(lambda: state), state, where="here")


if __name__ == "__main__":
    _crash_worker(sys.argv[1])
