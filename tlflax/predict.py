"""Predictions for image files: inputs as users give them (files, folders, globs), batched
through the model at a fixed batch shape, top-k per file, undecodable files listed, output
as CSV or JSON.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import os

import jax
import numpy as np

from tlflax import fs, train
from tlflax.data import decode
from tlflax.errors import UserError

FORMATS = (".csv", ".json")


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files as given; folders: every non-hidden file below, sorted; globs: their matches.
    An input that names nothing is an error naming it (never silently dropped)."""
    paths: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = _files_below(item)
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        else:
            found = [item] if os.path.exists(item) else []
        if not found:
            what = "folder holds no files" if os.path.isdir(item) else "no such file"
            raise UserError(f"{item!r}: {what}; give image files, folders or globs")
        paths += found
    return list(dict.fromkeys(paths))  # each file once, in the order given


def _files_below(folder: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")]
    return out


@dataclasses.dataclass(frozen=True)
class PretrainedModel:
    """A model with pretrained weights' own ImageNet head: what make_probs_fn reads of a
    run (its spec and preprocessing), and the variables."""

    spec: object
    prep: object
    variables: dict


def imagenet_model(name: str, source: str | None = None) -> tuple[PretrainedModel, str]:
    """(model, source) for `tlflax predict --model`: every variable from the weights, the
    1000-class head included. source None: the first suggested source on this machine."""
    from tlflax import imagenet
    from tlflax.models import create_model
    from tlflax.weights import CheckpointMismatchError, load_pretrained, sources

    spec = create_model(name, num_classes=imagenet.N_CLASSES)
    if not source:
        suggested = sources.SUGGESTED.get(name, ())
        if not suggested:
            raise UserError(f"--model {name}: no known ImageNet weights; give --weights SOURCE")
        here = [s for s in suggested if sources.available_offline(s)]
        source = (here or suggested)[0]
    shapes = jax.eval_shape(lambda: spec.init(jax.random.key(0)))
    try:
        loaded = load_pretrained(spec, source, variables=shapes, reinit=())
    except CheckpointMismatchError as e:
        raise UserError(
            f"--model {name} --weights {source}: predict --model needs the weights' own "
            f"{imagenet.N_CLASSES}-class ImageNet head and all of the backbone; {e}"
        ) from e
    return PretrainedModel(spec, loaded.preprocessing, loaded.variables), source


def make_probs_fn(run, *, tta: str = ""):
    """jit(variables, uint8 (B, S, S, 3)) -> (B, C) probabilities, as eval computes them."""
    logits_fn = train.make_logits_fn(run, tta=tta)
    return jax.jit(lambda variables, images: jax.nn.softmax(logits_fn(variables, images)))


def predict_files(paths, *, probs_fn, variables, resize, max_pixels, workers, batch_size):
    """(probabilities (n_good, C) in `paths` order, good mask, bad list from decode)."""
    images, good, bad = decode.decode_files(
        paths, resize=resize, max_pixels=max_pixels, workers=workers
    )
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        n = len(batch)
        if n < batch_size:  # one batch shape: one compilation
            batch = np.concatenate(
                [batch, np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)]
            )
        out.append(np.asarray(probs_fn(variables, batch))[:n])
    probs = np.concatenate(out) if out else np.zeros((0, 0), np.float32)
    return probs, good, bad


def rows_of(paths, probs, good, bad, *, classes, top_k: int) -> list[dict]:
    """One row per input file, in order: its top-k, or the reason it could not be read."""
    reasons = {b["path"]: f"{b['reason']}: {b['detail']}" for b in bad}
    rows, next_good = [], iter(range(len(probs)))
    for path, ok in zip(paths, good, strict=True):
        if not ok:
            rows.append({"file": path, "error": reasons.get(path, "unreadable"), "top": []})
            continue
        p = probs[next(next_good)]
        top = np.argsort(-p, kind="stable")[:top_k]
        rows.append({"file": path, "error": None, "top": [(classes[i], float(p[i])) for i in top]})
    return rows


def console_line(row: dict) -> str:
    if row["error"]:
        return f"{row['file']}: cannot read image ({row['error']})"
    return f"{row['file']}: " + ", ".join(f"{c} {100 * p:.1f}%" for c, p in row["top"])


def write(rows: list[dict], out: str, *, top_k: int, step: int | None, weights=None) -> None:
    """CSV (file, error, class_1, prob_1, ...) or JSON ({file, error, top: [{class, prob}]});
    step: the run's checkpoint, or None with the pretrained `weights` source."""
    path = fs.path(out, what="--out")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise UserError(f"--out {out!r}: write .csv or .json, not {suffix or 'no suffix'!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".json":
        records = [
            {
                "file": r["file"],
                "error": r["error"],
                "top": [{"class": c, "prob": p} for c, p in r["top"]],
            }
            for r in rows
        ]
        made_by = {"checkpoint_step": step} if weights is None else {"weights": weights}
        path.write_text(json.dumps({**made_by, "predictions": records}, indent=1))
        return
    text = io.StringIO(newline="")
    columns = ["file", "error"] + [
        f"{k}_{i}" for i in range(1, top_k + 1) for k in ("class", "prob")
    ]
    writer = csv.writer(text)
    writer.writerow(columns)
    for r in rows:
        cells = [x for c, p in r["top"] for x in (c, f"{p:.6f}")]
        cells += [""] * (len(columns) - 2 - len(cells))  # a bad file: empty classes
        writer.writerow([r["file"], r["error"] or "", *cells])
    path.write_text(text.getvalue())
