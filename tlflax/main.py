"""The tlflax command line: train / eval / predict / inspect / export / config (`--help`).

tlflax train   --config CONFIG[:ARGS] --workdir DIR [--config.key=value ...]
tlflax eval    --workdir DIR [--split NAME] [--tta flip] [--ema] [--fewshot 1,5,10]
tlflax predict --workdir DIR IMAGE|FOLDER|GLOB [...] [--top_k 5] [--out FILE] [--tta flip] [--ema]
tlflax predict --model NAME [--weights SRC] IMAGE ...   (ImageNet classes, pretrained head)
tlflax models  [PATTERN]
tlflax inspect MODEL [--weights SRC] [--config CONFIG] [--num_classes N]
tlflax export  --workdir DIR [--format safetensors,jax] [--export_dir DIR] [--ema]
tlflax config  [--config CONFIG[:ARGS]] [--config.key=value ...]

CONFIG is a file (configs/X.py) or a built-in config's name (folder, demo, ...).
"""

from __future__ import annotations

import logging
import re
import sys
import traceback

from absl import flags
from ml_collections import config_flags

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
    "out", None, "predict: write the predictions to FILE (.csv or .json)", flag_values=FLAGS
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

COMMANDS = ("train", "eval", "predict", "inspect", "export", "config", "models")
HELP = ("--help", "-h", "-help", "help")


def _from_get_config(error: BaseException) -> BaseException | None:
    """The first error in the chain (error, its causes) raised through a get_config()."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if _where(error):
            return error
        error = error.__cause__ or error.__context__
    return None


def _where(error: BaseException) -> str:
    """' (file:line)' in the config file's get_config(), if the error passed through it."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.name == "get_config"]
    return f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _short(error: BaseException) -> str:
    while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError)
        error = error.args[0]
    text = str(error.args[0]) if error.args else str(error)
    # ml_collections lists every field of the section; its "Did you mean" line is the news.
    return re.sub(r' Other fields present: ".*?"(?=\nDid you mean|$)', "", text, flags=re.S)


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
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        # Raised while the config file's get_config() ran (absl wraps its ValueError and
        # TypeError in a flags.Error): a key that does not exist (the base config is
        # locked), a bad :ARGS value. Say where, without ml_collections' dump.
        # Otherwise a --config.x=y override that names no key, or a value of the wrong type.
        inner = _from_get_config(e)
        if inner is not None:
            _say(command, f"bad config{_where(inner)}: {_short(inner)}")
        elif isinstance(e, flags.Error):
            _say(command, e)
        else:
            _say(command, f"no such config key {_short(e)}")
        return None
    except OSError as e:
        _say(command, e)
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
