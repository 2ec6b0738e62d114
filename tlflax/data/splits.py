"""Splits held as uint8 arrays (in memory or memory-mapped): fixed-shape batches, host
shares, padded eval, and the batching every storage mode shares (Batching).

A global batch is cut into `process_count` consecutive pieces; host i yields piece i.
The order of an epoch depends only on (seed, epoch), so every host (and a resumed run)
computes the same one without talking to the others, and a run resumed at step s starts
reading at batch s without touching the batches before it.
"""

from __future__ import annotations

import hashlib
import itertools
import logging

import numpy as np

log = logging.getLogger("tlflax.data")

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


class Batching:
    """Which examples host `process_index` reads at batch b of epoch e (-1: padding, masked
    out): the same in every storage mode. Picklable: stream workers compute it too."""

    def __init__(
        self,
        n_examples: int,
        *,
        global_batch: int,
        seed: int,
        shuffle: bool,
        drop_remainder: bool,
        process_index: int,
        process_count: int,
    ):
        self.n, self.global_batch, self.seed, self.shuffle = n_examples, global_batch, seed, shuffle
        self.local = local_batch(global_batch, process_count)
        self.count = n_batches(n_examples, global_batch, drop_remainder=drop_remainder)
        self.first = process_index * self.local  # this host's piece of each global batch
        self._epoch, self._order = None, None

    @classmethod
    def of(cls, split, global_batch: int, *, shuffle: bool, drop_remainder: bool) -> Batching:
        """The batching of a split (its size, seed and host share) at global_batch."""
        return cls(
            split.n_examples,
            global_batch=global_batch,
            seed=split.seed,
            shuffle=shuffle,
            drop_remainder=drop_remainder,
            process_index=split.process_index,
            process_count=split.process_count,
        )

    def order(self, epoch: int) -> np.ndarray:
        if self._epoch != epoch:  # one permutation per epoch, however many batches ask
            self._epoch = epoch
            self._order = epoch_order(self.n, seed=self.seed, epoch=epoch, shuffle=self.shuffle)
        return self._order

    def indices(self, epoch: int, b: int) -> np.ndarray:
        start = b * self.global_batch + self.first
        index = self.order(epoch)[start : start + self.local].astype(np.int64)
        if len(index) < self.local:
            index = np.concatenate([index, np.full(self.local - len(index), -1, np.int64)])
        return index

    def at_step(self, k: int) -> np.ndarray:
        """Batch k counted from epoch 0 batch 0 (training: epoch after epoch)."""
        return self.indices(*divmod(k, self.count))

    def __getstate__(self):
        return {**self.__dict__, "_epoch": None, "_order": None}


def train_batches(split, *, global_batch: int, steps_per_epoch: int, start_step: int):
    """Host batches of a train split from start_step on, epoch after epoch, without end;
    the batches before start_step are not read. A split with its own `train_stream` (one
    pipeline over many epochs: a grain stream) provides it."""
    stream = getattr(split, "train_stream", None)
    if stream is not None:
        return stream(global_batch=global_batch, start_step=start_step)
    return _epochs(
        split, global_batch=global_batch, steps_per_epoch=steps_per_epoch, start_step=start_step
    )


def _epochs(split, *, global_batch: int, steps_per_epoch: int, start_step: int):
    epoch, offset = divmod(start_step, steps_per_epoch)
    for e in itertools.count(epoch):
        yield from split.iterate(
            global_batch=global_batch,
            epoch=e,
            shuffle=True,
            drop_remainder=True,
            start=offset if e == epoch else 0,
        )


POSITION_VERSION = 1


def position(split, *, step: int, steps_per_epoch: int, global_batch: int) -> dict:
    """Where the train split's reader stands after `step` steps (saved in each checkpoint):
    the epoch and batch it reads next, and what that position means (the split's size,
    seed, storage and content), so that a resume can tell whether it still holds."""
    epoch, batch = divmod(int(step), int(steps_per_epoch))
    return {
        "version": POSITION_VERSION,
        "step": int(step),
        "epoch": epoch,
        "batch": batch,
        "steps_per_epoch": int(steps_per_epoch),
        "global_batch": int(global_batch),
        "n_examples": int(split.n_examples),
        "seed": int(getattr(split, "seed", 0)),
        "storage": getattr(split, "storage", "memory"),
        "content": getattr(split, "digest", None),
    }


def check_position(saved: dict | None, current: dict) -> list[str]:
    """What differs between the position a checkpoint saved and the one this run computes
    for the same step (logged as warnings: the resumed run then does not see the batches
    an uninterrupted one would have); [] when they agree or none was saved."""
    if not saved:
        return []
    keys = ("epoch", "batch", "steps_per_epoch", "global_batch", "n_examples", "seed")
    keys += ("content",) if saved.get("content") and current.get("content") else ()
    changed = [f"{k} {saved.get(k)} -> {current[k]}" for k in keys if saved.get(k) != current[k]]
    for line in changed:
        log.warning(
            "the training data changed since the checkpoint at step %s (%s): the resumed run "
            "does not read the batches an uninterrupted run would have",
            current["step"],
            line,
        )
    return changed


def with_labels(digest: str, labels: np.ndarray) -> str:
    """A split's content digest: where its pixels are (`digest`) and its labels."""
    both = hashlib.sha256(digest.encode())
    both.update(np.ascontiguousarray(labels, np.int32).tobytes())
    return both.hexdigest()[:32]


class ArraySplit:
    """A split of decoded uint8 images on every host: in memory (a numpy array), or
    memory-mapped (cache.MappedImages: only the examples of this host's batches are read)."""

    storage = "memory"

    def __init__(
        self,
        images,
        labels,
        *,
        name: str,
        seed: int,
        process_index,
        process_count,
        names=None,
        digest: str | None = None,
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
        # The content's hash when known without reading the pixels (mmap): with the labels.
        self.digest = digest and with_labels(digest, self.labels)
        if not isinstance(images, np.ndarray):
            self.storage = "mmap"

    @property
    def n_examples(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def batches_per_epoch(self, global_batch: int, *, drop_remainder: bool = True) -> int:
        return n_batches(self.n_examples, global_batch, drop_remainder=drop_remainder)

    def iterate(
        self, *, global_batch: int, epoch: int, shuffle: bool, drop_remainder: bool, start=0
    ):
        """This host's share of each global batch from batch `start` of the epoch on (the
        ones before are not read): {'image', 'label', 'mask'} numpy arrays."""
        plan = Batching.of(self, global_batch, shuffle=shuffle, drop_remainder=drop_remainder)
        for b in range(start, plan.count):
            yield self._gather(plan.indices(epoch, b))

    def _gather(self, index: np.ndarray) -> dict:
        mask = index >= 0
        safe = np.where(mask, index, 0)
        images = self.images[safe]
        if not mask.all():
            images[~mask] = 0  # padding is black and masked out
        labels = np.where(mask, self.labels[safe], 0).astype(np.int32)
        return {"image": images, "label": labels, "mask": mask}
