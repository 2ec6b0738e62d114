"""ViT: converted HF / timm / Google weights give the PyTorch logits; any input resolution."""

import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from PIL import Image
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from transformers import ViTConfig, ViTForImageClassification, ViTModel

from tlflax import preprocessing as pp
from tlflax import tree
from tlflax.models import available, create_model, vit
from tlflax.weights import CheckpointMismatchError, convert_vit, load_pretrained, merge_variables

TOL = 1e-4
TINY = dict(width=32, depth=2, heads=4, patch=8)  # vit_tiny's shape, for the references
PREP_32 = pp.minus_one_to_one(32)


def _images(size: int, *, n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


_INIT_CACHE: dict = {}


def _init(spec, resolution: int = 32):
    """spec.init, cached: compiling an init costs ~1.5 s, and most tests re-use a few."""
    key = (spec.name, tuple(sorted(spec.arch.items())), spec.module.head, resolution)
    if key not in _INIT_CACHE:
        _INIT_CACHE[key] = spec.init(jax.random.key(0), resolution)
    return jax.tree.map(lambda a: a, _INIT_CACHE[key])  # fresh dicts, shared arrays


def _apply(variables, spec, x, *, features: bool = False):
    # jit compiles faster than the first op-by-op call of a whole transformer.
    method = spec.module.features if features else spec.module.__call__
    return np.asarray(jax.jit(lambda v, x: spec.module.apply(v, x, method=method))(variables, x))


def _torch_out(fn, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return fn(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def _max_diff(a, b) -> float:
    assert np.shape(a) == np.shape(b), (np.shape(a), np.shape(b))
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _randomise(model: torch.nn.Module, *, seed: int) -> torch.nn.Module:
    """Every parameter moved off its init, so that zero biases or unit norms hide nothing."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


# --- names, registry, layer map ---

TINY_NAMES = {
    *(
        f"params/backbone/block{i}/{m}/{leaf}"
        for i in range(2)
        for m in ("norm1", "norm2")
        for leaf in ("scale", "bias")
    ),
    *(
        f"params/backbone/block{i}/{m}/{leaf}"
        for i in range(2)
        for m in ("attn/qkv", "attn/out", "mlp/fc1", "mlp/fc2")
        for leaf in ("kernel", "bias")
    ),
    "params/backbone/embed/patch/kernel",
    "params/backbone/embed/patch/bias",
    "params/backbone/embed/cls",
    "params/backbone/embed/pos",
    "params/backbone/norm/scale",
    "params/backbone/norm/bias",
    "params/head/out/kernel",
    "params/head/out/bias",
}


def _shapes(variables) -> dict:
    return {k: tuple(np.shape(v)) for k, v in tree.flatten(variables).items()}


def test_parameter_names_and_shapes_are_pinned():
    shapes = _shapes(_init(create_model("vit_tiny", num_classes=5)))
    assert set(shapes) == TINY_NAMES
    assert shapes["params/backbone/embed/patch/kernel"] == (8, 8, 3, 32)
    assert shapes["params/backbone/embed/pos"] == (1, 1 + 4 * 4, 32)
    assert shapes["params/backbone/block1/attn/qkv/kernel"] == (32, 96)
    assert shapes["params/backbone/block1/mlp/fc1/kernel"] == (32, 128)
    assert shapes["params/head/out/kernel"] == (32, 5)


@pytest.mark.parametrize(
    "overrides, added, removed",
    [
        (dict(pool="gap"), set(), {"embed/cls"}),
        (dict(pool="gap", gap_norm="pooled", class_token=True), {"fc_norm/scale", "fc_norm/bias"},
         {"norm/scale", "norm/bias"}),
        (dict(representation_size=24), {"pre_logits/kernel", "pre_logits/bias"}, set()),
        (dict(qkv_bias=False), set(), {"block0/attn/qkv/bias", "block1/attn/qkv/bias"}),
    ],
)  # fmt: skip
def test_options_change_exactly_the_named_parameters(overrides, added, removed):
    spec = create_model("vit_tiny", num_classes=5, **overrides)
    names = set(_shapes(_init(spec)))
    prefix = "params/backbone/"
    assert names - TINY_NAMES == {prefix + n for n in added}
    assert TINY_NAMES - names == {prefix + n for n in removed}
    assert spec.feature_dim == overrides.get("representation_size", 32)


def test_registry_variants_and_layer_map():
    sizes = {"ti": (192, 12, 3), "s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16)}
    for size, (width, depth, heads) in sizes.items():
        for patch in (16, 32):
            spec = create_model(f"vit_{size}{patch}", num_classes=10)
            assert f"vit_{size}{patch}" in available()
            arch = spec.arch
            assert (arch["width"], arch["depth"], arch["heads"], arch["patch"]) == (
                width, depth, heads, patch,
            )  # fmt: skip
            assert arch["mlp_dim"] == 4 * width and spec.family == "vit"
            assert spec.n_stages == spec.n_layers == depth + 1
    assert spec.preprocessing == pp.minus_one_to_one(224)
    layer = spec.layer_of
    assert layer("backbone/embed/pos") == 0 and layer("backbone/embed/patch/kernel") == 0
    assert layer("backbone/block0/attn/qkv/kernel") == 1
    assert layer("backbone/block23/mlp/fc2/bias") == 24 == layer("backbone/norm/scale")
    assert layer("backbone/fc_norm/bias") == layer("backbone/pre_logits/kernel") == 24
    assert layer("head/out/kernel") == spec.stage_of("head/out/kernel") == 25
    with pytest.raises(ValueError, match="block24"):
        layer("backbone/block24/norm1/scale")


def test_bad_options_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="unknown model option"):
        create_model("vit_tiny", num_classes=2, pooling="gap")
    with pytest.raises(ValueError, match="pool='cls' needs class_token=True"):
        create_model("vit_tiny", num_classes=2, class_token=False)
    with pytest.raises(ValueError, match="gap_norm"):
        create_model("vit_tiny", num_classes=2, pool="gap", gap_norm="after")
    with pytest.raises(ValueError, match="not divisible by heads"):
        create_model("vit_tiny", num_classes=2, heads=5)


# --- any input resolution ---


@pytest.mark.parametrize(
    "overrides, sizes",
    [({}, (16, 40)), (dict(pool="gap"), (24, 48)),
     (dict(pool="gap", gap_norm="pooled", class_token=True), (64,))],
    ids=["cls", "gap-tokens", "gap-pooled"],
)  # fmt: skip
def test_output_shapes_at_several_resolutions(overrides, sizes):
    spec = create_model("vit_tiny", num_classes=7, **overrides)
    for size in sizes:
        variables = _init(spec, size)
        grid = size // 8
        n_prefix = 1 if spec.arch["class_token"] else 0
        assert variables["params"]["backbone"]["embed"]["pos"].shape == (
            1, n_prefix + grid * grid, 32,
        )  # fmt: skip
        x = _images(size, n=3)
        assert _apply(variables, spec, x).shape == (3, 7)
        features = _apply(variables, spec, x, features=True)
        assert features.shape == (3, 32) and features.dtype == np.float32


def test_running_at_another_grid_names_both_grids_and_the_fix():
    spec = create_model("vit_tiny", num_classes=3)
    variables = _init(spec, 32)
    with pytest.raises(ValueError, match=r"4x4 grid \(32 px.*48x48 input gives a 6x6 grid") as e:
        _apply(variables, spec, _images(48))
    assert "spec.init(rng, resolution=48)" in str(e.value)
    with pytest.raises(ValueError, match="multiple of 8"):
        _apply(_init(spec, 36 // 8 * 8), spec, _images(36))


def test_resample_is_identity_on_the_same_grid_and_keeps_the_class_token():
    pos = np.random.default_rng(0).normal(size=(1, 1 + 36, 8)).astype(np.float32)
    np.testing.assert_array_equal(vit.resample_pos_embed(pos, n_prefix=1, grid=(6, 6)), pos)
    up = vit.resample_pos_embed(pos, n_prefix=1, grid=(9, 9))
    assert up.shape == (1, 1 + 81, 8)
    np.testing.assert_array_equal(up[:, :1], pos[:, :1])


@pytest.mark.parametrize("old, new", [(4, 6), (6, 4), (7, 12)])
def test_resample_matches_timm_and_keeps_rows_and_columns(old, new):
    rng = np.random.default_rng(1)
    pos = rng.normal(size=(1, 1 + old * old, 8)).astype(np.float32)
    ours = vit.resample_pos_embed(pos, n_prefix=1, grid=(new, new))
    ref = resample_abs_pos_embed(torch.from_numpy(pos), [new, new], num_prefix_tokens=1)
    assert _max_diff(ours, ref.numpy()) <= 1e-5
    # An embedding that depends on the row only stays so (catches a transposed grid).
    rows = np.repeat(rng.normal(size=(old, 1, 8)), old, axis=1).reshape(1, -1, 8)
    out = vit.resample_pos_embed(
        np.concatenate([pos[:, :1], rows], 1).astype(np.float32), n_prefix=1, grid=(new, new)
    )[0, 1:].reshape(new, new, 8)
    assert np.abs(out - out[:, :1]).max() <= 1e-5
    assert np.abs(out - out[:1]).max() > 0.1


def test_resample_of_a_smooth_embedding_stays_smooth():
    # sin/cos of the patch centre, sampled at 8x8 and resampled to 12x12: close to the
    # same function sampled at the 12x12 centres (error of cubic interpolation only).
    def field(n):
        c = (np.arange(n) + 0.5) / n
        y, x = np.meshgrid(c, c, indexing="ij")
        return np.stack([np.sin(2 * x + y), np.cos(3 * y), x * y], -1).reshape(1, n * n, 3)

    out = vit.resample_pos_embed(field(8).astype(np.float32), n_prefix=0, grid=(12, 12))
    error = np.abs(out - field(12)).reshape(12, 12, 3)
    assert error[2:-2, 2:-2].max() <= 0.01  # near the border the kernel is cut: looser
    assert error.max() <= 0.05


# --- transformers (PyTorch) and the legacy Flax msgpack ---


@pytest.fixture(scope="module")
def hf_case():
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=32, patch_size=8, num_labels=5,
    )  # fmt: skip
    model = _randomise(ViTForImageClassification(config), seed=1)
    spec = create_model("vit_tiny", num_classes=5, **vit.overrides_from_hf_config(config.to_dict()))
    assert spec.arch["norm_eps"] == 1e-12 and spec.arch["mlp_dim"] == 64
    return dict(config=config, model=model, spec=spec, x=_images(32))


def _hf_compare(case, source: str, **kw):
    loaded = load_pretrained(case["spec"], source, variables=_init(case["spec"]), reinit=(), **kw)
    ref = _torch_out(lambda t: case["model"](pixel_values=t).logits, case["x"])
    diff = _max_diff(_apply(loaded.variables, case["spec"], case["x"]), ref)
    assert diff <= TOL, f"{source}: max |logits diff| {diff}"
    return loaded


def test_hf_safetensors_parity(hf_case, tmp_path):
    hf_case["model"].save_pretrained(tmp_path)
    keys = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    assert "vit.encoder.layer.0.attention.attention.query.weight" in keys
    loaded = _hf_compare(hf_case, str(tmp_path))
    assert loaded.report.scheme == "hf" and not loaded.report.ignored
    assert "params/head/out/kernel" in loaded.report.loaded
    assert loaded.preprocessing.mean == (127.5,) * 3 and loaded.preprocessing.resolution == 32


def test_hf_pytorch_bin_parity(hf_case, tmp_path):
    # transformers 5 writes safetensors even with safe_serialization=False; older hub repos
    # hold pytorch_model.bin with the same (legacy) names, written here with torch.save.
    hf_case["model"].save_pretrained(tmp_path / "st")
    state = safetensors.torch.load_file(tmp_path / "st" / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    hf_case["config"].save_pretrained(tmp_path)
    assert _hf_compare(hf_case, str(tmp_path)).report.scheme == "hf"


def test_hf_in_memory_names_of_transformers_5_convert_too(hf_case):
    state = {k: t.numpy() for k, t in hf_case["model"].state_dict().items()}
    assert "vit.layers.0.attention.q_proj.weight" in state
    spec = hf_case["spec"]
    converted = convert_vit.convert(state, spec=spec, shapes=_shapes(_init(spec)))
    variables, _ = merge_variables(converted, _init(spec), reinit=())
    ref = _torch_out(lambda t: hf_case["model"](pixel_values=t).logits, hf_case["x"])
    assert _max_diff(_apply(variables, spec, hf_case["x"]), ref) <= TOL


def _hf_flax_tree(state: dict) -> dict:
    """transformers' ViT names in FlaxViTForImageClassification's layout (transformers 4.x):
    the same module paths '/'-joined, kernels (in, out) / HWIO, LayerNorm 'scale'."""
    out: dict = {}
    for key, t in state.items():
        *path, leaf = key.split(".")
        a = t.numpy()
        if path[-1] == "projection" and leaf == "weight":
            leaf, a = "kernel", a.transpose(2, 3, 1, 0)
        elif leaf == "weight" and a.ndim == 2:
            leaf, a = "kernel", a.T
        elif leaf == "weight":
            leaf = "scale"
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = np.ascontiguousarray(a)
    return out


def test_hf_flax_msgpack_parity(hf_case, tmp_path):
    hf_case["model"].save_pretrained(tmp_path / "st")
    state = safetensors.torch.load_file(tmp_path / "st" / "model.safetensors")
    nested = _hf_flax_tree(state)
    layer0 = nested["vit"]["encoder"]["layer"]["0"]
    assert layer0["attention"]["attention"]["query"]["kernel"].shape == (32, 32)
    assert set(nested) == {"vit", "classifier"}
    (tmp_path / "flax_model.msgpack").write_bytes(flax.serialization.msgpack_serialize(nested))
    hf_case["config"].save_pretrained(tmp_path)
    assert _hf_compare(hf_case, str(tmp_path)).report.scheme == "hf_flax"


def test_hf_vit_model_pooler_is_ignored_or_loads_as_pre_logits(hf_case, tmp_path):
    """ViTModel files (the in21k checkpoints) have no 'vit.' prefix, no classifier and a
    pooler: Dense + tanh on the class token, the original vit_jax pre-logits layer."""
    base = _randomise(ViTModel(hf_case["config"]), seed=3)
    base.save_pretrained(tmp_path)
    keys = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    assert "embeddings.cls_token" in keys and "pooler.dense.weight" in keys
    plain = hf_case["spec"]
    loaded = load_pretrained(plain, str(tmp_path), variables=_init(plain))
    assert set(loaded.report.ignored) == {"pooler.dense.weight", "pooler.dense.bias"}
    assert "pooler" in loaded.report.ignored["pooler.dense.weight"]
    spec = create_model("vit_tiny", num_classes=5, **vit.overrides_from_hf_config(
        hf_case["config"].to_dict()), representation_size=32)  # fmt: skip
    loaded = load_pretrained(spec, str(tmp_path), variables=_init(spec))
    assert "params/backbone/pre_logits/kernel" in loaded.report.loaded
    ours = _apply(loaded.variables, spec, hf_case["x"], features=True)
    ref = _torch_out(lambda t: base(pixel_values=t).pooler_output, hf_case["x"])
    assert _max_diff(ours, ref) <= TOL


# --- timm ---

TIMM_CASES = {
    "cls": (dict(global_pool="token"), {}),
    "avg-fc_norm": (dict(global_pool="avg"), dict(pool="gap", class_token=True,
                                                  gap_norm="pooled")),
    "gap-no-cls": (dict(global_pool="avg", class_token=False, fc_norm=False),
                   dict(pool="gap", gap_norm="tokens")),
    "cls-no-qkv-bias": (dict(qkv_bias=False, mlp_ratio=2.0), dict(qkv_bias=False, mlp_dim=64)),
}  # fmt: skip


def _timm_model(kw: dict, *, img_size: int = 32, width: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=img_size, patch_size=8, embed_dim=width, depth=2, num_heads=4, num_classes=5,
        **kw,
    )  # fmt: skip
    return _randomise(model, seed=seed + 1)


@pytest.fixture(scope="module", params=sorted(TIMM_CASES))
def timm_case(request):
    timm_kw, overrides = TIMM_CASES[request.param]
    model = _timm_model(timm_kw)
    spec = create_model("vit_tiny", num_classes=5, **overrides)
    return dict(name=request.param, model=model, spec=spec, x=_images(32), timm_kw=timm_kw)


def _state(model) -> dict:
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def test_timm_parity(timm_case, tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(_state(timm_case["model"]), path)
    spec = timm_case["spec"]
    loaded = load_pretrained(spec, str(path), variables=_init(spec), reinit=(),
                             preprocessing=PREP_32)  # fmt: skip
    assert loaded.report.scheme == "timm"
    ref = _torch_out(timm_case["model"], timm_case["x"])
    diff = _max_diff(_apply(loaded.variables, spec, timm_case["x"]), ref)
    assert diff <= TOL, f"{timm_case['name']}: max |logits diff| {diff}"


def test_timm_checkpoint_at_a_larger_grid_matches_timm_resampling(tmp_path):
    """A 32-px (4x4) checkpoint into a model initialised at 48 px (6x6): same logits as timm's
    model built at 48 px with timm's own position-embedding resampling."""
    small = _timm_model({})
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(_state(small), path)
    big = _timm_model({}, img_size=48)
    state = _state(small)
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], [6, 6], num_prefix_tokens=1)
    big.load_state_dict(state)
    spec = create_model("vit_tiny", num_classes=5)
    loaded = load_pretrained(spec, str(path), variables=_init(spec, 48), reinit=(),
                             preprocessing=PREP_32)  # fmt: skip
    x = _images(48)
    assert _max_diff(_apply(loaded.variables, spec, x), _torch_out(big.eval(), x)) <= TOL


def test_shape_mismatch_fails_loudly(tmp_path):
    path = tmp_path / "wide.safetensors"
    safetensors.torch.save_file(_state(_timm_model({}, width=64)), path)
    spec = create_model("vit_tiny", num_classes=5)
    with pytest.raises(CheckpointMismatchError, match="shape mismatch") as e:
        load_pretrained(spec, str(path), variables=_init(spec), reinit=(), preprocessing=PREP_32)
    message = str(e.value)
    assert "params/backbone/block0/attn/qkv/kernel: checkpoint (64, 192) vs model (32, 96)" in (
        message
    )
    assert "31 shape mismatch" in message
    # Position embeddings are resampled only across grids, never to hide another mismatch.
    state = {k: v.numpy() for k, v in _state(_timm_model({}, width=64)).items()}
    converted = convert_vit.convert(state, spec=spec, shapes=_shapes(_init(spec)))
    assert converted.variables["params/backbone/embed/pos"].shape == (1, 17, 64)


def test_unknown_keys_and_layouts_are_not_dropped():
    state = {k: v.numpy() for k, v in _timm_model({}).state_dict().items()}
    state["blocks.0.ls1.gamma"] = np.ones(32, np.float32)  # layer scale: not in this ViT
    state["blocks.2.norm1.weight"] = np.ones(32, np.float32)  # a deeper checkpoint
    spec = create_model("vit_tiny", num_classes=5)
    converted = convert_vit.convert(state, spec=spec, shapes=_shapes(_init(spec)))
    assert "?blocks.0.ls1.gamma" in converted.variables
    assert "params/backbone/block2/norm1/scale" in converted.variables
    with pytest.raises(CheckpointMismatchError, match=r"2 unexpected"):
        merge_variables(converted, _init(spec), reinit=())
    with pytest.raises(ValueError, match="naming schemes: hf, hf_flax, timm, big_vision"):
        convert_vit.convert({"conv1.weight": np.ones(3)}, spec=spec, shapes={})


# --- Google .npz (vit_jax / augreg and big_vision naming) ---


def _google_npz_from_timm(state: dict, *, heads: int, naming: str) -> dict:
    """A timm ViT's weights under Google's names, written by hand from the two layouts.

    'vit_jax': augreg files (encoderblock_{i}, MultiHeadDotProductAttention_1, LayerNorm_2,
    MlpBlock_3); 'big_vision_scan': blocks stacked under 'encoderblock' (nn.scan),
    per-type numbering, top-level 'pos_embedding', all under 'params/'.
    """
    s = {k: v.numpy() for k, v in state.items()}
    d = s["cls_token"].shape[-1]
    mha, ln2, mlp = ("1", "2", "3") if naming == "vit_jax" else ("0", "1", "0")
    blocks = []
    for i in range(len({k.split(".")[1] for k in s if k.startswith("blocks.")})):
        b = f"blocks.{i}."
        qkv_w, qkv_b = s[b + "attn.qkv.weight"], s[b + "attn.qkv.bias"]
        block = {
            "LayerNorm_0/scale": s[b + "norm1.weight"], "LayerNorm_0/bias": s[b + "norm1.bias"],
            f"LayerNorm_{ln2}/scale": s[b + "norm2.weight"],
            f"LayerNorm_{ln2}/bias": s[b + "norm2.bias"],
            f"MlpBlock_{mlp}/Dense_0/kernel": s[b + "mlp.fc1.weight"].T,
            f"MlpBlock_{mlp}/Dense_0/bias": s[b + "mlp.fc1.bias"],
            f"MlpBlock_{mlp}/Dense_1/kernel": s[b + "mlp.fc2.weight"].T,
            f"MlpBlock_{mlp}/Dense_1/bias": s[b + "mlp.fc2.bias"],
            f"MultiHeadDotProductAttention_{mha}/out/kernel":
                s[b + "attn.proj.weight"].T.reshape(heads, d // heads, d),
            f"MultiHeadDotProductAttention_{mha}/out/bias": s[b + "attn.proj.bias"],
        }  # fmt: skip
        for j, name in enumerate(("query", "key", "value")):
            w = qkv_w[j * d : (j + 1) * d].T  # (in, out), out = head-major
            block[f"MultiHeadDotProductAttention_{mha}/{name}/kernel"] = w.reshape(d, heads, -1)
            block[f"MultiHeadDotProductAttention_{mha}/{name}/bias"] = qkv_b[
                j * d : (j + 1) * d
            ].reshape(heads, -1)
        blocks.append(block)
    out = {
        "embedding/kernel": s["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": s["patch_embed.proj.bias"],
        "cls": s["cls_token"],
        "Transformer/encoder_norm/scale": s["norm.weight"],
        "Transformer/encoder_norm/bias": s["norm.bias"],
        "head/kernel": s["head.weight"].T,
        "head/bias": s["head.bias"],
    }
    if naming == "vit_jax":
        out["Transformer/posembed_input/pos_embedding"] = s["pos_embed"]
        for i, block in enumerate(blocks):
            out.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in block.items()})
        return out
    out["pos_embedding"] = s["pos_embed"]
    for k in blocks[0]:
        out[f"Transformer/encoderblock/{k}"] = np.stack([b[k] for b in blocks])
    return {f"params/{k}": v for k, v in out.items()}


@pytest.mark.parametrize("naming", ["vit_jax", "big_vision_scan"])
def test_google_npz_parity(naming, tmp_path):
    model = _timm_model({})
    arrays = _google_npz_from_timm(model.state_dict(), heads=4, naming=naming)
    path = tmp_path / "vit.npz"
    np.savez(path, **arrays)
    spec = create_model("vit_tiny", num_classes=5)
    loaded = load_pretrained(spec, str(path), variables=_init(spec), reinit=())
    assert loaded.report.scheme == "big_vision"
    assert loaded.preprocessing.mean == (127.5,) * 3  # the .npz convention: [-1, 1]
    x = _images(32)
    assert _max_diff(_apply(loaded.variables, spec, x), _torch_out(model, x)) <= TOL


def test_google_pre_logits_map_to_the_model(tmp_path):
    arrays = _google_npz_from_timm(_timm_model({}).state_dict(), heads=4, naming="vit_jax")
    arrays["pre_logits/kernel"] = np.ones((32, 24), np.float32)
    arrays["pre_logits/bias"] = np.zeros(24, np.float32)
    arrays["head/kernel"] = np.ones((24, 5), np.float32)
    spec = create_model("vit_tiny", num_classes=5, representation_size=24)
    converted = convert_vit.convert(arrays, spec=spec, shapes=_shapes(_init(spec)))
    variables, report = merge_variables(converted, _init(spec), reinit=())
    assert "params/backbone/pre_logits/kernel" in report.loaded
    np.testing.assert_array_equal(variables["params"]["backbone"]["pre_logits"]["kernel"], 1.0)


# --- compute dtype ---


def test_bfloat16_compute_keeps_float32_params_and_close_logits(tmp_path):
    model = _timm_model({})
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    logits = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        spec = create_model("vit_tiny", num_classes=5, dtype=dtype)
        converted = convert_vit.convert(state, spec=spec, shapes=_shapes(_init(spec)))
        variables, _ = merge_variables(converted, _init(spec), reinit=())
        assert all(v.dtype == jnp.float32 for v in tree.flatten(variables).values())
        logits[dtype] = _apply(variables, spec, _images(32))
    scale = np.abs(logits[jnp.float32]).max()
    assert _max_diff(logits[jnp.bfloat16], logits[jnp.float32]) <= 0.05 * scale


def test_drop_path_is_random_in_training_only():
    spec = create_model("vit_tiny", num_classes=5, drop_path_rate=0.5)
    variables = _init(spec)
    head = np.random.default_rng(0).normal(size=(32, 5)).astype(np.float32)
    variables["params"]["head"]["out"]["kernel"] = head  # zeros would hide everything
    x = _images(32, n=8)
    plain = create_model("vit_tiny", num_classes=5)
    np.testing.assert_array_equal(_apply(variables, spec, x), _apply(variables, plain, x))
    train = jax.jit(lambda v, x, r: spec.module.apply(v, x, train=True, rngs={"dropout": r}))
    a, b = (np.asarray(train(variables, x, jax.random.key(i))) for i in (1, 2))
    assert _max_diff(a, b) > 1e-3


# --- predictions kept across resolutions (real images) ---


def _tlflax_to_timm(params: dict) -> dict:
    """tlflax ViT params (pool='cls') under timm's names and PyTorch layouts, by hand.
    The fused qkv layout is the same in both: [q | k | v], each head-major."""
    b, out = params["backbone"], {}
    out["cls_token"], out["pos_embed"] = b["embed"]["cls"], b["embed"]["pos"]
    out["patch_embed.proj.weight"] = np.transpose(b["embed"]["patch"]["kernel"], (3, 2, 0, 1))
    out["patch_embed.proj.bias"] = b["embed"]["patch"]["bias"]
    for i in range(sum(k.startswith("block") for k in b)):
        blk, p = b[f"block{i}"], f"blocks.{i}."
        for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2")):
            out[p + theirs + ".weight"], out[p + theirs + ".bias"] = (
                blk[ours]["scale"], blk[ours]["bias"],
            )  # fmt: skip
        for ours, theirs in (("attn/qkv", "attn.qkv"), ("attn/out", "attn.proj"),
                             ("mlp/fc1", "mlp.fc1"), ("mlp/fc2", "mlp.fc2")):  # fmt: skip
            module = tree.flatten(blk)
            out[p + theirs + ".weight"] = np.transpose(module[ours + "/kernel"])
            out[p + theirs + ".bias"] = module[ours + "/bias"]
    out["norm.weight"], out["norm.bias"] = b["norm"]["scale"], b["norm"]["bias"]
    out["head.weight"] = np.transpose(params["head"]["out"]["kernel"])
    out["head.bias"] = params["head"]["out"]["bias"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _flower_halves(root: pathlib.Path, *, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Every image of a split squeezed to a height x height/2 half-canvas, and its class."""
    classes = sorted(p.name for p in root.iterdir())
    halves, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            with Image.open(f) as im:
                halves.append(np.asarray(im.convert("RGB").resize((height // 2, height),
                                                                  Image.BICUBIC)))  # fmt: skip
            labels.append(c)
    return np.stack(halves), np.array(labels)


def _random_crops(halves, rng, *, height: int) -> np.ndarray:
    """Random-resized crops (25..100 % of the area) and flips: objects at several scales,
    as in ImageNet, so that a model is not tied to one apparent object size."""
    out = np.empty((len(halves), height, height // 2, 3), np.uint8)
    h, w = halves.shape[1:3]
    for i, half in enumerate(halves):
        f = np.sqrt(rng.uniform(0.35, 1.0))
        ch, cw = int(h * f), int(w * f)
        y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        im = Image.fromarray(half[y0 : y0 + ch, x0 : x0 + cw])
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        out[i] = np.asarray(im.resize((height // 2, height), Image.BICUBIC))
    return out


def _pairs(left, right) -> np.ndarray:
    return np.concatenate([left, right], axis=2)  # side by side: (B, H, H, 3)


def _train_pair_classifier(spec, halves, labels, *, resolution: int, epochs: int):
    params = _init(spec, resolution)["params"]
    steps = len(labels) // 64
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, 1e-3, 2 * steps, epochs * steps),
                     weight_decay=0.05)  # fmt: skip
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = spec.module.apply({"params": p}, (x - 127.5) / 127.5)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(0)
    for _ in range(epochs):
        crops = _random_crops(halves, rng, height=resolution)
        order, partner = rng.permutation(len(labels)), rng.permutation(len(labels))
        for i in range(steps):
            idx = order[i * 64 : (i + 1) * 64]
            x = _pairs(crops[idx], crops[partner[i * 64 : (i + 1) * 64]])
            params, opt_state = step(params, opt_state, x.astype(np.float32), labels[idx])
    return params


@pytest.mark.shared_data
@pytest.mark.slow
def test_predictions_kept_at_1_5x_resolution_flowers(shared_data, tmp_path):
    """No ImageNet ViT weights exist offline here, so this trains its own: a small ViT on
    flowers12 pairs at 48 px, saved as a timm file, loaded into a model initialised at 72 px
    (position embeddings resampled by the converter). Most test predictions are kept.

    The task is 'the class of the LEFT flower of a side-by-side pair': on plain flowers12 a
    ViT trained from scratch ignores position (shuffled position embeddings kept 81 % of its
    predictions), which would let a wrongly oriented resampling pass unnoticed. Here the
    answer depends on where things are; a left-right mirrored grid must lose the predictions.
    """
    low, high = 48, 72
    halves, labels = _flower_halves(shared_data / "flowers12" / "train", height=2 * low)
    spec = create_model("vit_tiny", num_classes=12, width=64, depth=4, heads=4, patch=8)
    params = _train_pair_classifier(spec, halves, labels, resolution=low, epochs=40)
    path = tmp_path / "flowers_vit.safetensors"
    safetensors.numpy.save_file(_tlflax_to_timm(params), path)

    test_root = shared_data / "flowers12" / "test"
    partner = np.random.default_rng(1).permutation(240)
    predictions, accuracy = {}, {}
    for size in (low, high):
        test_halves, test_labels = _flower_halves(test_root, height=size)
        x = _pairs(test_halves, test_halves[partner]).astype(np.float32)
        loaded = load_pretrained(spec, str(path), variables=_init(spec, size), reinit=(),
                                 preprocessing=pp.minus_one_to_one(size))  # fmt: skip
        predictions[size] = _apply(loaded.variables, spec, (x - 127.5) / 127.5).argmax(-1)
        accuracy[size] = float(np.mean(predictions[size] == test_labels))
        if size == high:  # control: the same grid mirrored left-right
            pos = loaded.variables["params"]["backbone"]["embed"]["pos"]
            grid = pos[0, 1:].reshape(high // 8, high // 8, -1)[:, ::-1]
            mirrored = np.concatenate([pos[:, :1], grid.reshape(1, -1, grid.shape[-1])], 1)
            loaded.variables["params"]["backbone"]["embed"]["pos"] = mirrored
            control = _apply(loaded.variables, spec, (x - 127.5) / 127.5).argmax(-1)
    kept = float(np.mean(predictions[low] == predictions[high]))
    kept_mirrored = float(np.mean(predictions[low] == control))
    summary = f"accuracy {accuracy}, kept {kept:.3f}, kept with a mirrored grid {kept_mirrored:.3f}"
    assert accuracy[low] >= 0.4 and accuracy[high] >= 0.4, summary  # chance: 1/12
    assert kept >= 0.6, summary
    assert kept_mirrored <= 0.3, summary


# Real ImageNet checkpoints, used only if already in the local Hugging Face cache.
IMAGENET_CHECKPOINTS = {
    "hf:google/vit-base-patch16-224": ("vit_b16", dict(norm_eps=1e-12)),
    "timm:vit_base_patch16_224.augreg2_in21k_ft_in1k": ("vit_b16", {}),
    "timm:vit_small_patch16_224.augreg_in21k_ft_in1k": ("vit_s16", {}),
    "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k": ("vit_ti16", {}),
}


def _cached_imagenet_checkpoint():
    from huggingface_hub import try_to_load_from_cache

    for source, (name, overrides) in IMAGENET_CHECKPOINTS.items():
        kind, repo = source.split(":", 1)
        repo = repo if kind == "hf" else f"timm/{repo}"
        for filename in ("model.safetensors", "pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(repo, filename), str):
                return source, name, overrides
    return None


def _imagenet_batch(files, prep: pp.Preprocessing) -> np.ndarray:
    out = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("RGB")
            scale = prep.resize / min(im.size)
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
            left, top = (im.width - prep.resolution) // 2, (im.height - prep.resolution) // 2
            im = im.crop((left, top, left + prep.resolution, top + prep.resolution))
        out.append((np.asarray(im, np.float32) - prep.mean) / prep.std)
    return np.stack(out)


@pytest.mark.shared_data
@pytest.mark.slow
def test_imagenet_predictions_kept_from_224_to_384(shared_data):
    found = _cached_imagenet_checkpoint()
    if found is None:
        pytest.skip(
            "no ImageNet ViT checkpoint in the local Hugging Face cache (looked for "
            f"{', '.join(IMAGENET_CHECKPOINTS)}); this machine cannot download one"
        )
    source, name, overrides = found
    spec = create_model(name, num_classes=1000, **overrides)
    files = sorted((shared_data / "imagenet_samples").iterdir())[::10]  # 100 images: CPU time
    wnids = sorted({f.name.split("_")[0] for f in (shared_data / "imagenet_samples").iterdir()})
    labels = np.array([wnids.index(f.name.split("_")[0]) for f in files])
    apply = jax.jit(lambda v, x: spec.module.apply(v, x))
    predictions = {}
    for size in (224, 384):
        loaded = load_pretrained(spec, source, variables=_init(spec, size), reinit=())
        prep = loaded.preprocessing.at_resolution(size)
        logits = np.concatenate([
            np.asarray(apply(loaded.variables, _imagenet_batch(files[i : i + 10], prep)))
            for i in range(0, len(files), 10)
        ])  # fmt: skip
        predictions[size] = logits.argmax(-1)
    accuracy = float(np.mean(predictions[224] == labels))
    kept = float(np.mean(predictions[224] == predictions[384]))
    assert accuracy >= 0.7, f"{source} at 224 px: top-1 {accuracy:.2f} on {len(files)} images"
    assert kept >= 0.7, f"{source}: {kept:.2f} of the 224-px predictions kept at 384 px"


def _qkv(shape=(2, 17, 3, 4, 8), dtype=jnp.float32, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype) * 2


def _vjp(fn, x, seed=1):
    out, pullback = jax.vjp(fn, x)
    cot = jax.random.normal(jax.random.key(seed), out.shape, jnp.float32).astype(out.dtype)
    return out, pullback(cot)[0]


@pytest.mark.parametrize("shape", [(2, 17, 3, 4, 8), (3, 50, 3, 2, 24)])
def test_heads_attention_matches_jax_forward_and_gradient(shape):
    """The CPU's attention (vit.heads_attention) against jax.nn.dot_product_attention on the
    same qkv: outputs and input gradients to float32 rounding, with a large logit range."""
    qkv = _qkv(shape) * 3
    ref_out, ref_grad = _vjp(lambda x: vit.attention(x, impl="xla"), qkv)
    out, grad = _vjp(vit.heads_attention, qkv)
    assert out.shape == ref_out.shape == shape[:2] + shape[3:]
    # softmax(q k^T / sqrt(d)) v in float64: heads_attention is no further from it than jax
    q, k, v = (np.moveaxis(np.asarray(qkv[:, :, i], np.float64), 2, 1) for i in range(3))
    logits = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    exact = np.moveaxis((p / p.sum(-1, keepdims=True)) @ v, 1, 2)
    err, ref_err = np.abs(out - exact).max(), np.abs(ref_out - exact).max()
    assert err <= 2 * ref_err + 1e-6 and err < 1e-4 * np.abs(exact).max()
    np.testing.assert_allclose(grad, ref_grad, atol=2e-5 * float(jnp.abs(ref_grad).max()))


def test_heads_attention_in_bfloat16_keeps_float32_softmax():
    qkv = _qkv(dtype=jnp.bfloat16)
    out = vit.heads_attention(qkv)
    ref = vit.attention(qkv, impl="xla")
    exact = vit.heads_attention(qkv.astype(jnp.float32))
    assert out.dtype == jnp.bfloat16
    assert float(jnp.abs(out.astype(jnp.float32) - exact).max()) < 0.05
    assert float(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)).max()) < 0.05


def test_attention_runs_heads_on_the_cpu_and_jax_elsewhere(monkeypatch):
    qkv = _qkv()
    assert jax.default_backend() == "cpu"
    np.testing.assert_array_equal(vit.attention(qkv), vit.heads_attention(qkv))
    monkeypatch.setattr(vit.jax, "default_backend", lambda: "gpu")
    q, k, v = jnp.moveaxis(qkv, 2, 0)
    np.testing.assert_array_equal(vit.attention(qkv), jax.nn.dot_product_attention(q, k, v))
    with pytest.raises(ValueError, match="'heads', 'xla' or None"):
        vit.attention(qkv, impl="flash")


def test_gelu_is_the_exact_gelu_of_jax_and_pytorch():
    x = jnp.linspace(-12.0, 12.0, 4001, dtype=jnp.float32)
    out, grad = _vjp(vit.gelu, x)
    ref_out, ref_grad = _vjp(lambda x: jax.nn.gelu(x, approximate=False), x)
    np.testing.assert_allclose(out, ref_out, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-5)
    np.testing.assert_allclose(
        out, torch.nn.functional.gelu(torch.from_numpy(np.asarray(x))).numpy(), atol=1e-6
    )
    assert vit.gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16
