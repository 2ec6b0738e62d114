"""MobileNetV2: logits parity with torchvision and timm (random weights, BatchNorm statistics
too), names and shapes pinned against the full-size state dicts, loud loads, depth maps."""

import functools
import json

import jax
import numpy as np
import pytest
import timm
import torch
import torchvision
from timm.models._efficientnet_builder import decode_arch_def, round_channels
from timm.models.efficientnet import EfficientNet

from tlflax import optim, tree
from tlflax import preprocessing as pp
from tlflax.errors import ConfigError
from tlflax.models import available, create_model, mobilenet_v2
from tlflax.weights import (
    CheckpointMismatchError,
    convert_mobilenet_v2,
    load_pretrained,
    merge_variables,
)
from tlflax.weights.readers import CorruptCheckpointError

TOL = 1e-4  # fp32, max |logits diff|
TINY = mobilenet_v2.ARCHS["mobilenet_v2_tiny"]  # width 0.25, ten blocks


def _randomised(model: torch.nn.Module, *, seed: int) -> torch.nn.Module:
    """BatchNorm affine and running statistics and the classifier away from their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.3, generator=g)
                m.bias.normal_(0.0, 0.3, generator=g)
                m.running_mean.normal_(0.0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, 0.1, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
    return model.eval()


def _torchvision_tiny(*, num_classes: int = 5, seed: int = 0):
    torch.manual_seed(seed)
    model = torchvision.models.MobileNetV2(
        num_classes=num_classes,
        width_mult=TINY["width"],
        inverted_residual_setting=[list(s) for s in TINY["stages"]],
    )
    return _randomised(model, seed=seed)


def _timm_tiny(*, num_classes: int = 5, seed: int = 0, pad_type: str = "", bn_eps: float = 1e-5):
    """timm's MobileNetV2 (its _gen_mobilenet_v2 recipe) on the tiny table."""
    arch_def = [
        [f"ds_r{n}_k3_s{s}_c{c}" if t == 1 else f"ir_r{n}_k3_s{s}_e{t}_c{c}"]
        for t, c, n, s in TINY["stages"]
    ]
    torch.manual_seed(seed)
    model = EfficientNet(
        block_args=decode_arch_def(arch_def),
        num_classes=num_classes,
        num_features=1280,  # max(1280, round_chs_fn(1280)) at width 0.25
        stem_size=32,
        round_chs_fn=functools.partial(round_channels, multiplier=TINY["width"]),
        act_layer=torch.nn.ReLU6,
        norm_layer=functools.partial(torch.nn.BatchNorm2d, eps=bn_eps),
        pad_type=pad_type,
    )
    return _randomised(model, seed=seed)


def _state(model: torch.nn.Module) -> dict:
    return {k: t.detach().numpy() for k, t in model.state_dict().items()}


def _shapes(spec, size: int | None = None) -> dict:
    return jax.eval_shape(lambda: spec.init(jax.random.key(0), size))


def _load(spec, state: dict, *, reinit=(), shapes=None):
    converted = convert_mobilenet_v2.convert(state, spec=spec, shapes=None)
    return merge_variables(converted, shapes or _shapes(spec), reinit=reinit)


@pytest.fixture(scope="module")
def tiny():
    """The tiny model, its variable shapes and one jitted apply: the torchvision and timm
    parity tests share its compilation at each input size."""
    spec = create_model("mobilenet_v2_tiny", num_classes=5)
    return spec, _shapes(spec), jax.jit(spec.module.apply)


def _images(size: int, *, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def _torch_logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def _max_diff(ours, theirs) -> float:
    assert np.shape(ours) == np.shape(theirs), (np.shape(ours), np.shape(theirs))
    return float(np.max(np.abs(np.asarray(ours) - np.asarray(theirs))))


# --- parity (tiny: a few seconds of compilation per input size) ---


@pytest.mark.parametrize("size", [40, 37])  # even and odd: the floor of stride-2 outputs
@pytest.mark.parametrize("reference", ["torchvision", "timm"])
def test_logits_match_the_reference(tiny, reference, size):
    spec, shapes, apply_fn = tiny
    ref = _torchvision_tiny() if reference == "torchvision" else _timm_tiny(seed=1)
    variables, report = _load(spec, _state(ref), shapes=shapes)
    assert report.scheme == reference and not report.reinitialised
    x = _images(size, seed=size)
    theirs = _torch_logits(ref, x)
    assert np.std(theirs) > 0.1  # a comparison of something
    assert _max_diff(apply_fn(variables, x), theirs) <= TOL


def test_same_padding_and_keras_eps_match_timms_tf_padding():
    """padding='same' is TF's SAME (Keras' correct_pad + 'valid'), bn_eps 1e-3 Keras': timm's
    pad_type='same' computes both. At 38 px the stride-2 convs see even and odd sizes."""
    ref = _timm_tiny(seed=2, pad_type="same", bn_eps=1e-3)
    spec = create_model("mobilenet_v2_tiny", num_classes=5, padding="same", bn_eps=1e-3)
    variables, _ = _load(spec, _state(ref))
    x = _images(38, seed=2)
    theirs = _torch_logits(ref, x)
    assert _max_diff(jax.jit(spec.module.apply)(variables, x), theirs) <= TOL
    # The same weights with PyTorch's padding give other logits: the test tells them apart.
    symmetric = _timm_tiny(seed=2, bn_eps=1e-3)
    assert _max_diff(_torch_logits(symmetric, x), theirs) > 1e-2


# --- names and shapes of the full-size models (shapes only: no forward pass) ---


# depthwise='conv': the same parameters, a quicker trace than the CPU's shifted slices.
@pytest.mark.parametrize(
    "name, overrides, reference",
    [
        ("mobilenet_v2", {}, lambda: torchvision.models.mobilenet_v2()),
        ("mobilenet_v2", {}, lambda: timm.create_model("mobilenetv2_100")),
        ("mobilenet_v2_140", {}, lambda: timm.create_model("mobilenetv2_140")),
        (
            "mobilenet_v2",
            {"width": 1.1, "depth": 1.2, "fix_stem_head": True},
            lambda: timm.create_model("mobilenetv2_110d"),
        ),
    ],
)
def test_every_array_of_a_full_size_checkpoint_lands(name, overrides, reference):
    state = _state(reference())
    spec = create_model(name, num_classes=1000, depthwise="conv", **overrides)
    _, report = _load(spec, state)
    n_counters = sum(k.endswith("num_batches_tracked") for k in state)
    assert len(report.loaded) == len(state) - n_counters and len(report.ignored) == n_counters
    assert not report.reinitialised and not report.dropped


def _reference_widths(model: torch.nn.Module) -> tuple[int, ...]:
    """Stem, each stage's output and head conv widths of a torchvision / timm MobileNetV2."""
    if isinstance(model, torchvision.models.MobileNetV2):
        ends = np.cumsum([n for _, _, n, _ in mobilenet_v2.STAGES])  # blocks numbered from 1
        outs = [model.features[i].out_channels for i in ends]
        return (model.features[0][0].out_channels, *outs, model.last_channel)
    last_conv = [
        getattr(stage[-1], "conv_pwl", None) or stage[-1].conv_pw for stage in model.blocks
    ]
    outs = [conv.out_channels for conv in last_conv]
    return (model.conv_stem.out_channels, *outs, model.num_features)


@pytest.mark.parametrize(
    "width, reference",
    [
        (0.35, lambda: torchvision.models.MobileNetV2(width_mult=0.35)),  # Keras' alphas
        (0.75, lambda: torchvision.models.MobileNetV2(width_mult=0.75)),
        (1.3, lambda: torchvision.models.MobileNetV2(width_mult=1.3)),
        (0.5, lambda: timm.create_model("mobilenetv2_050")),
    ],
)
def test_widths_round_as_the_references(width, reference):
    spec = create_model("mobilenet_v2", num_classes=2, width=width)
    assert spec.arch["channels"] == _reference_widths(reference())


def test_the_full_size_layout_is_the_papers():
    spec = create_model("mobilenet_v2", num_classes=1000, depthwise="conv")
    shapes = {k: v.shape for k, v in tree.flatten(_shapes(spec)).items()}
    assert spec.arch["repeats"] == (1, 2, 3, 4, 3, 3, 1) and spec.n_stages == 9
    assert spec.arch["channels"] == (32, 16, 24, 32, 64, 96, 160, 320, 1280)
    assert shapes["params/backbone/stem/conv/kernel"] == (3, 3, 3, 32)
    assert shapes["params/backbone/stage1/block1/dw_conv/kernel"] == (3, 3, 1, 32)
    assert "params/backbone/stage1/block1/expand_conv/kernel" not in shapes
    assert shapes["params/backbone/stage4/block4/expand_conv/kernel"] == (1, 1, 64, 384)
    assert shapes["params/backbone/stage7/block1/project_conv/kernel"] == (1, 1, 960, 320)
    assert shapes["params/backbone/head_conv/kernel"] == (1, 1, 320, 1280)
    assert shapes["params/head/out/kernel"] == (1280, 1000) and spec.feature_dim == 1280
    wide = create_model("mobilenet_v2", num_classes=3, width=1.4)
    assert wide.arch["channels"] == create_model("mobilenet_v2_140", num_classes=3).arch["channels"]
    assert wide.arch["channels"] == (48, 24, 32, 48, 88, 136, 224, 448, 1792)
    assert create_model("mobilenet_v2", num_classes=3, width=0.35).arch["channels"] == (
        16, 8, 8, 16, 24, 32, 56, 112, 1280,
    )  # fmt: skip
    assert spec.arch["classifier_dropout"] == 0.2


def test_registry_and_preprocessing():
    assert {"mobilenet_v2", "mobilenet_v2_140", "mobilenet_v2_tiny"} <= set(available())
    for name in ("mobilenet_v2", "mobilenet_v2_140"):
        spec = create_model(name, num_classes=2)
        prep = spec.preprocessing
        assert spec.family == "mobilenet_v2"
        assert prep.mean == pp.IMAGENET_MEAN and prep.std == pp.IMAGENET_STD
        assert (prep.resolution, prep.resize) == (224, 256)


def test_options_are_checked():
    with pytest.raises(ConfigError, match="unknown model option"):
        create_model("mobilenet_v2", num_classes=2, width_mult=0.5)
    for bad in (
        {"width": 0},
        {"depth": -1.0},
        {"padding": "valid"},
        {"depthwise": "fft"},
        {"bn_eps": 0.0},
        {"drop_path_rate": 1.0},
        {"fix_stem_head": "yes"},
        {"stages": ((6, 24, 2, 3),)},  # stride 3
        {"stages": ((6, 24, 2),)},  # (t, c, n, s) has four entries
        {"head_width": 0},
    ):
        key = next(iter(bad))
        with pytest.raises(ConfigError, match=f"mobilenet_v2.*{key}"):
            create_model("mobilenet_v2", num_classes=2, **bad)
    spec = create_model("mobilenet_v2", num_classes=2, stages=[[1, 16, 1, 1], [6, 24, 2, 2]])
    assert spec.arch["repeats"] == (1, 2) and spec.n_stages == 4  # config lists are fine
    spec = create_model("mobilenet_v2", num_classes=2, drop_path_rate=0.1)
    assert spec.module.backbone.drop_connect_rate == 0.1  # stochastic depth of Lite's blocks


# --- depth maps ---


def test_stages_and_layers_cover_every_parameter_and_last_k_takes_the_top():
    spec = create_model("mobilenet_v2_tiny", num_classes=4)
    variables = _shapes(spec)
    names = tree.names(variables)
    stages = {n: spec.stage_of(n) for n in names}
    assert sorted(set(stages.values())) == list(range(spec.n_stages + 1))  # 0..9
    assert stages["params/backbone/stem/conv/kernel"] == 0
    assert stages["batch_stats/backbone/stage2/block2/dw_bn/var"] == 2
    assert stages["params/backbone/head_conv/kernel"] == 8 == spec.n_stages - 1
    assert stages["params/head/out/bias"] == spec.n_stages
    layers = {n.split("/", 1)[1]: spec.layer_of(n) for n in names}
    assert sorted(set(layers.values())) == list(range(spec.n_layers + 1))  # 10 blocks
    assert layers["backbone/stage3/block2/project_conv/kernel"] == 5
    assert layers["backbone/head_bn/scale"] == 11 and layers["head/out/kernel"] == 12
    for bad in ("backbone/stage8/block1/dw_conv/kernel", "backbone/stage2/block3/dw_bn/scale",
                "backbone/features/0"):  # fmt: skip
        with pytest.raises(ValueError, match="no parameter"):
            spec.stage_of(bad)
    from tlflax import config_lib

    config = config_lib.get_base_config()
    config.optim.update({"strategy": "last_k", "k": 2})
    (phase,) = optim.make_phases(config.optim, train_config=config.train,
                                 params=variables["params"], spec=spec,
                                 steps_per_epoch=1)  # fmt: skip
    trainable = tree.flatten(phase.trainable)
    assert (
        trainable["backbone/head_conv/kernel"]
        and trainable["backbone/stage7/block1/dw_conv/kernel"]
    )
    assert not trainable["backbone/stage6/block1/dw_conv/kernel"]


# --- checkpoints that do not fit fail loudly ---


def test_a_checkpoint_that_does_not_fit_is_listed(tiny, tmp_path):
    spec, shapes, _ = tiny
    state = _state(_torchvision_tiny())
    cases = {
        "missing": {k: v for k, v in state.items() if k != "features.3.conv.1.0.weight"},
        "unexpected": {**state, "features.3.conv.4.weight": np.zeros(3, np.float32)},
        "shape mismatch": {**state, "features.0.0.weight": np.zeros((8, 3, 5, 5), np.float32)},
    }
    for what, bad in cases.items():
        with pytest.raises(CheckpointMismatchError, match=what):
            _load(spec, bad, shapes=shapes)
    # A deeper checkpoint: its extra blocks and its head conv, by name.
    deeper = [list(s) for s in TINY["stages"]]
    deeper[1][2] = 3
    torch.manual_seed(0)
    state = _state(torchvision.models.MobileNetV2(width_mult=0.25,
                                                  inverted_residual_setting=deeper))  # fmt: skip
    with pytest.raises(CheckpointMismatchError) as e:
        _load(spec, state, reinit=("head/.*",), shapes=shapes)
    assert "features.12.1.running_var" in str(e.value)
    with pytest.raises(ConfigError, match="not a MobileNetV2 checkpoint"):
        convert_mobilenet_v2.convert({"conv1.weight": np.zeros(1)}, spec=spec, shapes=None)
    with pytest.raises(ConfigError, match="convert_mobilenet_v2 got a 'vgg' model"):
        convert_mobilenet_v2.convert(state, spec=create_model("vgg_tiny", num_classes=2),
                                     shapes=None)  # fmt: skip
    pth = tmp_path / "mobilenet_v2.pth"
    torch.save(_torchvision_tiny().state_dict(), pth)
    pth.write_bytes(pth.read_bytes()[:1000])
    with pytest.raises(CorruptCheckpointError, match="mobilenet_v2.pth"):
        load_pretrained(spec, str(pth), variables=shapes, preprocessing=pp.imagenet())


def test_converter_maps_each_scheme():
    spec = create_model("mobilenet_v2_tiny", num_classes=5)
    state = {f"module.{k}": v for k, v in _state(_torchvision_tiny()).items()}  # DataParallel
    converted = convert_mobilenet_v2.convert(state, spec=spec, shapes=None)
    assert not [k for k in converted.variables if k.startswith("?")]
    assert "module.features.0.1.num_batches_tracked" in converted.ignored
    kernel = converted.variables["params/backbone/stage3/block2/dw_conv/kernel"]  # features.5
    np.testing.assert_array_equal(
        kernel, state["module.features.5.conv.1.0.weight"].transpose(2, 3, 1, 0)
    )
    assert "params/backbone/stage1/block1/project_conv/kernel" in converted.variables
    assert convert_mobilenet_v2.torchvision_block_names((1, 2))[3] == "stage2/block2"
    timm_state = _state(_timm_tiny())
    converted = convert_mobilenet_v2.convert(timm_state, spec=spec, shapes=None)
    np.testing.assert_array_equal(
        converted.variables["batch_stats/backbone/stage1/block1/project_bn/mean"],
        timm_state["blocks.0.0.bn2.running_mean"],
    )


# --- a saved .pth through the trainer ---


@pytest.mark.slow  # a real training run: train and eval steps compiled, an orbax save
def test_a_torchvision_pth_trains_last_k(tmp_path):
    """A torchvision state dict saved with torch.save as weights.source: the backbone from the
    file (bitwise), the head new, last_k trains the top stages and leaves the rest."""
    import orbax.checkpoint as ocp

    from tlflax import config_lib, train

    ref = _torchvision_tiny()
    pth = tmp_path / "mobilenet_v2_tiny.pth"
    torch.save(ref.state_dict(), pth)
    config = config_lib.get_base_config()
    config.update_from_flattened_dict({
        "model.name": "mobilenet_v2_tiny", "data.source": "digits", "data.val_fraction": 0.1,
        "data.image_size": 32, "data.batch_size": 16, "weights.source": str(pth),
        "optim.strategy": "last_k", "optim.k": 2,
        "train.steps": 2, "train.log_every": 1,
    })  # fmt: skip
    summary = train.train_and_evaluate(config, tmp_path / "run")
    assert summary["steps"] == 2
    # A torchvision .pth carries no preprocessing: the family's convention (ImageNet mean/std).
    prep = json.loads((tmp_path / "run/preprocessing.json").read_text())
    assert prep["mean"] == [0.485 * 255, 0.456 * 255, 0.406 * 255] and "imagenet" in prep["source"]
    restored = ocp.StandardCheckpointer().restore(tmp_path / "run/checkpoints/2/state")
    params = restored["params"]["backbone"]
    stem = ref.features[0][0].weight.detach().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(np.asarray(params["stem"]["conv"]["kernel"]), stem)  # frozen
    head_conv = ref.features[-1][0].weight.detach().numpy().transpose(2, 3, 1, 0)
    assert _max_diff(params["head_conv"]["kernel"], head_conv) > 0  # trained
    assert restored["params"]["head"]["out"]["kernel"].shape == (1280, 10)
