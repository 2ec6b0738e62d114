"""ResNet v1.5 in flax.linen: torchvision / timm / Hugging Face microsoft/resnet-* numerics.

v1.5 means a bottleneck block strides on its 3x3 conv (v1 strode on the first 1x1).
Padding is explicit and symmetric everywhere: flax's 'SAME' pads a stride-2 conv on the
bottom/right only, PyTorch pads both sides, and the two disagree on every pixel after it.

Names: backbone/stem/{conv,bn}, backbone/stage{i}/block{j}/{conv1,bn1,conv2,bn2[,conv3,bn3]},
backbone/stage{i}/block{j}/downsample/{conv,bn} (i, j from 1), head/out.
Options (`create_model(..., **overrides)`):
  block        'basic' (two 3x3 convs) | 'bottleneck' (1x1, 3x3, 1x1; output 4 x width)
  depths       blocks per stage, e.g. (3, 4, 6, 3)
  widths       per-stage width (torchvision 'planes', timm `channels`): the bottleneck's
               inner width, whose output is 4 x width; a transformers config's
               `hidden_sizes` are the output widths (see `overrides_from_hf_config`)
  stem_width   channels of the 7x7 stem conv (transformers' `embedding_size`)
  bn_eps       BatchNorm epsilon (PyTorch's 1e-5)
  drop_path_rate  stochastic depth at the last block, linear from 0 (timm's rule); train only
  zero_init_last  start each block's last BatchNorm scale at 0 (random init only)
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tlflax import preprocessing as pp
from tlflax.errors import ConfigError
from tlflax.models import common, layers

EXPANSION = {"basic": 1, "bottleneck": 4}  # block -> output width / width
DEFAULTS = {
    "block": "basic",
    "depths": (2, 2, 2, 2),
    "widths": (64, 128, 256, 512),
    "stem_width": 64,
    "bn_eps": 1e-5,
    "drop_path_rate": 0.0,
    "zero_init_last": True,
}
ARCHS = {
    "resnet18": {"block": "basic", "depths": (2, 2, 2, 2)},
    "resnet34": {"block": "basic", "depths": (3, 4, 6, 3)},
    "resnet50": {"block": "bottleneck", "depths": (3, 4, 6, 3)},
    "resnet101": {"block": "bottleneck", "depths": (3, 4, 23, 3)},
    "resnet152": {"block": "bottleneck", "depths": (3, 8, 36, 3)},
    # Tests: four stages, one block each, a few channels; compiles in about a second.
    "resnet_tiny": {"block": "basic", "depths": (1, 1, 1, 1), "widths": (8, 16, 24, 32),
                    "stem_width": 8},
}  # fmt: skip

# torchvision / timm initialise convs with kaiming_normal_(mode='fan_out', relu).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features: int, kernel: int, *, stride: int = 1, dtype, name: str) -> nn.Module:
    if kernel == 1:
        return layers.PointwiseConv(
            features, stride=stride, dtype=dtype, kernel_init=_conv_init, name=name
        )
    pad = kernel // 2
    return layers.Conv(
        features,
        kernel,
        stride=stride,
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        kernel_init=_conv_init,
        name=name,
    )


def _conv_norm(conv, x, *, bn_train: bool, eps: float, dtype, name: str, zero_scale=False):
    """BatchNorm `name` of conv(x), folded into the conv when frozen (layers.conv_norm)."""
    scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
    # flax momentum 0.9 keeps 0.9 of the running average: PyTorch's momentum=0.1.
    norm = functools.partial(
        nn.BatchNorm,
        use_running_average=not bn_train,
        momentum=0.9,
        epsilon=eps,
        dtype=dtype,
        scale_init=scale_init,
        name=name,
    )
    return layers.conv_norm(
        conv, x, bn_train=bn_train, norm=norm, name=name, eps=eps, scale_init=scale_init
    )


class ConvBN(nn.Module):
    """A conv and its BatchNorm under one name (the stem and the shortcut projection)."""

    features: int
    kernel: int
    stride: int
    bn_eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, bn_train: bool):
        conv = _conv(self.features, self.kernel, stride=self.stride, dtype=self.dtype, name="conv")
        return _conv_norm(conv, x, bn_train=bn_train, eps=self.bn_eps, dtype=self.dtype, name="bn")


class Block(nn.Module):
    width: int
    block: str  # 'basic' | 'bottleneck'
    stride: int
    bn_eps: float
    drop_path: float = 0.0
    zero_init_last: bool = True
    dtype: Any = jnp.float32

    def _layers(self) -> list[tuple[int, int, int]]:
        """(features, kernel, stride) of each conv; v1.5 strides on the 3x3."""
        out = self.width * EXPANSION[self.block]
        if self.block == "basic":
            return [(self.width, 3, self.stride), (out, 3, 1)]
        return [(self.width, 1, 1), (self.width, 3, self.stride), (out, 1, 1)]

    @nn.compact
    def __call__(self, x, *, train: bool, bn_train: bool):
        layers = self._layers()
        y = x
        for i, (features, kernel, stride) in enumerate(layers, 1):
            last = i == len(layers)
            conv = _conv(features, kernel, stride=stride, dtype=self.dtype, name=f"conv{i}")
            y = _conv_norm(
                conv,
                y,
                bn_train=bn_train,
                eps=self.bn_eps,
                dtype=self.dtype,
                name=f"bn{i}",
                zero_scale=last and self.zero_init_last,  # the block starts as the identity
            )
            y = y if last else nn.relu(y)
        out = layers[-1][0]
        if self.stride != 1 or x.shape[-1] != out:
            shortcut = ConvBN(out, 1, self.stride, self.bn_eps, self.dtype, name="downsample")
            x = shortcut(x, bn_train=bn_train)
        if train and self.drop_path > 0:
            y = _drop_path(y, rate=self.drop_path, rng=self.make_rng("dropout"))
        return nn.relu(x + y)


def _drop_path(y, *, rate: float, rng: jax.Array):
    """Drops the residual branch of whole examples; survivors are scaled by 1 / keep."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (y.shape[0],) + (1,) * (y.ndim - 1))
    return jnp.where(mask, y / keep, jnp.zeros_like(y)).astype(y.dtype)


class Stage(nn.Module):
    width: int
    depth: int
    block: str
    stride: int
    bn_eps: float
    drop_paths: tuple[float, ...]
    zero_init_last: bool = True
    dtype: Any = jnp.float32
    remat: bool = False  # blocks recomputed in the backward pass (layers.block_call)

    @nn.compact
    def __call__(self, x, *, train: bool, bn_train: bool):
        for j in range(self.depth):
            block = Block(
                width=self.width,
                block=self.block,
                stride=self.stride if j == 0 else 1,
                bn_eps=self.bn_eps,
                drop_path=self.drop_paths[j],
                zero_init_last=self.zero_init_last,
                dtype=self.dtype,
                name=f"block{j + 1}",
            )
            x = layers.block_call(block, x, remat=self.remat, train=train, bn_train=bn_train)
        return x


class ResNet(nn.Module):
    """Backbone: normalised NHWC images -> globally average-pooled features (B, D), float32."""

    block: str
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    stem_width: int = 64
    bn_eps: float = 1e-5
    drop_path_rate: float = 0.0
    zero_init_last: bool = True
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, *, train: bool = False, bn_train: bool = False):
        stem = ConvBN(self.stem_width, 7, 2, self.bn_eps, self.dtype, name="stem")
        x = stem(x.astype(self.dtype), bn_train=bn_train)
        # Padding with -inf (flax's max_pool does) = PyTorch's MaxPool2d(3, 2, padding=1).
        x = nn.max_pool(nn.relu(x), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        rates = drop_path_rates(self.drop_path_rate, self.depths)
        for i, (depth, width) in enumerate(zip(self.depths, self.widths, strict=True)):
            stage = Stage(
                width=width,
                depth=depth,
                block=self.block,
                stride=1 if i == 0 else 2,
                bn_eps=self.bn_eps,
                drop_paths=rates[i],
                zero_init_last=self.zero_init_last,
                dtype=self.dtype,
                remat=self.remat,
                name=f"stage{i + 1}",
            )
            x = stage(x, train=train, bn_train=bn_train)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def drop_path_rates(rate: float, depths) -> list[tuple[float, ...]]:
    """Per stage, per block: linear from 0 at the first block to `rate` at the last (timm)."""
    n_blocks = sum(depths)
    flat = [rate * k / max(n_blocks - 1, 1) for k in range(n_blocks)]
    out, start = [], 0
    for depth in depths:
        out.append(tuple(flat[start : start + depth]))
        start += depth
    return out


def _validated(arch: dict) -> dict:
    block, depths, widths = arch["block"], tuple(arch["depths"]), tuple(arch["widths"])
    if block not in EXPANSION:
        raise ConfigError(f"resnet: block={block!r}; use one of {sorted(EXPANSION)}")
    if not depths or len(depths) != len(widths):
        raise ConfigError(
            f"resnet: depths {depths} and widths {widths} need the same, non-zero length "
            "(one entry per stage)"
        )
    counts = (*depths, *widths, arch["stem_width"])
    if any(int(n) != n or n < 1 for n in counts):
        raise ConfigError(
            f"resnet: depths {depths}, widths {widths} and stem_width {arch['stem_width']} "
            "must be positive integers"
        )
    if not arch["bn_eps"] > 0:
        raise ConfigError(f"resnet: bn_eps must be > 0, got {arch['bn_eps']}")
    if not 0 <= arch["drop_path_rate"] < 1:
        raise ConfigError(f"resnet: drop_path_rate must be in [0, 1), got {arch['drop_path_rate']}")
    return {
        **arch,
        "depths": tuple(int(d) for d in depths),
        "widths": tuple(int(w) for w in widths),
        "stem_width": int(arch["stem_width"]),
        "bn_eps": float(arch["bn_eps"]),
        "drop_path_rate": float(arch["drop_path_rate"]),
        "zero_init_last": bool(arch["zero_init_last"]),
    }


_BLOCK_PATH = re.compile(r"backbone/stage(\d+)/block(\d+)/.+")


def position(name: str, *, depths: tuple[int, ...]) -> tuple[int, int]:
    """(stage, layer) of a parameter name: stem (0, 0); block j of stage i (i, blocks before
    + j); head (n_stages, n_layers) with n_stages = len(depths) + 1, n_layers = sum + 1.
    A leading collection ('params/', 'batch_stats/') is allowed."""
    path = re.sub(r"^(params|batch_stats)/", "", name)
    if path.startswith("head/"):
        return len(depths) + 1, sum(depths) + 1
    if path.startswith("backbone/stem/"):
        return 0, 0
    m = _BLOCK_PATH.fullmatch(path)
    if m:
        stage, block = int(m[1]), int(m[2])
        if 1 <= stage <= len(depths) and 1 <= block <= depths[stage - 1]:
            return stage, sum(depths[: stage - 1]) + block
    raise ValueError(
        f"resnet {depths=}: no parameter {name!r}; names are 'backbone/stem/...', "
        "'backbone/stage<i>/block<j>/...' (within depths) or 'head/...'"
    )


def _stage_of(name: str, *, depths) -> int:
    return position(name, depths=depths)[0]


def _layer_of(name: str, *, depths) -> int:
    return position(name, depths=depths)[1]


def build(
    name: str, *, head: nn.Module, dtype: Any = jnp.float32, remat: bool = False, **overrides
) -> common.ModelSpec:
    """The registered builder: ARCHS[name] with `overrides` (see the module docstring)."""
    common.check_overrides("resnet", overrides, DEFAULTS)
    arch = _validated({**DEFAULTS, **ARCHS[name], **overrides})
    depths = arch["depths"]
    backbone = ResNet(**arch, dtype=dtype, remat=remat)
    return common.ModelSpec(
        name=name,
        family="resnet",
        module=common.Classifier(backbone=backbone, head=head),
        preprocessing=pp.imagenet(224),
        n_stages=len(depths) + 1,
        stage_of=functools.partial(_stage_of, depths=depths),
        n_layers=sum(depths) + 1,
        layer_of=functools.partial(_layer_of, depths=depths),
        feature_dim=arch["widths"][-1] * EXPANSION[arch["block"]],
        arch={**arch, "expansion": EXPANSION[arch["block"]]},
    )


for _name in ARCHS:
    common.register(_name)(functools.partial(build, _name))


def overrides_from_hf_config(config: Mapping) -> dict:
    """Model options that rebuild a transformers ResNetConfig (its config.json as a dict).

    Only what this v1.5 ResNet implements is accepted; anything else raises, naming it.
    """
    block = config.get("layer_type", "bottleneck")
    if block not in EXPANSION:
        raise ValueError(f"ResNetConfig.layer_type={block!r}; tlflax has {sorted(EXPANSION)}")
    unsupported = {
        "hidden_act": (config.get("hidden_act", "relu"), "relu"),
        "downsample_in_first_stage": (config.get("downsample_in_first_stage", False), False),
        "downsample_in_bottleneck": (config.get("downsample_in_bottleneck", False), False),
    }
    for key, (value, wanted) in unsupported.items():
        if value != wanted:
            raise ValueError(f"ResNetConfig.{key}={value!r}: tlflax's ResNet needs {wanted!r}")
    hidden = [int(h) for h in config.get("hidden_sizes", (256, 512, 1024, 2048))]
    expansion = EXPANSION[block]
    if any(h % expansion for h in hidden):
        raise ValueError(
            f"ResNetConfig.hidden_sizes={hidden} with {block} blocks: each must be a multiple "
            f"of {expansion} (the output is {expansion} x the inner width)"
        )
    return {
        "block": block,
        "depths": tuple(int(d) for d in config.get("depths", (3, 4, 6, 3))),
        "widths": tuple(h // expansion for h in hidden),
        "stem_width": int(config.get("embedding_size", 64)),
    }
