"""tlflax.evaluate (eval step, summary, reports) and tlflax.metrics_io (jsonl, TensorBoard, bar)."""

import csv
import json
import logging
import os
import pathlib
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tlflax import evaluate, metrics_io

CLASSES = ["cat", "dog", "fox"]


def _outputs(labels, preds, *, conf=None, mask=None, loss=None, ids=None):
    """Eval-step-like outputs for hand-made cases (top-k derived from pred)."""
    labels, preds = np.asarray(labels, np.int32), np.asarray(preds, np.int32)
    n = len(labels)
    out = {
        "loss": np.asarray(loss if loss is not None else np.ones(n), np.float32),
        "pred": preds,
        "conf": np.asarray(conf if conf is not None else np.full(n, 0.5), np.float32),
        "top1": labels == preds,
        "top5": np.ones(n, bool),
        "label": labels,
        "mask": np.asarray(mask if mask is not None else np.ones(n, bool)),
    }
    if ids is not None:
        out["id"] = np.asarray(ids)
    return out


@pytest.fixture
def result():
    # truth: cat cat cat dog dog fox | pred: cat dog cat dog fox fox; padding is all wrong.
    first = _outputs([0, 0, 0, 1], [0, 1, 0, 1], conf=[0.9, 0.8, 0.7, 0.6], loss=[1, 2, 3, 4])
    second = _outputs(
        [1, 2, -1, 0],
        [2, 2, 1, 2],
        conf=[0.95, 0.5, 0.99, 0.99],
        loss=[5, 6, 100, 100],
        mask=[True, True, False, False],
    )
    return evaluate.summarise([first, second], class_names=CLASSES)


def test_summarise_hand_made_example(result):
    assert result.n == 6 and result.n_errors == 2
    np.testing.assert_array_equal(result.confusion, [[2, 1, 0], [0, 1, 1], [0, 0, 1]])
    assert result.confusion.dtype == np.int64
    assert result.loss == pytest.approx(21 / 6)  # padded rows (loss 100) never counted
    assert result.top1 == pytest.approx(4 / 6) and result.top5 == 1.0
    np.testing.assert_allclose(result.recall, [2 / 3, 1 / 2, 1])
    np.testing.assert_allclose(result.precision, [1, 1 / 2, 1 / 2])
    np.testing.assert_allclose(result.f1, [0.8, 0.5, 2 / 3])
    np.testing.assert_array_equal(result.support, [3, 2, 1])
    assert result.balanced_accuracy == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert [(e["index"], e["true"], e["pred"]) for e in result.errors] == [
        (1, "cat", "dog"),
        (4, "dog", "fox"),
    ]
    assert [e["conf"] for e in result.errors] == pytest.approx([0.8, 0.95])
    assert "id" not in result.errors[0]


def _reference_metrics(y, p, n_classes):
    """Per-class metrics by counting, one class at a time (the textbook definitions)."""
    rows = []
    for c in range(n_classes):
        tp = sum(1 for t, q in zip(y, p, strict=True) if t == c and q == c)
        n_pred, n_true = sum(1 for q in p if q == c), sum(1 for t in y if t == c)
        prec = tp / n_pred if n_pred else 0.0
        rec = tp / n_true if n_true else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        rows.append((prec, rec, f1, n_true, n_pred))
    return np.array(rows)


def test_summarise_agrees_with_counting_reference():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 6, 200)
    preds = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 5, 200))  # 5 never predicted
    labels[labels == 4] = 3  # class 4 never true, but predicted
    mask = rng.random(200) < 0.9
    batches = [
        _outputs(labels[i : i + 64], preds[i : i + 64], mask=mask[i : i + 64])
        for i in range(0, 200, 64)
    ]
    res = evaluate.summarise(batches, class_names=[f"c{i}" for i in range(6)])
    y, p = labels[mask].tolist(), preds[mask].tolist()
    ref = _reference_metrics(y, p, 6)
    for t, q in ((0, 0), (3, 4), (5, 1)):
        assert res.confusion[t, q] == sum(1 for a, b in zip(y, p, strict=True) if (a, b) == (t, q))
    np.testing.assert_allclose(res.precision, ref[:, 0])
    np.testing.assert_allclose(res.recall, ref[:, 1])
    np.testing.assert_allclose(res.f1, ref[:, 2])
    np.testing.assert_array_equal(res.support, ref[:, 3])
    present = (ref[:, 3] > 0) | (ref[:, 4] > 0)  # sklearn's macro average without labels=
    assert res.macro_f1 == pytest.approx(ref[present, 2].mean())
    assert res.balanced_accuracy == pytest.approx(ref[ref[:, 3] > 0, 1].mean())
    assert res.top1 == pytest.approx(np.mean(np.array(y) == np.array(p)))
    assert res.n == mask.sum() and res.n_errors == sum(a != b for a, b in zip(y, p, strict=True))


def test_summarise_ids_and_errors():
    out = _outputs([0, 1, 2], [1, 1, 0], ids=np.array(["a.jpg", "b.jpg", "c.jpg"]))
    res = evaluate.summarise([out], class_names=CLASSES)
    assert [e["id"] for e in res.errors] == ["a.jpg", "c.jpg"]
    json.dumps(res.to_dict())  # ids must stay JSON-serialisable
    with pytest.raises(ValueError, match="label 3 is outside 0..2"):
        evaluate.summarise([_outputs([3], [0])], class_names=CLASSES)
    with pytest.raises(ValueError, match="no batches"):
        evaluate.summarise([], class_names=CLASSES)
    with pytest.raises(ValueError, match="lack"):
        evaluate.summarise([{"loss": np.zeros(1)}], class_names=CLASSES)


def _toy_model():
    """Logits = per-channel mean pixel @ a (3, 6) weight matrix."""

    def model_apply(variables, images):
        return images.mean(axis=(1, 2)) @ variables["w"]

    def eval_transform(images):
        return images.astype(jnp.float32) / 127.5 - 1.0

    weights = jnp.array([[1.0, -1.0, 0.5, 0.0, 2.0, -2.0], [0.0, 1.0, -1.0, 1.0, 0.0, 0.3]] * 2)
    return model_apply, eval_transform, {"w": weights[:3]}


def test_eval_step_jits_and_padding_is_never_counted():
    model_apply, eval_transform, variables = _toy_model()
    step = jax.jit(evaluate.make_eval_step(model_apply=model_apply, eval_transform=eval_transform))
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 6, 10).astype(np.int32)
    # 10 examples in batches of 4: the last batch has 2 padded rows (zeros, label 0).
    outputs = []
    for start in range(0, 12, 4):
        n_real = min(4, 10 - start)
        pad = 4 - n_real
        pad_images, pad_labels = np.zeros((pad, 4, 4, 3), np.uint8), np.zeros(pad, np.int32)
        batch = {
            "image": np.concatenate([images[start : start + n_real], pad_images]),
            "label": np.concatenate([labels[start : start + n_real], pad_labels]),
            "mask": np.arange(4) < n_real,
            "id": np.arange(start, start + 4),
        }  # fmt: skip
        out = step(variables, batch)
        assert set(out) == set(evaluate.OUTPUT_KEYS) | {"id"}
        assert all(v.shape == (4,) for v in out.values())
        outputs.append(jax.device_get(out))
    res = evaluate.summarise(outputs, class_names=[str(i) for i in range(6)])

    logits = (images.astype(np.float64) / 127.5 - 1).mean(axis=(1, 2)) @ np.asarray(variables["w"])
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    preds = logits.argmax(-1)
    assert res.n == 10
    assert res.loss == pytest.approx(-logp[np.arange(10), labels].mean(), rel=1e-5)
    assert res.top1 == pytest.approx(np.mean(preds == labels))
    top5 = (np.argsort(-logits, axis=-1, kind="stable")[:, :5] == labels[:, None]).any(-1)
    assert res.top5 == pytest.approx(top5.mean())
    assert res.confusion.sum() == 10
    wrong = np.flatnonzero(preds != labels)
    assert [e["index"] for e in res.errors] == wrong.tolist()
    assert [e["id"] for e in res.errors] == wrong.tolist()  # ids passed through the step
    conf = np.exp(logp.max(-1))
    assert [e["conf"] for e in res.errors] == pytest.approx(conf[wrong].tolist(), rel=1e-5)


def _png(path):
    with Image.open(path) as im:
        im.load()
        pixels = np.asarray(im.convert("L"))
    assert im.width > 200 and im.height > 150, path
    assert os.path.getsize(path) > 5_000, path
    assert np.unique(pixels).size > 8, f"{path} looks blank"
    return im


HISTORY = [{"step": s, "train/loss": 2 / s, "train/accuracy": 1 - 1 / s} for s in range(1, 21)]
HISTORY += [
    {"step": s, "val/loss": 1.5 / s, "val/top1": 0.8 - 1 / s, "epoch": s / 5}
    for s in (5, 10, 15, 20)
]


def test_write_reports_creates_every_file(tmp_path, result):
    images = np.random.default_rng(3).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    written = evaluate.write_reports(
        result,
        out_dir=tmp_path / "reports",
        images=images,
        history=HISTORY,
        phase_switch_steps=(10,),
        title="toy",
    )
    names = {"eval.json", "per_class.csv", "errors.csv", "confusion.png", "errors.png"}
    names |= {"curves.png", "predictions.png"}
    assert set(written) == names
    assert {p.name for p in (tmp_path / "reports").iterdir()} == names
    for name in ("confusion.png", "errors.png", "curves.png", "predictions.png"):
        _png(written[name])

    report = json.loads(written["eval.json"].read_text())
    assert report["title"] == "toy"
    assert report["top1"] == result.top1 and report["n"] == 6 and report["n_errors"] == 2
    assert report["confusion"] == result.confusion.tolist()
    assert report["errors"] == result.errors
    assert [r["recall"] for r in report["per_class"]] == pytest.approx(result.recall.tolist())

    with written["per_class.csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == CLASSES
    assert [int(r["support"]) for r in rows] == [3, 2, 1]
    assert float(rows[0]["recall"]) == pytest.approx(2 / 3)
    # Without file names the misclassified examples are named by their index in the split.
    assert [r["misclassified"] for r in rows] == ["#1", "#4", ""]


def test_error_lists_name_the_files(tmp_path):
    """eval.json, errors.csv and per_class.csv find every misclassified file."""
    files = [f"/data/val/{c}/{i}.jpg" for c, i in zip(CLASSES * 2, range(6), strict=True)]
    first = _outputs([0, 0, 0, 1], [0, 1, 0, 1], conf=[0.9, 0.8, 0.7, 0.6])
    second = _outputs([1, 2, 0, 0], [2, 2, 1, 1], mask=[True, True, False, False])
    res = evaluate.summarise([first, second], class_names=CLASSES, example_names=files)
    assert [(e["file"], e["true"], e["pred"]) for e in res.errors] == [
        (files[1], "cat", "dog"),
        (files[4], "dog", "fox"),
    ]
    written = evaluate.write_reports(res, out_dir=tmp_path)
    assert [e["file"] for e in json.loads(written["eval.json"].read_text())["errors"]] == [
        files[1],
        files[4],
    ]
    with written["errors.csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["file"], r["true"], r["pred"]) for r in rows] == [
        (files[1], "cat", "dog"),
        (files[4], "dog", "fox"),
    ]
    with written["per_class.csv"].open() as f:
        per_class = {r["class"]: r for r in csv.DictReader(f)}
    assert per_class["cat"]["misclassified"] == files[1] and per_class["cat"]["n_errors"] == "1"
    assert per_class["fox"]["misclassified"] == ""
    with pytest.raises(ValueError, match="3 example names for 6 examples"):
        evaluate.summarise([first, second], class_names=CLASSES, example_names=files[:3])


def test_write_reports_minimal_and_many_classes(tmp_path):
    rng = np.random.default_rng(4)
    labels, preds = rng.integers(0, 40, 300), rng.integers(0, 40, 300)
    res = evaluate.summarise([_outputs(labels, preds)], class_names=[f"k{i}" for i in range(40)])
    written = evaluate.write_reports(res, out_dir=tmp_path, history=[{"step": 1, "lr": 0.1}])
    assert set(written) == {"eval.json", "per_class.csv", "errors.csv", "confusion.png"}
    _png(written["confusion.png"])
    # Images by callable (e.g. loaded from file paths), in float [-1, 1].
    loader = lambda i: np.full((8, 8, 3), (i % 7) / 3.5 - 1.0, np.float32)
    written = evaluate.write_reports(res, out_dir=tmp_path / "x", images=loader)
    _png(written["errors.png"])


def test_format_table():
    rows = [
        {"strategy": "feature_extraction", "accuracy": "91.20 %", "errors": "44/500", "n": 500},
        {"strategy": "fine_tune", "accuracy": "95.00 %", "n": 12, "loss": 0.123456},
    ]
    text = evaluate.format_table(rows, ["strategy", "accuracy", "errors", "n", "loss"])
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["strategy", "accuracy", "errors", "n", "loss"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["feature_extraction", "91.20", "%", "44/500", "500"]
    assert lines[3].split() == ["fine_tune", "95.00", "%", "12", "0.1235"]
    # Columns line up: every column starts at the same offset in every row.
    start = lines[0].index("accuracy")
    assert lines[2][start:].startswith("91.20") and lines[3][start:].startswith("95.00")
    end = lines[0].index(" n ") + 2  # numbers right-aligned under their header
    assert lines[2][end - 3 : end] == "500" and lines[3][end - 3 : end] == " 12"


# ----------------------------------------------------------------------------- metrics_io


def test_metrics_jsonl_roundtrip_and_truncated_last_line(tmp_path):
    with metrics_io.MetricWriter(tmp_path) as writer:
        writer.write_scalars(1, {"train/loss": jnp.float32(2.5), "train/accuracy": 0.25})
        writer.write_scalars(2, {"train/loss": np.float64(1.5)})
        writer.write_scalars(2, {"val/top1": 0.5, "epoch": 1.0})
        with pytest.raises(TypeError, match="train/x"):
            writer.write_scalars(3, {"train/x": [1, 2]})
    history = metrics_io.read_history(tmp_path)
    assert [h["step"] for h in history] == [1, 2, 2]
    assert history[0]["train/loss"] == 2.5 and history[2]["val/top1"] == 0.5
    assert all(isinstance(h["time"], float) and h["time"] > 1e9 for h in history)

    path = tmp_path / metrics_io.METRICS_FILE
    with path.open("a") as f:
        f.write('{"step": 3, "train/lo')  # the crash
    assert metrics_io.read_history(tmp_path) == history
    with metrics_io.MetricWriter(tmp_path) as writer:  # resume appends on a clean line
        writer.write_scalars(3, {"train/loss": 1.0})
    assert [h["step"] for h in metrics_io.read_history(tmp_path)] == [1, 2, 2, 3]
    assert all(json.loads(line) for line in path.read_text().splitlines())
    assert metrics_io.read_history(tmp_path / "missing") == []


def test_read_history_drops_steps_replayed_after_resume(tmp_path):
    with metrics_io.MetricWriter(tmp_path) as writer:
        for step in (10, 20, 30):
            writer.write_scalars(step, {"train/loss": float(step)})
            if step == 20:
                writer.write_scalars(20, {"val/top1": 0.1})  # same step, new keys: kept
    with metrics_io.MetricWriter(tmp_path) as writer:  # resumed from the checkpoint at 20
        writer.write_scalars(30, {"train/loss": -30.0})
        writer.write_scalars(30, {"val/top1": 0.9})
        writer.write_scalars(40, {"train/loss": -40.0})
    history = metrics_io.read_history(tmp_path)
    pairs = [(h["step"], h.get("train/loss", h.get("val/top1"))) for h in history]
    assert pairs == [(10, 10.0), (20, 20.0), (20, 0.1), (30, -30.0), (30, 0.9), (40, -40.0)]


def test_non_primary_writes_nothing(tmp_path):
    writer = metrics_io.MetricWriter(tmp_path / "w", is_primary=False)
    writer.write_scalars(1, {"a": 1.0})
    writer.write_hparams({"lr": 0.1})
    writer.flush()
    writer.close()
    assert not (tmp_path / "w").exists()


def _read_events(path):
    """Parse a TFRecord file of Event protos, checking the framing CRCs."""
    event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
    from tensorboardX.record_writer import masked_crc32c

    data, events, pos = path.read_bytes(), [], 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8 : pos + 12])[0] == masked_crc32c(header)
        body = data[pos + 12 : pos + 12 + length]
        assert struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])[0] == (
            masked_crc32c(body)
        )
        events.append(event_pb2.Event.FromString(body))
        pos += 16 + length
    return events


def test_tensorboard_events_hold_the_scalars(tmp_path):
    pytest.importorskip("tensorboardX")
    with metrics_io.MetricWriter(tmp_path) as writer:
        writer.write_scalars(1, {"train/loss": 2.0, "lr/head": 0.1})
        writer.write_scalars(5, {"train/loss": 0.5})
        writer.write_hparams({"optim": {"lr": 0.1, "schedule": "cosine"}, "layers": [1, 2]})
    files = sorted((tmp_path / metrics_io.TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert len(files) == 1
    scalars = [
        (e.step, v.tag, v.simple_value) for e in _read_events(files[0]) for v in e.summary.value
    ]
    expected = [(1, "train/loss", 2.0), (1, "lr/head", pytest.approx(0.1)), (5, "train/loss", 0.5)]
    assert scalars == expected
    hparams = json.loads((tmp_path / metrics_io.HPARAMS_FILE).read_text())
    assert hparams == {"optim/lr": 0.1, "optim/schedule": "cosine", "layers": "[1, 2]"}
    assert list((tmp_path / metrics_io.TENSORBOARD_DIR / "hparams").glob("events.out.*"))


def _scalars(loss: float) -> dict:
    return {"train/loss": loss, "lr/head": 1e-3, "lr/stage3": 5e-4, "train/images_per_sec": 80.0}


def test_progress_without_a_tty_logs_intervals_and_evaluations(caplog, capsys, monkeypatch):
    clock = iter(np.arange(0.0, 1000.0, 1.0))  # one second per interval of 10 steps
    monkeypatch.setattr(metrics_io.time, "monotonic", lambda: float(next(clock)))
    caplog.set_level(logging.INFO, logger="tlflax")
    progress = metrics_io.Progress(100, start_step=0, steps_per_epoch=20, tty=False)
    for step in range(10, 101, 10):
        progress.interval(step, phase="finetune", scalars=_scalars(step / 100))
        if step % 40 == 0:
            progress.evaluated(step, phase="finetune", top1=0.5 + step / 1000, loss=0.25)
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10 + 2
    assert lines[2] == (  # at 10 steps a second since the first interval: 7 s left
        "step 30/100  epoch 1.50  phase finetune  loss 0.3000  lr 1.00e-03  80.0 images/s  ETA 0:07"
    )
    assert lines[4] == (
        "step 40/100  epoch 2.00  phase finetune  validation top-1 0.5400  loss 0.2500  "
        "(best 0.5400 at step 40)"
    )
    assert lines[-1].startswith("step 100/100") and "ETA 0:00" in lines[-1]
    assert capsys.readouterr().err == ""  # no bar, no carriage returns
    silent = metrics_io.Progress(100, start_step=0, steps_per_epoch=20, enabled=False, tty=True)
    silent.interval(10, phase="p", scalars=_scalars(1.0))
    silent.evaluated(10, phase="p", top1=0.5, loss=1.0)
    silent.close()
    assert len(caplog.records) == 12 and capsys.readouterr().err == ""  # process > 0


def test_progress_on_a_tty_draws_a_bar_that_log_lines_print_above(capsys):
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # as main()'s basicConfig sets up
    root.addHandler(handler)
    try:
        progress = metrics_io.Progress(50, start_step=10, steps_per_epoch=10, tty=True)
        progress.interval(20, phase="finetune", scalars=_scalars(0.75))
        logging.getLogger("tlflax").warning("a log line")
        progress.evaluated(20, phase="finetune", top1=0.9, loss=0.5)
        progress.interval(50, phase="finetune", scalars=_scalars(0.5))
        progress.close()
    finally:
        root.removeHandler(handler)
    err = capsys.readouterr().err
    assert "50/50" in err and "loss=0.5" in err and "lr=1.00e-03" in err
    # tqdm.write clears the bar, prints the line whole, and redraws the bar below it.
    assert "\na log line\n" in "\n" + err.replace("\r", "\n")


def test_tensorboard_writer_does_not_import_torch(tmp_path):
    """tensorboardX imports torch only to name a type; with torch installed that costs
    seconds at every start. The writer works without it, and torch still imports after."""
    script = (
        "import sys\n"
        "from tlflax import metrics_io\n"
        f"w = metrics_io._open_tensorboard({str(tmp_path)!r})\n"
        "assert 'torch' not in sys.modules, 'tensorboardX imported torch'\n"
        "w.add_scalar('x', 1.0, 1); w.close()\n"
        "import torch\n"
        "print(float(torch.ones(2).sum()))\n"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=root, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "2.0"
    assert list(tmp_path.glob("events.out.tfevents.*"))
