"""What each `tlflax` command does (main.py parses the flags and calls these)."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np

from tlflax import config_lib, data, evaluate, optim, state, train, tree
from tlflax import preprocessing as pp
from tlflax.models import create_model


def _need(value, flag: str, command: str):
    if not value:
        raise SystemExit(f"tlflax {command}: --{flag} is required")
    return value


def cmd_train(flags, config, positional) -> int:
    _need(config, "config", "train")
    workdir = _need(flags.workdir, "workdir", "train")
    if positional:
        raise SystemExit(f"tlflax train: unexpected arguments {positional}")
    train.train_and_evaluate(config, workdir)
    return 0


def load_run(workdir: pathlib.Path):
    """Config, preprocessing, classes and plan of a finished (or running) workdir."""
    if not (workdir / "config.json").is_file():
        raise SystemExit(f"{workdir} holds no config.json: is it a tlflax train workdir?")
    config = config_lib.from_json((workdir / "config.json").read_text())
    prep = pp.Preprocessing.from_json((workdir / "preprocessing.json").read_text())
    classes = json.loads((workdir / "classes.json").read_text())
    info = json.loads((workdir / "run.json").read_text())
    run = train.plan(
        config, num_classes=len(classes), steps_per_epoch=info["steps_per_epoch"], prep=prep
    )
    return config, run, classes


def restore_best(config, run, workdir: pathlib.Path):
    ckpt = train.open_checkpointer(config, workdir)
    step = ckpt.best_step()
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise SystemExit(f"{workdir}/checkpoints holds no complete checkpoint")
    st = train.restore(run, ckpt, step)
    ckpt.close()
    return st, step


def cmd_eval(flags, config_unused, positional) -> int:
    workdir = pathlib.Path(_need(flags.workdir, "workdir", "eval"))
    config, run, _ = load_run(workdir)
    if flags.split:
        config.data.eval_split = flags.split
    run = train.setup(config, workdir)
    st, step = restore_best(config, run, workdir)
    result = train.run_eval(train.make_eval_fn(run), st, run)
    split = config.data.eval_split or "eval"
    out = workdir / f"eval_{split}_step{step}"
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
    workdir = pathlib.Path(_need(flags.workdir, "workdir", "predict"))
    if not positional:
        raise SystemExit("tlflax predict: give one or more image paths")
    config, run, classes = load_run(workdir)
    st, step = restore_best(config, run, workdir)
    eval_transform = data.augment.make_eval_transform(
        image_size=run.prep.resolution, preprocessing=run.prep
    )
    model = run.spec.module

    @jax.jit
    def probs_of(variables, image):
        logits = model.apply(variables, eval_transform(image[None]), train=False)
        return jax.nn.softmax(logits[0])

    variables = state.variables_of(st)
    failures = 0
    for path in positional:
        try:
            image = data.load_image(path, resize=run.prep.resize)
        except Exception as e:  # one bad file must not stop the others
            failures += 1
            print(f"{path}: cannot read image ({e})")
            continue
        probs = np.asarray(probs_of(variables, image))
        top = np.argsort(-probs)[: flags.top_k]
        shown = ", ".join(f"{classes[i]} {100 * probs[i]:.1f}%" for i in top)
        print(f"{path}: {shown}")
    return 1 if failures == len(positional) else 0


def cmd_inspect(flags, config, positional) -> int:
    if len(positional) != 1 and config is None:
        raise SystemExit("tlflax inspect: give a MODEL name (or --config)")
    if config is not None:
        name = positional[0] if positional else config.model.name
        num_classes = config.model.num_classes or flags.num_classes
        spec = create_model(name, num_classes=num_classes, **dict(config.model.overrides))
    else:
        spec = create_model(positional[0], num_classes=flags.num_classes)
    variables = jax.eval_shape(lambda: spec.init(jax.random.key(0)))
    if flags.weights:
        from tlflax import weights as weights_lib

        concrete = spec.init(jax.random.key(0))
        # The new head is replaced, as in training (its size is --num_classes, not the
        # checkpoint's); everything else must come from the checkpoint.
        reinit = tuple(config.weights.reinit) if config is not None else ("head/.*",)
        loaded = weights_lib.load_pretrained(spec, flags.weights, variables=concrete, reinit=reinit)
        variables = loaded.variables
        print(f"weights {flags.weights}: {loaded.report.summary()}")
        print(f"preprocessing: {loaded.preprocessing}")
    trainable = None
    if config is not None:
        phases = optim.make_phases(
            config.optim,
            params=variables["params"],
            spec=spec,
            steps_per_epoch=1,
            total_steps=optim.total_steps(
                config.optim, steps_per_epoch=1, train_config=config.train
            ),
        )
        for phase in phases:
            print(f"phase {phase.name}:\n{phase.table}\n")
        trainable = tree.flatten(phases[0].trainable)
    print(summary_table(variables, trainable=trainable, name=spec.name))
    return 0


def summary_table(variables, *, trainable=None, name="") -> str:
    """Keras' model.summary(), per module: path, parameter shapes, count, trainable."""
    modules: dict[str, list] = {}
    for collection, sub in variables.items():
        for leaf_name, leaf in tree.flatten(sub).items():
            module, _, param = leaf_name.rpartition("/")
            modules.setdefault(module, []).append((collection, param, leaf_name, leaf))
    rows, totals = [], {"trainable": 0, "frozen": 0, "state": 0}
    for module, leaves in modules.items():
        shapes = " ".join(f"{p}{tuple(x.shape)}" for _, p, _, x in leaves)
        count = sum(int(np.prod(x.shape)) for *_, x in leaves)
        kinds = set()
        for collection, _, leaf_name, x in leaves:
            n = int(np.prod(x.shape))
            if collection != "params":
                kinds.add("state")
                totals["state"] += n
            elif trainable is None or trainable[leaf_name]:
                kinds.add("trainable" if trainable is not None else "")
                totals["trainable"] += n
            else:
                kinds.add("frozen")
                totals["frozen"] += n
        rows.append((module, shapes, count, "/".join(sorted(k for k in kinds if k))))
    width = max(len(r[0]) for r in rows)
    lines = [f"Model: {name}", f"{'module':<{width}}  {'params':>11}  {'':9}  shapes"]
    for module, shapes, count, kind in rows:
        lines.append(f"{module:<{width}}  {count:>11,}  {kind:9}  {shapes}")
    n_params = totals["trainable"] + totals["frozen"]
    lines.append(f"Total params: {n_params:,}")
    if trainable is not None:
        lines.append(f"Trainable params: {totals['trainable']:,}")
        lines.append(f"Frozen params: {totals['frozen']:,}")
    lines.append(f"Non-trainable state (BatchNorm statistics): {totals['state']:,}")
    return "\n".join(lines)
