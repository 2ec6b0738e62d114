"""The model contract every family follows, and the registry of named models.

A model is `Classifier(backbone, head)`: parameters `{'backbone': ..., 'head': ...}`,
BatchNorm statistics (if any) under `batch_stats/backbone/...`.
A backbone's `__call__(x, *, train, bn_train)` maps normalised NHWC images to pooled
features (B, D); `train` switches dropout / stochastic depth, `bn_train` switches
BatchNorm between batch statistics (and updating `batch_stats`) and running averages.
The two are independent: fine-tuning usually trains with BatchNorm frozen.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tlflax import preprocessing as pp
from tlflax import tree
from tlflax.errors import ConfigError
from tlflax.models.heads import Head


class Classifier(nn.Module):
    backbone: nn.Module
    head: nn.Module

    def __call__(self, x, *, train: bool = False, bn_train: bool = False):
        return self.head(self.features(x, train=train, bn_train=bn_train), train=train)

    def features(self, x, *, train: bool = False, bn_train: bool = False):
        return self.backbone(x, train=train, bn_train=bn_train)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A built model and what the rest of tlflax needs to know about it.

    stage_of / layer_of map a '/'-joined parameter name (starting with 'backbone/'
    or 'head/') to its depth, for 'last k stages' freezing and layer-wise learning
    rates: stage 0 / layer 0 is the input end (stem, patch embedding); the head is
    stage n_stages / layer n_layers, one past the backbone's last.
    """

    name: str
    family: str
    module: Classifier
    preprocessing: pp.Preprocessing  # the family's usual one; pretrained weights bring their own
    n_stages: int
    stage_of: Callable[[str], int]
    n_layers: int
    layer_of: Callable[[str], int]
    feature_dim: int  # at the native resolution
    arch: dict[str, Any] = dataclasses.field(default_factory=dict)  # the family's hyperparameters
    # resolution -> feature size, where it depends on it (a flattened feature map)
    feature_dim_at: Callable[[int], int] | None = None

    def features_at(self, resolution: int | None) -> int:
        if resolution is None or self.feature_dim_at is None:
            return self.feature_dim
        return self.feature_dim_at(resolution)

    def init(self, rng: jax.Array, resolution: int | None = None, batch: int = 1):
        """Initial variables {'params': ..., ['batch_stats': ...]} (plain dicts)."""
        size = resolution or self.preprocessing.resolution
        x = jnp.zeros((batch, size, size, 3), jnp.float32)
        variables = jax.jit(lambda r: self.module.init(r, x, train=False))(rng)
        return tree.to_plain(variables)

    def init_head(self, rng: jax.Array, resolution: int | None = None, batch: int = 1):
        """The head's initial variables alone, equal to init(rng, resolution)'s head (linen
        derives a submodule's rng from its path, not from what ran before it), without
        tracing or compiling the backbone: what a pretrained run needs fresh."""
        feats = jnp.zeros((batch, self.features_at(resolution)), jnp.float32)
        variables = jax.jit(lambda r: self.module.init(r, feats, method=_head_only))(rng)
        return tree.to_plain(variables)

    def fill_init(self, rng: jax.Array, variables: dict, resolution: int | None = None):
        """`variables` with every abstract leaf (jax.ShapeDtypeStruct: what pretrained
        weights left to the fresh init, as weights.reinit) at init(rng)'s value; only the
        head is initialised when only the head is abstract."""
        flat = tree.flatten(variables)
        todo = [n for n, v in flat.items() if isinstance(v, jax.ShapeDtypeStruct)]
        if not todo:
            return variables
        only_head = all(n.split("/", 2)[1] == "head" for n in todo)
        fresh = tree.flatten(
            self.init_head(rng, resolution) if only_head else self.init(rng, resolution)
        )
        return tree.unflatten({n: fresh[n] if n in todo else v for n, v in flat.items()})

    def head_is(self, name: str) -> bool:
        return name.startswith("head/")


def _head_only(module: Classifier, feats):
    return module.head(feats, train=False)


# name -> builder(head=Head, dtype=..., remat=bool, **overrides) -> ModelSpec
_REGISTRY: dict[str, Callable[..., ModelSpec]] = {}


def register(name: str):
    def wrap(builder):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = builder
        return builder

    return wrap


def available() -> list[str]:
    _import_families()
    return sorted(_REGISTRY)


def create_model(
    name: str,
    *,
    num_classes: int,
    head_hidden: int = 0,
    head_dropout: float = 0.0,
    dtype: Any = jnp.float32,
    remat: bool = False,
    **overrides,
) -> ModelSpec:
    """Build a registered model with a new `num_classes` head (zero-initialised).

    `overrides` change the family's hyperparameters (depth, width, pooling,
    drop rates ...); each family rejects names it does not know. `remat`: every block (a
    VGG's stage) recomputes its activations in the backward pass (layers.block_call):
    the same numbers and variables, less memory for one more forward pass of compute.
    """
    _import_families()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, sorted(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ConfigError(
            f"unknown model {name!r} (config.model.name); {hint}available: "
            f"{', '.join(sorted(_REGISTRY))} (`tlflax models` describes them)"
        )
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    head = Head(num_classes=num_classes, hidden=head_hidden, dropout=head_dropout, dtype=dtype)
    return _REGISTRY[name](head=head, dtype=dtype, remat=remat, **overrides)


def check_overrides(family: str, overrides: dict, allowed) -> None:
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ConfigError(f"{family}: unknown model option(s) {unknown}; known: {sorted(allowed)}")


_NOT_FAMILIES = frozenset({"common", "heads", "layers"})


def _import_families():
    """Families register themselves on import: every module of tlflax.models but the shared
    ones, imported lazily to keep this module a leaf (a new family is one new file)."""
    import importlib
    import pkgutil

    from tlflax import models

    for found in pkgutil.iter_modules(models.__path__):
        if found.name not in _NOT_FAMILIES:
            importlib.import_module(f"tlflax.models.{found.name}")
