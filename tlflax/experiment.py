"""A run: everything built once for it, and its train state.

Two constructors. `from_config` (train): the model, its preprocessing (which may come from
the weights source), the data and the plan of phases. `from_workdir` (eval, predict,
inspect, export): the saved config, preprocessing, classes and plan of a workdir, and
nothing else: a finished run is evaluated without its weights source (a hub cache or a
wheel that has gone), and the data, when asked for, is read with the saved preprocessing.
The model is built and `eval_shape(init)` traced once per run (twice only when the data
says how many classes there are).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from tlflax import checkpointing, config_lib, data, features, fewshot, optim, sharding, state, tree
from tlflax import preprocessing as pp
from tlflax import weights as weights_lib
from tlflax.errors import ConfigError, UserError
from tlflax.models import create_model

log = logging.getLogger("tlflax")

BN_MODES = ("frozen", "train")
HEAD_INITS = ("init", "ridge")  # config.weights.head_init
RECORD = ("config.json", "preprocessing.json", "classes.json", "run.json")


@dataclasses.dataclass
class Run:
    """Everything built once for a run (no arrays: shapes only)."""

    spec: Any  # models.ModelSpec: the flax module, its stages, its default preprocessing
    prep: pp.Preprocessing
    datasets: Any  # data.Datasets; None for a run rebuilt from its workdir without data
    phases: list  # optim.Phase, back to back from step 0
    mesh: Any
    steps_per_epoch: int
    total_steps: int
    global_batch: int
    eval_batch: int
    shard_min_size: int  # smaller leaves stay replicated over the 'model' axis
    variables_shape: Any  # eval_shape of the model's init: {'params', 'batch_stats'?}
    class_names: list[str]


# ----------------------------------------------------------------------------- from_config


def from_config(config, workdir: epath.Path, *, manifest_dir=None) -> Run:
    """Model and rules first (a bad config fails in seconds), then the data, then the plan;
    the data report goes to manifest_dir (default: the workdir)."""
    model = _Model(config, num_classes=max(1, config.model.num_classes))
    prep = resolve_preprocessing(config, model.spec)
    check_config(config, model, prep)  # before the data: seconds, not minutes
    datasets = _build_datasets(config, prep, workdir=workdir, manifest_dir=manifest_dir)
    num_classes = check_num_classes(config, datasets)
    if num_classes != model.num_classes:  # counted from the data: the head's size changes
        model = model.with_num_classes(config, num_classes)
    steps_per_epoch = datasets.train.batches_per_epoch(config.data.batch_size)
    if steps_per_epoch < 1:
        raise ConfigError(
            f"config.data.batch_size={config.data.batch_size} is larger than the training set "
            f"({datasets.train.n_examples} images); lower it"
        )
    return plan(
        config,
        model=model,
        steps_per_epoch=steps_per_epoch,
        prep=prep,
        datasets=datasets,
        class_names=datasets.class_names,
    )


class _Model:
    """The model of a run and its init's shapes, traced once."""

    def __init__(self, config, *, num_classes: int, resolution: int | None = None):
        self.num_classes = num_classes
        self.spec = build_model(config, num_classes=num_classes)
        self._resolution = resolution
        self._shape = None

    def variables_shape(self, resolution: int):
        if self._shape is None or self._resolution != resolution:
            init = lambda: self.spec.init(jax.random.key(0), resolution)
            self._shape, self._resolution = jax.eval_shape(init), resolution
        return self._shape

    def with_num_classes(self, config, num_classes: int) -> _Model:
        """The same model with another head: the backbone's traced shapes are kept, only
        the new head's are traced."""
        other = _Model(config, num_classes=num_classes, resolution=self._resolution)
        if self._shape is not None:
            key = jax.random.key(0)
            head = jax.eval_shape(lambda: other.spec.init_head(key, self._resolution))
            other._shape = {
                col: {**tree_of, **({"head": head[col]["head"]} if col in head else {})}
                for col, tree_of in self._shape.items()
            }
        return other


def build_model(config, *, num_classes: int):
    return create_model(
        config.model.name,
        num_classes=num_classes,
        head_hidden=config.model.head_hidden,
        head_dropout=config.model.head_dropout,
        dtype=jnp.dtype(config.model.compute_dtype),
        remat=config.model.remat,
        **dict(config.model.overrides),
    )


def resolve_preprocessing(config, spec) -> pp.Preprocessing:
    """A named preset, else what the weights source says (read, not downloaded whole), else
    the family's; config.data.image_size changes the resolution."""
    if config.weights.preprocessing:
        prep = pp.named(config.weights.preprocessing, resolution=spec.preprocessing.resolution)
    elif config.weights.source:
        prep = weights_lib.peek_preprocessing(
            config.weights.source, spec=spec, cache_dir=config.weights.cache_dir or None
        )
    else:
        prep = spec.preprocessing
    if config.data.image_size:
        prep = prep.at_resolution(config.data.image_size)
    return prep


def check_config(config, model: _Model, prep) -> None:
    """What can be checked from the config and the model alone."""
    if config.train.bn_mode not in BN_MODES:
        raise ConfigError(f"config.train.bn_mode={config.train.bn_mode!r}; use one of {BN_MODES}")
    if config.weights.head_init not in HEAD_INITS:
        raise ConfigError(
            f"config.weights.head_init={config.weights.head_init!r}; use one of {HEAD_INITS}"
        )
    if config.weights.head_init == "ridge" and config.model.head_hidden:
        raise ConfigError(
            "config.weights.head_init='ridge' fits a linear head, but config.model.head_hidden="
            f"{config.model.head_hidden} adds a hidden layer; set head_hidden=0 or head_init='init'"
        )
    if config.optim.probe_views > 1 and (config.aug.mixup_alpha or config.aug.cutmix_alpha):
        raise ConfigError(
            f"config.optim.probe_views={config.optim.probe_views} caches each training image's "
            "augmented views alone, but mixup / cutmix mix images (aug.mixup_alpha, "
            "cutmix_alpha); set them to 0 or probe_views=1"
        )
    if config.train.select_ema and not config.optim.ema_decay:
        raise ConfigError(
            "config.train.select_ema=True picks checkpoints by the EMA weights, but "
            "config.optim.ema_decay=0 keeps none; set ema_decay (e.g. 0.999) or select_ema=False"
        )
    shots = tuple(config.train.fewshot_shots)
    if shots and not all(isinstance(k, int) and k >= 1 for k in shots):
        raise ConfigError(
            f"config.train.fewshot_shots={shots!r}: give integers >= 1, e.g. (1, 5, 10)"
        )
    if shots and config.train.fewshot_seeds < 1:
        raise ConfigError(f"config.train.fewshot_seeds={config.train.fewshot_seeds}: give >= 1")
    params = model.variables_shape(prep.resolution)["params"]
    optim.check_groups(config.optim, params=params, spec=model.spec)


def _build_datasets(config, prep, *, workdir, manifest_dir):
    return data.build_datasets(
        config.data,
        image_size=prep.resolution,
        resize=prep.resize,
        seed=config.seed,
        workdir=str(workdir),
        manifest_dir=None if manifest_dir is None else str(manifest_dir),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def check_num_classes(config, datasets) -> int:
    found = datasets.num_classes
    if config.model.num_classes and config.model.num_classes != found:
        raise ConfigError(
            f"config.model.num_classes={config.model.num_classes} but the data has {found} "
            f"classes ({', '.join(datasets.class_names[:10])}{'...' if found > 10 else ''}); "
            "set it to 0 to take the count from the data"
        )
    return found


def plan(
    config,
    *,
    steps_per_epoch: int,
    prep,
    num_classes: int | None = None,
    model: _Model | None = None,
    datasets=None,
    class_names=None,
) -> Run:
    """Phases and mesh for a model (given, or built for num_classes) and a data size."""
    model = model or _Model(config, num_classes=num_classes)
    variables_shape = model.variables_shape(prep.resolution)
    phases = optim.make_phases(
        config.optim,
        train_config=config.train,
        params=variables_shape["params"],
        spec=model.spec,
        steps_per_epoch=steps_per_epoch,
    )
    return Run(
        spec=model.spec,
        prep=prep,
        datasets=datasets,
        phases=phases,
        mesh=sharding.make_mesh(data=config.train.mesh_data, model=config.train.mesh_model),
        steps_per_epoch=steps_per_epoch,
        total_steps=phases[-1].end_step,
        global_batch=config.data.batch_size,
        eval_batch=config.data.eval_batch_size or config.data.batch_size,
        shard_min_size=config.train.shard_min_size,
        variables_shape=variables_shape,
        class_names=list(class_names or []),
    )


def config_hash(config) -> str:
    return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- from_workdir


def save_run_record(config, run: Run, workdir: epath.Path) -> None:
    """What from_workdir reads later, and what a reader of the workdir wants to know."""
    if jax.process_index() != 0:
        return
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    (workdir / "preprocessing.json").write_text(run.prep.to_json())
    (workdir / "classes.json").write_text(json.dumps(run.class_names, indent=1))
    run_info = {"steps_per_epoch": run.steps_per_epoch, "total_steps": run.total_steps}
    (workdir / "run.json").write_text(json.dumps(run_info, indent=1))
    tables = "\n\n".join(
        f"phase {p.name} (steps {p.start_step}..{p.end_step}):\n{p.table}" for p in run.phases
    )
    (workdir / "optimizer_groups.txt").write_text(tables + "\n")


def from_workdir(workdir: epath.Path, *, config=None, manifest_dir=None, with_data=False):
    """(config, run) of a workdir, from its record alone (never the weights source).

    config: the saved one, edited (e.g. another eval split); with_data: the run's datasets,
    read with the saved preprocessing, whose classes must be the run's. The saved plan
    (run.json) places every checkpoint in its phase, whatever the data's size now.
    """
    _check_record(workdir)
    config = config or load_config(workdir)
    prep = pp.Preprocessing.from_json((workdir / "preprocessing.json").read_text())
    classes = json.loads((workdir / "classes.json").read_text())
    info = json.loads((workdir / "run.json").read_text())
    datasets = None
    if with_data:
        datasets = _build_datasets(config, prep, workdir=workdir, manifest_dir=manifest_dir)
        if datasets.class_names != classes:
            raise UserError(
                f"the data's classes {datasets.class_names[:10]} are not the "
                f"run's {classes[:10]} (classes.json)"
            )
    model = _Model(config, num_classes=len(classes))
    run = plan(
        config,
        model=model,
        steps_per_epoch=info["steps_per_epoch"],
        prep=prep,
        datasets=datasets,
        class_names=classes,
    )
    return config, run


def load_config(workdir: epath.Path):
    _check_record(workdir)
    return config_lib.from_json((workdir / "config.json").read_text())


def _check_record(workdir: epath.Path) -> None:
    missing = [name for name in RECORD if not (workdir / name).is_file()]
    if missing:
        raise UserError(
            f"{workdir} holds no {missing[0]}: is it a tlflax train workdir (one that started)?"
        )


# ----------------------------------------------------------------------------- state


def phase_at(phases, step: int) -> int:
    for i, phase in enumerate(phases):
        if step < phase.end_step:
            return i
    return len(phases) - 1


def abstract_state(run: Run, phase):
    """Shapes, dtypes and shardings of the train state in `phase` (nothing allocated)."""
    shapes = jax.eval_shape(
        lambda v: state.create(variables=v, tx=phase.tx, seed=0), run.variables_shape
    )
    shardings = sharding.param_shardings(shapes, run.mesh, min_size=run.shard_min_size)
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    ), shardings


def initial_variables(config, run: Run) -> dict:
    """The pretrained weights into the init's shapes, then a fresh init of what they leave
    (the head alone, usually: the backbone is never initialised only to be overwritten);
    without weights, a fresh init. Only ever at step 0."""
    rng = jax.random.key(config.seed)
    if not config.weights.source:
        return run.spec.init(rng, run.prep.resolution)
    loaded = weights_lib.load_pretrained(
        run.spec,
        config.weights.source,
        variables=run.variables_shape,
        reinit=tuple(config.weights.reinit),
        preprocessing=run.prep,
        cache_dir=config.weights.cache_dir or None,
    )
    log.info("pretrained weights %s: %s", config.weights.source, loaded.report.summary())
    return run.spec.fill_init(rng, loaded.variables, run.prep.resolution)


def create_state(variables: dict, *, tx, seed: int, shardings) -> state.TrainState:
    """The train state, created where it lives: the variables placed by their shardings,
    then the optimizer state built by a jit whose outputs are already sharded."""
    placed = sharding.put_global(
        {k: variables[k] for k in ("params", "batch_stats") if k in variables},
        {"params": shardings.params, "batch_stats": shardings.batch_stats}
        if "batch_stats" in variables
        else {"params": shardings.params},
    )
    create = lambda v: state.create(variables=v, tx=tx, seed=seed)
    return jax.jit(create, out_shardings=shardings, donate_argnums=0)(placed)


def restore(run: Run, ckpt: checkpointing.Checkpointer, step: int) -> state.TrainState:
    abstract, _ = abstract_state(run, run.phases[phase_at(run.phases, step)])
    return ckpt.restore(step, abstract_state=abstract)


def init_or_restore(config, run: Run, ckpt: checkpointing.Checkpointer, *, cache_dir):
    """Resume order: a checkpoint in the workdir wins; pretrained weights (and with
    weights.head_init='ridge', the closed-form head) only at step 0."""
    latest = ckpt.latest_step()
    phase = run.phases[phase_at(run.phases, latest or 0)]
    abstract, shardings = abstract_state(run, phase)
    if latest is not None:
        log.info("resuming from the checkpoint at step %d in %s", latest, ckpt.directory)
        return ckpt.restore(latest, abstract_state=abstract), shardings
    variables = initial_variables(config, run)
    st = create_state(variables, tx=phase.tx, seed=config.seed, shardings=shardings)
    if config.weights.head_init == "ridge":
        st = ridge_head(config, run, st, cache_dir=cache_dir)
    return st, shardings


def ridge_head(config, run: Run, st: state.TrainState, *, cache_dir) -> state.TrainState:
    """The state with its head's output layer fitted in closed form to the frozen backbone's
    cached features of the train split (fewshot.linear_head), placed like the old one."""
    feats = features.cached_features(run, st, config=config, cache_dir=cache_dir)
    kernel, bias, info = fewshot.linear_head(
        feats.train.images, feats.train.labels, run.spec.module.head.num_classes
    )
    log.info(
        "head: ridge on the cached features of %d training images (lambda %.3g and logits "
        "x %.3g by leave-one-out), top-1 %.2f %% on them, %.2f %% left out",
        info["n"],
        info["lambda"],
        info["temperature"],
        100 * info["train_top1"],
        100 * info["loo_top1"],
    )
    flat = tree.flatten(st.params)
    for name, value in (("head/out/kernel", kernel), ("head/out/bias", bias)):
        old = flat[name]
        value = np.asarray(value, old.dtype)
        flat[name] = jax.make_array_from_callback(old.shape, old.sharding, lambda i, v=value: v[i])
    return st.replace(params=tree.unflatten(flat))


def open_checkpointer(config, workdir: epath.Path) -> checkpointing.Checkpointer:
    return checkpointing.Checkpointer(
        workdir / "checkpoints",
        keep_last=config.train.keep_last,
        keep_best=config.train.keep_best,
        best_metric=best_metric(config),
        best_mode="max",
        async_save=config.train.async_checkpoints,
    )


def best_metric(config) -> str:
    return "val/ema_top1" if config.train.select_ema else "val/top1"


def ema_state(st: state.TrainState, *, where: str) -> state.TrainState:
    """The state with each trainable parameter replaced by its EMA (frozen ones and the
    BatchNorm statistics stay); `where` names the command for the error."""
    params = optim.ema_params(st.params, st.opt_state)
    if params is None:
        raise UserError(
            f"{where}: the checkpoint at step {int(jax.device_get(st.step))} holds no EMA "
            "weights (optim.ema_decay=0 when it was trained); drop --ema"
        )
    return st.replace(params=params)


def chosen_step(ckpt: checkpointing.Checkpointer) -> int | None:
    """The one checkpoint a run stands for, everywhere (summary, test split, eval, predict,
    export): the best by validation top-1 (of the EMA with train.select_ema), ties to the
    latest (orbax's order); else the latest when none carries metrics."""
    best = ckpt.best_step()
    return ckpt.latest_step() if best is None else best


def restore_chosen(config, run: Run, workdir: epath.Path):
    """(state, step) of the chosen checkpoint (an error when the workdir holds none)."""
    ckpt = open_checkpointer(config, workdir)
    try:
        step = need_chosen_step(ckpt, workdir)
        return restore(run, ckpt, step), step
    finally:
        ckpt.close()


def need_chosen_step(ckpt, workdir) -> int:
    step = chosen_step(ckpt)
    if step is None:
        raise UserError(f"{workdir}/checkpoints holds no complete checkpoint")
    return step


def switch_phase(st: state.TrainState, phase, run: Run):
    """(state, shardings) for the new phase: a fresh optimizer state (newly unfrozen leaves
    start from zero moments) but for the groups whose rule is unchanged (phase.carried)."""
    shapes = jax.eval_shape(lambda: st.replace(opt_state=phase.tx.init(st.params)))
    shardings = sharding.param_shardings(shapes, run.mesh, min_size=run.shard_min_size)
    opt_state = jax.jit(phase.tx.init, out_shardings=shardings.opt_state)(st.params)
    opt_state = optim.carry_state(
        st.opt_state, opt_state, carried=phase.carried, carried_ema=phase.carried_ema
    )
    return st.replace(opt_state=opt_state), shardings


def log_layout(run: Run, params, param_shardings) -> None:
    leaves = jax.tree_util.tree_leaves(params)
    split = [
        leaf
        for leaf, sh in zip(leaves, jax.tree_util.tree_leaves(param_shardings), strict=True)
        if sharding.MODEL in sh.spec
    ]
    log.info(
        "mesh %s; parameters split over '%s': %d of %d leaves, %s of %s values",
        dict(run.mesh.shape),
        sharding.MODEL,
        len(split),
        len(leaves),
        f"{sum(x.size for x in split):,}",
        f"{sum(x.size for x in leaves):,}",
    )
