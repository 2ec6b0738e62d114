"""What each `tlflax` command does (main.py parses the flags and calls these)."""

from __future__ import annotations

import json
import re

import jax

from tlflax import (
    config_lib,
    data,
    errors,
    evaluate,
    experiment,
    features,
    fewshot,
    fs,
    imagenet,
    model_summary,
    optim,
    predict,
    state,
    train,
    tree,
)


def _need(value, flag: str, command: str):
    if not value:
        raise errors.UserError(f"--{flag} is required")
    return value


def cmd_train(flags, config, positional) -> int:
    _need(config, "config", "train")
    workdir = _need(flags.workdir, "workdir", "train")
    if positional:
        raise errors.UserError(f"unexpected arguments {positional}")
    train.train_and_evaluate(config, workdir, record=command_line(flags))
    return 0


def command_line(flags) -> dict:
    """What summary.json records of the command: the config file with its :ARGS, and the
    --config.KEY=value overrides given (a sweep's point is told apart by them)."""
    overrides = {
        name[len("config.") :]: flags[name].value
        for name in flags
        if name.startswith("config.") and flags[name].present
    }
    return {"config_file": flags["config"].config_filename, "overrides": overrides}


def cmd_sweep(flags, config, positional) -> int:
    """Every point of a grid over overrides, checked first, run by an executor."""
    from tlflax import sweep

    _need(config, "config", "sweep")
    root = _need(flags.workdir, "workdir", "sweep")
    if positional:
        raise errors.UserError(f"unexpected arguments {positional}")
    plan = sweep.plan_from_flags(flags, root=root)
    return sweep.run(plan)


def cmd_compare(flags, config_unused, positional) -> int:
    """The table of runs (seeds pooled) and its charts."""
    from tlflax import compare

    if not positional:
        raise errors.UserError("give one or more sweep roots or run workdirs")
    by = [k.strip() for item in flags.by for k in item.split(",") if k.strip()]
    result = compare.compare(positional, by=by, metric=flags.metric, out=flags.out)
    print(result.markdown)
    print(f"\n{result.where}")
    return 0


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
    config = experiment.load_config(workdir)
    if flags.split:
        config = with_eval_split(config, flags.split)
    split = data.eval_split_name(config.data)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", split).strip("_") or "split"  # 'train[90%:]'
    ckpt = experiment.open_checkpointer(config, workdir)
    step = experiment.need_chosen_step(ckpt, workdir)
    ckpt.close()
    shots = _shots(flags)
    kind = "fewshot" if shots else "eval"
    out = workdir / f"{kind}_{name}_step{step}{'_ema' if flags.ema else ''}"
    # The data report of this evaluation goes with its results; the run's own stays. The
    # data is read with the saved preprocessing: the weights source is never looked up.
    config, run = experiment.from_workdir(workdir, config=config, manifest_dir=out, with_data=True)
    st, step = _restored(config, run, workdir, ema=flags.ema, command="eval")
    if shots:
        return _eval_fewshot(config, run, st, workdir, out, shots=shots, seeds=flags.fewshot_seeds)
    result = train.run_eval(train.make_eval_fn(run, tta=_tta(flags)), st, run)
    evaluate.write_reports(result, out_dir=out, title=f"{config.model.name} step {step}")
    rows = [
        {
            "split": split + (" (EMA)" if flags.ema else ""),
            "step": step,
            "top1": f"{100 * result.top1:.2f} %",
            "errors": f"{result.n_errors}/{result.n}",
        }
    ]
    print(evaluate.format_table(rows, ["split", "step", "top1", "errors"]))
    print(f"reports in {out}")
    return 0


def _shots(flags) -> tuple[int, ...]:
    if not flags.fewshot:
        return ()
    if flags.tta:
        raise errors.UserError("--tta: the few-shot probes use each image's eval crop; drop it")
    if flags.fewshot_seeds < 1:
        raise errors.UserError(f"--fewshot_seeds={flags.fewshot_seeds}: give at least 1")
    try:
        return fewshot.parse_shots(flags.fewshot)
    except ValueError as e:
        raise errors.UserError(f"--fewshot: {e}") from None


def _eval_fewshot(config, run, st, workdir, out, *, shots, seeds: int) -> int:
    """k-shot ridge probes on the chosen checkpoint's pooled features (cached beside the
    decoded images, so a second call runs no backbone pass)."""
    feats = features.cached_features(
        run, st, config=config, cache_dir=data.datasets.cache_dir_of(config.data, workdir)
    )
    results = fewshot.evaluate(
        feats.train.images,
        feats.train.labels,
        feats.eval.images,
        feats.eval.labels,
        shots=shots,
        seeds=seeds,
        num_classes=run.spec.module.head.num_classes,
    )
    print(evaluate.format_table([r.row() for r in results], fewshot.COLUMNS))
    report = {
        "split": data.eval_split_name(config.data),
        "n_train": int(len(feats.train.labels)),
        "n_eval": int(len(feats.eval.labels)),
        "seeds": seeds,
        "classifier": "ridge on one-hot targets, L2 by leave-one-out error on the shots",
        "results": [r.to_json() for r in results],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "fewshot.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"few-shot results in {out / 'fewshot.json'}")
    return 0


def cmd_predict(flags, config_unused, positional) -> int:
    if flags.model:
        return _predict_imagenet(flags, positional)
    workdir = fs.path(_need(flags.workdir, "workdir", "predict"), what="--workdir")
    if not positional:
        raise errors.UserError("give one or more image files, folders or globs")
    paths = predict.expand_inputs(positional)
    config, run = experiment.from_workdir(workdir)
    st, step = _restored(config, run, workdir, ema=flags.ema, command="predict")
    probs, good, bad = predict.predict_files(
        paths,
        probs_fn=predict.make_probs_fn(run, tta=_tta(flags)),
        variables=state.variables_of(st),
        resize=run.prep.resize,
        max_pixels=config.data.max_image_pixels,
        workers=1 if len(paths) < 64 else config.data.workers,  # few files: no worker start
        batch_size=flags.batch_size,
    )
    rows = predict.rows_of(paths, probs, good, bad, classes=run.class_names, top_k=flags.top_k)
    for row in rows:
        print(predict.console_line(row))
    if flags.out:
        predict.write(rows, flags.out, top_k=flags.top_k, step=step)
        print(f"{int(good.sum())} of {len(paths)} files predicted (step {step}); {flags.out}")
    return 0 if good.any() else 1


def _predict_imagenet(flags, positional) -> int:
    """predict --model NAME [--weights SRC]: the weights' own ImageNet head, no run."""
    if flags.workdir:
        raise errors.UserError("give --workdir (a run's classes) or --model (ImageNet's), not both")
    if flags.ema:
        raise errors.UserError("--ema reads a run's EMA weights; --model has none: drop it")
    if not positional:
        raise errors.UserError("give one or more image files, folders or globs")
    paths = predict.expand_inputs(positional)
    model, source = predict.imagenet_model(flags.model, flags.weights)
    base = config_lib.get_base_config().data
    probs, good, bad = predict.predict_files(
        paths,
        probs_fn=predict.make_probs_fn(model, tta=_tta(flags)),
        variables=model.variables,
        resize=model.prep.resize,
        max_pixels=base.max_image_pixels,
        workers=1 if len(paths) < 64 else base.workers,
        batch_size=flags.batch_size,
    )
    rows = predict.rows_of(paths, probs, good, bad, classes=imagenet.labels(), top_k=flags.top_k)
    for row in rows:
        print(predict.console_line(row))
    if flags.out:
        predict.write(rows, flags.out, top_k=flags.top_k, step=None, weights=source)
        print(f"{int(good.sum())} of {len(paths)} files predicted ({source}); {flags.out}")
    return 0 if good.any() else 1


def cmd_models(flags, config_unused, positional) -> int:
    from tlflax import zoo

    if len(positional) > 1:
        raise errors.UserError(f"give at most one PATTERN, not {positional}")
    print(zoo.table(positional[0] if positional else ""))
    return 0


def _restored(config, run, workdir, *, ema: bool, command: str):
    """(state, step) of the chosen checkpoint; with --ema, its EMA weights."""
    if ema and not config.optim.ema_decay:
        raise errors.UserError(
            f"tlflax {command} --ema: the run in {workdir} was trained with "
            "optim.ema_decay=0.0, so it holds no EMA weights; drop --ema"
        )
    st, step = experiment.restore_chosen(config, run, workdir)
    return (experiment.ema_state(st, where=f"tlflax {command} --ema") if ema else st), step


def _tta(flags) -> str:
    if flags.tta not in evaluate.TTA:
        raise errors.UserError(f"--tta={flags.tta!r}; use one of {evaluate.TTA[1:]} or none")
    return flags.tta


def cmd_export(flags, config_unused, positional) -> int:
    from tlflax import export

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
    spec = experiment.build_model(config, num_classes=num_classes)
    variables = jax.eval_shape(lambda: spec.init(jax.random.key(0)))
    if flags.weights:
        from tlflax import weights as weights_lib

        # The new head is replaced, as in training (its size is --num_classes, not the
        # checkpoint's); everything else must come from the checkpoint.
        reinit = tuple(config.weights.reinit)
        loaded = weights_lib.load_pretrained(
            spec, flags.weights, variables=variables, reinit=reinit
        )
        variables = spec.fill_init(jax.random.key(0), loaded.variables)
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
