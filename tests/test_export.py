"""`tlflax.export`: a finished workdir -> safetensors + model card + a jax.export artifact.

Each format is read back the way a user outside tlflax would: the safetensors file with
the safetensors library (compared with the orbax checkpoint itself, bitwise), the
jax.export artifact in a fresh interpreter that imports jax and numpy only (compared with
tlflax's own model apply, and on 16 real flowers12 photos with predict's probabilities).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
from PIL import Image

from tlflax import experiment, export, fs, main, metrics_io, optim, predict, state, train, tree
from tlflax.data import augment, load_image

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "tiny_config.py")
EMA_DECAY = 0.9
CARD = export.CARD_FILE


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """tests/tiny_config.py (resnet_tiny, BatchNorm, two phases) with an EMA of the weights."""
    workdir = tmp_path_factory.mktemp("run")
    argv = ["tlflax", "train", "--config", TINY, "--workdir", str(workdir)]
    assert main.main([*argv, f"--config.optim.ema_decay={EMA_DECAY}"]) == 0
    return workdir


@pytest.fixture(scope="module")
def exported(tiny_run):
    return export.export_run(tiny_run, formats="safetensors,jax")


def _checkpoint_arrays(workdir, step: int) -> dict[str, np.ndarray]:
    """params and batch_stats of checkpoints/<step>, read by orbax alone (no tlflax)."""
    import orbax.checkpoint as ocp

    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    flat = tree.flatten({"params": restored["params"], "batch_stats": restored["batch_stats"]})
    return {k: np.asarray(v) for k, v in flat.items()}


def _restored(workdir):
    config, run = experiment.from_workdir(fs.path(workdir))
    st, step = experiment.restore_chosen(config, run, fs.path(workdir))
    return run, st, step


def _tlflax_logits(run, st, images) -> np.ndarray:
    transform = augment.make_eval_transform(image_size=run.prep.resolution, preprocessing=run.prep)
    variables = state.variables_of(st)
    return np.asarray(run.spec.module.apply(variables, transform(images), train=False))


def test_safetensors_equal_the_best_checkpoint_bitwise(tiny_run, exported):
    step = exported["step"]
    evals = [h for h in metrics_io.read_history(tiny_run) if "val/top1" in h]
    assert exported["card"]["metrics"]["exported_step"]["val/top1"] == max(
        h["val/top1"] for h in evals
    )  # the best checkpoint by validation top-1, as eval and predict restore it
    got = safetensors.numpy.load_file(exported["files"]["safetensors"])
    want = _checkpoint_arrays(tiny_run, step)
    assert set(got) == set(want) and any(k.startswith("batch_stats/") for k in got)
    for name, array in want.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name], array, err_msg=name)
    assert not any(np.all(got[k] == 0) for k in got if k.startswith("params/head/"))


def test_model_card_says_what_the_model_is_and_how_to_feed_it(tiny_run, exported):
    card = json.loads(pathlib.Path(exported["files"]["card"]).read_text())
    classes = json.loads((tiny_run / "classes.json").read_text())
    prep = json.loads((tiny_run / "preprocessing.json").read_text())
    assert card["classes"] == classes and card["preprocessing"] == prep
    assert card["model"]["name"] == "resnet_tiny" and card["model"]["family"] == "resnet"
    assert card["model"]["architecture"]["widths"] == [8, 16, 24, 32]
    assert card["input"]["shape"] == ["batch", prep["resize"], prep["resize"], 3]
    assert card["output"]["shape"] == ["batch", len(classes)]
    assert card["step"] == exported["step"] and card["ema"] == {"used": False, "decay": EMA_DECAY}
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert card["metrics"]["summary"]["final"] == summary["final"]
    assert card["files"] == {"safetensors": "model.safetensors", "jax": "model.jax_export"}
    assert card["tlflax_version"] and set(card["how_to_load"]) == {"jax", "safetensors"}
    n = sum(
        a.size
        for k, a in _checkpoint_arrays(tiny_run, card["step"]).items()
        if k.startswith("params/")
    )
    assert card["model"]["n_params"] == n


_LOADER = """
import sys
import jax
import numpy as np

exported = jax.export.deserialize(open(sys.argv[1], "rb").read())
for name in sys.argv[2:]:
    np.save(name + ".logits.npy", np.asarray(exported.call(np.load(name))))
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"tlflax", "flax", "optax", "orbax"})
print("loaded:", loaded, "input:", exported.in_avals[0], "platforms:", exported.platforms)
"""


def _call_in_fresh_python(artifact: str, batches: list[np.ndarray], tmp_path):
    """(stdout, logits per batch) of the artifact called in a new interpreter."""
    names = []
    for i, images in enumerate(batches):
        names.append(str(tmp_path / f"images{i}.npy"))
        np.save(names[-1], images)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    done = subprocess.run(
        [sys.executable, "-c", _LOADER, artifact, *names],
        env={**env, "JAX_PLATFORMS": "cpu"},
        cwd=tmp_path,  # not the repository: nothing of tlflax on the path but what is installed
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, [np.load(n + ".logits.npy") for n in names]


def test_jax_artifact_reloads_without_tlflax_and_gives_the_same_logits(
    tiny_run, exported, tmp_path
):
    run, st, step = _restored(tiny_run)
    assert step == exported["step"]
    size = exported["card"]["input"]["shape"][1]
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8) for n in (5, 2)]
    stdout, logits = _call_in_fresh_python(exported["files"]["jax"], batches, tmp_path)
    assert "loaded: []" in stdout, stdout  # jax and numpy only
    assert f"input: uint8[batch,{size},{size},3]" in stdout and "'cpu'" in stdout, stdout
    for images, got in zip(batches, logits, strict=True):
        want = _tlflax_logits(run, st, images)
        assert got.shape == want.shape == (len(images), 10) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        assert np.ptp(want) > 1e-3  # a trained head: logits that differ between classes


def test_ema_export_holds_the_ema_of_the_trainable_weights(tiny_run, exported, tmp_path):
    result = export.export_run(
        tiny_run, formats=["safetensors"], out_dir=tmp_path / "ema", ema=True
    )
    assert result["card"]["ema"] == {"used": True, "decay": EMA_DECAY}
    assert result["step"] == exported["step"] and "jax" not in result["files"]
    ema = safetensors.numpy.load_file(result["files"]["safetensors"])
    raw = safetensors.numpy.load_file(exported["files"]["safetensors"])
    _, st, _ = _restored(tiny_run)
    want = tree.flatten({"params": optim.ema_params(st.params, st.opt_state)})
    assert set(ema) == set(raw)
    for name, array in want.items():
        np.testing.assert_array_equal(ema[name], np.asarray(array), err_msg=name)
    differ = [k for k in raw if not np.array_equal(ema[k], raw[k])]
    assert any(k.startswith("params/head/") for k in differ), differ
    assert not any(k.startswith("batch_stats/") for k in differ)  # statistics are not averaged


def test_ema_weights_are_evaluated_beside_the_raw_ones(tiny_run):
    """optim.ema_decay > 0: each evaluation scores the EMA weights too, and the summary's EMA
    accuracy is theirs (recomputed here from the last checkpoint's EMA state)."""
    summary = json.loads((tiny_run / "summary.json").read_text())
    config, run = experiment.from_workdir(fs.path(tiny_run), with_data=True)
    ckpt = experiment.open_checkpointer(config, fs.path(tiny_run))
    st = experiment.restore(run, ckpt, run.total_steps)
    ckpt.close()
    eval_fn = train.make_eval_fn(run)
    raw = train.run_eval(eval_fn, st, run)
    ema = train.run_eval(eval_fn, experiment.ema_state(st, where="test"), run)
    assert summary["final"]["val/loss"] == pytest.approx(raw.loss, abs=1e-6)
    assert summary["final_ema"]["loss"] == pytest.approx(ema.loss, abs=1e-6)
    assert summary["final_ema"]["top1"] == ema.top1
    assert abs(ema.loss - raw.loss) > 1e-3  # the EMA is not the raw weights
    evals = [h for h in metrics_io.read_history(tiny_run) if "val/top1" in h]
    assert [h["step"] for h in evals] == [4, 8] and all("val/ema_top1" in h for h in evals)
    names = [r["strategy"] for r in summary["phases"]]
    assert names == ["linear_probe", "linear_probe (EMA)", "finetune", "finetune (EMA)"]


def test_predict_and_eval_with_ema_use_the_ema_weights(tiny_run, tmp_path, capsys):
    image = tmp_path / "digit.png"
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(image)
    probs = {}
    for flags in ([], ["--ema"]):
        out = tmp_path / f"p{len(flags)}.json"
        argv = ["tlflax", "predict", "--workdir", str(tiny_run), str(image), "--out", str(out)]
        assert main.main([*argv, "--top_k", "10", *flags]) == 0
        (row,) = json.loads(out.read_text())["predictions"]
        probs[bool(flags)] = {t["class"]: t["prob"] for t in row["top"]}
    run, st, _ = _restored(tiny_run)
    images = load_image(str(image), resize=run.prep.resize)[None]
    ema_variables = state.variables_of(experiment.ema_state(st, where="test"))
    want = predict.make_probs_fn(run)(ema_variables, images)
    classes = run.class_names
    got = np.array([probs[True][c] for c in classes])
    np.testing.assert_allclose(got, np.asarray(want)[0], atol=1e-5)
    assert not np.allclose(got, [probs[False][c] for c in classes], atol=1e-4)
    capsys.readouterr()
    assert main.main(["tlflax", "eval", "--workdir", str(tiny_run), "--ema"]) == 0
    assert "(EMA)" in capsys.readouterr().out
    assert list(tiny_run.glob("eval_*_step*_ema"))


def test_ema_of_a_run_without_ema_is_one_clear_error(tiny_run, tmp_path):
    """Checked before any checkpoint is read: the run record alone is enough."""
    record = tmp_path / "no_ema"
    record.mkdir()
    for name in ("preprocessing.json", "classes.json", "run.json"):
        shutil.copy(tiny_run / name, record / name)
    config = json.loads((tiny_run / "config.json").read_text())
    config["optim"]["ema_decay"] = 0.0
    (record / "config.json").write_text(json.dumps(config))
    with pytest.raises(export.ExportError) as e:
        export.export_run(record, formats="safetensors", ema=True)
    message = str(e.value)
    assert "--ema" in message and "optim.ema_decay=0.0" in message and str(record) in message
    assert "export without --ema" in message
    assert not (record / "export_ema").exists()


_GS_EXPORT = """
import sys
sys.path.insert(0, sys.argv[2])
import fake_gcs
fake_gcs.install(sys.argv[1])
from tlflax import export
print(export.format_result(export.export_run("gs://bucket/run", formats="safetensors,jax")))
"""


def test_a_gs_workdir_exports_into_the_bucket(tiny_run, exported, tmp_path):
    """Through tests/fake_gcs.py: an object store without append; never a local 'gs:' folder."""
    store = tmp_path / "store"
    shutil.copytree(tiny_run, store / "bucket" / "run", ignore=shutil.ignore_patterns("export*"))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    done = subprocess.run(
        [sys.executable, "-c", _GS_EXPORT, str(store), str(ROOT / "tests")],
        env={**env, "JAX_PLATFORMS": "cpu"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gs://bucket/run/export/model.jax_export" in done.stdout, done.stdout
    assert not (tmp_path / "gs:").exists()
    out = store / "bucket" / "run" / "export"
    assert {p.name for p in out.iterdir()} == {CARD, "model.jax_export", "model.safetensors"}
    remote = safetensors.numpy.load_file(out / "model.safetensors")
    local = safetensors.numpy.load_file(exported["files"]["safetensors"])
    assert set(remote) == set(local)
    for name, array in local.items():
        np.testing.assert_array_equal(remote[name], array, err_msg=name)


def test_formats_are_checked_and_named():
    assert export.parse_formats("safetensors, JAX,jax") == ("safetensors", "jax")
    assert export.parse_formats(["jax"]) == ("jax",)
    with pytest.raises(export.ExportError, match=r"unknown format 'png'.*safetensors, jax"):
        export.parse_formats("safetensors,png")
    with pytest.raises(export.ExportError, match=r"'tflite' is not available \(.*TFLite"):
        export.parse_formats("tflite")
    with pytest.raises(export.ExportError, match="empty"):
        export.parse_formats(" , ")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_tiny", "efficientnet_lite_tiny"])
def test_other_families_export_with_a_symbolic_batch(name):
    from tlflax.models import create_model

    spec = create_model(name, num_classes=4)
    prep = spec.preprocessing.at_resolution(16)
    variables = jax.tree_util.tree_map(np.asarray, spec.init(jax.random.key(0), 16))
    head = variables["params"]["head"]
    rng = np.random.default_rng(1)
    variables["params"]["head"] = jax.tree_util.tree_map(
        lambda a: rng.normal(size=a.shape).astype(a.dtype), head
    )
    run = type("Run", (), {"spec": spec, "prep": prep})
    fn = export.inference_fn(run, variables)
    artifact = jax.export.deserialize(export.jax_artifact(fn, stored_size=prep.resize))
    for n in (3, 1):
        images = rng.integers(0, 256, (n, prep.resize, prep.resize, 3), dtype=np.uint8)
        want = np.asarray(jax.jit(fn)(images))
        np.testing.assert_allclose(np.asarray(artifact.call(images)), want, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- real photos


@pytest.mark.shared_data
@pytest.mark.slow
def test_artifact_equals_predict_on_16_flowers12_photos(shared_data, tmp_path):
    """A few steps of resnet_tiny on flowers12 at 32 px, then predict's own computation
    (load_image, the eval transform, model.apply, softmax; one image at a time) against
    the exported artifact on the same 16 files in one batch."""
    root = shared_data / "flowers12"
    workdir = tmp_path / "flowers"
    overrides = {
        "data.source": "folder",
        "data.path": str(root),
        "data.val_fraction": 0.0,  # flowers12's test/ is its validation split
        "data.image_size": 32,
        "data.batch_size": 32,
        "data.eval_batch_size": 120,
        "optim.probe_steps": 3,
        "optim.finetune_steps": 3,
        "train.eval_every": 3,
        "train.checkpoint_every": 3,
    }
    argv = ["tlflax", "train", "--config", TINY, "--workdir", str(workdir)]
    assert main.main(argv + [f"--config.{k}={v}" for k, v in overrides.items()]) == 0
    result = export.export_run(workdir, formats="jax")
    assert result["card"]["classes"] == sorted(p.name for p in (root / "test").iterdir())

    paths = sorted((root / "test").glob("*/*"))[::15][:16]
    assert len({p.parent.name for p in paths}) >= 8  # photos of many classes
    run, st, _ = _restored(workdir)
    probs_of = _predict_probs_fn(run)
    want = [probs_of(state.variables_of(st), load_image(p, resize=run.prep.resize)) for p in paths]
    images = np.stack([load_image(p, resize=run.prep.resize) for p in paths])
    artifact = jax.export.deserialize(pathlib.Path(result["files"]["jax"]).read_bytes())
    logits = np.asarray(artifact.call(images))
    assert logits.shape == (16, 12) and np.ptp(logits) > 1e-3
    np.testing.assert_allclose(logits, np.stack([w[1] for w in want]), rtol=0, atol=1e-5)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    np.testing.assert_allclose(probs, np.stack([w[0] for w in want]), rtol=0, atol=1e-5)


def _predict_probs_fn(run):
    """cli.cmd_predict's jitted function, returning the logits beside the probabilities."""
    eval_transform = augment.make_eval_transform(
        image_size=run.prep.resolution, preprocessing=run.prep
    )
    model = run.spec.module

    @jax.jit
    def probs_of(variables, image):
        logits = model.apply(variables, eval_transform(image[None]), train=False)
        return jax.nn.softmax(logits[0]), logits[0]

    return lambda variables, image: tuple(np.asarray(x) for x in probs_of(variables, image))


def test_export_from_the_command_line(tiny_run, tmp_path, capsys):
    out = tmp_path / "cli_export"
    argv = ["tlflax", "export", "--workdir", str(tiny_run), "--format", "safetensors"]
    assert main.main([*argv, "--export_dir", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "model_card.json"]
    assert main.main([*argv, "--format", "onnx", "--export_dir", str(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
