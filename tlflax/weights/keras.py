"""Keras weight files -> {'<layer>/<weight>': numpy array}, read with h5py (no Keras, no TF).

Formats, recognised from the content (the suffix only routes the file here: .h5 .hdf5 .keras):
  Keras 2 / tf.keras .h5   `model.save('x.h5')`: the layers under `model_weights/`, the model
                           as JSON in the root attribute `model_config`; `save_weights('x.h5')`:
                           the layers at the root. The group holding them lists them in its
                           attribute `layer_names`; each layer's group lists its arrays, in
                           Keras' order, in the attribute `weight_names` ('block1_conv1/
                           kernel:0'), each a dataset at that path inside the layer's group.
                           keras.applications' files are of this kind, some written by Keras 1
                           ('block1_conv1_W_1:0': names Keras itself ignores, loading by
                           position). Keras 3 still writes it for `model.save('x.h5')`.
  Keras 3 .weights.h5      `save_weights`: each saved object's arrays at its attribute path,
                           `<path>/vars/0, 1, ...` in Keras' order; a Functional or Sequential
                           model's layers at `layers/<class in snake case, numbered in model
                           order: conv2d, conv2d_1, ...>`, a nested model's again under its
                           own `layers/`. The `vars` group's attribute `name` is the layer's
                           name; older Keras 3 files have none (config.json, when there is
                           one, gives it from the paths).
                           `optimizer/` and metric state are not layers: not read.
  Keras 3 .keras           `model.save('x.keras')`: a zip of config.json (the model: each
                           layer's class and options), metadata.json and model.weights.h5 (the
                           layout above). Saved with weights_format='npz': refused, saying so.

Keys: '<layer>/<weight>'.
  layer   the layer's Keras name ('block1_conv1'); in a nested model the layer's own name,
          the outer models' names prefixed ('vgg16/block1_conv1') only where two layers share
          a name. A Keras 3 file that names no layer (and no config.json beside it): the
          layer's path in the file, e.g. 'layers/conv2d_3' (see `by_order`).
  weight  Keras' own name: kernel, bias, gamma, beta, moving_mean, moving_variance,
          depthwise_kernel, pointwise_kernel, mean, variance, count, ... (KINDS). From the
          file's weight names where Keras 2 wrote usable ones; else from the layer's class
          where the file tells it (config.json, model_config, or a Keras 3 path such as
          'layers/batch_normalization_2'), with its options (use_bias, center, scale); else
          'vars/<i>', the i-th array in Keras' order, for the converter to name. A
          DepthwiseConv2D's kernel is 'depthwise_kernel' (Keras 2's name; Keras 3 calls it
          'kernel').

The interface converters use (tlflax/weights/convert_<family>.py; load_pretrained gives them
`read(path)`'s dict, through readers.read):
  KINDS                  Keras class -> its weight names in Keras' saving order (all options on)
  weight_names(kind, n, config=None) -> tuple of n names for a layer of that kind
                         (`kind` may be the names themselves); ValueError when n does not fit
  name_vars(state, kind_of) -> state with every '<layer>/vars/<i>' group named by
                         `kind_of(layer)` (a Mapping or callable: a KINDS class, or the names
                         themselves, or None to leave the layer as it is, for the merge to list)
  by_order(state, order, container='layers') -> state with the Keras 3 paths of a file that
                         names no layer ('layers/conv2d_3/kernel') renamed from the
                         converter's model order: order = {'conv2d': ['block1_conv1', ...]}
  named_state(state, order, kind_of) -> by_order then name_vars, refused where the file
                         names no layer and its count of layers per class is not `order`'s
  read_layers(path) -> list[Layer]   the layers before they become keys (class, config, arrays)
  read(path) -> dict     the flat dict above
A converter calls `by_order` then `name_vars` on the state it is given, and maps the names:
    state = keras.name_vars(keras.by_order(state, ORDER), KIND_OF)
or, where the order must be the file's whole layout, keras.named_state(state, ORDER, KIND_OF).
A damaged, truncated or non-Keras file is a CorruptCheckpointError naming the file.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from tlflax.weights.merge import CheckpointMismatchError
from tlflax.weights.readers import CorruptCheckpointError

_KERNEL_BIAS = ("kernel", "bias")
# Keras class -> its weights in Keras' saving order (trainable, then non-trainable), every
# option on. The same order in Keras 1, 2 and 3.
KINDS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        (
            "Dense",
            "Conv1D",
            "Conv2D",
            "Conv3D",
            "Conv1DTranspose",
            "Conv2DTranspose",
            "Conv3DTranspose",
        ),
        _KERNEL_BIAS,
    ),  # fmt: skip
    "DepthwiseConv1D": ("depthwise_kernel", "bias"),
    "DepthwiseConv2D": ("depthwise_kernel", "bias"),
    "SeparableConv1D": ("depthwise_kernel", "pointwise_kernel", "bias"),
    "SeparableConv2D": ("depthwise_kernel", "pointwise_kernel", "bias"),
    "BatchNormalization": ("gamma", "beta", "moving_mean", "moving_variance"),
    "LayerNormalization": ("gamma", "beta"),
    "GroupNormalization": ("gamma", "beta"),
    "Normalization": ("mean", "variance", "count"),  # adapted; given mean / variance: none
    "Embedding": ("embeddings",),
    "PReLU": ("alpha",),
}
# A weight an option of the layer's config removes (use_bias=False: no bias).
_OPTION_OF = {"bias": "use_bias", "gamma": "scale", "beta": "center"}
_KNOWN = frozenset(n for names in KINDS.values() for n in names) | {"kernel"}
_DEPTHWISE = ("DepthwiseConv1D", "DepthwiseConv2D")
_CONTAINERS = ("layers", "_layer_checkpoint_dependencies")  # the latter: tf.keras 2.13
_VARS_KEY = re.compile(r"(.+)/vars/(\d+)")


@dataclasses.dataclass
class Layer:
    """One layer's arrays as the file holds them."""

    path: tuple[str, ...]  # its name, after the names of the models it is nested in; or
    #                        (the file path,) when the file names no layer
    arrays: list[np.ndarray]  # in Keras' order
    names: tuple[str, ...] | None = None  # the file's weight names (last part, ':0' dropped)
    kind: str | None = None  # Keras class name, where the file tells it
    config: dict = dataclasses.field(default_factory=dict)  # its options, where known

    def weight_names(self) -> tuple[str, ...] | None:
        """Keras' names of the arrays: the file's, else from the class; None if neither."""
        n = len(self.arrays)
        if self.names and len(set(self.names)) == n and set(self.names) <= _KNOWN:
            if self.kind in _DEPTHWISE:
                return tuple("depthwise_kernel" if w == "kernel" else w for w in self.names)
            return self.names
        if self.kind in KINDS:
            try:
                return weight_names(self.kind, n, self.config)
            except ValueError:
                return None  # the converter's kind, or the merge, says what does not fit
        return None


def weight_names(
    kind: str | Sequence[str], n: int, config: Mapping | None = None
) -> tuple[str, ...]:
    """The names of a `kind` layer's n arrays, in Keras' order. `config` (the layer's options:
    use_bias, center, scale) settles which optional weights it has; without it, n must leave
    one possibility (a BatchNormalization with 3 arrays does not: center or scale is off)."""
    if not isinstance(kind, str):
        names = tuple(kind)
        if len(names) != n:
            raise ValueError(f"{n} arrays, but {len(names)} weight names given: {names}")
        return names
    if kind not in KINDS:
        raise ValueError(
            f"unknown Keras layer class {kind!r}; known: {', '.join(sorted(KINDS))} "
            "(or give the weight names themselves)"
        )
    full = KINDS[kind]
    if config:
        names = tuple(w for w in full if config.get(_OPTION_OF.get(w, ""), True) is not False)
        if len(names) == n:
            return names
    optional = [w for w in full if w in _OPTION_OF]
    fits = {
        tuple(w for w in full if w not in dropped)
        for dropped in _subsets(optional)
        if len(full) - len(dropped) == n
    }
    if len(fits) == 1:
        return fits.pop()
    expected = f"{len(full)} ({', '.join(full)})"
    why = f"which of {', '.join(optional)} it lacks is ambiguous" if fits else "no option fits"
    raise ValueError(f"a {kind} layer with {n} arrays: expected {expected}; {why}")


def _subsets(items: list[str]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = [()]
    for item in items:
        out += [s + (item,) for s in out]
    return out


def name_vars(
    state: dict[str, np.ndarray],
    kind_of: Mapping[str, str | Sequence[str] | None] | Callable[[str], object],
) -> dict[str, np.ndarray]:
    """Names the arrays the file left unnamed ('<layer>/vars/<i>') from the converter's
    knowledge of each layer: kind_of(layer) is a KINDS class, the weight names themselves,
    or None (the layer's keys are kept as they are: the merge lists them). Other keys pass."""
    lookup = kind_of if callable(kind_of) else kind_of.get
    out: dict[str, np.ndarray] = {}
    groups: dict[str, dict[int, np.ndarray]] = {}
    for key, value in state.items():
        m = _VARS_KEY.fullmatch(key)
        if m:
            groups.setdefault(m[1], {})[int(m[2])] = value
        else:
            out[key] = value
    for layer, arrays in groups.items():
        kind = lookup(layer)
        if kind is None or sorted(arrays) != list(range(len(arrays))):
            out.update({f"{layer}/vars/{i}": a for i, a in arrays.items()})
            continue
        try:
            names = weight_names(kind, len(arrays))
        except ValueError as e:
            raise CheckpointMismatchError(f"Keras layer {layer!r}: {e}") from e
        out.update({f"{layer}/{name}": arrays[i] for i, name in enumerate(names)})
    return out


def by_order(
    state: dict[str, np.ndarray], order: Mapping[str, Sequence[str]], *, container: str = "layers"
) -> dict[str, np.ndarray]:
    """Keys of a Keras 3 file that names no layer, '<container>/<class>[_<k>]/<weight>', ->
    '<order[class][k]>/<weight>': Keras numbers each class's layers in the model's layer
    order (conv2d, conv2d_1, ...), so a converter that knows that order gives it, e.g.
    {'conv2d': ['block1_conv1', ...], 'dense': ['fc1', 'fc2', 'predictions']}. Keys elsewhere
    (another container, a number past the list) pass unchanged."""
    pattern = re.compile(re.escape(container) + r"/([a-z0-9_]+?)(?:_(\d+))?/(.+)")
    out = {}
    for key, value in state.items():
        m = pattern.fullmatch(key)
        names = order.get(m[1], ()) if m else ()
        k = int(m[2] or 0) if m else 0
        if m and k < len(names) and "/" not in m[3].removeprefix("vars/"):
            key = f"{names[k]}/{m[3]}"
        out[key] = value
    return out


def named_state(
    state: dict[str, np.ndarray],
    order: Mapping[str, Sequence[str]],
    kind_of: Mapping[str, str | Sequence[str] | None] | Callable[[str], object],
    *,
    model: str = "this model",
    hint: str = "",
) -> dict[str, np.ndarray]:
    """`name_vars(by_order(state, order), kind_of)`, where a file that names no layer must
    hold as many layers of each class as `order` lists (else the order would misplace
    them): a CheckpointMismatchError otherwise, naming `model` and what to build (`hint`).
    Such a file without Dense layers is one saved without its top (the classifier)."""
    counts = _unnamed_counts(state, order)
    if any(counts.values()):
        want = {c: len(order[c]) for c in order}
        if "dense" in want and not counts["dense"]:
            want["dense"] = 0  # a file without the top
        if counts != want:
            build = f"the model the file was saved from{f' ({hint})' if hint else ''}"
            raise CheckpointMismatchError(
                f"the Keras file names no layers (Keras 3 before it stored them), so tlflax "
                f"names them by their order in the model, which needs the file's layout: it "
                f"holds {counts} layers, {model} {want}; build {build}, or save the file again "
                "with a recent Keras"
            )
    return name_vars(by_order(state, order), kind_of)


def _unnamed_counts(state, classes) -> dict[str, int]:
    """How many layers of each class a Keras 3 file that names no layer holds."""
    found: dict[str, set[str]] = {c: set() for c in classes}
    for key in state:
        m = re.match(r"layers/([a-z0-9_]+?)(?:_\d+)?/", key)
        if m and m[1] in found:
            found[m[1]].add(m[0])
    return {c: len(v) for c, v in found.items()}


def read(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """The file's arrays under '<layer>/<weight>' keys (see the module docstring)."""
    path = pathlib.Path(path)
    layers = read_layers(path)
    return _flatten(layers, path)


def read_layers(path: str | pathlib.Path) -> list[Layer]:
    """The file's layers that hold arrays, in the file's order."""
    import h5py

    path = pathlib.Path(path)
    try:
        if zipfile.is_zipfile(path):
            return _read_archive(path)
        with h5py.File(path, "r") as f:
            return _read_h5(f, path, config=None)
    except CorruptCheckpointError:
        raise
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile, RuntimeError) as e:
        raise CorruptCheckpointError(
            f"{path} could not be read as a Keras weights file ({type(e).__name__}: {e}); "
            "it is probably truncated or corrupt: download or copy it again"
        ) from e


def _read_archive(path: pathlib.Path) -> list[Layer]:
    import h5py

    with zipfile.ZipFile(path) as zf:
        members = set(zf.namelist())
        if "model.weights.npz" in members:
            raise CorruptCheckpointError(
                f"{path}: a .keras file saved with weights_format='npz'; tlflax reads the "
                "default h5 weights: save it again with model.save(path)"
            )
        if "model.weights.h5" not in members:
            raise CorruptCheckpointError(
                f"{path} is a zip without model.weights.h5 (it holds {sorted(members)[:5]}): "
                "not a Keras 3 .keras file"
            )
        config = json.loads(zf.read("config.json")) if "config.json" in members else None
        data = zf.read("model.weights.h5")
    with h5py.File(io.BytesIO(data), "r") as f:
        return _read_h5(f, path, config=config)


def _read_h5(f, path: pathlib.Path, *, config: dict | None) -> list[Layer]:
    if _attr_list(f, "layer_names") is not None:
        return _keras2_layers(f, config=_json_attr(f, "model_config"))
    if "model_weights" in f and _attr_list(f["model_weights"], "layer_names") is not None:
        return _keras2_layers(f["model_weights"], config=_json_attr(f, "model_config"))
    if any(name in f for name in (*_CONTAINERS, "vars")):
        return _keras3_layers(f, config=config)
    raise CorruptCheckpointError(
        f"{path} is an HDF5 file but not a Keras weights file (no 'layer_names' attribute, "
        f"'model_weights' or 'layers' group; top level: {sorted(f)[:5]}); tlflax reads Keras "
        "2 .h5 (model.save / save_weights), Keras 3 .weights.h5 and .keras files"
    )


def _text(value) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _attr_list(obj, name: str) -> list[str] | None:
    """A list attribute as Keras writes it: whole, or in chunks name0, name1, ... when it
    is over HDF5's 64 KB attribute limit; None when absent."""
    if name in obj.attrs:
        chunks = [obj.attrs[name]]
    else:
        chunks, i = [], 0
        while f"{name}{i}" in obj.attrs:
            chunks.append(obj.attrs[f"{name}{i}"])
            i += 1
        if not chunks:
            return None
    # An empty list is written as an empty float64 array.
    return [_text(v) for chunk in chunks for v in np.atleast_1d(np.asarray(chunk)).tolist()]


def _json_attr(obj, name: str) -> dict | None:
    if name not in obj.attrs:
        return None
    try:
        return json.loads(_text(obj.attrs[name]))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # the config only helps naming; the arrays do not depend on it


def _array(dataset) -> np.ndarray:
    value = np.asarray(dataset[()])
    if _text(dataset.attrs.get("dtype", "")) == "bfloat16":  # Keras 3's bfloat16 variables
        import ml_dtypes

        value = np.asarray(value, dtype=ml_dtypes.bfloat16)
    return value


def _layer_configs(model_config: dict | None) -> dict[str, tuple[str, dict]]:
    """layer name -> (class, options), nested models included, from a model's JSON config."""
    out: dict[str, tuple[str, dict]] = {}
    stack = [model_config] if isinstance(model_config, dict) else []
    while stack:
        node = stack.pop()
        for layer in (node.get("config") or {}).get("layers") or ():
            if not isinstance(layer, dict):
                continue
            options = layer.get("config") or {}
            name = options.get("name") or layer.get("name")
            if name and name not in out:
                out[name] = (layer.get("class_name", ""), options)
            stack.append(layer)
    return out


def _keras2_layers(group, *, config: dict | None) -> list[Layer]:
    classes = _layer_configs(config)
    out = []
    for layer_name in _attr_list(group, "layer_names"):
        g = group[layer_name]
        names = _attr_list(g, "weight_names") or []
        if not names:
            continue
        arrays = [_array(g[n]) for n in names]
        kind, options = classes.get(layer_name, (None, {}))
        scopes = [n.rsplit("/", 1)[0] if "/" in n else layer_name for n in names]
        if "layers" in options or len(set(scopes)) > 1:  # a nested model: one run per layer
            out += _split_nested(layer_name, names, arrays, scopes, classes)
        else:
            out.append(Layer((layer_name,), arrays, _leaves(names), kind, options))
    return out


def _leaves(names: list[str]) -> tuple[str, ...]:
    return tuple(re.sub(r":\d+$", "", n).rsplit("/", 1)[-1] for n in names)


def _split_nested(model_name, names, arrays, scopes, classes) -> list[Layer]:
    """A nested model's group (Keras 2 layout): its weights by variable scope, the scope's
    last part being the inner layer's name. Keras lists a model's trainable weights, then
    the others, so a layer's may be apart (a BatchNormalization's moving statistics)."""
    by_layer: dict[str, Layer] = {}
    for name, array, scope in zip(names, arrays, scopes, strict=True):
        inner = scope.rsplit("/", 1)[-1]
        if inner not in by_layer:
            kind, options = classes.get(inner, (None, {}))
            by_layer[inner] = Layer((model_name, inner), [], (), kind, options)
        by_layer[inner].arrays.append(array)
        by_layer[inner].names = (*by_layer[inner].names, *_leaves([name]))
    return list(by_layer.values())


def _snake(class_name: str) -> str:
    """Keras' snake case of a class name, as its saving names containers (Conv2D -> conv2d)."""
    name = re.sub(r"\W+", "", class_name)
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


_CLASS_OF_SNAKE = {_snake(k): k for k in KINDS}


def _config_paths(model_config: dict | None, prefix: str = "") -> dict[str, tuple[str, str, dict]]:
    """Keras 3 file path -> (layer name, class, options), from config.json: a Functional's
    layers (its InputLayer included; a Sequential's not) numbered per class in order."""
    out: dict[str, tuple[str, str, dict]] = {}
    if not isinstance(model_config, dict):
        return out
    sequential = model_config.get("class_name") == "Sequential"
    used: dict[str, int] = {}
    for layer in (model_config.get("config") or {}).get("layers") or ():
        if not isinstance(layer, dict) or (sequential and layer.get("class_name") == "InputLayer"):
            continue
        snake = _snake(layer.get("class_name", ""))
        used[snake] = used.get(snake, -1) + 1
        path = f"{prefix}layers/{snake}" + (f"_{used[snake]}" if used[snake] else "")
        options = layer.get("config") or {}
        out[path] = (
            options.get("name") or layer.get("name") or "",
            layer.get("class_name"),
            options,
        )
        out.update(_config_paths(layer, prefix=f"{path}/"))
    return out


def _vars_groups(f) -> list[str]:
    """Paths of the objects whose arrays Keras 3 saved ('layers/conv2d'), in file order."""
    import h5py

    found: list[str] = []

    def visit(name, obj):
        if isinstance(obj, h5py.Group) and name.rsplit("/", 1)[-1] == "vars" and "/" in name:
            found.append(name[: -len("/vars")])

    f.visititems(visit)
    if any(c in f for c in _CONTAINERS):  # Functional / Sequential: its layers alone
        return [p for p in found if p.split("/", 1)[0] in _CONTAINERS]
    # A subclassed model: its attributes, less the optimizer's and the metrics' state.
    return [p for p in found if not re.match(r"_?(optimizer|compile_|metrics|loss)", p)]


def _keras3_layers(f, *, config: dict | None) -> list[Layer]:
    from_config = _config_paths(config)
    classes = _layer_configs(config)
    paths = _vars_groups(f)
    names = {}
    for path in paths:
        attr = f[path]["vars"].attrs.get("name")
        names[path] = _text(attr) if attr is not None else from_config.get(path, ("",))[0]
    out = []
    for path in paths:
        group = f[path]["vars"]
        keys = sorted(group, key=lambda k: int(k) if k.isdigit() else -1)
        if not keys:
            continue
        if not all(k.isdigit() for k in keys):
            raise CorruptCheckpointError(f"{path}/vars holds non-numbered entries {keys[:5]}")
        arrays = [_array(group[k]) for k in keys]
        name = names[path]
        kind, options = classes.get(name, (None, {})) if name else (None, {})
        if path in from_config:
            kind, options = from_config[path][1:]
        if kind is None:
            m = re.fullmatch(r"([a-z0-9_]+?)(?:_\d+)?", path.rsplit("/", 1)[-1])
            kind = _CLASS_OF_SNAKE.get(m[1]) if m else None
        if name:
            chain = tuple(names[a] for a in _ancestors(path) if names.get(a)) + (name,)
            out.append(Layer(chain, arrays, None, kind, options))
        else:
            out.append(Layer((path,), arrays, None, kind, options))
    return out


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _flatten(layers: list[Layer], path: pathlib.Path) -> dict[str, np.ndarray]:
    """Each layer under its own name, or its name chain where two layers share a name."""
    counts: dict[str, int] = {}
    for layer in layers:
        counts[layer.path[-1]] = counts.get(layer.path[-1], 0) + 1
    out: dict[str, np.ndarray] = {}
    for layer in layers:
        key = layer.path[-1] if counts[layer.path[-1]] == 1 else "/".join(layer.path)
        names = layer.weight_names() or tuple(f"vars/{i}" for i in range(len(layer.arrays)))
        for name, array in zip(names, layer.arrays, strict=True):
            if f"{key}/{name}" in out:
                raise CorruptCheckpointError(
                    f"{path}: two arrays named {key}/{name} (layer names repeated in nested "
                    "models?); tlflax needs each layer's name once"
                )
            out[f"{key}/{name}"] = array
    return out
