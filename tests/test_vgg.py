"""VGG: logits parity with torchvision and timm (random weights), names, poolings, loud loads."""

import functools

import jax
import numpy as np
import pytest
import refs
import timm
import torch
import torchvision

from tlflax import tree
from tlflax.models import create_model, vgg
from tlflax.weights import CheckpointMismatchError, convert_vgg, merge_variables
from tlflax.weights.merge import LoadReport

TOL = 1e-4  # fp32, max |logits diff|
TINY = {"depths": (1, 2, 1, 1, 1), "widths": (4, 8, 8, 16, 16), "fc_width": 32}


def _torchvision(*, batch_norm: bool, num_classes: int = 5, seed: int = 0):
    """torchvision's VGG on the tiny layout; its classifier at the tiny width (same indices)."""
    torch.manual_seed(seed)
    cfg = []
    for depth, width in zip(TINY["depths"], TINY["widths"], strict=True):
        cfg += [width] * depth + ["M"]
    features = torchvision.models.vgg.make_layers(cfg, batch_norm=batch_norm)
    model = torchvision.models.vgg.VGG(features, num_classes=num_classes)
    w, c = TINY["fc_width"], TINY["widths"][-1]
    model.classifier = torch.nn.Sequential(
        torch.nn.Linear(c * 49, w), torch.nn.ReLU(True), torch.nn.Dropout(),
        torch.nn.Linear(w, w), torch.nn.ReLU(True), torch.nn.Dropout(),
        torch.nn.Linear(w, num_classes),
    )  # fmt: skip
    return refs.randomised(model, seed=None, linear=refs.normal_init(0.2, 0.1))


def _load(spec, state, *, reinit=()):
    shapes = jax.eval_shape(lambda: spec.init(jax.random.key(0)))
    converted = convert_vgg.convert({k: v.numpy() for k, v in state.items()}, spec=spec,
                                    shapes=None)  # fmt: skip
    return merge_variables(converted, shapes, reinit=reinit)


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("size", [64, 224])  # 2x2 -> 7x7 adaptive pool; 7x7, the identity
def test_logits_match_torchvision(batch_norm, size):
    ref = _torchvision(batch_norm=batch_norm)
    spec = create_model("vgg_tiny", num_classes=5, **TINY, batch_norm=batch_norm)
    variables, report = _load(spec, ref.state_dict())
    assert report.scheme == "torchvision" and not report.reinitialised
    x = refs.images(size)
    ours = np.asarray(jax.jit(spec.module.apply)(variables, x))
    np.testing.assert_allclose(ours, refs.torch_logits(ref, x), atol=TOL, rtol=0)


def test_logits_match_timm_whose_fc_layers_are_convs():
    """timm's VGG on the tiny layout (its fc layers are 7x7 and 1x1 convs of width 4096)."""
    torch.manual_seed(1)
    cfg = []
    for depth, width in zip(TINY["depths"], TINY["widths"], strict=True):
        cfg += [width] * depth + ["M"]
    ref = timm.models.vgg.VGG(cfg, num_classes=3).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.05)
    spec = create_model("vgg_tiny", num_classes=3, **{**TINY, "fc_width": 4096},
                        batch_norm=False)  # fmt: skip
    variables, report = _load(spec, ref.state_dict())
    assert report.scheme == "timm"
    x = refs.images(224, batch=1)
    ours = np.asarray(jax.jit(spec.module.apply)(variables, x))
    np.testing.assert_allclose(ours, refs.torch_logits(ref, x), atol=TOL, rtol=1e-4)


@pytest.mark.parametrize("name", ["vgg11", "vgg16", "vgg19_bn"])  # every depth rule, BN
def test_parameter_names_and_shapes_are_torchvisions(name):
    """Pinned against torchvision's full-size state dicts (shapes only, nothing allocated
    but the state dict itself): every array lands, nothing is left over."""
    ref = getattr(torchvision.models, name)()
    spec = create_model(name, num_classes=1000)
    variables, report = _load(spec, ref.state_dict())
    n_bn = sum(k.endswith("running_mean") for k in ref.state_dict())
    assert len(report.loaded) == len(ref.state_dict()) - n_bn  # num_batches_tracked: ignored
    names = tree.names(variables)
    assert "params/backbone/stage1/conv1/kernel" in names and "params/head/out/kernel" in names
    assert ("batch_stats/backbone/stage5/bn3/var" in names) == name.endswith("_bn")


@pytest.mark.parametrize("pooling", ["avg", "flatten"])
def test_the_keras_recipes_poolings_read_the_last_map(pooling):
    """avg: its global mean; flatten: the map flattened (NHWC), sized by the resolution; the
    checkpoint's fc layers are left out, saying why."""
    ref = _torchvision(batch_norm=True)
    spec = create_model("vgg_tiny", num_classes=5, **TINY, pooling=pooling)
    variables, report = _load(spec, ref.state_dict(), reinit=("head/.*",))
    assert any("no fc layers" in why for why in report.ignored.values())
    x = refs.images(64)
    fmap = refs.torch_forward(ref.features, x).numpy().transpose(0, 2, 3, 1)  # NHWC, 2 x 2 x 16
    want = fmap.mean(axis=(1, 2)) if pooling == "avg" else fmap.reshape(2, -1)
    feats = spec.module.apply(variables, x, method=spec.module.features)
    np.testing.assert_allclose(np.asarray(feats), want, atol=1e-5)
    assert spec.features_at(64) == want.shape[1]
    head = spec.init_head(jax.random.key(0), 64)["params"]["head"]["out"]["kernel"]
    assert head.shape == (want.shape[1], 5)


def test_stages_and_layers_cover_every_parameter_and_last_k_takes_the_top():
    spec = create_model("vgg_tiny", num_classes=4)
    params = jax.eval_shape(lambda: spec.init(jax.random.key(0)))["params"]
    stages = {n: spec.stage_of(n) for n in tree.names(params)}
    assert stages["backbone/stage1/conv1/kernel"] == 0 and stages["backbone/fc2/bias"] == 5
    assert stages["head/out/kernel"] == spec.n_stages == 6
    layers = sorted({spec.layer_of(n) for n in tree.names(params)})
    assert layers == list(range(spec.n_layers + 1))  # 5 convs, fc1, fc2, the head
    trainable = refs.last_k_trainable(spec, params, 2)
    assert trainable["backbone/fc1/kernel"] and trainable["backbone/stage5/conv1/kernel"]
    assert not trainable["backbone/stage4/conv1/kernel"]
    with pytest.raises(ValueError, match="no parameter"):
        spec.stage_of("backbone/stage9/conv1/kernel")


def test_a_checkpoint_that_does_not_fit_is_listed():
    ref = _torchvision(batch_norm=False).state_dict()
    spec = create_model("vgg_tiny", num_classes=5, **TINY, batch_norm=False)
    refs.assert_misfits_named(
        functools.partial(_load, spec), ref, missing="features.0.bias",
        unexpected={"features.99.weight": torch.zeros(3)},
        misshapen={"features.0.weight": torch.zeros(4, 3, 5, 5)},
    )  # fmt: skip
    with pytest.raises(CheckpointMismatchError, match="missing"):  # a BatchNorm model
        _load(create_model("vgg_tiny", num_classes=5, **TINY, batch_norm=True), ref)
    from tlflax.errors import ConfigError

    with pytest.raises(ConfigError, match="not a VGG checkpoint"):
        convert_vgg.convert({"conv1.weight": np.zeros((1, 1, 1, 1))}, spec=spec, shapes=None)
    with pytest.raises(ConfigError, match="pooling"):
        create_model("vgg16", num_classes=3, pooling="max")
    assert isinstance(_load(spec, ref)[1], LoadReport)


def test_feature_modules_follow_torchvisions_layer_indices():
    got = convert_vgg.feature_modules((2, 1), batch_norm=True)
    # conv bn relu conv bn relu pool | conv bn relu pool
    stage1, stage2 = "backbone/stage1", "backbone/stage2"
    assert got == {0: (f"{stage1}/conv1", "conv"), 1: (f"{stage1}/bn1", "bn"),
                   3: (f"{stage1}/conv2", "conv"), 4: (f"{stage1}/bn2", "bn"),
                   7: (f"{stage2}/conv1", "conv"), 8: (f"{stage2}/bn1", "bn")}  # fmt: skip
    assert vgg.adaptive_avg_pool(np.ones((1, 7, 7, 2)), 7).shape == (1, 7, 7, 2)


@pytest.mark.parametrize("pooling", ["flatten", "classifier"])
def test_a_torchvision_pth_trains_as_an_lp_ft_run(tmp_path, pooling):
    """A .pth of torchvision's VGG as weights.source: ImageNet's normalisation (the family's
    convention), the backbone from the file, a head sized by the features at the run's
    resolution (flatten: 2 x 2 x 16 at 64 px), a cached probe, then fine-tuning."""
    from tlflax import train

    ref = _torchvision(batch_norm=True)
    config = refs.pth_run_config(tmp_path, ref, "vgg_tiny", image_size=64, settings={
        "optim.strategy": "two_phase", "optim.probe": "cached", "optim.probe_steps": 2,
        "optim.finetune_steps": 2,
    })  # fmt: skip
    config.model.overrides = {**TINY, "batch_norm": True, "pooling": pooling}
    summary = train.train_and_evaluate(config, tmp_path / "run")
    assert summary["steps"] == 4 and [p["strategy"] for p in summary["phases"]][0] == "linear_probe"
    prep = refs.run_preprocessing(tmp_path / "run")
    assert prep["mean"][0] == pytest.approx(0.485 * 255) and "imagenet convention" in prep["source"]
    restored = refs.restored_state(tmp_path / "run", 2)
    kernel = np.asarray(restored["params"]["backbone"]["stage1"]["conv1"]["kernel"])
    np.testing.assert_array_equal(
        kernel, ref.features[0].weight.detach().numpy().transpose(2, 3, 1, 0)
    )
    head = restored["params"]["head"]["out"]["kernel"]
    assert head.shape == ((2 * 2 * 16) if pooling == "flatten" else TINY["fc_width"], 10)
