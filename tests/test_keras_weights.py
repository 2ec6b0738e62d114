"""Keras weight files (Keras 2 .h5, Keras 3 .weights.h5 and .keras) read by tlflax: VGG from
keras.applications within 1e-4 of Keras (JAX backend), Keras' 'caffe' preprocessing from
uint8 pixels, the keras:NAME source (cache, download with its hash, offline), loud failures."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import urllib.error

import h5py
import jax
import keras
import numpy as np
import pytest
import refs

from tlflax import preprocessing as pp
from tlflax import tree
from tlflax.data import augment
from tlflax.models import create_model
from tlflax.weights import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    WeightsNotFoundError,
    convert_vgg,
    load_pretrained,
    peek_preprocessing,
    readers,
    sources,
)
from tlflax.weights import keras as keras_files

# Keras' own: numpy 2 asks its variables for __array__(copy=...).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TOL = 1e-4  # fp32, max |difference|
# keras.applications' VGG16 layout (block{i}_conv{j}, fc1, fc2, predictions), narrow.
TINY = {"depths": (2, 2, 3, 3, 3), "widths": (4, 8, 8, 16, 16), "fc_width": 32}
N_CLASSES = 5


def _randomise(model, seed: int, *, first_scale: float = 1.0):
    """He-normal kernels, non-zero biases; the first conv scaled for 0..255 inputs."""
    rng = np.random.default_rng(seed)
    values = []
    for i, w in enumerate(model.weights):
        shape = tuple(w.shape)
        if len(shape) == 1:
            values.append(rng.normal(0, 0.1, shape))
        else:
            scale = np.sqrt(2.0 / np.prod(shape[:-1])) * (first_scale if i == 0 else 1.0)
            values.append(rng.normal(0, scale, shape))
    model.set_weights([v.astype(np.float32) for v in values])
    return model


def _tiny_keras_vgg(*, top: bool = True, size: int = 224, seed: int = 0, first_scale=1.0):
    """keras.applications.vgg16's graph (same layers, names and order) at TINY's widths;
    logits out (no softmax)."""
    layers = keras.layers
    inputs = keras.Input((size, size, 3))
    x = inputs
    with refs.keras_zero_init():
        for i, (depth, width) in enumerate(zip(TINY["depths"], TINY["widths"], strict=True), 1):
            for j in range(1, depth + 1):
                x = layers.Conv2D(width, 3, padding="same", activation="relu",
                                  name=f"block{i}_conv{j}")(x)  # fmt: skip
            x = layers.MaxPooling2D(2, strides=2, name=f"block{i}_pool")(x)
        if top:
            x = layers.Flatten(name="flatten")(x)
            x = layers.Dense(TINY["fc_width"], activation="relu", name="fc1")(x)
            x = layers.Dense(TINY["fc_width"], activation="relu", name="fc2")(x)
            x = layers.Dense(N_CLASSES, name="predictions")(x)
    model = keras.Model(inputs, x, name="vgg16")
    return _randomise(model, seed, first_scale=first_scale)


def _write_keras2(path, model, *, whole_model: bool, names: str = "tf2", chunked=False):
    """The layout Keras 2 wrote with h5py: `save_weights` (layers at the root) or `model.save`
    (under model_weights/, the model's JSON in the root's model_config); weight names as
    tf.keras 2 ('block1_conv1/kernel:0') or Keras 1 ('block1_conv1_W_1:0', as in
    keras.applications' own VGG files) named them; byte-string attributes."""
    with h5py.File(path, "w") as f:
        group = f.create_group("model_weights") if whole_model else f
        if whole_model:
            config = {"class_name": "Functional", "config": model.get_config()}
            f.attrs["model_config"] = json.dumps(config).encode()
        for where in {f, group}:
            where.attrs["backend"], where.attrs["keras_version"] = b"tensorflow", b"2.15.0"
        layer_names = np.array([layer.name.encode() for layer in model.layers])
        if chunked:  # as Keras splits an attribute over HDF5's 64 KB limit
            half = len(layer_names) // 2
            group.attrs["layer_names0"], group.attrs["layer_names1"] = np.array_split(
                layer_names, [half]
            )
        else:
            group.attrs["layer_names"] = layer_names
        for layer in model.layers:
            g = group.create_group(layer.name)
            leaves = [w.name for w in layer.weights]
            if names == "tf2":
                weight_names = [f"{layer.name}/{leaf}:0" for leaf in leaves]
            else:
                letter = {"kernel": "W", "bias": "b"}
                weight_names = [f"{layer.name}_{letter[leaf]}_1:0" for leaf in leaves]
            g.attrs["weight_names"] = np.array([n.encode() for n in weight_names])
            for name, value in zip(weight_names, layer.get_weights(), strict=True):
                g.create_dataset(name, data=value)


def _save_all(model, folder, stem):
    """Every format a Keras checkpoint comes in -> {format: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "weights.h5": folder / f"{stem}.weights.h5",
        "keras": folder / f"{stem}.keras",
        "keras3_legacy_h5": folder / f"{stem}_k3.h5",
        "keras2_save_weights": folder / f"{stem}_k2w.h5",
        "keras2_model_save": folder / f"{stem}_k2m.hdf5",
        "keras1_names": folder / f"{stem}_k1.h5",
        "keras3_unnamed": folder / f"{stem}_unnamed.weights.h5",
    }
    model.save_weights(files["weights.h5"])
    model.save(files["keras"])
    model.save(files["keras3_legacy_h5"])  # Keras 3 still writes the Keras 2 layout
    _write_keras2(files["keras2_save_weights"], model, whole_model=False, chunked=True)
    _write_keras2(files["keras2_model_save"], model, whole_model=True)
    _write_keras2(files["keras1_names"], model, whole_model=False, names="keras1")
    refs.strip_layer_names(files["weights.h5"], files["keras3_unnamed"])
    return files


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny Keras VGG at 224 px (7 x 7 before fc1, as keras.applications'), its logits
    on random images (BGR: what Keras' VGG takes), its files in every format, and one
    compiled tlflax forward pass for all of them."""
    model = _tiny_keras_vgg()
    x_rgb = np.random.default_rng(1).normal(size=(2, 224, 224, 3)).astype(np.float32)
    want = np.asarray(model(x_rgb[..., ::-1]))
    files = _save_all(model, tmp_path_factory.mktemp("keras_tiny"), "vgg_tiny")
    spec = create_model("vgg_tiny", num_classes=N_CLASSES, **TINY, batch_norm=False)
    return {"model": model, "x": x_rgb, "want": want, "files": files, "spec": spec,
            "apply": jax.jit(spec.module.apply)}  # fmt: skip


def _load(spec, path, **kw):
    shapes = jax.eval_shape(lambda: spec.init(jax.random.key(0)))
    return load_pretrained(spec, str(path), variables=shapes, **kw)


@pytest.mark.parametrize(
    "fmt",
    ["weights.h5", "keras", "keras3_legacy_h5", "keras2_save_weights", "keras2_model_save",
     "keras1_names", "keras3_unnamed"],
)  # fmt: skip
def test_logits_match_keras_in_every_file_format(tiny, fmt):
    """fc1 reads the flattened 7 x 7 map in Keras' (NHWC) order; the first conv is flipped to
    take RGB; the 1000-class layer (here 5) lands in the head."""
    loaded = _load(tiny["spec"], tiny["files"][fmt], reinit=())
    assert loaded.report.scheme == "keras" and not loaded.report.ignored
    assert len(loaded.report.loaded) == 2 * (sum(TINY["depths"]) + 3)
    ours = np.asarray(tiny["apply"](loaded.variables, tiny["x"]))
    np.testing.assert_allclose(ours, tiny["want"], atol=TOL, rtol=0)
    kernel = loaded.variables["params"]["backbone"]["stage1"]["conv1"]["kernel"]
    keras_kernel = tiny["model"].get_layer("block1_conv1").get_weights()[0]
    np.testing.assert_array_equal(np.asarray(kernel), keras_kernel[:, :, ::-1, :])


def test_keras_preprocess_input_of_uint8_images_is_tlflaxs_caffe_convention(tmp_path):
    """End to end from pixels: Keras' vgg16.preprocess_input (RGB -> BGR, minus the BGR mean
    pixel) then its model, against the preprocessing tlflax gives a Keras file (the RGB mean,
    std 1) on the device, then the converted model (its first conv flipped)."""
    model = _tiny_keras_vgg(seed=2, first_scale=0.01)
    path = tmp_path / "vgg.keras"
    model.save(path)
    images = refs.pictures(2, 224)
    want = np.asarray(model(keras.applications.vgg16.preprocess_input(images.astype("float32"))))
    spec = create_model("vgg_tiny", num_classes=N_CLASSES, **TINY, batch_norm=False)
    loaded = _load(spec, path, reinit=())
    prep = loaded.preprocessing
    assert prep.mean == pp.CAFFE_MEAN and prep.std == (1.0, 1.0, 1.0)
    assert prep.resolution == 224 and prep.short().startswith("caffe")
    assert "Keras vgg: caffe convention" in prep.source
    assert peek_preprocessing(str(path), spec=spec) == prep
    normalise = augment.make_eval_transform(image_size=224, preprocessing=prep)
    ours = np.asarray(jax.jit(spec.module.apply)(loaded.variables, normalise(images)))
    assert np.abs(want).max() > 0.1  # the comparison means something
    np.testing.assert_allclose(ours, want, atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def vgg16_notop(tmp_path_factory):
    """keras.applications.VGG16 itself (include_top=False: 14.7M parameters) at 64 px."""
    with refs.keras_zero_init():
        model = keras.applications.VGG16(weights=None, include_top=False,
                                         input_shape=(64, 64, 3))  # fmt: skip
    _randomise(model, seed=3)
    folder = tmp_path_factory.mktemp("keras_vgg16")
    files = {"weights.h5": folder / "vgg16.weights.h5", "keras": folder / "vgg16.keras",
             "h5": folder / "vgg16_notop.h5"}  # fmt: skip
    model.save_weights(files["weights.h5"])
    model.save(files["keras"])
    model.save(files["h5"])
    return model, files


# ~10 s on 2 cores: the real VGG16's convs (built by Keras, saved three ways, read, run).
@pytest.mark.slow
def test_keras_applications_vgg16_features_match_in_its_three_formats(vgg16_notop):
    """The _notop checkpoint's convs: pooling 'flatten' (Keras' Flatten: 2 x 2 x 512, NHWC
    order) and 'avg' (GlobalAveragePooling2D), every parameter name of the full-size model."""
    model, files = vgg16_notop
    x = np.random.default_rng(4).normal(size=(2, 64, 64, 3)).astype(np.float32)
    fmap = np.asarray(model(x[..., ::-1]))  # (2, 2, 2, 512)
    want = {"flatten": fmap.reshape(2, -1), "avg": fmap.mean(axis=(1, 2))}
    for pooling in ("flatten", "avg"):
        spec = create_model("vgg16", num_classes=3, pooling=pooling)
        features = jax.jit(lambda params, x, spec=spec: spec.module.apply(
            {"params": {"backbone": params}}, x, method=spec.module.features))  # fmt: skip
        for fmt, path in files.items():
            loaded = _load(spec, path)
            assert len(loaded.report.loaded) == 26 and loaded.report.scheme == "keras", fmt
            got = np.asarray(features(loaded.variables["params"]["backbone"], x))
            np.testing.assert_allclose(got, want[pooling], atol=TOL, rtol=0, err_msg=fmt)


# ~3 s: keras.applications.VGG19 with its top (143M parameters, zeros), shapes only.
@pytest.mark.slow
def test_names_and_shapes_are_keras_applications_vgg19s_with_its_top():
    """Every array of the full-size Keras VGG19 lands on a parameter of tlflax's vgg19 of the
    same shape (fc1: 7 x 7 x 512 rows, predictions: 1000 classes), nothing left over."""
    with refs.keras_zero_init():
        model = keras.applications.VGG19(weights=None)
    state = {w.path: np.broadcast_to(np.float32(0), tuple(w.shape)) for w in model.weights}
    del model
    spec = create_model("vgg19", num_classes=1000)
    shapes = jax.eval_shape(lambda: spec.init(jax.random.key(0)))
    converted = convert_vgg.convert(state, spec=spec, shapes=None)
    assert converted.scheme == "keras" and not converted.ignored
    got = {name: np.shape(v) for name, v in converted.variables.items()}
    assert got == {name: v.shape for name, v in tree.flatten(shapes).items()}
    assert got["params/backbone/fc1/kernel"] == (7 * 7 * 512, 4096)


@pytest.mark.slow  # the real VGG16 notop file (see above)
def test_a_notop_file_with_pooling_classifier_is_refused_pointing_to_flatten(vgg16_notop):
    _, files = vgg16_notop
    spec = create_model("vgg16", num_classes=3)  # pooling='classifier': fc1, fc2
    with pytest.raises(CheckpointMismatchError) as e:
        _load(spec, files["h5"])
    message = str(e.value)
    assert "no fc layers" in message and "pooling='flatten'" in message
    assert "pooling='avg'" in message and "notop" in message


@pytest.mark.slow  # the real VGG16 notop file (see above)
def test_keras_source_reads_keras_cache_then_loads(vgg16_notop, tmp_path, monkeypatch):
    """keras:vgg16_notop is found where keras.applications caches it ($KERAS_HOME/models),
    without the network, and loads into vgg16 with a Keras pooling."""
    _, files = vgg16_notop
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert not sources.available_offline("keras:vgg16_notop")
    refs.in_keras_cache(monkeypatch, tmp_path, files["h5"], "vgg16_notop")
    assert sources.available_offline("keras:vgg16_notop")
    assert not sources.available_offline("keras:vgg16")
    spec = create_model("vgg16", num_classes=3, pooling="avg")
    loaded = _load(spec, "keras:vgg16_notop")
    assert loaded.preprocessing.mean == pp.CAFFE_MEAN and len(loaded.report.loaded) == 26


def test_keras_source_offline_says_what_and_how_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert sources.hub_offline()  # conftest: the suite runs offline
    with pytest.raises(WeightsNotFoundError) as e:
        sources.resolve("keras:vgg16")
    message = str(e.value)
    entry = sources.KERAS_FILES["vgg16"]
    assert "\n" not in message and entry.filename in message and entry.url in message
    assert str(tmp_path / "models") in message and "HF_HUB_OFFLINE" in message
    assert "weights.source" in message
    with pytest.raises(ValueError, match="did you mean keras:vgg19 or keras:vgg16.*known: .*"
                       r"keras:mobilenet_v2_<alpha>_<rows>, keras:vgg16"):  # fmt: skip
        sources.resolve("keras:vgg15")
    spec = create_model("vgg_tiny", num_classes=3)
    with pytest.raises(ValueError, match="keras.applications' vgg16, but config.model.name="):
        load_pretrained(spec, "keras:vgg16", variables={})


def _online(monkeypatch, tmp_path, download):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    calls = []

    def fake(url, target):
        calls.append(url)
        download(target)

    monkeypatch.setattr(sources, "_download", fake)
    return calls


def test_keras_source_downloads_into_keras_cache_checking_the_hash(tiny, tmp_path, monkeypatch):
    """The download lands in Keras' cache when its hash is keras.applications' (the entry's
    hash is set to the stand-in file's); a file of another hash is removed and refused."""
    stand_in = tiny["files"]["keras1_names"]
    calls = _online(monkeypatch, tmp_path, lambda target: shutil.copy(stand_in, target))
    entry = sources.KERAS_FILES["vgg16_notop"]
    with pytest.raises(CorruptCheckpointError) as e:  # the real hash: the stand-in differs
        sources.resolve("keras:vgg16_notop")
    assert entry.file_hash in str(e.value) and entry.url in str(e.value)
    folder = tmp_path / "keras_home" / "models"
    assert calls == [entry.url] and list(folder.iterdir()) == []  # nothing half-written kept
    md5 = hashlib.md5(stand_in.read_bytes()).hexdigest()
    monkeypatch.setitem(sources.KERAS_FILES, "vgg16_notop",
                        dataclasses.replace(entry, file_hash=md5))  # fmt: skip
    checkpoint = sources.resolve("keras:vgg16_notop")
    assert checkpoint.files == [folder / entry.filename] and checkpoint.origin == "keras"
    assert checkpoint.files[0].read_bytes() == stand_in.read_bytes()
    assert sources.available_offline("keras:vgg16_notop")
    sources.resolve("keras:vgg16_notop")  # now cached: no second download
    assert len(calls) == 2


def test_keras_source_without_network_is_one_line(tmp_path, monkeypatch):
    def unreachable(target):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    _online(monkeypatch, tmp_path, unreachable)
    with pytest.raises(WeightsNotFoundError) as e:
        sources.resolve("keras:vgg19")
    message = str(e.value)
    assert "\n" not in message and "downloading it failed" in message
    assert "name resolution" in message and sources.KERAS_FILES["vgg19"].url in message
    assert list((tmp_path / "keras_home" / "models").iterdir()) == []


def _damaged(tmp_path, tiny, kind):
    good = tiny["files"]["weights.h5"]
    if kind == "truncated_h5":
        path = tmp_path / "cut.weights.h5"
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "truncated_keras":
        data = tiny["files"]["keras"].read_bytes()
        path = tmp_path / "cut.keras"
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path = tmp_path / "garbage.h5"
        path.write_bytes(bytes(range(256)) * 64)
    elif kind == "not_keras":
        path = tmp_path / "other.h5"
        with h5py.File(path, "w") as f:
            f["data"] = np.ones(3)
    elif kind == "zip_without_weights":
        import zipfile

        path = tmp_path / "other.keras"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("config.json", "{}")
    else:
        path = tmp_path / "empty.h5"
        path.write_bytes(b"")
    return path


@pytest.mark.parametrize(
    "kind", ["truncated_h5", "truncated_keras", "garbage", "not_keras", "zip_without_weights",
             "empty"]
)  # fmt: skip
def test_damaged_or_foreign_files_are_one_clear_error_naming_the_file(tiny, tmp_path, kind):
    path = _damaged(tmp_path, tiny, kind)
    with pytest.raises(CorruptCheckpointError) as e:
        _load(tiny["spec"], path)
    assert str(path) in str(e.value)
    if kind == "not_keras":
        assert "not a Keras weights file" in str(e.value)


def _layers_zoo():
    """Every layer kind the other families' Keras converters meet, with options off."""
    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = layers.Rescaling(1 / 255.0, name="rescaling")(inputs)
    norm = layers.Normalization(axis=-1, name="normalization")
    norm.adapt(np.random.default_rng(0).uniform(0, 1, (4, 8, 8, 3)).astype("float32"))
    x = norm(x)
    with refs.keras_zero_init():
        x = layers.Conv2D(4, 3, padding="same", use_bias=False, name="stem_conv")(x)
        x = layers.BatchNormalization(name="stem_bn")(x)
        x = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
        x = layers.BatchNormalization(scale=False, name="dw_bn")(x)  # 3 arrays
        x = layers.SeparableConv2D(6, 3, padding="same", name="sep")(x)
        inner = keras.Model(inputs, x, name="backbone")
        pooled = [keras.Input((8, 8, 3)), inner, layers.GlobalAveragePooling2D()]
        outer = keras.Sequential([*pooled, layers.Dense(2, name="dense")], name="transfer")
    return _randomise(outer, seed=5)


WANT_ZOO = {
    "normalization/mean", "normalization/variance", "normalization/count",
    "stem_conv/kernel", "stem_bn/gamma", "stem_bn/beta", "stem_bn/moving_mean",
    "stem_bn/moving_variance", "dw/depthwise_kernel", "dw_bn/beta", "dw_bn/moving_mean",
    "dw_bn/moving_variance", "sep/depthwise_kernel", "sep/pointwise_kernel", "sep/bias",
    "dense/kernel", "dense/bias",
}  # fmt: skip


def test_every_format_names_weights_as_keras_does_nested_models_and_options_included(tmp_path):
    """The reader's contract for the families' converters: a nested model's layers under
    their own names, Keras' weight names (a Keras 3 DepthwiseConv2D's 'kernel' included,
    as depthwise_kernel), BatchNormalization(scale=False) named from its options, the
    same arrays whichever way Keras saved them."""
    model = _layers_zoo()
    want = {}
    for layer in model.layers[0].layers + model.layers[1:]:
        for w, value in zip(layer.weights, layer.get_weights(), strict=True):
            want[f"{layer.name}/{w.name}"] = value
    want["dw/depthwise_kernel"] = want.pop("dw/kernel")
    assert set(want) == WANT_ZOO
    paths = [tmp_path / "zoo.weights.h5", tmp_path / "zoo.keras", tmp_path / "zoo.h5"]
    model.save_weights(paths[0])
    model.save(paths[1])
    model.save(paths[2])
    for path in paths[1:]:  # the model's config (config.json, model_config) is in the file
        state = readers.read(path)
        assert set(state) == WANT_ZOO, path.name
        for key, value in want.items():
            np.testing.assert_array_equal(state[key], value, err_msg=f"{path.name} {key}")
    # A .weights.h5 holds no config: a BatchNormalization of 3 arrays is ambiguous (center or
    # scale off?), left unnamed for the converter, which knows the model, to name.
    state = readers.read(paths[0])
    bn_names = ("beta", "moving_mean", "moving_variance")
    assert {k for k in state if k.startswith("dw_bn/")} == {f"dw_bn/vars/{i}" for i in range(3)}
    state = keras_files.name_vars(state, {"dw_bn": bn_names}.get)
    assert set(state) == WANT_ZOO
    for key, value in want.items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)
    unnamed = tmp_path / "unnamed.weights.h5"
    refs.strip_layer_names(paths[0], unnamed)
    state = readers.read(unnamed)
    inner = "layers/functional/layers"
    assert f"{inner}/batch_normalization_1/vars/0" in state
    assert f"{inner}/batch_normalization/gamma" in state and "layers/dense/kernel" in state
    named = keras_files.name_vars(state, {f"{inner}/batch_normalization_1": bn_names})
    np.testing.assert_array_equal(named[f"{inner}/batch_normalization_1/beta"],
                                  want["dw_bn/beta"])  # fmt: skip
    ordered = keras_files.by_order(named, {"batch_normalization": ["stem_bn", "dw_bn"]},
                                   container=inner)  # fmt: skip
    np.testing.assert_array_equal(ordered["dw_bn/moving_mean"], want["dw_bn/moving_mean"])
    assert "layers/dense/kernel" in ordered  # another container: unchanged


def test_weight_names_from_the_kind_and_its_options():
    names = keras_files.weight_names
    assert names("Conv2D", 1) == ("kernel",)
    assert names("SeparableConv2D", 3) == ("depthwise_kernel", "pointwise_kernel", "bias")
    assert names("BatchNormalization", 4)[0] == "gamma"
    assert names("BatchNormalization", 3, {"center": False}) == (
        "gamma", "moving_mean", "moving_variance")  # fmt: skip
    assert names("BatchNormalization", 2) == ("moving_mean", "moving_variance")
    with pytest.raises(ValueError, match="ambiguous"):
        names("BatchNormalization", 3)
    with pytest.raises(ValueError, match="no option fits"):
        names("Dense", 3)
    with pytest.raises(ValueError, match="unknown Keras layer class 'Conv9D'"):
        names("Conv9D", 2)
    with pytest.raises(CheckpointMismatchError, match="'fc1'"):
        keras_files.name_vars({"fc1/vars/0": np.ones(2)}, {"fc1": "Normalization"})


def test_named_caffe_preprocessing_is_the_rgb_mean_unscaled():
    caffe = pp.named("caffe", resolution=224)
    assert caffe.mean == (123.68, 116.779, 103.939) and caffe.std == (1.0, 1.0, 1.0)
    assert caffe.short() == "caffe, 256->224 bicubic"
