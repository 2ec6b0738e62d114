"""Evaluation: the jit-able eval step, the host-side summary, and the reports.

The eval step returns per-example arrays (no reduction on device), so padded
rows of the last batch are dropped exactly once, on the host, by their mask,
and the same outputs give loss, top-k, the confusion matrix and the error list.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from tlflax import fs, losses
from tlflax.errors import ConfigError

log = logging.getLogger(__name__)

OUTPUT_KEYS = ("loss", "pred", "conf", "top1", "top5", "label", "mask")
MAX_NAMED_CLASSES = 30  # class names on the confusion matrix axes up to this many
MAX_ERROR_IMAGES = 25


def make_eval_step(*, model_apply: Callable, eval_transform: Callable):
    """(variables, batch) -> per-example outputs; pure, for jax.jit.

    batch: {'image': uint8 (B, H, W, 3), 'label': int32 (B,), 'mask': bool (B,)
    [, 'id': (B,) numeric, passed through]}. model_apply(variables, images) -> logits.
    """

    def eval_step(variables, batch):
        logits = model_apply(variables, eval_transform(batch["image"]))
        labels = batch["label"].astype(jnp.int32)
        targets = losses.onehot_targets(labels, num_classes=logits.shape[-1])
        out = {
            "loss": losses.softmax_xent_per_example(logits=logits, targets=targets),
            "pred": losses.predicted_class(logits),
            "conf": losses.confidence(logits),
            "top1": losses.correct_topk(logits=logits, labels=labels, k=1),
            "top5": losses.correct_topk(logits=logits, labels=labels, k=5),
            "label": labels,
            "mask": batch["mask"].astype(bool),
        }
        if "id" in batch:
            out["id"] = batch["id"]
        return out

    return eval_step


TTA = ("", "flip", "crops")


def tta_apply(model_apply: Callable, eval_transform: Callable, *, kind: str, image_size: int):
    """model_apply over test-time views of uint8 (B, S, S, 3) images: log of the mean of the
    views' softmax. 'flip': the centre crop and its mirror; 'crops': also the 4 corner
    crops of the stored image and their mirrors (10 views). '' is the centre crop alone."""
    if kind not in TTA:
        raise ConfigError(f"--tta={kind!r}; use one of {TTA[1:]} (or '' for none)")

    def views(images):
        centre = eval_transform(images)
        out = [centre] if not kind else [centre, centre[:, :, ::-1]]
        if kind == "crops":
            height, width = images.shape[1:3]
            for top in (0, height - image_size):
                for left in (0, width - image_size):
                    crop = eval_transform(
                        images[:, top : top + image_size, left : left + image_size]
                    )
                    out += [crop, crop[:, :, ::-1]]
        return out

    def apply(variables, images):
        probs = [
            jax.nn.softmax(model_apply(variables, v).astype(jnp.float32)) for v in views(images)
        ]
        return jnp.log(jnp.maximum(sum(probs) / len(probs), jnp.finfo(jnp.float32).tiny))

    return apply


# ----------------------------------------------------------------------------- summary


@dataclasses.dataclass
class EvalResult:
    """Metrics over the masked-in examples; arrays are numpy, rows of `confusion` are truth."""

    loss: float
    top1: float
    top5: float
    n: int
    n_errors: int
    class_names: list[str]
    confusion: np.ndarray  # (C, C) int64, [true, pred]
    precision: np.ndarray  # (C,) float64; 0 for a class never predicted
    recall: np.ndarray  # (C,) float64; 0 for a class without examples
    f1: np.ndarray
    support: np.ndarray  # (C,) int64 examples per true class
    errors: list[dict]  # {index, [file,] [id,] true, pred, true_index, pred_index, conf}
    labels: np.ndarray = None  # (n,) true class per example, in the split's order
    preds: np.ndarray = None  # (n,) predicted class
    confs: np.ndarray = None  # (n,) the prediction's probability

    @property
    def macro_f1(self) -> float:
        return _macro(self.f1, self._present())

    @property
    def balanced_accuracy(self) -> float:
        """Mean recall over the classes that have examples."""
        return _macro(self.recall, self.support > 0)

    def _present(self) -> np.ndarray:
        # As sklearn's macro average without `labels=`: classes seen as truth or prediction.
        return (self.support > 0) | (self.confusion.sum(axis=0) > 0)

    def per_class(self) -> list[dict]:
        missed = {i: [] for i in range(len(self.class_names))}
        for err in self.errors:
            missed[err["true_index"]].append(_example_name(err))
        return [
            {
                "class": name,
                "precision": float(self.precision[i]),
                "recall": float(self.recall[i]),
                "f1": float(self.f1[i]),
                "support": int(self.support[i]),
                "n_errors": len(missed[i]),
                "misclassified": ";".join(missed[i]),  # files (folders) or ids, else #index
            }
            for i, name in enumerate(self.class_names)
        ]

    def to_dict(self) -> dict:
        return {
            "loss": self.loss,
            "top1": self.top1,
            "top5": self.top5,
            "n": self.n,
            "n_errors": self.n_errors,
            "macro_f1": self.macro_f1,
            "balanced_accuracy": self.balanced_accuracy,
            "class_names": list(self.class_names),
            "per_class": self.per_class(),
            "confusion": self.confusion.tolist(),
            "errors": self.errors,
        }


def _macro(values: np.ndarray, where: np.ndarray) -> float:
    return float(values[where].mean()) if where.any() else 0.0


def _concat(outputs: Sequence[dict]) -> dict[str, np.ndarray]:
    if not outputs:
        raise ValueError("evaluate.summarise: no batches; is the eval split empty?")
    missing = [k for k in OUTPUT_KEYS if k not in outputs[0]]
    if missing:
        raise ValueError(
            f"evaluate.summarise: outputs lack {missing}; pass the dicts from make_eval_step"
        )
    keys = OUTPUT_KEYS + (("id",) if all("id" in o for o in outputs) else ())
    flat = {k: np.concatenate([np.asarray(o[k]).reshape(-1) for o in outputs]) for k in keys}
    mask = flat.pop("mask").astype(bool)
    return {k: v[mask] for k, v in flat.items()}


def _example_name(err: dict) -> str:
    return str(err.get("file") or err.get("id") or f"#{err['index']}")


def summarise(
    outputs: Sequence[dict], *, class_names: Sequence[str], example_names=None
) -> EvalResult:
    """Host-side metrics from the eval step's outputs (numpy), masked-in examples only.

    An example's `index` is its position among the masked-in examples, in order (the
    split's order: eval is not shuffled); example_names[index] (file paths, TFDS ids) goes
    into each error row as 'file'.
    """
    ex = _concat(outputs)
    if example_names is not None:
        if len(example_names) != ex["label"].size:
            raise ValueError(
                f"evaluate.summarise: {len(example_names)} example names for "
                f"{ex['label'].size} examples; pass the split's names in its order"
            )
        ex["file"] = np.asarray(example_names)
    n_classes = len(class_names)
    labels, preds = ex["label"].astype(np.int64), ex["pred"].astype(np.int64)
    for name, values in (("label", labels), ("pred", preds)):
        bad = values[(values < 0) | (values >= n_classes)]
        if bad.size:
            raise ValueError(
                f"evaluate.summarise: {name} {int(bad[0])} is outside 0..{n_classes - 1} "
                f"({n_classes} class_names); do the class names match the data?"
            )
    n = int(labels.size)
    if "id" in ex and np.unique(ex["id"]).size != n:
        # Each example once: a repeat means the eval iterator wrapped around unmasked.
        log.warning("evaluate.summarise: %d of %d ids repeat", n - np.unique(ex["id"]).size, n)
    confusion = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(confusion, (labels, preds), 1)
    precision, recall, f1, support = _per_class(confusion)
    wrong = np.flatnonzero(labels != preds)
    return EvalResult(
        loss=float(ex["loss"].astype(np.float64).sum() / max(n, 1)),
        top1=float(ex["top1"].sum() / max(n, 1)),
        top5=float(ex["top5"].sum() / max(n, 1)),
        n=n,
        n_errors=int(wrong.size),
        class_names=[str(c) for c in class_names],
        confusion=confusion,
        precision=precision,
        recall=recall,
        f1=f1,
        support=support,
        errors=[_error_row(i, ex, class_names) for i in wrong],
        labels=labels,
        preds=preds,
        confs=ex["conf"].astype(np.float64),
    )


def _per_class(confusion: np.ndarray):
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(tp), where=both > 0)
    return precision, recall, f1, support


def _error_row(i: int, ex: dict, class_names) -> dict:
    true, pred = int(ex["label"][i]), int(ex["pred"][i])
    row = {
        "index": int(i),
        "true": str(class_names[true]),
        "pred": str(class_names[pred]),
        "true_index": true,
        "pred_index": pred,
        "conf": float(ex["conf"][i]),
    }
    if "file" in ex:
        row["file"] = str(ex["file"][i])
    if "id" in ex:
        value = ex["id"][i]
        row["id"] = value.item() if hasattr(value, "item") else value
        if isinstance(row["id"], bytes):
            row["id"] = row["id"].decode()
    return row


# ----------------------------------------------------------------------------- reports


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Plain-text table for the console; numbers right-aligned, floats to 4 decimals."""

    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.4f}"
        return str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[j]) for r in cells]) for j, c in enumerate(columns)]
    numeric = [bool(rows) and all(_is_number(row.get(c)) for row in rows) for c in columns]

    def line(values):
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line(list(columns)), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def write_reports(
    result: EvalResult,
    *,
    out_dir,
    images=None,
    history: Sequence[dict] | None = None,
    phase_switch_steps: Sequence[int] = (),
    title: str = "",
) -> dict[str, epath.Path]:
    """eval.json, per_class.csv, errors.csv, confusion.png [, errors.png, predictions.png]
    [, curves.png] in out_dir.

    images: the eval images by example index (an array (N, H, W, 3), a sequence, or a
    callable index -> image) for the grid of misclassified examples.
    history: metric dicts with 'step' (see metrics_io.read_history) for the curves.
    Returns {report name: path} of what was written.
    """
    out_dir = fs.path(out_dir, what="report folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {name: out_dir / name for name in ("eval.json", "per_class.csv", "errors.csv")}
    report = {"title": title, **result.to_dict()}
    written["eval.json"].write_text(json.dumps(report, indent=1))
    _write_csv(result.per_class(), written["per_class.csv"], PER_CLASS_COLUMNS)
    _write_csv(result.errors, written["errors.csv"], ERROR_COLUMNS)
    written["confusion.png"] = _plot_confusion(result, out_dir / "confusion.png", title)
    if images is not None and result.errors:
        written["errors.png"] = _plot_errors(result, images, out_dir / "errors.png", title)
    if images is not None and result.preds is not None and result.n:
        path = out_dir / "predictions.png"
        written["predictions.png"] = _plot_predictions(result, images, path, title)
    if history:
        path = _plot_curves(history, phase_switch_steps, out_dir / "curves.png", title)
        if path is not None:
            written["curves.png"] = path
    return written


PER_CLASS_COLUMNS = ("class", "precision", "recall", "f1", "support", "n_errors", "misclassified")
ERROR_COLUMNS = ("index", "file", "id", "true", "pred", "conf")


def _write_csv(rows: Sequence[dict], path: epath.Path, columns: Sequence[str]) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(text.getvalue())


def _figure(width: float, height: float):
    # A bare Figure renders with Agg on savefig: no pyplot, no global backend switch,
    # nothing to close, and a headless host never looks for a display.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _plot_confusion(result: EvalResult, path: epath.Path, title: str) -> epath.Path:
    n_classes = len(result.class_names)
    named = n_classes <= MAX_NAMED_CLASSES
    side = min(4 + 0.4 * n_classes, 20) if named else 10
    fig = _figure(side + 1.5, side)
    ax = fig.subplots()
    # Colour by the row-normalised rate so rare classes are as readable as common ones.
    rates = result.confusion / np.maximum(result.confusion.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if named:
        ticks = np.arange(n_classes)
        ax.set_xticks(ticks, result.class_names, rotation=90)
        ax.set_yticks(ticks, result.class_names)
        for (i, j), count in np.ndenumerate(result.confusion):
            if count:
                colour = "white" if rates[i, j] > 0.5 else "black"
                ax.text(j, i, str(count), ha="center", va="center", color=colour, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(
        f"{_prefix(title)}top-1 {100 * result.top1:.2f}% ({result.n_errors}/{result.n} wrong)"
    )
    fig.tight_layout()
    fs.save_figure(fig, path, dpi=100)
    return path


def _prefix(title: str) -> str:
    return f"{title}: " if title else ""


def _image_at(images, index: int) -> np.ndarray:
    image = np.asarray(images(index) if callable(images) else images[index])
    if image.dtype != np.uint8:
        image = image.astype(np.float32)
        lo, hi = float(image.min()), float(image.max())
        if lo < 0.0 or hi > 1.0:  # normalised pixels: stretch to [0, 1] for display
            image = (image - lo) / max(hi - lo, 1e-12)
    return image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image


def _plot_errors(result: EvalResult, images, path: epath.Path, title: str):
    shown = sorted(result.errors, key=lambda e: -e["conf"])[:MAX_ERROR_IMAGES]
    cols = min(5, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig = _figure(2.6 * cols, 2.9 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, err in zip(axes.flat, shown, strict=False):
        ax.imshow(_image_at(images, err["index"]), cmap="gray")
        ax.set_title(f"{err['true']} -> {err['pred']} ({err['conf']:.2f})", fontsize=8)
    fig.suptitle(
        f"{_prefix(title)}No of errors = {result.n_errors}/{result.n}; the {len(shown)} most "
        "confident: true -> pred (conf)"
    )
    fig.tight_layout()
    fs.save_figure(fig, path, dpi=100)
    return path


def _plot_predictions(result: EvalResult, images, path: epath.Path, title: str, *, seed=0):
    """A seeded random sample of the split, right and wrong alike: Actual / Pred."""
    n_shown = min(MAX_ERROR_IMAGES, result.n)
    shown = np.sort(np.random.default_rng(seed).choice(result.n, n_shown, replace=False))
    cols = min(5, n_shown)
    rows = math.ceil(n_shown / cols)
    fig = _figure(2.6 * cols, 3.1 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    names = result.class_names
    for ax, i in zip(axes.flat, shown, strict=False):
        true, pred = int(result.labels[i]), int(result.preds[i])
        ax.imshow(_image_at(images, int(i)), cmap="gray")
        colour = "black" if true == pred else "red"
        text = f"Actual: {names[true]}\nPred: {names[pred]} ({result.confs[i]:.2f})"
        ax.set_title(text, fontsize=8, color=colour)
    fig.suptitle(f"{_prefix(title)}{n_shown} random examples of {result.n} (errors in red)")
    fig.tight_layout()
    fs.save_figure(fig, path, dpi=100)
    return path


def _series(history: Sequence[dict], key: str):
    points = [(h["step"], h[key]) for h in history if key in h and h[key] is not None]
    return tuple(zip(*points, strict=True)) if points else ((), ())


def _plot_curves(history, phase_switch_steps, path: epath.Path, title: str):
    panels = (
        ("accuracy", (("train/accuracy", "training"), ("val/top1", "validation"))),
        ("loss", (("train/loss", "training"), ("val/loss", "validation"))),
    )
    if not any(_series(history, key)[0] for _, pairs in panels for key, _ in pairs):
        log.info("write_reports: history has no train/val loss or accuracy; no curves.png")
        return None
    fig = _figure(12, 4.5)
    axes = fig.subplots(1, 2)
    for ax, (name, pairs) in zip(axes, panels, strict=True):
        for key, label in pairs:
            steps, values = _series(history, key)
            if steps:
                ax.plot(steps, values, marker="o" if key.startswith("val") else None, label=label)
        for k, step in enumerate(phase_switch_steps):
            ax.axvline(step, color="gray", linestyle="--", label="phase switch" if k == 0 else None)
        ax.set_xlabel("step")
        ax.set_title(f"training and validation {name}")
        ax.grid(alpha=0.3)
        ax.legend()
        _epoch_axis(ax, history)
    fig.suptitle(title)
    fig.tight_layout()
    fs.save_figure(fig, path, dpi=100)
    return path


def _epoch_axis(ax, history) -> None:
    """A secondary 'epoch' axis on top when the history records epochs with steps."""
    pairs = [(h["step"], h["epoch"]) for h in history if "epoch" in h and h["step"] > 0]
    if not pairs or pairs[-1][1] <= 0:
        return
    steps_per_epoch = pairs[-1][0] / pairs[-1][1]
    ax.secondary_xaxis(
        "top", functions=(lambda s: s / steps_per_epoch, lambda e: e * steps_per_epoch)
    ).set_xlabel("epoch")
