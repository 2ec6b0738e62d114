"""How a pretrained checkpoint expects its pixels: carried with the weights.

Values are in 0..255 pixel units, so normalisation is `(x - mean) / std` on the
raw uint8 image. The three conventions users meet:
  ImageNet mean/std (torchvision, HF ResNet), `(x - 127) / 128` (EfficientNet-Lite),
  and [-1, 1] = `(x - 127.5) / 127.5` (Google ViT, Keras Xception).
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
                f"Preprocessing: need 0 < resolution <= resize, got {self.resolution}, {self.resize}"
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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        return cls(**json.loads(text))


def imagenet(resolution: int = 224, crop_pct: float = 0.875, **kw) -> Preprocessing:
    return Preprocessing(
        IMAGENET_MEAN, IMAGENET_STD, resolution, round(resolution / crop_pct), **kw
    )


def minus_one_to_one(resolution: int = 224, crop_pct: float = 0.875, **kw) -> Preprocessing:
    return Preprocessing(
        (127.5,) * 3, (127.5,) * 3, resolution, round(resolution / crop_pct), **kw
    )


def lite(resolution: int = 224, crop_pct: float = 0.875, **kw) -> Preprocessing:
    """EfficientNet-Lite (TF-Lite friendly): (x - 127) / 128."""
    return Preprocessing((127.0,) * 3, (128.0,) * 3, resolution, round(resolution / crop_pct), **kw)
