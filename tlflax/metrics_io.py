"""Metric logging: metrics.jsonl (the record), TensorBoard events, and a console progress bar.

metrics.jsonl is the source of truth that reports and summaries read back; the
TensorBoard files (tensorboardX: no TensorFlow needed) are for watching a run.
Only the primary process writes, so a multi-host run logs once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping

from tlflax import fs

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
HPARAMS_FILE = "hparams.json"


def _complete_lines(path) -> bytes:
    """The file's bytes without a last line cut short by a crash, rewritten so (locally)
    that appending after a resume stays one record a line."""
    if not path.is_file():
        return b""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        if not fs.is_remote(path):
            os.truncate(path, len(data))
    return data


def _as_float(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"MetricWriter.write_scalars: {name}={value!r} is not a scalar; log numbers only "
            "(jax / numpy scalars and 0-d arrays are fine)"
        ) from e


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:  # lists, tuples, None: TensorBoard's hparams take scalars and strings only
            flat[name] = str(value)
    return flat


class _LocalLines:
    """Appends to a local file, flushed per record: a crash loses nothing."""

    def __init__(self, path):
        _complete_lines(path)
        self._file = path.open("a")

    def write(self, line: str) -> None:
        self._file.write(line)
        self._file.flush()

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class _RemoteLines:
    """An object store has no append: the whole file is rewritten, at most every
    `interval` seconds and on flush() (the trainer flushes before every checkpoint)."""

    def __init__(self, path, *, interval: float = 10.0):
        self._path, self._interval = path, interval
        self._data = bytearray(_complete_lines(path))
        self._written = time.monotonic()

    def write(self, line: str) -> None:
        self._data += line.encode()
        if time.monotonic() - self._written >= self._interval:
            self.flush()

    def flush(self) -> None:
        self._path.write_bytes(bytes(self._data))
        self._written = time.monotonic()

    def close(self) -> None:
        self.flush()


class MetricWriter:
    """Scalars to workdir/metrics.jsonl and workdir/tensorboard/; no-op when not primary.

    The workdir may be local or remote (gs://, s3://): see tlflax/fs.py.
    """

    def __init__(self, workdir, *, is_primary: bool = True):
        self.workdir = fs.path(workdir, what="workdir")
        self.is_primary = is_primary
        self._file = None
        self._tb = None
        if not is_primary:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / METRICS_FILE
        self._file = _RemoteLines(path) if fs.is_remote(path) else _LocalLines(path)
        self._tb = _open_tensorboard(self.workdir / TENSORBOARD_DIR)

    def write_scalars(self, step: int, scalars: Mapping) -> None:
        if self._file is None:
            return
        values = {k: _as_float(k, v) for k, v in scalars.items()}
        # Python's json writes NaN / Infinity (and reads them back): a diverged loss stays visible.
        record = {"step": int(step), "time": time.time(), **values}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, int(step), walltime=record["time"])

    def write_hparams(self, hparams: Mapping, *, metrics: Mapping | None = None) -> None:
        """Flattened ('/'-joined) to workdir/hparams.json and TensorBoard's HParams tab
        (tensorboard/hparams/), with the run's final metrics beside them (names unlike the
        scalars' tags, e.g. 'hparams/val_top1'). Written once, at a run's end."""
        if self._file is None:
            return
        flat = _flatten(hparams)
        values = {k: _as_float(k, v) for k, v in (metrics or {}).items()}
        record = {**flat, **({"metrics": values} if values else {})}
        (self.workdir / HPARAMS_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))
        if self._tb is not None:
            self._tb.add_hparams(flat, values, name="hparams")
            self._tb.flush()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _open_tensorboard(logdir):
    # tensorboardX.writer runs `try: import torch` at import time, only to name a type in
    # its annotations (numpy_compatible); with torch installed that costs seconds at every
    # start. A None entry in sys.modules makes that one import raise ImportError, which
    # tensorboardX catches; it is removed right after, so a later `import torch` works
    # (tensorboardX imports torch lazily where it uses it: add_graph, torch tensors).
    # Not done when torch is loaded already (nothing to save) or tensorboardX is.
    def import_writer(hide_torch: bool):
        if hide_torch:
            sys.modules["torch"] = None
        try:
            from tensorboardX import SummaryWriter

            return SummaryWriter
        finally:
            if hide_torch and sys.modules.get("torch", False) is None:
                del sys.modules["torch"]

    hide = "torch" not in sys.modules and "tensorboardX" not in sys.modules
    try:
        try:
            summary_writer = import_writer(hide)
        except ImportError as e:
            if not (hide and e.name == "torch"):
                raise
            summary_writer = import_writer(False)  # a tensorboardX that needs torch outright
    except ImportError:
        log.warning(
            "tensorboardX is not installed: metrics go to %s only; "
            "`pip install tensorboardX` for TensorBoard event files",
            METRICS_FILE,
        )
        return None
    if fs.is_remote(logdir):
        fs.register_tensorboard_writers()
    return summary_writer(logdir=str(logdir), flush_secs=30)


def read_history(workdir) -> list[dict]:
    """The records of workdir/metrics.jsonl, in order, as one timeline.

    A last line cut short by a crash is dropped. A resumed run replays the steps
    after its checkpoint; the abandoned records of those steps are dropped, so
    each (step, metric) appears once, from the run that continued.
    """
    path = fs.path(workdir, what="workdir") / METRICS_FILE
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):  # not the last line: real damage, but keep the rest
                log.warning("%s:%d is not JSON; skipped", path, number)
            continue
        records = _drop_replayed(records, record)
        records.append(record)
    return records


def _drop_replayed(records: list[dict], new: dict) -> list[dict]:
    step = new.get("step", 0)
    replay = any(
        r["step"] > step or (r["step"] == step and (r.keys() & new.keys()) - {"step", "time"})
        for r in records[-64:]  # a replay shows near the end; keeps reading linear
    )
    return [r for r in records if r["step"] < step] if replay else records


# ----------------------------------------------------------------------------- progress


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """What a person watching a run sees, on process 0 only.

    On a terminal: a tqdm bar (step/total, rate, ETA, loss, lr) that log lines print above.
    Without one (Slurm, nohup, ssh, CI): one log line per logging interval. Either way one
    line per evaluation. The rate (and so the ETA) counts from the first interval, so
    compilation before it does not skew it.
    """

    def __init__(self, total_steps: int, *, start_step: int, steps_per_epoch: int,
                 enabled: bool = True, tty: bool | None = None):  # fmt: skip
        self.total = max(int(total_steps), 1)
        self.steps_per_epoch = max(int(steps_per_epoch), 1)
        self.enabled = enabled
        self._start = None  # (time, step) of the first interval
        self._best = None  # (top1, step)
        self._bar = self._redirect = None
        if enabled and (_stderr_is_tty() if tty is None else tty):
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=self.total, initial=start_step, file=sys.stderr,
                             unit="step", dynamic_ncols=True, mininterval=0.2)  # fmt: skip
            self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger()])
            self._redirect.__enter__()

    def interval(self, step: int, *, phase: str, scalars: Mapping) -> None:
        """After a logging interval's host sync: scalars as written to metrics.jsonl."""
        if not self.enabled:
            return
        now = time.monotonic()
        self._start = self._start or (now, step)
        t0, s0 = self._start
        rate = (step - s0) / (now - t0) if now > t0 and step > s0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else math.inf
        lrs = [v for k, v in scalars.items() if k.startswith("lr/")]
        lr = f"{max(lrs):.2e}" if lrs else "-"
        loss = scalars.get("train/loss", math.nan)
        if self._bar is not None:
            self._bar.set_postfix_str(f"{phase} loss={loss:.4g} lr={lr}", refresh=False)
            self._bar.update(step - self._bar.n)
            return
        log.info(
            "step %d/%d  epoch %.2f  phase %s  loss %.4f  lr %s  %.1f images/s  ETA %s",
            step, self.total, step / self.steps_per_epoch, phase, loss, lr,
            scalars.get("train/images_per_sec", math.nan), _duration(eta),
        )  # fmt: skip

    def evaluated(
        self, step: int, *, phase: str, top1: float, loss: float, ema_top1=None, select_ema=False
    ) -> None:
        """ema_top1: the EMA weights' top-1 (optim.ema_decay > 0); select_ema: it, not the
        raw weights' top-1, ranks the checkpoints (train.select_ema), so the best follows it."""
        if not self.enabled:
            return
        ranked = ema_top1 if select_ema else top1
        if self._best is None or ranked >= self._best[0]:  # ties: the latest, as checkpoints
            self._best = (ranked, step)
        ema = "" if ema_top1 is None else f"  EMA top-1 {ema_top1:.4f}"
        log.info(
            "step %d/%d  epoch %.2f  phase %s  validation top-1 %.4f  loss %.4f%s  "
            "(best%s %.4f at step %d)",
            step, self.total, step / self.steps_per_epoch, phase, top1, loss, ema,
            " EMA" if select_ema else "", *self._best,
        )  # fmt: skip

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._redirect.__exit__(None, None, None)
            self._bar = self._redirect = None


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False
