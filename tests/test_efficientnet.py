"""EfficientNet B0..B7: logits parity with timm (PyTorch and TF conventions), torchvision and
transformers (random weights, tiny layouts), names and shapes pinned against full-size b0 and
b7 state dicts, depth maps, options, loud loads, and a run from a .pth through the trainer."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import torchvision
import transformers
from timm.models._efficientnet_builder import decode_arch_def, round_channels
from timm.models.efficientnet import EfficientNet as TimmEfficientNet

from tlflax import config_lib, optim, tree
from tlflax.errors import ConfigError
from tlflax.models import available, create_model, efficientnet
from tlflax.weights import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    convert_efficientnet,
    load_pretrained,
    merge_variables,
)

TOL = 1e-4  # fp32, max |logits diff|
TINY = efficientnet.VARIANTS["efficientnet_tiny"][0]
# transformers hard-codes the stem (32) and head (1280) widths before scaling: the tests of
# TF conventions use them, the PyTorch ones keep the tiny variant's (16, 64).
TF = {"padding": "same", "bn_eps": 1e-3, "bn_momentum": 0.99, "stem_width": 32, "head_width": 1280}
SIZES = (36, 45)  # even (maps 18, 9, 5: odd on the way down) and odd (maps 23, 12, 6)
N_CLASSES = 5


# --- references, built small and random ---


def _randomise(model: torch.nn.Module, *, seed: int) -> torch.nn.Module:
    """He-scaled convs and linears (activations of order 1 through the tiny net), biases
    and BatchNorm parameters and statistics all random: nothing cancels by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=g)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.3, generator=g)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.3, generator=g)
                m.bias.normal_(0.0, 0.3, generator=g)
                m.running_mean.normal_(0.0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model.eval()


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


def _state(model: torch.nn.Module) -> dict:
    return {k: t.detach().numpy() for k, t in model.state_dict().items()}


def _images(size: int, *, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def _torch_logits(model, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()))
    return getattr(out, "logits", out).numpy()


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


def _max_diff(a, b) -> float:
    assert np.shape(a) == np.shape(b), (np.shape(a), np.shape(b))
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


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
    variables, report = _load(spec, _state(model))
    assert report.scheme == scheme and not report.reinitialised
    x = _images(size, seed=size)
    theirs = _torch_logits(model, x)
    assert np.std(theirs) > 0.1  # a comparison of numbers that matter
    assert _max_diff(_apply_fn(**options)(variables, x), theirs) <= TOL


@pytest.mark.parametrize("size", SIZES)
def test_the_conventions_differ_by_far_more_than_the_tolerance(size):
    """The same weights under timm's TF and PyTorch conventions (padding, eps): the parity
    above tells the options apart at both sizes, it does not compare tiny numbers."""
    tf = _timm(tf=True)
    torch_like = _timm(tf=False, widths=(TF["stem_width"], TF["head_width"]))
    torch_like.load_state_dict(tf.state_dict())
    x = _images(size, seed=size)
    assert _max_diff(_torch_logits(tf, x), _torch_logits(torch_like, x)) > 100 * TOL


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
    config = config_lib.get_base_config()
    config.optim.update({"strategy": "last_k", "k": 2})
    (phase,) = optim.make_phases(config.optim, train_config=config.train, params=params,
                                 spec=spec, steps_per_epoch=1)  # fmt: skip
    trainable = tree.flatten(phase.trainable)
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
    ref = _state(_timm(tf=False))
    spec = _spec()
    cases = {
        "missing": {k: v for k, v in ref.items() if k != "blocks.1.0.se.conv_reduce.bias"},
        "unexpected": {**ref, "blocks.1.0.se.gate.weight": np.zeros(3, np.float32)},
        "shape mismatch": {**ref, "blocks.1.0.se.conv_reduce.weight": np.zeros((3, 16, 1, 1))},
    }
    for what, state in cases.items():
        with pytest.raises(CheckpointMismatchError, match=what):
            _load(spec, state)
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
    assert convert_efficientnet.hf_block_names((1, 2, 1)) == {
        0: "stage1/block1", 1: "stage2/block1", 2: "stage2/block2", 3: "stage3/block1"}  # fmt: skip
    state = _state(_transformers(size=36))
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
    import orbax.checkpoint as ocp

    from tlflax import train

    ref = _timm(tf=False)
    pth = tmp_path / "efficientnet_tiny.pth"
    torch.save(ref.state_dict(), pth)
    config = config_lib.get_base_config()
    config.update_from_flattened_dict({
        "model.name": "efficientnet_tiny", "data.source": "digits", "data.val_fraction": 0.1,
        "data.image_size": 32, "data.batch_size": 16, "weights.source": str(pth),
        "weights.preprocessing": "imagenet", "optim.strategy": "last_k", "optim.k": 1,
        "optim.lr_decay": "layer_decay", "train.steps": 3, "train.log_every": 1,
    })  # fmt: skip
    config.model.overrides = {"depthwise": "conv"}
    summary = train.train_and_evaluate(config, tmp_path / "run")
    assert summary["steps"] == 3
    prep = json.loads((tmp_path / "run/preprocessing.json").read_text())
    assert prep["mean"][0] == pytest.approx(0.485 * 255) and prep["resolution"] == 32
    params = ocp.StandardCheckpointer().restore(tmp_path / "run/checkpoints/3/state")["params"]
    file = lambda t: t.detach().numpy().transpose(2, 3, 1, 0)
    frozen = params["backbone"]["stage4"]["block2"]["dw_conv"]["kernel"]
    np.testing.assert_array_equal(np.asarray(frozen), file(ref.blocks[3][1].conv_dw.weight))
    tuned = params["backbone"]["head_conv"]["kernel"]
    assert _max_diff(tuned, file(ref.conv_head.weight)) > 1e-5
    head = params["head"]["out"]["kernel"]
    assert head.shape == (64, 10) and float(jnp.abs(head).sum()) > 0
