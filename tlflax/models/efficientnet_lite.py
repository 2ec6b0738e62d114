"""EfficientNet-Lite0..4 in flax.linen: efficientnet_lite_pytorch / TF-Lite numerics.

The Lite family is EfficientNet without squeeze-excite, with ReLU6 instead of swish, and
with the stem (32 channels) and the head conv (1280) left unscaled; the first and last
stage keep their depth. The width multiplier rounds channels to multiples of 8 (never
more than 10 % down); the depth multiplier rounds repeats up (efficientnet_lite_builder.py).

Padding: padding='same' (default) is TensorFlow's 'SAME', which pads a stride-2 conv more
at the bottom/right - what efficientnet_lite_pytorch's Conv2dStaticSamePadding computes
for the image size it was built for, and what timm's tf_efficientnet_lite* do at any size.
At other input sizes this model keeps TF's rule (the reference's pads stay those of its
build size). padding='symmetric' pads ((stride - 1) + (k - 1)) // 2 on every side:
timm's own efficientnet_lite* (PyTorch-trained; they also use bn_eps=1e-5).

Names: backbone/stem/{conv,bn}; backbone/stage{s}/block{j}/{expand_conv, expand_bn,
dw_conv, dw_bn, project_conv, project_bn} (s, j from 1; stage 1 of Lite expands by 1 and
has no expand_*); backbone/head_conv, backbone/head_bn; head/out.
Depth: stage 0 = stem, 1..7 = the MBConv stages, 8 = head_conv/head_bn, 9 = head; layers
count the stem, each block in order, head_conv/head_bn, then the head.

Options (`create_model(..., **overrides)`):
  stages             per stage (repeats, kernel, stride, expand_ratio, out_channels),
                     before width/depth scaling (default: the Lite0 table)
  width_coefficient  channel multiplier; depth_coefficient  repeat multiplier
  depth_divisor      channels round to multiples of this (8)
  stem_width, head_width  channels of the stem and head convs (32, 1280; not scaled)
  bn_eps, bn_momentum     BatchNorm epsilon (1e-3) and flax momentum (0.99: PyTorch's 0.01)
  drop_connect_rate  stochastic depth of residual blocks, rate x block index / n_blocks
                     (the reference's rule; 0.2 as in its training); train only
  padding            'same' | 'symmetric' (see above)
  depthwise          how depthwise convs compute (same parameters, same numbers):
                     'auto' (default) = 'shift' on CPU, 'conv' elsewhere (DepthwiseConv)
The reference's dropout before the classifier (0.2, 0.2, 0.3, 0.3, 0.3) is the head's
dropout in tlflax (`head_dropout`); `spec.arch['classifier_dropout']` records it.

tlflax.models.efficientnet and mobilenet_v2 build on this module: its layers, option checks
(`validated`, `check_ranges`) and depth maps (`position`, `depth_maps`).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tlflax import preprocessing as pp
from tlflax.errors import ConfigError
from tlflax.models import common, layers

PADDINGS = ("same", "symmetric")
DEPTHWISE = ("auto", "shift", "conv")
# efficientnet_lite_builder.py's blocks: (repeats, kernel, stride, expand_ratio, out_channels)
LITE_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
DEFAULTS = {
    "stages": LITE_STAGES,
    "width_coefficient": 1.0,
    "depth_coefficient": 1.0,
    "depth_divisor": 8,
    "stem_width": 32,
    "head_width": 1280,
    "bn_eps": 1e-3,
    "bn_momentum": 0.99,
    "drop_connect_rate": 0.2,
    "padding": "same",
    "depthwise": "auto",
}
# name -> (width, depth, resolution, dropout before the classifier), as the reference
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": (1.4, 1.8, 300, 0.3),
    # Tests: seven one- or two-block stages, each widening (the converter finds stage
    # boundaries there), residuals in stages 1, 2 and 5; compiles in a few seconds.
    "efficientnet_lite_tiny": (1.0, 1.0, 32, 0.0),
}
ARCHS = {
    name: {"width_coefficient": w, "depth_coefficient": d}
    for name, (w, d, _, _) in VARIANTS.items()
}
ARCHS["efficientnet_lite_tiny"].update(
    stages=((1, 3, 1, 1, 8), (2, 3, 2, 2, 16), (1, 5, 2, 2, 24), (1, 3, 2, 2, 32),
            (2, 5, 1, 2, 40), (1, 5, 2, 2, 48), (1, 3, 1, 2, 56)),
    stem_width=8,
    head_width=64,
)  # fmt: skip

# TF EfficientNet's conv init: normal, variance 2 / fan_out. A depthwise kernel
# (k, k, 1, C) has fan_out k*k in TF's count, which is flax's fan_in here.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_dw_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
DepthwiseConv = functools.partial(layers.DepthwiseConv, kernel_init=_dw_init)


class BlockSpec(NamedTuple):
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    expand_ratio: int

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


def round_filters(channels: int, *, multiplier: float, divisor: int) -> int:
    """The reference's width rounding (same arithmetic order, for identical results)."""
    scaled = channels * multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:  # never round down by more than 10 %
        rounded += divisor
    return int(rounded)


def block_layout(arch: dict) -> tuple[tuple[BlockSpec, ...], ...]:
    """Per stage, its blocks after width/depth scaling; first and last stage keep depth."""
    stages, layout = arch["stages"], []
    in_channels = arch["stem_width"]
    for i, (repeats, kernel, stride, expand, out) in enumerate(stages):
        if 0 < i < len(stages) - 1:
            repeats = int(math.ceil(arch["depth_coefficient"] * repeats))
        out = round_filters(
            out, multiplier=arch["width_coefficient"], divisor=arch["depth_divisor"]
        )
        blocks = [BlockSpec(in_channels, out, kernel, stride, expand)]
        blocks += [BlockSpec(out, out, kernel, 1, expand)] * (repeats - 1)
        layout.append(tuple(blocks))
        in_channels = out
    return tuple(layout)


def _conv(features, kernel, *, stride=1, padding="same", dtype, name) -> nn.Module:
    if kernel == 1 and stride == 1:
        return layers.PointwiseConv(features, dtype=dtype, kernel_init=_conv_init, name=name)
    return layers.Conv(
        features,
        kernel,
        stride=stride,
        padding=layers.conv_padding(kernel, stride, padding),
        dtype=dtype,
        kernel_init=_conv_init,
        name=name,
    )


class LayerOptions(NamedTuple):
    """What every conv / BatchNorm of the network shares."""

    bn_eps: float = 1e-3
    bn_momentum: float = 0.99
    padding: str = "same"
    depthwise: str = "auto"
    dtype: Any = jnp.float32
    remat: bool = False  # blocks recomputed in the backward pass (layers.block_call)

    @classmethod
    def of(cls, arch: dict, dtype: Any, remat: bool = False) -> LayerOptions:
        """The options of a validated arch (bn_eps, bn_momentum, padding, depthwise)."""
        a = arch
        return cls(a["bn_eps"], a["bn_momentum"], a["padding"], a["depthwise"], dtype, remat)

    def norm(self, *, bn_train: bool, name: str) -> nn.BatchNorm:
        # Two-pass variance: E[x^2] - E[x]^2 doubled the error of bn_train=True against
        # float64 (tiny late feature maps, batch statistics of 16 values).
        return nn.BatchNorm(
            use_running_average=not bn_train,
            momentum=self.bn_momentum,
            epsilon=self.bn_eps,
            use_fast_variance=False,
            dtype=self.dtype,
            name=name,
        )

    def conv_norm(self, conv, x, *, bn_train: bool, name: str):
        """BatchNorm `name` of conv(x), folded into the conv when frozen (layers.conv_norm)."""
        norm = functools.partial(self.norm, bn_train=bn_train, name=name)
        return layers.conv_norm(conv, x, bn_train=bn_train, norm=norm, name=name, eps=self.bn_eps)


class ConvBN(nn.Module):
    """The stem: a strided 3x3 conv, its BatchNorm and the activation (one unit for
    model.remat: the backward pass recomputes it from the image rather than keep its
    112 x 112 activations)."""

    features: int
    opts: LayerOptions
    act: Any = jax.nn.relu6

    @nn.compact
    def __call__(self, x, *, bn_train: bool):
        o = self.opts
        conv = _conv(self.features, 3, stride=2, padding=o.padding, dtype=o.dtype, name="conv")
        return self.act(o.conv_norm(conv, x, bn_train=bn_train, name="bn"))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project; no squeeze-excite."""

    spec: BlockSpec
    opts: LayerOptions
    drop_connect: float = 0.0

    @nn.compact
    def __call__(self, x, *, train: bool, bn_train: bool):
        s, o = self.spec, self.opts
        width = s.in_channels * s.expand_ratio
        y = x
        if s.expand_ratio != 1:
            expand = _conv(width, 1, dtype=o.dtype, name="expand_conv")
            y = jax.nn.relu6(o.conv_norm(expand, y, bn_train=bn_train, name="expand_bn"))
        dw = DepthwiseConv(s.kernel, s.stride, o.padding, o.depthwise, o.dtype, name="dw_conv")
        y = jax.nn.relu6(o.conv_norm(dw, y, bn_train=bn_train, name="dw_bn"))
        project = _conv(s.out_channels, 1, dtype=o.dtype, name="project_conv")
        y = o.conv_norm(project, y, bn_train=bn_train, name="project_bn")
        if not s.residual:
            return y
        if train and self.drop_connect > 0:
            y = layers.drop_path(y, rate=self.drop_connect, rng=self.make_rng("dropout"))
        return x + y


class Stage(nn.Module):
    blocks: tuple[BlockSpec, ...]
    drop_connects: tuple[float, ...]
    opts: LayerOptions

    @nn.compact
    def __call__(self, x, *, train: bool, bn_train: bool):
        for j, (spec, rate) in enumerate(zip(self.blocks, self.drop_connects, strict=True)):
            block = MBConv(spec, self.opts, rate, name=f"block{j + 1}")
            x = layers.block_call(block, x, remat=self.opts.remat, train=train, bn_train=bn_train)
        return x


class EfficientNetLite(nn.Module):
    """Backbone: normalised NHWC images -> globally average-pooled features (B, head_width)."""

    layout: tuple[tuple[BlockSpec, ...], ...]
    stem_width: int = 32
    head_width: int = 1280
    drop_connect_rate: float = 0.0
    opts: LayerOptions = LayerOptions()

    @nn.compact
    def __call__(self, x, *, train: bool = False, bn_train: bool = False):
        o = self.opts
        stem = ConvBN(self.stem_width, o, name="stem")
        x = layers.block_call(stem, x.astype(o.dtype), remat=o.remat, bn_train=bn_train)
        rates = drop_connect_rates(self.drop_connect_rate, self.layout)
        for i, (blocks, stage_rates) in enumerate(zip(self.layout, rates, strict=True)):
            x = Stage(blocks, stage_rates, o, name=f"stage{i + 1}")(
                x, train=train, bn_train=bn_train
            )
        head_conv = _conv(self.head_width, 1, dtype=o.dtype, name="head_conv")
        x = jax.nn.relu6(o.conv_norm(head_conv, x, bn_train=bn_train, name="head_bn"))
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def drop_connect_rates(rate: float, layout) -> list[tuple[float, ...]]:
    """rate x (global block index) / (number of blocks): the reference's rule."""
    n_blocks = sum(len(blocks) for blocks in layout)
    out, k = [], 0
    for blocks in layout:
        out.append(tuple(rate * (k + j) / n_blocks for j in range(len(blocks))))
        k += len(blocks)
    return out


def stage_tuples(stages) -> tuple[tuple[int, ...], ...]:
    """`stages` as tuples of ints; () where they are not numbers (the caller then refuses)."""
    try:
        return tuple(tuple(int(v) for v in stage) for stage in stages)
    except (TypeError, ValueError):
        return ()


def positive_ints(family: str, arch: dict, keys) -> dict[str, int]:
    """arch's `keys` as ints, or a ConfigError naming them all when one is not >= 1."""
    ints = {k: arch[k] for k in keys}
    if any(int(v) != v or v < 1 for v in ints.values()):
        raise ConfigError(f"{family}: {ints} must be positive integers")
    return {k: int(v) for k, v in ints.items()}


def check_ranges(family: str, arch: dict, checks: dict, *, paddings=PADDINGS, extra="") -> None:
    """A ConfigError for the first key whose check is False, with every option's range
    (`extra`: the family's own options' ranges, before the rates')."""
    for key, ok in checks.items():
        if not ok:
            raise ConfigError(
                f"{family}: {key}={arch[key]!r} is out of range (see the module docstring; "
                f"padding: {paddings}, depthwise: {DEPTHWISE}, {extra}rates in [0, 1), "
                "others > 0)"
            )


def validated(arch: dict, *, family: str = "efficientnet_lite") -> dict:
    """`arch` checked and typed: Lite's options, and EfficientNet's se_ratio where it has one."""
    stages = stage_tuples(arch["stages"])
    if not stages or any(len(s) != 5 or min(s) < 1 or s[2] > 2 or s[1] % 2 == 0 for s in stages):
        raise ConfigError(
            f"{family}: stages={arch['stages']!r}; give per stage (repeats, kernel, "
            "stride, expand_ratio, out_channels), positive, odd kernel, stride 1 or 2"
        )
    ints = positive_ints(family, arch, ("depth_divisor", "stem_width", "head_width"))
    se = {"se_ratio": 0 <= arch["se_ratio"] <= 1} if "se_ratio" in arch else {}
    checks = {
        "width_coefficient": arch["width_coefficient"] > 0,
        "depth_coefficient": arch["depth_coefficient"] > 0,
        **se,
        "bn_eps": arch["bn_eps"] > 0,
        "bn_momentum": 0 <= arch["bn_momentum"] < 1,
        "drop_connect_rate": 0 <= arch["drop_connect_rate"] < 1,
        "padding": arch["padding"] in PADDINGS,
        "depthwise": arch["depthwise"] in DEPTHWISE,
    }
    check_ranges(family, arch, checks, extra="se_ratio in [0, 1], " if se else "")
    floats = ("width_coefficient", "depth_coefficient", *se, "bn_eps", "bn_momentum")
    return {
        **arch,
        **ints,
        **{k: float(arch[k]) for k in (*floats, "drop_connect_rate")},
        "stages": stages,
    }


_BLOCK_PATH = re.compile(r"backbone/stage(\d+)/block(\d+)/.+")


def position(name: str, *, repeats: tuple[int, ...], family: str) -> tuple[int, int]:
    """(stage, layer) of a parameter name of an MBConv-style network (Lite, EfficientNet,
    MobileNetV2): stem (0, 0); block j of stage s (s, blocks before + j); head_conv/head_bn
    (len + 1, sum + 1); head (len + 2, sum + 2). A leading collection ('params/',
    'batch_stats/') is allowed; `family` names the model in the error."""
    path = re.sub(r"^(params|batch_stats)/", "", name)
    n_stages, n_blocks = len(repeats), sum(repeats)
    if path.startswith("head/"):
        return n_stages + 2, n_blocks + 2
    if path.startswith("backbone/stem/"):
        return 0, 0
    if path.startswith(("backbone/head_conv/", "backbone/head_bn/")):
        return n_stages + 1, n_blocks + 1
    m = _BLOCK_PATH.fullmatch(path)
    if m:
        stage, block = int(m[1]), int(m[2])
        if 1 <= stage <= n_stages and 1 <= block <= repeats[stage - 1]:
            return stage, sum(repeats[: stage - 1]) + block
    raise ValueError(
        f"{family} {repeats=}: no parameter {name!r}; names are 'backbone/stem/...', "
        "'backbone/stage<s>/block<j>/...' (within repeats), 'backbone/head_conv/...', "
        "'backbone/head_bn/...' or 'head/...'"
    )


def _stage_of(name: str, *, repeats, family: str) -> int:
    return position(name, repeats=repeats, family=family)[0]


def _layer_of(name: str, *, repeats, family: str) -> int:
    return position(name, repeats=repeats, family=family)[1]


def depth_maps(repeats: tuple[int, ...], *, family: str) -> dict:
    """ModelSpec's n_stages, stage_of, n_layers and layer_of for these stage depths."""
    return {
        "n_stages": len(repeats) + 2,
        "stage_of": functools.partial(_stage_of, repeats=repeats, family=family),
        "n_layers": sum(repeats) + 2,
        "layer_of": functools.partial(_layer_of, repeats=repeats, family=family),
    }


def build(
    name: str, *, head: nn.Module, dtype: Any = jnp.float32, remat: bool = False, **overrides
) -> common.ModelSpec:
    """The registered builder: ARCHS[name] with `overrides` (see the module docstring)."""
    common.check_overrides("efficientnet_lite", overrides, DEFAULTS)
    arch = validated({**DEFAULTS, **ARCHS[name], **overrides})
    layout = block_layout(arch)
    repeats = tuple(len(blocks) for blocks in layout)
    backbone = EfficientNetLite(
        layout=layout,
        stem_width=arch["stem_width"],
        head_width=arch["head_width"],
        drop_connect_rate=arch["drop_connect_rate"],
        opts=LayerOptions.of(arch, dtype, remat),
    )
    _, _, resolution, classifier_dropout = VARIANTS[name]
    return common.ModelSpec(
        name=name,
        family="efficientnet_lite",
        module=common.Classifier(backbone=backbone, head=head),
        preprocessing=pp.lite(resolution, 0.875, interpolation="bicubic"),
        **depth_maps(repeats, family="efficientnet_lite"),
        feature_dim=arch["head_width"],
        arch={**arch, "repeats": repeats, "classifier_dropout": classifier_dropout},
    )


for _name in ARCHS:
    common.register(_name)(functools.partial(build, _name))
