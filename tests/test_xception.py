"""Xception: logits parity with timm's legacy_xception and keras.applications.Xception (random
weights, BatchNorm statistics too), the pooling rules where they differ, names and shapes of
the full-size timm state dict, depth maps, loud loads, and a run from a .pth."""

import functools
import importlib

import jax
import numpy as np
import pytest
import refs
import timm
import torch

from tlflax import preprocessing as pp
from tlflax import tree
from tlflax.errors import ConfigError
from tlflax.models import create_model, xception
from tlflax.weights import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    convert_xception,
    load_pretrained,
    merge_variables,
)

TOL = 1e-4  # fp32, max |logits diff|
# Keras' own: numpy 2 asks its variables for __array__(copy=...).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
# The module (timm.models.xception is also the name of a deprecated model function).
timm_xception = importlib.import_module("timm.models.xception")
WIDTHS = xception.ARCHS["xception_tiny"]["widths"]
TIMM_NUMERICS = {"pool_padding": "symmetric", "bn_eps": 1e-5}  # timm's legacy_xception


def _unit_fan_in(m: torch.nn.Module, g: torch.Generator):
    m.weight.normal_(0.0, m.weight[0].numel() ** -0.5, generator=g)  # O(1) activations


_randomise = functools.partial(
    refs.randomised, conv=_unit_fan_in, linear=refs.normal_init(0.2, 0.1)
)


def _timm_tiny(*, middle_blocks: int = 1, num_classes: int = 5, seed: int = 0):
    """timm's legacy Xception narrowed: its own Block and SeparableConv2d, rebuilt at the tiny
    widths with the arguments its __init__ gives them; the middle blocks past `middle_blocks`
    made Identity (its forward runs block1..block12 in turn), so the state dict has gaps."""
    nn, w = torch.nn, WIDTHS
    torch.manual_seed(seed)
    model = timm_xception.Xception(num_classes=num_classes)
    model.conv1, model.bn1 = nn.Conv2d(3, w[0], 3, 2, 0, bias=False), nn.BatchNorm2d(w[0])
    model.conv2, model.bn2 = nn.Conv2d(w[0], w[1], 3, bias=False), nn.BatchNorm2d(w[1])
    model.block1 = timm_xception.Block(w[1], w[2], 2, 2, start_with_relu=False)
    model.block2 = timm_xception.Block(w[2], w[3], 2, 2)
    model.block3 = timm_xception.Block(w[3], w[4], 2, 2)
    for i in range(4, 12):
        block = timm_xception.Block(w[4], w[4], 3, 1) if i < 4 + middle_blocks else nn.Identity()
        setattr(model, f"block{i}", block)
    model.block12 = timm_xception.Block(w[4], w[5], 2, 2, grow_first=False)
    model.conv3, model.bn3 = (
        timm_xception.SeparableConv2d(w[5], w[6], 3, 1, 1),
        nn.BatchNorm2d(w[6]),
    )
    model.conv4, model.bn4 = (
        timm_xception.SeparableConv2d(w[6], w[7], 3, 1, 1),
        nn.BatchNorm2d(w[7]),
    )
    model.num_features = w[7]
    model.reset_classifier(num_classes)
    return _randomise(model, seed=seed)


def _load(spec, state, *, reinit=()):
    shapes = jax.eval_shape(lambda: spec.init(jax.random.key(0), 64))
    converted = convert_xception.convert(state, spec=spec, shapes=None)
    return merge_variables(converted, shapes, reinit=reinit)


@pytest.fixture(scope="module")
def timm_tiny():
    return _timm_tiny()


# The sides the four pools see: 71 px, all odd (33, 17, 9, 5); 101 px, all even (48, 24, 12,
# 6), where Keras's 'same' (one pixel after) and timm's padding=1 (one each side) differ.
@pytest.mark.parametrize("size", [71, 101])
def test_logits_match_timms_legacy_xception_and_its_pooling_differs_on_even_sides(timm_tiny, size):
    spec = create_model("xception_tiny", num_classes=5, **TIMM_NUMERICS)
    variables, report = _load(spec, refs.numpy_state(timm_tiny))
    assert report.scheme == "timm" and not report.reinitialised
    x = refs.images(size)
    want = refs.torch_logits(timm_tiny, x)
    np.testing.assert_allclose(np.asarray(jax.jit(spec.module.apply)(variables, x)), want,
                               atol=TOL, rtol=0)  # fmt: skip
    keras_pools = create_model("xception_tiny", num_classes=5, bn_eps=1e-5)
    diff = np.abs(np.asarray(jax.jit(keras_pools.module.apply)(variables, x)) - want).max()
    assert (diff <= TOL) == (size == 71), diff  # 'same' is timm's rule on odd sides only


def _keras_narrow(*, divisor: int):
    """keras.applications.Xception's own graph, every conv's filters divided by `divisor`
    (its `layers` module seen through a proxy), at 8 middle blocks, on the JAX backend
    (tests/conftest.py); random kernels and BatchNorm statistics. Glorot's init is zeros
    meanwhile (one XLA program per shape: 13 s of CPU), since every value is replaced."""
    keras = refs.keras_on_jax()
    from keras.src.applications import xception as keras_xception

    class Narrow:
        def __getattr__(self, name):
            return getattr(keras.layers, name)

        def Conv2D(self, filters, *args, **kwargs):  # noqa: N802
            return keras.layers.Conv2D(filters // divisor, *args, **kwargs)

        def SeparableConv2D(self, filters, *args, **kwargs):  # noqa: N802
            return keras.layers.SeparableConv2D(filters // divisor, *args, **kwargs)

    with refs.keras_zero_init() as mp:
        mp.setattr(keras_xception, "layers", Narrow())
        keras.utils.clear_session()  # the shortcuts' names restart at conv2d, batch_normalization
        model = keras_xception.Xception(weights=None, input_shape=(101, 101, 3), classes=5,
                                        classifier_activation=None)  # fmt: skip
    return refs.keras_randomised(model, seed=0)


KERAS_WIDTHS = tuple(w // 16 for w in xception.DEFAULTS["widths"])


@pytest.fixture(scope="module")
def keras_ref(tmp_path_factory):
    """Keras's Xception narrowed 1/16 at 101 px (every pool's side even: its 'same' padding
    matters), its logits, its files (.weights.h5, .keras, Keras 2 .h5, a .weights.h5 naming
    no layer, the no-top .h5 of its backbone), and tlflax's 'xception' at those widths (the
    name keras:xception fits), compiled once."""
    ref = _keras_narrow(divisor=16)
    folder = tmp_path_factory.mktemp("keras_xception")
    files = refs.save_keras_files(ref, folder, "xception", top_end="block14_sepconv2_act")
    keras_fn = refs.keras_logits_fn(ref)
    x = refs.images(101)
    spec = create_model("xception", num_classes=5, widths=KERAS_WIDTHS)
    return {"model": ref, "keras_fn": keras_fn, "files": files, "x": x,
            "want": np.asarray(keras_fn(x)), "spec": spec,
            "shapes": jax.eval_shape(lambda: spec.init(jax.random.key(0), 101)),
            "apply": jax.jit(spec.module.apply)}  # fmt: skip


# Slow: importing Keras, building its graph, saving it, and compiling two 14-block nets:
# ~15 s of CPU with the fixture (shared by the Keras tests below).
@pytest.mark.slow
def test_logits_match_keras_xception_by_its_layer_names(keras_ref):
    """The 'keras' scheme on {'<layer>/<weight>': array} (what a Keras .h5 reader gives):
    Keras's own graph (8 middle blocks, narrowed 1/16) at 101 px, where every pool's side is
    even (its 'same' padding matters); the unnamed shortcuts conv2d, conv2d_1, ... in order."""
    state = {v.path: np.asarray(v.value) for v in keras_ref["model"].weights}
    assert {"conv2d/kernel", "batch_normalization_3/moving_variance"} <= set(state)
    variables, report = _load(keras_ref["spec"], state)
    assert report.scheme == "keras" and len(report.loaded) == len(state)
    ours = np.asarray(keras_ref["apply"](variables, keras_ref["x"]))
    assert np.std(keras_ref["want"]) > 0.1
    np.testing.assert_allclose(ours, keras_ref["want"], atol=TOL, rtol=0)


@pytest.mark.slow  # the Keras model of the fixture
@pytest.mark.parametrize("fmt", [".weights.h5", ".keras", ".h5", "unnamed"])
def test_logits_match_keras_xception_in_every_file_format(keras_ref, fmt):
    """Keras's files through load_pretrained; the one that names no layer by Keras'
    numbering of each class (the shortcut BatchNorms after their block's separable convs')."""
    k = keras_ref
    loaded = load_pretrained(k["spec"], str(k["files"][fmt]), variables=k["shapes"], reinit=())
    assert loaded.report.scheme == "keras" and not loaded.report.ignored
    assert len(loaded.report.loaded) == len(k["model"].weights)
    ours = np.asarray(k["apply"](loaded.variables, k["x"]))
    np.testing.assert_allclose(ours, k["want"], atol=TOL, rtol=0)


@pytest.mark.slow  # the Keras model of the fixture
def test_keras_source_and_preprocess_input_end_to_end(keras_ref, tmp_path, monkeypatch):
    """keras:xception from a temporary Keras cache: Keras's xception.preprocess_input of
    uint8 images then its model, against tlflax's normalisation ([-1, 1]) on the device
    then the converted model."""
    from tlflax.data import augment

    keras = refs.keras_on_jax()
    refs.in_keras_cache(monkeypatch, tmp_path, keras_ref["files"][".h5"], "xception")
    spec = keras_ref["spec"]
    loaded = load_pretrained(spec, "keras:xception", variables=keras_ref["shapes"], reinit=())
    prep = loaded.preprocessing
    assert (prep.mean, prep.std, prep.resolution) == ((127.5,) * 3, (127.5,) * 3, 299)
    assert "Keras xception" in prep.source
    images = refs.pictures(2, 101)
    pixels = keras.applications.xception.preprocess_input(images.astype("float32"))
    want = np.asarray(keras_ref["keras_fn"](pixels))
    normalise = augment.make_eval_transform(image_size=101, preprocessing=prep)
    ours = np.asarray(keras_ref["apply"](loaded.variables, normalise(images)))
    assert np.std(want) > 0.1
    np.testing.assert_allclose(ours, want, atol=TOL, rtol=0)


@pytest.mark.slow  # the Keras model of the fixture
def test_a_keras_notop_file_loads_with_the_head_new(keras_ref, tmp_path, monkeypatch):
    """keras:xception_notop: the backbone loads, the head is the run's own; where every
    variable must come from the file (predict --model) the head is missing, by name. A file
    naming no layer, of another depth: refused, not misplaced."""
    refs.in_keras_cache(monkeypatch, tmp_path, keras_ref["files"]["notop"], "xception_notop")
    spec, shapes = keras_ref["spec"], keras_ref["shapes"]
    loaded = load_pretrained(spec, "keras:xception_notop", variables=shapes)
    n_arrays = len(keras_ref["model"].weights)
    assert len(loaded.report.loaded) == n_arrays - 2
    assert loaded.report.reinitialised == ["params/head/out/bias", "params/head/out/kernel"]
    with pytest.raises(CheckpointMismatchError, match="(?s)missing.*head/out/kernel"):
        load_pretrained(spec, "keras:xception_notop", variables=shapes, reinit=())
    shallow = create_model("xception", num_classes=5, widths=KERAS_WIDTHS, middle_blocks=1)
    with pytest.raises(CheckpointMismatchError, match="names no layers.*middle_blocks=1"):
        load_pretrained(shallow, str(keras_ref["files"]["unnamed"]), variables={})


def test_keras_shortcuts_follow_their_layer_numbers():
    """Keras 3 names them conv2d, conv2d_1, ...; a Keras 2 file conv2d_1, ..., conv2d_4;
    either way blocks 2, 3, 4 and the exit block, in numeric (not string) order."""
    for names in (["conv2d", "conv2d_1", "conv2d_2", "conv2d_3"],
                  ["conv2d_10", "conv2d_8", "conv2d_9", "conv2d_11"]):  # fmt: skip
        state = {f"{n}/kernel": 0 for n in names}
        state.update({f"{n.replace('conv2d', 'batch_normalization')}/gamma": 0 for n in names})
        got = convert_xception.keras_shortcuts(state, middle_blocks=8)
        order = sorted(names, key=lambda n: int(n.rsplit("_", 1)[1]) if "_" in n else 0)
        assert [got[n] for n in order] == [f"block{b}/shortcut" for b in (2, 3, 4, 13)]
        assert got["batch_normalization" + order[3][6:]] == "block13/shortcut_bn"


def test_parameter_names_and_shapes_are_timms_legacy_xception():
    """Pinned against timm's full-size state dict (shapes only: no forward pass): every array
    lands, nothing is left over; 36 conv layers in 14 blocks, 2048 features."""
    ref = timm.create_model("legacy_xception")
    state = refs.numpy_state(ref)
    spec = create_model("xception", num_classes=1000)
    shapes = jax.eval_shape(lambda: spec.init(jax.random.key(0), 299))
    variables, report = merge_variables(
        convert_xception.convert(state, spec=spec, shapes=None), shapes, reinit=()
    )
    cadene = {k.replace("fc.", "last_linear."): v for k, v in state.items()}  # his head's name
    assert convert_xception.convert(cadene, spec=spec, shapes=None).variables.keys() == (
        convert_xception.convert(state, spec=spec, shapes=None).variables.keys()
    )
    n_counters = sum(k.endswith("num_batches_tracked") for k in state)
    assert len(report.loaded) == len(state) - n_counters and len(report.ignored) == n_counters
    names = tree.names(variables)
    assert "params/backbone/block13/shortcut/kernel" in names
    assert variables["params"]["backbone"]["block14"]["sepconv2"]["pointwise"]["kernel"].shape == (
        1, 1, 1536, 2048)  # fmt: skip
    assert (spec.n_stages, spec.n_layers, spec.feature_dim) == (14, 36, 2048)
    prep = spec.preprocessing
    assert (prep.resolution, prep.resize, prep.mean) == (299, 333, (127.5,) * 3)


def test_stages_and_layers_cover_every_parameter_and_last_k_takes_the_top():
    spec = create_model("xception_tiny", num_classes=4)
    variables = jax.eval_shape(lambda: spec.init(jax.random.key(0), 64))
    params = variables["params"]
    stages = {n: spec.stage_of(n) for n in tree.names(params)}
    assert stages["backbone/block1/conv1/kernel"] == 0
    assert stages["backbone/block4/shortcut_bn/scale"] == 3
    assert stages["backbone/block7/sepconv2/pointwise/kernel"] == 6
    assert stages["head/out/kernel"] == spec.n_stages == 7
    assert sorted(set(stages.values())) == list(range(8))
    layers = {n: spec.layer_of(n) for n in tree.names(variables)}  # batch_stats/... too
    assert sorted(set(layers.values())) == list(range(spec.n_layers + 1))
    assert spec.n_layers == 15  # 2 + 3 x 2 + 3 + 2 + 2
    assert layers["params/backbone/block2/shortcut/kernel"] == 2
    assert layers["params/backbone/block2/sepconv1/depthwise/kernel"] == 2
    assert layers["batch_stats/backbone/block5/sepconv3_bn/mean"] == 10
    trainable = refs.last_k_trainable(spec, params, 2)
    assert trainable["backbone/block7/sepconv1/depthwise/kernel"] and trainable["head/out/bias"]
    assert trainable["backbone/block6/shortcut/kernel"]
    assert not trainable["backbone/block5/sepconv3/pointwise/kernel"]
    for name in (
        "backbone/block1/sepconv1/kernel",
        "backbone/block5/shortcut/kernel",
        "backbone/block2/sepconv3/depthwise/kernel",
        "backbone/block8/conv1/kernel",
    ):
        with pytest.raises(ValueError, match="no parameter"):
            spec.stage_of(name)


def test_a_checkpoint_that_does_not_fit_is_listed(timm_tiny, tmp_path):
    state = refs.numpy_state(timm_tiny)
    spec = create_model("xception_tiny", num_classes=5)
    refs.assert_misfits_named(
        functools.partial(_load, spec), state, missing="block2.rep.4.pointwise.weight",
        unexpected={"block1.rep.2.weight": np.ones(8, np.float32)},  # a ReLU's
        misshapen={"block12.skip.weight": np.zeros((24, 8, 1, 1), np.float32)},
    )  # fmt: skip
    # Two middle blocks into a model of one: timm's block5 is left over.
    with pytest.raises(CheckpointMismatchError, match=r"block5\.rep"):
        _load(spec, refs.numpy_state(_timm_tiny(middle_blocks=2)))
    with pytest.raises(ConfigError, match="not an Xception checkpoint"):
        convert_xception.convert({"features.0.weight": np.zeros(1)}, spec=spec, shapes=None)
    pth = tmp_path / "xception_tiny.pth"
    torch.save(timm_tiny.state_dict(), pth)
    pth.write_bytes(pth.read_bytes()[:2000])
    variables = jax.eval_shape(lambda: spec.init(jax.random.key(0), 64))
    with pytest.raises(CorruptCheckpointError, match="xception_tiny.pth"):
        load_pretrained(spec, str(pth), variables=variables,
                        preprocessing=pp.minus_one_to_one(64))  # fmt: skip


def test_options_are_checked_and_a_too_small_image_is_refused():
    bad = {"widths": (4, 8, 8), "middle_blocks": -1, "pool_padding": "valid", "bn_eps": 0,
           "depthwise": "fast"}  # fmt: skip
    for key, value in bad.items():
        with pytest.raises(ConfigError, match=f"{key}="):
            create_model("xception_tiny", num_classes=3, **{key: value})
    with pytest.raises(ConfigError, match="unknown model option"):
        create_model("xception", num_classes=3, depth=3)
    spec = create_model("xception_tiny", num_classes=3)
    with pytest.raises(ConfigError, match="too small"):
        jax.eval_shape(lambda: spec.init(jax.random.key(0), 6))
    shapes = jax.eval_shape(lambda: spec.init(jax.random.key(0), 7))  # the smallest: 1 x 1
    assert shapes["params"]["head"]["out"]["kernel"].shape == (32, 3)


# Slow: the run compiles a train step (forward and the top blocks' backward) and the forward
# passes of the probe's features and of evaluation, for 8 fake devices: ~30 s of CPU.
@pytest.mark.slow
def test_a_timm_pth_trains_as_an_lp_ft_run(tmp_path, timm_tiny):
    """A .pth of timm's (narrowed) legacy Xception as weights.source: [-1, 1] inputs, the
    backbone from the file, a cached probe, then fine-tuning of the top blocks."""
    from tlflax import train

    config = refs.pth_run_config(tmp_path, timm_tiny, "xception_tiny", image_size=32, settings={
        "optim.strategy": "two_phase",
        "optim.probe": "cached", "optim.probe_steps": 2, "optim.finetune_steps": 2,
        "optim.finetune": "last_k", "optim.k": 2,
    })  # fmt: skip
    config.model.overrides = dict(TIMM_NUMERICS)
    summary = train.train_and_evaluate(config, tmp_path / "run")
    assert summary["steps"] == 4 and summary["phases"][0]["strategy"] == "linear_probe"
    # A .pth carries no preprocessing: the family's convention, [-1, 1].
    prep = refs.run_preprocessing(tmp_path / "run")
    assert prep["mean"] == [127.5] * 3 and prep["std"] == [127.5] * 3
    first = timm_tiny.block1.rep[0].conv1.weight.detach().numpy().transpose(2, 3, 1, 0)
    top = timm_tiny.conv4.pointwise.weight.detach().numpy().transpose(2, 3, 1, 0)
    for step, top_trained in ((2, False), (4, True)):  # after the probe; after last_k (k=2)
        restored = refs.restored_state(tmp_path / "run", step)
        backbone = restored["params"]["backbone"]
        np.testing.assert_array_equal(backbone["block2"]["sepconv1"]["depthwise"]["kernel"], first)
        assert np.array_equal(backbone["block7"]["sepconv2"]["pointwise"]["kernel"], top) != (
            top_trained
        )
