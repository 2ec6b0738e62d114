"""The `stream` storage mode: encoded images in random-access records, read through grain.

Records are ArrayRecord files: a folder's images re-encoded once as JPEG at the stored size
(FolderRecords, written by storage.py), or a TFDS dataset prepared in the array_record format
(TfdsRecords, through tfds.data_source: no TensorFlow in the process). A RecordSplit batches
them exactly as an ArraySplit batches arrays (splits.Batching: the same examples per host
and step, epoch orders from (seed, epoch)); each batch is read and decoded (with the
host-side resize) by grain's worker processes, and the position of a stream is the index of
its next batch, so a resumed run reopens it there and reads nothing it skips.

grain and array_record are imported on first use: the memory and mmap modes need neither.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time

import numpy as np

from tlflax.data import decode, splits
from tlflax.errors import UserError

WORKER_BUFFER = 2  # batches each grain worker decodes ahead
_NEVER = 2**40  # a train stream's end: it runs until the trainer stops reading
_PARENT_POLL_S = 0.5  # how often a grain worker checks that the training process lives


class Records:
    """Random access to the examples of a split: read(rows) -> (uint8 images, labels).

    `subset(rows)` is a view of some of them (a carved split) that reads nothing. Pickled
    to grain's workers without any open file: each opens its readers on first use."""

    def __init__(self, *, n: int, resize: int, max_pixels: int, index=None):
        self.n_all, self.resize, self.max_pixels = n, resize, max_pixels
        self.index = None if index is None else np.asarray(index, np.int64)

    def __len__(self) -> int:
        return self.n_all if self.index is None else len(self.index)

    def subset(self, rows) -> Records:
        rows = np.asarray(rows, np.int64)
        view = object.__new__(type(self))
        view.__dict__.update(self.__getstate__())
        view.index = rows if self.index is None else self.index[rows]
        return view

    def read(self, rows: np.ndarray):
        rows = np.asarray(rows, np.int64)
        if self.index is not None:
            rows = self.index[rows]
        if not len(rows):
            return np.zeros((0, self.resize, self.resize, 3), np.uint8), np.zeros(0, np.int32)
        encoded, labels = self._read(rows)
        images = np.empty((len(rows), self.resize, self.resize, 3), np.uint8)
        for i, (row, data) in enumerate(zip(rows, encoded, strict=True)):
            try:
                images[i] = decode.decode_bytes(
                    data, name=self.name_of(row), resize=self.resize, max_pixels=self.max_pixels
                )
            except decode.BadImageError as e:
                raise UserError(
                    f"{e}: a record of a stream cannot be decoded while training; the "
                    "data changed since it was prepared, or it was never checked: "
                    "rebuild it (remove its cache entry) or use data.storage='memory'/'mmap'"
                ) from e
        return images, np.asarray(labels, np.int32)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class FolderRecords(Records):
    """A folder's stream entry: ArrayRecord shards of (label, JPEG at the stored size)."""

    def __init__(self, paths: list[str], *, n: int, resize: int, max_pixels: int, index=None):
        super().__init__(n=n, resize=resize, max_pixels=max_pixels, index=index)
        self.paths = [str(p) for p in paths]

    def _read(self, rows):
        if getattr(self, "_source", None) is None:
            from array_record.python import array_record_data_source

            self._source = array_record_data_source.ArrayRecordDataSource(self.paths)
        raw = self._source.__getitems__([int(r) for r in rows])
        size = decode.STREAM_RECORD.size
        labels = [decode.STREAM_RECORD.unpack_from(r)[0] for r in raw]
        return [memoryview(r)[size:] for r in raw], labels

    def name_of(self, row: int) -> str:
        return f"stream record {row} of {self.paths[0].rsplit('/', 2)[-2]}"


class TfdsRecords(Records):
    """A TFDS split prepared as array_record, read through tfds.data_source: each example's
    encoded image (not decoded by TFDS) and label. TensorFlow is never imported."""

    def __init__(
        self,
        builder_dir: str,
        *,
        split: str,
        keys,
        n: int,
        resize: int,
        max_pixels: int,
        index=None,
    ):
        super().__init__(n=n, resize=resize, max_pixels=max_pixels, index=index)
        self.builder_dir, self.split, self.keys = str(builder_dir), split, tuple(keys)

    def _read(self, rows):
        if getattr(self, "_source", None) is None:
            self._source = tfds_data_source(self.builder_dir, self.split, self.keys[0])
        examples = self._source.__getitems__([int(r) for r in rows])
        image_key, label_key = self.keys
        return [ex[image_key] for ex in examples], [int(ex[label_key]) for ex in examples]

    def name_of(self, row: int) -> str:
        return f"{self.builder_dir}[{self.split}] example {row}"


def tfds_data_source(builder_dir: str, split: str, image_key: str):
    """tfds.data_source of one split with the images left encoded (decoded by decode.py)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(builder_dir)
    return builder.as_data_source(
        split, decoders={image_key: tfds.decode.SkipDecoding()}, file_format="array_record"
    )


class _ReadBatch:
    """grain's map: batch number -> this host's batch (read and decoded in a worker)."""

    def __init__(self, records: Records, plan: splits.Batching, labels, epoch: int | None):
        self.records, self.plan, self.labels, self.epoch = records, plan, labels, epoch

    def __call__(self, k: int) -> dict:
        k = int(k)
        index = self.plan.at_step(k) if self.epoch is None else self.plan.indices(self.epoch, k)
        mask = index >= 0
        found, labels = self.records.read(index[mask])
        size = self.records.resize
        images = np.zeros((len(index), size, size, 3), np.uint8)  # padding is black
        images[mask] = found
        out_labels = np.zeros(len(index), np.int32)
        out_labels[mask] = labels if self.labels is None else self.labels[index[mask]]
        return {"image": images, "label": out_labels, "mask": mask}


class RecordSplit:
    """A split streamed from Records through grain; batches as splits.ArraySplit does."""

    storage = "stream"
    images = None  # nothing decoded is held (features / reports check for it)

    def __init__(
        self,
        records: Records,
        *,
        name: str,
        seed: int,
        process_index: int,
        process_count: int,
        workers: int,
        labels=None,
        names=None,
        digest=None,
    ):
        self.records, self.name, self.seed = records, name, seed
        self.process_index, self.process_count, self.workers = process_index, process_count, workers
        self.labels = None if labels is None else np.asarray(labels, np.int32)
        self.names = names  # per example: file path (error lists), or None
        digest = digest or _digest(records)
        self.digest = digest if labels is None else splits.with_labels(digest, self.labels)

    @property
    def n_examples(self) -> int:
        return len(self.records)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return (self.records.resize, self.records.resize, 3)

    def batches_per_epoch(self, global_batch: int, *, drop_remainder: bool = True) -> int:
        return splits.n_batches(self.n_examples, global_batch, drop_remainder=drop_remainder)

    def image(self, i: int) -> np.ndarray:
        """Example i, read and decoded here (the reports' grids of a few examples)."""
        return self.records.read(np.asarray([i]))[0][0]

    def _plan(self, global_batch: int, *, shuffle: bool, drop_remainder: bool):
        return splits.Batching.of(
            self, global_batch, shuffle=shuffle, drop_remainder=drop_remainder
        )

    def iterate(
        self, *, global_batch: int, epoch: int, shuffle: bool, drop_remainder: bool, start=0
    ):
        """This host's share of each global batch of one epoch, from batch `start` on."""
        plan = self._plan(global_batch, shuffle=shuffle, drop_remainder=drop_remainder)
        return self._run(_ReadBatch(self.records, plan, self.labels, epoch), start, plan.count)

    def train_stream(self, *, global_batch: int, start_step: int):
        """Training batches from step start_step on, epoch after epoch, in one pipeline
        (its workers live across epochs): batch k of the stream is step k's."""
        plan = self._plan(global_batch, shuffle=True, drop_remainder=True)
        if plan.count < 1:
            raise UserError(f"split {self.name}: fewer examples than one batch of {global_batch}")
        return self._run(_ReadBatch(self.records, plan, self.labels, None), start_step, _NEVER)

    def _run(self, read_batch: _ReadBatch, first: int, stop: int):
        import grain
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain reads its options from absl's global flags
            flags.FLAGS.mark_as_parsed()
        ds = grain.MapDataset.range(first, stop).map(read_batch)
        workers = decode.n_workers(self.workers)
        if workers == 1:  # decoded by a thread of this process, a batch or two ahead
            it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
        else:
            it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
            options = grain.multiprocessing.MultiprocessingOptions(
                num_workers=workers, per_worker_buffer_size=WORKER_BUFFER
            )
            it_ds = it_ds.mp_prefetch(options, worker_init_fn=_exit_with_parent)
        return _closing(iter(it_ds))


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
    """In each grain worker: exit when the process that started it is gone (a training
    process killed with SIGKILL cannot stop its workers, which would wait forever)."""
    del worker_index, worker_count
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="tlflax-exit-with-parent", daemon=True).start()


def _closing(iterator):
    """Yield from a grain iterator; stop its worker processes when the reader is done."""
    try:
        yield from iterator
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def _digest(records: Records) -> str:
    """The split's content without reading it: where its records are, and which of them."""
    state = records.__getstate__()
    digest = hashlib.sha256(type(records).__name__.encode())
    for key in sorted(state):
        if key != "index":
            digest.update(f"{key}={state[key]!r}".encode())
    if records.index is not None:
        digest.update(np.ascontiguousarray(records.index).tobytes())
    return digest.hexdigest()[:32]
