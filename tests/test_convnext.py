"""ConvNeXt: logits parity with timm, transformers and the paper's checkpoint names (random
weights), names pinned to full-size convnext_tiny, stage / layer maps, loud loads, a run."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import refs
import timm
import torch
from timm.models.convnext import ConvNeXt, checkpoint_filter_fn
from transformers import ConvNextConfig, ConvNextForImageClassification

from tlflax import config_lib, optim, tree
from tlflax.errors import ConfigError
from tlflax.models import convnext, create_model
from tlflax.weights import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    convert_convnext,
    load_pretrained,
    merge_variables,
)

TOL = 1e-4  # fp32, max |logits diff|
# timm's ConvNeXt has four stages; a stage of two blocks checks the block numbering.
TIMM = {"depths": (1, 2, 1, 1), "dims": (8, 16, 24, 32)}
HF = {"depths": [1, 1], "hidden_sizes": [8, 16], "num_stages": 2}  # convnext_test's


def _randomise(model: torch.nn.Module, *, seed: int) -> torch.nn.Module:
    """Every parameter off its init; layer scales O(1) (their 1e-6 init would hide the blocks)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(("gamma", "layer_scale_parameter")):
                p.copy_(0.5 * noise)
            else:
                p.add_(0.2 * noise)
    return model.eval()


def _timm(seed: int = 0, **kwargs) -> ConvNeXt:
    return _randomise(ConvNeXt(**TIMM, num_classes=5, **kwargs), seed=seed)


def _hf(seed: int = 0, **kwargs) -> ConvNextForImageClassification:
    config = ConvNextConfig(**HF, num_labels=5, **kwargs)
    return _randomise(ConvNextForImageClassification(config), seed=seed)


def _numpy(state) -> dict:
    return {k: v.detach().numpy() for k, v in state.items()}


def _load(spec, state, *, reinit=()):
    shapes = jax.eval_shape(lambda: spec.init(jax.random.key(0)))
    converted = convert_convnext.convert(_numpy(state), spec=spec, shapes=None)
    return merge_variables(converted, shapes, reinit=reinit)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply(module, variables, x, features=False):
    """One compile per (model, input shape) for the whole file: modules compare by value."""
    return module.apply(variables, x, method=module.features if features else module.__call__)


# --- parity ---


@pytest.mark.parametrize("size", [64, 75])  # 75: the stem drops 3 px, a downsample 9 -> 4
def test_logits_match_timm(size):
    ref = _timm()
    spec = create_model("convnext_test", num_classes=5, **TIMM)
    variables, report = _load(spec, ref.state_dict())
    assert report.scheme == "timm" and not report.reinitialised
    x = refs.images(size)
    assert refs.max_diff(_apply(spec.module, variables, x), refs.torch_logits(ref, x)) <= TOL


@pytest.mark.parametrize("size", [32, 45])  # 45: the stem and the downsample floor (11, 5)
def test_logits_match_transformers(size):
    """ConvNextForImageClassification on convnext_test's layout, its final LayerNorm's
    epsilon (ConvNextConfig.layer_norm_eps, 1e-12) read from the config."""
    ref = _hf()
    overrides = convnext.overrides_from_hf_config(ref.config.to_dict())
    assert overrides["head_norm_eps"] == 1e-12
    spec = create_model("convnext_test", num_classes=5, **overrides)
    variables, report = _load(spec, ref.state_dict())
    assert report.scheme == "hf"
    x = refs.images(size)
    want = refs.torch_logits(ref, x)
    assert refs.max_diff(_apply(spec.module, variables, x), want) <= TOL


def test_transformers_convnext_model_features_are_its_pooler_output():
    """ConvNextModel (no 'convnext.' prefix, no classifier): the backbone's features are its
    pooled, normalised output; the head is left to the fresh init."""
    ref = _hf(seed=1).convnext.eval()
    spec = create_model("convnext_test", num_classes=5, head_norm_eps=1e-12)
    variables, report = _load(spec, ref.state_dict(), reinit=("head/.*",))
    assert report.scheme == "hf" and set(report.reinitialised) == {
        "params/head/out/kernel",
        "params/head/out/bias",
    }
    x = refs.images(32)
    want = refs.torch_forward(ref, x).pooler_output.numpy()
    assert refs.max_diff(_apply(spec.module, variables, x, True), want) <= TOL


def _fb_names(state: dict) -> dict:
    """timm's names -> the paper's (facebookresearch/ConvNeXt), written from its model code."""
    out = {}
    for key, value in state.items():
        key = key.replace("stem.", "downsample_layers.0.").replace("conv_dw", "dwconv")
        key = key.replace("mlp.fc", "pwconv").replace("head.fc.", "head.")
        key = key.replace("head.norm.", "norm.").replace(".blocks.", ".")
        if ".downsample." in key:
            key = key.replace("stages.", "downsample_layers.").replace(".downsample.", ".")
        out[key] = value
    return out


def test_the_papers_checkpoint_names_give_timms_logits():
    ref = _timm(seed=2)
    state = ref.state_dict()
    fb = _fb_names(state)
    assert "downsample_layers.1.1.weight" in fb and "stages.1.1.pwconv2.bias" in fb
    # timm's own loader of these files maps them back onto its model exactly.
    back = checkpoint_filter_fn(dict(fb), ref)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    spec = create_model("convnext_test", num_classes=5, **TIMM)
    variables, report = _load(spec, fb)
    assert report.scheme == "fb"
    x = refs.images(64)
    assert refs.max_diff(_apply(spec.module, variables, x), refs.torch_logits(ref, x)) <= TOL


def test_timm_conv_mlp_layout_reads_its_1x1_convs_as_the_linear_layers():
    """convnext_atto ... nano (conv_mlp=True): the same names, MLP weights (out, in, 1, 1)."""
    ref = _timm(seed=3, conv_mlp=True)
    assert ref.state_dict()["stages.0.blocks.0.mlp.fc1.weight"].shape == (32, 8, 1, 1)
    spec = create_model("convnext_test", num_classes=5, **TIMM)
    variables, _ = _load(spec, ref.state_dict())
    x = refs.images(64)
    assert refs.max_diff(_apply(spec.module, variables, x), refs.torch_logits(ref, x)) <= TOL


def test_the_grouped_conv_depthwise_gives_the_same_logits():
    """depthwise='conv' (XLA's grouped conv, 'auto' on accelerators) vs the CPU's shifts."""
    ref = _timm()
    spec = create_model("convnext_test", num_classes=5, **TIMM, depthwise="conv")
    variables, _ = _load(spec, ref.state_dict())
    x = refs.images(64)
    assert refs.max_diff(_apply(spec.module, variables, x), refs.torch_logits(ref, x)) <= TOL


# --- names, sizes, maps ---


def _meta_zeros(model: torch.nn.Module) -> dict:
    """A state dict's names and shapes as zero-strided arrays: nothing allocated."""
    return {
        k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in model.state_dict().items()
    }


def test_parameter_names_and_shapes_are_full_size_convnext_tinys():
    """timm's convnext_tiny and transformers' facebook/convnext-tiny-224 layout (built on the
    meta device: shapes only): every array lands, nothing is left over."""
    timm_model = timm.create_model("convnext_tiny", pretrained=False, device="meta")
    with torch.device("meta"):
        hf_model = ConvNextForImageClassification(ConvNextConfig(num_labels=1000))
    spec = create_model("convnext_tiny", num_classes=1000)
    shapes = jax.eval_shape(lambda: spec.init(jax.random.key(0)))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(shapes))
    assert n_params == sum(p.numel() for p in timm_model.parameters()) == 28_589_128
    for model, scheme in ((timm_model, "timm"), (hf_model, "hf")):
        state = _meta_zeros(model)
        converted = convert_convnext.convert(state, spec=spec, shapes=None)
        _, report = merge_variables(converted, shapes, reinit=())
        assert report.scheme == scheme and len(report.loaded) == len(state) == 182
    names = tree.names(shapes)
    assert "params/backbone/stage3/block9/gamma" in names
    assert "params/backbone/stage4/downsample/conv/kernel" in names
    assert "params/backbone/stage1/downsample/norm/scale" not in names


CONVNEXT_TEST_NAMES = {
    *(f"params/backbone/{m}/{leaf}" for m in ("stem/conv", "stage2/downsample/conv")
      for leaf in ("kernel", "bias")),
    *(f"params/backbone/{m}/{leaf}" for m in ("stem/norm", "stage2/downsample/norm", "norm")
      for leaf in ("scale", "bias")),
    *(f"params/backbone/{b}/{m}/{leaf}" for b in ("stage1/block1", "stage2/block1")
      for m in ("dwconv", "fc1", "fc2") for leaf in ("kernel", "bias")),
    *(f"params/backbone/{b}/norm/{leaf}" for b in ("stage1/block1", "stage2/block1")
      for leaf in ("scale", "bias")),
    "params/backbone/stage1/block1/gamma", "params/backbone/stage2/block1/gamma",
    "params/head/out/kernel", "params/head/out/bias",
}  # fmt: skip


def test_convnext_test_names_are_pinned_and_the_sizes_are_timms():
    spec = create_model("convnext_test", num_classes=5)
    shapes = jax.eval_shape(lambda: spec.init(jax.random.key(0)))
    assert set(tree.names(shapes)) == CONVNEXT_TEST_NAMES
    assert tree.flatten(shapes)["params/backbone/stage2/block1/dwconv/kernel"].shape == (
        7, 7, 1, 16,
    )  # fmt: skip
    assert spec.preprocessing.resolution == 32 and spec.feature_dim == 16
    for name in ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large"):
        ref = timm.create_model(name, pretrained=False, device="meta")
        depths = tuple(len(stage.blocks) for stage in ref.stages)
        dims = tuple(stage.blocks[0].norm.normalized_shape[0] for stage in ref.stages)
        arch = create_model(name, num_classes=3).arch
        assert (arch["depths"], arch["dims"]) == (depths, dims), name
        assert create_model(name, num_classes=3).preprocessing.crop_pct == pytest.approx(0.875)


def test_stages_and_layers_cover_every_parameter_and_strategies_use_them():
    spec = create_model("convnext_test", num_classes=4, depths=(1, 2, 1), dims=(8, 16, 24))
    params = jax.eval_shape(lambda: spec.init(jax.random.key(0)))["params"]
    names = tree.names(params)
    assert sorted({spec.stage_of(n) for n in names}) == list(range(spec.n_stages + 1))
    assert sorted({spec.layer_of(n) for n in names}) == list(range(spec.n_layers + 1))
    where = {n: (spec.stage_of(n), spec.layer_of(n)) for n in names}
    assert where["backbone/stem/conv/kernel"] == (0, 0)
    assert where["backbone/stage1/block1/fc1/kernel"] == (1, 1)
    # A downsample goes with its stage's first block (timm's group_matcher).
    assert where["backbone/stage2/downsample/conv/kernel"] == (2, 2)
    assert where["backbone/stage2/block2/gamma"] == (2, 3)
    assert where["backbone/norm/scale"] == (3, 4) == where["backbone/stage3/block1/gamma"]
    assert where["head/out/kernel"] == (spec.n_stages, spec.n_layers) == (4, 5)
    assert spec.stage_of("params/backbone/stem/norm/bias") == 0
    for bad in ("backbone/stage1/downsample/conv/kernel", "backbone/stage2/block3/gamma",
                "backbone/stage4/block1/gamma", "backbone/pre_logits/kernel"):  # fmt: skip
        with pytest.raises(ValueError, match="no parameter"):
            spec.layer_of(bad)
    trainable = refs.last_k_trainable(spec, params, 1)
    assert trainable["backbone/stage3/downsample/conv/kernel"] and trainable["backbone/norm/bias"]
    assert not trainable["backbone/stage2/block2/fc1/kernel"]
    groups = optim.strategy_groups("full", config_lib.get_base_config().optim, spec=spec,
                                   names=names, lr_decay="layer_decay")  # fmt: skip
    mult = {n: rule["lr_mult"] for n in names for regex, rule in groups if _full(regex, n)}
    assert mult["backbone/stage2/downsample/norm/scale"] == mult["backbone/stage2/block1/gamma"]
    assert mult["backbone/stem/conv/kernel"] == pytest.approx(0.75**5)
    assert mult["backbone/norm/scale"] == pytest.approx(0.75) and mult["head/out/bias"] == 1.0


def _full(regex: str, name: str) -> bool:
    import re

    return re.fullmatch(regex, name) is not None


# --- loud failures ---


def test_a_checkpoint_that_does_not_fit_is_listed(tmp_path):
    ref = _hf().state_dict()
    spec = create_model("convnext_test", num_classes=5)
    block = "convnext.encoder.stages.1.layers.0"
    refs.assert_misfits_named(
        functools.partial(_load, spec), ref, missing=f"{block}.layer_scale_parameter",
        unexpected={"convnext.encoder.stages.2.layers.0.dwconv.bias": torch.zeros(4)},
        misshapen={f"{block}.dwconv.weight": torch.zeros(16, 1, 5, 5)},
    )  # fmt: skip
    with pytest.raises(CheckpointMismatchError, match="missing"):  # a deeper model
        _load(create_model("convnext_test", num_classes=5, depths=(1, 2)), ref)
    with pytest.raises(ConfigError, match="not a ConvNeXt checkpoint"):
        convert_convnext.convert({"conv1.weight": np.zeros(3)}, spec=spec, shapes=None)
    v2 = {**_numpy(_timm().state_dict()), "stages.0.blocks.0.mlp.grn.weight": np.zeros(8)}
    with pytest.raises(ConfigError, match="ConvNeXt V2"):
        convert_convnext.convert(v2, spec=spec, shapes=None)
    with pytest.raises(ConfigError, match="head_norm_first"):
        convert_convnext.convert({"norm_pre.weight": np.zeros(8)}, spec=spec, shapes=None)
    vgg = create_model("vgg_tiny", num_classes=5)
    with pytest.raises(ConfigError, match="convert_convnext got a 'vgg' model"):
        convert_convnext.convert(_numpy(ref), spec=vgg, shapes=None)
    path = tmp_path / "convnext.pth"
    torch.save(ref, path)
    path.write_bytes(path.read_bytes()[:-200])  # cut short: a broken download
    variables = jax.eval_shape(lambda: spec.init(jax.random.key(0)))
    with pytest.raises(CorruptCheckpointError, match="convnext.pth"):
        load_pretrained(spec, str(path), variables=variables, preprocessing=spec.preprocessing)


def test_bad_options_and_inputs_are_refused_with_the_fix():
    cases = [
        ({"depths": (1, 1), "dims": (8,)}, "one positive integer per stage"),
        ({"depths": (1, 0)}, "one positive integer per stage"),
        ({"dims": (8, 16.5)}, "one positive integer per stage"),
        ({"norm_eps": 0}, "norm_eps must be > 0"),
        ({"layer_scale_init": -1}, "layer_scale_init must be > 0"),
        ({"drop_path_rate": 1.0}, r"drop_path_rate must be in \[0, 1\)"),
        ({"depthwise": "fft"}, "depthwise='fft'"),
        ({"kernel": 5}, "unknown model option"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            create_model("convnext_test", num_classes=3, **overrides)
    spec = create_model("convnext_test", num_classes=3, **TIMM)
    shapes = jax.eval_shape(lambda: spec.init(jax.random.key(0), 64))
    with pytest.raises(ConfigError, match="stage4's downsample got a 1x1 map"):
        jax.eval_shape(spec.module.apply, shapes, jnp.zeros((1, 16, 16, 3)))
    for config, message in (({"hidden_act": "relu"}, "hidden_act"),
                            ({"layer_scale_init_value": 0.0}, "layer scale")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            convnext.overrides_from_hf_config(config)


def test_drop_path_follows_timm_and_is_random_in_training_only():
    rates = convnext.drop_path_rates(0.1, (3, 3, 9, 3))
    want = timm.layers.calculate_drop_path_rates(0.1, (3, 3, 9, 3), stagewise=True)
    np.testing.assert_allclose([r for s in rates for r in s], [r for s in want for r in s])
    # The grouped-conv depthwise: the quickest compile of a train-mode forward on tiny maps.
    ref = _hf(layer_norm_eps=1e-6)  # convnext_test's head_norm_eps
    spec = create_model("convnext_test", num_classes=5, drop_path_rate=0.5, depthwise="conv")
    variables, _ = _load(spec, ref.state_dict())
    x = refs.images(32, batch=8)
    want = refs.torch_logits(ref, x)  # drop path is off at inference
    assert refs.max_diff(_apply(spec.module, variables, x), want) <= TOL
    train = jax.jit(lambda v, x, r: spec.module.apply(v, x, train=True, rngs={"dropout": r}))
    a, b = (np.asarray(train(variables, x, jax.random.key(i))) for i in (1, 2))
    assert refs.max_diff(a, b) > 1e-3


# --- a run ---


@pytest.mark.slow  # ~20 s of CPU: the trainer's step compiles for ~10 s, even for convnext_test
def test_a_pth_fine_tunes_with_the_layer_map_setting_each_learning_rate(tmp_path):
    """A transformers state dict saved with torch.save as weights.source; full fine-tuning
    with layer-wise lr decay. The head starts at zero, so the backbone's first gradient is
    zero and its second Adam step moves every leaf by ~0.744 lr * mult (the bias-corrected
    moments of one gradient): each leaf's largest change gives its lr, set by layer_of."""
    from tlflax import train

    ref = _hf(layer_norm_eps=1e-6)
    config = refs.pth_run_config(tmp_path, ref, "convnext_test", image_size=32, settings={
        "optim.strategy": "full", "train.steps": 2,
        "optim.lr_decay": "layer_decay", "optim.layer_decay": 0.5,
    })  # fmt: skip
    config.model.overrides = {"depthwise": "conv"}  # tiny maps: XLA's conv compiles fastest
    summary = train.train_and_evaluate(config, tmp_path / "run")
    assert summary["steps"] == 2
    restored = refs.restored_state(tmp_path / "run", 2)
    spec = create_model("convnext_test", num_classes=10)
    loaded = convert_convnext.convert(_numpy(ref.state_dict()), spec=spec, shapes=None).variables
    after = tree.flatten(restored["params"])
    adam_step2 = (0.1 / 0.19) / np.sqrt(0.001 / (1 - 0.999**2))  # m_hat / sqrt(v_hat)
    for name in ("stem/conv/kernel", "stage1/block1/fc1/kernel", "stage2/downsample/norm/scale",
                 "stage2/block1/gamma", "stage2/block1/dwconv/kernel", "norm/bias"):  # fmt: skip
        moved = np.abs(after[f"backbone/{name}"] - loaded[f"params/backbone/{name}"]).max()
        lr = 1e-3 * 0.5 ** (spec.n_layers - spec.layer_of(f"backbone/{name}"))
        assert moved == pytest.approx(adam_step2 * lr, rel=0.02), name
    assert after["head/out/kernel"].shape == (16, 10)
