"""'/'-joined names of a pytree's leaves, and back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SEP = "/"


def flatten(tree: Mapping[str, Any], *, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {'a/b/c': leaf}. Only Mapping nodes are descended into."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{SEP}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=name))
        else:
            flat[name] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b/c': leaf} -> nested dicts (plain dicts)."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(SEP)
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"name {name!r} passes through a leaf at {part!r}")
        if leaf in node:
            raise ValueError(f"duplicate name {name!r}")
        node[leaf] = value
    return tree


def to_plain(tree: Any) -> Any:
    """FrozenDict / Mapping trees -> plain nested dicts (leaves untouched)."""
    if isinstance(tree, Mapping):
        return {k: to_plain(v) for k, v in tree.items()}
    return tree


def names(tree: Mapping[str, Any]) -> list[str]:
    return list(flatten(tree))
