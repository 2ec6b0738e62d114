"""Optimizers, group rules, masked clipping, accumulation, EMA and schedules (tlflax/optim.py)."""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tlflax import config_lib, experiment, optim, schedules, sharding, state, train, tree

# A small params tree with the leaf kinds the rules care about: kernels, biases, norm scales,
# a ViT-style position embedding, and a head.
SHAPES = {
    "backbone/embed/pos": (1, 5, 4),
    "backbone/conv/kernel": (3, 3, 2, 4),
    "backbone/conv/bias": (4,),
    "backbone/norm/scale": (4,),
    "backbone/norm/bias": (4,),
    "backbone/dense/kernel": (4, 4),
    "head/out/kernel": (4, 3),
    "head/out/bias": (3,),
}


def make_params(seed=0):
    keys = jax.random.split(jax.random.key(seed), len(SHAPES))
    flat = {n: jax.random.normal(k, s) for k, (n, s) in zip(keys, SHAPES.items(), strict=True)}
    return tree.unflatten(flat)


def make_grads(seed):
    return make_params(1000 + seed)


def optim_config(**values):
    config = config_lib.lock(config_lib.get_base_config())
    c = config.optim
    c.strategy = ""
    c.groups = (("head/.*", {}), (".*", {}))
    for key, value in values.items():
        c[key] = value
    return c


def one_phase(c, *, total=100, steps_per_epoch=10, params=None):
    params = make_params() if params is None else params
    train_config = config_lib.get_base_config().train
    train_config.steps = total
    phases = optim.make_phases(
        c, train_config=train_config, params=params, spec=None, steps_per_epoch=steps_per_epoch
    )
    assert len(phases) == 1
    return phases[0]


def run_steps(tx, params, grads_seq):
    """Apply tx to each gradient in turn (jitted, as the trainer does); params and state."""

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return jax.tree_util.tree_map(lambda p, u: p + u, params, updates), state, updates

    state = tx.init(params)
    updates = None
    for grads in grads_seq:
        params, state, updates = step(params, state, grads)
    return params, state, updates


def state_bytes(state) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))


def n_elems(names) -> int:
    return sum(math.prod(SHAPES[n]) for n in names)


FROZEN_CONV = (("backbone/conv/.*", None), ("head/.*", {"name": "head"}), (".*", {}))


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_frozen_leaves_bitwise_unchanged_with_decay_and_momentum(name):
    c = optim_config(name=name, groups=FROZEN_CONV, weight_decay=0.1, decay_1d=True)
    c.momentum, c.rms_momentum, c.grad_clip_norm = 0.9, 0.9, 1.0
    params = make_params()
    phase = one_phase(c, params=params)
    new, _, _ = run_steps(phase.tx, params, [make_grads(i) for i in range(12)])
    before, after = tree.flatten(params), tree.flatten(new)
    for n in ("backbone/conv/kernel", "backbone/conv/bias"):
        assert np.asarray(after[n]).tobytes() == np.asarray(before[n]).tobytes(), n
    for n in ("backbone/dense/kernel", "backbone/norm/scale", "head/out/kernel"):
        assert not np.allclose(after[n], before[n]), f"{n} did not train"
    assert tree.flatten(phase.trainable)["backbone/conv/kernel"] is False


def test_frozen_leaves_hold_no_optimizer_state():
    phase = one_phase(optim_config(name="adam", groups=FROZEN_CONV))
    trainable = [n for n in SHAPES if not n.startswith("backbone/conv/")]
    # Adam: two float32 moments per trainable element, plus a few int32 step counters.
    scalars = state_bytes(phase.tx.init(make_params())) - 2 * 4 * n_elems(trainable)
    assert 0 <= scalars <= 64
    all_trainable = one_phase(optim_config(name="adam"))
    assert state_bytes(all_trainable.tx.init(make_params())) - 2 * 4 * n_elems(SHAPES) == scalars


def test_sgd_group_updates_are_lr_mult_times_base_exactly():
    mults = {"backbone/conv/.*": 0.5, "backbone/norm/.*": 4.0, "head/.*": 0.25, ".*": 1.0}
    groups = tuple((rx, {"lr_mult": m, "name": f"g{i}"}) for i, (rx, m) in enumerate(mults.items()))
    grads = [make_grads(0)]
    base = one_phase(optim_config(name="sgd", momentum=0.0, lr=0.1, groups=((".*", {}),)))
    _, _, base_updates = run_steps(base.tx, make_params(), grads)
    phase = one_phase(optim_config(name="sgd", momentum=0.0, lr=0.1, groups=groups))
    _, _, updates = run_steps(phase.tx, make_params(), grads)
    base_flat, flat = tree.flatten(base_updates), tree.flatten(updates)
    for name in SHAPES:
        mult = next(m for rx, m in mults.items() if re.fullmatch(rx, name))
        np.testing.assert_array_equal(flat[name], mult * base_flat[name], err_msg=name)
    # A multiplier that is not a power of two: equal to float32 rounding.
    odd = one_phase(
        optim_config(name="sgd", momentum=0.0, lr=0.1, groups=((".*", {"lr_mult": 0.3}),))
    )
    _, _, odd_updates = run_steps(odd.tx, make_params(), grads)
    for name, u in tree.flatten(odd_updates).items():
        np.testing.assert_allclose(u, 0.3 * base_flat[name], rtol=2e-7, err_msg=name)


def test_weight_decay_mask_and_wd_mult():
    groups = (("head/.*", {"wd_mult": 2.0}), (".*", {}))
    c = optim_config(name="adamw", lr=0.5, weight_decay=0.1, groups=groups)
    params = make_params()
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    _, _, updates = run_steps(one_phase(c).tx, params, [zero])
    flat, p = tree.flatten(updates), tree.flatten(params)
    # adamw with zero gradients: only the decoupled decay, -lr * wd * wd_mult * p.
    np.testing.assert_allclose(flat["backbone/dense/kernel"], -0.05 * p["backbone/dense/kernel"])
    np.testing.assert_allclose(flat["backbone/conv/kernel"], -0.05 * p["backbone/conv/kernel"])
    np.testing.assert_allclose(flat["head/out/kernel"], -0.1 * p["head/out/kernel"], rtol=1e-6)
    for n in ("backbone/conv/bias", "backbone/norm/scale", "head/out/bias", "backbone/embed/pos"):
        np.testing.assert_array_equal(flat[n], 0.0, err_msg=f"{n} must not decay")
    c.decay_1d = True
    c.no_decay = ()
    _, _, updates = run_steps(one_phase(c).tx, params, [zero])
    for n in ("backbone/norm/scale", "backbone/embed/pos"):
        np.testing.assert_allclose(tree.flatten(updates)[n], -0.05 * p[n], err_msg=n)


def test_sgd_l2_decay_is_added_to_the_gradient():
    c = optim_config(name="sgd", momentum=0.0, lr=0.5, weight_decay=0.1, groups=((".*", {}),))
    params, grads = make_params(), make_grads(0)
    _, _, updates = run_steps(one_phase(c).tx, params, [grads])
    g, p, u = (tree.flatten(t)["backbone/dense/kernel"] for t in (grads, params, updates))
    np.testing.assert_allclose(u, -0.5 * (g + 0.1 * p), rtol=1e-6)


def test_clipping_reads_only_trainable_leaves():
    c = optim_config(name="sgd", momentum=0.0, lr=1.0, grad_clip_norm=0.5, groups=FROZEN_CONV)
    phase = one_phase(c)
    grads = tree.flatten(make_grads(0))
    grads["backbone/conv/kernel"] = grads["backbone/conv/kernel"] * 1e6  # frozen, huge
    _, _, updates = run_steps(phase.tx, make_params(), [tree.unflatten(grads)])
    trainable = {n: g for n, g in grads.items() if not n.startswith("backbone/conv/")}
    norm = math.sqrt(sum(float(jnp.sum(g**2)) for g in trainable.values()))
    assert norm > 0.5
    flat = tree.flatten(updates)
    for n, g in trainable.items():
        np.testing.assert_allclose(flat[n], -g * 0.5 / norm, rtol=1e-5, err_msg=n)
    assert float(optim.trainable_global_norm(tree.unflatten(grads), phase.trainable)) == (
        pytest.approx(norm, rel=1e-6)
    )


def test_gradient_accumulation_updates_once_with_the_mean_gradient():
    groups = (("backbone/conv/.*", None), (".*", {}))
    c = optim_config(name="sgd", momentum=0.9, lr=0.1, schedule="linear", groups=groups)
    c.accum_steps = 3
    phase = one_phase(c, total=30)
    params = make_params()
    grads = [make_grads(i) for i in range(6)]
    state = phase.tx.init(params)
    assert "conv" not in state.acc["backbone"]  # no accumulator for frozen leaves
    step = jax.jit(phase.tx.update)
    p = params
    for i, g in enumerate(grads):
        updates, state = step(g, state, p)
        if i % 3 < 2:
            assert not any(np.any(u) for u in jax.tree_util.tree_leaves(updates)), i
        p = jax.tree_util.tree_map(jnp.add, p, updates)
    # Two updates, with the mean gradients, at the lr of the global steps they start: 0 and 3.
    lr = phase.lr_fns["rule1"]
    lr0, lr3 = float(lr(0)), float(lr(3))
    assert lr3 < lr0
    m0, m1 = (
        tree.flatten(jax.tree_util.tree_map(lambda *g: sum(g) / 3, *grads[k : k + 3]))
        for k in (0, 3)
    )
    p0, flat = tree.flatten(params), tree.flatten(p)
    for n in SHAPES:
        if n.startswith("backbone/conv/"):
            np.testing.assert_array_equal(flat[n], p0[n])
            continue
        expected = p0[n] - lr0 * m0[n] - lr3 * (0.9 * m0[n] + m1[n])
        np.testing.assert_allclose(flat[n], expected, rtol=1e-5, atol=1e-7, err_msg=n)


def test_ema_of_trainable_weights_lives_in_the_state():
    c = optim_config(name="sgd", momentum=0.0, lr=0.1, ema_decay=0.5, groups=FROZEN_CONV)
    params = make_params()
    grads = [make_grads(i) for i in range(3)]
    new, state, _ = run_steps(one_phase(c).tx, params, grads)
    ema = tree.flatten(optim.ema_params(new, state))
    # Replay by hand: ema starts at the initial params.
    p, e = tree.flatten(params), dict(tree.flatten(params))
    for g in grads:
        for n, gn in tree.flatten(g).items():
            if not n.startswith("backbone/conv/"):
                p[n] = p[n] - 0.1 * gn
                e[n] = 0.5 * e[n] + 0.5 * p[n]
    for n in SHAPES:
        np.testing.assert_allclose(ema[n], e[n], rtol=1e-6, err_msg=n)
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(state))
    assert optim.ema_params(new, one_phase(optim_config()).tx.init(params)) is None


def test_moment_dtype():
    c = optim_config(name="adam", moment_dtype="bfloat16")
    state = one_phase(c).tx.init(make_params())
    dtypes = {x.dtype for x in jax.tree_util.tree_leaves(state) if x.ndim}
    assert dtypes == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}  # mu bf16, nu f32
    c = optim_config(name="sgd", moment_dtype="bfloat16")
    state = one_phase(c).tx.init(make_params())
    assert {x.dtype for x in jax.tree_util.tree_leaves(state) if x.ndim} == {
        jnp.dtype(jnp.bfloat16)
    }


def test_state_is_arrays_only_with_every_wrapper():
    c = optim_config(name="adamw", accum_steps=2, ema_decay=0.9, grad_clip_norm=1.0)
    c.groups = FROZEN_CONV
    params = make_params()
    _, state, _ = run_steps(one_phase(c).tx, params, [make_grads(0), make_grads(1)])
    leaves = jax.tree_util.tree_leaves(state)
    assert leaves and all(isinstance(x, jax.Array) for x in leaves)


def test_schedules_warmup_then_decay():
    c = optim_config(lr=1.0, schedule="cosine", warmup_steps=10, end_lr_mult=0.1)
    lr = one_phase(c, total=110).lr_fns["rule0"]
    assert float(lr(0)) == pytest.approx(0.1)
    assert float(lr(9)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.55, rel=1e-5)  # half way: (1 + 0.1) / 2
    assert float(lr(110)) == pytest.approx(0.1)
    c = optim_config(lr=1.0, schedule="linear", warmup_epochs=1.0)
    lr = one_phase(c, total=110, steps_per_epoch=10).lr_fns["rule0"]
    assert float(lr(9)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.5)
    c = optim_config(lr=1.0, schedule="step", decay_rate=0.5, decay_every_epochs=2.0)
    lr = one_phase(c, steps_per_epoch=10).lr_fns["rule0"]
    assert [float(lr(s)) for s in (0, 19, 20, 45)] == [1.0, 1.0, 0.5, 0.25]
    c = optim_config(lr=1.0, schedule="inverse_time", decay_rate=0.01, decay_every_steps=1)
    lr = one_phase(c).lr_fns["rule0"]
    assert float(lr(50)) == pytest.approx(1 / 1.5)  # Keras' legacy decay=0.01


def test_schedule_lr_reaches_the_optimizer():
    c = optim_config(name="sgd", momentum=0.0, lr=1.0, schedule="step", decay_rate=0.5)
    c.decay_every_steps = 1
    params = make_params()
    ones = jax.tree_util.tree_map(jnp.ones_like, params)
    _, _, updates = run_steps(one_phase(c).tx, params, [ones] * 3)
    assert np.all(np.asarray(tree.flatten(updates)["head/out/bias"]) == -0.25)


def test_group_schedule_override():
    groups = (("head/.*", {"name": "head", "schedule": "constant", "lr_mult": 10.0}), (".*", {}))
    c = optim_config(lr=1.0, schedule="linear", groups=groups)
    phase = one_phase(c, total=100)
    assert float(phase.lr_fns["head"](50)) == pytest.approx(10.0)
    assert float(phase.lr_fns["rule1"](50)) == pytest.approx(0.5)
    c.groups = (("head/.*", {"schedule": {"warmup_steps": 10}}), (".*", {}))
    phase = one_phase(c, total=100)
    assert float(phase.lr_fns["rule0"](0)) == pytest.approx(0.1)
    assert float(phase.lr_fns["rule1"](0)) == pytest.approx(1.0)


def test_durations_in_steps_or_epochs_not_both():
    assert (
        schedules.steps_of(
            {"warmup_steps": 0, "warmup_epochs": 1.5}, "warmup", steps_per_epoch=10, where="x"
        )
        == 15
    )
    c = optim_config(warmup_steps=5, warmup_epochs=1.0)
    with pytest.raises(ValueError, match="both warmup_steps=5 and warmup_epochs=1.0"):
        one_phase(c)
    with pytest.raises(ValueError, match="does not fit in a phase of 20 steps"):
        one_phase(optim_config(warmup_steps=20), total=20)
    with pytest.raises(ValueError, match="needs decay_every_steps"):
        one_phase(optim_config(schedule="step"))


def test_total_steps_from_train_config():
    config = config_lib.get_base_config()
    config.train.epochs = 2.5
    assert optim.total_steps(config.optim, steps_per_epoch=10, train_config=config.train) == 25
    config.train.steps = 7
    assert optim.total_steps(config.optim, steps_per_epoch=10, train_config=config.train) == 7


def test_table_counts_leaves_and_parameters():
    groups = (
        ("backbone/conv/.*", None),
        ("head/.*", {"name": "head", "lr_mult": 10.0}),
        (".*", {}),
    )
    table = one_phase(optim_config(groups=groups)).table
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["#", "regex", "group", "leaves", "params"]
    conv = next(line for line in lines if line.startswith("0 "))
    assert conv.split()[1:5] == ["backbone/conv/.*", "frozen", "2", f"{3 * 3 * 2 * 4 + 4}"]
    head = next(line for line in lines if line.startswith("1 "))
    assert head.split()[1:6] == ["head/.*", "head", "2", "15", "10"]
    assert f"trainable {n_elems(SHAPES) - 76:,} of {n_elems(SHAPES):,}" in table


@pytest.mark.parametrize(
    "groups, message",
    [
        ((("head/.*", {}),), "no rule matches backbone/embed/pos .*final \\('\\.\\*'"),
        ((("head/.*", {}), ("nothing/.*", {}), (".*", None)), "'nothing/.*' matches no param"),
        ((("head/.*", {}), ("head/out/.*", {}), (".*", None)), "only matches leaves earlier"),
        ((("head/.*", {"lr_mult": 0.0}), (".*", None)), "lr_mult=0.0 must be > 0.*None"),
        ((("head/.*", {"lr_mult": -1}), (".*", None)), "lr_mult=-1 must be > 0"),
        ((("head/.*", {"lr": 1.0}), (".*", None)), "unknown rule key.*'lr'"),
        ((("head/(", {}), (".*", None)), "is not a regex"),
        ((("head/.*", {"name": "frozen"}), (".*", None)), "reserved"),
        ((("head/.*", {"schedule": "cosin"}), (".*", None)), "schedule='cosin' is unknown"),
        (((".*", None),), "every parameter is frozen"),
        ((), "groups is empty"),
    ],
)
def test_bad_groups_are_clear_errors(groups, message):
    with pytest.raises(ValueError, match=message):
        one_phase(optim_config(groups=groups))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("name", "adagrad", "name='adagrad' is unknown; use one of 'adam'"),
        ("strategy", "probe", "strategy='probe' is unknown"),
        ("lr", 0.0, "lr=0.0 must lie in"),
        ("accum_steps", 0, "accum_steps must be an integer >= 1"),
        ("moment_dtype", "int8", "not a float dtype"),
        ("ema_decay", 1.0, "ema_decay=1.0 must lie in"),
    ],
)
def test_bad_optimizer_settings_are_clear_errors(key, value, message):
    with pytest.raises(ValueError, match=message):
        one_phase(optim_config(**{key: value}))


def test_strategy_and_groups_together_is_an_error():
    c = optim_config()
    c.strategy = "linear_probe"
    with pytest.raises(ValueError, match="set strategy='' to use your groups"):
        optim.validate(c)


def test_groups_survive_the_saved_config_json():
    config = config_lib.lock(config_lib.get_base_config())
    config.optim.strategy = ""
    config.optim.groups = (
        ("head/.*", {"lr_mult": 10.0, "schedule": {"warmup_steps": 5}}),
        ("backbone/conv/.*", None),
        (".*", {"name": "rest"}),
    )
    restored = config_lib.from_json(config.to_json())
    phase = one_phase(restored.optim)
    assert phase.lr_fns.keys() == {"rule0", "rest"}
    assert float(phase.lr_fns["rule0"](0)) == pytest.approx(10.0 * config.optim.lr / 5)
    assert not tree.flatten(phase.trainable)["backbone/conv/kernel"]


def bn_mode_run(bn_mode: str):
    """resnet_tiny fully fine-tuned at 16 px, as experiment.plan builds it, on a one-device mesh."""
    config = config_lib.get_base_config()
    config.model.name = "resnet_tiny"
    config.model.num_classes = 3
    config.data.image_size = 16
    config.data.batch_size = 4
    config.optim.update(name="sgd", strategy="full", lr=0.1)
    config.train.steps = 10
    config.train.bn_mode = bn_mode
    config = config_lib.lock(config)
    spec = experiment.build_model(config, num_classes=3)
    prep = experiment.resolve_preprocessing(config, spec)
    run = experiment.plan(config, num_classes=3, steps_per_epoch=10, prep=prep)
    return config, dataclasses.replace(run, mesh=sharding.make_mesh(devices=jax.devices()[:1]))


def random_variables(run, *, seed: int = 0) -> dict:
    """Non-zero variables of the model's shapes, from numpy: spec.init compiles for 10+ s on
    two busy cores, and its zero head and zero last BatchNorm scales pass no gradient to the
    backbone in the first step."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: run.spec.init(jax.random.key(0), run.prep.resolution))
    flat = {}
    for name, s in tree.flatten(shapes).items():
        if name.endswith("/var"):
            flat[name] = rng.uniform(0.5, 2.0, s.shape)
        elif len(s.shape) == 1:  # BatchNorm scales around 1; biases and means around 0
            flat[name] = rng.normal(1.0 if name.endswith("/scale") else 0.0, 0.3, s.shape)
        else:
            flat[name] = rng.normal(0.0, (2 / math.prod(s.shape[:-1])) ** 0.5, s.shape)
    return tree.unflatten({n: a.astype(np.float32) for n, a in flat.items()})


@pytest.mark.parametrize("bn_mode", ["frozen", "train"])
def test_bn_mode_through_the_trainer_step(bn_mode):
    """config.train.bn_mode reaches the jitted trainer step: 'frozen' leaves batch_stats
    bitwise unchanged while a full fine-tune changes every parameter; 'train' updates them."""
    config, run = bn_mode_run(bn_mode)
    (phase,) = run.phases
    assert all(tree.flatten(phase.trainable).values())
    _, shardings = experiment.abstract_state(run, phase)
    variables = random_variables(run)
    before = {n: np.copy(a) for n, a in tree.flatten(variables).items()}
    create = lambda v: state.create(variables=v, tx=phase.tx, seed=0)
    st = jax.jit(create, out_shardings=shardings)(variables)
    # The trainer's own jitted step: where config.train.bn_mode becomes make_train_step's bn_train.
    step_fn = train._jit_train_step(config, run, phase, shardings)
    rng = np.random.default_rng(1)
    s = run.prep.resize
    batch = {
        "image": rng.integers(0, 256, (4, s, s, 3), dtype=np.uint8),
        "label": np.array([0, 1, 2, 1], np.int32),
        "mask": np.ones(4, np.bool_),
    }
    batch = sharding.host_to_global(batch, sharding.batch_sharding(run.mesh))
    for _ in range(2):
        st, metrics = step_fn(st, batch)
    assert np.isfinite(float(metrics["loss"]))
    after = jax.device_get(tree.flatten(state.variables_of(st)))
    assert after.keys() == before.keys()
    stats = {n for n in before if n.startswith("batch_stats/")}
    params = set(before) - stats
    assert len(stats) == 2 * 12 and len(params) == 12 + 2 * 12 + 2  # kernels, BN, head
    changed = {n for n in before if before[n].tobytes() != after[n].tobytes()}
    assert params <= changed, sorted(params - changed)
    if bn_mode == "frozen":  # running statistics used, never updated
        assert not changed & stats, sorted(changed & stats)
    else:
        assert stats <= changed, sorted(stats - changed)
