"""tlflax compare on runs written by hand: the rows (seeds pooled), mean +- std with n, the
best seed, per-phase accuracies, wall time and images/s; failed, running and pending runs
shown as such; --by and --metric; plain workdirs (keys that differ in their configs); the
markdown, CSV and PNG files. (The same table against real runs: tests/test_sweep.py.)"""

from __future__ import annotations

import csv
import io
import json
import statistics

import pytest

from tlflax import compare, main

PHASES = ("linear_probe", "finetune")


def write_run(
    workdir, *, top1, seed: int, overrides: dict, config=None, wall=60.0, steps=(4, 8),
    images_per_sec=(5.0, 100.0, 120.0), finetune_images_per_sec=(9.0, 10.0, 11.0),
    last_step=None,
):  # fmt: skip
    """A run's files as tlflax train leaves them: top1 per phase (None: not finished)."""
    workdir.mkdir(parents=True)
    config = config or {"seed": seed, "optim": {"lr": 0.001, "strategy": "two_phase"}}
    (workdir / "config.json").write_text(json.dumps(config))
    (workdir / "run.json").write_text(json.dumps({"steps_per_epoch": 4, "total_steps": steps[-1]}))
    groups = f"phase {PHASES[0]} (steps 0..{steps[0]}):\nx\n\nphase {PHASES[1]} (steps "
    (workdir / "optimizer_groups.txt").write_text(groups + f"{steps[0]}..{steps[1]}):\ny\n")
    records = [{"step": i + 1, "train/images_per_sec": r} for i, r in enumerate(images_per_sec)]
    records += [  # the second phase's, from its first step on
        {"step": steps[0] + i + 1, "train/images_per_sec": r}
        for i, r in enumerate(finetune_images_per_sec)
        if last_step is None or steps[0] + i + 1 <= last_step
    ]
    for end, value in zip(steps, top1 or [0.5], strict=False):
        if last_step is None or end <= last_step:
            records.append({"step": end, "val/top1": value, "epoch": end / 4})
    records.sort(key=lambda r: r["step"])  # as a run writes them (a step back: a resume)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if top1 is None:
        return
    phases = [
        {"strategy": p, "step": s, "val/top1": v}
        for p, s, v in zip(PHASES, steps, top1, strict=True)
    ]
    summary = {
        "final": {"val/top1": top1[-1], "val/top5": 1.0, "val/loss": 1.0 - top1[-1]},
        "best": {"step": steps[-1], "val/top1": max(top1)},
        "phases": phases, "test": None, "wall_time_s": wall, "seed": seed,
        "overrides": overrides, "resumed_at_step": 0,
    }  # fmt: skip
    (workdir / "summary.json").write_text(json.dumps(summary))


def point(name, overrides, status="done", error=None, label=None):
    return {"name": name, "overrides": overrides, "status": status, "error": error, "label": label}


@pytest.fixture
def sweep_root(tmp_path):
    """lr 1e-3 x 3 seeds done; lr 1e-4: 2 done, 1 failed; lr 1e-5: 1 running, 1 pending."""
    root = tmp_path / "sweep"
    points, top1 = [], {
        ("1e-3", 0): [0.80, 0.90], ("1e-3", 1): [0.82, 0.94], ("1e-3", 2): [0.78, 0.92],
        ("1e-4", 0): [0.70, 0.75], ("1e-4", 1): [0.72, 0.85],
    }  # fmt: skip
    for (lr, seed), values in top1.items():
        overrides = {"optim.lr": lr, "seed": seed}
        write_run(root / f"lr={lr},seed={seed}", top1=values, seed=seed, overrides=overrides,
                  wall=60.0 + seed)  # fmt: skip
        points.append(point(f"lr={lr},seed={seed}", overrides))
    error = "tlflax train: config.optim.lr=1e-4 ... out of memory"
    (root / "lr=1e-4,seed=2").mkdir()
    points.append(point("lr=1e-4,seed=2", {"optim.lr": "1e-4", "seed": 2}, "failed", error))
    write_run(root / "lr=1e-5,seed=0", top1=None, seed=0, overrides={}, last_step=4)
    points.append(point("lr=1e-5,seed=0", {"optim.lr": "1e-5", "seed": 0}, "running"))
    points.append(point("lr=1e-5,seed=1", {"optim.lr": "1e-5", "seed": 1}, "pending"))
    (root / "sweep.json").write_text(json.dumps({"points": points}))
    return root


def test_rows_pool_the_seeds_with_mean_std_n_best_and_phases(sweep_root):
    result = compare.compare([str(sweep_root)])
    assert result.keys == ["optim.lr"]
    rows = {r["values"]["optim.lr"]: r for r in result.rows}
    assert list(rows) == ["1e-3", "1e-4", "1e-5"]
    first = rows["1e-3"]
    assert first["n"] == 3 and first["mean"] == pytest.approx(0.92)
    assert first["std"] == pytest.approx(statistics.stdev([0.90, 0.94, 0.92]))  # n - 1
    assert first["best"] == (0.94, 1)
    assert first["phases"]["linear_probe"][0] == pytest.approx(0.80)
    assert first["wall_time_s"] == pytest.approx(61.0)
    # Per phase: each run's median over the phase's logging intervals, then the mean.
    assert first["images_per_sec"] == pytest.approx({"linear_probe": 100.0, "finetune": 10.0})
    assert rows["1e-4"]["n"] == 2 and rows["1e-4"]["status"] == {"done": 2, "failed": 1}
    assert rows["1e-5"]["n"] == 0 and rows["1e-5"]["status"] == {"running": 1, "pending": 1}
    lines = result.markdown.splitlines()
    assert lines[0] == (
        "| optim.lr | n | val/top1 (mean ± std) | best (seed) | after linear_probe | "
        "after finetune | wall time | images/s (linear_probe / finetune) | runs |"
    )
    assert lines[2] == (
        "| 1e-3 | 3 | **92.00 ± 2.00 %** | 94.00 % (1) | 80.00 ± 2.00 % | 92.00 ± 2.00 % | "
        "1.0 min | 100.0 / 10.0 | 3 done |"
    )
    assert lines[3].startswith("| 1e-4 | 2 | 80.00 ± 7.07 % | 85.00 % (1) |")
    assert lines[3].endswith("| 2 done, 1 failed |")
    assert lines[4] == "| 1e-5 | 0 | - | - | - | - | - | - | 1 running, 1 pending |"
    assert "- failed: `lr=1e-4,seed=2`: tlflax train: config.optim.lr=1e-4 ... out of memory" in (
        lines
    )
    assert "- running: `lr=1e-5,seed=0` (step 4/8)" in lines
    assert "- pending: `lr=1e-5,seed=1` (not started)" in lines


def test_files_written_csv_holds_full_precision_and_every_run(sweep_root, tmp_path):
    out = tmp_path / "out"
    compare.compare([str(sweep_root)], out=str(out))
    points = list(csv.DictReader(io.StringIO((out / "compare.csv").read_text())))
    assert [p["optim.lr"] for p in points] == ["1e-3", "1e-4", "1e-5"]
    assert float(points[0]["mean"]) == pytest.approx(0.92, abs=1e-12)
    assert (points[1]["n_done"], points[1]["n_failed"]) == ("2", "1")
    runs = list(csv.DictReader(io.StringIO((out / "runs.csv").read_text())))
    assert len(runs) == 8 and {r["status"] for r in runs} == {
        "done",
        "failed",
        "running",
        "pending",
    }
    assert (out / "compare.md").read_text().startswith("| optim.lr |")
    for png in ("compare_bar.png", "compare_curves.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_by_and_metric(sweep_root):
    result = compare.compare([str(sweep_root)], by=["optim.strategy"], metric="best/val/top1")
    pooled, unknown = result.rows  # runs that never wrote a config.json have no value for it
    assert pooled["values"] == {"optim.strategy": "two_phase"} and pooled["n"] == 5
    assert unknown["values"] == {"optim.strategy": "-"} and unknown["status"] == {
        "failed": 1, "pending": 1}  # fmt: skip
    assert pooled["mean"] == pytest.approx(statistics.fmean([0.90, 0.94, 0.92, 0.75, 0.85]))
    assert "best/val/top1 (mean ± std)" in result.markdown
    loss = compare.compare([str(sweep_root)], metric="val/loss")
    rows = {r["values"]["optim.lr"]: r for r in loss.rows}
    assert rows["1e-3"]["best"] == (pytest.approx(0.06), 1)  # the lowest loss is the best
    with pytest.raises(compare.UserError, match="--metric='top1'; use one of val/top1"):
        compare.compare([str(sweep_root)], metric="top1")


def test_plain_workdirs_compare_on_the_config_keys_that_differ(tmp_path):
    for i, lr in enumerate((0.001, 0.001, 0.01)):
        config = {"seed": i, "optim": {"lr": lr}, "data": {"cache_dir": f"/c{i}"}}
        write_run(tmp_path / f"run{i}", top1=[0.5, 0.6 + i / 10], seed=i, overrides={},
                  config=config)  # fmt: skip
    result = compare.compare([str(tmp_path)], out=str(tmp_path / "cmp"))
    assert result.keys == ["optim.lr"]  # not the seed, not the cache folders
    assert [(r["values"]["optim.lr"], r["n"]) for r in result.rows] == [("0.001", 2), ("0.01", 1)]
    one = compare.compare([str(tmp_path / "run2")], out=str(tmp_path / "one"))
    assert one.rows[0]["n"] == 1 and one.rows[0]["std"] is None


def test_the_cli_prints_the_table_and_names_bad_inputs(sweep_root, tmp_path, capsys):
    assert main.main(["tlflax", "compare", str(sweep_root), "--by", "optim.lr"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| optim.lr | n |") and f"written to {sweep_root / 'compare'}" in out
    assert main.main(["tlflax", "compare", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a sweep root" in err
