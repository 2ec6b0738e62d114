"""Vision Transformer (ViT) in flax.linen: Google vit_jax / big_vision, timm and HF numerics.

Pre-norm blocks, a fused qkv projection (one matmul), jax.nn.dot_product_attention (on the
CPU: heads_attention, the same numbers) and the exact (erf) GELU. `dtype` is the compute
dtype of the matmuls; parameters, LayerNorms and the residual stream stay float32.

Names: backbone/embed/{patch/{kernel,bias}, cls, pos}, backbone/block{i}/{norm1, attn/qkv,
attn/out, norm2, mlp/fc1, mlp/fc2} (i from 0), backbone/norm | backbone/fc_norm,
backbone/pre_logits (when representation_size > 0), head/out.
`pos` is (1, n_prefix + gh * gw, width), the class token's row first; its grid is fixed by the
resolution the variables were initialised at (`spec.init(rng, resolution)`). Weights made at
another grid are resampled by the converter (`resample_pos_embed`, bicubic as timm).

Options (`create_model(..., **overrides)`):
  patch, width, depth, heads   patch side, token width, blocks, attention heads
  mlp_dim            hidden width of each MLP (default 4 x width)
  pool               'cls': the class token's output | 'gap': mean of the patch tokens
  class_token        prepend a learned class token (default: True for 'cls', False for 'gap';
                     timm's global_pool='avg' models keep one: pass class_token=True)
  gap_norm           where the final LayerNorm sits for pool='gap':
                     'tokens' (big_vision): LayerNorm every token, then mean -> backbone/norm
                     'pooled' (timm global_pool='avg'): mean, then LayerNorm -> backbone/fc_norm
  norm_eps           LayerNorm epsilon: 1e-6 (timm, big_vision); HF checkpoints use 1e-12
  qkv_bias           biases on the q, k, v projections
  representation_size  pre-logits Dense + tanh of the original vit_jax in21k checkpoints
                     (the HF ViTModel pooler); 0 = none
  drop_path_rate     stochastic depth at the last block, linear from 0 (timm's rule); train only
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tlflax import preprocessing as pp
from tlflax.errors import ConfigError
from tlflax.models import common, layers

POOLS = ("cls", "gap")
GAP_NORMS = ("tokens", "pooled")
DEFAULTS = {
    "patch": 16,
    "width": 768,
    "depth": 12,
    "heads": 12,
    "mlp_dim": None,  # 4 x width
    "pool": "cls",
    "class_token": None,  # pool == 'cls'
    "gap_norm": "tokens",
    "norm_eps": 1e-6,
    "qkv_bias": True,
    "representation_size": 0,
    "drop_path_rate": 0.0,
}
_SIZES = {"ti": (192, 12, 3), "s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16)}
ARCHS = {
    f"vit_{size}{patch}": {"patch": patch, "width": width, "depth": depth, "heads": heads}
    for size, (width, depth, heads) in _SIZES.items()
    for patch in (16, 32)
}
# Tests: 4x4 patches of a 32-px image, two blocks; compiles in about a second.
ARCHS["vit_tiny"] = {"patch": 8, "width": 32, "depth": 2, "heads": 4}
RESOLUTION = {"vit_tiny": 32}  # default input side (224 otherwise)

_dense_init = nn.initializers.xavier_uniform()


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, name=name)


class Embed(nn.Module):
    """Patches -> tokens, the class token in front, plus position embeddings."""

    patch: int
    width: int
    class_token: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        _check_divisible(x.shape[1:3], self.patch)
        p = self.patch
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    name="patch")(x.astype(self.dtype))  # fmt: skip
        b, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d).astype(jnp.float32)
        n_prefix = int(self.class_token)
        if self.class_token:
            cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
            x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
        if self.has_variable("params", "pos"):
            # Checked here: flax's own shape error would not say how to fix it.
            have = self.get_variable("params", "pos").shape[1] - n_prefix
            if have != gh * gw:
                raise ConfigError(_grid_error(have, (gh, gw), self.patch))
        pos = self.param("pos", nn.initializers.normal(0.02), (1, n_prefix + gh * gw, d))
        return x + pos


def _check_divisible(hw, patch: int):
    if hw[0] % patch or hw[1] % patch:
        raise ConfigError(
            f"vit: a {hw[0]}x{hw[1]} input does not split into {patch}x{patch} patches; "
            f"use a resolution that is a multiple of {patch} (e.g. {hw[0] // patch * patch})"
        )


def _grid_error(n_patches: int, grid: tuple[int, int], patch: int) -> str:
    side = math.isqrt(n_patches)
    have = f"{side}x{side}" if side * side == n_patches else f"{n_patches}-patch"
    px = f" ({side * patch} px at patch {patch})" if side * side == n_patches else ""
    h, w = grid[0] * patch, grid[1] * patch
    return (
        f"vit: the position embeddings (backbone/embed/pos) hold a {have} grid{px}, but the "
        f"{h}x{w} input gives a {grid[0]}x{grid[1]} grid. Initialise the model at this "
        f"resolution (spec.init(rng, resolution={h})) and load the weights again: the "
        "converter resamples the position embeddings to the model's grid."
    )


class Attention(nn.Module):
    heads: int
    qkv_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        # One matmul for q, k and v: [q | k | v] along the output, each head-major (timm's).
        qkv = nn.Dense(3 * d, use_bias=self.qkv_bias, dtype=self.dtype, kernel_init=_dense_init,
                       name="qkv")(x)  # fmt: skip
        y = attention(qkv.reshape(b, t, 3, self.heads, d // self.heads)).reshape(b, t, d)
        return nn.Dense(d, dtype=self.dtype, kernel_init=_dense_init, name="out")(y)


def attention(qkv, *, impl: str | None = None):
    """Softmax attention of qkv (batch, tokens, 3, heads, head_dim) -> (batch, tokens,
    heads, head_dim): softmax(q k^T / sqrt(head_dim)) v per head, logits and softmax in
    float32 whatever the compute dtype.

    impl 'xla': jax.nn.dot_product_attention (cuDNN's fused kernels where jax finds them);
    'heads': heads_attention, the CPU's (see there); None: 'heads' when the default backend
    is the CPU, else 'xla'."""
    impl = impl or ("heads" if jax.default_backend() == "cpu" else "xla")
    if impl not in ("heads", "xla"):
        raise ValueError(f"attention impl {impl!r}: 'heads', 'xla' or None")
    if impl == "heads":
        return heads_attention(qkv)
    q, k, v = jnp.moveaxis(qkv, 2, 0)
    return jax.nn.dot_product_attention(q, k, v)


def heads_attention(qkv):
    """attention() on the CPU: q, k and v are laid out heads-major (batch, heads, tokens,
    head_dim) by one transpose, so that each product is a batched matrix product over
    contiguous rows, and the softmax's division comes after the product with v, on the
    (tokens, head_dim) output rather than on the (tokens, tokens) probabilities.
    jax.nn.dot_product_attention on XLA's CPU backend takes twice as long for ViT-B/16's
    attention forward, 1.2x with the gradient (benchmarks/attention.py); the numbers are
    the same to float32 rounding
    (tests/test_vit.py checks it against jax.nn.dot_product_attention, forward and
    gradients)."""
    q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))  # each (batch, heads, tokens, head_dim)
    f32 = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=f32)
    logits = logits * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), f32)
    # Shifting by the row maximum changes no value and needs no gradient.
    e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    out = jnp.einsum("bhqk,bhkd->bhqd", e.astype(v.dtype), v, preferred_element_type=f32)
    out = out / jnp.sum(e, axis=-1, keepdims=True)
    return jnp.transpose(out.astype(v.dtype), (0, 2, 1, 3))


class Mlp(nn.Module):
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_dense_init, name="fc1")(x)
        x = gelu(x)
        return nn.Dense(d, dtype=self.dtype, kernel_init=_dense_init, name="fc2")(x)


def gelu(x):
    """The exact GELU, x * Phi(x), written as PyTorch computes it (HF and timm use it):
    0.5 x (1 + erf(x / sqrt(2))). jax.nn.gelu(approximate=False) writes it with erfc, which
    XLA's CPU backend computes in three passes over the MLP's activation instead of one."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(1.0 / math.sqrt(2.0), x.dtype)))


class Block(nn.Module):
    heads: int
    mlp_dim: int
    norm_eps: float
    qkv_bias: bool = True
    drop_path: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        y = _layer_norm(self.norm_eps, "norm1")(x)
        y = Attention(self.heads, self.qkv_bias, self.dtype, name="attn")(y)
        x = x + self._drop(y, train=train)
        y = _layer_norm(self.norm_eps, "norm2")(x)
        y = Mlp(self.mlp_dim, self.dtype, name="mlp")(y)
        return x + self._drop(y, train=train)

    def _drop(self, y, *, train: bool):
        # The residual stream stays float32; bf16 branches are added into it.
        y = y.astype(jnp.float32)
        if not train or self.drop_path == 0:
            return y
        keep = 1.0 - self.drop_path
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (y.shape[0], 1, 1))
        return jnp.where(mask, y / keep, 0.0)


class VisionTransformer(nn.Module):
    """Backbone: normalised NHWC images -> pooled features (B, D), float32."""

    patch: int
    width: int
    depth: int
    heads: int
    mlp_dim: int
    pool: str = "cls"
    class_token: bool = True
    gap_norm: str = "tokens"
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    representation_size: int = 0
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    remat: bool = False  # blocks recomputed in the backward pass (layers.block_call)

    @nn.compact
    def __call__(self, x, *, train: bool = False, bn_train: bool = False):
        del bn_train  # no BatchNorm in a ViT
        x = Embed(self.patch, self.width, self.class_token, self.dtype, name="embed")(x)
        for i in range(self.depth):
            rate = self.drop_path_rate * i / max(self.depth - 1, 1)
            block = Block(self.heads, self.mlp_dim, self.norm_eps, self.qkv_bias, rate,
                          self.dtype, name=f"block{i}")  # fmt: skip
            x = layers.block_call(block, x, remat=self.remat, train=train)
        x = self._pool(x)
        if self.representation_size:
            dense = nn.Dense(self.representation_size, dtype=self.dtype, name="pre_logits")
            x = jnp.tanh(dense(x)).astype(jnp.float32)
        return x

    def _pool(self, x):
        if self.pool == "cls":
            return _layer_norm(self.norm_eps, "norm")(x)[:, 0]
        patches = slice(int(self.class_token), None)  # the class token is not averaged
        if self.gap_norm == "tokens":
            return jnp.mean(_layer_norm(self.norm_eps, "norm")(x)[:, patches], axis=1)
        return _layer_norm(self.norm_eps, "fc_norm")(jnp.mean(x[:, patches], axis=1))


def resample_pos_embed(pos: np.ndarray, *, n_prefix: int, grid: tuple[int, int]) -> np.ndarray:
    """(1, n_prefix + s*s, D) position embeddings -> (1, n_prefix + gh*gw, D).

    The patch part (row-major s x s grid) is resized bicubically with antialiasing (the same
    as timm's resample_abs_pos_embed, its default); the prefix (class token) rows are kept.
    """
    pos = np.asarray(pos)
    n_patches = pos.shape[1] - n_prefix if pos.ndim == 3 else -1
    side = math.isqrt(max(n_patches, 0))
    if pos.shape[0] != 1 or n_patches < 1 or side * side != n_patches:
        raise ValueError(
            f"position embeddings of shape {pos.shape} with {n_prefix} prefix token(s) are not "
            "(1, prefix + side*side, D); cannot resample them to a new grid"
        )
    if (side, side) == tuple(grid):
        return pos
    d = pos.shape[-1]
    patches = pos[0, n_prefix:].reshape(side, side, d).astype(np.float32)
    resized = jax.image.resize(patches, (grid[0], grid[1], d), method="cubic", antialias=True)
    resized = np.asarray(resized).reshape(1, grid[0] * grid[1], d).astype(pos.dtype)
    return np.concatenate([pos[:, :n_prefix], resized], axis=1)


def _validated(arch: dict) -> dict:
    arch = dict(arch)
    if arch["pool"] not in POOLS:
        raise ConfigError(f"vit: pool={arch['pool']!r}; use one of {POOLS}")
    if arch["gap_norm"] not in GAP_NORMS:
        raise ConfigError(f"vit: gap_norm={arch['gap_norm']!r}; use one of {GAP_NORMS}")
    if arch["class_token"] is None:
        arch["class_token"] = arch["pool"] == "cls"
    if arch["pool"] == "cls" and not arch["class_token"]:
        raise ConfigError("vit: pool='cls' needs class_token=True; or use pool='gap'")
    arch["mlp_dim"] = arch["mlp_dim"] or 4 * arch["width"]
    counts = {k: arch[k] for k in ("patch", "width", "depth", "heads", "mlp_dim")}
    if any(int(n) != n or n < 1 for n in counts.values()):
        raise ConfigError(f"vit: {counts} must all be positive integers")
    if arch["width"] % arch["heads"]:
        raise ConfigError(
            f"vit: width {arch['width']} is not divisible by heads {arch['heads']}; "
            "each head gets width / heads channels"
        )
    rep = arch["representation_size"]
    if int(rep) != rep or rep < 0:
        raise ConfigError(f"vit: representation_size must be an integer >= 0 (0: none), got {rep}")
    if not arch["norm_eps"] > 0:
        raise ConfigError(f"vit: norm_eps must be > 0, got {arch['norm_eps']}")
    if not 0 <= arch["drop_path_rate"] < 1:
        raise ConfigError(f"vit: drop_path_rate must be in [0, 1), got {arch['drop_path_rate']}")
    return {
        **arch,
        **{k: int(v) for k, v in counts.items()},
        "class_token": bool(arch["class_token"]),
        "norm_eps": float(arch["norm_eps"]),
        "qkv_bias": bool(arch["qkv_bias"]),
        "representation_size": int(arch["representation_size"]),
        "drop_path_rate": float(arch["drop_path_rate"]),
    }


_BLOCK = re.compile(r"backbone/block(\d+)/.+")
_TOP = ("backbone/norm/", "backbone/fc_norm/", "backbone/pre_logits/")


def layer_of(name: str, *, depth: int) -> int:
    """Depth of a parameter: embed 0, block i -> i + 1, final norm / pre_logits -> depth
    (with the last block), head -> depth + 1. A leading 'params/' is allowed."""
    path = name.removeprefix("params/")
    if path.startswith("head/"):
        return depth + 1
    if path.startswith("backbone/embed/"):
        return 0
    if path.startswith(_TOP):
        return depth
    m = _BLOCK.fullmatch(path)
    if m and int(m[1]) < depth:
        return int(m[1]) + 1
    raise ValueError(
        f"vit depth={depth}: no parameter {name!r}; names are 'backbone/embed/...', "
        "'backbone/block<i>/...' (i < depth), 'backbone/{norm,fc_norm,pre_logits}/...' "
        "or 'head/...'"
    )


def build(
    name: str, *, head: nn.Module, dtype: Any = jnp.float32, remat: bool = False, **overrides
) -> common.ModelSpec:
    """The registered builder: ARCHS[name] with `overrides` (see the module docstring)."""
    common.check_overrides("vit", overrides, DEFAULTS)
    arch = _validated({**DEFAULTS, **ARCHS[name], **overrides})
    backbone = VisionTransformer(**arch, dtype=dtype, remat=remat)
    depth = arch["depth"]
    position = functools.partial(layer_of, depth=depth)
    return common.ModelSpec(
        name=name,
        family="vit",
        module=common.Classifier(backbone=backbone, head=head),
        preprocessing=pp.minus_one_to_one(RESOLUTION.get(name, 224)),
        n_stages=depth + 1,
        stage_of=position,
        n_layers=depth + 1,
        layer_of=position,
        feature_dim=arch["representation_size"] or arch["width"],
        arch=arch,
    )


for _name in ARCHS:
    common.register(_name)(functools.partial(build, _name))


def overrides_from_hf_config(config: Mapping) -> dict:
    """Model options that rebuild a transformers ViTConfig (its config.json as a dict)."""
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"ViTConfig.hidden_act={act!r}: tlflax's ViT uses exact 'gelu'")
    width = int(config.get("hidden_size", 768))
    return {
        "patch": int(config.get("patch_size", 16)),
        "width": width,
        "depth": int(config.get("num_hidden_layers", 12)),
        "heads": int(config.get("num_attention_heads", 12)),
        "mlp_dim": int(config.get("intermediate_size", 4 * width)),
        "norm_eps": float(config.get("layer_norm_eps", 1e-12)),
        "qkv_bias": bool(config.get("qkv_bias", True)),
    }
