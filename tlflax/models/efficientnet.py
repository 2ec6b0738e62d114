"""EfficientNet B0..B7 (Tan & Le, 2019) in flax.linen: timm / torchvision / transformers numerics.

MBConv blocks with squeeze-excite (its reduced width: the block's input channels x se_ratio,
0.25), swish everywhere, drop-connect on residual blocks. Unlike the Lite family, width
scaling applies to the stem (32) and the head conv (1280) too, and depth scaling (repeats
rounded up) to every stage. Width rounds to multiples of 8, never more than 10 % down.

Two conventions, each with its own registered names:
  efficientnet_b0..b7     PyTorch-trained weights (timm's efficientnet_b*, torchvision's
                          efficientnet_b*): padding='symmetric' (((stride - 1) + (k - 1)) // 2
                          on every side), bn_eps 1e-5, flax momentum 0.9 (PyTorch's 0.1).
                          b6 and b7 take torchvision's settings (bn_eps 1e-3, momentum 0.99):
                          its weights are the only ones under these names. torchvision's b5
                          needs bn_eps=1e-3 too (timm's b5, the default, uses 1e-5).
  tf_efficientnet_b0..b7  TF-trained weights (timm's tf_efficientnet_b*, transformers'
                          google/efficientnet-b*, Keras' EfficientNetB*): padding='same'
                          (TensorFlow's SAME: a stride-2 conv pads more at the bottom / right;
                          Keras' correct_pad is the same rule), bn_eps 1e-3, momentum 0.99.
                          transformers fixes its stride-2 pads for one image size
                          (config.depthwise_padding, the stem always (0, 1)): they equal SAME
                          at that size and other even sizes whose maps keep the same parity;
                          this model keeps SAME at every size.
  efficientnet_tiny       tests: four stages (a block without expansion, stride-2 stages of
                          kernels 3 and 5, a stride-1 stage that widens), residuals in stages
                          2 and 4; PyTorch conventions; compiles in a few seconds.

Names: backbone/stem/{conv,bn}; backbone/stage{s}/block{j}/{expand_conv, expand_bn, dw_conv,
dw_bn, se/reduce, se/expand, project_conv, project_bn} (s, j from 1; blocks that expand by
1, stage 1's, have no expand_*; se/* are Dense layers with biases on the pooled vector);
backbone/head_conv, backbone/head_bn; head/out.
Depth: stage 0 = stem, 1..7 = the MBConv stages, 8 = head_conv/head_bn, 9 = head; layers
count the stem, each block in order, head_conv/head_bn, then the head.

Options (`create_model(..., **overrides)`):
  stages             per stage (repeats, kernel, stride, expand_ratio, out_channels),
                     before width/depth scaling (default: the B0 table)
  width_coefficient  channel multiplier (stem and head too); depth_coefficient  repeats
  depth_divisor      channels round to multiples of this (8)
  stem_width, head_width  channels of the stem and head convs before scaling (32, 1280)
  se_ratio           squeeze-excite width / the block's input width (0.25; 0: none)
  bn_eps, bn_momentum     BatchNorm epsilon and flax momentum (see above)
  drop_connect_rate  stochastic depth of residual blocks, rate x block index / n_blocks
                     (0.2 as in training; train only)
  padding            'same' | 'symmetric' (see above)
  depthwise          'auto' (default: 'shift' on CPU, 'conv' elsewhere) | 'shift' | 'conv'
The reference's dropout before the classifier (0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5, 0.5) is
the head's dropout in tlflax (`head_dropout`); `spec.arch['classifier_dropout']` records it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tlflax import preprocessing as pp
from tlflax.models import common, layers
from tlflax.models.efficientnet_lite import (
    LITE_STAGES,
    BlockSpec,
    ConvBN,
    DepthwiseConv,
    LayerOptions,
    depth_maps,
    drop_connect_rates,
    round_filters,
    validated,
)

# The paper's B0 (efficientnet_builder.py): (repeats, kernel, stride, expand_ratio, out_channels),
# the table Lite0 keeps (efficientnet_lite_builder.py)
B0_STAGES = LITE_STAGES
DEFAULTS = {
    "stages": B0_STAGES,
    "width_coefficient": 1.0,
    "depth_coefficient": 1.0,
    "depth_divisor": 8,
    "stem_width": 32,
    "head_width": 1280,
    "se_ratio": 0.25,
    "bn_eps": 1e-5,
    "bn_momentum": 0.9,
    "drop_connect_rate": 0.2,
    "padding": "symmetric",
    "depthwise": "auto",
}
# b{i} -> (width, depth, resolution, dropout before the classifier, crop_pct): the paper's
# scaling, and timm's evaluation crop (its tf_efficientnet_b* pretrained_cfg)
SCALING = {
    0: (1.0, 1.0, 224, 0.2, 0.875),
    1: (1.0, 1.1, 240, 0.2, 0.882),
    2: (1.1, 1.2, 260, 0.3, 0.890),
    3: (1.2, 1.4, 300, 0.3, 0.904),
    4: (1.4, 1.8, 380, 0.4, 0.922),
    5: (1.6, 2.2, 456, 0.4, 0.934),
    6: (1.8, 2.6, 528, 0.5, 0.942),
    7: (2.0, 3.1, 600, 0.5, 0.949),
}
_TF = {"padding": "same", "bn_eps": 1e-3, "bn_momentum": 0.99}
_TORCHVISION_B6_B7 = {"bn_eps": 1e-3, "bn_momentum": 0.99}
# name -> (arch overrides of DEFAULTS, resolution, classifier dropout, crop_pct)
VARIANTS: dict[str, tuple[dict, int, float, float]] = {}
for _i, (_w, _d, _res, _drop, _crop) in SCALING.items():
    _scaled = {"width_coefficient": _w, "depth_coefficient": _d}
    _torch = _TORCHVISION_B6_B7 if _i >= 6 else {}
    VARIANTS[f"efficientnet_b{_i}"] = ({**_scaled, **_torch}, _res, _drop, _crop)
    VARIANTS[f"tf_efficientnet_b{_i}"] = ({**_scaled, **_TF}, _res, _drop, _crop)
VARIANTS["efficientnet_tiny"] = (
    {
        "stages": ((1, 3, 1, 1, 8), (2, 3, 2, 2, 16), (1, 5, 2, 2, 24), (2, 5, 1, 2, 32)),
        "stem_width": 16,
        "head_width": 64,
    },
    32, 0.0, 0.875,
)  # fmt: skip

# TF EfficientNet's init (as Lite's): normal, variance 2 / fan_out, for convs and SE layers.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def block_layout(arch: dict) -> tuple[tuple[BlockSpec, ...], ...]:
    """Per stage, its blocks after width/depth scaling (every stage, the stem too)."""
    width = functools.partial(
        round_filters, multiplier=arch["width_coefficient"], divisor=arch["depth_divisor"]
    )
    layout, in_channels = [], width(arch["stem_width"])
    for repeats, kernel, stride, expand, out in arch["stages"]:
        repeats = int(math.ceil(arch["depth_coefficient"] * repeats))
        out = width(out)
        blocks = [BlockSpec(in_channels, out, kernel, stride, expand)]
        blocks += [BlockSpec(out, out, kernel, 1, expand)] * (repeats - 1)
        layout.append(tuple(blocks))
        in_channels = out
    return tuple(layout)


def se_width(in_channels: int, se_ratio: float) -> int:
    """Squeeze-excite's reduced width: from the block's input channels (TF, torchvision)."""
    return max(1, int(in_channels * se_ratio))


def _pointwise(features: int, opts: LayerOptions, name: str) -> nn.Module:
    return layers.PointwiseConv(features, dtype=opts.dtype, kernel_init=_conv_init, name=name)


class SqueezeExcite(nn.Module):
    """x * sigmoid(expand(swish(reduce(mean over H, W of x)))); reduce / expand are the
    references' 1x1 convs with biases, here Dense layers on the pooled (B, C) vector."""

    reduced: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=_conv_init)
        s = jax.nn.silu(dense(self.reduced, name="reduce")(pooled))
        s = jax.nn.sigmoid(dense(x.shape[-1], name="expand")(s))
        return x * s[:, None, None, :].astype(x.dtype)


class MBConv(nn.Module):
    """Inverted residual with squeeze-excite: 1x1 expand, depthwise kxk, SE, 1x1 project."""

    spec: BlockSpec
    opts: LayerOptions
    se_ratio: float = 0.25
    drop_connect: float = 0.0

    @nn.compact
    def __call__(self, x, *, train: bool, bn_train: bool):
        s, o = self.spec, self.opts
        y = x
        if s.expand_ratio != 1:
            expand = _pointwise(s.in_channels * s.expand_ratio, o, "expand_conv")
            y = jax.nn.silu(o.conv_norm(expand, y, bn_train=bn_train, name="expand_bn"))
        dw = DepthwiseConv(s.kernel, s.stride, o.padding, o.depthwise, o.dtype, name="dw_conv")
        y = jax.nn.silu(o.conv_norm(dw, y, bn_train=bn_train, name="dw_bn"))
        if self.se_ratio > 0:
            y = SqueezeExcite(se_width(s.in_channels, self.se_ratio), o.dtype, name="se")(y)
        project = _pointwise(s.out_channels, o, "project_conv")
        y = o.conv_norm(project, y, bn_train=bn_train, name="project_bn")
        if not s.residual:
            return y
        if train and self.drop_connect > 0:
            y = layers.drop_path(y, rate=self.drop_connect, rng=self.make_rng("dropout"))
        return x + y


class Stage(nn.Module):
    blocks: tuple[BlockSpec, ...]
    drop_connects: tuple[float, ...]
    se_ratio: float
    opts: LayerOptions

    @nn.compact
    def __call__(self, x, *, train: bool, bn_train: bool):
        for j, (spec, rate) in enumerate(zip(self.blocks, self.drop_connects, strict=True)):
            block = MBConv(spec, self.opts, self.se_ratio, rate, name=f"block{j + 1}")
            x = layers.block_call(block, x, remat=self.opts.remat, train=train, bn_train=bn_train)
        return x


class EfficientNet(nn.Module):
    """Backbone: normalised NHWC images -> globally average-pooled features (B, head_width);
    stem_width / head_width here are the scaled widths."""

    layout: tuple[tuple[BlockSpec, ...], ...]
    stem_width: int = 32
    head_width: int = 1280
    se_ratio: float = 0.25
    drop_connect_rate: float = 0.0
    opts: LayerOptions = LayerOptions()

    @nn.compact
    def __call__(self, x, *, train: bool = False, bn_train: bool = False):
        o = self.opts
        stem = ConvBN(self.stem_width, o, act=jax.nn.silu, name="stem")
        x = layers.block_call(stem, x.astype(o.dtype), remat=o.remat, bn_train=bn_train)
        rates = drop_connect_rates(self.drop_connect_rate, self.layout)
        for i, (blocks, stage_rates) in enumerate(zip(self.layout, rates, strict=True)):
            x = Stage(blocks, stage_rates, self.se_ratio, o, name=f"stage{i + 1}")(
                x, train=train, bn_train=bn_train
            )
        head_conv = _pointwise(self.head_width, o, "head_conv")
        x = jax.nn.silu(o.conv_norm(head_conv, x, bn_train=bn_train, name="head_bn"))
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def build(
    name: str, *, head: nn.Module, dtype: Any = jnp.float32, remat: bool = False, **overrides
) -> common.ModelSpec:
    """The registered builder: VARIANTS[name] with `overrides` (see the module docstring)."""
    common.check_overrides("efficientnet", overrides, DEFAULTS)
    variant, resolution, classifier_dropout, crop_pct = VARIANTS[name]
    arch = validated({**DEFAULTS, **variant, **overrides}, family="efficientnet")
    layout = block_layout(arch)
    repeats = tuple(len(blocks) for blocks in layout)
    width = functools.partial(
        round_filters, multiplier=arch["width_coefficient"], divisor=arch["depth_divisor"]
    )
    stem_width, head_width = width(arch["stem_width"]), width(arch["head_width"])
    backbone = EfficientNet(
        layout=layout,
        stem_width=stem_width,
        head_width=head_width,
        se_ratio=arch["se_ratio"],
        drop_connect_rate=arch["drop_connect_rate"],
        opts=LayerOptions.of(arch, dtype, remat),
    )
    return common.ModelSpec(
        name=name,
        family="efficientnet",
        module=common.Classifier(backbone=backbone, head=head),
        preprocessing=pp.imagenet(resolution, crop_pct, interpolation="bicubic"),
        **depth_maps(repeats, family="efficientnet"),
        feature_dim=head_width,
        arch={**arch, "repeats": repeats, "classifier_dropout": classifier_dropout},
    )


for _name in VARIANTS:
    common.register(_name)(functools.partial(build, _name))
