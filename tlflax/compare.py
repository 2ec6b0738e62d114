"""`tlflax compare`: a table of runs, one row per config point with its seeds pooled.

Inputs: sweep roots (ROOT/sweep.json: its points, with their overrides and statuses), run
workdirs (a config.json), or folders of run workdirs. A row's keys are the overrides that
vary between the runs (`--by KEY` picks them: a config key, an `args.KEY` of a sweep, or
`point` for get_sweep()'s point names); runs with the same values are its seeds. For plain
workdirs the keys are the config keys whose values differ between them.

Per row: the metric's mean +- std over the finished runs (the sample standard deviation,
n - 1; none for n = 1) and n, the best run's value and seed, each phase's validation
top-1 at its end (mean +- std), the wall time (mean) and each phase's training images/s
(each run's median over the phase's logging intervals, then the mean: a probe on cached
features and a fine-tuning of the same run differ a thousandfold, and are not pooled).
Runs that failed, still run, were stopped or never started are counted in the row's
status, and listed under the table with their error or the step they reached: never
silently dropped.

Written to --out (default: the first input's compare/): compare.md (the table, printed
too), compare.csv (a row per point, full precision), runs.csv (a row per run),
compare_bar.png (each phase's validation top-1 per point, or the metric, with error bars
and the seeds as dots) and compare_curves.png (validation top-1 by epoch, the mean of each
point's runs with their range shaded, phase switches dashed). Imports no JAX.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
import statistics

from etils import epath

from tlflax import fs, metrics_io
from tlflax.errors import UserError

SWEEP_FILE = "sweep.json"  # as tlflax.sweep.SWEEP_FILE (sweep imports more than this needs)
METRICS = {  # --metric: how to read it from a summary.json, and whether higher is better
    "val/top1": (lambda s: s["final"]["val/top1"], True),
    "val/top5": (lambda s: s["final"]["val/top5"], True),
    "val/loss": (lambda s: s["final"]["val/loss"], False),
    "best/val/top1": (lambda s: s["best"].get("val/top1"), True),
    "best/val/top5": (lambda s: s["best"].get("val/top5"), True),
    "best/val/loss": (lambda s: s["best"].get("val/loss"), False),
    "test/top1": (lambda s: (s["test"] or {}).get("top1"), True),
    "test/top5": (lambda s: (s["test"] or {}).get("top5"), True),
    "wall_time_s": (lambda s: s["wall_time_s"], False),
}
# Config keys that differ between runs without making them different experiments.
HOUSEKEEPING = re.compile(
    r"seed|.*cache_dir|train\.(coordinator_address|process_id|num_processes|distributed|"
    r"async_checkpoints|log_every|keep_last|keep_best)|data\.workers"
)


@dataclasses.dataclass
class RunInfo:
    """One run as the table sees it."""

    workdir: epath.Path
    overrides: dict  # key -> value as given (a sweep's varied keys; {} for a plain workdir)
    label: str | None  # get_sweep()'s point name
    status: str  # done, failed, running, stopped, submitted, pending
    error: str | None
    summary: dict | None
    config: dict  # config.json, flattened to dotted keys ({} before the run starts)
    history: list[dict]
    total_steps: int | None
    steps_per_epoch: int | None
    switches: list[int]  # steps where a phase starts (after the first)
    phase_steps: list[tuple[str, int, int]]  # (phase, first step, last step) of each phase

    @property
    def seed(self):
        return self.overrides.get("seed", self.config.get("seed"))

    @property
    def last_step(self) -> int:
        return max((h["step"] for h in self.history), default=0)

    def images_per_sec(self) -> dict[str, float]:
        """Per phase, the median training images/s over its logging intervals (the one with
        the step's compilation does not skew it); an interval logged at step s belongs to
        the phase whose steps hold s."""
        rates: dict[str, list[float]] = {}
        for h in self.history:
            if "train/images_per_sec" not in h:
                continue
            phase = next((n for n, a, b in self.phase_steps if a < h["step"] <= b), None)
            if phase is not None:
                rates.setdefault(phase, []).append(h["train/images_per_sec"])
        return {name: statistics.median(values) for name, values in rates.items()}


@dataclasses.dataclass
class Result:
    markdown: str
    rows: list[dict]
    runs: list[RunInfo]
    keys: list[str]
    where: str


def compare(inputs, *, by=(), metric: str = "val/top1", out=None) -> Result:
    if metric not in METRICS:
        raise UserError(f"--metric={metric!r}; use one of {', '.join(METRICS)}")
    runs = [run for text in inputs for run in collect(fs.path(text, what="compare input"))]
    if not runs:
        raise UserError(f"no runs in {', '.join(inputs)}")
    keys = list(by) or varied_keys(runs)
    rows = make_rows(runs, keys=keys, metric=metric)
    phases = phase_names(runs)
    markdown = to_markdown(rows, keys=keys, metric=metric, phases=phases, runs=runs)
    out_dir = fs.path(out, what="--out") if out else _default_out(inputs)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.md").write_text(markdown + "\n")
    (out_dir / "compare.csv").write_text(_csv(point_records(rows, keys, phases)))
    (out_dir / "runs.csv").write_text(_csv(run_records(runs, keys, metric, phases)))
    written = ["compare.md", "compare.csv", "runs.csv"]
    if plot_bars(rows, keys=keys, metric=metric, phases=phases, path=out_dir / "compare_bar.png"):
        written.append("compare_bar.png")
    if plot_curves(rows, keys=keys, path=out_dir / "compare_curves.png"):
        written.append("compare_curves.png")
    return Result(markdown, rows, runs, keys, f"written to {out_dir}: {', '.join(written)}")


def _default_out(inputs) -> epath.Path:
    return fs.path(inputs[0], what="compare input") / "compare"


# ----------------------------------------------------------------------------- reading runs


def collect(path: epath.Path) -> list[RunInfo]:
    """The runs of a sweep root, a run workdir, or a folder of run workdirs."""
    if (path / SWEEP_FILE).exists():
        record = json.loads((path / SWEEP_FILE).read_text())
        return [_from_sweep_point(path, entry) for entry in record["points"]]
    if _is_run(path):
        return [read_run(path)]
    if path.is_dir():
        found = sorted((p for p in path.iterdir() if p.is_dir() and _is_run(p)), key=str)
        if found:
            return [read_run(p) for p in found]
    raise UserError(
        f"{path}: neither a sweep root ({SWEEP_FILE}), a run's workdir (config.json) nor a "
        "folder of run workdirs; give one of those"
    )


def _is_run(path: epath.Path) -> bool:
    return (path / "config.json").exists() or (path / "summary.json").exists()


def _from_sweep_point(root: epath.Path, entry: dict) -> RunInfo:
    workdir = root / entry["name"]  # the root may have moved since (copied, mounted)
    run = read_run(workdir, overrides=entry["overrides"], label=entry.get("label"))
    if run.summary is None and entry["status"] in ("failed", "stopped", "submitted", "running"):
        run.status, run.error = entry["status"], entry.get("error")
    return run


def read_run(workdir: epath.Path, *, overrides=None, label=None) -> RunInfo:
    summary = _json(workdir / "summary.json")
    config = _json(workdir / "config.json") or {}
    info = _json(workdir / "run.json") or {}
    history = metrics_io.read_history(workdir) if workdir.exists() else []
    if overrides is None:
        overrides = (summary or {}).get("overrides") or {}
    if summary is not None:
        status = "done"
    else:
        status = "running" if history else "pending"
    phases = _phase_steps(workdir)
    return RunInfo(
        workdir=workdir,
        overrides=dict(overrides),
        label=label,
        status=status,
        error=None,
        summary=summary,
        config=_flatten(config),
        history=history,
        total_steps=info.get("total_steps"),
        steps_per_epoch=info.get("steps_per_epoch"),
        switches=[start for _, start, _ in phases if start > 0],
        phase_steps=phases,
    )


def _json(path: epath.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "overrides":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _phase_steps(workdir: epath.Path) -> list[tuple[str, int, int]]:
    """(name, first step, last step) of each phase (WORKDIR/optimizer_groups.txt)."""
    try:
        text = (workdir / "optimizer_groups.txt").read_text()
    except OSError:
        return []
    found = re.findall(r"^phase (\S+) .*?\(steps (\d+)\.\.(\d+)\):", text, re.M)
    return [(name, int(a), int(b)) for name, a, b in found]


def varied_keys(runs: list[RunInfo]) -> list[str]:
    """The overrides' keys (a sweep's), else the config keys that differ, but the seed; and
    `point` first where get_sweep() named its points."""
    keys = ["point"] if any(r.label for r in runs) else []
    for run in runs:
        keys += [k for k in run.overrides if k != "seed" and k not in keys]
    if any(r.overrides for r in runs):
        return keys
    configs = [r.config for r in runs if r.config]
    for key in dict.fromkeys(k for c in configs for k in c):
        values = {json.dumps(c.get(key), sort_keys=True, default=str) for c in configs}
        if len(values) > 1 and not HOUSEKEEPING.fullmatch(key):
            keys.append(key)
    return keys


def key_value(run: RunInfo, key: str) -> str:
    if key == "point":
        return run.label or "-"
    if key in run.overrides:
        value = run.overrides[key]
    elif key in run.config:
        value = run.config[key]
    else:
        return "-"  # an args.KEY this run leaves at its default, or a run not started
    return value if isinstance(value, str) else json.dumps(value)


def phase_names(runs: list[RunInfo]) -> list[str]:
    names = []
    for run in runs:
        for row in (run.summary or {}).get("phases", []):
            if not row.get("ema") and row["strategy"] not in names:
                names.append(row["strategy"])
    return names


def phase_top1(run: RunInfo) -> dict:
    rows = (run.summary or {}).get("phases", [])
    return {r["strategy"]: r["val/top1"] for r in rows if not r.get("ema")}


# ----------------------------------------------------------------------------- the table


def make_rows(runs: list[RunInfo], *, keys: list[str], metric: str) -> list[dict]:
    """One row per distinct value of the keys, in the order the runs come."""
    groups: dict[tuple, list[RunInfo]] = {}
    for run in runs:
        groups.setdefault(tuple(key_value(run, k) for k in keys), []).append(run)
    read, higher = METRICS[metric]
    rows = []
    for values, members in groups.items():
        done = [r for r in members if r.status == "done"]
        scores = [(read(r.summary), r) for r in done]
        scores = [(v, r) for v, r in scores if v is not None]
        numbers = [v for v, _ in scores]
        best = (max if higher else min)(scores, key=lambda x: x[0]) if scores else None
        rows.append(
            {
                "values": dict(zip(keys, values, strict=True)),
                "runs": members,
                "n": len(numbers),
                "mean": statistics.fmean(numbers) if numbers else None,
                "std": statistics.stdev(numbers) if len(numbers) > 1 else None,
                "min": min(numbers, default=None),
                "max": max(numbers, default=None),
                "best": None if best is None else (best[0], best[1].seed),
                "phases": _phase_stats(done),
                "wall_time_s": _mean([r.summary["wall_time_s"] for r in done]),
                "resumed": any(r.summary.get("resumed_at_step") for r in done),
                "images_per_sec": _phase_means([r.images_per_sec() for r in done]),
                "status": _status_counts(members),
            }
        )
    return rows


def _phase_stats(done: list[RunInfo]) -> dict:
    per_phase: dict[str, list[float]] = {}
    for run in done:
        for name, value in phase_top1(run).items():
            per_phase.setdefault(name, []).append(value)
    return {
        name: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None, v)
        for name, v in per_phase.items()
    }


def _phase_means(per_run: list[dict]) -> dict:
    """{phase: the mean over runs} of per-run {phase: value} dicts."""
    names = dict.fromkeys(name for values in per_run for name in values)
    return {name: _mean([values.get(name) for values in per_run]) for name in names}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _status_counts(runs: list[RunInfo]) -> dict:
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.status] = counts.get(run.status, 0) + 1
    return counts


def is_percent(metric: str) -> bool:
    return metric.endswith(("top1", "top5"))


def fmt_stat(mean, std, *, percent: bool) -> str:
    if mean is None:
        return "-"
    scale, unit = (100.0, " %") if percent else (1.0, "")
    digits = 2 if percent else 4
    text = f"{scale * mean:.{digits}f}"
    if std is not None:
        text += f" ± {scale * std:.{digits}f}"
    return text + unit


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def to_markdown(rows, *, keys, metric, phases, runs) -> str:
    percent = is_percent(metric)
    head = [*keys, "n", f"{metric} (mean ± std)", "best (seed)"]
    rates = "images/s" + (f" ({' / '.join(phases)})" if len(phases) > 1 else "")
    head += [f"after {p}" for p in phases] + ["wall time", rates, "runs"]
    top = _best_row(rows, metric)
    lines = [_md_line(head), _md_line(["---"] * len(head))]
    for i, row in enumerate(rows):
        value = fmt_stat(row["mean"], row["std"], percent=percent)
        best = "-"
        if row["best"] is not None:
            best = f"{fmt_stat(row['best'][0], None, percent=percent)} ({row['best'][1]})"
        cells = [*row["values"].values(), str(row["n"]), f"**{value}**" if i == top else value]
        cells.append(best)
        for p in phases:
            stat = row["phases"].get(p)
            cells.append(fmt_stat(stat[0], stat[1], percent=True) if stat else "-")
        wall = _duration(row["wall_time_s"]) + (" (resumed)" if row["resumed"] else "")
        rates = row["images_per_sec"]
        rate = " / ".join(_rate(rates.get(p)) for p in phases) if rates else "-"
        cells += [wall, rate, _status_text(row["status"])]
        lines.append(_md_line(cells))
    return "\n".join(lines + _notes(runs))


def _rate(images_per_sec) -> str:
    return "-" if images_per_sec is None else f"{images_per_sec:.1f}"


def _best_row(rows, metric) -> int | None:
    """The row with the best mean, in bold; none on a tie."""
    scored = [(row["mean"], i) for i, row in enumerate(rows) if row["mean"] is not None]
    if len(scored) < 2:
        return None
    best = (max if METRICS[metric][1] else min)(scored)
    return None if sum(mean == best[0] for mean, _ in scored) > 1 else best[1]


def _md_line(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _status_text(counts: dict) -> str:
    order = ("done", "running", "submitted", "stopped", "failed", "pending")
    return ", ".join(f"{counts[s]} {s}" for s in order if counts.get(s))


def _notes(runs: list[RunInfo]) -> list[str]:
    """The runs that are not finished, one line each: what happened to them."""
    notes = []
    for run in runs:
        if run.status == "done":
            continue
        where = run.workdir.name
        if run.status == "failed":
            notes.append(f"- failed: `{where}`: {run.error}")
        elif run.history or run.status in ("running", "stopped"):
            total = f"/{run.total_steps}" if run.total_steps else ""
            notes.append(f"- {run.status}: `{where}` (step {run.last_step}{total})")
        else:
            notes.append(f"- {run.status}: `{where}` (not started)")
    return [""] + notes if notes else []


def point_records(rows, keys, phases) -> list[dict]:
    records = []
    for row in rows:
        record = {**row["values"], "n": row["n"], "mean": row["mean"], "std": row["std"]}
        record.update(min=row["min"], max=row["max"])
        record["best_seed"] = None if row["best"] is None else row["best"][1]
        for p in phases:
            stat = row["phases"].get(p)
            record[f"{p}/val/top1_mean"] = stat[0] if stat else None
            record[f"{p}/val/top1_std"] = stat[1] if stat else None
        record["wall_time_s_mean"] = row["wall_time_s"]
        for p in phases:
            record[f"{p}/images_per_sec_mean"] = row["images_per_sec"].get(p)
        for status in ("done", "running", "submitted", "stopped", "failed", "pending"):
            record[f"n_{status}"] = row["status"].get(status, 0)
        records.append(record)
    return records


def run_records(runs, keys, metric, phases) -> list[dict]:
    read = METRICS[metric][0]
    records = []
    for run in runs:
        record = {k: key_value(run, k) for k in keys}
        record.update(seed=run.seed, status=run.status, workdir=str(run.workdir))
        record[metric] = read(run.summary) if run.summary else None
        tops = phase_top1(run)
        record.update({f"{p}/val/top1": tops.get(p) for p in phases})
        record["wall_time_s"] = run.summary["wall_time_s"] if run.summary else None
        record["resumed_at_step"] = (run.summary or {}).get("resumed_at_step")
        rates = run.images_per_sec()
        record.update({f"{p}/images_per_sec": rates.get(p) for p in phases})
        record["last_step"], record["error"] = run.last_step, run.error
        records.append(record)
    return records


def _csv(records: list[dict]) -> str:
    text = io.StringIO()
    columns = list(dict.fromkeys(k for r in records for k in r))
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: "" if v is None else v for k, v in record.items()})
    return text.getvalue()


# ----------------------------------------------------------------------------- charts


def _figure(width: float, height: float):
    # A bare Figure renders with Agg on savefig: no pyplot, no global backend switch.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def row_label(row: dict, *, sep: str = ", ") -> str:
    """A point's name where get_sweep() gave one, else its values."""
    values = row["values"]
    if values.get("point", "-") != "-":
        return values["point"]
    return sep.join(f"{k.split('.')[-1]}={v}" for k, v in values.items()) or "all runs"


def plot_bars(rows, *, keys, metric, phases, path) -> bool:
    """Each phase's validation top-1 per point (for val/top1 with several phases), else the
    metric: bars at the mean, error bars one std, each seed a dot."""
    by_phase = metric == "val/top1" and len(phases) > 1
    series = phases if by_phase else [metric]
    if not any(row["n"] for row in rows):
        return False
    percent = is_percent(metric)
    scale = 100.0 if percent else 1.0
    fig = _figure(max(6.0, 1.2 * len(rows) * len(series) + 2), 4.5)
    ax = fig.subplots()
    width = 0.8 / len(series)
    for j, name in enumerate(series):
        means, stds, dots = [], [], []
        for row in rows:
            values = _row_values(row, name, metric, by_phase)
            means.append(scale * statistics.fmean(values) if values else math.nan)
            stds.append(scale * statistics.stdev(values) if len(values) > 1 else 0.0)
            dots.append([scale * v for v in values])
        x = [i + (j - (len(series) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(x, means, width, yerr=stds, capsize=4, label=f"after {name}" if by_phase else name)
        for xi, ds in zip(x, dots, strict=True):
            ax.plot([xi] * len(ds), ds, "k.", markersize=4)
    ax.set_xticks(range(len(rows)), [row_label(r, sep="\n") for r in rows], fontsize=8)
    ax.set_ylabel(("validation top-1" if by_phase else metric) + (" (%)" if percent else ""))
    _zoom(
        ax,
        [v for row in rows for name in series for v in _row_values(row, name, metric, by_phase)],
        scale,
    )
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend()
    ax.set_title("mean ± std over seeds (dots: seeds)")
    fig.tight_layout()
    fs.save_figure(fig, path, dpi=100)
    return True


def _row_values(row, name, metric, by_phase) -> list[float]:
    if by_phase:
        stat = row["phases"].get(name)
        return stat[2] if stat else []
    read = METRICS[metric][0]
    done = [r for r in row["runs"] if r.status == "done"]
    return [v for v in (read(r.summary) for r in done) if v is not None]


def _zoom(ax, values, scale) -> None:
    """Bars from near the lowest value, not from 0: differences of a point or two show."""
    if not values:
        return
    low, high = scale * min(values), scale * max(values)
    pad = max((high - low) * 0.5, 0.01 * max(abs(high), 1e-9))
    ax.set_ylim(max(0.0, low - pad) if low >= 0 else low - pad, high + pad)


def plot_curves(rows, *, keys, path) -> bool:
    """Validation top-1 by epoch: each point's runs' mean, their range shaded, and the
    steps where its phases switch dashed in its colour."""
    fig = _figure(10, 5)
    ax = fig.subplots()
    drawn = False
    for i, row in enumerate(rows):
        colour = f"C{i % 10}"
        curves = [_val_curve(r) for r in row["runs"]]
        curves = [c for c in curves if c]
        if not curves:
            continue
        drawn = True
        epochs = sorted({e for c in curves for e in c})
        stacked = [[c[e] for c in curves if e in c] for e in epochs]
        mean = [100 * statistics.fmean(v) for v in stacked]
        ax.plot(epochs, mean, color=colour, marker="o", markersize=3, label=row_label(row))
        if len(curves) > 1:
            ax.fill_between(
                epochs,
                [100 * min(v) for v in stacked],
                [100 * max(v) for v in stacked],
                color=colour,
                alpha=0.15,
            )
        run = row["runs"][0]
        for step in run.switches:
            if run.steps_per_epoch:
                ax.axvline(step / run.steps_per_epoch, color=colour, linestyle="--", alpha=0.6)
    if not drawn:
        return False
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("validation top-1 (mean over seeds, range shaded; dashed: phase switches)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fs.save_figure(fig, path, dpi=100)
    return True


def _val_curve(run: RunInfo) -> dict:
    """epoch -> validation top-1 of one run."""
    spe = run.steps_per_epoch or 1
    return {
        round(h.get("epoch", h["step"] / spe), 6): h["val/top1"]
        for h in run.history
        if "val/top1" in h
    }
