"""Gradual unfreezing (optim.strategy='gradual') and optimizer state carried over a phase
switch (optim.carry_moments): the head alone, then one more stage every N steps, each stage
a group whose moments, update count and learning-rate schedule survive later switches."""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tiny_config

from tlflax import config_lib, optim, train, tree
from tlflax.errors import ConfigError
from tlflax.models import create_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "tiny_config.py")
# resnet_tiny: 5 stages below the head; k=2 unfreezes stage4 at step 3, stage3 at step 6.
GRADUAL = {
    "optim.strategy": "gradual",
    "optim.k": 2,
    "optim.unfreeze_steps": 3,
    "optim.lr_decay": "none",
    "train.steps": 9,
}
SWITCHES = (3, 6)


def _optim_config(**values):
    config = config_lib.get_base_config()
    config.update_from_flattened_dict({**GRADUAL, **values})
    return config


def _phases(config, *, spe: int = 10, concrete: bool = False):
    """(phases, params): params as ShapeDtypeStructs unless `concrete` (random init)."""
    spec = create_model("resnet_tiny", num_classes=10)
    init = lambda: spec.init(jax.random.key(0), 16)["params"]  # noqa: E731
    params = init() if concrete else jax.eval_shape(init)
    phases = optim.make_phases(
        config.optim, train_config=config.train, params=params, spec=spec, steps_per_epoch=spe
    )
    return phases, params


def _group_of_leaf(phase) -> dict[str, str]:
    return tree.flatten(phase.labels)


# ----------------------------------------------------------------------------- the plan


def test_gradual_plans_the_head_then_one_more_stage_each_interval():
    phases, _ = _phases(_optim_config())
    assert [(p.name, p.start_step, p.end_step) for p in phases] == [
        ("unfreeze0", 0, 3),
        ("unfreeze1", 3, 6),
        ("unfreeze2", 6, 9),
    ]
    groups = [set(_group_of_leaf(p).values()) - {optim.FROZEN} for p in phases]
    assert groups == [{"head"}, {"head", "stage4"}, {"head", "stage4", "stage3"}]
    assert [p.carried for p in phases] == [(), ("head",), ("stage4", "head")]
    assert optim.CARRY_NOTE in phases[1].table and optim.RESET_NOTE not in phases[1].table
    # Without carry, every switch starts every group afresh, as two_phase does.
    reset, _ = _phases(_optim_config(**{"optim.carry_moments": False}))
    assert [p.carried for p in reset] == [(), (), ()]
    assert optim.RESET_NOTE in reset[1].table


def test_gradual_in_epochs_ends_with_the_run_and_keeps_the_lr_decay_groups():
    config = _optim_config(
        **{
            "optim.unfreeze_steps": 0,
            "optim.unfreeze_epochs": 1.5,
            "optim.lr_decay": "exponential",
            "train.steps": 0,
            "train.epochs": 5.0,
        }
    )
    phases, _ = _phases(config, spe=4)
    assert [(p.start_step, p.end_step) for p in phases] == [(0, 6), (6, 12), (12, 20)]
    # exponential decay: stage s trains at lr / 3 ** (5 - s), in every phase alike.
    assert phases[2].lr_fns["stage3"](12) == pytest.approx(1e-3 / 9)
    assert phases[2].carried == ("stage4", "head")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"optim.k": 0}, "needs k >= 1"),
        ({"optim.unfreeze_steps": 0}, "needs one of unfreeze_steps or unfreeze_epochs"),
        ({"optim.unfreeze_epochs": 1.0}, "needs one of unfreeze_steps or unfreeze_epochs"),
        ({"train.steps": 6}, "before its last phase unfreeze2 starts at step 6"),
        ({"optim.k": 6, "train.steps": 40}, "has 5 stages below the head"),
        ({"optim.unfreeze_steps": -2}, "unfreeze_steps"),
    ],
)
def test_bad_gradual_settings_are_named(values, message):
    with pytest.raises(ConfigError, match=message):
        _phases(_optim_config(**values))


# ----------------------------------------------------------------------------- the carry


def _step(phase, params, opt_state, grads):
    updates, opt_state = phase.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, updates


def _grads(params, seed: int):
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree_util.tree_leaves(params))))
    return jax.tree_util.tree_map(lambda p: jax.random.normal(next(keys), p.shape), params)


def _moments(opt_state, field: str) -> dict:
    found = {}
    for _, value in optax.tree_utils.tree_get_all_with_path(opt_state, field):
        for name, leaf in tree.flatten(value).items():
            if not isinstance(leaf, optax.MaskedNode):
                found[name] = np.asarray(leaf)
    return found


def _counts(opt_state) -> dict[str, int]:
    """group label -> its update count (adam's and the lr schedule's: one value)."""
    counts = {}
    for label, masked in optax.tree_utils.tree_get(opt_state, "inner_states").items():
        if label != optim.FROZEN:
            (counts[label],) = {
                int(np.asarray(v))
                for _, v in optax.tree_utils.tree_get_all_with_path(masked, "count")
            }
    return counts


def test_a_switch_keeps_the_moments_of_the_groups_it_carries_and_zeroes_the_new_ones():
    phases, params = _phases(_optim_config(**{"optim.ema_decay": 0.5}), concrete=True)
    first, second = phases[0], phases[1]
    opt_state = first.tx.init(params)
    for seed in range(3):
        params, opt_state, _ = _step(first, params, opt_state, _grads(params, seed))
    fresh = second.tx.init(params)
    carried = optim.carry_state(
        opt_state, fresh, carried=second.carried, carried_ema=second.carried_ema
    )
    assert second.carried_ema == ("head/out/bias", "head/out/kernel")
    for field in ("mu", "nu"):
        old, new = _moments(opt_state, field), _moments(carried, field)
        assert sorted(old) == ["head/out/bias", "head/out/kernel"]
        for name in old:
            np.testing.assert_array_equal(new[name], old[name])  # the head's: kept
        stage4 = [n for n in new if n.startswith("backbone/stage4/")]
        assert stage4 and all(not new[n].any() for n in stage4)  # newly trainable: zero
    assert _counts(carried) == {"head": 3, "stage4": 0}
    ema_before = tree.flatten(optim.ema_params(params, opt_state))
    ema_after = tree.flatten(optim.ema_params(params, carried))
    np.testing.assert_array_equal(ema_after["head/out/kernel"], ema_before["head/out/kernel"])
    name = next(n for n in ema_after if n.startswith("backbone/stage4/"))
    np.testing.assert_array_equal(ema_after[name], tree.flatten(params)[name])  # starts here


def test_a_carried_group_follows_its_phase_schedule_at_the_global_step():
    """SGD without momentum moves a leaf by exactly -lr(step) * g: after the switch at step 3
    the carried head steps at the second phase's schedule at step 3, not at step 6 (which an
    update count carried without its origin would give)."""
    config = _optim_config(
        **{"optim.name": "sgd", "optim.momentum": 0.0, "optim.schedule": "linear"}
    )
    phases, params = _phases(config, concrete=True)
    first, second = phases[0], phases[1]
    opt_state = first.tx.init(params)
    for seed in range(3):
        params, opt_state, _ = _step(first, params, opt_state, _grads(params, seed))
    opt_state = optim.carry_state(
        opt_state, second.tx.init(params), carried=second.carried, carried_ema=()
    )
    grads = _grads(params, 7)
    _, _, updates = _step(second, params, opt_state, grads)
    lr = second.lr_fns["head"](3)
    assert float(lr) > float(second.lr_fns["head"](5)) > 0  # the schedule decays in the phase
    got, g = tree.flatten(updates)["head/out/kernel"], tree.flatten(grads)["head/out/kernel"]
    np.testing.assert_allclose(np.asarray(got), -float(lr) * np.asarray(g), rtol=1e-6)


def test_carry_state_refuses_a_leaf_whose_shape_changed():
    old = optax.adam(1e-3).init({"w": jnp.zeros(3)})
    new = optax.adam(1e-3).init({"w": jnp.zeros(4)})
    wrapped = lambda s: optax.MultiTransformState({"g": s})  # noqa: E731
    with pytest.raises(ValueError, match="cannot carry"):
        optim.carry_state(wrapped(old), wrapped(new), carried=("g",), carried_ema=())


# ----------------------------------------------------------------------------- a real run


def _config(**values):
    config = config_lib.get_base_config()
    config.update_from_flattened_dict(
        {
            **tiny_config.DIGITS,
            "data.eval_batch_size": 48,
            "aug.flip": False,
            "aug.rotation": 10.0,
            "optim.lr": 1e-2,
            "train.bn_mode": "train",
            "train.log_every": 1,
            "train.eval_every": 3,
            "train.checkpoint_every": 1,
            "train.keep_last": 20,
            **GRADUAL,
            **values,
        }
    )
    return config


def _state(workdir, step: int) -> dict:
    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")


def _params(workdir, step: int) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in tree.flatten(_state(workdir, step)["params"]).items()}


def _losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.slow
def test_a_gradual_run_trains_exactly_its_stages_and_resumes_bitwise_around_each_switch(
    tmp_path,
):
    whole = tmp_path / "whole"
    summary = train.train_and_evaluate(_config(), whole)
    assert [(r["strategy"], r["step"]) for r in summary["phases"]] == [
        ("unfreeze0", 3),
        ("unfreeze1", 6),
        ("unfreeze2", 9),
    ]
    assert all(r["seconds"] > 0 for r in summary["phases"])  # the wall time spent in each
    top = ("head/", "backbone/stage4/", "backbone/stage3/")
    trains = [top[:1], top[:2], top]
    # Each step moves only its phase's leaves (the others bitwise unchanged), and each phase
    # moves all of them (not each step: the zero-initialised last BatchNorm scale of a
    # residual block keeps the block's other gradients at zero until it has moved once).
    before, moved_in = _params(whole, 1), [set(), set(), set()]
    for step in range(2, 10):
        now, phase = _params(whole, step), sum(step > s for s in SWITCHES)
        moved = {n for n in now if not np.array_equal(now[n], before[n])}
        trainable = {n for n in now if n.startswith(trains[phase])}
        assert moved <= trainable, f"step {step}: {sorted(moved - trainable)}"
        moved_in[phase] |= moved
        before = now
    for phase, moved in enumerate(moved_in):
        assert moved == {n for n in before if n.startswith(trains[phase])}, f"phase {phase}"
    # The checkpoint at a switch holds the next phase's state, the head's moments carried.
    for switch, count in zip(SWITCHES, (3, 6), strict=True):
        counts = _counts(_state(whole, switch)["opt_state"])
        assert counts["head"] == count and counts[f"stage{5 - SWITCHES.index(switch) - 1}"] == 0

    # Resumed from its checkpoint alone on each side of each switch (as after a SIGKILL that
    # took the rest of the workdir): every later step and the end state are the same.
    expected, reference = _params(whole, 9), _losses(whole)
    for step in (2, 3, 4, 5, 6, 7):
        resumed = tmp_path / f"from{step}"
        (resumed / "checkpoints").mkdir(parents=True)
        shutil.copytree(whole / "checkpoints" / str(step), resumed / "checkpoints" / str(step))
        train.train_and_evaluate(_config(), resumed)
        got = _params(resumed, 9)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=f"from {step}")
        losses = _losses(resumed)
        assert {s: losses[s] for s in range(step + 1, 10)} == {
            s: reference[s] for s in range(step + 1, 10)
        }


def _env() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _cli(workdir) -> list[str]:
    flags = [f"--config.{k}={v}" for k, v in GRADUAL.items()]
    flags += ["--config.optim.lr_decay=exponential", "--config.train.checkpoint_every=1"]
    return [sys.executable, "-m", "tlflax.main", "train", "--config", TINY,
            "--workdir", str(workdir), *flags]  # fmt: skip


def _logged_steps(workdir) -> int:
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return max((json.loads(line)["step"] for line in path.read_text().splitlines()), default=0)


@pytest.mark.slow
def test_a_gradual_run_killed_with_sigkill_resumes_bitwise(tmp_path):
    """The real thing through the command line: SIGKILL at a random step after the first
    switch, then the same command."""
    run = lambda cmd: subprocess.run(  # noqa: E731
        cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT, check=True
    )
    run(_cli(tmp_path / "whole"))
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT
    )
    kill_at, end = random.Random(os.getpid()).randint(4, 7), time.time() + 300
    while _logged_steps(killed) < kill_at and proc.poll() is None and time.time() < end:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _logged_steps(killed) < 9, "the run ended before it could be killed"
    run(_cli(killed))
    expected, got = _params(tmp_path / "whole", 9), _params(killed, 9)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
