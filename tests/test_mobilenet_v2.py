"""MobileNetV2: logits parity with torchvision and timm (random weights, BatchNorm statistics
too), names and shapes pinned against the full-size state dicts, loud loads, depth maps."""

import functools

import jax
import numpy as np
import pytest
import refs
import timm
import torch
import torchvision
from timm.models._efficientnet_builder import decode_arch_def, round_channels
from timm.models.efficientnet import EfficientNet

from tlflax import preprocessing as pp
from tlflax import tree
from tlflax.errors import ConfigError
from tlflax.models import available, create_model, mobilenet_v2
from tlflax.weights import (
    CheckpointMismatchError,
    convert_efficientnet_lite,
    convert_mobilenet_v2,
    load_pretrained,
    merge_variables,
    sources,
)
from tlflax.weights.readers import CorruptCheckpointError

TOL = 1e-4  # fp32, max |logits diff|
# Keras' own: numpy 2 asks its variables for __array__(copy=...).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
TINY = mobilenet_v2.ARCHS["mobilenet_v2_tiny"]  # width 0.25, ten blocks


# BatchNorm affine and running statistics and the classifier away from their init.
_randomised = functools.partial(refs.randomised, linear=refs.normal_init(0.1, 0.1))


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


def _load(spec, state: dict, *, reinit=(), shapes=None):
    converted = convert_mobilenet_v2.convert(state, spec=spec, shapes=None)
    return merge_variables(converted, shapes or refs.shapes(spec), reinit=reinit)


@pytest.fixture(scope="module")
def tiny():
    """The tiny model, its variable shapes and one jitted apply: the torchvision and timm
    parity tests share its compilation at each input size."""
    spec = create_model("mobilenet_v2_tiny", num_classes=5)
    return spec, refs.shapes(spec), jax.jit(spec.module.apply)


# --- parity (tiny: a few seconds of compilation per input size) ---


@pytest.mark.parametrize("size", [40, 37])  # even and odd: the floor of stride-2 outputs
@pytest.mark.parametrize("reference", ["torchvision", "timm"])
def test_logits_match_the_reference(tiny, reference, size):
    spec, shapes, apply_fn = tiny
    ref = _torchvision_tiny() if reference == "torchvision" else _timm_tiny(seed=1)
    variables, report = _load(spec, refs.numpy_state(ref), shapes=shapes)
    assert report.scheme == reference and not report.reinitialised
    x = refs.images(size, seed=size)
    theirs = refs.torch_logits(ref, x)
    assert np.std(theirs) > 0.1  # a comparison of something
    assert refs.max_diff(apply_fn(variables, x), theirs) <= TOL


def test_same_padding_and_keras_eps_match_timms_tf_padding():
    """padding='same' is TF's SAME (Keras' correct_pad + 'valid'), bn_eps 1e-3 Keras': timm's
    pad_type='same' computes both. At 38 px the stride-2 convs see even and odd sizes."""
    ref = _timm_tiny(seed=2, pad_type="same", bn_eps=1e-3)
    spec = create_model("mobilenet_v2_tiny", num_classes=5, padding="same", bn_eps=1e-3)
    variables, _ = _load(spec, refs.numpy_state(ref))
    x = refs.images(38, seed=2)
    theirs = refs.torch_logits(ref, x)
    assert refs.max_diff(jax.jit(spec.module.apply)(variables, x), theirs) <= TOL
    # The same weights with PyTorch's padding give other logits: the test tells them apart.
    symmetric = _timm_tiny(seed=2, bn_eps=1e-3)
    assert refs.max_diff(refs.torch_logits(symmetric, x), theirs) > 1e-2


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
    state = refs.numpy_state(reference())
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
    shapes = {k: v.shape for k, v in tree.flatten(refs.shapes(spec)).items()}
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
    variables = refs.shapes(spec)
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
    trainable = refs.last_k_trainable(spec, variables["params"], 2)
    assert (
        trainable["backbone/head_conv/kernel"]
        and trainable["backbone/stage7/block1/dw_conv/kernel"]
    )
    assert not trainable["backbone/stage6/block1/dw_conv/kernel"]


# --- checkpoints that do not fit fail loudly ---


def test_a_checkpoint_that_does_not_fit_is_listed(tiny, tmp_path):
    spec, shapes, _ = tiny
    state = refs.numpy_state(_torchvision_tiny())
    refs.assert_misfits_named(
        lambda bad: _load(spec, bad, shapes=shapes), state, missing="features.3.conv.1.0.weight",
        unexpected={"features.3.conv.4.weight": np.zeros(3, np.float32)},
        misshapen={"features.0.0.weight": np.zeros((8, 3, 5, 5), np.float32)},
    )  # fmt: skip
    # A deeper checkpoint: its extra blocks and its head conv, by name.
    deeper = [list(s) for s in TINY["stages"]]
    deeper[1][2] = 3
    torch.manual_seed(0)
    deeper_ref = torchvision.models.MobileNetV2(width_mult=0.25, inverted_residual_setting=deeper)
    state = refs.numpy_state(deeper_ref)
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
    state = refs.numpy_state(_torchvision_tiny())
    state = {f"module.{k}": v for k, v in state.items()}  # DataParallel
    converted = convert_mobilenet_v2.convert(state, spec=spec, shapes=None)
    assert not [k for k in converted.variables if k.startswith("?")]
    assert "module.features.0.1.num_batches_tracked" in converted.ignored
    kernel = converted.variables["params/backbone/stage3/block2/dw_conv/kernel"]  # features.5
    np.testing.assert_array_equal(
        kernel, state["module.features.5.conv.1.0.weight"].transpose(2, 3, 1, 0)
    )
    assert "params/backbone/stage1/block1/project_conv/kernel" in converted.variables
    assert convert_efficientnet_lite.block_names((1, 2), first=1)[3] == "stage2/block2"
    timm_state = refs.numpy_state(_timm_tiny())
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
    from tlflax import train

    ref = _torchvision_tiny()
    config = refs.pth_run_config(tmp_path, ref, "mobilenet_v2_tiny", image_size=32, settings={
        "optim.strategy": "last_k", "optim.k": 2, "train.steps": 2,
    })  # fmt: skip
    summary = train.train_and_evaluate(config, tmp_path / "run")
    assert summary["steps"] == 2
    # A torchvision .pth carries no preprocessing: the family's convention (ImageNet mean/std).
    prep = refs.run_preprocessing(tmp_path / "run")
    assert prep["mean"] == [0.485 * 255, 0.456 * 255, 0.406 * 255] and "imagenet" in prep["source"]
    restored = refs.restored_state(tmp_path / "run", 2)
    params = restored["params"]["backbone"]
    stem = ref.features[0][0].weight.detach().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(np.asarray(params["stem"]["conv"]["kernel"]), stem)  # frozen
    head_conv = ref.features[-1][0].weight.detach().numpy().transpose(2, 3, 1, 0)
    assert refs.max_diff(params["head_conv"]["kernel"], head_conv) > 0  # trained
    assert restored["params"]["head"]["out"]["kernel"].shape == (1280, 10)


# --- keras.applications.MobileNetV2 (Keras on JAX: tests/conftest.py) ---

KERAS_ALPHA, KERAS_SIZE = 0.35, 96  # the narrowest Keras weights, at their smallest size
KERAS_NUMERICS = {"padding": "same", "bn_eps": 1e-3}  # what Keras computes with
KERAS_SOURCE = "keras:mobilenet_v2_0.35_96"


def _keras_mobilenet_v2(*, size: int, alpha: float = KERAS_ALPHA, classes: int = 5):
    """keras.applications.MobileNetV2 itself, logits out; Glorot's init is zeros meanwhile
    (one XLA program per shape otherwise: seconds of CPU), the values being drawn after."""
    with refs.keras_zero_init():
        return refs.keras_on_jax().applications.MobileNetV2(
            alpha=alpha, weights=None, input_shape=(size, size, 3), classes=classes,
            classifier_activation=None,
        )  # fmt: skip


@pytest.fixture(scope="module")
def keras_mnv2(tmp_path_factory):
    """keras.applications.MobileNetV2(alpha=0.35) at 96 px with random weights, its logits,
    its files (.weights.h5, .keras, Keras 2 .h5, a .weights.h5 naming no layer, and the
    no-top .h5 of its backbone), and tlflax's model with Keras numerics, compiled once."""
    keras = refs.keras_on_jax()
    model = refs.keras_randomised(_keras_mobilenet_v2(size=KERAS_SIZE), seed=3)
    folder = tmp_path_factory.mktemp("keras_mobilenet_v2")
    files = refs.save_keras_files(model, folder, "mnv2", top_end="out_relu")
    backbone = keras.Model(model.input, model.get_layer("out_relu").output)
    backbone.save_weights(folder / "notop.weights.h5")
    x = refs.images(KERAS_SIZE, seed=4)
    keras_fn = refs.keras_logits_fn(model)
    spec = create_model("mobilenet_v2", num_classes=5, width=KERAS_ALPHA, **KERAS_NUMERICS)
    return {"model": model, "keras_fn": keras_fn, "files": files, "x": x,
            "want": np.asarray(keras_fn(x)), "spec": spec, "shapes": refs.shapes(spec),
            "apply": jax.jit(spec.module.apply)}  # fmt: skip


# ~15 s on 2 cores with the fixture: Keras builds, saves four ways and runs the full-depth
# model; tlflax compiles it once.
@pytest.mark.slow
@pytest.mark.parametrize("fmt", [".weights.h5", ".keras", ".h5", "unnamed"])
def test_logits_match_keras_mobilenet_v2_in_every_file_format(keras_mnv2, fmt):
    """Keras' own MobileNetV2 (17 blocks, alpha 0.35) at 96 px: every array lands (the
    unnamed file by Keras' numbering of each class), logits within 1e-4 of Keras'."""
    k = keras_mnv2
    loaded = load_pretrained(k["spec"], str(k["files"][fmt]), variables=k["shapes"], reinit=())
    assert loaded.report.scheme == "keras" and not loaded.report.ignored
    assert len(loaded.report.loaded) == len(k["model"].weights) == 262
    ours = np.asarray(k["apply"](loaded.variables, k["x"]))
    assert np.std(k["want"]) > 0.1
    assert refs.max_diff(ours, k["want"]) <= TOL


@pytest.mark.slow  # the Keras model of the fixture
def test_keras_source_and_preprocess_input_end_to_end(keras_mnv2, tmp_path, monkeypatch):
    """keras:mobilenet_v2_0.35_96 from a temporary Keras cache, as config.weights.source:
    Keras' preprocess_input of uint8 images then its model, against tlflax's normalisation
    ([-1, 1], at the file's 96 px) on the device then the converted model."""
    from tlflax import config_lib, experiment
    from tlflax.data import augment

    keras = refs.keras_on_jax()
    refs.in_keras_cache(monkeypatch, tmp_path, keras_mnv2["files"][".h5"], "mobilenet_v2_0.35_96")
    config = config_lib.get_base_config()
    config.model.name, config.weights.source = "mobilenet_v2", KERAS_SOURCE
    config.model.overrides = {"width": KERAS_ALPHA, **KERAS_NUMERICS}
    spec = experiment.build_model(config, num_classes=5)
    prep = experiment.resolve_preprocessing(config, spec)
    assert (prep.mean, prep.std) == ((127.5,) * 3, (127.5,) * 3)
    assert (prep.resolution, prep.resize) == (96, 110) and "Keras mobilenet_v2" in prep.source
    loaded = load_pretrained(spec, KERAS_SOURCE, variables=keras_mnv2["shapes"], reinit=())
    assert loaded.preprocessing == prep
    images = refs.pictures(2, KERAS_SIZE)
    pixels = keras.applications.mobilenet_v2.preprocess_input(images.astype("float32"))
    want = np.asarray(keras_mnv2["keras_fn"](pixels))
    normalise = augment.make_eval_transform(image_size=KERAS_SIZE, preprocessing=prep)
    ours = np.asarray(keras_mnv2["apply"](loaded.variables, normalise(images)))
    assert np.std(want) > 0.1
    assert refs.max_diff(ours, want) <= TOL
    # The model as PyTorch's weights want it: refused in one line that says what to set.
    default = create_model("mobilenet_v2", num_classes=5, depthwise="conv")
    with pytest.raises(ConfigError) as e:
        load_pretrained(default, KERAS_SOURCE, variables={})
    message = str(e.value)
    assert "\n" not in message and "alpha 0.35" in message
    want_overrides = {"depthwise": "conv", "width": 0.35, "padding": "same", "bn_eps": 0.001}
    assert f'--config.model.overrides="{want_overrides!r}"' in message


@pytest.mark.slow  # the Keras model of the fixture
def test_a_keras_notop_file_loads_with_the_head_new(keras_mnv2, tmp_path, monkeypatch):
    """keras:mobilenet_v2_0.35_96_notop (Keras' backbone, no predictions layer): the backbone
    loads, the head is the run's own; where every variable must come from the file (predict
    --model) the head is missing, by name."""
    refs.in_keras_cache(monkeypatch, tmp_path, keras_mnv2["files"]["notop"],
                    "mobilenet_v2_0.35_96_notop")  # fmt: skip
    spec, shapes = keras_mnv2["spec"], keras_mnv2["shapes"]
    loaded = load_pretrained(spec, KERAS_SOURCE + "_notop", variables=shapes)
    assert len(loaded.report.loaded) == 262 - 2
    assert loaded.report.reinitialised == ["params/head/out/bias", "params/head/out/kernel"]
    assert loaded.preprocessing.resolution == 96
    want = keras_mnv2["model"].get_layer("block_16_depthwise").get_weights()[0]
    got = loaded.variables["params"]["backbone"]["stage7"]["block1"]["dw_conv"]["kernel"]
    np.testing.assert_array_equal(got, want.transpose(0, 1, 3, 2))
    with pytest.raises(CheckpointMismatchError, match="(?s)missing.*head/out/kernel"):
        load_pretrained(spec, KERAS_SOURCE + "_notop", variables=shapes, reinit=())
    # Saved with no layer names: the order still places every layer (dense: none).
    unnamed = tmp_path / "unnamed_notop.weights.h5"
    refs.strip_layer_names(keras_mnv2["files"]["notop"].parent / "notop.weights.h5", unnamed)
    loaded = load_pretrained(spec, str(unnamed), variables=shapes)
    assert len(loaded.report.loaded) == 262 - 2


# ~6 s: keras.applications.MobileNetV2(alpha=1.3) (zeros; shapes only, no forward pass).
@pytest.mark.slow
def test_names_and_shapes_are_keras_applications_mobilenet_v2s():
    """Every array of Keras' full-size MobileNetV2 at alpha 1.3 (its widths round as
    int(c * alpha) then to 8: tlflax's agree) lands on a parameter of the same shape, and its
    1000-class layer on the head."""
    model = _keras_mobilenet_v2(size=224, alpha=1.3, classes=1000)
    state = {w.path: np.broadcast_to(np.float32(0), tuple(w.shape)) for w in model.weights}
    assert "block_5_depthwise/kernel" in state  # Keras 3's name for a depthwise kernel
    spec = create_model("mobilenet_v2", num_classes=1000, width=1.3, depthwise="conv",
                        **KERAS_NUMERICS)  # fmt: skip
    converted = convert_mobilenet_v2.convert(state, spec=spec, shapes=None)
    assert converted.scheme == "keras"
    got = {name: np.shape(v) for name, v in converted.variables.items()}
    assert got == {name: v.shape for name, v in tree.flatten(refs.shapes(spec)).items()}
    assert got["params/backbone/head_conv/kernel"] == (1, 1, 416, 1664)


def test_keras_names_place_each_layer_and_the_wrong_numerics_are_refused():
    spec = create_model("mobilenet_v2", num_classes=5, **KERAS_NUMERICS)
    blocks = convert_efficientnet_lite.block_names(spec.arch["repeats"], first=1)
    module = functools.partial(convert_mobilenet_v2.keras_module, blocks=blocks)
    assert module("expanded_conv_project_BN") == "backbone/stage1/block1/project_bn"
    assert module("block_3_depthwise") == "backbone/stage3/block1/dw_conv"
    assert module("block_16_expand_BN") == "backbone/stage7/block1/expand_bn"
    assert module("block_17_expand") is None and module("Conv_1_bn") == "backbone/head_bn"
    order = convert_mobilenet_v2.keras_layer_order(spec.arch)
    assert order["conv2d"][:4] == ["Conv1", "expanded_conv_project", "block_1_expand",
                                   "block_1_project"]  # fmt: skip
    assert len(order["conv2d"]) == 35 and len(order["batch_normalization"]) == 52
    assert order["depthwise_conv2d"][-1] == "block_16_depthwise"
    # Keras' widths say the alpha; PyTorch's numerics (the default) are refused.
    state = {"Conv1/kernel": np.zeros((3, 3, 3, 48), np.float32),
             "Conv_1/kernel": np.zeros((1, 1, 448, 1792), np.float32)}  # fmt: skip
    for name, overrides, want in [
        ("mobilenet_v2", {}, "{'width': 1.4, 'padding': 'same', 'bn_eps': 0.001}"),
        ("mobilenet_v2_140", {"bn_eps": 1e-3}, "{'bn_eps': 0.001, 'padding': 'same'}"),
    ]:
        other = create_model(name, num_classes=5, **overrides)
        with pytest.raises(ConfigError, match="alpha 1.4") as e:
            convert_mobilenet_v2.convert(state, spec=other, shapes=None)
        assert f'overrides="{want}"' in str(e.value), str(e.value)
    # A Keras 3 file that names no layer, of another layout: refused, not misplaced.
    unnamed = {"layers/conv2d/vars/0": np.zeros((3, 3, 3, 32), np.float32)}
    with pytest.raises(CheckpointMismatchError, match="names no layers"):
        convert_mobilenet_v2.convert(unnamed, spec=spec, shapes=None)


def test_keras_mobilenet_v2_files_download_without_a_hash_but_must_read(tmp_path, monkeypatch):
    """keras.applications pins no hash for MobileNetV2's files: tlflax keeps a download that
    reads as a Keras file and removes one that does not, saying so."""
    import h5py

    entry = sources.KERAS_FILES["mobilenet_v2_1.00_224"]
    assert entry.file_hash is None and entry.models == ("mobilenet_v2", "mobilenet_v2_keras")
    assert entry.filename == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5"
    assert entry.url.endswith("/keras-applications/mobilenet_v2/" + entry.filename)
    notop = sources.KERAS_FILES["mobilenet_v2_0.50_128_notop"]
    assert notop.filename == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_128_no_top.h5"
    assert "mobilenet_v2_140" in sources.KERAS_FILES["mobilenet_v2_1.40_224"].models

    def keras_file(target):
        with h5py.File(target, "w") as f:
            f.attrs["layer_names"] = np.array([b"Conv1"])
            f.create_group("Conv1").attrs["weight_names"] = np.array([b"Conv1/kernel:0"])
            f["Conv1"]["Conv1/kernel:0"] = np.zeros((3, 3, 3, 32), np.float32)

    writers = [lambda target: target.write_bytes(b"<html>quota exceeded</html>"), keras_file]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(sources, "_download", lambda url, target: writers.pop(0)(target))
    with pytest.raises(CorruptCheckpointError, match="pins no hash") as e:
        sources.resolve("keras:mobilenet_v2_1.00_224")
    assert entry.url in str(e.value) and list((tmp_path / "models").iterdir()) == []
    checkpoint = sources.resolve("keras:mobilenet_v2_1.00_224")
    assert checkpoint.files == [tmp_path / "models" / entry.filename]
    assert sources.available_offline("keras:mobilenet_v2_1.00_224")
