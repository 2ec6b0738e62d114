"""ResNet: logits parity with transformers and timm, shapes, names, BatchNorm modes, loud loads."""

import copy

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import refs
import safetensors.torch
import timm
import torch
from transformers import ResNetConfig, ResNetForImageClassification

from tlflax import preprocessing as pp
from tlflax import tree
from tlflax.models import available, create_model, resnet
from tlflax.weights import (
    CheckpointMismatchError,
    convert_resnet,
    load_pretrained,
    merge_variables,
)

TOL = 1e-4  # fp32, max |logits diff|
HF_CONFIGS = {  # stage 1 of 'basic' keeps its width (no shortcut), of 'bottleneck' widens it
    "basic": dict(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1]),
    "bottleneck": dict(embedding_size=8, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 2, 1]),
}
# timm name -> a tiny copy (timm `channels` = tlflax `widths`; timm's plain stem is always 64)
TIMM_CONFIGS = {
    "resnet18": dict(layers=(1, 1, 1, 1), channels=(8, 16, 24, 32)),
    "resnet50": dict(layers=(1, 2, 1, 1), channels=(4, 8, 12, 16)),
}
TIMM_KEYS = ("depths", "widths")


def _init(spec, size: int = 32) -> dict:
    """Like spec.init, without its per-call jit: eager ops compile once per session."""
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    return tree.to_plain(spec.module.init(jax.random.key(0), x, train=False))


# --- transformers ResNet: model.safetensors, pytorch_model.bin, legacy flax_model.msgpack ---


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def hf_case(request):
    config = ResNetConfig(**HF_CONFIGS[request.param], layer_type=request.param, num_labels=5)
    torch.manual_seed(0)
    model = refs.randomised(ResNetForImageClassification(config), seed=1)
    spec = create_model(
        "resnet_tiny", num_classes=5, **resnet.overrides_from_hf_config(config.to_dict())
    )
    x = refs.images(45)  # odd size: stride-2 padding must match PyTorch's on both sides
    apply = jax.jit(lambda v, x: spec.module.apply(v, x))
    return dict(block=request.param, config=config, model=model, spec=spec, x=x, apply=apply)


def _load_and_compare(case, source: str, **kw):
    loaded = load_pretrained(
        case["spec"], source, variables=refs.blank(case["spec"], 32), reinit=(), **kw
    )
    diff = refs.max_diff(
        case["apply"](loaded.variables, case["x"]), refs.torch_logits(case["model"], case["x"])
    )
    assert diff <= TOL, f"{case['block']} {source}: max |logits diff| {diff}"
    return loaded


def test_hf_safetensors_parity(hf_case, tmp_path):
    hf_case["model"].save_pretrained(tmp_path)
    loaded = _load_and_compare(hf_case, str(tmp_path))
    assert loaded.report.scheme == "hf"
    assert "params/head/out/kernel" in loaded.report.loaded
    assert all(k.endswith("num_batches_tracked") for k in loaded.report.ignored)
    assert loaded.report.ignored, "num_batches_tracked counters should be listed as ignored"
    assert loaded.preprocessing.mean == pp.imagenet().mean


def test_hf_pytorch_bin_parity(hf_case, tmp_path):
    # transformers 5 always saves safetensors; this is the layout of older hub repos.
    torch.save(hf_case["model"].state_dict(), tmp_path / "pytorch_model.bin")
    hf_case["config"].save_pretrained(tmp_path)
    assert _load_and_compare(hf_case, str(tmp_path)).report.scheme == "hf"


def _hf_flax_tree(state: dict, *, basic: bool) -> dict:
    """A transformers ResNet state dict in FlaxResNetForImageClassification's names/layouts."""
    out: dict = {}
    for key, t in state.items():
        *path, leaf = key.split(".")
        if leaf == "num_batches_tracked":
            continue
        a = t.numpy()
        if basic and "layer" in path:  # flax names a list made in setup 'layer_0', 'layer_1'
            i = path.index("layer")
            path[i + 1] = f"layer_{path[i + 1]}"
        if path[-1] == "convolution":
            collection, leaf, a = "params", "kernel", a.transpose(2, 3, 1, 0)
        elif path[-1] == "normalization":
            collection, leaf = {
                "weight": ("params", "scale"),
                "bias": ("params", "bias"),
                "running_mean": ("batch_stats", "mean"),
                "running_var": ("batch_stats", "var"),
            }[leaf]
        else:  # classifier.1 (Dense)
            collection, leaf, a = "params", {"weight": "kernel", "bias": "bias"}[leaf], a.T
        node = out.setdefault(collection, {})
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = np.ascontiguousarray(a)
    return out


def test_hf_flax_msgpack_parity(hf_case, tmp_path):
    nested = _hf_flax_tree(hf_case["model"].state_dict(), basic=hf_case["block"] == "basic")
    assert "resnet" in nested["batch_stats"] and "1" in nested["params"]["classifier"]
    (tmp_path / "flax_model.msgpack").write_bytes(flax.serialization.msgpack_serialize(nested))
    hf_case["config"].save_pretrained(tmp_path)
    loaded = _load_and_compare(hf_case, str(tmp_path))
    assert loaded.report.scheme == "hf_flax"


def test_hf_base_model_names_without_prefix(hf_case):
    # ResNetModel / ResNetBackbone files have no 'resnet.' prefix and no classifier.
    state = refs.numpy_state(hf_case["model"])
    base = {k.removeprefix("resnet."): v for k, v in state.items() if k.startswith("resnet.")}
    full = convert_resnet.convert(state, spec=hf_case["spec"], shapes={})
    bare = convert_resnet.convert(base, spec=hf_case["spec"], shapes={})
    assert set(full.variables) - set(bare.variables) == {
        "params/head/out/kernel",
        "params/head/out/bias",
    }


def test_bn_train_matches_torch_train_mode(hf_case):
    """bn_train=True: batch statistics, running means updated with PyTorch's momentum 0.1."""
    spec, x = hf_case["spec"], hf_case["x"]
    state = refs.numpy_state(hf_case["model"])
    converted = convert_resnet.convert(state, spec=spec, shapes={})
    variables, _ = merge_variables(converted, refs.blank(spec, 32), reinit=())
    logits, updates = spec.module.apply(variables, x, bn_train=True, mutable=["batch_stats"])
    model = copy.deepcopy(hf_case["model"]).train()
    assert refs.max_diff(logits, refs.torch_logits(model, x)) <= TOL
    torch_after = convert_resnet.convert(refs.numpy_state(model), spec=spec, shapes={}).variables
    means = {k: v for k, v in tree.flatten(updates).items() if k.endswith("/mean")}
    assert len(means) > 10
    for name, mean in means.items():
        # Running variances differ on purpose: PyTorch averages the unbiased batch variance.
        assert refs.max_diff(mean, torch_after[name]) <= 1e-5, name


# --- timm: hub layout (config.json + model.safetensors) and a bare torch.save file ---


@pytest.fixture(scope="module", params=sorted(TIMM_CONFIGS))
def timm_case(request):
    torch.manual_seed(0)
    kw = TIMM_CONFIGS[request.param]
    model = timm.create_model(request.param, pretrained=False, num_classes=5, **kw)
    model = refs.randomised(model, seed=2)
    spec = create_model(
        request.param,
        num_classes=5,
        depths=kw["layers"],
        widths=kw["channels"],
    )
    apply = jax.jit(lambda v, x: spec.module.apply(v, x))
    return dict(block=request.param, model=model, spec=spec, x=refs.images(64, seed=3), apply=apply)


def test_timm_hub_layout_parity(timm_case, tmp_path):
    timm.models.save_for_hf(timm_case["model"], tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = _load_and_compare(timm_case, str(tmp_path))
    assert loaded.report.scheme == "timm"
    # The preprocessing comes from timm's pretrained_cfg (resnet18/50 a1_in1k: crop 0.95).
    assert loaded.preprocessing.resize == round(224 / timm_case["model"].pretrained_cfg["crop_pct"])


def test_timm_torch_save_parity(timm_case, tmp_path):
    torch.save(timm_case["model"].state_dict(), tmp_path / "resnet.pth")
    _load_and_compare(timm_case, str(tmp_path / "resnet.pth"), preprocessing=pp.imagenet())


def test_timm_default_reinit_replaces_the_classifier(timm_case, tmp_path):
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(timm_case["model"].state_dict(), path)
    spec = timm_case["spec"]
    spec3 = create_model(spec.name, num_classes=3, **{k: spec.arch[k] for k in TIMM_KEYS})
    variables = refs.blank(spec3, 32)
    variables["params"]["head"]["out"]["kernel"] += 7.0  # the model's own values must stay
    loaded = load_pretrained(spec3, str(path), variables=variables, preprocessing=pp.imagenet())
    head = loaded.variables["params"]["head"]["out"]
    assert head["kernel"].shape == (spec.feature_dim, 3) and np.all(head["kernel"] == 7.0)
    assert loaded.report.dropped == ["params/head/out/bias", "params/head/out/kernel"]
    stem = loaded.variables["params"]["backbone"]["stem"]["conv"]["kernel"]
    np.testing.assert_array_equal(
        stem, timm_case["model"].conv1.weight.detach().numpy().transpose(2, 3, 1, 0)
    )


# --- wrong checkpoints fail loudly, naming what does not fit ---


def _timm_basic_file(tmp_path, *, layers) -> str:
    model = timm.create_model(
        "resnet18", pretrained=False, num_classes=4, layers=layers, channels=(4, 4, 8, 8)
    )
    path = tmp_path / f"resnet{sum(layers) * 2 + 2}.safetensors"
    safetensors.torch.save_file(model.state_dict(), path)
    return str(path)


@pytest.mark.parametrize(
    "ckpt_layers, model_name, problem, named",
    [
        # 8 blocks more / fewer, 10 arrays each (2 convs, 2 BatchNorms).
        ((3, 4, 6, 3), "resnet18", "80 unexpected", "backbone/stage1/block3/"),
        ((2, 2, 2, 2), "resnet34", "80 missing", "backbone/stage1/block3/"),
    ],
)
def test_wrong_depth_is_named(tmp_path, ckpt_layers, model_name, problem, named):
    path = _timm_basic_file(tmp_path, layers=ckpt_layers)
    spec = create_model(model_name, num_classes=4, widths=(4, 4, 8, 8))
    variables = refs.blank(spec, 32)
    with pytest.raises(CheckpointMismatchError) as e:
        load_pretrained(spec, path, variables=variables, preprocessing=pp.imagenet())
    assert problem in str(e.value) and named in str(e.value)
    assert "shape mismatch" not in str(e.value)


def test_wrong_block_type_is_named():
    model = timm.create_model("resnet18", pretrained=False, **TIMM_CONFIGS["resnet18"])
    spec = create_model("resnet50", num_classes=4, depths=(1, 1, 1, 1), widths=(2, 4, 6, 8))
    state = refs.numpy_state(model)
    converted = convert_resnet.convert(state, spec=spec, shapes={})
    with pytest.raises(CheckpointMismatchError, match=r"missing(.|\n)*block1/conv3/kernel"):
        merge_variables(converted, refs.blank(spec, 32), reinit=())


def test_unknown_layout_and_unmapped_keys():
    spec = create_model("resnet_tiny", num_classes=2)
    with pytest.raises(ValueError, match=r"stem\.conv\.weight.*timm"):
        convert_resnet.convert({"stem.conv.weight": np.zeros(1)}, spec=spec, shapes={})
    state = {
        "conv1.weight": np.zeros((8, 3, 7, 7), np.float32),
        "conv1.bias": np.zeros(8, np.float32),  # ResNet convs have no bias
        "bn1.num_batches_tracked": np.zeros((), np.int64),
        "layer1.0.conv1.weight": np.zeros((8, 8, 3, 3), np.float32),
        "layer1.0.se.fc1.weight": np.zeros((2, 8, 1, 1), np.float32),  # SE-ResNet
        "layer1.0.downsample.1.running_var": np.ones(8, np.float32),
    }
    converted = convert_resnet.convert(state, spec=spec, shapes={})
    assert converted.scheme == "timm"
    assert set(converted.variables) == {
        "params/backbone/stem/conv/kernel",
        "?conv1.bias",
        "params/backbone/stage1/block1/conv1/kernel",
        "?layer1.0.se.fc1.weight",
        "batch_stats/backbone/stage1/block1/downsample/bn/var",
    }
    assert converted.variables["params/backbone/stem/conv/kernel"].shape == (7, 7, 3, 8)
    assert list(converted.ignored) == ["bn1.num_batches_tracked"]


@pytest.mark.parametrize(
    "key, name",
    [
        ("params/resnet/encoder/stages/1/layers/0/layer/layer_1/convolution/kernel",
         "params/backbone/stage2/block1/conv2/kernel"),
        ("params/resnet/encoder/stages/1/layers/2/layer/2/normalization/scale",
         "params/backbone/stage2/block3/bn3/scale"),
        ("batch_stats/resnet/encoder/stages/3/layers/0/shortcut/normalization/mean",
         "batch_stats/backbone/stage4/block1/downsample/bn/mean"),
        ("params/classifier/1/kernel", "params/head/out/kernel"),
    ],
)  # fmt: skip
def test_hf_flax_names(key, name):
    assert convert_resnet.map_key(key, scheme="hf_flax")[0] == name


# --- architecture: shapes, names, modes ---


@pytest.fixture(scope="module")
def tiny():
    spec = create_model("resnet_tiny", num_classes=7)
    return spec, spec.init(jax.random.key(0))  # at its preprocessing resolution, 224


@pytest.mark.parametrize("size", [45, 64, 96, 160])
def test_tiny_shapes_and_strides(tiny, size):
    spec, variables = tiny  # ResNet weights fit every resolution
    x = jnp.asarray(refs.images(size, batch=3))
    logits, inter = spec.module.apply(
        variables, x, capture_intermediates=lambda m, _: isinstance(m, resnet.Stage)
    )
    features = spec.module.apply(variables, x, method=spec.module.features)
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    assert features.shape == (3, spec.feature_dim) == (3, 32)
    stages = inter["intermediates"]["backbone"]
    sides = [stages[f"stage{i}"]["__call__"][0].shape[1:3] for i in range(1, 5)]
    # Stem /4, then /2 per stage: every stride-2 layer pads symmetrically, like PyTorch.
    assert sides == [(-(-size // 2**k),) * 2 for k in (2, 3, 4, 5)]


@pytest.mark.slow
@pytest.mark.parametrize("size", [64, 96])
def test_resnet50_shapes(size):
    spec = create_model("resnet50", num_classes=10)
    variables = _init(spec, size)
    x = jnp.asarray(refs.images(size))
    features = spec.module.apply(variables, x, method=spec.module.features)
    logits = spec.module.apply(variables, x)
    assert features.shape == (2, 2048) and logits.shape == (2, 10)
    assert np.all(np.isfinite(features)) and not np.any(logits)  # the new head starts at zero


def _shapes(spec, size=32) -> dict:
    v = jax.eval_shape(lambda: spec.init(jax.random.key(0), size))
    return {k: tuple(a.shape) for k, a in tree.flatten(v).items()}


TINY_NAMES = {
    "params/backbone/stem/conv/kernel": (7, 7, 3, 8),
    "params/backbone/stem/bn/scale": (8,),
    "params/backbone/stem/bn/bias": (8,),
    "batch_stats/backbone/stem/bn/mean": (8,),
    "batch_stats/backbone/stem/bn/var": (8,),
    "params/backbone/stage1/block1/conv1/kernel": (3, 3, 8, 8),
    "params/backbone/stage1/block1/conv2/kernel": (3, 3, 8, 8),
    "params/head/out/kernel": (32, 6),
    "params/head/out/bias": (6,),
}
for _i, (_cin, _cout) in enumerate([(8, 8), (8, 16), (16, 24), (24, 32)], 1):
    _block = f"backbone/stage{_i}/block1"
    TINY_NAMES[f"params/{_block}/conv1/kernel"] = (3, 3, _cin, _cout)
    TINY_NAMES[f"params/{_block}/conv2/kernel"] = (3, 3, _cout, _cout)
    for _bn in ("bn1", "bn2") + (("downsample/bn",) if _i > 1 else ()):
        for _coll, _leaf in [("params", "scale"), ("params", "bias"), ("batch_stats", "mean"),
                             ("batch_stats", "var")]:  # fmt: skip
            TINY_NAMES[f"{_coll}/{_block}/{_bn}/{_leaf}"] = (_cout,)
    if _i > 1:  # stage 1 keeps the stem's 8 channels at stride 1: no projection
        TINY_NAMES[f"params/{_block}/downsample/conv/kernel"] = (1, 1, _cin, _cout)


def test_tiny_names_pinned():
    assert _shapes(create_model("resnet_tiny", num_classes=6)) == TINY_NAMES
    assert len(TINY_NAMES) == 5 + 4 * 10 + 3 * 5 + 2


def test_resnet50_names_and_size():
    spec = create_model("resnet50", num_classes=1000)
    shapes = _shapes(spec)
    params = {k: s for k, s in shapes.items() if k.startswith("params/")}
    assert sum(int(np.prod(s)) for s in params.values()) == 25_557_032  # torchvision's count
    block = "params/backbone/stage2/block1"
    assert {k.removeprefix(block + "/"): s for k, s in params.items() if k.startswith(block)} == {
        "conv1/kernel": (1, 1, 256, 128),
        "bn1/scale": (128,), "bn1/bias": (128,),
        "conv2/kernel": (3, 3, 128, 128),  # v1.5: this 3x3 conv has the stride
        "bn2/scale": (128,), "bn2/bias": (128,),
        "conv3/kernel": (1, 1, 128, 512),
        "bn3/scale": (512,), "bn3/bias": (512,),
        "downsample/conv/kernel": (1, 1, 256, 512),
        "downsample/bn/scale": (512,), "downsample/bn/bias": (512,),
    }  # fmt: skip
    assert spec.feature_dim == 2048 and spec.arch["depths"] == (3, 4, 6, 3)


def test_stage_and_layer_maps():
    spec = create_model("resnet50", num_classes=3)
    names = [k.split("/", 1)[1] for k in _shapes(spec)]
    assert spec.n_stages == 5 and spec.n_layers == 17
    assert spec.stage_of("backbone/stem/conv/kernel") == 0 == spec.layer_of("backbone/stem/bn/bias")
    assert spec.stage_of("backbone/stage3/block6/conv3/kernel") == 3
    assert spec.layer_of("backbone/stage2/block1/conv1/kernel") == 4  # after stage1's 3 blocks
    assert spec.layer_of("backbone/stage4/block3/bn3/scale") == 16
    assert spec.stage_of("head/out/kernel") == 5 and spec.layer_of("head/out/bias") == 17
    assert {spec.layer_of(n) for n in names} == set(range(18))
    assert {spec.stage_of(n) for n in names} == set(range(6))
    with pytest.raises(ValueError, match="stage5/block1"):
        spec.stage_of("backbone/stage5/block1/conv1/kernel")


def _randomised_bn(variables, *, seed: int, affine: bool = True) -> dict:
    """Random running statistics (and, with `affine`, BatchNorm scales and biases)."""
    rng = np.random.default_rng(seed)
    draws = {"/mean": (rng.normal, (0.0, 1.0)), "/var": (rng.uniform, (0.5, 2.0))}
    if affine:
        draws.update({"/scale": (rng.normal, (1.0, 0.3)), "bn/bias": (rng.normal, (0.0, 0.3))})
        draws["bn1/bias"] = draws["bn2/bias"] = draws["bn/bias"]
    flat = tree.flatten(variables)
    for k in flat:
        for suffix, (draw, args) in draws.items():
            if k.endswith(suffix):
                flat[k] = draw(*args, size=flat[k].shape).astype(np.float32)
    return tree.unflatten(flat)


@pytest.fixture(scope="module")
def tiny_bn(tiny):
    """resnet_tiny's variables with every BatchNorm non-trivial (no zero last scales)."""
    return _randomised_bn(tiny[1], seed=0)


def test_bn_modes(tiny, tiny_bn):
    spec, x, a = tiny[0], jnp.asarray(refs.images(48)), tiny_bn
    b = _randomised_bn(a, seed=1, affine=False)  # other running statistics, same parameters

    def run(v, bn_train):
        return spec.module.apply(
            v, x, bn_train=bn_train, mutable=["batch_stats"], method=spec.module.features
        )

    (eval_a, kept), (eval_b, _) = run(a, False), run(b, False)
    old = tree.flatten(a["batch_stats"])
    assert tree.flatten(kept["batch_stats"]).keys() == old.keys()
    for k, v in tree.flatten(kept["batch_stats"]).items():
        np.testing.assert_array_equal(v, old[k])
    assert refs.max_diff(eval_a, eval_b) > 1e-3  # running statistics are used
    (train_a, new), (train_b, _) = run(a, True), run(b, True)
    assert refs.max_diff(train_a, train_b) < 1e-5  # batch statistics are used
    new = tree.flatten(new["batch_stats"])
    assert all(refs.max_diff(old[k], new[k]) > 0 for k in old)


def test_bfloat16_compute_float32_params(tiny, tiny_bn):
    f32, x = tiny[0], jnp.asarray(refs.images(64))
    bf16 = create_model("resnet_tiny", num_classes=7, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(lambda: bf16.init(jax.random.key(0)))
    assert {np.dtype(a.dtype) for a in jax.tree.leaves(shapes)} == {np.dtype(np.float32)}
    ref = f32.module.apply(tiny_bn, x, method=f32.module.features)
    out = bf16.module.apply(tiny_bn, x, method=bf16.module.features)
    assert out.dtype == jnp.float32 and bf16.module.apply(tiny_bn, x).dtype == jnp.float32
    assert 0 < refs.max_diff(out, ref) <= 0.05 * float(jnp.max(jnp.abs(ref)))


def test_drop_path_only_in_training(tiny, tiny_bn):
    x = jnp.asarray(refs.images(32))
    plain = tiny[0]
    spec = create_model("resnet_tiny", num_classes=7, drop_path_rate=0.5)

    def feats(s, train, seed=0):
        rngs = {"dropout": jax.random.key(seed)}
        return s.module.apply(tiny_bn, x, train=train, method=s.module.features, rngs=rngs)

    np.testing.assert_array_equal(feats(spec, False), feats(plain, False))
    np.testing.assert_array_equal(feats(plain, True, 0), feats(plain, False))
    assert refs.max_diff(feats(spec, True, 0), feats(spec, True, 1)) > 1e-4
    rates = resnet.drop_path_rates(0.3, (1, 2, 1))
    assert [len(r) for r in rates] == [1, 2, 1]
    np.testing.assert_allclose(sum(rates, ()), [0.0, 0.1, 0.2, 0.3])


def _random_variables(spec, size: int = 32, *, seed: int = 0) -> dict:
    """Non-zero variables of the model's shapes, from numpy (no initialiser to compile)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: spec.init(jax.random.key(0), size))
    flat = {
        n: rng.uniform(0.5, 2.0, a.shape) if n.endswith("/var") else rng.normal(0, 0.3, a.shape)
        for n, a in tree.flatten(shapes).items()
    }
    return tree.unflatten({n: a.astype(np.float32) for n, a in flat.items()})


def test_head_hidden_layer_and_dropout():
    """head_hidden / head_dropout: Dense, ReLU, Dropout on the hidden activations, then the
    zero-initialised output Dense; dropout only when training."""
    spec = create_model("resnet_tiny", num_classes=7, head_hidden=16, head_dropout=0.5)
    shapes = _shapes(spec)
    head = {k: s for k, s in shapes.items() if k.startswith("params/head/")}
    assert head == {
        "params/head/hidden/kernel": (32, 16), "params/head/hidden/bias": (16,),
        "params/head/out/kernel": (16, 7), "params/head/out/bias": (7,),
    }  # fmt: skip
    plain = _shapes(create_model("resnet_tiny", num_classes=7))
    assert {k: s for k, s in shapes.items() if k not in head} == {
        k: s for k, s in plain.items() if not k.startswith("params/head/")
    }
    feats = np.random.default_rng(0).normal(size=(256, 32)).astype(np.float32)
    p = spec.module.head.init(jax.random.key(0), feats)["params"]
    assert not np.any(p["out"]["kernel"]) and not np.any(p["out"]["bias"])
    assert np.all(np.std(p["hidden"]["kernel"], axis=0) > 0)
    hidden = np.maximum(feats @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0.0)
    # An output layer that copies the first 7 hidden units shows the dropout mask itself.
    p["out"]["kernel"] = np.eye(16, 7, dtype=np.float32)
    head_fn = jax.jit(
        lambda x, train, seed: spec.module.head.apply(
            {"params": p}, x, train=train, rngs={"dropout": jax.random.key(seed)}
        ),
        static_argnums=1,
    )
    kept = hidden[:, :7]
    np.testing.assert_allclose(head_fn(feats, False, 0), kept, rtol=1e-5, atol=1e-6)
    dropped = np.asarray(head_fn(feats, True, 0))
    np.testing.assert_allclose(dropped[dropped != 0], 2 * kept[dropped != 0], rtol=1e-5)
    assert abs(np.mean(dropped[kept > 0] == 0) - 0.5) < 0.1  # ~450 units at rate 0.5

    # Through the whole model: `train` reaches the head's dropout, and only it is random.
    variables = _random_variables(spec)
    x = jnp.asarray(refs.images(32, batch=4))
    model_fn = jax.jit(
        lambda train, seed: spec.module.apply(
            variables, x, train=train, rngs={"dropout": jax.random.key(seed)}
        ),
        static_argnums=0,
    )
    np.testing.assert_array_equal(model_fn(False, 0), model_fn(False, 1))
    np.testing.assert_array_equal(model_fn(True, 0), model_fn(True, 0))
    assert refs.max_diff(model_fn(True, 0), model_fn(True, 1)) > 1e-3
    assert refs.max_diff(model_fn(True, 0), model_fn(False, 0)) > 1e-3


def test_zero_init_last_starts_blocks_as_identity(tiny):
    flat = tree.flatten(tiny[1])
    last = [k for k in flat if k.endswith("/bn2/scale") and "/block" in k]
    assert len(last) == 4 and all(not np.any(flat[k]) for k in last)
    assert np.all(flat["params/backbone/stage1/block1/bn1/scale"] == 1)


def test_overrides_are_checked():
    with pytest.raises(ValueError, match=r"unknown model option\(s\) \['width'\]"):
        create_model("resnet18", num_classes=2, width=3)
    with pytest.raises(ValueError, match="block='wide'"):
        create_model("resnet18", num_classes=2, block="wide")
    with pytest.raises(ValueError, match="same, non-zero length"):
        create_model("resnet18", num_classes=2, depths=(1, 1, 1))
    with pytest.raises(ValueError, match="downsample_in_bottleneck"):
        resnet.overrides_from_hf_config(
            {"layer_type": "bottleneck", "downsample_in_bottleneck": True}
        )
    assert resnet.overrides_from_hf_config(ResNetConfig().to_dict()) == {
        "block": "bottleneck", "depths": (3, 4, 6, 3), "widths": (64, 128, 256, 512),
        "stem_width": 64,
    }  # fmt: skip
    names = {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet_tiny"}
    assert names <= set(available())
