"""Metric logging: metrics.jsonl (the record), TensorBoard events, and a console progress bar.

metrics.jsonl is the source of truth that reports and summaries read back; the
TensorBoard files (tensorboardX: no TensorFlow needed) are for watching a run.
Only the primary process writes, so a multi-host run logs once.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import sys
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
HPARAMS_FILE = "hparams.json"


def _trim_partial_line(path: pathlib.Path) -> None:
    """Drop a last line cut short by a crash: appending after a resume stays one record a line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with path.open("rb+") as f:
            f.truncate(data.rfind(b"\n") + 1)


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


class MetricWriter:
    """Scalars to workdir/metrics.jsonl and workdir/tensorboard/; no-op when not primary."""

    def __init__(self, workdir, *, is_primary: bool = True):
        self.workdir = pathlib.Path(workdir)
        self.is_primary = is_primary
        self._file = None
        self._tb = None
        if not is_primary:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / METRICS_FILE
        _trim_partial_line(path)
        self._file = path.open("a")
        self._tb = _open_tensorboard(self.workdir / TENSORBOARD_DIR)

    def write_scalars(self, step: int, scalars: Mapping) -> None:
        if self._file is None:
            return
        values = {k: _as_float(k, v) for k, v in scalars.items()}
        # Python's json writes NaN / Infinity (and reads them back): a diverged loss stays visible.
        record = {"step": int(step), "time": time.time(), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a few lines per eval interval: cheap, and a crash loses nothing
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, int(step), walltime=record["time"])

    def write_hparams(self, hparams: Mapping) -> None:
        """Flattened ('/'-joined) to workdir/hparams.json and TensorBoard's hparams tab."""
        if self._file is None:
            return
        flat = _flatten(hparams)
        (self.workdir / HPARAMS_FILE).write_text(json.dumps(flat, indent=1, sort_keys=True))
        if self._tb is not None:
            self._tb.add_hparams(flat, {}, name="hparams")

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


def _open_tensorboard(logdir: pathlib.Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        log.warning(
            "tensorboardX is not installed: metrics go to %s only; "
            "`pip install tensorboardX` for TensorBoard event files",
            METRICS_FILE,
        )
        return None
    return SummaryWriter(logdir=str(logdir), flush_secs=30)


def read_history(workdir) -> list[dict]:
    """The records of workdir/metrics.jsonl, in order, as one timeline.

    A last line cut short by a crash is dropped. A resumed run replays the steps
    after its checkpoint; the abandoned records of those steps are dropped, so
    each (step, metric) appears once, from the run that continued.
    """
    path = pathlib.Path(workdir) / METRICS_FILE
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


class ProgressBar:
    """One self-rewriting stderr line: step/total, rate, ETA and a few numbers.

    enabled=None: only when stderr is a terminal (logs and CI stay clean).
    Redraws at most every `min_interval` seconds; the rate counts from the first
    update, so compilation before it does not skew the ETA.
    """

    def __init__(self, total_steps: int, *, enabled: bool | None = None, min_interval: float = 0.2):
        self.total = max(int(total_steps), 1)
        self.enabled = _stderr_is_tty() if enabled is None else bool(enabled)
        self.min_interval = min_interval
        self._start = None  # (time, step) of the first update
        self._last_draw = -math.inf
        self._drawn = False
        self._width = 0

    def update(self, step: int, **postfix) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self._start is None:
            self._start = (now, step)
        if now - self._last_draw < self.min_interval and step < self.total:
            return
        self._last_draw = now
        self._draw(self.render(step, now=now, **postfix))

    def render(self, step: int, *, now: float, **postfix) -> str:
        t0, s0 = self._start or (now, step)
        rate = (step - s0) / (now - t0) if now > t0 and step > s0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else math.inf
        frac = min(max(step / self.total, 0.0), 1.0)
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        extras = " ".join(f"{k}={_short(v)}" for k, v in postfix.items())
        text = f"{step}/{self.total} {100 * frac:3.0f}% [{bar}] {rate:.2f} step/s"
        return f"{text} ETA {_duration(eta)} {extras}".rstrip()

    def _draw(self, text: str) -> None:
        pad = " " * max(self._width - len(text), 0)  # erase a longer previous line
        sys.stderr.write("\r" + text + pad)
        sys.stderr.flush()
        self._width = len(text)
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._drawn = False


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False
