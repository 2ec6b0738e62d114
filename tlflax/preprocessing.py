"""How a pretrained checkpoint expects its pixels: carried with the weights.

Values are in 0..255 pixel units, so normalisation is `(x - mean) / std` on the
raw uint8 RGB image. The conventions users meet:
  ImageNet mean/std (torchvision, HF ResNet), `(x - 127) / 128` (EfficientNet-Lite),
  [-1, 1] = `(x - 127.5) / 127.5` (Google ViT, Keras Xception and MobileNetV2), and
  Keras' 'caffe' mode (keras.applications VGG16/19, ResNet50): the ImageNet mean pixel
  subtracted, unscaled, from BGR images. tlflax feeds RGB: a converter of 'caffe' weights
  reverses the input channels of the first conv's kernel, and the mean is given in RGB.
Pairing a checkpoint with the wrong one fails silently (11 points on Lite0), so a
checkpoint's preprocessing travels with it and is saved in the run's workdir.
"""

from __future__ import annotations

import dataclasses
import json

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    mean: tuple[float, float, float]  # per RGB channel, 0..255 units
    std: tuple[float, float, float]
    resolution: int  # square input side the weights were trained / evaluated at
    resize: int  # short side before the centre crop at evaluation (resolution / crop_pct)
    interpolation: str = "bicubic"
    source: str = ""  # where this came from, for error messages and the run record

    def __post_init__(self):
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"Preprocessing: mean and std need 3 values, got {self}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"Preprocessing: std must be positive, got {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"Preprocessing.interpolation={self.interpolation!r}; use one of {INTERPOLATIONS}"
            )
        if not 0 < self.resolution <= self.resize:
            raise ValueError(
                f"Preprocessing: need 0 < resolution <= resize, got "
                f"{self.resolution}, {self.resize}"
            )
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @property
    def crop_pct(self) -> float:
        return self.resolution / self.resize

    def at_resolution(self, resolution: int) -> Preprocessing:
        """Same normalisation at another input size, keeping the crop fraction."""
        resize = max(resolution, round(resolution / self.crop_pct))
        return dataclasses.replace(self, resolution=resolution, resize=resize)

    def short(self) -> str:
        """One line: the normalisation's convention name (or its mean / std), resize and crop."""
        norm = next(
            (n for n, f in NAMED.items() if (f().mean, f().std) == (self.mean, self.std)),
            f"mean {_fmt(self.mean)} std {_fmt(self.std)}",
        )
        return f"{norm}, {self.resize}->{self.resolution} {self.interpolation}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        return cls(**json.loads(text))


def _fmt(values) -> str:
    return "/".join(f"{v:g}" for v in values)


def imagenet(resolution: int = 224, crop_pct: float = 0.875, **kw) -> Preprocessing:
    return Preprocessing(
        IMAGENET_MEAN, IMAGENET_STD, resolution, round(resolution / crop_pct), **kw
    )


def minus_one_to_one(resolution: int = 224, crop_pct: float = 0.875, **kw) -> Preprocessing:
    return Preprocessing((127.5,) * 3, (127.5,) * 3, resolution, round(resolution / crop_pct), **kw)


def lite(resolution: int = 224, crop_pct: float = 0.875, **kw) -> Preprocessing:
    """EfficientNet-Lite (TF-Lite friendly): (x - 127) / 128."""
    return Preprocessing((127.0,) * 3, (128.0,) * 3, resolution, round(resolution / crop_pct), **kw)


CAFFE_MEAN = (123.68, 116.779, 103.939)  # Keras' BGR mean pixel, in RGB order


def caffe(resolution: int = 224, crop_pct: float = 0.875, **kw) -> Preprocessing:
    """Keras' 'caffe' mode in RGB: x - mean pixel, no scaling (with the first conv's input
    channels reversed by the converter, as Keras feeds BGR)."""
    return Preprocessing(CAFFE_MEAN, (1.0,) * 3, resolution, round(resolution / crop_pct), **kw)


NAMED = {
    "imagenet": imagenet,
    "minus_one_to_one": minus_one_to_one,
    "lite": lite,
    "caffe": caffe,
}


def named(name: str, *, resolution: int, crop_pct: float = 0.875) -> Preprocessing:
    """Preprocessing by convention name: 'imagenet', 'minus_one_to_one', 'lite' or 'caffe'."""
    if name not in NAMED:
        raise ValueError(f"unknown preprocessing {name!r}; use one of {sorted(NAMED)}")
    return NAMED[name](resolution, crop_pct, source=f"named:{name}")


_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def from_hf(processor: dict, *, source: str) -> Preprocessing:
    """From a transformers preprocessor_config.json (ViTImageProcessor, ConvNext's ...)."""
    size = processor.get("crop_size") if processor.get("do_center_crop") else None
    size = size or processor.get("size") or {}
    if isinstance(size, int):
        size = {"shortest_edge": size}
    resolution = size.get("height") or size.get("shortest_edge")
    if not resolution:
        raise ValueError(f"{source}: preprocessor_config.json gives no input size: {size}")
    crop_pct = processor.get("crop_pct") or 1.0
    if processor.get("do_center_crop") and processor.get("size", {}).get("shortest_edge"):
        crop_pct = resolution / processor["size"]["shortest_edge"]
    mean, std = _hf_mean_std(processor)
    return Preprocessing(
        mean,
        std,
        int(resolution),
        max(int(resolution), round(resolution / crop_pct)),
        _PIL_RESAMPLE.get(processor.get("resample", 2), "bilinear"),
        source=source,
    )


def _hf_mean_std(processor: dict) -> tuple[tuple, tuple]:
    """The processor's normalisation in 0..255 pixel units: (x * rescale_factor [- 1 with
    rescale_offset] - mean) / std, and once more / std where EfficientNetImageProcessor's
    include_top asks it (google/efficientnet-b*: its image_std is the square root of
    ImageNet's, Keras' normalisation quirk, so the two divisions give ImageNet's std)."""
    scale = float(processor.get("rescale_factor") or 1 / 255)
    offset = 1.0 if processor.get("rescale_offset") else 0.0
    std = [float(v) for v in processor["image_std"]]
    twice = processor.get("image_processor_type", "").startswith("EfficientNetImageProcessor")
    if twice and processor.get("include_top", True):
        std = [v * v for v in std]
    mean = tuple((m + offset) / scale for m in processor["image_mean"])
    return mean, tuple(v / scale for v in std)


def from_timm(pretrained_cfg: dict, *, source: str) -> Preprocessing:
    """From the `pretrained_cfg` of a timm config.json."""
    resolution = int(pretrained_cfg["input_size"][-1])
    crop_pct = float(pretrained_cfg.get("crop_pct") or 0.875)
    interpolation = pretrained_cfg.get("interpolation") or "bicubic"
    return Preprocessing(
        tuple(255 * m for m in pretrained_cfg["mean"]),
        tuple(255 * s for s in pretrained_cfg["std"]),
        resolution,
        max(resolution, round(resolution / crop_pct)),
        interpolation if interpolation in INTERPOLATIONS else "bicubic",
        source=source,
    )
