"""Input pipeline: sources -> uint8 batches on the host; augment.py (JAX) on the device.

`import tlflax.data` imports neither TensorFlow nor JAX: the folder / digits / cached paths
run without TensorFlow, and decode worker processes start fast. `tlflax.data.augment` is
imported on first use.
"""

from __future__ import annotations

import importlib

from tlflax.data.datasets import (
    MANIFEST,
    Datasets,
    build_datasets,
    eval_split_name,
    write_manifest,
)
from tlflax.data.decode import BadImageError, load_image
from tlflax.data.folder import DataError
from tlflax.data.prefetch import prefetch_to_device
from tlflax.data.splits import ArraySplit


def __getattr__(name):
    if name in ("augment", "tfds_source"):
        return importlib.import_module(f"tlflax.data.{name}")
    raise AttributeError(f"module 'tlflax.data' has no attribute {name!r}")


__all__ = [
    "MANIFEST",
    "ArraySplit",
    "BadImageError",
    "DataError",
    "Datasets",
    "build_datasets",
    "eval_split_name",
    "load_image",
    "prefetch_to_device",
    "write_manifest",
]
