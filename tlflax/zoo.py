"""`tlflax models [PATTERN]`: the registered models, their size and native resolution, where
their ImageNet weights come from, with which preprocessing, and which are on this machine.

Parameter counts come from tlflax/models/param_counts.json, which `python -m tlflax.zoo
--write-counts` writes from each model's own traced init (tests/test_zoo.py checks every
entry against it): tracing all of them takes about a minute on 2 CPU cores, too long for a
listing. A model missing from the file (one registered by a user) is traced when listed.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import json
import pathlib
import sys

import jax

from tlflax import evaluate
from tlflax.errors import UserError
from tlflax.models import common, create_model

COLUMNS = ("model", "family", "params", "resolution", "pretrained", "offline", "preprocessing")
_TEST_VARIANT = "(a test variant: no weights)"


def matching(pattern: str = "") -> list[str]:
    """Model names matching a glob ('resnet*') or containing a plain string ('vit')."""
    names = common.available()
    if not pattern:
        return names
    glob = any(ch in pattern for ch in "*?[")
    found = [n for n in names if (fnmatch.fnmatch(n, pattern) if glob else pattern in n)]
    if not found:
        close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise UserError(f"no model matches {pattern!r}{hint} (`tlflax models` lists them all)")
    return found


def is_test_variant(name: str) -> bool:
    """The families' small variants for tests (resnet_tiny, convnext_test, ...); convnext_tiny
    is a real model, listed with its weights before this is asked."""
    return name.endswith(("_tiny", "_test"))


COUNTS_FILE = pathlib.Path(__file__).parent / "models" / "param_counts.json"


def count_params(name: str) -> int:
    """The number of parameters of model `name` with a 1000-class head, at its native
    resolution, from its traced init (no arrays are allocated)."""
    spec = create_model(name, num_classes=1000)
    shapes = jax.eval_shape(lambda: spec.init(jax.random.key(0)))
    return sum(x.size for x in jax.tree_util.tree_leaves(shapes["params"]))


@functools.cache
def _shipped_counts() -> dict[str, int]:
    return json.loads(COUNTS_FILE.read_text()) if COUNTS_FILE.is_file() else {}


def params_of(name: str) -> int:
    return _shipped_counts().get(name) or count_params(name)


def write_counts() -> dict[str, int]:
    counts = {name: count_params(name) for name in common.available()}
    COUNTS_FILE.write_text(json.dumps(counts, indent=1, sort_keys=True) + "\n")
    return counts


def rows(pattern: str = "", *, cache_dir: str | None = None) -> list[dict]:
    """One row per (model, suggested weights source); a model's own columns on its first."""
    from tlflax.weights import sources

    out = []
    for name in matching(pattern):
        spec = create_model(name, num_classes=1000)
        n_params = params_of(name)
        model = {
            "model": name,
            "family": spec.family,
            "params": f"{n_params / 1e6:.1f}M",
            "resolution": spec.preprocessing.resolution,
        }
        suggested = sources.SUGGESTED.get(name, ())
        if not suggested:
            out.append({**model, "pretrained": _TEST_VARIANT if is_test_variant(name) else "-"})
        for i, source in enumerate(suggested):
            offline = sources.available_offline(source, cache_dir=cache_dir)
            out.append(
                {
                    **(model if i == 0 else {}),
                    "pretrained": source,
                    "offline": "yes" if offline else "no",
                    "preprocessing": _preprocessing(source, spec, offline, cache_dir),
                }
            )
    return out


def _preprocessing(source: str, spec, offline: bool, cache_dir) -> str:
    """What the weights carry (their metadata, read without the arrays) when they are here;
    else where it will come from."""
    from tlflax import weights

    if not offline:
        return "from its metadata, when downloaded"
    try:
        return weights.peek_preprocessing(source, spec=spec, cache_dir=cache_dir).short()
    except UserError as e:
        return f"unreadable: {e}"


def table(pattern: str = "", *, cache_dir: str | None = None) -> str:
    found = rows(pattern, cache_dir=cache_dir)
    here = sum(r.get("offline") == "yes" for r in found)
    note = (
        f"{len({r['model'] for r in found if 'model' in r})} models; {here} of the weights "
        "sources listed are on this machine (offline: yes). Use one with "
        "--config.weights.source=SOURCE (train) or --weights SOURCE (inspect, predict --model)."
    )
    return evaluate.format_table(found, COLUMNS) + "\n" + note


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-counts"]:
        sys.exit("usage: python -m tlflax.zoo --write-counts")
    print(f"{len(write_counts())} models counted into {COUNTS_FILE}")
