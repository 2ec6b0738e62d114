"""EfficientNet B0..B7: logits parity with timm (PyTorch and TF conventions), torchvision and
transformers (random weights, tiny layouts), names and shapes pinned against full-size b0 and
b7 state dicts, depth maps, options, loud loads, and a run from a .pth through the trainer."""

import contextlib
import functools
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import refs
import timm
import torch
import torchvision
import transformers
from timm.models._efficientnet_builder import decode_arch_def, round_channels
from timm.models.efficientnet import EfficientNet as TimmEfficientNet

from tlflax import preprocessing as pp
from tlflax import tree
from tlflax.errors import ConfigError
from tlflax.models import available, create_model, efficientnet
from tlflax.weights import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    convert_efficientnet,
    convert_efficientnet_lite,
    load_pretrained,
    merge_variables,
    sources,
)

TOL = 1e-4  # fp32, max |logits diff|
# Keras' own: numpy 2 asks its variables for __array__(copy=...).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
TINY = efficientnet.VARIANTS["efficientnet_tiny"][0]
# transformers hard-codes the stem (32) and head (1280) widths before scaling: the tests of
# TF conventions use them, the PyTorch ones keep the tiny variant's (16, 64).
TF = {"padding": "same", "bn_eps": 1e-3, "bn_momentum": 0.99, "stem_width": 32, "head_width": 1280}
SIZES = (36, 45)  # even (maps 18, 9, 5: odd on the way down) and odd (maps 23, 12, 6)
N_CLASSES = 5


# --- references, built small and random ---


def _he_normal(m: torch.nn.Module, g: torch.Generator):
    """He-scaled weights (activations of order 1 through the tiny net), random biases."""
    fan_in = m.weight[0].numel()
    m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=g)
    if m.bias is not None:
        m.bias.normal_(0.0, 0.3, generator=g)


# Convs, linears, biases and BatchNorm parameters and statistics all random: nothing
# cancels by accident.
_randomise = functools.partial(refs.randomised, conv=_he_normal, linear=_he_normal)


def _timm(*, tf: bool, seed: int = 0, widths: tuple[int, int] | None = None) -> torch.nn.Module:
    """timm's EfficientNet on the tiny layout: 'same' padding and eps 1e-3 as its
    tf_efficientnet_b*, else symmetric and 1e-5 as its efficientnet_b*; stem and head
    widths transformers' (TF) or the tiny variant's, unless given."""
    arch_def = [
        [f"{'ds' if e == 1 else 'ir'}_r{r}_k{k}_s{s}_e{e}_c{c}_se0.25"]
        for r, k, s, e, c in TINY["stages"]
    ]
    stem, head = widths or ((TF["stem_width"], TF["head_width"]) if tf else (16, 64))
    model = TimmEfficientNet(
        decode_arch_def(arch_def, 1.0),
        num_classes=N_CLASSES,
        num_features=head,
        stem_size=stem,
        round_chs_fn=functools.partial(round_channels, multiplier=1.0),
        act_layer=torch.nn.SiLU,
        norm_layer=functools.partial(torch.nn.BatchNorm2d, eps=1e-3 if tf else 1e-5),
        pad_type="same" if tf else "",
    )
    return _randomise(model, seed=seed)


def _torchvision(*, seed: int = 1) -> torch.nn.Module:
    from torchvision.models.efficientnet import MBConvConfig

    setting, in_channels = [], TINY["stem_width"]
    for repeats, kernel, stride, expand, out in TINY["stages"]:
        setting.append(MBConvConfig(expand, kernel, stride, in_channels, out, repeats))
        in_channels = out
    model = torchvision.models.efficientnet.EfficientNet(
        setting, dropout=0.0, num_classes=N_CLASSES, last_channel=TINY["head_width"]
    )
    return _randomise(model, seed=seed)


def _same_sizes(size: int) -> list[tuple[int, int]]:
    """The input side of each stride-2 block (global index, side) under TF's SAME."""
    side, out, k = -(-size // 2), [], 0  # after the stem
    for repeats, _, stride, _, _ in TINY["stages"]:
        if stride == 2:
            out.append((k, side))
            side = -(-side // 2)
        k += repeats
    return out


def _transformers(*, size: int, seed: int = 2) -> torch.nn.Module:
    """transformers' EfficientNet on the tiny layout, its stride-2 pads fixed for `size`:
    depthwise_padding lists the blocks whose input side is odd there (TF's SAME)."""
    stages = TINY["stages"]
    widths = [TF["stem_width"]] + [s[4] for s in stages]
    config = transformers.EfficientNetConfig(
        image_size=size,
        width_coefficient=1.0,
        depth_coefficient=1.0,
        kernel_sizes=[s[1] for s in stages],
        in_channels=widths[:-1],
        out_channels=widths[1:],
        strides=[s[2] for s in stages],
        num_block_repeats=[s[0] for s in stages],
        expand_ratios=[s[3] for s in stages],
        depthwise_padding=[k for k, side in _same_sizes(size) if side % 2],
        hidden_dim=TF["head_width"],
        dropout_rate=0.0,
        drop_connect_rate=0.0,
        num_labels=N_CLASSES,
    )
    return _randomise(transformers.EfficientNetForImageClassification(config), seed=seed)


@functools.cache
def _spec(**options):
    return create_model("efficientnet_tiny", num_classes=N_CLASSES, **options)


@functools.cache
def _apply_fn(**options):
    """One jitted forward per model options (shapes retrace): the tests share compiles."""
    spec = _spec(**options)
    return jax.jit(lambda v, x: spec.module.apply(v, x))


_SHAPES: dict[int, dict] = {}  # id(spec) -> its variables' shapes (the specs are cached)


def _load(spec, state: dict, *, reinit=()):
    if id(spec) not in _SHAPES:
        _SHAPES[id(spec)] = jax.eval_shape(lambda: spec.init(jax.random.key(0), 32))
    converted = convert_efficientnet.convert(state, spec=spec, shapes={})
    return merge_variables(converted, _SHAPES[id(spec)], reinit=reinit)


# --- parity, random weights (BatchNorm statistics too) ---

REFERENCES = {
    "timm_efficientnet": (lambda size: _timm(tf=False), {}, "timm"),
    "timm_tf_efficientnet": (lambda size: _timm(tf=True), TF, "timm"),
    "torchvision": (lambda size: _torchvision(), {}, "torchvision"),
    "transformers": (lambda size: _transformers(size=size), TF, "transformers"),
}


# transformers' stem pads (0, 1) at any size: TF's SAME at even sizes only
CASES = [
    (r, size) for r in sorted(REFERENCES) for size in SIZES if r != "transformers" or size % 2 == 0
]


@pytest.mark.parametrize("reference, size", CASES)
def test_logits_match_the_reference(reference, size):
    make, options, scheme = REFERENCES[reference]
    model = make(size)
    spec = _spec(**options)
    variables, report = _load(spec, refs.numpy_state(model))
    assert report.scheme == scheme and not report.reinitialised
    x = refs.images(size, seed=size)
    theirs = refs.torch_logits(model, x)
    assert np.std(theirs) > 0.1  # a comparison of numbers that matter
    assert refs.max_diff(_apply_fn(**options)(variables, x), theirs) <= TOL


@pytest.mark.parametrize("size", SIZES)
def test_the_conventions_differ_by_far_more_than_the_tolerance(size):
    """The same weights under timm's TF and PyTorch conventions (padding, eps): the parity
    above tells the options apart at both sizes, it does not compare tiny numbers."""
    tf = _timm(tf=True)
    torch_like = _timm(tf=False, widths=(TF["stem_width"], TF["head_width"]))
    torch_like.load_state_dict(tf.state_dict())
    x = refs.images(size, seed=size)
    assert refs.max_diff(refs.torch_logits(tf, x), refs.torch_logits(torch_like, x)) > 100 * TOL


# --- names and shapes pinned against full-size state dicts (no forward pass) ---


def _meta_state(model: torch.nn.Module) -> dict:
    """Zero-cost arrays of the state dict's shapes (the model was built on the meta device)."""
    return {
        k: np.broadcast_to(np.zeros((), np.float32), tuple(t.shape))
        for k, t in model.state_dict().items()
    }


def _full_size(reference: str, i: int) -> torch.nn.Module:
    with torch.device("meta"):
        if reference == "timm":
            return timm.create_model(f"tf_efficientnet_b{i}", pretrained=False)
        if reference == "torchvision":
            return getattr(torchvision.models, f"efficientnet_b{i}")()
        w, d, res, drop, _ = efficientnet.SCALING[i]
        config = transformers.EfficientNetConfig(
            width_coefficient=w, depth_coefficient=d, image_size=res, dropout_rate=drop,
            hidden_dim=round_channels(1280, w), num_labels=1000,
        )  # fmt: skip
        return transformers.EfficientNetForImageClassification(config)


@functools.cache
def _full_spec(i: int):
    return create_model(f"tf_efficientnet_b{i}", num_classes=1000, depthwise="conv")


@pytest.mark.parametrize("reference", ["timm", "torchvision", "transformers"])
@pytest.mark.parametrize("i, n_params", [(0, 5_288_548), (7, 66_347_960)])
def test_full_size_names_and_shapes(reference, i, n_params):
    """Every array of the reference's b0 / b7 lands on a parameter of the same shape and
    nothing is left over (the merge checks both); 'conv' keeps the tracing short."""
    state = _meta_state(_full_size(reference, i))
    variables, report = _load(_full_spec(i), state)
    n_counters = sum(k.endswith("num_batches_tracked") for k in state)
    assert len(report.loaded) == len(state) - n_counters == len(tree.flatten(variables))
    assert set(report.ignored) == {k for k in state if k.endswith("num_batches_tracked")}
    assert sum(np.size(v) for v in tree.flatten(variables["params"]).values()) == n_params


def test_b0_and_b7_layouts():
    b0 = create_model("efficientnet_b0", num_classes=7, depthwise="conv")
    shapes = {k: v.shape for k, v in
              tree.flatten(jax.eval_shape(lambda: b0.init(jax.random.key(0)))).items()}  # fmt: skip
    assert b0.arch["repeats"] == (1, 2, 2, 3, 3, 4, 1) and b0.feature_dim == 1280
    assert shapes["params/backbone/stem/conv/kernel"] == (3, 3, 3, 32)
    assert shapes["params/backbone/stage1/block1/se/reduce/kernel"] == (32, 8)
    assert shapes["params/backbone/stage2/block2/se/reduce/kernel"] == (144, 6)  # from 24 in
    assert shapes["params/backbone/stage2/block2/se/expand/bias"] == (144,)
    assert shapes["params/backbone/stage6/block4/dw_conv/kernel"] == (5, 5, 1, 1152)
    assert shapes["params/head/out/kernel"] == (1280, 7)
    b7 = create_model("efficientnet_b7", num_classes=7)
    assert b7.arch["repeats"] == (4, 7, 7, 10, 10, 13, 4) and b7.feature_dim == 2560
    assert b7.n_stages == 9 and b7.n_layers == 55 + 2


# --- registry, preprocessing, options ---


def test_registry_defaults_and_preprocessing():
    names = [f"{p}efficientnet_b{i}" for p in ("", "tf_") for i in range(8)]
    assert set(names) | {"efficientnet_tiny"} <= set(available())
    resolutions = (224, 240, 260, 300, 380, 456, 528, 600)
    dropouts = (0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5, 0.5)
    for i, (resolution, dropout) in enumerate(zip(resolutions, dropouts, strict=True)):
        for name in (f"efficientnet_b{i}", f"tf_efficientnet_b{i}"):
            spec = create_model(name, num_classes=2)
            prep, arch = spec.preprocessing, spec.arch
            assert spec.family == "efficientnet" and spec.n_stages == 9
            assert prep.mean == pytest.approx((123.675, 116.28, 103.53))
            assert prep.resolution == resolution and prep.interpolation == "bicubic"
            assert arch["classifier_dropout"] == dropout
            tf = name.startswith("tf_")
            assert arch["padding"] == ("same" if tf else "symmetric")
            # torchvision's b6 / b7 (the only PyTorch weights of that name) use TF's eps
            assert arch["bn_eps"] == (1e-3 if tf or i >= 6 else 1e-5)
    assert create_model("tf_efficientnet_b3", num_classes=2).preprocessing.resize == 332
    assert create_model("efficientnet_b0", num_classes=2).preprocessing.resize == 256


def test_options_are_checked():
    with pytest.raises(ConfigError, match="unknown model option"):
        create_model("efficientnet_b0", num_classes=2, pooling="max")
    for bad in (
        {"padding": "valid"},
        {"depthwise": "fft"},
        {"drop_connect_rate": 1.0},
        {"se_ratio": 1.5},
        {"width_coefficient": 0},
        {"stages": ((1, 4, 1, 1, 16),)},  # even kernel
        {"head_width": 0},
    ):
        with pytest.raises(ConfigError, match=f"efficientnet: .*{next(iter(bad))}"):
            create_model("efficientnet_b0", num_classes=2, **bad)
    spec = create_model("efficientnet_tiny", num_classes=2, stages=[[1, 3, 1, 1, 16]] * 3,
                        se_ratio=0, width_coefficient=1.5, depth_coefficient=2.0)  # fmt: skip
    assert spec.arch["repeats"] == (2, 2, 2) and spec.n_stages == 5  # config lists are fine
    names = tree.names(jax.eval_shape(lambda: spec.init(jax.random.key(0)))["params"])
    assert not any("/se/" in n for n in names)  # se_ratio=0: no squeeze-excite
    assert "backbone/stage1/block1/project_conv/kernel" in names
    assert spec.feature_dim == 96 and spec.arch["stem_width"] == 16  # 64 x 1.5; unscaled


def test_drop_connect():
    """train=True drops a residual block's branch for whole examples and scales the kept
    ones by 1 / keep (timm's DropPath); evaluation keeps every branch; rates grow with the
    block index (timm's and torchvision's rule)."""
    spec = efficientnet.BlockSpec(16, 16, 3, 1, 2)  # stride 1, same width: residual
    block = efficientnet.MBConv(spec, efficientnet.LayerOptions(), 0.25, drop_connect=0.5)
    x = np.random.default_rng(2).normal(size=(16, 5, 5, 16)).astype(np.float32)
    shapes = jax.eval_shape(lambda: block.init(jax.random.key(0), x, train=False, bn_train=False))
    rng = np.random.default_rng(3)  # random values without compiling an init
    variables = tree.unflatten({
        name: (1.0 + rng.random(s.shape) if name.endswith("/var") else rng.normal(size=s.shape) / 4)
        .astype(np.float32) for name, s in tree.flatten(shapes).items()
    })  # fmt: skip
    apply = jax.jit(
        lambda x, key, train: block.apply(
            variables, x, train=train, bn_train=False, rngs={"dropout": key}
        ),
        static_argnums=2,
    )
    branch = np.asarray(apply(x, jax.random.key(0), False)) - x
    for seed in (0, 1):
        out = np.asarray(apply(x, jax.random.key(seed), True))
        kept = np.abs(out - (x + 2 * branch)).max(axis=(1, 2, 3)) <= 1e-5
        dropped = np.abs(out - x).max(axis=(1, 2, 3)) == 0
        assert np.all(kept ^ dropped) and 0 < kept.sum() < len(x)
    rates = efficientnet.drop_connect_rates(0.2, [[None] * n for n in (4, 7, 7, 10, 10, 13, 4)])
    assert rates[0][0] == 0.0 and rates[-1][-1] == pytest.approx(0.2 * 54 / 55)


# --- depth maps and the strategies ---


def test_stages_and_layers_cover_every_parameter_and_last_k_takes_the_top():
    spec = _spec()
    params = jax.eval_shape(lambda: spec.init(jax.random.key(0)))["params"]
    names = tree.names(params)
    stages = {n: spec.stage_of(n) for n in names}
    assert stages["backbone/stem/conv/kernel"] == 0
    assert stages["backbone/stage2/block2/se/reduce/kernel"] == 2
    assert stages["backbone/stage4/block1/project_bn/scale"] == 4
    assert spec.stage_of("batch_stats/backbone/head_bn/mean") == 5
    assert stages["head/out/bias"] == 6 == spec.n_stages
    layers = sorted({spec.layer_of(n) for n in names})
    assert layers == list(range(spec.n_layers + 1))  # stem, the 6 blocks, head conv, head
    assert spec.layer_of("params/backbone/stage4/block2/se/expand/bias") == 6
    trainable = refs.last_k_trainable(spec, params, 2)
    assert (
        trainable["backbone/head_conv/kernel"]
        and trainable["backbone/stage4/block1/se/reduce/bias"]
    )
    assert not trainable["backbone/stage3/block1/dw_conv/kernel"]
    for bad in ("backbone/stage5/block1/dw_conv/kernel", "backbone/stage2/block3/dw_conv/kernel",
                "backbone/blocks/0"):  # fmt: skip
        with pytest.raises(ValueError, match="no parameter"):
            spec.stage_of(bad)


# --- wrong checkpoints fail loudly ---


def test_a_checkpoint_that_does_not_fit_is_listed():
    ref = refs.numpy_state(_timm(tf=False))
    spec = _spec()
    refs.assert_misfits_named(
        functools.partial(_load, spec), ref, missing="blocks.1.0.se.conv_reduce.bias",
        unexpected={"blocks.1.0.se.gate.weight": np.zeros(3, np.float32)},
        misshapen={"blocks.1.0.se.conv_reduce.weight": np.zeros((3, 16, 1, 1))},
    )  # fmt: skip
    with pytest.raises(CheckpointMismatchError, match="stem/conv/kernel: checkpoint"):
        _load(_spec(**TF), ref)  # a model of transformers' widths
    with pytest.raises(ConfigError, match="not an EfficientNet checkpoint"):
        convert_efficientnet.convert({"stem.weight": np.zeros(1)}, spec=spec, shapes={})
    lite = create_model("efficientnet_lite_tiny", num_classes=2)
    with pytest.raises(ConfigError, match="efficientnet_lite"):
        convert_efficientnet.convert(ref, spec=lite, shapes={})


def test_transformers_blocks_follow_the_models_layout():
    """Global block numbers split by the model's repeats: a deeper checkpoint's extra
    blocks are unexpected by their names, a shallower one's are missing."""
    assert convert_efficientnet_lite.block_names((1, 2, 1), first=0) == {
        0: "stage1/block1", 1: "stage2/block1", 2: "stage2/block2", 3: "stage3/block1"}  # fmt: skip
    state = refs.numpy_state(_transformers(size=36))
    deeper = {k.replace("blocks.5.", "blocks.6."): v for k, v in state.items()}
    deeper |= {k: v for k, v in state.items() if ".blocks.5." in k}
    with pytest.raises(CheckpointMismatchError, match=r"unexpected[^?]*\?efficientnet\.encoder"):
        _load(_spec(**TF), deeper)
    state = {f"module.{k}": v for k, v in state.items()}  # a DataParallel save
    converted = convert_efficientnet.convert(state, spec=_spec(**TF), shapes={})
    assert converted.scheme == "transformers"
    kernel = converted.variables["params/backbone/stage4/block2/se/reduce/kernel"]
    np.testing.assert_array_equal(
        kernel,
        state["module.efficientnet.encoder.blocks.5.squeeze_excite.reduce.weight"][:, :, 0, 0].T,
    )


def test_a_corrupt_file_is_named(tmp_path):
    bad = tmp_path / "efficientnet.pth"
    bad.write_bytes(b"not a checkpoint")
    spec = _spec()
    shapes = jax.eval_shape(lambda: spec.init(jax.random.key(0)))
    with pytest.raises(CorruptCheckpointError, match="efficientnet.pth"):
        load_pretrained(spec, str(bad), variables=shapes, preprocessing=spec.preprocessing)


# --- a .pth through the trainer ---


# ~30 s of CPU on the suite's 8 fake devices, mostly compiling the train step (augmentation,
# the backward pass); 'conv' depthwise convs compile in half the time of the CPU default
# (the same numbers: the Lite tests compare the two, gradients included).
@pytest.mark.slow
def test_a_timm_pth_fine_tunes_its_last_stages(tmp_path):
    """timm's tiny EfficientNet saved with torch.save as weights.source: the backbone from
    the file; last_k trains the head conv (k=1; drop-connect on in the frozen blocks'
    forward, learning rates by layer_of), the stages below stay bitwise the file's."""
    from tlflax import train

    ref = _timm(tf=False)
    config = refs.pth_run_config(tmp_path, ref, "efficientnet_tiny", image_size=32, settings={
        "weights.preprocessing": "imagenet", "optim.strategy": "last_k", "optim.k": 1,
        "optim.lr_decay": "layer_decay", "train.steps": 3,
    })  # fmt: skip
    config.model.overrides = {"depthwise": "conv"}
    summary = train.train_and_evaluate(config, tmp_path / "run")
    assert summary["steps"] == 3
    prep = refs.run_preprocessing(tmp_path / "run")
    assert prep["mean"][0] == pytest.approx(0.485 * 255) and prep["resolution"] == 32
    params = refs.restored_state(tmp_path / "run", 3)["params"]
    file = lambda t: t.detach().numpy().transpose(2, 3, 1, 0)
    frozen = params["backbone"]["stage4"]["block2"]["dw_conv"]["kernel"]
    np.testing.assert_array_equal(np.asarray(frozen), file(ref.blocks[3][1].conv_dw.weight))
    tuned = params["backbone"]["head_conv"]["kernel"]
    assert refs.max_diff(tuned, file(ref.conv_head.weight)) > 1e-5
    head = params["head"]["out"]["kernel"]
    assert head.shape == (64, 10) and float(jnp.abs(head).sum()) > 0


# --- keras.applications.EfficientNetB0..B7 (Keras on JAX: tests/conftest.py) ---

# 57 px: the stride-2 convs see sides 57, 29, 15 (odd: Keras' correct_pad pads 1 | 1, 2 | 2)
# and 8, 4 (even: 0 | 1, 1 | 2), kernels 3 and 5 at both parities, the map ending at 2.
KERAS_SIZE = 57
KERAS_MEAN, KERAS_VAR = (0.5, 0.45, 0.4), (0.06, 0.05, 0.055)  # ImageNet-like, not ImageNet's
N_KERAS_WEIGHTS = 314  # keras.applications.EfficientNetB0: 311 arrays + Normalization's 3


@contextlib.contextmanager
def _cheap_keras_init():
    """Keras' initialisers as numpy fills while a model builds (each value is replaced or
    only its shape is read): jax's zeros compile one program per shape, seconds of CPU."""
    init = refs.keras_on_jax().initializers
    with pytest.MonkeyPatch.context() as mp:
        for cls, fill in ((init.VarianceScaling, 0.0), (init.Zeros, 0.0), (init.Ones, 1.0)):
            mp.setattr(cls, "__call__", _filler(fill))
        yield mp


def _filler(fill: float):
    return lambda self, shape, dtype=None: np.full(shape, fill, dtype or "float32")


def _keras_efficientnet(i: int, *, size: int, classes: int = N_CLASSES, **kwargs):
    keras = refs.keras_on_jax()
    with _cheap_keras_init():
        return getattr(keras.applications, f"EfficientNetB{i}")(
            weights=None, input_shape=(size, size, 3), classes=classes,
            classifier_activation=None, **kwargs,
        )  # fmt: skip


def _set_normalization(model, mean, variance):
    """The Normalization layer's arrays; Keras computes with the constants finalize_state
    derives from them."""
    (layer,) = [la for la in model.layers if type(la).__name__ == "Normalization"]
    layer.adapt_mean.assign(np.asarray(mean, np.float32))
    layer.adapt_variance.assign(np.asarray(variance, np.float32))
    layer.finalize_state()


def _keras_randomised(model, *, seed: int):
    """Every kernel, bias and BatchNorm statistic drawn (O(1) activations through 16 blocks),
    the Normalization ImageNet-like."""
    rng = np.random.default_rng(seed)
    draws = {**refs.keras_batchnorm_draws(rng), "bias": lambda s: rng.normal(0, 0.3, s)}
    for var in model.weights:
        layer, leaf = var.path.rsplit("/", 1)
        if layer.startswith("normalization"):
            continue
        shape = tuple(var.shape)
        fan_in = np.prod(shape[:2]) if layer.endswith("_dwconv") else np.prod(shape[:-1])
        value = draws[leaf](shape) if leaf in draws else rng.normal(0, (2 / fan_in) ** 0.5, shape)
        var.assign(value.astype(np.float32))
    _set_normalization(model, KERAS_MEAN, KERAS_VAR)
    return model


@pytest.fixture(scope="module")
def keras_b0(tmp_path_factory):
    """keras.applications.EfficientNetB0 (weights=None, 5 classes) at 57 px, random weights,
    its logits on uint8 pictures, its files (.weights.h5, .keras, Keras 2 .h5, a .weights.h5
    naming no layer, the backbone's .h5 without the top), and tlflax's tf_efficientnet_b0
    ('conv' depthwise: the shorter compile), compiled once."""
    model = _keras_randomised(_keras_efficientnet(0, size=KERAS_SIZE), seed=3)
    folder = tmp_path_factory.mktemp("keras_efficientnet")
    files = refs.save_keras_files(model, folder, "b0", top_end="top_activation")
    pictures = refs.pictures(2, KERAS_SIZE)
    spec = create_model("tf_efficientnet_b0", num_classes=N_CLASSES, depthwise="conv")
    return {"model": model, "files": files, "pictures": pictures, "spec": spec,
            "want": np.asarray(refs.keras_logits_fn(model)(pictures.astype(np.float32))),
            "shapes": jax.eval_shape(lambda: spec.init(jax.random.key(0), KERAS_SIZE)),
            "apply": jax.jit(spec.module.apply)}  # fmt: skip


@pytest.fixture
def keras_convention(monkeypatch):
    """load_pretrained's Keras preprocessing for the family: keras_preprocessing (the lead
    wires it in tlflax.weights; set here too, so that these tests run either way)."""
    from tlflax import weights

    monkeypatch.setitem(weights._KERAS_CONVENTION, "efficientnet",
                        convert_efficientnet.keras_preprocessing)  # fmt: skip


def _normalise(pictures, prep):
    from tlflax.data import augment

    return augment.make_eval_transform(image_size=pictures.shape[1], preprocessing=prep)(pictures)


# ~20 s on 2 cores with the fixture: Keras builds B0, saves it five ways and compiles it;
# tlflax compiles B0 once.
@pytest.mark.slow
@pytest.mark.parametrize("fmt", [".weights.h5", ".keras", ".h5", "unnamed"])
def test_logits_match_keras_efficientnet_b0_from_uint8_pixels(keras_b0, keras_convention, fmt):
    """Keras' EfficientNetB0 on raw pixels (its preprocess_input is the identity: the model
    normalises) against tlflax's normalisation from keras_preprocessing, then the converted
    tf_efficientnet_b0, every file format (the unnamed one by Keras' numbering per class)."""
    k = keras_b0
    loaded = load_pretrained(k["spec"], str(k["files"][fmt]), variables=k["shapes"], reinit=())
    report, prep = loaded.report, loaded.preprocessing
    assert report.scheme == "keras" and len(report.loaded) == N_KERAS_WEIGHTS - 3
    assert sorted(k.rsplit("/", 1)[1] for k in report.ignored) == ["count", "mean", "variance"]
    assert prep.mean == pytest.approx([255 * m for m in KERAS_MEAN], rel=1e-6)
    assert prep.std == pytest.approx([255 * v**0.5 for v in KERAS_VAR], rel=1e-6)
    assert prep.resolution == 224 and "Keras efficientnet" in prep.source  # the model's
    ours = np.asarray(k["apply"](loaded.variables, _normalise(k["pictures"], prep)))
    assert np.std(k["want"]) > 0.1
    assert refs.max_diff(ours, k["want"]) <= TOL


def _keras_imagenet_b0(keras_b0):
    """EfficientNetB0(weights='imagenet', include_top=False) as Keras builds it (its extra
    Rescaling by 1 / sqrt(std)), the 'download' being the fixture's backbone file."""
    from keras.src.applications import efficientnet as keras_efficientnet

    with _cheap_keras_init() as mp:
        mp.setattr(keras_efficientnet.file_utils, "get_file",
                   lambda *args, **kwargs: str(keras_b0["files"]["notop"]))  # fmt: skip
        model = refs.keras_on_jax().applications.EfficientNetB0(
            weights="imagenet", include_top=False, input_shape=(KERAS_SIZE, KERAS_SIZE, 3)
        )
    # keras.applications' files hold ImageNet's mean, and its std as the variance.
    _set_normalization(model, [m / 255 for m in pp.IMAGENET_MEAN],
                       [s / 255 for s in pp.IMAGENET_STD])  # fmt: skip
    return model


# ~5 s: Keras builds and saves B0 without its top (the fixture's too).
@pytest.mark.slow
def test_keras_imagenet_normalisation_and_a_notop_file(keras_b0, keras_convention, tmp_path,
                                                      monkeypatch):  # fmt: skip
    """weights='imagenet' models divide by sqrt(std) once more: from the config of a .keras
    file, and from the ImageNet values of a file of weights alone (keras:efficientnetb0_notop
    from a temporary Keras cache, as keras.applications' own files are); tlflax's ImageNet
    mean / std equal Keras' normalising layers on uint8 pixels. The no-top file loads with
    the head new, or fails naming it where every variable must come from the file."""
    import h5py

    keras = refs.keras_on_jax()
    model = _keras_imagenet_b0(keras_b0)
    model.save(tmp_path / "imagenet.keras")
    model.save(tmp_path / "efficientnetb0_notop.h5")
    with h5py.File(tmp_path / "efficientnetb0_notop.h5", "r+") as f:
        del f.attrs["model_config"]  # weights alone, as keras.applications' files
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    entry = sources.KerasFile(("tf_efficientnet_b0",), "efficientnetb0_notop.h5", "unused", None)
    monkeypatch.setitem(sources.KERAS_FILES, "efficientnetb0_notop", entry)
    (tmp_path / "models").mkdir()
    shutil.move(tmp_path / "efficientnetb0_notop.h5", tmp_path / "models")
    layers = keras.Model(model.input, model.get_layer("stem_conv_pad").input)
    pixels = keras_b0["pictures"]
    want = np.asarray(jax.jit(layers)(pixels.astype(np.float32)))
    spec, shapes = keras_b0["spec"], keras_b0["shapes"]
    for source in (str(tmp_path / "imagenet.keras"), "keras:efficientnetb0_notop"):
        loaded = load_pretrained(spec, source, variables=shapes)
        prep = loaded.preprocessing
        assert prep.mean == pytest.approx(pp.IMAGENET_MEAN, rel=1e-6)
        assert prep.std == pytest.approx(pp.IMAGENET_STD, rel=1e-6)
        assert refs.max_diff(_normalise(pixels, prep), want) <= 1e-5
        assert loaded.report.reinitialised == ["params/head/out/bias", "params/head/out/kernel"]
        assert len(loaded.report.loaded) == N_KERAS_WEIGHTS - 3 - 2
        got = loaded.variables["params"]["backbone"]["stage7"]["block1"]["dw_conv"]["kernel"]
        kernel = keras_b0["model"].get_layer("block7a_dwconv").get_weights()[0]
        np.testing.assert_array_equal(got, kernel.transpose(0, 1, 3, 2))
    with pytest.raises(CheckpointMismatchError, match="(?s)missing.*head/out/kernel"):
        load_pretrained(spec, "keras:efficientnetb0_notop", variables=shapes, reinit=())


@functools.cache
def _keras_full_size_state(i: int) -> dict:
    """The arrays' paths and shapes of keras.applications' EfficientNetB{i} (1000 classes;
    zero-cost arrays: shapes only, no forward pass)."""
    model = _keras_efficientnet(i, size=32, classes=1000)
    return {w.path: np.broadcast_to(np.zeros((), w.dtype), tuple(w.shape)) for w in model.weights}


# ~5 s: Keras builds B0 and B7 (numpy fills for initialisers; shapes only).
@pytest.mark.slow
@pytest.mark.parametrize("i, n_params", [(0, 5_288_548), (7, 66_347_960)])
def test_names_and_shapes_are_keras_applications(i, n_params):
    """Every array of Keras' full-size B0 / B7 lands on a parameter of tf_efficientnet_b<i>
    of the same shape (Keras' widths, depths and SE widths are tlflax's), the Normalization
    listed as ignored; a missing, an unexpected and a misshapen array are named."""
    state = _keras_full_size_state(i)
    assert "block1a_dwconv/kernel" in state  # Keras 3's name for a depthwise kernel
    variables, report = _load(_full_spec(i), state)
    assert report.scheme == "keras" and len(report.loaded) == len(state) - 3
    assert sorted(re.sub(r"_\d+/", "/", k) for k in report.ignored) == [
        "normalization/count", "normalization/mean", "normalization/variance"]  # fmt: skip
    assert sum(np.size(v) for v in tree.flatten(variables["params"]).values()) == n_params
    if i:
        return
    refs.assert_misfits_named(
        functools.partial(_load, _full_spec(i)), state, missing="block2b_se_reduce/bias",
        unexpected={"block2b_se_gate/kernel": np.zeros(3, np.float32)},
        misshapen={"block2b_se_reduce/kernel": np.zeros((1, 1, 144, 7))},
    )  # fmt: skip


def _keras_names_state(i: int) -> dict:
    """A stand-in Keras file of B<i>'s layer names (one array each; the stem's real shape)."""
    spec = create_model(f"tf_efficientnet_b{i}", num_classes=2)
    order = convert_efficientnet.keras_layer_order(spec.arch)
    state = {f"{n}/kernel": np.zeros(1, np.float32) for names in order.values() for n in names}
    state["stem_conv/kernel"] = np.zeros((3, 3, 3, efficientnet.round_filters(
        32, multiplier=spec.arch["width_coefficient"], divisor=8)), np.float32)  # fmt: skip
    return state


def test_keras_names_place_each_layer_and_wrong_models_are_refused():
    spec = create_model("tf_efficientnet_b0", num_classes=5)
    module = functools.partial(convert_efficientnet.keras_module, repeats=spec.arch["repeats"])
    assert module("block1a_se_reduce") == "backbone/stage1/block1/se/reduce"
    assert module("block2b_bn") == "backbone/stage2/block2/dw_bn"
    assert module("block6d_expand_conv") == "backbone/stage6/block4/expand_conv"
    assert module("top_bn") == "backbone/head_bn" and module("predictions") == "head/out"
    assert module("block6e_dwconv") is None and module("block8a_dwconv") is None
    order = convert_efficientnet.keras_layer_order(spec.arch)
    assert order["conv2d"][:5] == ["stem_conv", "block1a_se_reduce", "block1a_se_expand",
                                   "block1a_project_conv", "block2a_expand_conv"]  # fmt: skip
    n_layers = {c: len(v) for c, v in order.items()}
    assert n_layers == {"conv2d": 65, "depthwise_conv2d": 16, "batch_normalization": 49,
                        "dense": 1, "normalization": 1}  # fmt: skip
    # A B1 file into B0: refused naming the model it fits (a B0 file into B1 likewise).
    with pytest.raises(CheckpointMismatchError, match=r"EfficientNetB1\).*tf_efficientnet_b1"):
        convert_efficientnet.convert(_keras_names_state(1), spec=spec, shapes=None)
    b1 = create_model("tf_efficientnet_b1", num_classes=5)
    with pytest.raises(CheckpointMismatchError, match="use model tf_efficientnet_b0"):
        convert_efficientnet.convert(_keras_names_state(0), spec=b1, shapes=None)
    # PyTorch's numerics: refused in one line naming the model with Keras' (or the options).
    for name, want in [("efficientnet_b0", "use model 'tf_efficientnet_b0'"),
                       ("efficientnet_tiny", "padding='same', bn_eps=0.001")]:  # fmt: skip
        other = create_model(name, num_classes=5)
        state = _keras_names_state(0) if name != "efficientnet_tiny" else {
            "stem_conv/kernel": np.zeros((3, 3, 3, 16), np.float32)}  # fmt: skip
        with pytest.raises(ConfigError) as e:
            convert_efficientnet.convert(state, spec=other, shapes=None)
        assert want in str(e.value) and "\n" not in str(e.value)
    # A Keras 3 file that names no layer, of another layout: refused, not misplaced.
    unnamed = {"layers/conv2d/vars/0": np.zeros((3, 3, 3, 32), np.float32)}
    with pytest.raises(CheckpointMismatchError, match="names no layers"):
        convert_efficientnet.convert(unnamed, spec=spec, shapes=None)


def _weights_only_h5(path, layers: dict[str, dict[str, np.ndarray]]):
    """A Keras 2 save_weights .h5 (keras.applications' own files are of this kind)."""
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([n.encode() for n in layers])
        for layer, arrays in layers.items():
            g = f.create_group(layer)
            g.attrs["weight_names"] = np.array([f"{layer}/{w}:0".encode() for w in arrays])
            for w, value in arrays.items():
                g[f"{layer}/{w}:0"] = value


def test_keras_preprocessing_of_weights_alone(tmp_path):
    """Without the model's config: Rescaling(1/255), the file's Normalization, and Keras'
    compensation exactly where the variance is ImageNet's std (weights='imagenet'); a file
    without one Normalization is refused, saying what to set."""
    spec = create_model("tf_efficientnet_b3", num_classes=2)
    stem = {"kernel": np.zeros((3, 3, 3, 40), np.float32)}
    count = np.array(0, np.int64)
    cases = {
        "imagenet": ([m / 255 for m in pp.IMAGENET_MEAN], [s / 255 for s in pp.IMAGENET_STD],
                     pp.IMAGENET_MEAN, pp.IMAGENET_STD),
        "adapted": (KERAS_MEAN, KERAS_VAR, [255 * m for m in KERAS_MEAN],
                    [255 * v**0.5 for v in KERAS_VAR]),
    }  # fmt: skip
    for case, (mean, var, want_mean, want_std) in cases.items():
        path = tmp_path / f"{case}.h5"
        norm = {"mean": np.float32(mean), "variance": np.float32(var), "count": count}
        _weights_only_h5(path, {"normalization": norm, "stem_conv": stem})
        prep = convert_efficientnet.keras_preprocessing(sources.resolve(str(path)), spec)
        assert prep.mean == pytest.approx(want_mean, rel=1e-6)
        assert prep.std == pytest.approx(want_std, rel=1e-6)
        assert (prep.resolution, prep.interpolation) == (300, "bicubic")  # B3's
    _weights_only_h5(tmp_path / "none.h5", {"stem_conv": stem})
    with pytest.raises(ConfigError, match="0 Normalization layers.*weights.preprocessing"):
        convert_efficientnet.keras_preprocessing(sources.resolve(str(tmp_path / "none.h5")), spec)
