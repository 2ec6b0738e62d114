"""Strategy presets on the real model families: freezing, discriminative lrs, two phases."""

import logging
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tlflax import config_lib, optim, tree
from tlflax.models import create_model

NUM_CLASSES = 5
RESOLUTION = {"resnet_tiny": 32, "vit_tiny": 32}  # the rest at their default (224)


def make_spec(name: str):
    return create_model(name, num_classes=NUM_CLASSES)


def abstract_params(spec):
    size = RESOLUTION.get(spec.name)
    return jax.eval_shape(lambda: spec.init(jax.random.key(0), size))["params"]


def configs(**values):
    config = config_lib.lock(config_lib.get_base_config())
    for key, value in values.items():
        config.optim[key] = value
    return config


def phases_of(config, spec, params, *, steps_per_epoch=10):
    return optim.make_phases(
        config.optim,
        train_config=config.train,
        params=params,
        spec=spec,
        steps_per_epoch=steps_per_epoch,
    )


def state_bytes(state) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))


def moments_of(state, field: str) -> dict:
    """{leaf name: array} of one moment (e.g. adam's 'mu') across every group's state."""
    found = {}
    for _, value in optax.tree_utils.tree_get_all_with_path(state, field):
        for name, leaf in tree.flatten(value).items():
            if not isinstance(leaf, optax.MaskedNode):
                found[name] = leaf
    return found


def test_linear_probe_on_resnet50_holds_moments_for_the_head_only():
    spec = make_spec("resnet50")
    params = abstract_params(spec)
    (phase,) = phases_of(configs(name="adam", strategy="linear_probe"), spec, params)
    state = jax.eval_shape(phase.tx.init, params)
    head_bytes = state_bytes(params["head"])
    assert head_bytes == (2048 * NUM_CLASSES + NUM_CLASSES) * 4
    assert 0 <= state_bytes(state) - 2 * head_bytes <= 64  # plus a few int32 counters
    assert set(moments_of(state, "mu")) == {"head/out/kernel", "head/out/bias"}
    flat = tree.flatten(phase.trainable)
    assert {n for n, t in flat.items() if t} == {"head/out/kernel", "head/out/bias"}
    assert phase.table.splitlines()[1].split()[1:4] == ["head/.*", "head", "2"]


@pytest.mark.parametrize(
    "name, k",
    [
        ("resnet_tiny", 2),
        ("resnet50", 1),
        ("vit_tiny", 1),
        ("efficientnet_lite_tiny", 3),
        ("efficientnet_lite0", 1),
    ],
)
def test_last_k_trains_the_last_stages_and_the_head(name, k):
    spec = make_spec(name)
    params = abstract_params(spec)
    (phase,) = phases_of(configs(strategy="last_k", k=k), spec, params)
    for leaf, trainable in tree.flatten(phase.trainable).items():
        assert trainable == (spec.stage_of(leaf) >= spec.n_stages - k), leaf
    state = jax.eval_shape(phase.tx.init, params)
    assert set(moments_of(state, "mu")) == {
        n for n, t in tree.flatten(phase.trainable).items() if t
    }
    # All stages: nothing frozen, and no frozen rule that would match nothing.
    (phase,) = phases_of(configs(strategy="last_k", k=spec.n_stages), spec, params)
    assert all(tree.flatten(phase.trainable).values())
    assert "frozen" not in phase.table


def expected_mult(spec, name, c) -> float:
    if c.lr_decay == "none":
        return 1.0
    if c.lr_decay == "exponential":
        return c.stage_divisor ** -(spec.n_stages - spec.stage_of(name))
    layer = spec.layer_of(name)
    if c.lr_decay == "linear":
        return c.lr_floor_mult + (1 - c.lr_floor_mult) * layer / spec.n_layers
    return c.layer_decay ** (spec.n_layers - layer)


FAMILIES = ["resnet_tiny", "resnet50", "vit_tiny", "vit_b16"]
FAMILIES += ["efficientnet_lite_tiny", "efficientnet_lite0"]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("lr_decay", ["layer_decay", "exponential", "linear", "none"])
def test_discriminative_lr_of_every_leaf_through_the_tx(name, lr_decay):
    spec = make_spec(name)
    params = abstract_params(spec)
    config = configs(name="sgd", momentum=0.0, lr=0.01, strategy="full", lr_decay=lr_decay)
    config.optim.update(layer_decay=0.65, stage_divisor=2.5, lr_floor_mult=0.01)
    (phase,) = phases_of(config, spec, params)
    # SGD with unit gradients: each update is minus the leaf's effective lr. The tx does
    # not depend on the shapes, so probe with one element per leaf.
    probe = jax.tree_util.tree_map(lambda _: jnp.ones((1,), jnp.float32), params)
    updates, _ = phase.tx.update(probe, phase.tx.init(probe), probe)
    flat = tree.flatten(updates)
    assert len(flat) == len(tree.flatten(params))
    mults = set()
    for leaf, update in flat.items():
        mult = expected_mult(spec, leaf, config.optim)
        mults.add(round(mult, 12))
        np.testing.assert_allclose(-update, 0.01 * mult, rtol=1e-6, err_msg=leaf)
    n_groups = {"none": 1, "exponential": spec.n_stages + 1}.get(lr_decay, spec.n_layers + 1)
    assert len(mults) == n_groups
    if lr_decay == "layer_decay":  # the head at lr, the first layer at lr * decay ** n_layers
        assert max(mults) == 1.0
        assert min(mults) == pytest.approx(0.65**spec.n_layers)


def test_seed_rates():
    """ResNet: lr / 3 per stage towards the input; VGG16-style linear: lr at the head down
    to 1e-7 at the first layer from 1e-4."""
    spec = make_spec("resnet50")
    params = abstract_params(spec)
    config = configs(strategy="full", lr_decay="exponential", lr=1e-3)
    (phase,) = phases_of(config, spec, params)
    assert float(phase.lr_fns["head"](0)) == pytest.approx(1e-3)
    assert float(phase.lr_fns["stage4"](0)) == pytest.approx(1e-3 / 3)
    assert float(phase.lr_fns["stage0"](0)) == pytest.approx(1e-3 / 3**5)
    config = configs(strategy="full", lr_decay="linear", lr=1e-4, lr_floor_mult=1e-3)
    (phase,) = phases_of(config, spec, params)
    assert float(phase.lr_fns["head"](0)) == pytest.approx(1e-4)
    assert float(phase.lr_fns["layer00"](0)) == pytest.approx(1e-7)


def test_lite_presets_by_name():
    """EfficientNet-Lite0 (7 block stages of 1-4 blocks): the head conv is the stage below the
    head; last_k and the exponential / linear rates in the model's own names."""
    spec = make_spec("efficientnet_lite0")
    params = abstract_params(spec)
    (phase,) = phases_of(configs(strategy="last_k", k=2), spec, params)
    trainable = {n for n, t in tree.flatten(phase.trainable).items() if t}
    top = r"backbone/(stage7/block1|head_conv|head_bn)/.*|head/out/(kernel|bias)"
    assert trainable == {n for n in tree.names(params) if re.fullmatch(top, n)}
    assert len(trainable) == 2 + 3 + 9  # head; head_conv + head_bn; expand, dw, project + bns
    config = configs(strategy="full", lr_decay="exponential", lr=1e-3, stage_divisor=2.0)
    (phase,) = phases_of(config, spec, params)
    assert sorted(phase.lr_fns) == sorted(["head"] + [f"stage{i}" for i in range(9)])
    assert float(phase.lr_fns["stage8"](0)) == pytest.approx(1e-3 / 2)  # head_conv, head_bn
    assert float(phase.lr_fns["stage0"](0)) == pytest.approx(1e-3 / 2**9)  # the stem
    config = configs(strategy="full", lr_decay="linear", lr=1e-3, lr_floor_mult=0.1)
    (phase,) = phases_of(config, spec, params)
    assert len(phase.lr_fns) == 16 + 3  # stem, 16 blocks, head_conv, head
    assert float(phase.lr_fns["layer00"](0)) == pytest.approx(1e-4)
    assert float(phase.lr_fns["layer09"](0)) == pytest.approx(1e-4 + 9e-4 * 9 / 18)
    assert float(phase.lr_fns["head"](0)) == pytest.approx(1e-3)


def compiled_flops(spec, variables, phase, *, batch: int = 8) -> float:
    """FLOPs of one compiled loss + grad + update step, with the logged gradient norm."""
    size = RESOLUTION[spec.name]
    images = jnp.zeros((batch, size, size, 3), jnp.float32)
    labels = jnp.zeros((batch,), jnp.int32)

    def step(params, batch_stats, opt_state):
        def loss_fn(p):
            logits = spec.module.apply(
                {"params": p, "batch_stats": batch_stats},
                images,
                train=True,
                bn_train=False,
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = phase.tx.update(grads, opt_state, params)
        grad_norm = optim.trainable_global_norm(grads, phase.trainable)
        return optax.apply_updates(params, updates), opt_state, loss, grad_norm

    params = variables["params"]
    opt_state = jax.eval_shape(phase.tx.init, params)
    lowered = jax.jit(step).lower(params, variables["batch_stats"], opt_state)
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def test_xla_drops_the_frozen_backward_pass():
    spec = make_spec("resnet_tiny")
    variables = jax.eval_shape(lambda: spec.init(jax.random.key(0), RESOLUTION[spec.name]))
    flops = {}
    for strategy in ("linear_probe", "full"):
        config = configs(strategy=strategy, grad_clip_norm=1.0)
        (phase,) = phases_of(config, spec, variables["params"])
        flops[strategy] = compiled_flops(spec, variables, phase)
    assert flops["full"] > 0
    assert flops["linear_probe"] <= 0.5 * flops["full"], flops


@pytest.mark.parametrize(
    "lengths, steps_per_epoch, switch, end",
    [
        ({"probe_epochs": 2.0, "finetune_steps": 7}, 5, 10, 17),
        ({"probe_steps": 3, "finetune_epochs": 1.5}, 4, 3, 9),
        ({"probe_epochs": 16.0, "finetune_epochs": 8.0}, 10, 160, 240),  # the seeds
    ],
)
def test_two_phase_boundaries(lengths, steps_per_epoch, switch, end):
    spec = make_spec("resnet_tiny")
    config = configs(strategy="two_phase", **lengths)
    phases = phases_of(config, spec, abstract_params(spec), steps_per_epoch=steps_per_epoch)
    assert [(p.name, p.start_step, p.end_step) for p in phases] == [
        ("linear_probe", 0, switch),
        ("finetune", switch, end),
    ]
    assert "reset" not in phases[0].table and optim.RESET_NOTE in phases[1].table


def jitted_step(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step)


def test_two_phase_switch_gives_state_to_newly_trainable_leaves():
    spec = make_spec("resnet_tiny")
    # Values do not matter here, and the real init compiles the model: fill the shapes
    # (with numpy, so that nothing but the two steps and the inits compiles).
    shapes = abstract_params(spec)
    params = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.5, np.float32), shapes)
    grads = jax.tree_util.tree_map(lambda s: np.ones(s.shape, np.float32), shapes)
    config = configs(strategy="two_phase", probe_steps=2, finetune_steps=2, lr=1e-2)
    config.optim.finetune_lr = 1e-3
    config.optim.finetune_optimizer = "adamw"
    probe, finetune = phases_of(config, spec, params)
    state = jax.jit(probe.tx.init)(params)
    assert set(moments_of(state, "mu")) == {"head/out/kernel", "head/out/bias"}
    p, step = params, jitted_step(probe.tx)
    for _ in range(probe.end_step - probe.start_step):
        p, state = step(p, state, grads)
    stem = "backbone/stem/conv/kernel"
    np.testing.assert_array_equal(tree.flatten(p)[stem], tree.flatten(params)[stem])
    state = jax.jit(finetune.tx.init)(p)  # what the trainer does at the switch
    mu = jax.device_get(moments_of(state, "mu"))
    assert set(mu) == set(tree.names(params))
    assert all(not np.any(m) for m in mu.values())  # fresh moments, not carried over
    new, state = jitted_step(finetune.tx)(p, state, grads)
    new, old = jax.device_get((tree.flatten(new), tree.flatten(p)))
    assert all(not np.array_equal(new[n], old[n]) for n in old)
    mu = jax.device_get(moments_of(state, "mu"))
    assert all(np.allclose(m, 0.1) for m in mu.values())  # (1 - b1) * unit gradient
    assert float(finetune.lr_fns["all"](finetune.start_step)) == pytest.approx(1e-3)
    assert "optimizer adamw, lr 0.001" in finetune.table


def test_two_phase_finetune_last_k_with_layer_decay():
    spec = make_spec("vit_tiny")
    config = configs(strategy="two_phase", probe_steps=4, finetune_steps=4)
    config.optim.update(finetune="last_k", k=1, lr_decay="layer_decay", finetune_lr=1e-4)
    _, finetune = phases_of(config, spec, abstract_params(spec))
    flat = tree.flatten(finetune.trainable)
    assert not flat["backbone/block0/attn/qkv/kernel"] and flat["backbone/block1/attn/qkv/kernel"]
    assert float(finetune.lr_fns["head"](4)) == pytest.approx(1e-4)
    assert float(finetune.lr_fns["layer02"](4)) == pytest.approx(1e-4 * 0.75)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"strategy": "probe"}, "strategy='probe' is unknown; use one of '', 'linear_probe'"),
        ({"name": "adagrad"}, "name='adagrad' is unknown"),
        ({"strategy": "last_k", "k": 6}, "k=6 but resnet_tiny has 5 stages.*use k <= 5"),
        ({"strategy": "full", "lr_decay": "cosine"}, "lr_decay='cosine' is unknown"),
        ({"strategy": "full", "layer_decay": 0.0}, "layer_decay=0.0 must lie in"),
        ({"strategy": "two_phase"}, "needs probe_epochs or probe_steps > 0"),
        ({"strategy": "two_phase", "probe_steps": 5, "probe_epochs": 1.0}, "both probe_steps"),
        (
            {"strategy": "two_phase", "probe_steps": 1, "finetune_steps": 1, "finetune": "x"},
            "finetune='x' is unknown",
        ),
        (
            {"strategy": "", "groups": (("backbone/stage9/.*", None), (".*", {}))},
            "'backbone/stage9/.*' matches no parameter",
        ),
        (
            {"strategy": "", "groups": (("head/.*", {"lr_mult": 0}), (".*", None))},
            "lr_mult=0 must be > 0",
        ),
        (
            {"strategy": "", "groups": (("head/.*", {}),)},
            "no rule matches backbone/.*final \\('\\.\\*'",
        ),
    ],
)
def test_bad_configs_fail_before_anything_compiles(values, message, caplog):
    spec = make_spec("resnet_tiny")
    params = abstract_params(spec)
    config = configs(**values)
    with jax.log_compiles(True), caplog.at_level(logging.DEBUG, logger="jax"):
        caplog.clear()
        with pytest.raises(ValueError, match=message):
            phases_of(config, spec, params)
        # The same error from the check the trainer makes before it loads any data.
        with pytest.raises(ValueError, match=message):
            optim.check_groups(config.optim, params=params, spec=spec)
    assert not [r for r in caplog.records if "ompil" in r.getMessage()]


def test_two_phase_length_is_the_sum_of_its_phases():
    spec = make_spec("resnet_tiny")
    config = configs(strategy="two_phase", probe_steps=3, finetune_steps=4)
    phases = phases_of(config, spec, abstract_params(spec), steps_per_epoch=1)
    assert [(p.start_step, p.end_step) for p in phases] == [(0, 3), (3, 7)]
    assert optim.total_steps(config.optim, steps_per_epoch=1, train_config=config.train) == 7


def test_every_strategy_is_one_entry_of_the_plan_table():
    assert optim.STRATEGIES == tuple(k for k in optim.STRATEGY_PLANS if k)
    config = configs(strategy="two_phase", probe_epochs=2.0, finetune_steps=5)
    specs = optim.plan_phases(config.optim, train_config=config.train)
    assert [(s.name, s.rules, s.steps, s.epochs) for s in specs] == [
        ("linear_probe", "linear_probe", 0, 2.0),
        ("finetune", "full", 5, 0.0),
    ]
    assert [s.bind(10) for s in specs] == [20, 5]  # durations bound once the data is known


HEAD_ONLY = (("head/.*", {}), (".*", None))
STAGE3_UP = (("head/.*", {"name": "head"}), ("backbone/stage3/.*", {"lr_mult": 0.1}), (".*", None))


def test_hand_written_groups_in_a_plan_of_phases():
    spec = make_spec("resnet_tiny")
    params = abstract_params(spec)
    phases_config = (
        dict(name="probe", groups=HEAD_ONLY, steps=3),
        dict(groups=STAGE3_UP, epochs=0.5, lr=1e-4, optimizer="sgd"),
    )
    config = configs(strategy="", phases=phases_config)
    phases = phases_of(config, spec, params, steps_per_epoch=10)
    assert [(p.name, p.start_step, p.end_step) for p in phases] == [
        ("probe", 0, 3),
        ("phase1", 3, 8),
    ]
    trainable = [sorted(n for n, t in tree.flatten(p.trainable).items() if t) for p in phases]
    assert all(n.startswith("head/") for n in trainable[0])
    assert {n.split("/")[1] for n in trainable[1] if n.startswith("backbone/")} == {"stage3"}
    assert "optimizer sgd, lr 0.0001" in phases[1].table
    assert phases[1].lr_fns["rule1"](3) == pytest.approx(1e-5)  # lr * lr_mult at its start
    assert optim.total_steps(config.optim, steps_per_epoch=10, train_config=config.train) == 8


@pytest.mark.parametrize(
    "values, message",
    [
        ({"phases": (dict(groups=HEAD_ONLY),)}, "phases\\[0\\]: phase phase0 has no duration"),
        ({"phases": (dict(groups=HEAD_ONLY, step=2),)}, "phases\\[0\\] = .* keys from"),
        ({"phases": (dict(groups=(), steps=2),)}, "phases\\[0\\].groups is empty"),
        (
            {"phases": (dict(groups=HEAD_ONLY, steps=1, epochs=1.0),)},
            "both steps and epochs are set",
        ),
        (
            {"phases": (dict(name="a", groups=HEAD_ONLY, steps=1),) * 2},
            "phase name 'a' is used twice",
        ),
        ({"phases": (dict(groups=HEAD_ONLY, steps=1),), "groups": HEAD_ONLY}, "both set"),
        ({"phases": (dict(groups=HEAD_ONLY, steps=1),), "strategy": "full"}, "optim.phases is set"),
        (
            {"phases": (dict(groups=(("nothing/.*", {}), (".*", None)), steps=1),)},
            "phase phase0: groups\\[0\\]: regex 'nothing/.\\*' matches no parameter",
        ),
    ],
)
def test_bad_plans_of_phases_are_clear_errors(values, message):
    spec = make_spec("resnet_tiny")
    config = configs(strategy="", **values) if "strategy" not in values else configs(**values)
    with pytest.raises(ValueError, match=message):
        optim.check_groups(config.optim, params=abstract_params(spec), spec=spec)


def test_preset_regexes_read_as_module_prefixes():
    spec = make_spec("resnet50")
    (phase,) = phases_of(configs(strategy="last_k", k=2), spec, abstract_params(spec))
    first = phase.table.splitlines()[1].split()[1]
    assert first == "backbone/stage3/.*|backbone/stage4/.*|head/.*"
    assert math.isclose(float(phase.lr_fns["trainable"](0)), 1e-3, rel_tol=1e-6)
