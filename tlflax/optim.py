"""Which parameters train, at which learning rate, with which optimizer.

`config.optim.groups` (written by hand, or by a strategy preset from the model's
stage_of / layer_of) is an ordered list of (regex, rule) pairs over '/'-joined
parameter names. The first rule whose regex FULLY matches a name owns that leaf; every
leaf needs an owner and every rule needs a leaf. A rule is None (frozen:
optax.set_to_zero, exact zero updates, no optimizer state) or a dict with keys from
RULE_DEFAULTS. Each rule is a group with its own label, its own transform in
optax.multi_transform and its own learning rate: lr * lr_mult under the phase's
schedule, or under the rule's schedule override.

A phase's transform, outermost first:
    accumulate            accum_steps > 1; sums the trainable leaves' gradients only
      clip_trainable      grad_clip_norm > 0; the global norm of the trainable leaves
      multi_transform     {group label: optimizer, 'frozen': set_to_zero}
      track_ema           ema_decay > 0; an EMA of the trainable weights, read by ema_params
Nothing reads a frozen leaf's gradient, so XLA drops the backward pass that only they need.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tlflax import schedules, tree
from tlflax.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
FINETUNES = ("full", "last_k")  # what phase 2 of two_phase may be
LR_DECAYS = ("none", "linear", "exponential", "layer_decay")
PROBES = ("in_loop", "cached")  # how a linear probe runs its frozen backbone
# A phase's kind: 'train' steps on images through the whole model; 'cached_probe' runs the
# frozen backbone once over the data (tlflax/features.py) and steps the head on the features.
PHASE_KINDS = ("train", "cached_probe")
FROZEN = "frozen"  # the label of every frozen leaf
# The keys a group rule dict may have, and their values when it leaves them out. `schedule`
# is a schedule name or a dict of config.optim schedule keys (schedules.KEYS) to override.
RULE_DEFAULTS = {"lr_mult": 1.0, "wd_mult": 1.0, "schedule": None, "name": ""}
RESET_NOTE = "optimizer state is reset at this switch: newly trainable leaves start fresh"
CARRY_NOTE = "optimizer state carried over at this switch for the groups whose rule is unchanged"


@dataclasses.dataclass(frozen=True)
class Phase:
    """One optimisation phase, over global steps [start_step, end_step)."""

    name: str
    start_step: int
    end_step: int
    tx: optax.GradientTransformation  # over the whole params tree
    labels: Any  # params-shaped tree of group labels (FROZEN for frozen leaves)
    trainable: Any  # params-shaped tree of Python bools
    lr_fns: dict[str, Callable]  # group label -> fn(global step) -> learning rate
    table: str  # which rule took which leaves, for the run log and `tlflax inspect`
    kind: str = "train"  # one of PHASE_KINDS
    # At the switch into this phase: the group labels whose optimizer state (moments, update
    # count) is carried over from the previous phase, and the leaves whose EMA is.
    carried: tuple[str, ...] = ()
    carried_ema: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Rule:
    index: int
    regex: str
    label: str  # FROZEN for a frozen rule
    lr_mult: float = 0.0
    wd_mult: float = 0.0
    schedule: Mapping | None = None  # overrides of config.optim's schedule keys

    @property
    def frozen(self) -> bool:
        return self.label == FROZEN


# ----------------------------------------------------------------------------- config


def validate(c) -> None:
    """Every check that needs the config only; make_phases adds those that need the model."""
    _check_choice("name", c.name, OPTIMIZERS)
    _check_choice("strategy", c.strategy, tuple(STRATEGY_PLANS))
    _check_choice("lr_decay", c.lr_decay, LR_DECAYS)
    _check_choice("finetune", c.finetune, FINETUNES)
    _check_choice("finetune_optimizer", c.finetune_optimizer, ("",) + OPTIMIZERS)
    _check_choice("schedule", c.schedule, schedules.SCHEDULES)
    _check_choice("probe", c.probe, PROBES)
    if c.probe == "cached" and c.strategy not in ("linear_probe", "two_phase"):
        raise ConfigError(
            f"config.optim.probe='cached' caches the frozen backbone's features for a linear "
            f"probe, but strategy={c.strategy!r} has none; use strategy 'linear_probe' or "
            "'two_phase' (or kind='cached_probe' in a hand-written phase)"
        )
    for key in ("groups", "phases"):
        if c.strategy and c[key]:
            raise ConfigError(
                f"config.optim.strategy={c.strategy!r} writes the phases and groups, but "
                f"config.optim.{key} is set too; set strategy='' to use your {key}, or clear it"
            )
    if not c.strategy and c.groups and c.phases:
        raise ConfigError(
            "config.optim.groups and config.optim.phases are both set; give one phase's "
            "groups, or a plan of phases each with its own groups"
        )
    if not c.strategy and not c.phases:
        parse_rules(c.groups)
    _check_range("lr", c.lr, lo=0, lo_open=True)
    _check_range("finetune_lr", c.finetune_lr, lo=0, lo_open=True)
    _check_range("weight_decay", c.weight_decay, lo=0)
    _check_range("grad_clip_norm", c.grad_clip_norm, lo=0)
    _check_range("momentum", c.momentum, lo=0, hi=1)
    _check_range("rms_momentum", c.rms_momentum, lo=0, hi=1)
    _check_range("ema_decay", c.ema_decay, lo=0, hi=1)
    _check_range("lr_floor_mult", c.lr_floor_mult, lo=0, hi=1, lo_open=True, hi_open=False)
    _check_range("layer_decay", c.layer_decay, lo=0, hi=1, lo_open=True, hi_open=False)
    _check_range("stage_divisor", c.stage_divisor, lo=1)
    _check_range("k", c.k, lo=0)
    _check_range("unfreeze_steps", c.unfreeze_steps, lo=0)
    _check_range("unfreeze_epochs", c.unfreeze_epochs, lo=0)
    if int(c.accum_steps) != c.accum_steps or c.accum_steps < 1:
        raise ConfigError(f"config.optim.accum_steps must be an integer >= 1, got {c.accum_steps}")
    if c.moment_dtype and not jnp.issubdtype(jnp.dtype(c.moment_dtype), jnp.floating):
        raise ConfigError(f"config.optim.moment_dtype={c.moment_dtype!r} is not a float dtype")
    for pattern in c.no_decay:
        _compile(pattern, where="config.optim.no_decay")
    # The plan's own checks (durations, phase dicts); rules need the model (check_groups).
    specs = plan_phases(c, train_config=None)
    if int(c.probe_views) != c.probe_views or c.probe_views < 1:
        raise ConfigError(f"config.optim.probe_views must be an integer >= 1, got {c.probe_views}")
    if c.probe_views > 1 and not any(s.kind == "cached_probe" for s in specs):
        raise ConfigError(
            f"config.optim.probe_views={c.probe_views} caches augmented views for a cached "
            "probe, but this plan has none; set optim.probe='cached' (or a phase of kind "
            "'cached_probe'), or probe_views=1"
        )


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        shown = ", ".join(repr(x) for x in choices)
        raise ConfigError(f"config.optim.{key}={value!r} is unknown; use one of {shown}")


def _check_range(key, value, *, lo, hi=math.inf, lo_open=False, hi_open=True) -> None:
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not (ok and math.isfinite(value)):
        span = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ConfigError(f"config.optim.{key}={value!r} must lie in {span}")


def _compile(pattern, *, where: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as e:
        raise ConfigError(f"{where}: {pattern!r} is not a regex ({e})") from None


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class PhaseSpec:
    """One phase as a strategy plans it, before the model or the data are known.

    rules: a preset of strategy_groups ('linear_probe', 'last_k', 'full', 'gradual'; `k`
    stages for the last two, -1: config.optim.k) or (regex, rule) pairs; the duration is
    `steps`, else `epochs` (bound to steps once the data's size is); with `until_end` those
    are the run's length and the phase lasts from its start to there. `carry`: at the switch
    into this phase, groups whose rule does not change keep their optimizer state.
    """

    name: str
    rules: str | tuple
    optimizer: str
    lr: float
    lr_decay: str = "none"
    steps: int = 0
    epochs: float = 0.0
    where: str = "config.train"  # the keys that set the duration, for errors
    kind: str = "train"  # one of PHASE_KINDS
    k: int = -1
    carry: bool = True
    until_end: bool = False

    def bind(self, steps_per_epoch: int) -> int:
        """The duration in steps (>= 1)."""
        n = int(self.steps) or (max(1, round(self.epochs * steps_per_epoch)) if self.epochs else 0)
        if n < 1:
            raise ConfigError(
                f"{self.where}: phase {self.name} has no duration (steps={self.steps}, "
                f"epochs={self.epochs}); train for at least one step"
            )
        return n


def _probe_kind(c) -> str:
    return "cached_probe" if c.probe == "cached" else "train"


def _one_phase(strategy: str):
    def plan(c, train_config) -> list[PhaseSpec]:
        steps, epochs = _run_length(train_config)
        kind = _probe_kind(c) if strategy == "linear_probe" else "train"
        return [PhaseSpec(strategy, strategy, c.name, c.lr, c.lr_decay, steps, epochs, kind=kind)]

    return plan


def _run_length(train_config) -> tuple[int, float]:
    # train.steps > 0 overrides train.epochs; train_config None: checks only (no durations).
    if train_config is None:
        return 1, 0.0
    return (int(train_config.steps), 0.0) if train_config.steps else (0, train_config.epochs)


def _two_phase(c, train_config) -> list[PhaseSpec]:
    lengths = {}
    for what in ("probe", "finetune"):
        lengths[what] = (c[f"{what}_steps"], c[f"{what}_epochs"])
        if schedules.steps_of(c, what, steps_per_epoch=1, where="config.optim") < 1:
            raise ConfigError(
                f"config.optim.strategy='two_phase' needs {what}_epochs or {what}_steps > 0 "
                "(seeds: probe_epochs=16, finetune_epochs=8)"
            )
    where = "config.optim.{}_steps / _epochs"
    return [
        PhaseSpec(
            "linear_probe",
            "linear_probe",
            c.name,
            c.lr,
            "none",
            *lengths["probe"],
            where=where.format("probe"),
            kind=_probe_kind(c),
        ),
        PhaseSpec(
            "finetune",
            c.finetune,
            c.finetune_optimizer or c.name,
            c.finetune_lr,
            c.lr_decay,
            *lengths["finetune"],
            where=where.format("finetune"),
            carry=bool(c.carry_moments),
        ),
    ]


def _gradual(c, train_config) -> list[PhaseSpec]:
    """fastai / ULMFiT's gradual unfreezing: the head alone, then one more stage from the top
    every unfreeze_steps / _epochs, up to the last k stages, which train to the run's end.
    Each stage is its own group, so the groups trained before a switch keep their moments."""
    if c.k < 1:
        raise ConfigError("config.optim.strategy='gradual' needs k >= 1 (stages to unfreeze)")
    every = (int(c.unfreeze_steps), float(c.unfreeze_epochs))
    if not any(every) or all(every):
        raise ConfigError(
            "config.optim.strategy='gradual' needs one of unfreeze_steps or unfreeze_epochs "
            f"> 0 (the time between two unfreezings), got {every[0]} and {every[1]}"
        )
    common = dict(optimizer=c.name, lr=c.lr, lr_decay=c.lr_decay, carry=bool(c.carry_moments))
    where = "config.optim.unfreeze_steps / _epochs"
    specs = [
        PhaseSpec(
            f"unfreeze{j}", "gradual", steps=every[0], epochs=every[1], where=where, k=j, **common
        )
        for j in range(int(c.k))
    ]
    steps, epochs = _run_length(train_config)
    end = f"unfreeze{int(c.k)}"
    last = PhaseSpec(
        end,
        "gradual",
        steps=steps,
        epochs=epochs,
        where="config.train.steps / epochs",
        k=int(c.k),
        until_end=True,
        **common,
    )
    return [*specs, last]


PHASE_KEYS = {
    "name": "",
    "groups": (),
    "steps": 0,
    "epochs": 0.0,
    "lr": 0.0,
    "optimizer": "",
    "kind": "train",
    "carry": None,  # None: config.optim.carry_moments
}


def _by_hand(c, train_config) -> list[PhaseSpec]:
    """strategy '': one phase of `groups` for the run's length, or the `phases` plan."""
    if not c.phases:
        steps, epochs = _run_length(train_config)
        return [PhaseSpec("custom", tuple(c.groups), c.name, c.lr, "none", steps, epochs)]
    specs = []
    for i, phase in enumerate(c.phases):
        where = f"config.optim.phases[{i}]"
        if not isinstance(phase, Mapping) or set(phase) - set(PHASE_KEYS):
            raise ConfigError(f"{where} = {phase!r}: give a dict with keys from {list(PHASE_KEYS)}")
        p = {**PHASE_KEYS, **phase}
        parse_rules(p["groups"], where=f"{where}.groups")
        if p["optimizer"]:
            _check_choice("name", p["optimizer"], OPTIMIZERS)
        _check_choice(f"phases[{i}].kind", p["kind"], PHASE_KINDS)
        if p["steps"] and p["epochs"]:
            raise ConfigError(f"{where}: both steps and epochs are set; give one")
        name = p["name"] or f"phase{i}"
        if name in [s.name for s in specs]:
            raise ConfigError(f"{where}: phase name {name!r} is used twice")
        lr = p["lr"] or c.lr
        spec = PhaseSpec(
            name,
            tuple(p["groups"]),
            p["optimizer"] or c.name,
            lr,
            "none",
            int(p["steps"]),
            float(p["epochs"]),
            where=where,
            kind=p["kind"],
            carry=bool(c.carry_moments if p["carry"] is None else p["carry"]),
        )
        spec.bind(1)  # a duration must be given
        specs.append(spec)
    return specs


# A strategy is one entry: config.optim (and config.train, for one-phase runs' length) ->
# the phases, in order. A run's length is the sum of its phases'.
STRATEGY_PLANS: dict[str, Callable[..., list[PhaseSpec]]] = {
    "": _by_hand,
    "linear_probe": _one_phase("linear_probe"),
    "last_k": _one_phase("last_k"),
    "full": _one_phase("full"),
    "two_phase": _two_phase,
    "gradual": _gradual,
}
STRATEGIES = tuple(k for k in STRATEGY_PLANS if k)


def plan_phases(c, *, train_config) -> list[PhaseSpec]:
    """The strategy's phases (rules still unresolved, durations unbound)."""
    _check_choice("strategy", c.strategy, tuple(STRATEGY_PLANS))
    return STRATEGY_PLANS[c.strategy](c, train_config)


def total_steps(optim_config, *, steps_per_epoch: int, train_config) -> int:
    """The run's length: the sum of its phases' durations."""
    validate(optim_config)
    specs = plan_phases(optim_config, train_config=train_config)
    return bind_phases(specs, steps_per_epoch)[-1][1]


def bind_phases(specs: list[PhaseSpec], spe: int, *, check_only: bool = False) -> list[tuple]:
    """[start, end) of each phase in steps, back to back from 0. check_only: no run length
    is known yet (config.train absent), so an `until_end` phase gets one step."""
    bounds, start = [], 0
    for spec in specs:
        end = spec.bind(spe) if spec.until_end else start + spec.bind(spe)
        if spec.until_end and end <= start:
            if not check_only:
                raise ConfigError(
                    f"{spec.where}: the run ends at step {end}, before its last phase "
                    f"{spec.name} starts at step {start}; train longer, or unfreeze sooner"
                )
            end = start + 1
        bounds.append((start, end))
        start = end
    return bounds


# ----------------------------------------------------------------------------- rules


def parse_rules(groups, *, where: str = "config.optim.groups") -> list[Rule]:
    """(regex, rule) pairs -> Rules, each checked (a regex, lr_mult > 0, known keys)."""
    if not groups:
        raise ConfigError(
            f"{where} is empty: give (regex, rule) pairs, e.g. (('head/.*', {{}}), "
            "('.*', None)), or set config.optim.strategy"
        )
    rules, labels = [], set()
    for i, pair in enumerate(groups):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], str):
            raise ConfigError(f"{where}[{i}] = {pair!r} is not a (regex, rule) pair")
        _compile(pair[0], where=f"{where}[{i}]")
        rule = Rule(i, pair[0], FROZEN) if pair[1] is None else _parse_rule(i, *pair, where=where)
        if not rule.frozen and rule.label in labels:
            raise ConfigError(f"{where}[{i}]: group name {rule.label!r} is used twice")
        labels.add(rule.label)
        rules.append(rule)
    return rules


def _parse_rule(i: int, regex: str, rule, *, where: str) -> Rule:
    where = f"{where}[{i}] ({regex!r})"
    if not isinstance(rule, Mapping):
        raise ConfigError(f"{where}: the rule must be None (frozen) or a dict, got {rule!r}")
    unknown = sorted(set(rule) - set(RULE_DEFAULTS))
    if unknown:
        raise ConfigError(f"{where}: unknown rule key(s) {unknown}; known: {list(RULE_DEFAULTS)}")
    r = {**RULE_DEFAULTS, **rule}
    if not (isinstance(r["lr_mult"], (int, float)) and 0 < r["lr_mult"] < math.inf):
        raise ConfigError(
            f"{where}: lr_mult={r['lr_mult']!r} must be > 0; to freeze these leaves "
            "make the rule None"
        )
    if not (isinstance(r["wd_mult"], (int, float)) and 0 <= r["wd_mult"] < math.inf):
        raise ConfigError(f"{where}: wd_mult={r['wd_mult']!r} must be >= 0")
    sched = r["schedule"]
    if isinstance(sched, str):
        sched = {"schedule": sched}
    if sched is not None:
        if not isinstance(sched, Mapping) or set(sched) - set(schedules.KEYS):
            raise ConfigError(
                f"{where}: schedule={sched!r} must be a schedule name or a dict with keys "
                f"from {schedules.KEYS}"
            )
        kind = sched.get("schedule", schedules.SCHEDULES[0])
        _check_choice("schedule", kind, schedules.SCHEDULES)
    label = r["name"] or f"rule{i}"
    if label == FROZEN:
        raise ConfigError(f"{where}: the name {FROZEN!r} is reserved for frozen rules (None)")
    return Rule(i, regex, label, float(r["lr_mult"]), float(r["wd_mult"]), sched)


def assign(rules: list[Rule], names: list[str], *, where: str) -> dict[str, Rule]:
    """name -> the first rule whose regex fully matches it; every name and rule used."""
    patterns = [re.compile(r.regex) for r in rules]
    owner, unmatched = {}, []
    for name in names:
        found = next((r for r, p in zip(rules, patterns, strict=True) if p.fullmatch(name)), None)
        if found is None:
            unmatched.append(name)
        else:
            owner[name] = found
    if unmatched:
        more = f" (and {len(unmatched) - 1} more, e.g. {unmatched[1:4]})" if unmatched[1:] else ""
        raise ConfigError(
            f"{where}: no rule matches {unmatched[0]}{more}; add a rule for it or a final "
            "('.*', ...) rule (None to freeze the rest)"
        )
    used = {r.index for r in owner.values()}
    for rule, pattern in zip(rules, patterns, strict=True):
        if rule.index not in used:
            hits = [n for n in names if pattern.fullmatch(n)]
            why = "matches no parameter" if not hits else "only matches leaves earlier rules own"
            example = f", e.g. {hits[0]}" if hits else f"; names look like {names[0]}"
            raise ConfigError(
                f"{where}[{rule.index}]: regex {rule.regex!r} {why}{example}; fix or remove it"
            )
    return owner


# ----------------------------------------------------------------------------- presets


def strategy_groups(
    strategy: str, c, *, spec, names: list[str], lr_decay: str, k: int | None = None
) -> tuple:
    """The (regex, rule) pairs of a preset, for this model's parameter names; `k` (default
    config.optim.k): the stages below the head that train for last_k and gradual."""
    k = c.k if k is None else k
    if strategy in ("last_k", "gradual") and c.k > spec.n_stages:
        raise ConfigError(
            f"config.optim.k={c.k} but {spec.name} has {spec.n_stages} stages below the head "
            f"(0 = stem ... {spec.n_stages - 1}); use k <= {spec.n_stages}"
        )
    first = {"linear_probe": spec.n_stages, "full": 0}.get(strategy, spec.n_stages - k)
    decay = "none" if strategy == "linear_probe" else lr_decay
    # gradual: every stage is a group of its own, even without lr decay, so that the groups
    # trained before an unfreezing keep their optimizer state (and update count) after it.
    decay = "stage" if strategy == "gradual" and decay == "none" else decay
    by_group: dict[tuple, list[str]] = {}
    frozen = []
    for name in names:
        if spec.stage_of(name) < first:
            frozen.append(name)
        else:
            by_group.setdefault(_group_of(name, c, spec=spec, decay=decay), []).append(name)
    plain = {"linear_probe": "head", "last_k": "trainable", "full": "all"}.get(strategy, "")
    groups = []
    for (_, label, mult), members in sorted(by_group.items()):
        rule = {"name": label or plain, "lr_mult": mult}
        groups.append((cover_regex(set(members), names), rule))
    if frozen:
        groups.append((".*", None))
    return tuple(groups)


def _group_of(name: str, c, *, spec, decay: str) -> tuple[int, str, float]:
    """(depth, label, lr_mult) of a trainable leaf under a discriminative-lr rule."""
    if decay == "none":
        return 0, "", 1.0
    if decay in ("exponential", "stage"):
        stage = spec.stage_of(name)
        label = "head" if stage == spec.n_stages else f"stage{stage}"
        mult = c.stage_divisor ** -(spec.n_stages - stage) if decay == "exponential" else 1.0
        return stage, label, float(mult)
    layer, top = spec.layer_of(name), spec.n_layers
    label = "head" if layer == top else f"layer{layer:02d}"
    if decay == "linear":  # lr_floor_mult at layer 0 up to 1 at the head
        return layer, label, float(c.lr_floor_mult + (1 - c.lr_floor_mult) * layer / top)
    return layer, label, float(c.layer_decay ** (top - layer))


def cover_regex(group: set[str], names: list[str], prefix: tuple = ()) -> str:
    """A regex that fully matches exactly `group` among `names`, by whole subtrees."""
    depth = len(prefix)
    under = [n for n in names if tuple(n.split("/")[:depth]) == prefix]
    hits = [n for n in under if n in group]
    if not hits:
        return ""
    if len(hits) == len(under):
        if under == ["/".join(prefix)]:
            return re.escape(under[0])
        return re.escape("/".join(prefix)) + "/.*" if prefix else ".*"
    children = dict.fromkeys(n.split("/")[depth] for n in under if len(n.split("/")) > depth)
    parts = [cover_regex(group, under, prefix + (child,)) for child in children]
    return "|".join(p for p in parts if p)


# ----------------------------------------------------------------------------- phases


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A PhaseSpec with its rules resolved for the model and its steps bound."""

    name: str
    start: int
    end: int
    groups: tuple
    optimizer: str
    lr: float
    kind: str = "train"
    carry: bool = True


def make_phases(optim_config, *, train_config, params, spec, steps_per_epoch: int) -> list[Phase]:
    """The run's phases, back to back from step 0; `params` may be ShapeDtypeStructs.

    At a switch the trainer builds the next phase's state with `tx.init(params)`, then puts
    back the state of the groups in `Phase.carried` (carry_state).
    """
    c = optim_config
    plans = _plans(c, train_config=train_config, spec=spec, params=params, spe=steps_per_epoch)
    names = tree.names(params)
    phases, before, origins = [], {}, {}
    for plan in plans:
        now = _signatures(c, plan, names)
        carried = tuple(g for g, sig in now.items() if plan.carry and before.get(g) == sig)
        # A carried group's optimizer keeps counting its updates from where it started.
        origins = {g: origins[g] if g in carried else plan.start for g in now}
        prev = phases[-1] if phases else None
        phases.append(
            _build_phase(
                c,
                plan,
                params=params,
                spe=steps_per_epoch,
                prev=prev,
                origins=origins,
                carried=carried,
            )
        )
        before = now
    return phases


def _signatures(c, plan: _Plan, names: list[str]) -> dict[str, tuple]:
    """group label -> what must not change for its optimizer state to carry over: its
    leaves, optimizer, peak learning rate, weight-decay multiplier and schedule override."""
    _, rules, owner = _owners(c, plan.name, plan.groups, names)
    sigs = {}
    for rule in rules:
        members = frozenset(n for n, r in owner.items() if r is rule)
        if members and not rule.frozen:
            peak = plan.lr * rule.lr_mult
            sigs[rule.label] = (members, plan.optimizer, peak, rule.wd_mult, repr(rule.schedule))
    return sigs


def check_groups(optim_config, *, params, spec) -> None:
    """make_phases' checks that need the model but not the data (its size sets the phase
    lengths): the trainer runs them before it loads the data, so that a bad strategy, k or
    rule fails in seconds, not after the images are decoded."""
    _plans(optim_config, train_config=None, spec=spec, params=params, spe=1)


def _plans(c, *, train_config, spec, params, spe: int) -> list[_Plan]:
    """Rules resolved once per phase (a preset becomes this model's groups), every phase's
    owners checked, then the durations bound back to back."""
    validate(c)
    names = tree.names(params)
    specs = plan_phases(c, train_config=train_config)
    plans = []
    for phase, (start, end) in zip(
        specs, bind_phases(specs, spe, check_only=train_config is None), strict=True
    ):
        groups = phase.rules
        if isinstance(groups, str):
            k = c.k if phase.k < 0 else phase.k
            groups = strategy_groups(
                groups, c, spec=spec, names=names, lr_decay=phase.lr_decay, k=k
            )
        where, _, owner = _owners(c, phase.name, groups, names)
        if phase.kind == "cached_probe":
            _check_head_only(where, phase.name, owner, spec)
        plans.append(
            _Plan(
                phase.name,
                start,
                end,
                tuple(groups),
                phase.optimizer,
                phase.lr,
                phase.kind,
                phase.carry,
            )
        )
    return plans


def _owners(c, name: str, groups, names) -> tuple[str, list[Rule], dict[str, Rule]]:
    """(where, rules, leaf name -> its rule) of one phase's groups; at least one trains."""
    where = "config.optim.groups" if not (c.strategy or c.phases) else f"phase {name}: groups"
    rules = parse_rules(groups, where=where)
    owner = assign(rules, names, where=where)
    if all(r.frozen for r in owner.values()):
        raise ConfigError(f"{where}: every parameter is frozen; nothing would train")
    return where, rules, owner


def _check_head_only(where: str, name: str, owner: dict[str, Rule], spec) -> None:
    """A cached probe steps the head on fixed features: nothing else may train."""
    moving = [n for n, rule in owner.items() if not rule.frozen and not spec.head_is(n)]
    if moving:
        raise ConfigError(
            f"{where}: phase {name} is a cached probe (the backbone runs once, frozen), but "
            f"its groups train {moving[0]}"
            + (f" and {len(moving) - 1} more" if moving[1:] else "")
            + "; freeze everything but head/, or make it a 'train' phase"
        )


def _build_phase(c, plan: _Plan, *, params, spe: int, prev, origins, carried) -> Phase:
    if plan.end <= plan.start:
        raise ConfigError(f"phase {plan.name}: steps {plan.start}..{plan.end} is empty")
    names = tree.names(params)
    where, rules, owner = _owners(c, plan.name, plan.groups, names)
    labels = tree.unflatten({n: owner[n].label for n in names})
    trainable = tree.unflatten({n: not owner[n].frozen for n in names})
    used = [r for r in rules if any(o is r for o in owner.values())]
    txs, lr_fns, scheds = _group_transforms(c, plan, used, spe=spe, where=where, origins=origins)
    tx = _wrap(c, optax.multi_transform(txs, labels), trainable=trainable)
    carried_ema = ()
    if prev is not None and plan.carry and c.ema_decay:
        was = tree.flatten(prev.trainable)
        carried_ema = tuple(n for n in names if was[n] and not owner[n].frozen)
    switch = "" if prev is None else CARRY_NOTE if carried else RESET_NOTE
    table = groups_table(c, rules, owner, params, plan=plan, scheds=scheds, switch=switch)
    if carried:
        table += f" ({', '.join(carried)}); the others start fresh"
    if carried_ema:
        table += f"\nthe EMA of the {len(carried_ema)} leaves trainable before carries over"
    if plan.kind == "cached_probe":
        table += (
            "\ncached probe: the frozen backbone runs once over the train and eval splits "
            "(eval crop, BatchNorm in inference mode, no augmentation); the head trains on "
            "its cached features"
        )
    return Phase(
        plan.name,
        plan.start,
        plan.end,
        tx,
        labels,
        trainable,
        lr_fns,
        table,
        plan.kind,
        carried,
        carried_ema,
    )


def _group_transforms(c, plan: _Plan, used, *, spe: int, where: str, origins: dict):
    """({label: optimizer}, {label: lr_fn}, {label: schedule}) of a phase's groups."""
    txs, lr_fns, scheds = {}, {}, {}
    for rule in used:
        if rule.frozen:
            txs[FROZEN] = optax.set_to_zero()
            continue
        values = {**{k: c[k] for k in schedules.KEYS}, **(rule.schedule or {})}
        sched = schedules.resolve(
            values,
            steps_per_epoch=spe,
            length=plan.end - plan.start,
            where=f"{where}[{rule.index}] schedule",
        )
        lr_fn = schedules.make_lr_fn(sched, peak_lr=plan.lr * rule.lr_mult, start_step=plan.start)
        lr_fns[rule.label], scheds[rule.label] = lr_fn, sched
        origin = origins.get(rule.label, plan.start)
        at_update = _lr_at_update(lr_fn, start=origin, every=c.accum_steps)
        txs[rule.label] = optimizer(plan.optimizer, c, lr_fn=at_update, wd_mult=rule.wd_mult)
    return txs, lr_fns, scheds


def _lr_at_update(lr_fn, *, start: int, every: int):
    # The optimizer counts its updates from 0 at `start`, one per `every` batches: its phase's
    # start, or for a group carried over, the start of the phase it first trained in. The
    # schedule is a function of the trainer's global step.
    return lambda count: lr_fn(start + count * every)


def _wrap(c, inner, *, trainable) -> optax.GradientTransformation:
    parts = [inner]
    if c.grad_clip_norm:
        parts.insert(0, clip_trainable(c.grad_clip_norm, trainable=trainable))
    if c.ema_decay:
        parts.append(track_ema(c.ema_decay, trainable=trainable))
    tx = optax.chain(*parts)
    if c.accum_steps > 1:
        tx = accumulate(tx, every=int(c.accum_steps), trainable=trainable)
    return tx


# ----------------------------------------------------------------------------- optimizers


def optimizer(name: str, c, *, lr_fn: Callable, wd_mult: float = 1.0):
    """One group's optimizer; lr_fn maps the group's update count to its learning rate.

    Weight decay (c.weight_decay * wd_mult) is decoupled for adamw (p -= lr * wd * p) and an
    L2 term added to the gradient for the others (PyTorch's `weight_decay`); decay_mask picks
    the leaves it applies to.
    """
    _check_choice("name", name, OPTIMIZERS)
    mu_dtype = jnp.dtype(c.moment_dtype) if c.moment_dtype else None
    wd = c.weight_decay * wd_mult
    decay = [optax.add_decayed_weights(wd, mask=decay_mask(c))] if wd else []
    step = optax.scale_by_learning_rate(lr_fn)
    if name == "sgd":
        momentum = c.momentum and optax.trace(c.momentum, c.nesterov, accumulator_dtype=mu_dtype)
        return optax.chain(*decay, *([momentum] if momentum else []), step)
    if name == "rmsprop":  # Keras: eps outside the square root, momentum after the scaling
        rms = optax.scale_by_rms(decay=c.rms_decay, eps=c.eps, eps_in_sqrt=False)
        momentum = c.rms_momentum and optax.trace(
            c.rms_momentum, c.nesterov, accumulator_dtype=mu_dtype
        )
        return optax.chain(*decay, rms, *([momentum] if momentum else []), step)
    adam = optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps, mu_dtype=mu_dtype)
    if name == "adam":
        return optax.chain(*decay, adam, step)
    return optax.chain(adam, *decay, step)


def decay_mask(c) -> Callable:
    """params -> bool tree: decay leaves of 2+ dims (all, with decay_1d) not in no_decay."""
    patterns = [re.compile(p) for p in c.no_decay]
    decay_1d = bool(c.decay_1d)

    def decide(path, leaf) -> bool:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if any(p.fullmatch(name) for p in patterns):
            return False
        return decay_1d or np.ndim(leaf) > 1

    return lambda params: jax.tree_util.tree_map_with_path(decide, params)


def trainable_global_norm(grads, trainable) -> jax.Array:
    """Global L2 norm over the trainable leaves only (float32), so frozen ones stay dead code."""
    # Up to trainable's leaves: a frozen entry of grads may be a subtree (optax.MaskedNode).
    flags, structure = jax.tree_util.tree_flatten(trainable)
    pairs = zip(structure.flatten_up_to(grads), flags, strict=True)
    squares = [jnp.sum(jnp.square(g.astype(jnp.float32))) for g, t in pairs if t]
    return jnp.sqrt(sum(squares)) if squares else jnp.zeros((), jnp.float32)


def clip_trainable(max_norm: float, *, trainable) -> optax.GradientTransformation:
    """clip_by_global_norm with the norm over the trainable leaves; frozen ones pass as given."""

    def update_fn(updates, state, params=None):
        del params
        norm = trainable_global_norm(updates, trainable)
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        clipped = jax.tree_util.tree_map(
            lambda t, g: (g * scale).astype(g.dtype) if t else g, trainable, updates
        )
        return clipped, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _picker(trainable) -> Callable:
    """tree -> the nested dict of its trainable leaves only (what accumulators store)."""
    names = [n for n, t in tree.flatten(trainable).items() if t]

    def pick(full):
        flat = tree.flatten(full)
        return tree.unflatten({n: flat[n] for n in names})

    return pick


class AccumulateState(NamedTuple):
    mini_step: jax.Array  # int32: batches summed into `acc` since the last update
    acc: Any  # summed gradients of the trainable leaves (frozen leaves are absent)
    inner: Any  # the wrapped transform's state


def accumulate(inner, *, every: int, trainable) -> optax.GradientTransformation:
    """optax.MultiSteps over the trainable leaves only: one update of the mean gradient of
    `every` batches (zero updates in between); frozen leaves get no accumulator."""
    pick = _picker(trainable)

    def init_fn(params):
        acc = jax.tree_util.tree_map(jnp.zeros_like, pick(params))
        return AccumulateState(jnp.zeros((), jnp.int32), acc, inner.init(params))

    def update_fn(updates, state, params=None):
        acc = jax.tree_util.tree_map(lambda a, g: a + g.astype(a.dtype), state.acc, pick(updates))

        def apply(_):
            flat, means = tree.flatten(updates), tree.flatten(acc)
            # Frozen leaves get constant zeros, so their gradients stay dead code.
            grads = {
                n: (means[n] / every).astype(g.dtype) if n in means else jnp.zeros_like(g)
                for n, g in flat.items()
            }
            new_updates, inner_state = inner.update(tree.unflatten(grads), state.inner, params)
            zeros = jax.tree_util.tree_map(jnp.zeros_like, acc)
            return new_updates, AccumulateState(jnp.zeros((), jnp.int32), zeros, inner_state)

        def wait(_):
            zeros = jax.tree_util.tree_map(jnp.zeros_like, updates)
            return zeros, AccumulateState(state.mini_step + 1, acc, state.inner)

        return jax.lax.cond(state.mini_step + 1 >= every, apply, wait, None)

    return optax.GradientTransformation(init_fn, update_fn)


class EmaState(NamedTuple):
    ema: Any  # EMA of the trainable weights (frozen leaves are their own average: absent)


def track_ema(decay: float, *, trainable) -> optax.GradientTransformation:
    """Keeps ema = decay * ema + (1 - decay) * new params, from the initial params; the
    updates pass unchanged. Read it with ema_params(params, opt_state)."""
    pick = _picker(trainable)

    def init_fn(params):
        return EmaState(jax.tree_util.tree_map(lambda p: jnp.array(p, copy=True), pick(params)))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ConfigError("track_ema needs params: call tx.update(grads, state, params)")
        new = jax.tree_util.tree_map(lambda p, u: p + u, pick(params), pick(updates))
        ema = jax.tree_util.tree_map(
            lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), state.ema, new
        )
        return updates, EmaState(ema)

    return optax.GradientTransformation(init_fn, update_fn)


def ema_params(params, opt_state):
    """params with each trainable leaf replaced by its EMA; None when ema_decay is 0."""
    is_ema = lambda x: isinstance(x, EmaState)
    found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_ema) if is_ema(s)]
    if not found:
        return None
    flat = tree.flatten(params)
    flat.update(tree.flatten(found[0].ema))
    return tree.unflatten(flat)


def carry_state(old, new, *, carried, carried_ema):
    """The next phase's fresh optimizer state `new`, with the state of the groups in `carried`
    (their moments and update counts: multi_transform's inner_states[label]) and the EMA of
    the leaves in `carried_ema` taken from the previous phase's state `old`; each taken leaf
    placed like the fresh one it replaces."""
    if not carried and not carried_ema:
        return new
    groups, ema = set(carried), set(carried_ema)
    before = {
        jax.tree_util.keystr(path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(old)[0]
    }
    leaves, structure = jax.tree_util.tree_flatten_with_path(new)
    out = []
    for path, leaf in leaves:
        key = jax.tree_util.keystr(path)
        if key in before and _carries(path, groups, ema):
            kept = before[key]
            if np.shape(kept) != np.shape(leaf) or kept.dtype != leaf.dtype:
                raise ValueError(
                    f"optimizer state {key}: {kept.shape} cannot carry to {leaf.shape}"
                )
            sharding = getattr(leaf, "sharding", None)
            leaf = jax.device_put(kept, sharding) if sharding is not None else kept
        out.append(leaf)
    return jax.tree_util.tree_unflatten(structure, out)


def _carries(path, groups: set, ema: set) -> bool:
    names = [getattr(k, "name", None) for k in path]
    if "inner_states" in names:  # multi_transform's {label: state}
        i = names.index("inner_states")
        return i + 1 < len(path) and getattr(path[i + 1], "key", None) in groups
    if "ema" in names:  # EmaState.ema: the trainable leaves by name
        rest = path[names.index("ema") + 1 :]
        return "/".join(str(getattr(k, "key", k)) for k in rest) in ema
    return False


# ----------------------------------------------------------------------------- table


def groups_table(c, rules, owner, params, *, plan: _Plan, scheds: dict, switch: str) -> str:
    """One row per rule: regex, group, leaves and parameters taken, multipliers, schedule."""
    sizes = {n: int(np.prod(np.shape(x))) for n, x in tree.flatten(params).items()}
    header = "# regex group leaves params lr_mult wd_mult peak_lr schedule".split()
    rows = []
    for rule in rules:
        taken = [n for n, r in owner.items() if r is rule]
        regex = rule.regex if len(rule.regex) <= 48 else rule.regex[:45] + "..."
        row = [str(rule.index), regex, rule.label, str(len(taken))]
        row.append(f"{sum(sizes[n] for n in taken):,}")
        if rule.frozen:
            row += ["-", "-", "-", "frozen"]
        else:
            peak = plan.lr * rule.lr_mult
            row += [f"{rule.lr_mult:.4g}", f"{rule.wd_mult:g}", f"{peak:.3g}"]
            row.append(scheds[rule.label].describe())
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    n_train = sum(sizes[n] for n, r in owner.items() if not r.frozen)
    n_all = max(sum(sizes.values()), 1)
    lines.append(
        f"optimizer {plan.optimizer}, lr {plan.lr:g}, weight decay {c.weight_decay:g}, "
        f"steps {plan.start}..{plan.end}; trainable "
        f"{n_train:,} of {n_all:,} parameters ({100 * n_train / n_all:.2f} %)"
    )
    left = (plan.end - plan.start) % c.accum_steps
    if left:
        lines.append(
            f"accum_steps={c.accum_steps}: the last {left} batch(es) of this phase make no "
            "update (its length is not a multiple of accum_steps)"
        )
    if switch:
        lines.append(switch)
    return "\n".join(lines)
