"""VGG 11/13/16/19, with and without BatchNorm, in flax.linen: torchvision / timm numerics.

Simonyan & Zisserman, 2015: five stages of 3x3 convs (padding 1) + ReLU, each closed by a
2x2 max pool; torchvision's `vgg*_bn` put a BatchNorm after every conv.
Names: backbone/stage{i}/conv{j}/{kernel,bias}, backbone/stage{i}/bn{j}/... (i, j from 1),
backbone/fc1, backbone/fc2 (pooling='classifier'), head/out.
Options (`create_model(..., **overrides)`):
  depths      convs per stage, e.g. (2, 2, 3, 3, 3) for VGG16
  widths      per-stage channels, (64, 128, 256, 512, 512)
  batch_norm  a BatchNorm after each conv (torchvision's vgg16_bn)
  pooling     what the backbone's features are:
              'classifier'  torchvision's: the last map average-pooled to 7 x 7 (adaptively;
                            a no-op at 224 px), flattened, then fc1 and fc2 (4096, ReLU,
                            dropout): the pretrained fc7 features (4096), as the ImageNet head
                            reads them
              'flatten'     the last map flattened (the Keras recipes' Flatten: 7 x 7 x 512 =
                            25,088 at 224 px; the size follows the resolution)
              'avg'         the last map's global average (512)
  dropout     of fc1 and fc2 (torchvision: 0.5); train only
  fc_width    of fc1 and fc2 (4096)
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from tlflax import preprocessing as pp
from tlflax.errors import ConfigError
from tlflax.models import common, layers

POOLINGS = ("classifier", "flatten", "avg")
DEFAULTS = {
    "depths": (2, 2, 3, 3, 3),
    "widths": (64, 128, 256, 512, 512),
    "batch_norm": False,
    "pooling": "classifier",
    "dropout": 0.5,
    "fc_width": 4096,
}
_DEPTHS = {"vgg11": (1, 1, 2, 2, 2), "vgg13": (2, 2, 2, 2, 2), "vgg16": (2, 2, 3, 3, 3),
           "vgg19": (2, 2, 4, 4, 4)}  # fmt: skip
ARCHS = {
    **{name: {"depths": d} for name, d in _DEPTHS.items()},
    **{f"{name}_bn": {"depths": d, "batch_norm": True} for name, d in _DEPTHS.items()},
    # Tests: five stages of one conv, a few channels, small fc layers.
    "vgg_tiny": {"depths": (1, 1, 1, 1, 1), "widths": (4, 8, 8, 16, 16), "batch_norm": True,
                 "fc_width": 32},
}  # fmt: skip
POOLED = 7  # torchvision's AdaptiveAvgPool2d((7, 7)) before the classifier

# torchvision: kaiming_normal_(fan_out, relu) for convs, N(0, 0.01) for the linear layers.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_fc_init = nn.initializers.normal(0.01)


def adaptive_avg_pool(x, size: int):
    """PyTorch's AdaptiveAvgPool2d((size, size)) on NHWC: bin i of n spans
    [floor(i n / size), ceil((i + 1) n / size)); the identity when the map is size x size."""
    h, w = x.shape[1:3]
    if (h, w) == (size, size):
        return x

    def bins(n):
        return [(i * n // size, math.ceil((i + 1) * n / size)) for i in range(size)]

    rows = [jnp.mean(x[:, a:b], axis=1, keepdims=True) for a, b in bins(h)]
    x = jnp.concatenate(rows, axis=1)
    cols = [jnp.mean(x[:, :, a:b], axis=2, keepdims=True) for a, b in bins(w)]
    return jnp.concatenate(cols, axis=2)


class Stage(nn.Module):
    """`depth` 3x3 convs (+ BatchNorm) + ReLU, then a 2x2 max pool."""

    depth: int
    width: int
    batch_norm: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, bn_train: bool):
        for j in range(1, self.depth + 1):
            conv = nn.Conv(self.width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                           kernel_init=_conv_init, name=f"conv{j}")  # fmt: skip
            x = conv(x)
            if self.batch_norm:
                # flax momentum 0.9 keeps 0.9 of the running average: PyTorch's 0.1.
                norm = nn.BatchNorm(use_running_average=not bn_train, momentum=0.9,
                                    epsilon=1e-5, dtype=self.dtype, name=f"bn{j}")  # fmt: skip
                x = norm(x)
            x = nn.relu(x)
        return nn.max_pool(x, (2, 2), strides=(2, 2))  # floor: PyTorch's ceil_mode=False


class VGG(nn.Module):
    """Backbone: normalised NHWC images -> features (B, D) per `pooling`."""

    depths: tuple[int, ...]
    widths: tuple[int, ...]
    batch_norm: bool = False
    pooling: str = "classifier"
    dropout: float = 0.5
    fc_width: int = 4096
    dtype: Any = jnp.float32
    remat: bool = False  # stages recomputed in the backward pass (layers.block_call)

    @nn.compact
    def __call__(self, x, *, train: bool = False, bn_train: bool = False):
        x = x.astype(self.dtype)
        for i, (depth, width) in enumerate(zip(self.depths, self.widths, strict=True), 1):
            stage = Stage(depth, width, self.batch_norm, self.dtype, name=f"stage{i}")
            x = layers.block_call(stage, x, remat=self.remat, bn_train=bn_train)
        x = x.astype(jnp.float32)
        if self.pooling == "avg":
            return jnp.mean(x, axis=(1, 2))
        if self.pooling == "flatten":
            return x.reshape(x.shape[0], -1)
        x = adaptive_avg_pool(x, POOLED).reshape(x.shape[0], -1)
        for k in (1, 2):
            x = nn.Dense(self.fc_width, dtype=self.dtype, kernel_init=_fc_init,
                         name=f"fc{k}")(x.astype(self.dtype))  # fmt: skip
            x = nn.Dropout(self.dropout)(nn.relu(x), deterministic=not train)
        return x.astype(jnp.float32)


def _validated(arch: dict) -> dict:
    try:
        depths = tuple(int(d) for d in arch["depths"])
        widths = tuple(int(w) for w in arch["widths"])
    except (TypeError, ValueError):
        depths = widths = ()
    if not depths or len(depths) != len(widths) or min(depths + widths) < 1:
        raise ConfigError(
            f"vgg: depths {arch['depths']} and widths {arch['widths']} need one positive "
            "integer per stage each"
        )
    if arch["pooling"] not in POOLINGS:
        raise ConfigError(f"vgg: pooling={arch['pooling']!r}; use one of {POOLINGS}")
    if not 0 <= arch["dropout"] < 1:
        raise ConfigError(f"vgg: dropout must be in [0, 1), got {arch['dropout']}")
    if int(arch["fc_width"]) < 1:
        raise ConfigError(f"vgg: fc_width must be >= 1, got {arch['fc_width']}")
    return {**arch, "depths": depths, "widths": widths, "batch_norm": bool(arch["batch_norm"]),
            "dropout": float(arch["dropout"]), "fc_width": int(arch["fc_width"])}  # fmt: skip


_CONV_PATH = re.compile(r"backbone/stage(\d+)/(conv|bn)(\d+)/.+")


def position(name: str, *, depths: tuple[int, ...], fc: bool) -> tuple[int, int]:
    """(stage, layer) of a parameter name: stage i's conv j is (i - 1, convs before it);
    fc1 / fc2 one stage past the convs (their own layers); the head one past everything."""
    path = re.sub(r"^(params|batch_stats)/", "", name)
    n_convs = sum(depths)
    n_stages, n_layers = len(depths) + int(fc), n_convs + 2 * int(fc)
    if path.startswith("head/"):
        return n_stages, n_layers
    m = _CONV_PATH.fullmatch(path)
    if m and 1 <= int(m[1]) <= len(depths) and 1 <= int(m[3]) <= depths[int(m[1]) - 1]:
        stage = int(m[1])
        return stage - 1, sum(depths[: stage - 1]) + int(m[3]) - 1
    m = re.fullmatch(r"backbone/fc([12])/.+", path)
    if m and fc:
        return len(depths), n_convs + int(m[1]) - 1
    raise ValueError(
        f"vgg {depths=}: no parameter {name!r}; names are 'backbone/stage<i>/conv<j>/...', "
        "'backbone/stage<i>/bn<j>/...', 'backbone/fc1|fc2/...' (pooling='classifier') or "
        "'head/...'"
    )


def feature_dim(arch: dict, resolution: int) -> int:
    if arch["pooling"] == "classifier":
        return arch["fc_width"]
    if arch["pooling"] == "avg":
        return arch["widths"][-1]
    side = resolution
    for _ in arch["depths"]:
        side //= 2
    return side * side * arch["widths"][-1]


def build(
    name: str, *, head: nn.Module, dtype: Any = jnp.float32, remat: bool = False, **overrides
) -> common.ModelSpec:
    """The registered builder: ARCHS[name] with `overrides` (see the module docstring)."""
    common.check_overrides("vgg", overrides, DEFAULTS)
    arch = _validated({**DEFAULTS, **ARCHS[name], **overrides})
    fc = arch["pooling"] == "classifier"
    where = functools.partial(position, depths=arch["depths"], fc=fc)
    return common.ModelSpec(
        name=name,
        family="vgg",
        module=common.Classifier(backbone=VGG(**arch, dtype=dtype, remat=remat), head=head),
        preprocessing=pp.imagenet(224),
        n_stages=len(arch["depths"]) + int(fc),
        stage_of=lambda n: where(n)[0],
        n_layers=sum(arch["depths"]) + 2 * int(fc),
        layer_of=lambda n: where(n)[1],
        feature_dim=feature_dim(arch, 224),
        feature_dim_at=functools.partial(feature_dim, arch),
        arch=arch,
    )


for _name in ARCHS:
    common.register(_name)(functools.partial(build, _name))
