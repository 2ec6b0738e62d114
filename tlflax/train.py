"""The trainer: `train_and_evaluate(config, workdir)`, the per-phase loop and the pure step
factories; the run it trains is built by tlflax/experiment.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from tlflax import (
    checkpointing,
    data,
    evaluate,
    experiment,
    features,
    fewshot,
    fs,
    losses,
    metrics_io,
    optim,
    sharding,
    state,
)
from tlflax.errors import UserError
from tlflax.experiment import Run

log = logging.getLogger("tlflax")


class NonFiniteLossError(UserError, FloatingPointError):
    pass


def make_train_step(
    *, apply_fn, loss_fn, tx, train_transform, trainable, bn_train: bool, lr_fns=None
):
    """(state, batch) -> (state, metrics); pure, jit it with the state donated.

    apply_fn: a flax module's `apply`; loss_fn(*, logits, targets, mask) -> scalar
    (losses.softmax_xent); train_transform(rng, images, labels) -> (images, targets);
    lr_fns: {group: fn(global step) -> lr}, reported in metrics['lr'] at the new step (on
    the device, with the step: no eager schedule ops on the host at each log).
    """

    def step_fn(st: state.TrainState, batch):
        rngs = state.step_rngs(st, ("augment", "dropout"))
        images, targets = train_transform(rngs["augment"], batch["image"], batch["label"])
        loss_of = _make_loss_of(
            apply_fn, loss_fn, st, images=images, targets=targets, mask=batch["mask"],
            dropout_rng=rngs["dropout"], bn_train=bn_train,
        )  # fmt: skip
        (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(st.params)
        updates, opt_state = tx.update(grads, st.opt_state, st.params)
        params = optax.apply_updates(st.params, updates)
        correct = losses.correct_topk(logits=logits, labels=batch["label"], k=1)
        mask = batch["mask"].astype(jnp.float32)
        metrics = {
            "loss": loss,
            "accuracy": jnp.sum(correct * mask) / jnp.maximum(jnp.sum(mask), 1.0),
            "grad_norm": optim.trainable_global_norm(grads, trainable),
        }
        new_state = st.replace(
            step=st.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state
        )
        if lr_fns:
            metrics["lr"] = {group: fn(new_state.step) for group, fn in lr_fns.items()}
        return new_state, metrics

    return step_fn


def _make_loss_of(apply_fn, loss_fn, st, *, images, targets, mask, dropout_rng, bn_train: bool):
    """params -> (loss, (logits, batch_stats after the forward pass)); BatchNorm statistics
    update only when bn_train (and the model has any)."""

    def loss_of(params):
        variables = {"params": params}
        if st.batch_stats:
            variables["batch_stats"] = st.batch_stats
        kwargs = dict(train=True, bn_train=bn_train, rngs={"dropout": dropout_rng})
        if bn_train and st.batch_stats:
            logits, updated = apply_fn(variables, images, mutable=["batch_stats"], **kwargs)
            new_stats = updated["batch_stats"]
        else:
            logits, new_stats = apply_fn(variables, images, **kwargs), st.batch_stats
        loss = loss_fn(logits=logits, targets=targets, mask=mask)
        return loss, (logits, new_stats)

    return loss_of


# ----------------------------------------------------------------------------- loop


def _jit_train_step(config, run: Run, phase, shardings):
    """The phase's jitted step: on images through the model ('train'), or on cached
    features through the head alone ('cached_probe')."""
    if phase.kind == "cached_probe":
        apply_fn, train_transform, bn_train = _head_step_parts(config, run)
    else:
        apply_fn = run.spec.module.apply
        train_transform = data.augment.make_train_transform(
            config.aug,
            image_size=run.prep.resolution,
            num_classes=run.spec.module.head.num_classes,
            preprocessing=run.prep,
        )
        bn_train = config.train.bn_mode == "train"
    step_fn = make_train_step(
        apply_fn=apply_fn,
        loss_fn=losses.softmax_xent,
        tx=phase.tx,
        train_transform=train_transform,
        trainable=phase.trainable,
        bn_train=bn_train,
        lr_fns=phase.lr_fns,
    )
    batch_sh = sharding.batch_sharding(run.mesh)
    return jax.jit(
        step_fn,
        in_shardings=(shardings, batch_sh),
        out_shardings=(shardings, sharding.replicated(run.mesh)),
        donate_argnums=0,
        compiler_options=sharding.compiler_options(run.mesh),
    )


def _head_step_parts(config, run: Run):
    """(apply_fn, train_transform, bn_train) of a step on cached features: the head alone,
    no augmentation, label smoothing kept."""
    model = run.spec.module
    num_classes, smoothing = model.head.num_classes, config.aug.label_smoothing

    def apply_fn(variables, feats, *, train, bn_train, rngs):
        del bn_train  # the head has no BatchNorm; the backbone's statistics stay
        return features.head_logits(model, variables, feats, train=train, rngs=rngs)

    def train_transform(rng, feats, labels):
        del rng
        return feats, data.augment.smooth_onehot(labels, num_classes, smoothing)

    return apply_fn, train_transform, False


def make_logits_fn(run: Run, *, tta: str = ""):
    """(variables, uint8 images (B, S, S, 3) at the stored size) -> logits, pure: the eval
    crop and normalisation, then the model in inference mode. tta: one of evaluate.TTA,
    whose views' mean probabilities come back as log-probabilities."""
    eval_transform = data.augment.make_eval_transform(
        image_size=run.prep.resolution, preprocessing=run.prep
    )
    model = run.spec.module

    def model_apply(variables, images):
        return model.apply(variables, images, train=False, bn_train=False)

    if tta:
        size = run.prep.resolution
        return evaluate.tta_apply(model_apply, eval_transform, kind=tta, image_size=size)
    return lambda variables, images: model_apply(variables, eval_transform(images))


def make_eval_fn(run: Run, *, tta: str = ""):
    """jit(variables, batch) -> per-example outputs (evaluate.make_eval_step)."""
    logits_fn = make_logits_fn(run, tta=tta)
    identity = lambda images: images  # logits_fn crops and normalises
    step = evaluate.make_eval_step(model_apply=logits_fn, eval_transform=identity)
    return jax.jit(step, compiler_options=sharding.compiler_options(run.mesh))


def make_head_eval_fn(run: Run):
    """jit(variables, batch of cached features) -> per-example outputs: the head alone."""
    model = run.spec.module

    def head_apply(variables, feats):
        return features.head_logits(model, variables, feats, train=False)

    step = evaluate.make_eval_step(model_apply=head_apply, eval_transform=lambda x: x)
    return jax.jit(step, compiler_options=sharding.compiler_options(run.mesh))


def run_eval(eval_fn, st, run: Run, *, split=None):
    """Every example of the split exactly once (the last batch padded and masked)."""
    from jax.experimental import multihost_utils

    split = split or run.datasets.eval
    variables = state.variables_of(st)
    batch_sh = sharding.batch_sharding(run.mesh)
    batches = split.iterate(
        global_batch=run.eval_batch, epoch=0, shuffle=False, drop_remainder=False
    )
    outputs = [eval_fn(variables, b) for b in data.prefetch_to_device(batches, 2, batch_sh)]
    gathered = [multihost_utils.process_allgather(o, tiled=True) for o in outputs]
    return evaluate.summarise(
        [jax.tree_util.tree_map(np.asarray, g) for g in gathered],
        class_names=run.datasets.class_names,
        example_names=split.names,
    )


def _flush_train_metrics(pending, *, first_step: int, writer, t0: float, n_images):
    """One host sync per logging interval; a non-finite loss stops the run, naming the step.

    images/s counts from t0 to the end of this sync: steps are dispatched asynchronously, so
    only a clock read after the sync covers their computation.
    """
    host = jax.device_get(pending)
    seconds = time.time() - t0
    # A non-finite gradient norm with a finite loss means the next parameters are already
    # broken: stop before they are checkpointed.
    for key in ("loss", "grad_norm"):
        seen = np.array([m[key] for m in host])
        bad = np.flatnonzero(~np.isfinite(seen))
        if bad.size:
            step = first_step + int(bad[0]) + 1
            raise NonFiniteLossError(
                f"training {key} is {seen[bad[0]]} at step {step}; stopping. The checkpoints "
                "before it stay valid; lower the learning rate or enable "
                "optim.grad_clip_norm and resume"
            )
    last = first_step + len(host)
    means = {k: float(np.mean([m[k] for m in host])) for k in host[0] if k != "lr"}
    scalars = {f"train/{k}": v for k, v in means.items()}
    scalars["train/images_per_sec"] = n_images / max(seconds, 1e-9)
    for group, lr in host[-1].get("lr", {}).items():  # at the interval's last step
        scalars[f"lr/{group}"] = float(lr)
    writer.write_scalars(last, scalars)
    return scalars


class Scores(NamedTuple):
    """One evaluation: of the raw weights, and of their EMA (optim.ema_decay > 0)."""

    raw: evaluate.EvalResult
    ema: evaluate.EvalResult | None

    def scalars(self, **extra) -> dict:
        out = _val_scalars(self.raw, **extra)
        return out if self.ema is None else {**out, **_val_scalars(self.ema, prefix="val/ema_")}


@dataclasses.dataclass(frozen=True)
class PhaseResult:
    name: str
    start_step: int
    end_step: int
    val: Scores | None  # its end-of-phase evaluation; None: run by an earlier process
    seconds: float = 0.0  # wall time this process spent in it (steps, evaluations, saves)


@dataclasses.dataclass
class TrainResult:
    state: state.TrainState  # at the end of the run
    phases: list[PhaseResult]  # the phases this process ran (or finished), in order


class Due(NamedTuple):
    log: bool
    eval: bool
    save: bool


@dataclasses.dataclass(frozen=True)
class Periodic:
    """When the periodic actions fall: every N steps, and at the end of each phase. A save
    is always preceded by a log flush, so that no step with a non-finite loss or gradient
    norm is ever checkpointed (retention could otherwise delete the last good one).

    A cached_probe phase saves at its end only, unless train.checkpoint_every is set: its
    epochs are head steps on features (milliseconds) and a checkpoint holds the whole
    model, so saving each epoch would cost more than the phase; a resume redoes them."""

    log_every: int
    eval_every: int
    save_every: int
    steps_per_epoch: int
    cached_save_every: int = 0  # in cached_probe phases; 0: at the phase's end only

    @classmethod
    def from_config(cls, train_config, *, steps_per_epoch: int) -> Periodic:
        return cls(
            log_every=max(1, train_config.log_every),
            eval_every=train_config.eval_every or steps_per_epoch,
            save_every=train_config.checkpoint_every or steps_per_epoch,
            steps_per_epoch=steps_per_epoch,
            cached_save_every=train_config.checkpoint_every,
        )

    def due(self, step: int, *, phase_end: bool, kind: str = "train") -> Due:
        every = self.cached_save_every if kind == "cached_probe" else self.save_every
        save = phase_end or (every > 0 and step % every == 0)
        log_now = step % self.log_every == 0 or step % self.steps_per_epoch == 0 or save
        return Due(log_now, step % self.eval_every == 0 or phase_end, save)


@dataclasses.dataclass
class Loop:
    """What every phase of one training process shares."""

    config: object
    run: Run
    ckpt: checkpointing.Checkpointer
    writer: metrics_io.MetricWriter
    progress: metrics_io.Progress
    eval_fn: Callable
    every: Periodic
    images: ImageBatches  # the train split's batches, from the step a phase starts at
    cache_dir: epath.Path  # where cached features live (config.data.cache_dir, else WORKDIR/cache)
    features_fn: Callable | None = None  # pooled features, for train.fewshot_shots (lazily)
    ahead: dict = dataclasses.field(default_factory=dict)  # phase name -> _compile_ahead's


class ImageBatches:
    """One prefetching iterator of train batches that phases hand on to each other (no
    refill stall between epochs or at a switch), opened lazily at the step of the first
    phase that reads images and reopened when a phase starts elsewhere (after a cached
    probe, which reads none): the batch of step s is the same whether or not the run was
    interrupted, and whatever ran before."""

    def __init__(self, run: Run):
        self.run, self._it, self._next = run, None, -1

    def at(self, step: int) -> ImageBatches:
        if self._it is None or self._next != step:
            self.close()
            self._it = data.prefetch_to_device(
                train_batches(self.run.datasets.train, self.run, start_step=step),
                2,
                sharding.batch_sharding(self.run.mesh),
            )
            self._next = step
        return self

    def __iter__(self):
        return self

    def __next__(self):
        self._next += 1
        return next(self._it)

    def close(self) -> None:
        if self._it is not None:
            self._it.close()  # stops its prefetch thread
            self._it = None


def train_and_evaluate(config, workdir, *, record: dict | None = None) -> dict:
    """Train per config, evaluating each epoch; returns the summary (also in summary.json)."""
    workdir = fs.check_writable(fs.path(workdir, what="workdir"), what="workdir")
    t_start = time.time()
    _start_distributed(config.train)
    run = experiment.from_config(config, workdir)
    experiment.save_run_record(config, run, workdir)
    for phase in run.phases:
        log.info(
            "phase %s, steps %d..%d\n%s", phase.name, phase.start_step, phase.end_step, phase.table
        )
    ckpt = experiment.open_checkpointer(config, workdir)
    cache_dir = data.datasets.cache_dir_of(config.data, workdir)
    st, shardings = experiment.init_or_restore(config, run, ckpt, cache_dir=cache_dir)
    experiment.log_layout(run, st.params, shardings.params)
    record = {**(record or {}), "resumed_at_step": int(jax.device_get(st.step))}
    _check_data_position(ckpt, run, record["resumed_at_step"])
    loop = _open_loop(config, run, ckpt, workdir, start_step=record["resumed_at_step"])
    try:
        result = train_phases(loop, st, shardings)
    except BaseException:
        # A save already under way holds a good state: let it complete before stopping.
        try:
            ckpt.wait()
        except Exception:  # noqa: BLE001 (the original error is the one to report)
            log.exception("waiting for the last checkpoint save failed")
        raise
    finally:
        loop.progress.close()
        loop.images.close()
    ckpt.wait()
    last = result.phases[-1].val if result.phases else None
    final = last or evaluate_state(config, loop.eval_fn, result.state, run)
    test = final_test(config, run, workdir, ckpt, loop.eval_fn)
    wall = time.time() - t_start
    summary = _finish(config, run, workdir, final, result, ckpt, wall, test, record=record)
    _write_hparams(loop.writer, config, summary)
    loop.writer.close()
    ckpt.close()
    return summary


def _start_distributed(train_config) -> None:
    sharding.maybe_initialize_distributed(
        enabled=train_config.distributed,
        coordinator_address=train_config.coordinator_address or None,
        num_processes=train_config.num_processes or None,
        process_id=None if train_config.process_id < 0 else train_config.process_id,
    )
    if jax.process_index() != 0:  # one log for a multi-host run: process 0's
        logging.getLogger("tlflax").setLevel(logging.WARNING)


def _open_loop(config, run: Run, ckpt, workdir, *, start_step: int) -> Loop:
    primary = jax.process_index() == 0
    return Loop(
        config=config,
        run=run,
        ckpt=ckpt,
        writer=metrics_io.MetricWriter(workdir, is_primary=primary),
        progress=metrics_io.Progress(
            run.total_steps,
            start_step=start_step,
            steps_per_epoch=run.steps_per_epoch,
            enabled=primary,
        ),
        eval_fn=make_eval_fn(run),
        every=Periodic.from_config(config.train, steps_per_epoch=run.steps_per_epoch),
        images=ImageBatches(run),
        cache_dir=data.datasets.cache_dir_of(config.data, workdir),
    )


def train_phases(loop: Loop, st, shardings) -> TrainResult:
    """for phase in plan: run it. A checkpoint at a phase's end holds the state of the phase
    that starts there, so that a resume rebuilds that phase's transform."""
    phases = loop.run.phases
    step = int(jax.device_get(st.step))
    results = []
    for i in range(experiment.phase_at(phases, step), len(phases)):
        phase, ran, t0 = phases[i], step < phases[i].end_step, time.time()
        after = phases[i + 1] if i + 1 < len(phases) else None
        st, val = run_phase(loop, phase, st, shardings, start_step=step, after=after)
        step = phase.end_step
        if i + 1 < len(phases):
            st, shardings = experiment.switch_phase(st, phases[i + 1], loop.run)
            log.info("step %d: phase %s starts", step, phases[i + 1].name)
        if ran:
            _save(loop, step, st, val, phase=phase)
        seconds = time.time() - t0 if ran else 0.0
        results.append(PhaseResult(phase.name, phase.start_step, phase.end_step, val, seconds))
    return TrainResult(st, results)


def run_phase(loop: Loop, phase, st, shardings, *, start_step: int, after=None):
    """Steps start_step..phase.end_step with their periodic actions, but the last save
    (train_phases makes it, after the hand-over); (state, the phase-end evaluation).
    `after`: the next phase, whose step compiles in the background meanwhile."""
    if phase.kind == "cached_probe":
        batches, evals = _cached_probe_inputs(loop, st, start_step=start_step)
    else:
        batches, evals = loop.images.at(start_step), Evals(loop.eval_fn, None)
    whole = _Whole(st, phase)
    train_step = _jit_train_step(loop.config, loop.run, phase, whole.part(shardings))
    ahead = loop.ahead.pop(phase.name, None)
    if ahead is not None:
        train_step = _StepAhead(ahead, train_step, whole.part(shardings), phase.name)
    st, pending, t0, first, val = whole.part(st), [], time.time(), start_step, None
    for step in range(start_step + 1, phase.end_step + 1):
        batch = next(batches)
        st, metrics = train_step(st, batch)
        if step == start_step + 1 and _compiles_ahead(phase, after, step):
            spec = _batch_spec(batch) if phase.kind == "train" else _image_batch_spec(loop.run)
            if spec is not None:
                loop.ahead[after.name] = _compile_ahead(loop, after, spec)
        pending.append(metrics)
        due = loop.every.due(step, phase_end=step == phase.end_step, kind=phase.kind)
        if due.log:
            scalars = _flush_train_metrics(
                pending,
                first_step=first,
                writer=loop.writer,
                t0=t0,
                n_images=len(pending) * loop.run.global_batch,
            )
            loop.progress.interval(step, phase=phase.name, scalars=scalars)
            pending, first = [], step
        val = _evaluate(loop, whole(st), step, phase, evals) if due.eval else None
        if due.save and step < phase.end_step:
            _save(loop, step, whole(st), val, phase=phase)
        if not pending:  # the interval after a flush times training only, not eval / saves
            t0 = time.time()
    if phase.kind == "cached_probe":
        batches.close()
    return whole(st), val


def _compiles_ahead(phase, after, step: int) -> bool:
    """The next phase's step compiles while this one trains when the next one reads images
    and this phase has steps left to hide the compilation behind: after a phase that reads
    images too (the batch's shapes and shardings are this phase's), or after a cached
    probe (its head steps leave the cores to the compiler)."""
    return (
        after is not None
        and after.kind == "train"
        and phase.kind in ("train", "cached_probe")
        and step < phase.end_step
    )


def _batch_spec(batch):
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), batch
    )


def _image_batch_spec(run: Run):
    """What a train batch of images will be on the device (global shapes, dtypes, the
    batch sharding), from this process's first host batch of the train split; None for a
    split that streams (one pipeline per run: not opened only to be looked at)."""
    split = run.datasets.train
    if getattr(split, "train_stream", None) is not None:
        return None
    host = next(iter(train_batches(split, run, start_step=0)))
    batch_sh, n = sharding.batch_sharding(run.mesh), jax.process_count()
    return jax.tree_util.tree_map(
        lambda v: jax.ShapeDtypeStruct((v.shape[0] * n, *v.shape[1:]), v.dtype, sharding=batch_sh),
        host,
    )


def _compile_ahead(loop: Loop, phase, spec) -> futures.Future:
    """The train step of `phase` lowered and compiled by XLA in a background thread (a
    fine-tuning step takes 10-25 s to compile on 2 CPU cores, minutes for large models on
    accelerators): (compiled step, the state shardings it was compiled for). Compilation is
    host work that runs beside the current phase's steps; a failure only means the phase
    compiles its step when it starts, as without this."""
    done: futures.Future = futures.Future()

    def work():
        try:
            t0 = time.time()
            abstract, shardings = experiment.abstract_state(loop.run, phase)
            fn = _jit_train_step(loop.config, loop.run, phase, shardings)
            compiled = fn.lower(abstract, spec).compile()
            log.info("phase %s: its step compiled in the background (%.1f s)", phase.name,
                     time.time() - t0)  # fmt: skip
            done.set_result((compiled, shardings))
        except Exception as e:  # noqa: BLE001 - reported where the phase starts
            done.set_exception(e)

    threading.Thread(target=work, name=f"compile-{phase.name}", daemon=True).start()
    return done


class _StepAhead:
    """The first call of a phase: its step compiled ahead (_compile_ahead) where it fits
    the state (the same shardings, shapes and dtypes), else the phase's own jitted step,
    which compiles then. Later calls go to whichever ran."""

    def __init__(self, ahead: futures.Future, jitted, shardings, name: str):
        self.ahead, self.jitted, self.shardings, self.name = ahead, jitted, shardings, name
        self.fn = None

    def __call__(self, st, batch):
        if self.fn is not None:
            return self.fn(st, batch)
        self.fn = self.jitted
        try:
            compiled, shardings = self.ahead.result()
        except Exception as e:  # noqa: BLE001
            log.warning("phase %s: compiling its step ahead failed (%s); compiling it now",
                        self.name, _short(e))  # fmt: skip
            return self.fn(st, batch)
        if shardings != self.shardings:
            log.debug("phase %s: the step compiled ahead has other shardings", self.name)
            return self.fn(st, batch)
        try:
            out = compiled(st, batch)
        except (TypeError, ValueError) as e:  # the arguments' avals differ: checked, not run
            log.debug("phase %s: the step compiled ahead does not fit (%s)", self.name, e)
            return self.fn(st, batch)
        self.fn = compiled
        return out


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


class _Whole:
    """A cached_probe phase steps the head's part of the train state alone
    (state.head_part): the backbone neither passes through its jitted step nor is compiled
    into it. Evaluations, saves and the phase's end see the whole state, put back
    together; a 'train' phase steps the whole state."""

    def __init__(self, st, phase):
        self.rest = st if phase.kind == "cached_probe" else None

    def part(self, tree):
        return tree if self.rest is None else state.head_part(tree)

    def __call__(self, part):
        return part if self.rest is None else state.with_head(self.rest, part)


class Evals(NamedTuple):
    """What a phase evaluates with: the eval function and its split (None: the eval split
    of images)."""

    fn: Callable
    split: object


def _cached_probe_inputs(loop: Loop, st, *, start_step: int):
    """The frozen backbone's features of the train and eval splits (loaded, or extracted
    once and saved), as batches from start_step on and as the head's evaluation. The
    feature splits batch as the image splits do (the same examples and epoch orders), so
    the head sees at each step what an in-loop probe without augmentation would."""
    feats = features.cached_features(loop.run, st, config=loop.config, cache_dir=loop.cache_dir)
    if feats.seconds:
        loop.writer.write_scalars(start_step, {"features/extract_seconds": feats.seconds})
    batches = data.prefetch_to_device(
        train_batches(feats.train, loop.run, start_step=start_step),
        2,
        sharding.batch_sharding(loop.run.mesh),
    )
    return batches, Evals(make_head_eval_fn(loop.run), feats.eval)


def _evaluate(loop: Loop, st, step: int, phase, evals: Evals) -> Scores:
    scores = evaluate_state(loop.config, evals.fn, st, loop.run, split=evals.split)
    loop.writer.write_scalars(step, scores.scalars(epoch=step / loop.run.steps_per_epoch))
    loop.progress.evaluated(
        step,
        phase=phase.name,
        top1=scores.raw.top1,
        loss=scores.raw.loss,
        ema_top1=None if scores.ema is None else scores.ema.top1,
        select_ema=loop.config.train.select_ema,
    )
    if loop.config.train.fewshot_shots and phase.kind == "train":
        _fewshot(loop, st, step)
    return scores


def _fewshot(loop: Loop, st, step: int) -> None:
    """train.fewshot_shots: k-shot ridge probes on the current backbone's features."""
    run, variables = loop.run, state.variables_of(st)
    loop.features_fn = loop.features_fn or features.make_features_fn(run)
    splits = (run.datasets.train, run.datasets.eval)
    (train_x, eval_x) = (features.extract(loop.features_fn, variables, s, run=run) for s in splits)
    results = fewshot.evaluate(
        train_x,
        features.labels_of(splits[0]),
        eval_x,
        features.labels_of(splits[1]),
        shots=tuple(loop.config.train.fewshot_shots),
        seeds=loop.config.train.fewshot_seeds,
        num_classes=run.spec.module.head.num_classes,
    )
    loop.writer.write_scalars(step, fewshot.scalars(results))
    log.info(
        "step %d few-shot top-1: %s",
        step,
        ", ".join(f"{r.shots}-shot {r.row()['top1']}" for r in results),
    )


def evaluate_state(config, eval_fn, st, run: Run, *, split=None) -> Scores:
    """The raw weights, and with optim.ema_decay > 0 their EMA, on one split."""
    raw = run_eval(eval_fn, st, run, split=split)
    if not config.optim.ema_decay:
        return Scores(raw, None)
    ema = experiment.ema_state(st, where="evaluation")
    return Scores(raw, run_eval(eval_fn, ema, run, split=split))


def _save(loop: Loop, step: int, st, val: Scores | None, *, phase) -> None:
    bn_train = phase.kind == "train" and loop.config.train.bn_mode == "train"
    check_finite_state(st, step, trainable=phase.trainable, bn_train=bn_train)
    loop.writer.flush()  # a remote metrics.jsonl is rewritten whole: up to this step
    metrics = val.scalars() if val else None
    loop.ckpt.save(step, st, metrics=metrics, data=data_position(loop.run, step))


def _state_is_finite(trees) -> bool:
    """Every float leaf finite. Arrays in this process's CPU memory are read in place by
    numpy: the jitted check compiles once per state structure (each phase's): 2.2 s on 2
    cores for Lite0's 448 leaves with Adam, then 6 ms, as long as the numpy pass. Elsewhere
    (accelerators, arrays spread over hosts) it runs where the state is."""
    leaves = [x for x in jax.tree_util.tree_leaves(trees) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if all(_in_host_memory(x) for x in leaves):
        return all(bool(np.isfinite(np.asarray(x)).all()) for x in leaves)
    return bool(jax.device_get(_device_state_is_finite(leaves)))


def _in_host_memory(x) -> bool:
    if not isinstance(x, jax.Array):
        return True
    return x.is_fully_addressable and all(d.platform == "cpu" for d in x.sharding.device_set)


@jax.jit
def _device_state_is_finite(leaves) -> jax.Array:
    if not leaves:
        return jnp.array(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def check_finite_state(st, step: int, *, trainable, bn_train: bool) -> None:
    """Before a save: finite losses and gradient norms can still give an overflowed update
    (or moments), which a resume would carry on from. Checked: what the phase's steps
    change (its trainable parameters, the optimizer state, the statistics when BatchNorm
    trains), not the frozen leaves, which a cached probe's head steps would otherwise
    compile a check of the whole model for."""
    flags, structure = jax.tree_util.tree_flatten(trainable)
    changed = [p for p, t in zip(structure.flatten_up_to(st.params), flags, strict=True) if t]
    trees = (changed, st.batch_stats if bn_train else {}, st.opt_state)
    if not _state_is_finite(trees):
        raise NonFiniteLossError(
            f"the train state (parameters, statistics or optimizer moments) is not finite "
            f"after step {step}; stopping without saving it. "
            "The checkpoints before it stay valid; lower the learning rate or enable "
            "optim.grad_clip_norm and resume"
        )


def train_batches(split, run: Run, *, start_step: int):
    """Host batches of a train split (images, or their cached features) from start_step on,
    epoch after epoch, without end. Resumed mid-epoch: an epoch's order depends only on
    (seed, epoch), so the reader starts at the step's batch and reads none before it."""
    return data.splits.train_batches(
        split,
        global_batch=run.global_batch,
        steps_per_epoch=run.steps_per_epoch,
        start_step=start_step,
    )


def data_position(run: Run, step: int) -> dict:
    """Where the train split's reader stands after `step` steps (saved with checkpoints)."""
    return data.splits.position(
        run.datasets.train,
        step=step,
        steps_per_epoch=run.steps_per_epoch,
        global_batch=run.global_batch,
    )


def _check_data_position(ckpt, run: Run, step: int) -> None:
    """A resumed run reads from the position saved with its checkpoint; it warns (in the
    log) when the data changed so that the position no longer means the same batches."""
    if step:
        data.splits.check_position(ckpt.data_position(step), data_position(run, step))


def _val_scalars(result, *, prefix: str = "val/", **extra) -> dict:
    scores = {"loss": result.loss, "top1": result.top1, "top5": result.top5}
    return {**{prefix + k: v for k, v in scores.items()}, **extra}


def final_test(config, run: Run, workdir: epath.Path, ckpt, eval_fn):
    """The test split (train/ + val/ + test/), evaluated once, on the best checkpoint by
    validation top-1: model selection never sees it; with train.select_ema, on its EMA
    weights, those that selected it. (name, step, result) or None."""
    if run.datasets.test is None:
        return None
    step = experiment.chosen_step(ckpt)
    st = experiment.restore(run, ckpt, step)
    if config.train.select_ema:
        st = experiment.ema_state(st, where="the test split")
    result = run_eval(eval_fn, st, run, split=run.datasets.test)
    name = split_dir_name(run.datasets.manifest["splits"]["test"], "test")
    if jax.process_index() == 0:
        evaluate.write_reports(
            result,
            out_dir=workdir / f"eval_{name}_step{step}",
            images=report_images(run.datasets.test),
            title=f"{config.model.name} step {step}, {name}",
        )
    log.info(
        "test split %s at step %d (best validation top-1): top-1 %.4f", name, step, result.top1
    )
    return name, step, result


def report_images(split):
    """The images the reports' grids show: the split's arrays (in memory or mapped), or,
    for a streamed split that holds none, a reader of one record at a time."""
    images = getattr(split, "images", None)
    if images is None and hasattr(split, "image"):
        return split.image
    return images


def split_dir_name(report: dict, default: str) -> str:
    """A folder-safe name of a split: the folder's name, or the TFDS split ('train[90%:]')."""
    folder = report.get("folder")
    text = epath.Path(folder).name if folder else report.get("split") or default
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or default


def _finish(config, run, workdir, scores, result: TrainResult, ckpt, wall, test, record) -> dict:
    vals = {p.name: p.val for p in result.phases}
    vals[run.phases[-1].name] = scores
    rows = _phase_rows(run, vals, {p.name: p.seconds for p in result.phases})
    history = metrics_io.read_history(workdir)
    final = scores.raw
    if jax.process_index() == 0:
        evaluate.write_reports(
            final,
            out_dir=workdir / "reports",
            images=report_images(run.datasets.eval),
            history=history,
            phase_switch_steps=[p.start_step for p in run.phases[1:]],
            title=config.model.name,
        )
    summary = {
        "final": {**_val_scalars(final), "errors": final.n_errors, "n": final.n},
        "final_ema": None if scores.ema is None else _scores(scores.ema),
        "select_ema": config.train.select_ema,
        "best": _metrics_at(history, experiment.chosen_step(ckpt)),
        "best_step": experiment.chosen_step(ckpt),
        "phases": rows,
        "test": None if test is None else {"split": test[0], "step": test[1], **_scores(test[2])},
        "steps": run.total_steps,
        "steps_per_epoch": run.steps_per_epoch,
        "wall_time_s": wall,
        "config_hash": experiment.config_hash(config),
        "model": config.model.name,
        "weights": config.weights.source,
        "preprocessing": json.loads(run.prep.to_json()),
        **_run_record(config, run, record),
    }
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(evaluate.format_table(rows + _test_rows(test), TABLE_COLUMNS))
    return summary


TABLE_COLUMNS = ("strategy", "accuracy", "top-5", "errors")


def _run_record(config, run: Run, record: dict) -> dict:
    """What tells the run apart from others (a sweep's points, tlflax compare): its seed,
    strategy and command line, and its data. wall_time_s and the phases' seconds are this
    process's: a run resumed at step N > 0 (resumed_at_step) took longer in all."""
    return {
        "seed": config.seed,
        "strategy": config.optim.strategy,
        "config_file": record.get("config_file"),
        "overrides": record.get("overrides", {}),
        "resumed_at_step": record["resumed_at_step"],
        "dataset": data.datasets.describe(run.datasets, config.data),
    }


def _write_hparams(writer, config, summary: dict) -> None:
    """TensorBoard's HParams tab: every config key, and the run's final metrics."""
    metrics = {
        "hparams/val_top1": summary["final"]["val/top1"],
        "hparams/val_loss": summary["final"]["val/loss"],
        "hparams/best_val_top1": summary["best"].get("val/top1", float("nan")),
        "hparams/wall_time_s": summary["wall_time_s"],
    }
    for row in summary["phases"]:
        if not row.get("ema"):
            metrics[f"hparams/{row['strategy']}/val_top1"] = row["val/top1"]
    if summary["test"]:
        metrics["hparams/test_top1"] = summary["test"]["top1"]
    hparams = {**config.to_dict(), "config_file": summary["config_file"] or ""}
    writer.write_hparams(hparams, metrics=metrics)


def _phase_rows(run: Run, vals: dict, seconds: dict) -> list[dict]:
    """One row per phase that this process evaluated: its end-of-phase evaluation and the
    wall time this process spent in it, and one more for its EMA weights."""
    rows = []
    for p in run.phases:
        scores = vals.get(p.name)
        if scores is None:
            continue
        row = {"strategy": p.name, "step": p.end_step, **_table_cells(scores.raw)}
        rows.append({**row, **scores.scalars(), "seconds": round(seconds.get(p.name, 0.0), 2)})
        if scores.ema is not None:
            ema = {"strategy": f"{p.name} (EMA)", "step": p.end_step, "ema": True}
            rows.append({**ema, **_table_cells(scores.ema), **_val_scalars(scores.ema)})
    return rows


def _test_rows(test) -> list[dict]:
    """The test split's row: a separate, final evaluation, shown but not one of the phases."""
    if test is None:
        return []
    name, step, result = test
    return [{"strategy": f"test: {name} (step {step})", **_table_cells(result)}]


def _table_cells(result) -> dict:
    return {
        "accuracy": f"{100 * result.top1:.2f} %",
        "top-5": f"{100 * result.top5:.2f} %",
        "errors": f"{result.n_errors}/{result.n}",
    }


def _scores(result) -> dict:
    return {
        "top1": result.top1,
        "top5": result.top5,
        "loss": result.loss,
        "errors": result.n_errors,
        "n": result.n,
    }


def _metrics_at(history, step) -> dict:
    """The validation metrics logged at `step` (the chosen checkpoint's)."""
    evals = [h for h in history if "val/top1" in h and h["step"] == step]
    if not evals:
        return {}
    keys = ["step"] + [f"val/{e}{m}" for e in ("", "ema_") for m in ("top1", "top5", "loss")]
    return {k: evals[-1][k] for k in keys if k in evals[-1]}
