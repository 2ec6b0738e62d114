"""The ImageNet-1k classes, shipped with the package: what a pretrained 1,000-class head's
outputs are (Keras' decode_predictions), in the standard order (sorted WordNet ids)."""

from __future__ import annotations

import collections
import functools
import pathlib

FILE = pathlib.Path(__file__).with_name("imagenet_classes.tsv")
N_CLASSES = 1000


@functools.cache
def classes() -> tuple[tuple[str, str], ...]:
    """(WordNet id, name) of each class index; the names are the first lemma of the synset,
    spaces as '_' ('tench', 'great_white_shark')."""
    rows = []
    for line in FILE.read_text().splitlines():
        if line and not line.startswith("#"):
            wnid, name = line.split("\t")
            rows.append((wnid, name))
    if len(rows) != N_CLASSES:
        raise RuntimeError(f"{FILE} lists {len(rows)} classes, not {N_CLASSES}: reinstall tlflax")
    return tuple(rows)


def labels() -> list[str]:
    """A printable, unique label per class: its name, with the WordNet id where two classes
    share a name ('crane (n02012849)' the bird, 'crane (n03126707)' the machine)."""
    counts = collections.Counter(name for _, name in classes())
    return [name if counts[name] == 1 else f"{name} ({wnid})" for wnid, name in classes()]
