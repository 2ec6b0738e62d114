"""scikit-learn's handwritten digits (1,797 real 8x8 scans, shipped inside the package).

The offline demo dataset: no download, 10 classes, upscaled (bicubic) to S x S grey RGB.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from tlflax.data import cache

CLASS_NAMES = [str(d) for d in range(10)]
N_DIGITS = 1797  # sklearn.datasets.load_digits


def load_digits_arrays(*, resize: int, cache_dir, mapped: bool = False) -> cache.CachedArrays:
    """All 1,797 digits as uint8 (n, resize, resize, 3), cached like a decoded folder;
    mapped: memory-mapped from the cache (data.storage='mmap')."""
    try:
        import sklearn
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "config.data.source='digits' needs scikit-learn: pip install scikit-learn"
        ) from e
    key = cache.key_of({"kind": "digits", "sklearn": sklearn.__version__, "resize": resize})
    path = cache.entry_path(cache_dir, kind="digits", name="sklearn_digits", key=key)
    cached = cache.load(path, mapped=mapped)
    if cached is not None:
        return cached
    bunch = load_digits()
    # The scans hold 0..16 ink levels; 16 -> 255 (white ink on black, as the scans are).
    grey = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = np.stack([_upscale(image, resize) for image in grey])
    meta = {"source": "sklearn.datasets.load_digits", "class_names": CLASS_NAMES, "bad": []}
    meta.update(n_files=len(images), ignored=[])
    saved = cache.save(path, images=images, labels=bunch.target.astype(np.int32), meta=meta)
    return dataclasses.replace(cache.load(path, mapped=True), status="built") if mapped else saved


def _upscale(grey: np.ndarray, resize: int) -> np.ndarray:
    image = Image.fromarray(grey, mode="L").resize((resize, resize), Image.Resampling.BICUBIC)
    return np.asarray(image.convert("RGB"), np.uint8)
