"""ConvNeXt (Liu et al., 2022, "A ConvNet for the 2020s") in flax.linen: timm / Hugging Face
transformers / facebookresearch numerics.

A 4x4 stride-4 patch conv + LayerNorm stem; stages of blocks, each stage after the first
opened by a downsample (LayerNorm, 2x2 stride-2 conv); a block is a 7x7 depthwise conv
(bias, padding 3), LayerNorm, Linear to 4x, exact (erf) GELU, Linear back, a per-channel
layer scale (gamma) and stochastic depth, added to its input. The features are the global
average of the last map, then a LayerNorm (timm's head.norm, HF's convnext.layernorm): that
norm belongs to the backbone, the tlflax head is the linear layer. Strided convs floor the
map like PyTorch's (padding 0); LayerNorms, layer scale and the residual stream stay float32,
`dtype` is the compute dtype of the convs and matmuls.

Names: backbone/stem/{conv,norm}, backbone/stage{i}/downsample/{norm,conv} (i >= 2),
backbone/stage{i}/block{j}/{dwconv, norm, fc1, fc2, gamma} (i, j from 1), backbone/norm,
head/out.
Options (`create_model(..., **overrides)`):
  depths          blocks per stage, e.g. (3, 3, 9, 3)
  dims            per-stage channels, e.g. (96, 192, 384, 768)
  patch           the stem's patch side (stride) (4)
  norm_eps        epsilon of every LayerNorm but the last (1e-6: timm, HF, the paper's code)
  head_norm_eps   epsilon of the final LayerNorm on the pooled features (1e-6: timm and the
                  paper's code; transformers' ConvNextConfig.layer_norm_eps is 1e-12, which
                  `overrides_from_hf_config` reads)
  layer_scale_init  gamma's initial value (1e-6; random init only)
  drop_path_rate  stochastic depth at the last block, linear from 0 over all blocks (timm's
                  and HF's rule; 0 by default as when timm fine-tunes); train only
  depthwise       how the 7x7 depthwise convs compute (same parameters, same numbers):
                  'auto' (shifted slices on the CPU, XLA's grouped conv elsewhere) | 'shift' |
                  'conv'. On the CPU the shifts run faster on real maps (56 x 56) but compile
                  slower (a few seconds per block for the gradient); 'conv' suits tiny maps.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from tlflax import preprocessing as pp
from tlflax.errors import ConfigError
from tlflax.models import common, layers

KERNEL = 7  # the depthwise conv's side
MLP_RATIO = 4
DEFAULTS = {
    "depths": (3, 3, 9, 3),
    "dims": (96, 192, 384, 768),
    "patch": 4,
    "norm_eps": 1e-6,
    "head_norm_eps": 1e-6,
    "layer_scale_init": 1e-6,
    "drop_path_rate": 0.0,
    "depthwise": "auto",
}
DEPTHWISE = ("auto", "shift", "conv")
ARCHS = {
    "convnext_tiny": {"depths": (3, 3, 9, 3), "dims": (96, 192, 384, 768)},
    "convnext_small": {"depths": (3, 3, 27, 3), "dims": (96, 192, 384, 768)},
    "convnext_base": {"depths": (3, 3, 27, 3), "dims": (128, 256, 512, 1024)},
    "convnext_large": {"depths": (3, 3, 27, 3), "dims": (192, 384, 768, 1536)},
    # Tests: two stages of one block (a downsample between them), a few channels; 32 px
    # gives a 4x4 last map. Its forward pass compiles in about a second, a training step in
    # a few (with depthwise='conv': the shifts' gradient compiles for seconds per block).
    "convnext_test": {"depths": (1, 1), "dims": (8, 16)},
}
RESOLUTION = {"convnext_test": 32}  # default input side (224 otherwise)

# timm's and HF's init: truncated normal (std 0.02) for every conv and linear, zero biases.
_init = nn.initializers.truncated_normal(0.02)


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
    # Two-pass variance: ConvNeXt's residual stream grows large (|mean| >> std in places),
    # where E[x^2] - E[x]^2 in float32 loses the digits PyTorch keeps.
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, use_fast_variance=False, name=name)


class PatchConv(nn.Module):
    """A p x p conv with stride p and no padding (the stem, the downsamples) as one matmul
    over non-overlapping patches: nn.Conv's `kernel` (p, p, in, out) and `bias`, the same
    numbers (a map not divisible by p loses its last rows / columns, as PyTorch's floor).
    XLA's CPU backend differentiates the dot faster than the conv: a 2x2 downsample of a
    56 x 56 x 96 batch of 32 to 192 channels, 0.32 s vs 0.81 s per gradient (the 4x4 stem:
    the same time either way)."""

    features: int
    patch: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.patch
        b, h, w, c = x.shape
        kernel = self.param("kernel", _init, (p, p, c, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        gh, gw = h // p, w // p
        x = x[:, : gh * p, : gw * p].reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, gh, gw, p * p * c).astype(self.dtype)
        y = jnp.dot(x, kernel.reshape(p * p * c, self.features).astype(self.dtype))
        return y + bias.astype(y.dtype)


class Block(nn.Module):
    """x + drop_path(gamma * fc2(gelu(fc1(norm(dwconv(x))))))."""

    norm_eps: float
    layer_scale_init: float
    drop_path: float = 0.0
    depthwise: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        dim = x.shape[-1]
        dwconv = layers.DepthwiseConv(
            KERNEL, padding="symmetric", impl=self.depthwise, use_bias=True, kernel_init=_init,
            dtype=self.dtype, name="dwconv",
        )  # fmt: skip
        y = _layer_norm(self.norm_eps, "norm")(dwconv(x).astype(jnp.float32))
        y = nn.Dense(MLP_RATIO * dim, dtype=self.dtype, kernel_init=_init, name="fc1")(y)
        y = nn.gelu(y, approximate=False)  # PyTorch's nn.GELU default: exact erf
        y = nn.Dense(dim, dtype=self.dtype, kernel_init=_init, name="fc2")(y)
        gamma = self.param("gamma", nn.initializers.constant(self.layer_scale_init), (dim,))
        y = y.astype(jnp.float32) * gamma
        if train and self.drop_path > 0:
            y = layers.drop_path(y, rate=self.drop_path, rng=self.make_rng("dropout"))
        return x + y


class PatchNorm(nn.Module):
    """The stem (conv, then LayerNorm) or a downsample (LayerNorm, then conv): `conv` a
    `patch` x `patch` conv of stride `patch`, `norm` a LayerNorm."""

    dim: int
    patch: int
    norm_first: bool
    norm_eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.norm_first:
            x = _layer_norm(self.norm_eps, "norm")(x)
        x = PatchConv(self.dim, self.patch, self.dtype, name="conv")(x).astype(jnp.float32)
        if not self.norm_first:
            x = _layer_norm(self.norm_eps, "norm")(x)
        return x


class Stage(nn.Module):
    """A downsample (LayerNorm, 2x2 stride-2 conv) unless it is the first stage, then blocks."""

    dim: int
    drop_paths: tuple[float, ...]
    downsample: bool
    norm_eps: float
    layer_scale_init: float
    depthwise: str = "auto"
    dtype: Any = jnp.float32
    remat: bool = False  # blocks recomputed in the backward pass (layers.block_call)

    @nn.compact
    def __call__(self, x, *, train: bool):
        if self.downsample:
            if min(x.shape[1:3]) < 2:
                raise ConfigError(
                    f"convnext: {self.name}'s downsample got a {x.shape[1]}x{x.shape[2]} map, "
                    "too small to halve; use a larger input (every stage after the first "
                    "halves the stem's map: at least 32 px for four stages)"
                )
            x = PatchNorm(self.dim, 2, True, self.norm_eps, self.dtype, name="downsample")(x)
        for j, rate in enumerate(self.drop_paths, 1):
            block = Block(self.norm_eps, self.layer_scale_init, rate, self.depthwise, self.dtype,
                          name=f"block{j}")  # fmt: skip
            x = layers.block_call(block, x, remat=self.remat, train=train)
        return x


class ConvNeXt(nn.Module):
    """Backbone: normalised NHWC images -> pooled, normalised features (B, dims[-1]), float32."""

    depths: tuple[int, ...]
    dims: tuple[int, ...]
    patch: int = 4
    norm_eps: float = 1e-6
    head_norm_eps: float = 1e-6
    layer_scale_init: float = 1e-6
    drop_path_rate: float = 0.0
    depthwise: str = "auto"
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, *, train: bool = False, bn_train: bool = False):
        del bn_train  # no BatchNorm in a ConvNeXt
        if min(x.shape[1:3]) < self.patch:
            raise ConfigError(
                f"convnext: a {x.shape[1]}x{x.shape[2]} input is smaller than the stem's "
                f"{self.patch}x{self.patch} patch; use a larger input"
            )
        stem = PatchNorm(self.dims[0], self.patch, False, self.norm_eps, self.dtype, name="stem")
        x = stem(x.astype(jnp.float32))
        rates = drop_path_rates(self.drop_path_rate, self.depths)
        for i, dim in enumerate(self.dims):
            stage = Stage(dim, rates[i], i > 0, self.norm_eps, self.layer_scale_init,
                          self.depthwise, self.dtype, self.remat, name=f"stage{i + 1}")  # fmt: skip
            x = stage(x, train=train)
        return _layer_norm(self.head_norm_eps, "norm")(jnp.mean(x, axis=(1, 2)))


def drop_path_rates(rate: float, depths) -> list[tuple[float, ...]]:
    """Per stage, per block: linear from 0 at the first block to `rate` at the last (timm's
    calculate_drop_path_rates, HF's linspace over all blocks)."""
    n_blocks = sum(depths)
    flat = [rate * k / max(n_blocks - 1, 1) for k in range(n_blocks)]
    out, start = [], 0
    for depth in depths:
        out.append(tuple(flat[start : start + depth]))
        start += depth
    return out


def _validated(arch: dict) -> dict:
    try:
        depths = tuple(int(d) for d in arch["depths"])
        dims = tuple(int(d) for d in arch["dims"])
        ok = depths == tuple(arch["depths"]) and dims == tuple(arch["dims"])
    except (TypeError, ValueError):
        depths = dims = ()
        ok = False
    if not ok or not depths or len(depths) != len(dims) or min(depths + dims) < 1:
        raise ConfigError(
            f"convnext: depths {arch['depths']} and dims {arch['dims']} need one positive "
            "integer per stage each, e.g. depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)"
        )
    if int(arch["patch"]) != arch["patch"] or arch["patch"] < 1:
        raise ConfigError(f"convnext: patch must be a positive integer, got {arch['patch']}")
    for key in ("norm_eps", "head_norm_eps", "layer_scale_init"):
        if not arch[key] > 0:
            raise ConfigError(f"convnext: {key} must be > 0, got {arch[key]}")
    if arch["depthwise"] not in DEPTHWISE:
        raise ConfigError(f"convnext: depthwise={arch['depthwise']!r}; use one of {DEPTHWISE}")
    if not 0 <= arch["drop_path_rate"] < 1:
        raise ConfigError(
            f"convnext: drop_path_rate must be in [0, 1), got {arch['drop_path_rate']}"
        )
    return {
        **arch,
        "depths": depths,
        "dims": dims,
        "patch": int(arch["patch"]),
        **{k: float(arch[k]) for k in ("norm_eps", "head_norm_eps", "layer_scale_init")},
        "drop_path_rate": float(arch["drop_path_rate"]),
    }


_STAGE_PATH = re.compile(r"backbone/stage(\d+)/(downsample|block(\d+))/.+")


def position(name: str, *, depths: tuple[int, ...]) -> tuple[int, int]:
    """(stage, layer) of a parameter name. Stages: stem 0, stage i's downsample and blocks i,
    the final norm with the last stage, head len(depths) + 1. Layers (timm's group_matcher):
    stem 0, block j of stage i its running index from 1, a downsample with its stage's first
    block, the final norm with the last block, head sum(depths) + 1. A leading collection
    ('params/') is allowed."""
    path = re.sub(r"^(params|batch_stats)/", "", name)
    n_blocks = sum(depths)
    if path.startswith("head/"):
        return len(depths) + 1, n_blocks + 1
    if path.startswith("backbone/stem/"):
        return 0, 0
    if path.startswith("backbone/norm/"):
        return len(depths), n_blocks
    m = _STAGE_PATH.fullmatch(path)
    if m and 1 <= int(m[1]) <= len(depths):
        stage = int(m[1])
        block = 1 if m[2] == "downsample" else int(m[3])
        if (m[2] != "downsample" or stage > 1) and 1 <= block <= depths[stage - 1]:
            return stage, sum(depths[: stage - 1]) + block
    raise ValueError(
        f"convnext {depths=}: no parameter {name!r}; names are 'backbone/stem/...', "
        "'backbone/stage<i>/block<j>/...' (within depths), 'backbone/stage<i>/downsample/...' "
        "(i >= 2), 'backbone/norm/...' or 'head/...'"
    )


def _stage_of(name: str, *, depths) -> int:
    return position(name, depths=depths)[0]


def _layer_of(name: str, *, depths) -> int:
    return position(name, depths=depths)[1]


def build(
    name: str, *, head: nn.Module, dtype: Any = jnp.float32, remat: bool = False, **overrides
) -> common.ModelSpec:
    """The registered builder: ARCHS[name] with `overrides` (see the module docstring)."""
    common.check_overrides("convnext", overrides, DEFAULTS)
    arch = _validated({**DEFAULTS, **ARCHS[name], **overrides})
    depths = arch["depths"]
    return common.ModelSpec(
        name=name,
        family="convnext",
        module=common.Classifier(backbone=ConvNeXt(**arch, dtype=dtype, remat=remat), head=head),
        preprocessing=pp.imagenet(RESOLUTION.get(name, 224)),
        n_stages=len(depths) + 1,
        stage_of=functools.partial(_stage_of, depths=depths),
        n_layers=sum(depths) + 1,
        layer_of=functools.partial(_layer_of, depths=depths),
        feature_dim=arch["dims"][-1],
        arch=arch,
    )


for _name in ARCHS:
    common.register(_name)(functools.partial(build, _name))


def overrides_from_hf_config(config: Mapping) -> dict:
    """Model options that rebuild a transformers ConvNextConfig (its config.json as a dict).
    What this ConvNeXt does not implement raises, naming it."""
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"ConvNextConfig.hidden_act={act!r}: tlflax's ConvNeXt uses exact 'gelu'")
    scale = config.get("layer_scale_init_value", 1e-6)
    if not scale > 0:
        raise ValueError(
            f"ConvNextConfig.layer_scale_init_value={scale}: tlflax's ConvNeXt always has a "
            "layer scale (gamma)"
        )
    if int(config.get("num_channels", 3)) != 3:
        raise ValueError(f"ConvNextConfig.num_channels={config['num_channels']}: tlflax reads RGB")
    return {
        "depths": tuple(int(d) for d in config.get("depths", DEFAULTS["depths"])),
        "dims": tuple(int(d) for d in config.get("hidden_sizes", DEFAULTS["dims"])),
        "patch": int(config.get("patch_size", 4)),
        "head_norm_eps": float(config.get("layer_norm_eps", 1e-12)),
    }
