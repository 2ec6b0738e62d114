"""Xception (Chollet, 2017) in flax.linen: keras.applications.Xception / timm legacy_xception.

Entry flow: block1, two valid 3x3 convs (the first of stride 2) + BatchNorm + ReLU; blocks
2-4, two separable 3x3 convs + BatchNorm (a ReLU before each, but before the first of
block 2, whose input is already one), a 3x3 stride-2 max pool, plus a shortcut: a 1x1
stride-2 conv + BatchNorm of the block's input. Middle flow: `middle_blocks` blocks of three
ReLU + separable conv + BatchNorm, with the identity shortcut. Exit flow: a block like the
entry's (its separable convs widen to the last), then block `6 + middle_blocks`: two separable
convs + BatchNorm + ReLU; the features are their global average. A separable conv is a 3x3
depthwise conv (padding 'same') then a 1x1 conv, neither with a bias.

Max pooling ('pool_padding'): Keras pools with 'same' padding (TF's: on an even side the one
padded pixel goes after), timm's legacy_xception with MaxPool2d(3, 2, padding=1) (one pixel
on each side). The output sizes agree; the windows agree on odd sides only. At 299 px the
sides the four pools see are 147, 74, 37, 19: block 3's (74) differs, so timm's logits are not
Keras's there. Both padded pixels are -inf, never the maximum. The 1x1 stride-2 shortcuts
read the same pixels either way (no padding). 'same' (default) is how the weights were
trained: timm's legacy_xception weights are the Keras ones, ported. BatchNorm epsilon:
Keras 1e-3 (default); timm's port runs them with PyTorch's 1e-5 (bn_eps=1e-5 and
pool_padding='symmetric' give timm's logits exactly).

The stem's valid convs need a side of at least 7 px (Keras asks for >= 71).

Names (the Keras layer names, '_' after the block number made '/'): backbone/block1/{conv1,
conv1_bn, conv2, conv2_bn}; backbone/block{b}/sepconv{k}/{depthwise,pointwise}/kernel,
backbone/block{b}/sepconv{k}_bn; backbone/block{b}/{shortcut, shortcut_bn} (blocks 2-4 and
the exit block); head/out. With 8 middle blocks the exit blocks are 13 and 14, as in Keras.
Depth: stage b - 1 is block b (entry 0-3, middle 4..3 + middle_blocks, exit the last two);
layers: one per conv (its BatchNorm with it), the shortcut at its block's first, in order:
36 for Xception (the paper's 36 conv layers); the head is one past both.

Options (`create_model(..., **overrides)`):
  widths          8 channel counts: block1's two convs, blocks 2, 3, 4 (also the middle
                  flow's and the exit block's first separable conv), the exit block's out,
                  the last two separable convs: (32, 64, 128, 256, 728, 1024, 1536, 2048)
  middle_blocks   blocks in the middle flow (8)
  pool_padding    'same' (Keras) | 'symmetric' (timm's legacy_xception); see above
  bn_eps, bn_momentum  BatchNorm epsilon (1e-3) and flax momentum (0.99, Keras's; PyTorch's
                  momentum m is flax's 1 - m)
  depthwise       'auto' | 'shift' | 'conv': how depthwise convs compute (layers.DepthwiseConv)
"""

from __future__ import annotations

import functools
import re
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from tlflax import preprocessing as pp
from tlflax.errors import ConfigError
from tlflax.models import common, layers

POOL_PADDINGS = ("same", "symmetric")
DEPTHWISE = ("auto", "shift", "conv")
MIN_SIZE = 7  # two valid 3x3 convs, the first of stride 2, leave >= 1 pixel
DEFAULTS = {
    "widths": (32, 64, 128, 256, 728, 1024, 1536, 2048),
    "middle_blocks": 8,
    "pool_padding": "same",
    "bn_eps": 1e-3,
    "bn_momentum": 0.99,
    "depthwise": "auto",
}
ARCHS = {
    "xception": {},
    # Tests: every kind of block once (one middle block), a few channels each.
    "xception_tiny": {"widths": (4, 8, 8, 16, 16, 24, 24, 32), "middle_blocks": 1},
}
RESOLUTION = {"xception": 299, "xception_tiny": 64}
CROP_PCT = 0.8975  # timm's legacy_xception: resize 333, centre crop 299

# timm's init: kaiming normal (fan_out) for the convs; a depthwise kernel (k, k, 1, C) has
# fan_in k*k in flax's count.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_dw_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class LayerOptions(NamedTuple):
    """What every conv / BatchNorm / pool of the network shares."""

    bn_eps: float = 1e-3
    bn_momentum: float = 0.99
    pool_padding: str = "same"
    depthwise: str = "auto"
    dtype: Any = jnp.float32
    remat: bool = False  # blocks recomputed in the backward pass (layers.block_call)

    def norm(self, *, bn_train: bool, name: str) -> nn.BatchNorm:
        return nn.BatchNorm(
            use_running_average=not bn_train,
            momentum=self.bn_momentum,
            epsilon=self.bn_eps,
            use_fast_variance=False,
            dtype=self.dtype,
            name=name,
        )

    def pool(self, x):
        pads = "SAME" if self.pool_padding == "same" else ((1, 1), (1, 1))
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=pads)  # pads are -inf


class SeparableConv(nn.Module):
    """3x3 depthwise ('same' padding) then 1x1 pointwise; no biases (Keras SeparableConv2D)."""

    features: int
    opts: LayerOptions

    @nn.compact
    def __call__(self, x):
        o = self.opts
        x = layers.DepthwiseConv(3, 1, "same", o.depthwise, o.dtype, _dw_init, name="depthwise")(x)
        return layers.PointwiseConv(self.features, dtype=o.dtype, kernel_init=_conv_init,
                                    name="pointwise")(x)  # fmt: skip


class Stem(nn.Module):
    """block1: 3x3 stride-2 and 3x3 convs, 'valid', no bias, each + BatchNorm + ReLU."""

    widths: tuple[int, int]
    opts: LayerOptions

    @nn.compact
    def __call__(self, x, *, bn_train: bool):
        o = self.opts
        for j, (width, stride) in enumerate(zip(self.widths, (2, 1), strict=True), 1):
            x = nn.Conv(width, (3, 3), strides=stride, padding="VALID", use_bias=False,
                        dtype=o.dtype, kernel_init=_conv_init, name=f"conv{j}")(x)  # fmt: skip
            x = nn.relu(o.norm(bn_train=bn_train, name=f"conv{j}_bn")(x))
        return x


class Block(nn.Module):
    """ReLU + separable conv + BatchNorm per width (no first ReLU when `first_relu` is
    False), then either a max pool plus a 1x1 stride-2 conv + BatchNorm of the input
    (`downsample`), or the input itself, added."""

    widths: tuple[int, ...]
    opts: LayerOptions
    first_relu: bool = True
    downsample: bool = False

    @nn.compact
    def __call__(self, x, *, bn_train: bool):
        o = self.opts
        y = x
        for k, width in enumerate(self.widths, 1):
            if k > 1 or self.first_relu:
                y = nn.relu(y)
            y = SeparableConv(width, o, name=f"sepconv{k}")(y)
            y = o.norm(bn_train=bn_train, name=f"sepconv{k}_bn")(y)
        if not self.downsample:
            return y + x
        shortcut = layers.PointwiseConv(self.widths[-1], stride=2, dtype=o.dtype,
                                        kernel_init=_conv_init, name="shortcut")(x)  # fmt: skip
        return o.pool(y) + o.norm(bn_train=bn_train, name="shortcut_bn")(shortcut)


class FinalBlock(nn.Module):
    """The exit flow's last block: separable conv + BatchNorm + ReLU per width."""

    widths: tuple[int, ...]
    opts: LayerOptions

    @nn.compact
    def __call__(self, x, *, bn_train: bool):
        for k, width in enumerate(self.widths, 1):
            x = SeparableConv(width, self.opts, name=f"sepconv{k}")(x)
            x = nn.relu(self.opts.norm(bn_train=bn_train, name=f"sepconv{k}_bn")(x))
        return x


class Xception(nn.Module):
    """Backbone: normalised NHWC images -> globally average-pooled features (B, widths[-1])."""

    widths: tuple[int, ...]
    middle_blocks: int = 8
    opts: LayerOptions = LayerOptions()

    @nn.compact
    def __call__(self, x, *, train: bool = False, bn_train: bool = False):
        del train  # no dropout or stochastic depth
        if min(x.shape[1:3]) < MIN_SIZE:
            raise ConfigError(
                f"xception: input of {x.shape[1]}x{x.shape[2]} px is too small; the stem's "
                f"valid convs need >= {MIN_SIZE} px a side (data.image_size; Keras asks >= 71)"
            )
        o, w = self.opts, self.widths
        call = functools.partial(layers.block_call, remat=o.remat, bn_train=bn_train)
        x = call(Stem(w[:2], o, name="block1"), x.astype(o.dtype))
        for b, width in enumerate(w[2:5], 2):
            block = Block((width, width), o, first_relu=b > 2, downsample=True, name=f"block{b}")
            x = call(block, x)
        for b in range(5, 5 + self.middle_blocks):
            x = call(Block((w[4],) * 3, o, name=f"block{b}"), x)
        b = 5 + self.middle_blocks
        x = call(Block((w[4], w[5]), o, downsample=True, name=f"block{b}"), x)
        x = call(FinalBlock(w[6:8], o, name=f"block{b + 1}"), x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def block_convs(middle_blocks: int) -> list[tuple[str, ...]]:
    """Per block (block1 first), its convs in depth order (BatchNorms follow their conv)."""
    out = [("conv1", "conv2")]
    out += [("sepconv1", "sepconv2")] * 3
    out += [("sepconv1", "sepconv2", "sepconv3")] * middle_blocks
    return out + [("sepconv1", "sepconv2")] * 2


def module_depths(middle_blocks: int) -> dict[str, tuple[int, int]]:
    """'block{b}/{module}' -> (stage, layer) for every module with parameters; the shortcut
    (of blocks 2-4 and the exit block) is at its block's first layer."""
    table, layer = {}, 0
    convs = block_convs(middle_blocks)
    for b, names in enumerate(convs, 1):
        if b in (2, 3, 4, len(convs) - 1):
            table[f"block{b}/shortcut"] = table[f"block{b}/shortcut_bn"] = (b - 1, layer)
        for name in names:
            table[f"block{b}/{name}"] = table[f"block{b}/{name}_bn"] = (b - 1, layer)
            layer += 1
    return table


_PATH = re.compile(r"backbone/(block\d+/[a-z_0-9]+)/.+")


def position(name: str, *, table: dict, n_stages: int, n_layers: int) -> tuple[int, int]:
    """(stage, layer) of a parameter name, with or without a leading collection."""
    path = re.sub(r"^(params|batch_stats)/", "", name)
    if path.startswith("head/"):
        return n_stages, n_layers
    m = _PATH.fullmatch(path)
    if m and m[1] in table:
        return table[m[1]]
    raise ValueError(
        f"xception ({n_stages} blocks): no parameter {name!r}; names are "
        "'backbone/block1/conv<j>[_bn]/...', 'backbone/block<b>/sepconv<k>[_bn]/...', "
        "'backbone/block<b>/shortcut[_bn]/...' (blocks 2-4 and the exit block) or 'head/...'"
    )


def _validated(arch: dict) -> dict:
    try:
        widths = tuple(int(v) for v in arch["widths"])
        ok = len(widths) == 8 and min(widths) >= 1 and tuple(arch["widths"]) == widths
    except (TypeError, ValueError):
        widths, ok = (), False
    if not ok:
        raise ConfigError(
            f"xception: widths={arch['widths']!r}; give 8 positive integers: block1's two "
            "convs, blocks 2, 3, 4 (and the middle flow), the exit block, the last two "
            f"separable convs (Xception: {DEFAULTS['widths']})"
        )
    checks = {
        "middle_blocks": isinstance(arch["middle_blocks"], int)
        and not isinstance(arch["middle_blocks"], bool)
        and arch["middle_blocks"] >= 0,
        "pool_padding": arch["pool_padding"] in POOL_PADDINGS,
        "bn_eps": isinstance(arch["bn_eps"], (int, float)) and arch["bn_eps"] > 0,
        "bn_momentum": isinstance(arch["bn_momentum"], (int, float))
        and 0 <= arch["bn_momentum"] < 1,
        "depthwise": arch["depthwise"] in DEPTHWISE,
    }
    for key, good in checks.items():
        if not good:
            raise ConfigError(
                f"xception: {key}={arch[key]!r} is out of range; middle_blocks: an integer "
                f">= 0, pool_padding: {POOL_PADDINGS}, bn_eps > 0, bn_momentum in [0, 1), "
                f"depthwise: {DEPTHWISE}"
            )
    return {**arch, "widths": widths, "bn_eps": float(arch["bn_eps"]),
            "bn_momentum": float(arch["bn_momentum"])}  # fmt: skip


def build(
    name: str, *, head: nn.Module, dtype: Any = jnp.float32, remat: bool = False, **overrides
) -> common.ModelSpec:
    """The registered builder: ARCHS[name] with `overrides` (see the module docstring)."""
    common.check_overrides("xception", overrides, DEFAULTS)
    arch = _validated({**DEFAULTS, **ARCHS[name], **overrides})
    opts = LayerOptions(
        arch["bn_eps"], arch["bn_momentum"], arch["pool_padding"], arch["depthwise"], dtype, remat
    )
    backbone = Xception(arch["widths"], arch["middle_blocks"], opts)
    table = module_depths(arch["middle_blocks"])
    n_stages = len(block_convs(arch["middle_blocks"]))
    n_layers = sum(len(c) for c in block_convs(arch["middle_blocks"]))
    where = functools.partial(position, table=table, n_stages=n_stages, n_layers=n_layers)
    return common.ModelSpec(
        name=name,
        family="xception",
        module=common.Classifier(backbone=backbone, head=head),
        preprocessing=pp.minus_one_to_one(RESOLUTION[name], CROP_PCT, interpolation="bicubic"),
        n_stages=n_stages,
        stage_of=lambda n: where(n)[0],
        n_layers=n_layers,
        layer_of=lambda n: where(n)[1],
        feature_dim=arch["widths"][-1],
        arch=arch,
    )


for _name in ARCHS:
    common.register(_name)(functools.partial(build, _name))
