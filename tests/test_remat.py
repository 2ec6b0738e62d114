"""model.remat: every family's blocks recomputed in the backward pass (layers.block_call)
give the same variables, outputs, gradients, BatchNorm statistics and random streams as
without it, and the backward pass really recomputes them: the lowered step holds remat's
barriers (nn.remat, accelerators) or the recomputation's conditionals (the CPU), and on
the CPU the compiled step keeps less."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import refs

from tlflax import config_lib, experiment
from tlflax.models import create_model

# name: (input size, overrides that switch stochastic depth on where the family has it)
FAMILIES = {
    "efficientnet_lite_tiny": (32, {}),  # drop_connect_rate 0.2 by default
    "efficientnet_tiny": (32, {}),
    "mobilenet_v2_tiny": (32, {"drop_path_rate": 0.2}),
    "resnet_tiny": (32, {"drop_path_rate": 0.2}),
    "vit_tiny": (32, {"drop_path_rate": 0.2}),
    "convnext_test": (32, {"drop_path_rate": 0.2}),
    "xception_tiny": (32, {}),
    "vgg_tiny": (32, {"pooling": "avg"}),
}


def _loss_fn(spec, variables, x, *, bn_train: bool):
    def loss(params):
        out, updated = spec.module.apply(
            {**variables, "params": params},
            x,
            train=True,
            bn_train=bn_train,
            rngs={"dropout": jax.random.key(3)},
            mutable=["batch_stats"],
        )
        return jnp.sum(out**2), (out, updated)

    return jax.value_and_grad(loss, has_aux=True)


# Frozen statistics (fine-tuning's default: scaled_linear's own backward pass inside the
# rematted block) for every family; batch statistics (mutable batch_stats) for two. The
# families beyond Lite compile 2 networks each: slow.
CASES = [
    pytest.param(name, False, marks=() if name == "efficientnet_lite_tiny" else pytest.mark.slow)
    for name in sorted(FAMILIES)
] + [("efficientnet_lite_tiny", True), pytest.param("resnet_tiny", True, marks=pytest.mark.slow)]


@pytest.mark.parametrize(("name", "bn_train"), CASES)
def test_remat_is_the_same_network(name, bn_train):
    size, overrides = FAMILIES[name]
    x = jax.random.normal(jax.random.key(1), (4, size, size, 3))  # batch 2: ill-conditioned
    specs = {r: create_model(name, num_classes=3, remat=r, **overrides) for r in (False, True)}
    base = refs.perturbed(specs[False].init(jax.random.key(0), size))
    fresh = jax.eval_shape(lambda: specs[True].init(jax.random.key(0), size))
    assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(base)
    results, marks, temps = {}, {}, {}
    for remat, spec in specs.items():
        lowered = jax.jit(_loss_fn(spec, base, x, bn_train=bn_train)).lower(base["params"])
        marks[remat] = _recomputation_marks(lowered.as_text())
        compiled = lowered.compile()
        temps[remat] = compiled.memory_analysis().temp_size_in_bytes
        results[remat] = compiled(base["params"])
    assert marks[False] == 0 and marks[True] > 0, marks
    if jax.default_backend() == "cpu":
        assert temps[True] < temps[False], temps
    (_, (out0, stats0)), grads0 = results[False]
    (_, (out1, stats1)), grads1 = results[True]
    np.testing.assert_allclose(out1, out0, rtol=1e-5, atol=1e-6)
    # Float32 noise scales with the largest gradient: a bias before a BatchNorm on batch
    # statistics has a true gradient of 0 and computed ones of rounding size.
    scale = max(float(np.max(np.abs(g))) for g in jax.tree_util.tree_leaves(grads0))
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(grads0), leaves(grads1), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * scale)
    for a, b in zip(leaves(stats0), leaves(stats1), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def _recomputation_marks(text: str) -> int:
    """What a recomputing backward pass leaves in the lowered step: jax.checkpoint's
    optimisation barriers, or on the CPU the conditionals (layers._after) that hold each
    recomputation back until its gradient exists (the step has no other conditional)."""
    if jax.default_backend() == "cpu":
        return text.count("stablehlo.case") + text.count("stablehlo.if")
    return text.count("optimization_barrier")


def test_remat_comes_from_the_config():
    """model.remat reaches the model experiment.build_model makes; off by default."""
    config = config_lib.get_base_config()
    config.model.name = "efficientnet_lite_tiny"
    x = jnp.zeros((1, 32, 32, 3))
    counts = []
    for remat in (False, True):
        config.model.remat = remat
        spec = experiment.build_model(config, num_classes=2)
        variables = jax.eval_shape(lambda spec=spec: spec.init(jax.random.key(0), 32))

        def loss(params, stats, spec=spec):
            return jnp.sum(spec.module.apply({"params": params, "batch_stats": stats}, x))

        lowered = jax.jit(jax.grad(loss)).lower(variables["params"], variables["batch_stats"])
        counts.append(_recomputation_marks(lowered.as_text()))
    assert config_lib.get_base_config().model.remat is False
    assert counts[0] == 0 < counts[1]
