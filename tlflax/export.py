"""Take a trained model out of tlflax: `tlflax export --workdir DIR --format safetensors,jax`.

The workdir's best checkpoint (the one eval and predict restore) becomes, in OUT
(default DIR/export, or DIR/export_ema with --ema):

  model.safetensors  params and batch_stats as flat '/'-joined names
                     ('params/backbone/stem/conv/kernel'), for any framework to read
  model.jax_export   a serialized `jax.export` artifact of preprocessing + forward, the
                     weights inside: uint8 images (N, S, S, 3) at the stored size S (short
                     side resized to S, centre S x S, as tlflax's loader does) -> centre
                     crop to the model's input + normalisation -> logits (N, classes).
                     N is symbolic (any batch); it reloads with jax alone:
                     `jax.export.deserialize(data).call(images)`.
  model_card.json    architecture, classes, preprocessing, input size, metrics, step, how
                     to load each file

TFLite and ONNX are not produced: no ONNX converter is installed, and the TFLite converter
of TensorFlow 2.21 rejects tlflax's 1x1 convolutions (a rank-4 `dot_general`: "tfl.batch_matmul
op found invalid output rank") and, with a symbolic batch, `vhlo.dynamic_gather_v1`.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

import tlflax
from tlflax import experiment, fs, metrics_io, optim, state, tree
from tlflax.data import augment
from tlflax.errors import UserError

FORMATS = ("safetensors", "jax")
FILES = {"safetensors": "model.safetensors", "jax": "model.jax_export"}
CARD_FILE = "model_card.json"
# The artifact runs on each of these (lowered for all of them, wherever it is exported).
PLATFORMS = ("cpu", "cuda", "tpu")
_NOT_AVAILABLE = {
    "tflite": "TensorFlow 2.21's TFLite converter rejects tlflax's 1x1 convolutions "
    "(rank-4 batch_matmul)",
    "onnx": "no JAX -> ONNX converter is installed",
}


class ExportError(UserError, ValueError):
    """A request export cannot honour; the message names the flag, the value and the fix
    (main prints it as one line, exit status 2)."""


def export_run(
    workdir, *, formats, out_dir=None, ema: bool = False, platforms: Sequence[str] = PLATFORMS
) -> dict:
    """Export the best checkpoint of `workdir`; returns {'out_dir', 'step', 'files', 'card'}.

    formats: 'safetensors,jax' or a sequence of names from FORMATS. The model card is
    always written. ema: the EMA of the trainable weights (runs with optim.ema_decay > 0).
    """
    workdir = fs.path(workdir, what="--workdir")
    wanted = parse_formats(formats)
    config, run = experiment.from_workdir(workdir)
    classes = run.class_names
    check_ema(config, ema=ema, workdir=workdir)  # before the restore: a second, not a minute
    st, step = experiment.restore_chosen(config, run, workdir)
    variables = inference_variables(st, ema=ema, workdir=workdir)
    default = workdir / ("export_ema" if ema else "export")
    out = fs.path(out_dir, what="--export_dir") if out_dir else default
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    if "safetensors" in wanted:
        meta = {"tlflax_version": tlflax.__version__, "model": config.model.name, "step": str(step)}
        files["safetensors"] = write_safetensors(variables, out / FILES["safetensors"], meta=meta)
    if "jax" in wanted:
        artifact = jax_artifact(
            inference_fn(run, variables), stored_size=run.prep.resize, platforms=platforms
        )
        files["jax"] = out / FILES["jax"]
        files["jax"].write_bytes(artifact)
    card = model_card(config, run, classes, variables=variables, step=step, ema=ema)
    card.update(files={k: p.name for k, p in files.items()}, platforms=list(platforms))
    card["metrics"] = run_metrics(workdir, step=step)
    (out / CARD_FILE).write_text(json.dumps(card, indent=2, default=str))
    files["card"] = out / CARD_FILE
    paths = {k: str(p) for k, p in files.items()}
    return {"out_dir": str(out), "step": step, "files": paths, "card": card}


def parse_formats(formats) -> tuple[str, ...]:
    names = formats.split(",") if isinstance(formats, str) else list(formats)
    names = tuple(dict.fromkeys(n.strip().lower() for n in names if n.strip()))
    for name in names:
        if name in _NOT_AVAILABLE:
            raise ExportError(
                f"tlflax export --format: {name!r} is not available ({_NOT_AVAILABLE[name]}); "
                f"use {' or '.join(FORMATS)}"
            )
        if name not in FORMATS:
            raise ExportError(
                f"tlflax export --format: unknown format {name!r}; use one or more of "
                f"{', '.join(FORMATS)}, comma-separated (--format safetensors,jax)"
            )
    if not names:
        raise ExportError(f"tlflax export --format is empty; give {','.join(FORMATS)}")
    return names


def check_ema(config, *, ema: bool, workdir) -> None:
    if ema and not config.optim.ema_decay:
        raise ExportError(
            f"tlflax export --ema: the run in {workdir} was trained with "
            f"optim.ema_decay={config.optim.ema_decay}, so its checkpoints hold no EMA weights; "
            "export without --ema, or train with --config.optim.ema_decay=0.999"
        )


def inference_variables(st, *, ema: bool, workdir) -> dict:
    """params (+ batch_stats) of a restored state as host numpy arrays; with `ema`, each
    trainable parameter is its EMA (frozen ones and the BatchNorm statistics stay)."""
    if ema:
        params = optim.ema_params(st.params, st.opt_state)
        if params is None:  # a phase without EMA state (a cached probe) saved this step
            raise ExportError(
                f"tlflax export --ema: the best checkpoint of {workdir} holds no EMA state "
                f"(step {int(st.step)}); export without --ema"
            )
        st = st.replace(params=params)
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree.to_plain(state.variables_of(st))))


def write_safetensors(variables: dict, path, *, meta: dict):
    flat = {name: np.ascontiguousarray(x) for name, x in tree.flatten(variables).items()}
    path.write_bytes(safetensors.numpy.save(flat, metadata=meta))
    return path


def inference_fn(run, variables: dict):
    """uint8 (N, S, S, 3) -> logits: the same transform and apply as eval and predict."""
    transform = augment.make_eval_transform(image_size=run.prep.resolution, preprocessing=run.prep)
    model = run.spec.module

    def logits_of(images):
        return model.apply(variables, transform(images), train=False)

    return logits_of


def jax_artifact(fn, *, stored_size: int, platforms: Sequence[str] = PLATFORMS) -> bytes:
    """`fn` (weights closed over, so they are constants inside) serialized by jax.export,
    for uint8 (batch, S, S, 3) with a symbolic batch."""
    (batch,) = jax.export.symbolic_shape("batch")
    images = jax.ShapeDtypeStruct((batch, stored_size, stored_size, 3), jnp.uint8)
    exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(images)
    return bytes(exported.serialize())


def model_card(config, run, classes, *, variables: dict, step: int, ema: bool) -> dict:
    prep, n_classes = run.prep, len(classes)
    n_params = sum(int(np.size(x)) for x in tree.flatten(variables["params"]).values())
    return {
        "tlflax_version": tlflax.__version__,
        "jax_version": jax.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "step": step,
        "ema": {"used": ema, "decay": config.optim.ema_decay},
        "model": {
            "name": config.model.name,
            "family": run.spec.family,
            "overrides": config.model.overrides.to_dict(),
            "head_hidden": config.model.head_hidden,
            "compute_dtype": config.model.compute_dtype,
            "architecture": run.spec.arch,
            "n_params": n_params,
        },
        "weights_source": config.weights.source,
        "classes": classes,
        "preprocessing": json.loads(prep.to_json()),
        "input": {
            "dtype": "uint8",
            "shape": ["batch", prep.resize, prep.resize, 3],
            "host": f"RGB; short side resized to {prep.resize} ({prep.interpolation}), "
            f"centre {prep.resize}x{prep.resize} (tlflax.data.load_image(path, resize="
            f"{prep.resize}))",
            "inside": f"centre crop {prep.resolution}x{prep.resolution}, (x - mean) / std",
        },
        "output": {"shape": ["batch", n_classes], "meaning": "logits; softmax = probabilities"},
        "how_to_load": _HOW_TO_LOAD,
    }


_HOW_TO_LOAD = {
    "jax": "import jax, numpy as np; exported = jax.export.deserialize(open("
    "'model.jax_export', 'rb').read()); logits = exported.call(images)  # uint8 "
    "(N, S, S, 3) as in 'input'; needs jax only, on a platform in 'platforms'",
    "safetensors": "from safetensors.numpy import load_file; flat = load_file("
    "'model.safetensors')  # {'params/backbone/...': array}; in tlflax: variables = "
    "tlflax.tree.unflatten(flat), module = tlflax.models.create_model(model.name, "
    "num_classes=len(classes), head_hidden=model.head_hidden, **model.overrides).module, "
    "module.apply(variables, normalised_images, train=False)",
}


def run_metrics(workdir, *, step: int) -> dict:
    """Validation metrics of the exported step (metrics.jsonl) and the run's summary.json."""
    at_step = {}
    for record in metrics_io.read_history(workdir):
        if record["step"] == step and "val/top1" in record:
            at_step = {k: v for k, v in record.items() if k.startswith("val/")}
    summary_path = workdir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    keys = ("best_step", "best", "final", "test", "phases")
    return {"exported_step": at_step, "summary": {k: summary[k] for k in keys if k in summary}}


def format_result(result: dict) -> str:
    """What `tlflax export` prints: the step and one line per file."""
    lines = [f"exported step {result['step']} to {result['out_dir']}"]
    lines += [f"  {name:12} {path}" for name, path in result["files"].items()]
    return "\n".join(lines)
