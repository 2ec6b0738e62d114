"""Splits held as uint8 arrays on every host: fixed-shape batches, host shares, padded eval.

A global batch is cut into `process_count` consecutive pieces; host i yields piece i.
The order of an epoch depends only on (seed, epoch), so every host (and a resumed run)
computes the same one without talking to the others.
"""

from __future__ import annotations

import numpy as np

_SPLIT_TAG = 0x5B117  # separates the validation split's random stream from the epochs'


def local_batch(global_batch: int, process_count: int) -> int:
    if global_batch < 1 or global_batch % process_count:
        raise ValueError(
            f"global batch {global_batch} does not split over {process_count} hosts; "
            f"use a multiple of {process_count} (config.data.batch_size / eval_batch_size)"
        )
    return global_batch // process_count


def n_batches(n_examples: int, global_batch: int, *, drop_remainder: bool) -> int:
    if drop_remainder:
        return n_examples // global_batch
    return -(-n_examples // global_batch)


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([abs(int(seed)), int(epoch)]).permutation(n)


def stratified_split(labels: np.ndarray, *, fraction: float, seed: int):
    """(train indices, validation indices), both sorted; per class round(n * fraction),
    at least 1 and at most n - 1 when the class has 2 or more examples."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"config.data.val_fraction={fraction}; use a value in (0, 1)")
    rng = np.random.default_rng([abs(int(seed)), _SPLIT_TAG, 0])  # 3 words: no epoch's stream
    val = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n_val = int(round(len(members) * fraction))
        if len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        else:
            n_val = 0
        val.append(rng.permutation(members)[:n_val])
    val = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


class ArraySplit:
    """A split whose decoded images fit in host memory (folders, digits, small TFDS sets)."""

    def __init__(
        self, images, labels, *, name: str, seed: int, process_index, process_count, names=None
    ):
        if len(images) != len(labels):
            raise ValueError(f"split {name}: {len(images)} images but {len(labels)} labels")
        if names is not None and len(names) != len(labels):
            raise ValueError(f"split {name}: {len(names)} names but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, np.int32)
        self.names = names  # per example: file path or source id (error lists), or None
        self.name = name
        self.seed = seed
        self.process_index = process_index
        self.process_count = process_count

    @property
    def n_examples(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def batches_per_epoch(self, global_batch: int, *, drop_remainder: bool = True) -> int:
        return n_batches(self.n_examples, global_batch, drop_remainder=drop_remainder)

    def iterate(self, *, global_batch: int, epoch: int, shuffle: bool, drop_remainder: bool):
        """This host's share of each global batch: {'image', 'label', 'mask'} numpy arrays."""
        local = local_batch(global_batch, self.process_count)
        count = self.batches_per_epoch(global_batch, drop_remainder=drop_remainder)
        order = epoch_order(self.n_examples, seed=self.seed, epoch=epoch, shuffle=shuffle)
        padded = np.full(count * global_batch, -1, np.int64)
        kept = order[: len(padded)]
        padded[: len(kept)] = kept
        for b in range(count):
            start = b * global_batch + self.process_index * local
            yield self._gather(padded[start : start + local])

    def _gather(self, index: np.ndarray) -> dict:
        mask = index >= 0
        safe = np.where(mask, index, 0)
        images = self.images[safe]
        if not mask.all():
            images[~mask] = 0  # padding is black and masked out
        labels = np.where(mask, self.labels[safe], 0).astype(np.int32)
        return {"image": images, "label": labels, "mask": mask}
