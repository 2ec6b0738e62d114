"""What each `tlflax` command does (main.py parses the flags and calls these)."""

from __future__ import annotations

import dataclasses
import json
import re

import jax

from tlflax import (
    config_lib,
    data,
    errors,
    evaluate,
    fs,
    model_summary,
    optim,
    predict,
    state,
    train,
    tree,
)
from tlflax import preprocessing as pp


def _need(value, flag: str, command: str):
    if not value:
        raise errors.UserError(f"--{flag} is required")
    return value


def cmd_train(flags, config, positional) -> int:
    _need(config, "config", "train")
    workdir = _need(flags.workdir, "workdir", "train")
    if positional:
        raise errors.UserError(f"unexpected arguments {positional}")
    train.train_and_evaluate(config, workdir)
    return 0


def load_run(workdir):
    """Config, preprocessing, classes and plan of a finished (or running) workdir."""
    if not (workdir / "config.json").is_file():
        raise errors.UserError(f"{workdir} holds no config.json: is it a tlflax train workdir?")
    config = config_lib.from_json((workdir / "config.json").read_text())
    prep = pp.Preprocessing.from_json((workdir / "preprocessing.json").read_text())
    classes = json.loads((workdir / "classes.json").read_text())
    info = json.loads((workdir / "run.json").read_text())
    run = train.plan(
        config, num_classes=len(classes), steps_per_epoch=info["steps_per_epoch"], prep=prep
    )
    return config, run, classes


def restore_best(config, run, workdir):
    """The best checkpoint by validation top-1 (the latest when none has metrics)."""
    ckpt = train.open_checkpointer(config, workdir)
    step = best_step(ckpt, workdir)
    st = train.restore(run, ckpt, step)
    ckpt.close()
    return st, step


def best_step(ckpt, workdir) -> int:
    step = train.chosen_step(ckpt)
    if step is None:
        raise errors.UserError(f"{workdir}/checkpoints holds no complete checkpoint")
    return step


def with_eval_split(config, split: str):
    """The run's config, evaluating on `split`: a TFDS split string, or a sub-folder of the
    image root next to train/ (a run that carved its validation split out of train/ can
    still be evaluated on test/). The data layer says when the folder has no such split."""
    if config.data.source == "digits":
        raise errors.UserError("--split: the digits source has one split (carved); drop it")
    config.data.eval_split = split
    if config.data.source == "folder":
        config.data.val_fraction = 0.0  # the named folder, not a carved split
    return config


def cmd_eval(flags, config_unused, positional) -> int:
    workdir = fs.path(_need(flags.workdir, "workdir", "eval"), what="--workdir")
    config, saved_run, classes = load_run(workdir)
    if flags.split:
        config = with_eval_split(config, flags.split)
    split = data.eval_split_name(config.data)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", split).strip("_") or "split"  # 'train[90%:]'
    ckpt = train.open_checkpointer(config, workdir)
    step = best_step(ckpt, workdir)
    out = workdir / f"eval_{name}_step{step}"
    # The data report of this evaluation goes with its results; the run's own stays.
    data_run = train.setup(config, workdir, manifest_dir=out)
    if data_run.datasets.class_names != classes:
        raise errors.UserError(
            f"the data's classes {data_run.datasets.class_names[:10]} are not the "
            f"run's {classes[:10]} (classes.json)"
        )
    # The run's own plan (run.json) places `step` in its phase, whatever this data's size.
    run = dataclasses.replace(saved_run, datasets=data_run.datasets)
    st = train.restore(run, ckpt, step)
    ckpt.close()
    result = train.run_eval(train.make_eval_fn(run, tta=_tta(flags)), st, run)
    evaluate.write_reports(result, out_dir=out, title=f"{config.model.name} step {step}")
    rows = [
        {
            "split": split,
            "step": step,
            "top1": f"{100 * result.top1:.2f} %",
            "errors": f"{result.n_errors}/{result.n}",
        }
    ]
    print(evaluate.format_table(rows, ["split", "step", "top1", "errors"]))
    print(f"reports in {out}")
    return 0


def cmd_predict(flags, config_unused, positional) -> int:
    workdir = fs.path(_need(flags.workdir, "workdir", "predict"), what="--workdir")
    if not positional:
        raise errors.UserError("give one or more image files, folders or globs")
    paths = predict.expand_inputs(positional)
    config, run, classes = load_run(workdir)
    st, step = restore_best(config, run, workdir)
    probs, good, bad = predict.predict_files(
        paths,
        probs_fn=predict.make_probs_fn(run, tta=_tta(flags)),
        variables=state.variables_of(st),
        resize=run.prep.resize,
        max_pixels=config.data.max_image_pixels,
        workers=1 if len(paths) < 64 else config.data.workers,  # few files: no worker start
        batch_size=flags.batch_size,
    )
    rows = predict.rows_of(paths, probs, good, bad, classes=classes, top_k=flags.top_k)
    for row in rows:
        print(predict.console_line(row))
    if flags.out:
        predict.write(rows, flags.out, top_k=flags.top_k, step=step)
        print(f"{int(good.sum())} of {len(paths)} files predicted (step {step}); {flags.out}")
    return 0 if good.any() else 1


def _tta(flags) -> str:
    if flags.tta not in evaluate.TTA:
        raise errors.UserError(f"--tta={flags.tta!r}; use one of {evaluate.TTA[1:]} or none")
    return flags.tta


def cmd_export(flags, config_unused, positional) -> int:
    from tlflax import export  # export reuses load_run / restore_best from here

    if positional:
        raise errors.UserError(f"unexpected arguments {positional}")
    workdir = fs.path(_need(flags.workdir, "workdir", "export"), what="--workdir")
    result = export.export_run(
        workdir, formats=flags.format, out_dir=flags.export_dir, ema=flags.ema
    )
    print(export.format_result(result))
    return 0


def cmd_config(flags, config, positional) -> int:
    """The resolved config, each key with its value, its default when changed, its meaning."""
    from tlflax import help as help_lib

    if positional:
        raise errors.UserError(f"unexpected arguments {positional}")
    base = config_lib.get_base_config()
    print(help_lib.listing(config if config is not None else base, base))
    return 0


def cmd_inspect(flags, config, positional) -> int:
    if len(positional) != 1 and config is None:
        raise errors.UserError("give a MODEL name (or --config)")
    if config is None:
        # Freezing as a run with no config of its own would have it: the base config's.
        config = config_lib.get_base_config()
        print(
            f"trainable / frozen: the base config's optim.strategy={config.optim.strategy!r}; "
            "--config CFG shows a run's rules"
        )
    if positional:
        config.model.name = positional[0]
    num_classes = config.model.num_classes or flags.num_classes
    spec = train.build_model(config, num_classes=num_classes)
    variables = jax.eval_shape(lambda: spec.init(jax.random.key(0)))
    if flags.weights:
        from tlflax import weights as weights_lib

        concrete = spec.init(jax.random.key(0))
        # The new head is replaced, as in training (its size is --num_classes, not the
        # checkpoint's); everything else must come from the checkpoint.
        reinit = tuple(config.weights.reinit)
        loaded = weights_lib.load_pretrained(spec, flags.weights, variables=concrete, reinit=reinit)
        variables = loaded.variables
        print(f"weights {flags.weights}: {loaded.report.summary()}")
        print(f"preprocessing: {loaded.preprocessing}")
    phases = optim.make_phases(
        config.optim,
        train_config=config.train,
        params=variables["params"],
        spec=spec,
        steps_per_epoch=1,
    )
    for phase in phases:
        print(f"phase {phase.name}:\n{phase.table}\n")
    trainable = tree.flatten(phases[0].trainable)
    table = model_summary.rows(
        spec.module, variables, image_size=spec.preprocessing.resolution, trainable=trainable
    )
    print(model_summary.format_table(table, name=spec.name, with_status=True))
    return 0
