"""ViT checkpoints -> tlflax names (tlflax.models.vit).

Schemes, detected from the keys:
  'hf'         transformers ViTForImageClassification / ViTModel, PyTorch layout:
               'vit.embeddings.cls_token', 'vit.encoder.layer.0.attention.attention.query.weight',
               'classifier.*'; ViTModel (the in21k checkpoints) has no 'vit.' prefix and a
               pooler. transformers 5's in-memory names ('vit.layers.0.attention.q_proj') too.
  'hf_flax'    the legacy flax_model.msgpack of FlaxViTForImageClassification / FlaxViTModel
               (transformers 4.x): 'vit/encoder/layer/0/attention/attention/query/kernel'.
  'timm'       timm VisionTransformer: 'cls_token', 'pos_embed', 'blocks.0.attn.qkv.weight'.
  'big_vision' Google .npz, vit_jax naming ('Transformer/encoderblock_0/
               MultiHeadDotProductAttention_1/query/kernel', 'MlpBlock_3') and big_vision's
               ('MultiHeadDotProductAttention_0', 'MlpBlock_0', top-level 'pos_embedding',
               blocks stacked under 'Transformer/encoderblock/' when trained with scan).
Separate q, k, v projections are fused into the model's one qkv matmul. Position embeddings
are resampled to the model's grid (the one it was initialised at), class token untouched.
"""

from __future__ import annotations

import logging
import math
import re

import numpy as np

from tlflax.errors import ConfigError
from tlflax.models import vit
from tlflax.weights.common import UNEXPECTED_PREFIX, Converted, conv_kernel, dense_kernel

log = logging.getLogger(__name__)

HEAD = "head/out"
POS, CLS = "params/backbone/embed/pos", "params/backbone/embed/cls"
PRE_LOGITS = "params/backbone/pre_logits/kernel"
_B = r"(\d+)"  # a block index, becomes block{0}

# (module path regex, tlflax module, kind); paths are '.'-joined, leaves stripped.
_HF_MODULES = [
    (r"embeddings\.patch_embeddings\.projection", "embed/patch", "conv"),
    *[(rf"encoder\.layer\.{_B}\.attention\.attention\.{n}", f"block{{0}}/attn/{n[0]}", "dense")
      for n in ("query", "key", "value")],
    (rf"encoder\.layer\.{_B}\.attention\.output\.dense", "block{0}/attn/out", "dense"),
    (rf"encoder\.layer\.{_B}\.layernorm_before", "block{0}/norm1", "norm"),
    (rf"encoder\.layer\.{_B}\.layernorm_after", "block{0}/norm2", "norm"),
    (rf"encoder\.layer\.{_B}\.intermediate\.dense", "block{0}/mlp/fc1", "dense"),
    (rf"encoder\.layer\.{_B}\.output\.dense", "block{0}/mlp/fc2", "dense"),
    # transformers 5 renames these in memory (save_pretrained writes the names above).
    *[(rf"layers\.{_B}\.attention\.{n}_proj", f"block{{0}}/attn/{n}", "dense") for n in "qkv"],
    (rf"layers\.{_B}\.attention\.o_proj", "block{0}/attn/out", "dense"),
    (rf"layers\.{_B}\.layernorm_before", "block{0}/norm1", "norm"),
    (rf"layers\.{_B}\.layernorm_after", "block{0}/norm2", "norm"),
    (rf"layers\.{_B}\.mlp\.fc([12])", "block{0}/mlp/fc{1}", "dense"),
    (r"layernorm", "norm", "norm"),
    (r"pooler\.dense", "pre_logits", "dense"),
    (r"classifier", HEAD, "dense"),
]  # fmt: skip
_HF_PARAMS = {"embeddings.cls_token": CLS, "embeddings.position_embeddings": POS}

_TIMM_MODULES = [
    (r"patch_embed\.proj", "embed/patch", "conv"),
    (rf"blocks\.{_B}\.norm1", "block{0}/norm1", "norm"),
    (rf"blocks\.{_B}\.attn\.qkv", "block{0}/attn/qkv", "dense"),
    (rf"blocks\.{_B}\.attn\.proj", "block{0}/attn/out", "dense"),
    (rf"blocks\.{_B}\.norm2", "block{0}/norm2", "norm"),
    (rf"blocks\.{_B}\.mlp\.fc([12])", "block{0}/mlp/fc{1}", "dense"),
    (r"norm", "norm", "norm"),
    (r"fc_norm", "fc_norm", "norm"),
    (r"pre_logits\.fc", "pre_logits", "dense"),  # timm < 0.6 in21k checkpoints
    (r"head", HEAD, "dense"),
]
_TIMM_PARAMS = {"cls_token": CLS, "pos_embed": POS}

_BV_BLOCK = rf"Transformer\.encoderblock_{_B}"
_BV_MODULES = [
    (r"embedding", "embed/patch", "conv"),
    (rf"{_BV_BLOCK}\.LayerNorm_0", "block{0}/norm1", "norm"),
    # vit_jax numbers a block's modules 0..3 (MHA_1, LayerNorm_2, MlpBlock_3);
    # big_vision per type (MHA_0, LayerNorm_1, MlpBlock_0).
    *[(rf"{_BV_BLOCK}\.MultiHeadDotProductAttention_[01]\.{n}", f"block{{0}}/attn/{n[0]}",
       "attn_in") for n in ("query", "key", "value")],
    (rf"{_BV_BLOCK}\.MultiHeadDotProductAttention_[01]\.out", "block{0}/attn/out", "attn_out"),
    (rf"{_BV_BLOCK}\.LayerNorm_[12]", "block{0}/norm2", "norm"),
    (rf"{_BV_BLOCK}\.MlpBlock_[03]\.Dense_0", "block{0}/mlp/fc1", "dense"),
    (rf"{_BV_BLOCK}\.MlpBlock_[03]\.Dense_1", "block{0}/mlp/fc2", "dense"),
    (r"Transformer\.encoder_norm", "norm", "norm"),
    (r"pre_logits", "pre_logits", "dense"),
    (r"head", HEAD, "dense"),
]  # fmt: skip
_BV_PARAMS = {"cls": CLS, "Transformer.posembed_input.pos_embedding": POS, "pos_embedding": POS}
_BV_PREFIXES = ("opt/target/", "params/img/", "params/")

SCHEMES = ("hf", "hf_flax", "timm", "big_vision")


def detect_scheme(state: dict) -> str:
    keys = set(state)
    if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys):
        return "hf"
    if any(k.endswith("embeddings/patch_embeddings/projection/kernel") for k in keys):
        return "hf_flax"
    if "patch_embed.proj.weight" in keys:
        return "timm"
    if any(k.endswith("embedding/kernel") for k in keys):
        return "big_vision"
    raise ConfigError(
        f"not a ViT checkpoint tlflax knows (keys such as {sorted(keys)[:6]}); supported "
        f"naming schemes: {', '.join(SCHEMES)} (transformers ViT safetensors/bin, legacy "
        "flax_model.msgpack, timm VisionTransformer, Google vit_jax/big_vision .npz)"
    )


def convert(state: dict[str, np.ndarray], *, spec, shapes: dict[str, tuple[int, ...]]) -> Converted:
    """A ViT checkpoint in tlflax naming, its position embeddings on the model's grid."""
    del spec  # the model's layout is read from `shapes`
    scheme = detect_scheme(state)
    out, ignored = {}, {}
    for source_key, key, value in _normalised(state, scheme):
        name, array = _map(key, np.asarray(value), scheme=scheme)
        if key.startswith("pooler.") and PRE_LOGITS not in shapes:
            ignored[source_key] = (
                "the HF pooler (Dense + tanh on the class token) is unused for classification; "
                "it loads as backbone/pre_logits when the model has representation_size > 0"
            )
        elif name is None:
            out[UNEXPECTED_PREFIX + source_key] = array
        else:
            out[name] = array
    out = _fuse_qkv(out)
    if POS in out and POS in shapes:
        out[POS] = _to_model_grid(out[POS], n_prefix=int(CLS in out), shape=shapes[POS])
    return Converted(out, scheme, ignored)


def _normalised(state: dict, scheme: str):
    """(source key, key '.'-joined without wrapper prefixes, array); big_vision's scanned
    blocks are split into one key per block."""
    for source_key, value in state.items():
        key = source_key
        if scheme == "hf":
            key = key.removeprefix("vit.")
        elif scheme == "hf_flax":
            key = key.removeprefix("params/").removeprefix("vit/")
        elif scheme == "big_vision":
            key = next((key[len(p) :] for p in _BV_PREFIXES if key.startswith(p)), key)
            if key.startswith("Transformer/encoderblock/"):
                # Trained with nn.scan: one array per name, blocks stacked on axis 0.
                rest = key[len("Transformer/encoderblock/") :].replace("/", ".")
                for i, block in enumerate(np.asarray(value)):
                    yield f"{source_key}[{i}]", f"Transformer.encoderblock_{i}.{rest}", block
                continue
        yield source_key, key.replace("/", "."), value


_TABLES = {
    "hf": (_HF_MODULES, _HF_PARAMS, "torch"),
    "hf_flax": (_HF_MODULES, _HF_PARAMS, "flax"),
    "timm": (_TIMM_MODULES, _TIMM_PARAMS, "torch"),
    "big_vision": (_BV_MODULES, _BV_PARAMS, "flax"),
}
_COMPILED = {
    scheme: [(re.compile(p), t, k) for p, t, k in modules]
    for scheme, (modules, _, _) in _TABLES.items()
}


def _map(key: str, array: np.ndarray, *, scheme: str):
    """(tlflax name or None if unknown, the array in Flax layout)."""
    _, params, layout = _TABLES[scheme]
    if key in params:
        return params[key], array
    module, _, leaf = key.rpartition(".")
    for pattern, target, kind in _COMPILED[scheme]:
        m = pattern.fullmatch(module)
        if m is None:
            continue
        converted = _leaf(leaf, array, kind=kind, layout=layout)
        if converted is None:
            return None, array
        target = target.format(*m.groups())
        where = "params/" if target == HEAD else "params/backbone/"
        return f"{where}{target}/{converted[0]}", converted[1]
    return None, array


def _leaf(leaf: str, array: np.ndarray, *, kind: str, layout: str):
    """(tlflax leaf, array in Flax layout), or None for a leaf the module does not have."""
    if layout == "torch":
        if leaf == "bias":
            return "bias", array
        if leaf != "weight":
            return None
        if kind == "norm":
            return "scale", array
        return "kernel", conv_kernel(array) if kind == "conv" else dense_kernel(array)
    if leaf not in ("kernel", "bias", "scale"):
        return None
    # Google's attention keeps heads apart, heads the major index: q/k/v kernel
    # (D, heads, head_dim), bias (heads, head_dim); out kernel (heads, head_dim, D).
    if kind == "attn_in":
        array = array.reshape(-1) if leaf == "bias" else array.reshape(array.shape[0], -1)
    elif kind == "attn_out" and leaf == "kernel":
        array = array.reshape(-1, array.shape[-1])
    return leaf, array


def _fuse_qkv(out: dict) -> dict:
    """block{i}/attn/{q,k,v}/{kernel,bias} -> block{i}/attn/qkv/... ([q | k | v] on the
    output axis). Incomplete triples stay as they are: merge then lists them."""
    parts = re.compile(r"(params/backbone/block\d+/attn/)([qkv])/(kernel|bias)")
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for name in out:
        m = parts.fullmatch(name)
        if m:
            groups.setdefault((m[1], m[3]), {})[m[2]] = name
    for (prefix, leaf), names in groups.items():
        if len(names) == 3:
            arrays = [out.pop(names[n]) for n in "qkv"]
            out[f"{prefix}qkv/{leaf}"] = np.concatenate(arrays, axis=-1)
    return out


def _to_model_grid(pos: np.ndarray, *, n_prefix: int, shape: tuple[int, ...]) -> np.ndarray:
    """The checkpoint's position embeddings resampled to the model's grid, when both are
    square grids of the same width behind the same prefix; otherwise unchanged (a real
    mismatch, which merge reports)."""
    if pos.ndim == 2:  # some big_vision checkpoints drop the leading 1
        pos = pos[None]
    if pos.ndim != 3 or len(shape) != 3 or pos.shape[-1] != shape[-1] or pos.shape == shape:
        return pos
    side, model_side = (math.isqrt(n - n_prefix) for n in (pos.shape[1], shape[1]))
    if side * side != pos.shape[1] - n_prefix or model_side**2 != shape[1] - n_prefix:
        return pos
    log.info("vit: position embeddings resampled from a %dx%d to a %dx%d grid",
             side, side, model_side, model_side)  # fmt: skip
    return vit.resample_pos_embed(pos, n_prefix=n_prefix, grid=(model_side, model_side))
