"""The tlflax command line: train / eval / predict / inspect / export / config (`--help`).

tlflax train   --config CONFIG[:ARGS] --workdir DIR [--config.key=value ...]
tlflax eval    --workdir DIR [--split NAME] [--tta flip] [--ema] [--fewshot 1,5,10]
tlflax predict --workdir DIR IMAGE|FOLDER|GLOB [...] [--top_k 5] [--out FILE] [--tta flip] [--ema]
tlflax predict --model NAME [--weights SRC] IMAGE ...   (ImageNet classes, pretrained head)
tlflax models  [PATTERN]
tlflax inspect MODEL [--weights SRC] [--config CONFIG] [--num_classes N]
tlflax export  --workdir DIR [--format safetensors,jax] [--export_dir DIR] [--ema]
tlflax config  [--config CONFIG[:ARGS]] [--config.key=value ...]
tlflax sweep   --config CONFIG[:ARGS] --workdir ROOT [--set KEY=V1,V2 ...] [--zip KEY=V1,V2 ...]
               [--seeds N] [--executor local|slurm|print]
tlflax compare ROOT_OR_WORKDIR [...] [--by KEY ...] [--metric val/top1] [--out DIR]

CONFIG is a file (configs/X.py) or a built-in config's name (folder, demo, ...).
"""

from __future__ import annotations

import logging
import sys

from absl import flags
from ml_collections import config_flags

from tlflax import config_lib, host_malloc, xla_cache

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file (configs/X.py[:ARGS])", flag_values=FLAGS
)
flags.DEFINE_string(
    "workdir", None, "run directory (checkpoints, metrics, reports)", flag_values=FLAGS
)
flags.DEFINE_string(
    "split", None, "eval: which split ('' = the config's eval split)", flag_values=FLAGS
)
flags.DEFINE_string(
    "weights", None, "inspect, predict --model: pretrained weights source", flag_values=FLAGS
)
flags.DEFINE_string(
    "model",
    None,
    "predict: a model name; ImageNet classes from its pretrained 1000-class head, no workdir "
    "(--weights: its source, default the first of `tlflax models NAME` on this machine)",
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "num_classes", 1000, "inspect: head size when no config is given", flag_values=FLAGS
)
flags.DEFINE_integer("top_k", 5, "predict: classes shown per image", flag_values=FLAGS)
flags.DEFINE_string(
    "out",
    None,
    "predict: write the predictions to FILE (.csv or .json); compare: the folder of its table "
    "and charts (default: ROOT/compare of the first argument)",
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "tta",
    "",
    "predict / eval: test-time augmentation, 'flip' (+ mirror) or 'crops' (+ 4 corners and "
    "their mirrors); the probabilities are averaged",
    flag_values=FLAGS,
)
flags.DEFINE_integer("batch_size", 64, "predict: images per batch", flag_values=FLAGS)
flags.DEFINE_string(
    "format", "safetensors,jax", "export: comma-separated formats", flag_values=FLAGS
)
flags.DEFINE_string(
    "export_dir", None, "export: output folder (default WORKDIR/export[_ema])", flag_values=FLAGS
)
flags.DEFINE_string(
    "fewshot",
    None,
    "eval: k-shot ridge probes on the run's pooled features instead, e.g. 1,5,10,25",
    flag_values=FLAGS,
)
flags.DEFINE_integer("fewshot_seeds", 5, "eval --fewshot: draws per k", flag_values=FLAGS)
flags.DEFINE_bool(
    "ema", False, "eval, predict, export: the EMA weights (optim.ema_decay > 0)", flag_values=FLAGS
)

# ----------------------------------------------------------------------------- sweep, compare
flags.DEFINE_multi_string(
    "set",
    [],
    "sweep: KEY=V1,V2,... a config key (or args.KEY, a key of the config file's :ARGS) and its "
    "values; the grid is the product of every --set (one value: fixed for every point)",
    flag_values=FLAGS,
)
flags.DEFINE_multi_string(
    "zip",
    [],
    "sweep: KEY=V1,V2,... lists of one length taken together (point i: every key's i-th "
    "value), crossed with the --set product",
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "seeds", None, "sweep: repeat each point over config.seed = 0 .. N-1", flag_values=FLAGS
)
flags.DEFINE_enum(
    "executor",
    "local",
    ["local", "slurm", "print"],
    "sweep: local (each point a `tlflax train` subprocess, in turn), slurm (a job per point "
    "through submitit), print (the points' commands, nothing run)",
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "tpu",
    None,
    "sweep --executor print: a TPU VM's name; the commands become `launch/tpu_vm.sh run NAME ...`",
    flag_values=FLAGS,
)
flags.DEFINE_string("partition", None, "sweep --executor slurm: the partition", flag_values=FLAGS)
flags.DEFINE_integer(
    "nodes", None, "sweep --executor slurm: nodes per point (default 1)", flag_values=FLAGS
)
flags.DEFINE_integer(
    "gpus_per_node", None, "sweep --executor slurm: GPUs per node (default 0)", flag_values=FLAGS
)
flags.DEFINE_string(
    "time", None, "sweep --executor slurm: time limit per point, H:MM:SS (default 60 min)",
    flag_values=FLAGS,
)  # fmt: skip
flags.DEFINE_multi_string(
    "slurm",
    [],
    "sweep --executor slurm: more settings, KEY=VALUE,...: account, qos, constraint, "
    "cpus_per_task, mem_gb, per (gpu|node), tasks_per_node, port, array_parallelism, name; any "
    "other key is passed to sbatch (e.g. exclusive=true, reservation=R)",
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "slurm_folder",
    None,
    "sweep --executor slurm: submitit's logs and pickles (default ROOT/slurm; a shared folder)",
    flag_values=FLAGS,
)
flags.DEFINE_enum(
    "submitit",
    "slurm",
    ["slurm", "local"],
    "sweep --executor slurm: submitit's cluster; local runs the jobs as processes here (tests)",
    flag_values=FLAGS,
)
flags.DEFINE_bool(
    "wait",
    False,
    "sweep --executor slurm: wait for the jobs and record how each ended (submitit local: always)",
    flag_values=FLAGS,
)
flags.DEFINE_multi_string(
    "by",
    [],
    "compare: the keys whose values make a row (seeds pooled); default: every key that varies",
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "metric",
    "val/top1",
    "compare: the metric of the table and bar chart: val/top1 val/top5 val/loss (at the end "
    "of the run), best/val/top1 (the chosen checkpoint's), test/top1, wall_time_s",
    flag_values=FLAGS,
)

COMMANDS = ("train", "eval", "predict", "inspect", "export", "config", "models", "sweep", "compare")
HELP = ("--help", "-h", "-help", "help")


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def _quiet_expected_warnings() -> None:
    """orbax warns at every checkpoint saved without metrics; tlflax saves between
    evaluations on purpose (kept by recency, ranked only when they carry val/top1)."""
    absl = logging.getLogger("absl")
    if not any(isinstance(f, _DropMessages) for f in absl.filters):
        absl.addFilter(_DropMessages(("Requested `tracked_metric`; did not provide metrics",)))


def main(argv: list[str] | None = None) -> int:
    from tlflax import errors
    from tlflax import help as help_lib

    command_line = argv is None  # the `tlflax` command itself, not a call from Python
    if command_line:
        host_malloc.reexec_tuned()
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in HELP:
        print(help_lib.usage(), file=sys.stdout if len(argv) >= 2 else sys.stderr)
        return 0 if len(argv) >= 2 else 2
    if argv[1] not in COMMANDS:
        known = ", ".join(COMMANDS)
        print(f"tlflax: unknown command {argv[1]!r}; use one of {known} (tlflax --help)",
              file=sys.stderr)  # fmt: skip
        return 2
    command = argv.pop(1)
    if any(a in HELP[:3] for a in argv[1:]):
        print(help_lib.command_help(command, FLAGS))
        return 0
    try:
        argv = help_lib.with_builtin_configs(argv)
    except errors.UserError as e:
        _say(command, e)
        return 2
    # First: any logging call before it (absl's flag code makes some) would configure the
    # root logger at WARNING and make this a no-op. When something configured the root
    # logger already (an embedding program, a launcher), tlflax's own logger still says INFO.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("tlflax").setLevel(logging.INFO)
    for noisy in ("absl", "jax", "orbax"):  # orbax logs every save step by step at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _quiet_expected_warnings()
    # main() may run more than once in a process (tests, notebooks): start from the defaults,
    # also after a parse that failed half-way. (absl logs each reset at INFO; not news.)
    logging.disable(logging.INFO)
    FLAGS.unparse_flags()
    logging.disable(logging.NOTSET)
    parsed = _parse(command, argv)
    if parsed is None:
        return 2
    config, positional = parsed
    if command_line:
        xla_cache.enable()  # before anything compiles
    from tlflax import cli  # heavy imports (jax) only after the flags parse

    try:
        return getattr(cli, f"cmd_{command}")(FLAGS, config, positional)
    except errors.UserError as e:  # the message says what, why and what to do
        _say(command, e)
        return 2


def _parse(command: str, argv: list[str]):
    """(config, positional arguments), or None once it has said why the flags do not work."""
    # ml_collections reads the --config.x=y overrides from sys.argv, not from the list given
    # to FLAGS: an in-process call (tests, notebooks, launchers) must show it its own argv.
    saved, sys.argv = sys.argv, argv
    try:
        positional = FLAGS(argv)[1:]
        config = _CONFIG.value
        if config is not None:
            config.get("seed")  # a config file that could not be loaded raises on first use
    except config_lib.LOAD_ERRORS as e:
        _say(command, config_lib.load_error(e))
        return None
    finally:
        sys.argv = saved
    return config, positional


def _say(command: str, message) -> None:
    """A user error: one line on stderr, whatever line breaks the message had."""
    text = " ".join(str(message).split()) or type(message).__name__
    print(f"tlflax {command}: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
