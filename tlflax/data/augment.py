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
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

CROPS = ("resize", "random", "inception")
FILL_MODES = ("nearest", "constant", "reflect")
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

    @classmethod
    def from_config(cls, aug_config) -> AugSettings:
        values = {f.name: aug_config[f.name] for f in dataclasses.fields(cls)}
        values["crop_scale"] = tuple(float(v) for v in values["crop_scale"])
        values["crop_ratio"] = tuple(float(v) for v in values["crop_ratio"])
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

    @property
    def exact_geometry(self) -> bool:
        """Integer crops and flips only: slicing, no resampling."""
        return self.crop != "inception" and not (
            self.rotation or self.width_shift or self.height_shift
        )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# ----------------------------------------------------------------------------- factories


def make_train_transform(aug_config, *, image_size: int, num_classes: int, preprocessing):
    """fn(rng, images uint8 (B, S, S, 3), labels int (B,)) -> (float32 images, (B, K) targets)."""
    settings = AugSettings.from_config(aug_config)
    normalise = _normaliser(preprocessing)

    def one_example(rng, image):
        k_geometry, k_colour = jax.random.split(rng)
        x = _geometry(k_geometry, image, settings, image_size)
        return _colour(k_colour, x, settings)

    def transform(rng, images, labels):
        _check_stored_size(images.shape, image_size)
        k_examples, k_mix = jax.random.split(rng)
        keys = jax.random.split(k_examples, images.shape[0])
        x = normalise(jax.vmap(one_example)(keys, images))
        targets = smooth_onehot(labels, num_classes, settings.label_smoothing)
        if settings.mixup_alpha > 0 or settings.cutmix_alpha > 0:
            x, targets = _mix(k_mix, x, targets, settings)
        return x, targets

    return transform


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
