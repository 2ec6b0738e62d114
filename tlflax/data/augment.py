"""Augmentation and normalisation on the device: pure JAX, inside jit, fixed shapes.

Batches arrive as uint8 (B, S, S, 3) at the stored size S (short side resized to S and
centre-cropped on the host). Training cuts an image_size crop (centre, random, or
inception-style random resized), then flips, rotates, shifts and colour-jitters each
example with its own key (vmap), normalises with the checkpoint's `Preprocessing`, and
mixes examples (mixup / cutmix) into soft targets. Evaluation is the centre crop and the
normalisation only.

Geometry is one inverse map per example (output pixel -> stored pixel) and one bilinear
sample, so a crop followed by a rotation loses no more detail than the crop alone. Where a
rotation or shift uncovers area, the stored image around the crop fills it when it has
pixels there; `fill_mode` applies only beyond the stored image. A plain centre or random
crop with flips (no rotation, no shift) takes an exact slicing path instead.

Named policies (`config.aug.policy`) sit where torchvision's sit: RandAugment,
TrivialAugmentWide and AugMix see the crop as a uint8 image (rounded to 0..255 integers,
after crop / flip / rotation / shift, before colour jitter and normalisation), and every op
returns integers again, as torchvision's ops on uint8 tensors do. Random erasing acts on the
normalised image, before mixup / cutmix. The op set, magnitude bins and signs are
torchvision's (`transforms/autoaugment.py`), and each op reproduces torchvision's tensor
arithmetic (tests/test_augment_policies.py). The op of each example is drawn under jit and
chosen by select: every op family is computed and one result kept, so shapes are fixed and
nothing recompiles from batch to batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from tlflax.errors import ConfigError

CROPS = ("resize", "random", "inception")
FILL_MODES = ("nearest", "constant", "reflect")
POLICIES = ("", "randaugment", "trivialaugment", "augmix")
INTERPOLATIONS = ("nearest", "bilinear")
ERASING_VALUES = ("zero", "random")
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as PIL and torchvision use for grey


@dataclasses.dataclass(frozen=True)
class AugSettings:
    """config.aug, checked once, as plain Python values (static under jit)."""

    crop: str
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    flip: bool
    vflip: bool
    rotation: float  # degrees
    width_shift: float
    height_shift: float
    fill_mode: str
    fill_value: float
    brightness: float
    contrast: float
    saturation: float
    hue: float
    mixup_alpha: float
    cutmix_alpha: float
    mix_prob: float
    cutmix_switch_prob: float
    label_smoothing: float
    policy: str
    randaugment_n: int
    randaugment_m: int
    magnitude_bins: int
    policy_interpolation: str
    policy_fill: float
    augmix_severity: int
    augmix_width: int
    augmix_depth: int
    augmix_alpha: float
    erasing_prob: float
    erasing_scale: tuple[float, float]
    erasing_ratio: tuple[float, float]
    erasing_value: str

    @classmethod
    def from_config(cls, aug_config) -> AugSettings:
        values = {f.name: aug_config[f.name] for f in dataclasses.fields(cls)}
        for name in ("crop_scale", "crop_ratio", "erasing_scale", "erasing_ratio"):
            values[name] = tuple(float(v) for v in values[name])
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        _require(self.crop in CROPS, f"config.aug.crop={self.crop!r}; use one of {CROPS}")
        _require(
            self.fill_mode in FILL_MODES,
            f"config.aug.fill_mode={self.fill_mode!r}; use one of {FILL_MODES}",
        )
        lo, hi = self.crop_scale
        _require(
            0 < lo <= hi <= 1, f"config.aug.crop_scale={self.crop_scale}; need 0 < a <= b <= 1"
        )
        lo, hi = self.crop_ratio
        _require(0 < lo <= hi, f"config.aug.crop_ratio={self.crop_ratio}; need 0 < a <= b")
        for name in ("width_shift", "height_shift", "brightness", "contrast", "saturation"):
            _require(getattr(self, name) >= 0, f"config.aug.{name} must be >= 0")
        _require(0 <= self.hue <= 0.5, f"config.aug.hue={self.hue}; use a value in [0, 0.5]")
        _require(self.rotation >= 0, f"config.aug.rotation={self.rotation}; give degrees >= 0")
        _require(self.mixup_alpha >= 0 and self.cutmix_alpha >= 0, "mixup/cutmix alphas >= 0")
        for name in ("mix_prob", "cutmix_switch_prob"):
            _require(0 <= getattr(self, name) <= 1, f"config.aug.{name} must be in [0, 1]")
        _require(
            0 <= self.label_smoothing < 1,
            f"config.aug.label_smoothing={self.label_smoothing}; use a value in [0, 1)",
        )
        self._check_policy()
        self._check_erasing()

    def _check_policy(self) -> None:
        _require(
            self.policy in POLICIES, f"config.aug.policy={self.policy!r}; use one of {POLICIES}"
        )
        _require(
            self.randaugment_n >= 0,
            f"config.aug.randaugment_n={self.randaugment_n}; give a count of ops >= 0 (default 2)",
        )
        _require(
            self.magnitude_bins >= 2,
            f"config.aug.magnitude_bins={self.magnitude_bins}; give >= 2 bins (default 31)",
        )
        _require(
            0 <= self.randaugment_m < self.magnitude_bins,
            f"config.aug.randaugment_m={self.randaugment_m}; use a bin in "
            f"[0, magnitude_bins - 1 = {self.magnitude_bins - 1}] (default 9 of 31)",
        )
        _require(
            self.policy_interpolation in INTERPOLATIONS,
            f"config.aug.policy_interpolation={self.policy_interpolation!r}; "
            f"use one of {INTERPOLATIONS}",
        )
        _require(
            0 <= self.policy_fill <= 255,
            f"config.aug.policy_fill={self.policy_fill}; give a pixel value in [0, 255]",
        )
        _require(
            1 <= self.augmix_severity <= _AUGMIX_BINS,
            f"config.aug.augmix_severity={self.augmix_severity}; use 1..{_AUGMIX_BINS} (default 3)",
        )
        _require(
            self.augmix_width >= 1,
            f"config.aug.augmix_width={self.augmix_width}; give >= 1 chains (default 3)",
        )
        _require(
            self.augmix_depth == -1 or self.augmix_depth >= 1,
            f"config.aug.augmix_depth={self.augmix_depth}; give >= 1 ops, or -1 for 1..3 at random",
        )
        _require(
            self.augmix_alpha > 0,
            f"config.aug.augmix_alpha={self.augmix_alpha}; give a concentration > 0 (default 1)",
        )

    def _check_erasing(self) -> None:
        _require(
            0 <= self.erasing_prob <= 1,
            f"config.aug.erasing_prob={self.erasing_prob}; use a probability in [0, 1]",
        )
        lo, hi = self.erasing_scale
        _require(
            0 <= lo <= hi < 1,
            f"config.aug.erasing_scale={self.erasing_scale}; need 0 <= a <= b < 1 "
            "(fractions of the image; default (0.02, 0.33))",
        )
        lo, hi = self.erasing_ratio
        _require(
            0 < lo <= hi,
            f"config.aug.erasing_ratio={self.erasing_ratio}; need 0 < a <= b (height / width; "
            "default (0.3, 3.3))",
        )
        _require(
            self.erasing_value in ERASING_VALUES,
            f"config.aug.erasing_value={self.erasing_value!r}; use one of {ERASING_VALUES}",
        )

    @property
    def exact_geometry(self) -> bool:
        """Integer crops and flips only: slicing, no resampling."""
        return self.crop != "inception" and not (
            self.rotation or self.width_shift or self.height_shift
        )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)  # a ValueError: one line on the command line


# ----------------------------------------------------------------------------- factories


def make_train_transform(aug_config, *, image_size: int, num_classes: int, preprocessing):
    """fn(rng, images uint8 (B, S, S, 3), labels int (B,)) -> (float32 images, (B, K) targets)."""
    settings = AugSettings.from_config(aug_config)
    one_example = make_example_transform(
        aug_config, image_size=image_size, preprocessing=preprocessing
    )

    def transform(rng, images, labels):
        _check_stored_size(images.shape, image_size)
        k_examples, k_mix = jax.random.split(rng)
        keys = jax.random.split(k_examples, images.shape[0])
        x = jax.vmap(one_example)(keys, images)
        targets = smooth_onehot(labels, num_classes, settings.label_smoothing)
        if settings.mixup_alpha > 0 or settings.cutmix_alpha > 0:
            x, targets = _mix(k_mix, x, targets, settings)
        return x, targets

    return transform


def make_example_transform(aug_config, *, image_size: int, preprocessing):
    """fn(rng, image uint8 (S, S, 3)) -> float32 (image_size, image_size, 3): one example's
    geometry, policy, colour and erasing (what mixes examples, mixup / cutmix, is not here)."""
    settings = AugSettings.from_config(aug_config)
    normalise = _normaliser(preprocessing)
    policy_fn = make_policy(settings, image_size)

    def one_example(rng, image):
        k_geometry, k_colour = jax.random.split(rng)
        x = _geometry(k_geometry, image, settings, image_size)
        if settings.policy or settings.erasing_prob:  # else the keys of earlier versions
            k_colour, k_policy, k_erase = jax.random.split(k_colour, 3)
        if settings.policy:
            x = policy_fn(k_policy, x)
        x = normalise(_colour(k_colour, x, settings))
        if settings.erasing_prob:
            x = random_erase(k_erase, x, settings)
        return x

    return one_example


def make_eval_transform(*, image_size: int, preprocessing):
    """fn(images uint8 (B, S, S, 3)) -> float32 (B, image_size, image_size, 3): centre crop."""
    normalise = _normaliser(preprocessing)

    def transform(images):
        _check_stored_size(images.shape, image_size)
        top = centre_offset(images.shape[1], image_size)
        left = centre_offset(images.shape[2], image_size)
        crop = images[:, top : top + image_size, left : left + image_size, :]
        return normalise(crop.astype(jnp.float32))

    return transform


def centre_offset(stored: int, size: int) -> int:
    """Offset of a centre crop, rounded as torchvision's CenterCrop rounds it."""
    return int(round((stored - size) / 2.0))


def smooth_onehot(labels, num_classes: int, label_smoothing: float):
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if label_smoothing:
        onehot = onehot * (1.0 - label_smoothing) + label_smoothing / num_classes
    return onehot


def _normaliser(preprocessing):
    mean = jnp.asarray(preprocessing.mean, jnp.float32)
    inv_std = 1.0 / jnp.asarray(preprocessing.std, jnp.float32)
    return lambda x: (x - mean) * inv_std


def _check_stored_size(shape, image_size: int) -> None:
    if len(shape) != 4 or shape[-1] != 3 or min(shape[1], shape[2]) < image_size:
        raise ValueError(
            f"augment: images of shape {tuple(shape)} cannot give {image_size}x{image_size} crops; "
            "the stored size (data resize) must be >= image_size, with 3 channels"
        )


# ----------------------------------------------------------------------------- geometry


def _geometry(rng, image, s: AugSettings, size: int):
    """One uint8 (S, S, 3) image -> float32 (size, size, 3) in 0..255."""
    k_crop, k_flip, k_vflip, k_rotate, k_shift = jax.random.split(rng, 5)
    flip = s.flip & (jax.random.uniform(k_flip) < 0.5)
    vflip = s.vflip & (jax.random.uniform(k_vflip) < 0.5)
    if s.exact_geometry:
        return _slice_crop(k_crop, image, s, size, flip=flip, vflip=vflip)
    box = crop_box(k_crop, image.shape[:2], s, size)
    angle = jnp.deg2rad(s.rotation) * jax.random.uniform(k_rotate, minval=-1.0, maxval=1.0)
    limits = jnp.asarray([s.height_shift, s.width_shift]) * size
    shift = limits * jax.random.uniform(k_shift, (2,), minval=-1.0, maxval=1.0)
    ys, xs = _source_coordinates(box, size, flip=flip, vflip=vflip, angle=angle, shift=shift)
    return _bilinear(image, ys, xs, fill_mode=s.fill_mode, fill_value=s.fill_value)


def _slice_crop(rng, image, s: AugSettings, size: int, *, flip, vflip):
    height, width = image.shape[:2]
    if s.crop == "random":
        k_top, k_left = jax.random.split(rng)
        top = jax.random.randint(k_top, (), 0, height - size + 1)
        left = jax.random.randint(k_left, (), 0, width - size + 1)
    else:
        top, left = centre_offset(height, size), centre_offset(width, size)
    crop = jax.lax.dynamic_slice(image, (top, left, 0), (size, size, 3))
    crop = jnp.where(flip, crop[:, ::-1], crop)
    crop = jnp.where(vflip, crop[::-1], crop)
    return crop.astype(jnp.float32)


def crop_box(rng, stored_hw, s: AugSettings, size: int):
    """(top, left, height, width) of the train crop in stored pixels (float32, in bounds)."""
    height, width = stored_hw
    if s.crop == "inception":
        return _inception_box(rng, height, width, s.crop_scale, s.crop_ratio)
    if s.crop == "random":
        k_top, k_left = jax.random.split(rng)
        top = jax.random.randint(k_top, (), 0, height - size + 1)
        left = jax.random.randint(k_left, (), 0, width - size + 1)
    else:
        top, left = centre_offset(height, size), centre_offset(width, size)
    return jnp.asarray([top, left, size, size], jnp.float32)


def _inception_box(rng, height: int, width: int, scale, ratio, attempts: int = 10):
    """Random area fraction in `scale`, log-uniform aspect in `ratio`; the first of
    `attempts` draws that fits wins, else the whole image at the nearest allowed aspect."""
    k_area, k_ratio, k_top, k_left = jax.random.split(rng, 4)
    area = (
        height * width * jax.random.uniform(k_area, (attempts,), minval=scale[0], maxval=scale[1])
    )
    log_ratio = jax.random.uniform(
        k_ratio, (attempts,), minval=math.log(ratio[0]), maxval=math.log(ratio[1])
    )
    aspect = jnp.exp(log_ratio)
    crop_w, crop_h = jnp.sqrt(area * aspect), jnp.sqrt(area / aspect)
    fits = (crop_w <= width) & (crop_h <= height)
    first = jnp.argmax(fits)
    fallback_w, fallback_h = _fallback_size(height, width, ratio)
    crop_w = jnp.where(fits.any(), crop_w[first], fallback_w)
    crop_h = jnp.where(fits.any(), crop_h[first], fallback_h)
    top = jax.random.uniform(k_top) * (height - crop_h)
    left = jax.random.uniform(k_left) * (width - crop_w)
    return jnp.stack([top, left, crop_h, crop_w]).astype(jnp.float32)


def _fallback_size(height: int, width: int, ratio) -> tuple[float, float]:
    aspect = width / height
    if aspect < ratio[0]:
        return float(width), width / ratio[0]
    if aspect > ratio[1]:
        return height * ratio[1], float(height)
    return float(width), float(height)


def _source_coordinates(box, size: int, *, flip, vflip, angle, shift):
    """Stored-image coordinates (continuous, pixel centres at +0.5) of each output pixel."""
    top, left, crop_h, crop_w = box[0], box[1], box[2], box[3]
    centre = (jnp.arange(size, dtype=jnp.float32) + 0.5) - size / 2.0
    v, u = jnp.meshgrid(centre, centre, indexing="ij")  # output pixels, about the centre
    u = jnp.where(flip, -u, u)
    v = jnp.where(vflip, -v, v)
    v, u = v - shift[0], u - shift[1]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    u, v = cos * u - sin * v, sin * u + cos * v
    ys = top + crop_h / 2.0 + v * (crop_h / size)
    xs = left + crop_w / 2.0 + u * (crop_w / size)
    return ys, xs


def _bilinear(image, ys, xs, *, fill_mode: str, fill_value: float):
    height, width = image.shape[:2]
    inside = (ys >= 0) & (ys <= height) & (xs >= 0) & (xs <= width)
    yi, xi = ys - 0.5, xs - 0.5  # continuous -> index coordinates
    if fill_mode == "reflect":
        yi, xi = _reflect(yi, height), _reflect(xi, width)
    y0, x0 = jnp.floor(yi), jnp.floor(xi)
    wy, wx = (yi - y0)[..., None], (xi - x0)[..., None]
    y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
    # Clamped neighbours: edge pixels extend half a pixel ('nearest' extends them forever).
    ya, yb = jnp.clip(y0, 0, height - 1), jnp.clip(y0 + 1, 0, height - 1)
    xa, xb = jnp.clip(x0, 0, width - 1), jnp.clip(x0 + 1, 0, width - 1)
    img = image.astype(jnp.float32)
    top = img[ya, xa] * (1 - wx) + img[ya, xb] * wx
    bottom = img[yb, xa] * (1 - wx) + img[yb, xb] * wx
    out = top * (1 - wy) + bottom * wy
    if fill_mode == "constant":
        out = jnp.where(inside[..., None], out, jnp.float32(fill_value))
    return out


def _reflect(index, n: int):
    """Mirror index coordinates into [-0.5, n - 0.5] (d c b a | a b c d | d c b a)."""
    period = 2.0 * n
    t = jnp.mod(index + 0.5, period)
    t = jnp.where(t > n, period - t, t)
    return t - 0.5


# ----------------------------------------------------------------------------- colour


def _colour(rng, x, s: AugSettings):
    """Brightness, contrast, saturation, hue (in that order) on float 0..255 pixels."""
    k_b, k_c, k_s, k_h = jax.random.split(rng, 4)
    if s.brightness:
        x = jnp.clip(x * _factor(k_b, s.brightness), 0.0, 255.0)
    if s.contrast:
        mean = jnp.mean(_grey(x))
        x = jnp.clip((x - mean) * _factor(k_c, s.contrast) + mean, 0.0, 255.0)
    if s.saturation:
        grey = _grey(x)[..., None]
        x = jnp.clip(grey + (x - grey) * _factor(k_s, s.saturation), 0.0, 255.0)
    if s.hue:
        x = _shift_hue(x, jax.random.uniform(k_h, minval=-s.hue, maxval=s.hue))
    return x


def _factor(rng, amount: float):
    return jax.random.uniform(rng, minval=max(0.0, 1.0 - amount), maxval=1.0 + amount)


def _grey(x):
    return _GREY[0] * x[..., 0] + _GREY[1] * x[..., 1] + _GREY[2] * x[..., 2]


def _shift_hue(x, turn):
    """Add `turn` to the HSV hue of every pixel (as torchvision's adjust_hue); grey stays."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    value = jnp.maximum(jnp.maximum(r, g), b)
    chroma = value - jnp.minimum(jnp.minimum(r, g), b)
    saturation = jnp.where(value > 0, chroma / jnp.where(value > 0, value, 1.0), 0.0)
    safe = jnp.where(chroma > 0, chroma, 1.0)
    rc, gc, bc = (value - r) / safe, (value - g) / safe, (value - b) / safe
    hue = jnp.where(value == r, bc - gc, jnp.where(value == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = jnp.where(chroma > 0, hue / 6.0, 0.0)
    hue = jnp.mod(hue + turn, 1.0) * 6.0
    # HSV -> RGB without branches: channel n in (5, 3, 1) for (R, G, B).
    k = jnp.mod(jnp.asarray([5.0, 3.0, 1.0]) + hue[..., None], 6.0)
    ramp = jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
    return value[..., None] * (1.0 - saturation[..., None] * ramp)


# ----------------------------------------------------------------------------- mixing


def _mix(rng, x, targets, s: AugSettings):
    """Mixup / cutmix with the example at the mirrored batch position, one lambda each."""
    batch, height, width = x.shape[:3]
    partner = jnp.arange(batch)[::-1]
    k_apply, k_switch, k_mixup, k_cutmix, k_box = jax.random.split(rng, 5)
    apply = jax.random.uniform(k_apply, (batch,)) < s.mix_prob
    if s.cutmix_alpha > 0 and s.mixup_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch, (batch,)) < s.cutmix_switch_prob
    else:
        use_cutmix = jnp.full((batch,), s.cutmix_alpha > 0)
    lam = jnp.ones((batch,), jnp.float32)
    mixed = x
    if s.mixup_alpha > 0:
        lam_mixup = jax.random.beta(k_mixup, s.mixup_alpha, s.mixup_alpha, (batch,))
        blend = lam_mixup[:, None, None, None]
        mixed = jnp.where(
            (apply & ~use_cutmix)[:, None, None, None], blend * x + (1 - blend) * x[partner], x
        )
        lam = jnp.where(apply & ~use_cutmix, lam_mixup, lam)
    if s.cutmix_alpha > 0:
        lam_cut = jax.random.beta(k_cutmix, s.cutmix_alpha, s.cutmix_alpha, (batch,))
        inside, kept = jax.vmap(lambda key, lam_i: _cut_box(key, lam_i, height, width))(
            jax.random.split(k_box, batch), lam_cut
        )
        paste = (apply & use_cutmix)[:, None, None] & inside
        mixed = jnp.where(paste[..., None], x[partner], mixed)
        lam = jnp.where(apply & use_cutmix, kept, lam)
    targets = lam[:, None] * targets + (1 - lam[:, None]) * targets[partner]
    return mixed, targets


def _cut_box(rng, lam, height: int, width: int):
    """(mask of the pasted box, fraction of the image kept): a box of area ~(1 - lam)."""
    k_y, k_x = jax.random.split(rng)
    cut = jnp.sqrt(1.0 - lam)
    cut_h, cut_w = jnp.round(height * cut), jnp.round(width * cut)
    cy = jax.random.uniform(k_y) * height
    cx = jax.random.uniform(k_x) * width
    y0, y1 = (
        jnp.clip(jnp.round(cy - cut_h / 2), 0, height),
        jnp.clip(jnp.round(cy + cut_h / 2), 0, height),
    )
    x0, x1 = (
        jnp.clip(jnp.round(cx - cut_w / 2), 0, width),
        jnp.clip(jnp.round(cx + cut_w / 2), 0, width),
    )
    rows = jnp.arange(height, dtype=jnp.float32)[:, None]
    cols = jnp.arange(width, dtype=jnp.float32)[None, :]
    inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    kept = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    return inside, kept


# ----------------------------------------------------------------------------- policy ops

# torchvision's RandAugment / TrivialAugmentWide op set, in its order (op i is OPS[i]).
OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
_OP = {name: i for i, name in enumerate(OPS)}
_GEOMETRIC = OPS[:6]  # op_matrix gives Identity (and every non-geometric op) the identity
_BLENDS = ("Brightness", "Color", "Contrast", "Sharpness")
SIGNED = np.array([op in _GEOMETRIC[1:] + _BLENDS for op in OPS])  # magnitude gets a random sign
# AugMix's ops (all_ops=True): no Identity. Ops are drawn uniformly, so the order is moot.
_AUGMIX_OPS = OPS[1:6] + OPS[10:] + _BLENDS
_AUGMIX_BINS = 10  # torchvision's AugMix._PARAMETER_MAX
_TV_GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale on tensors


def magnitude_table(policy: str, *, bins: int, size: int) -> np.ndarray:
    """float32 (len(OPS), bins): each op's magnitude per bin, before the sign, as in
    torchvision's `_augmentation_space` of RandAugment, TrivialAugmentWide and AugMix
    (AugMix: always 10 bins), for square size x size crops. Ops without a magnitude have
    zeros."""
    shear, translate, rotate, blend, bits, top_bits = {
        "randaugment": (0.3, 150.0 / 331.0 * size, 30.0, 0.9, 4, 8),
        "trivialaugment": (0.99, 32.0, 135.0, 0.99, 6, 8),
        "augmix": (0.3, size / 3.0, 30.0, 0.9, 4, 4),
    }[policy]
    rows = dict.fromkeys(_BLENDS, _linspace(0.0, blend, bins))
    rows.update(ShearX=_linspace(0.0, shear, bins), ShearY=_linspace(0.0, shear, bins))
    rows.update(TranslateX=_linspace(0.0, translate, bins), Rotate=_linspace(0.0, rotate, bins))
    rows.update(TranslateY=rows["TranslateX"], Solarize=_linspace(255.0, 0.0, bins))
    rows["Posterize"] = top_bits - np.round(np.arange(bins) / ((bins - 1) / bits))
    return np.stack([rows.get(op, np.zeros(bins)) for op in OPS]).astype(np.float32)


def _linspace(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace's float32 values: a float32 step, each value rounded once from the
    nearer end. np.linspace differs in the last bit, enough for int() of TrivialAugment's
    16-pixel translate bin to give 15."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(n - 1))
    i = np.arange(n)
    from_start = np.float64(start32) + step * i
    from_end = np.float64(end32) - step * (n - 1 - i)
    return np.where(i < n // 2, from_start, from_end).astype(np.float32)


def apply_op(x, op, magnitude, matrix, *, interpolation: str = "nearest", fill: float = 0.0):
    """torchvision's `_apply_op` on a float32 (H, W, 3) image of 0..255 integers.

    `op` indexes OPS and may be traced; `magnitude` is the signed value (degrees, a shear,
    pixels, a factor - 1, bits or a threshold); `matrix` is `op_matrix(OPS[op], magnitude,
    H, W)` for the geometric ops (ignored by the others). The result holds 0..255 integers
    again. All three op families run and the op's is kept (one resample, one blend, the tone
    curves), so a per-example op under vmap costs about three ops, not fourteen.
    """
    is_op = lambda names: jnp.isin(op, jnp.asarray([_OP[n] for n in names]))  # noqa: E731
    warped = _warp(x, matrix, interpolation=interpolation, fill=fill)
    x = jnp.where(is_op(_GEOMETRIC[1:]), warped, x)
    x = jnp.where(is_op(_BLENDS), _blend_op(x, op, magnitude), x)
    return _tone_op(x, op, magnitude)


def op_matrix(op: str, magnitude: float, height: int, width: int) -> np.ndarray:
    """float32 (2, 3), on the host: the inverse map of a geometric op as torchvision's tensor
    path builds it (float64, then float32, each row over half the size): an output pixel
    centre (x, y, 1), relative to the image centre, -> its source in [-1, 1] units. The
    identity for the other ops. Built on the host so that ties between two source pixels
    fall as torchvision's fall (a float32 cos / tan of 30 degrees would not)."""
    m = float(magnitude)
    rows = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    if op == "ShearX":  # about the top row (torchvision's center=[0, 0])
        rows[0] = [1.0, m, m * height / 2]
    elif op == "ShearY":  # about the left column
        rows[1] = [m, 1.0, m * width / 2]
    elif op in ("TranslateX", "TranslateY"):  # torchvision: translate=[int(magnitude), 0]
        rows[op == "TranslateY"][2] = -float(math.trunc(m))
    elif op == "Rotate":  # counter-clockwise about the centre
        cos, sin = math.cos(math.radians(m)), math.sin(math.radians(m))
        rows = [[cos, -sin, 0.0], [sin, cos, 0.0]]
    theta = np.asarray(rows, np.float64).astype(np.float32)
    return theta / np.asarray([[width / 2], [height / 2]], np.float32)


def _warp(x, matrix, *, interpolation: str, fill: float):
    """Sample x where `matrix` sends each output pixel, in torchvision's float32 order of
    operations (affine grid, then grid_sample with align_corners=False and zero padding;
    a nonzero fill is blended in by coverage, as torchvision does)."""
    height, width = x.shape[:2]
    rows = jnp.arange(height, dtype=jnp.float32) + (0.5 - height / 2)
    cols = jnp.arange(width, dtype=jnp.float32) + (0.5 - width / 2)
    v, u = jnp.meshgrid(rows, cols, indexing="ij")
    grid = [_mul(u, matrix[k, 0]) + _mul(v, matrix[k, 1]) + matrix[k, 2] for k in (0, 1)]
    # grid_sample's unnormalisation is a fused multiply-add in torch, and XLA fuses it too.
    xs, ys = ((g + 1.0) * (n / 2) - 0.5 for g, n in zip(grid, (width, height), strict=True))
    corners = [(jnp.round(ys), jnp.round(xs), 1.0)]  # nearbyint: half to even, as torch
    if interpolation == "bilinear":
        y0, x0 = jnp.floor(ys), jnp.floor(xs)
        wy, wx = (ys - y0, y0 + 1.0 - ys), (xs - x0, x0 + 1.0 - xs)
        corners = [(y0 + dy, x0 + dx, wy[1 - dy] * wx[1 - dx]) for dy in (0, 1) for dx in (0, 1)]
    out, coverage = jnp.zeros_like(x), jnp.zeros_like(xs)
    for yi, xi, weight in corners:
        inside = (yi >= 0) & (yi <= height - 1) & (xi >= 0) & (xi <= width - 1)
        weight = jnp.where(inside, weight, 0.0)
        ya = jnp.clip(yi, 0, height - 1).astype(jnp.int32)
        xa = jnp.clip(xi, 0, width - 1).astype(jnp.int32)
        out, coverage = out + _mul(x[ya, xa], weight[..., None]), coverage + weight
    if fill:  # torchvision: img * mask + (1 - mask) * fill, on the zero-padded sample
        out = _mul(out, coverage[..., None]) + _mul(1.0 - coverage[..., None], fill)
    return jnp.clip(jnp.round(out), 0.0, 255.0)


def _mul(a, b):
    """a * b rounded to float32 on its own, as torch rounds every product. Left alone, XLA
    fuses a product and the sum after it into one multiply-add (a single rounding), which
    moves nearest-pixel ties and uint8 truncations to the other side of torchvision's."""
    product = a * b
    return jnp.where(jnp.isnan(product), 0.0, product)  # a select: no fusing across it


def _blend_op(x, op, magnitude):
    """Brightness, Color, Contrast, Sharpness: torchvision's _blend with factor 1 + m of the
    image and a degenerate one (black, its grey, its mean grey, its smoothed self)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    grey = jnp.floor(_mul(r, _TV_GREY[0]) + _mul(g, _TV_GREY[1]) + _mul(b, _TV_GREY[2]))
    degenerate = jnp.zeros_like(x)
    degenerate = jnp.where(op == _OP["Color"], grey[..., None], degenerate)
    degenerate = jnp.where(op == _OP["Contrast"], jnp.mean(grey), degenerate)
    degenerate = jnp.where(op == _OP["Sharpness"], _smoothed(x), degenerate)
    # torchvision: ratio * img + (1.0 - ratio) * other, with 1.0 - ratio == -m exactly.
    blended = _mul(x, 1.0 + magnitude) + _mul(degenerate, -magnitude)
    return jnp.floor(jnp.clip(blended, 0.0, 255.0))  # uint8 cast truncates


def _smoothed(x):
    """torchvision's sharpness reference: 3x3 weights 1 (centre 5) / 13, rounded; the
    border pixels are the image's own."""
    height, width = x.shape[:2]
    side, centre = np.float32(1.0) / np.float32(13.0), np.float32(5.0) / np.float32(13.0)
    total = jnp.zeros((height - 2, width - 2, x.shape[2]), x.dtype)
    for dy in range(3):
        for dx in range(3):
            weight = centre if dy == dx == 1 else side
            total = total + weight * x[dy : dy + height - 2, dx : dx + width - 2]
    # A sum of integers over 13 is never within float error of k + 1/2: any order rounds alike.
    return x.at[1:-1, 1:-1].set(jnp.round(total))


def _tone_op(x, op, magnitude):
    """Posterize (keep `m` bits), Solarize (invert from threshold `m`), AutoContrast and
    Equalize, per channel; any other op passes x through."""
    step = 2.0 ** (8.0 - jnp.clip(magnitude, 0.0, 8.0))  # other ops' magnitudes: any step
    out = jnp.where(op == _OP["Posterize"], jnp.floor(x / step) * step, x)
    out = jnp.where(op == _OP["Solarize"], jnp.where(x >= magnitude, 255.0 - x, x), out)
    out = jnp.where(op == _OP["AutoContrast"], _autocontrast(x), out)
    return jnp.where(op == _OP["Equalize"], _equalize(x), out)


def _autocontrast(x):
    lo, hi = x.min(axis=(0, 1)), x.max(axis=(0, 1))
    flat = hi == lo  # torchvision: a flat channel keeps its values (min 0, scale 1)
    # 255 * (1 / range): torch evaluates `255 / tensor` as a reciprocal times 255.
    scale = jnp.where(flat, 1.0, 255.0 * (1.0 / jnp.where(flat, 1.0, hi - lo)))
    lo = jnp.where(flat, 0.0, lo)
    return jnp.floor(jnp.clip((x - lo) * scale, 0.0, 255.0))


def _equalize(x):
    """torchvision's equalize: per channel, a lookup table from the cumulative histogram
    with the brightest level's count left out of the step; a channel with one level (or
    too few pixels below its brightest) is kept."""
    values = x.reshape(-1, x.shape[-1]).astype(jnp.int32).T  # (C, P)
    hist = jax.vmap(lambda v: jnp.bincount(v, length=256))(values)
    brightest = jnp.take_along_axis(hist, values.max(axis=1, keepdims=True), axis=1)[:, 0]
    step = (values.shape[1] - brightest) // 255
    safe = jnp.maximum(step, 1)[:, None]
    lut = (jnp.cumsum(hist, axis=1) + safe // 2) // safe
    lut = jnp.clip(jnp.pad(lut, ((0, 0), (1, 0)))[:, :-1], 0, 255)
    out = jnp.take_along_axis(lut, values, axis=1).T.reshape(x.shape)
    return jnp.where(step == 0, x, out.astype(x.dtype))


# ----------------------------------------------------------------------------- policies


def make_policy(s: AugSettings, size: int):
    """fn(rng, x float32 (size, size, 3) in 0..255) -> the same, as 0..255 integers, for
    s.policy; None without one."""
    if not s.policy:
        return None
    n_bins = _AUGMIX_BINS if s.policy == "augmix" else s.magnitude_bins
    table = magnitude_table(s.policy, bins=n_bins, size=size)
    op_fn = table_op_fn(table, size, interpolation=s.policy_interpolation, fill=s.policy_fill)
    run = {"randaugment": _randaugment, "trivialaugment": _trivialaugment, "augmix": _augmix}
    policy = functools.partial(run[s.policy], s=s, n_bins=n_bins, op_fn=op_fn)

    def apply(rng, x):
        x = jnp.clip(jnp.round(x), 0.0, 255.0)  # the crop as the uint8 image torchvision has
        return policy(rng, x)

    return apply


def table_op_fn(table, size: int, *, interpolation: str, fill: float):
    """fn(image, op, bin, negate) -> apply_op at magnitude +-table[op, bin], with the
    geometric maps of every (op, bin, sign) built once on the host."""
    signed = np.stack([table, -table], axis=-1)  # (ops, bins, 2)
    matrices = np.asarray(
        [
            [[op_matrix(op, m, size, size) for m in pair] for pair in signed[i]]
            for i, op in enumerate(OPS)
        ]
    )
    signed, matrices = jnp.asarray(signed), jnp.asarray(matrices)

    def op_fn(image, op, bin_, negate):
        sign = negate.astype(jnp.int32)
        magnitude, matrix = signed[op, bin_, sign], matrices[op, bin_, sign]
        return apply_op(image, op, magnitude, matrix, interpolation=interpolation, fill=fill)

    return op_fn


def draw_op(rng, *, n_bins: int, ops=OPS, bin_=None):
    """(op index, magnitude bin, negate): an op uniform over `ops`, the bin `bin_` or uniform
    in [0, n_bins), the sign negative with probability 1/2 for the signed ops."""
    k_op, k_bin, k_sign = jax.random.split(rng, 3)
    op = jnp.asarray([_OP[name] for name in ops])[jax.random.randint(k_op, (), 0, len(ops))]
    if bin_ is None:
        bin_ = jax.random.randint(k_bin, (), 0, n_bins)
    negate = jnp.asarray(SIGNED)[op] & jax.random.bernoulli(k_sign)
    return op, jnp.asarray(bin_, jnp.int32), negate


def _randaugment(rng, x, *, s: AugSettings, n_bins: int, op_fn):
    def step(image, key):
        return op_fn(image, *draw_op(key, n_bins=n_bins, bin_=s.randaugment_m)), None

    return jax.lax.scan(step, x, jax.random.split(rng, s.randaugment_n))[0]


def _trivialaugment(rng, x, *, s: AugSettings, n_bins: int, op_fn):
    return op_fn(x, *draw_op(rng, n_bins=n_bins))


def _augmix(rng, x, *, s: AugSettings, n_bins: int, op_fn):
    """torchvision's AugMix: `width` chains of 1..3 (or `depth`) ops, magnitudes from the
    lowest `severity` bins, mixed with Dirichlet weights and a Beta share of the original."""
    k_share, k_weights, k_chains = jax.random.split(rng, 3)
    alpha = s.augmix_alpha
    share = jax.random.dirichlet(k_share, jnp.full((2,), alpha))
    weights = jax.random.dirichlet(k_weights, jnp.full((s.augmix_width,), alpha)) * share[1]
    depth_max = s.augmix_depth if s.augmix_depth > 0 else 3

    def chain(key):
        k_depth, k_ops = jax.random.split(key)
        depth = s.augmix_depth if s.augmix_depth > 0 else jax.random.randint(k_depth, (), 1, 4)

        def step(image, i_key):
            i, k = i_key
            out = op_fn(image, *draw_op(k, n_bins=s.augmix_severity, ops=_AUGMIX_OPS))
            return jnp.where(i < depth, out, image), None

        steps = (jnp.arange(depth_max), jax.random.split(k_ops, depth_max))
        return jax.lax.scan(step, x, steps)[0]

    chains = jax.vmap(chain)(jax.random.split(k_chains, s.augmix_width))
    return augmix_mix(x, chains, share[0], weights)


def augmix_mix(x, chains, share, weights):
    """AugMix's sum, in torchvision's order: share * x, then + weights[i] * chains[i];
    truncated to integers as its uint8 cast does."""
    mixed = _mul(x, share)
    for i in range(chains.shape[0]):
        mixed = mixed + _mul(chains[i], weights[i])
    return jnp.floor(jnp.clip(mixed, 0.0, 255.0))


# ----------------------------------------------------------------------------- erasing


def random_erase(rng, x, s: AugSettings):
    """torchvision's RandomErasing on one normalised (H, W, C) image: with probability
    erasing_prob, a box of area fraction ~ U(scale) and height / width log-uniform in
    `ratio` (the first of 10 draws that fits strictly inside) is set to 0 or N(0, 1) noise."""
    k_apply, k_area, k_ratio, k_top, k_left, k_noise = jax.random.split(rng, 6)
    height, width = x.shape[:2]
    lo, hi = s.erasing_scale
    area = height * width * jax.random.uniform(k_area, (10,), minval=lo, maxval=hi)
    log_r = [math.log(r) for r in s.erasing_ratio]
    aspect = jnp.exp(jax.random.uniform(k_ratio, (10,), minval=log_r[0], maxval=log_r[1]))
    box_h, box_w = jnp.round(jnp.sqrt(area * aspect)), jnp.round(jnp.sqrt(area / aspect))
    fits = (box_h < height) & (box_w < width)
    box_h, box_w = box_h[jnp.argmax(fits)], box_w[jnp.argmax(fits)]
    top = jnp.floor(jax.random.uniform(k_top) * (height - box_h + 1))
    left = jnp.floor(jax.random.uniform(k_left) * (width - box_w + 1))
    rows = jnp.arange(height, dtype=jnp.float32)[:, None]
    cols = jnp.arange(width, dtype=jnp.float32)[None, :]
    inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
    erase = (jax.random.uniform(k_apply) < s.erasing_prob) & fits.any() & inside
    value = jax.random.normal(k_noise, x.shape) if s.erasing_value == "random" else 0.0
    return jnp.where(erase[..., None], value, x)
