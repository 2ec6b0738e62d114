"""MobileNetV2 (Sandler et al., 2018) in flax.linen: torchvision / timm numerics.

A strided 3x3 stem (32 channels), seven stages of inverted residuals (1x1 expand, 3x3
depthwise, 1x1 linear projection; a residual where stride 1 keeps the width), a 1x1 head
conv (1280), ReLU6 throughout, global average pooling. The network is EfficientNet-Lite's
with all 3x3 kernels (tlflax.models.efficientnet_lite's modules are reused), so the names
and depth maps are Lite's too.

Width: every channel count is `c x width` rounded to a multiple of `divisor` (8), never
below it nor more than 10 % down (torchvision's _make_divisible, timm's round_channels,
Keras' alpha); the head conv is `head_width x max(1, width)` rounded alike, so it never
shrinks. Keras' pretrained alphas: 0.35, 0.5, 0.75, 1.0, 1.3, 1.4; timm's: 0.5, 1.0, 1.4,
and 1.1 / 1.2 with depth 1.2 / 1.4 and fix_stem_head (mobilenetv2_110d / _120d).

Padding: padding='symmetric' (default) pads 1 on every side of the 3x3 convs: torchvision's
and timm's. padding='same' is TensorFlow's SAME (the odd pixel after: bottom / right), which
is what Keras computes with correct_pad + 'valid' before its stride-2 convs and 'same' on
the others; Keras also uses bn_eps=1e-3 (PyTorch 1e-5).

Names: backbone/stem/{conv,bn}; backbone/stage{s}/block{j}/{expand_conv, expand_bn, dw_conv,
dw_bn, project_conv, project_bn} (s, j from 1; the first stage expands by 1 and has no
expand_*); backbone/head_conv, backbone/head_bn; head/out.
Depth: stage 0 = stem, 1..7 = the inverted residual stages, 8 = head_conv/head_bn, 9 = head;
layers count the stem, each block in order, head_conv/head_bn, then the head.

Options (`create_model(..., **overrides)`):
  stages          per stage (t, c, n, s): expansion, channels, repeats, first stride, before
                  width/depth scaling (default: the paper's table)
  width           channel multiplier (1.0; mobilenet_v2_140: 1.4)
  depth           repeat multiplier, repeats round up (1.0; timm's *d variants)
  fix_stem_head   stem, head conv and the first and last stage's depth are not scaled
                  (timm's mobilenetv2_110d / _120d)
  divisor         channels round to multiples of this (8)
  stem_width, head_width  channels of the stem and head convs before scaling (32, 1280)
  bn_eps, bn_momentum     BatchNorm epsilon (1e-5; Keras 1e-3) and flax momentum (0.9:
                          PyTorch's 0.1)
  drop_path_rate  stochastic depth of residual blocks, rate x block index / n_blocks (timm's
                  rule; 0 as in torchvision); train only
  padding         'symmetric' | 'same' (see above)
  depthwise       'auto' (default) = 'shift' on CPU, 'conv' elsewhere (layers.DepthwiseConv)
torchvision's dropout before the classifier (0.2) is the head's dropout in tlflax
(`head_dropout`); `spec.arch['classifier_dropout']` records it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from tlflax import preprocessing as pp
from tlflax.errors import ConfigError
from tlflax.models import common
from tlflax.models.efficientnet_lite import (
    DEPTHWISE,
    BlockSpec,
    EfficientNetLite,
    LayerOptions,
    check_ranges,
    depth_maps,
    positive_ints,
    round_filters,
    stage_tuples,
)

PADDINGS = ("symmetric", "same")
KERNEL = 3  # every depthwise conv of MobileNetV2
# The paper's Table 2: (expansion t, channels c, repeats n, first stride s) per stage.
STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
DEFAULTS = {
    "stages": STAGES,
    "width": 1.0,
    "depth": 1.0,
    "fix_stem_head": False,
    "divisor": 8,
    "stem_width": 32,
    "head_width": 1280,
    "bn_eps": 1e-5,
    "bn_momentum": 0.9,
    "drop_path_rate": 0.0,
    "padding": "symmetric",
    "depthwise": "auto",
}
# name -> (width, resolution, interpolation of the usual weights, dropout before the classifier)
VARIANTS = {
    "mobilenet_v2": (1.0, 224, "bilinear", 0.2),  # torchvision's weights (timm's: bicubic)
    "mobilenet_v2_140": (1.4, 224, "bicubic", 0.2),  # timm's mobilenetv2_140, Keras' alpha 1.4
    # Tests: ten blocks in seven stages at width 0.25 (stem and the first three stages all
    # 8 wide, so the first block is a residual one and no width marks a stage boundary);
    # compiles in a few seconds.
    "mobilenet_v2_tiny": (0.25, 32, "bilinear", 0.0),
    # keras.applications.MobileNetV2's numerics (keras:mobilenet_v2_<alpha>_<rows> files):
    # TF 'same' padding, BatchNorm epsilon 1e-3 and momentum 0.999, no dropout.
    "mobilenet_v2_keras": (1.0, 224, "bilinear", 0.0),
    "mobilenet_v2_140_keras": (1.4, 224, "bilinear", 0.0),
}
ARCHS = {name: {"width": w} for name, (w, _, _, _) in VARIANTS.items()}
for _keras in ("mobilenet_v2_keras", "mobilenet_v2_140_keras"):
    ARCHS[_keras].update(padding="same", bn_eps=1e-3, bn_momentum=0.999)
ARCHS["mobilenet_v2_tiny"]["stages"] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 1, 2), (6, 96, 2, 1), (6, 160, 1, 2),
    (6, 320, 1, 1),
)  # fmt: skip


def stem_and_head_widths(arch: dict) -> tuple[int, int]:
    if arch["fix_stem_head"]:
        return arch["stem_width"], arch["head_width"]
    divisor = arch["divisor"]
    stem = round_filters(arch["stem_width"], multiplier=arch["width"], divisor=divisor)
    head = round_filters(arch["head_width"], multiplier=max(1.0, arch["width"]), divisor=divisor)
    return stem, head


def block_layout(arch: dict) -> tuple[tuple[BlockSpec, ...], ...]:
    """Per stage, its blocks after width and depth scaling."""
    stages, layout = arch["stages"], []
    in_channels = stem_and_head_widths(arch)[0]
    for i, (expand, channels, repeats, stride) in enumerate(stages):
        if not (arch["fix_stem_head"] and i in (0, len(stages) - 1)):
            repeats = int(math.ceil(repeats * arch["depth"]))
        out = round_filters(channels, multiplier=arch["width"], divisor=arch["divisor"])
        blocks = [BlockSpec(in_channels, out, KERNEL, stride, expand)]
        blocks += [BlockSpec(out, out, KERNEL, 1, expand)] * (repeats - 1)
        layout.append(tuple(blocks))
        in_channels = out
    return tuple(layout)


class MobileNetV2(EfficientNetLite):
    """Backbone: normalised NHWC images -> globally average-pooled features (B, head_width).

    EfficientNet-Lite's network (stem, inverted residual stages, 1x1 head conv, ReLU6), built
    from MobileNetV2's layout."""


def _validated(arch: dict) -> dict:
    stages = stage_tuples(arch["stages"])
    if not stages or any(len(s) != 4 or min(s) < 1 or s[3] > 2 for s in stages):
        raise ConfigError(
            f"mobilenet_v2: stages={arch['stages']!r}; give per stage (t, c, n, s): expansion, "
            "channels, repeats, stride, positive integers, stride 1 or 2"
        )
    ints = positive_ints("mobilenet_v2", arch, ("divisor", "stem_width", "head_width"))
    checks = {
        "width": arch["width"] > 0,
        "depth": arch["depth"] > 0,
        "fix_stem_head": isinstance(arch["fix_stem_head"], bool),
        "bn_eps": arch["bn_eps"] > 0,
        "bn_momentum": 0 <= arch["bn_momentum"] < 1,
        "drop_path_rate": 0 <= arch["drop_path_rate"] < 1,
        "padding": arch["padding"] in PADDINGS,
        "depthwise": arch["depthwise"] in DEPTHWISE,
    }
    extra = "fix_stem_head: True | False, "
    check_ranges("mobilenet_v2", arch, checks, paddings=PADDINGS, extra=extra)
    floats = ("width", "depth", "bn_eps", "bn_momentum", "drop_path_rate")
    return {**arch, **ints, **{k: float(arch[k]) for k in floats}, "stages": stages}


def build(
    name: str, *, head: nn.Module, dtype: Any = jnp.float32, remat: bool = False, **overrides
) -> common.ModelSpec:
    """The registered builder: ARCHS[name] with `overrides` (see the module docstring)."""
    common.check_overrides("mobilenet_v2", overrides, DEFAULTS)
    arch = _validated({**DEFAULTS, **ARCHS[name], **overrides})
    layout = block_layout(arch)
    repeats = tuple(len(blocks) for blocks in layout)
    stem_width, head_width = stem_and_head_widths(arch)
    backbone = MobileNetV2(
        layout=layout,
        stem_width=stem_width,
        head_width=head_width,
        drop_connect_rate=arch["drop_path_rate"],
        opts=LayerOptions.of(arch, dtype, remat),
    )
    _, resolution, interpolation, classifier_dropout = VARIANTS[name]
    return common.ModelSpec(
        name=name,
        family="mobilenet_v2",
        module=common.Classifier(backbone=backbone, head=head),
        preprocessing=pp.imagenet(resolution, 0.875, interpolation=interpolation),
        **depth_maps(repeats, family="mobilenet_v2"),
        feature_dim=head_width,
        arch={
            **arch,
            "repeats": repeats,
            "channels": (stem_width, *(blocks[0].out_channels for blocks in layout), head_width),
            "classifier_dropout": classifier_dropout,
        },
    )


for _name in ARCHS:
    common.register(_name)(functools.partial(build, _name))
