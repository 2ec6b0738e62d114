"""What the model-family tests share: inputs, reference models' random weights and logits
(PyTorch and Keras), Keras files in every format, and a short trainer run from a .pth.

A plain module the tests import (`import refs`), as tiny_config: none of it is a fixture."""

from __future__ import annotations

import contextlib
import json
import shutil

import jax
import numpy as np
import pytest
import torch

# --- inputs and comparisons ---


def images(size: int, *, batch: int = 2, seed: int = 0) -> np.ndarray:
    """Normal float32 NHWC images: what a model sees after normalisation."""
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def pictures(n: int, size: int) -> np.ndarray:
    """uint8 (n, size, size, 3): smooth gradients and noise, each channel unlike the others
    (a channel order mistake shows)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(0)
    smooth = np.stack([200 * xx, 255 * yy * (1 - xx), 90 + 60 * np.sin(9 * xx * yy)], -1)
    return np.clip(smooth + rng.normal(0, 12, (n, size, size, 3)), 0, 255).astype(np.uint8)


def max_diff(a, b) -> float:
    assert np.shape(a) == np.shape(b), (np.shape(a), np.shape(b))
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def shapes(spec, size: int | None = None) -> dict:
    """The model's variables as shapes (jax.eval_shape of its init): no compile."""
    return jax.eval_shape(lambda: spec.init(jax.random.key(0), size))


def blank(spec, size: int | None = None) -> dict:
    """Zeros of the model's variable shapes: all a load that replaces everything needs."""
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes(spec, size))


def perturbed(variables, *, seed: int = 0):
    """`variables` (numpy) with BatchNorm statistics and affine away from 0 / 1 and a
    non-zero head, so that every gradient moves and a mistake in any of them shows."""
    rng = np.random.default_rng(seed)

    def perturb(path, v):
        key = jax.tree_util.keystr(path)
        if key.endswith("['var']") or key.endswith("['scale']"):
            return rng.uniform(0.5, 2, v.shape).astype(np.float32)
        if key.endswith("['mean']") or key.endswith("['bias']") or "'head'" in key:
            return rng.normal(0, 0.3, v.shape).astype(np.float32)
        return np.asarray(v)

    return jax.tree_util.tree_map_with_path(perturb, variables)


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the folder is not a package)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_usage_errors(parse_args, argvs) -> None:
    """Each argv makes parse_args exit with argparse's usage status, 2."""
    for argv in argvs:
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        assert e.value.code == 2, argv


def assert_misfits_named(load, state: dict, *, missing: str, unexpected: dict, misshapen: dict):
    """load(state) without the key `missing`, with the `unexpected` keys added, and with the
    `misshapen` arrays in place: each fails, saying which of the three it is."""
    from tlflax.weights import CheckpointMismatchError

    cases = {
        "missing": {k: v for k, v in state.items() if k != missing},
        "unexpected": {**state, **unexpected},
        "shape mismatch": {**state, **misshapen},
    }
    for what, bad in cases.items():
        with pytest.raises(CheckpointMismatchError, match=what):
            load(bad)


# --- PyTorch references ---


def torch_forward(model, x_nhwc: np.ndarray):
    """The model's output for NHWC images, as it returns it."""
    with torch.no_grad():
        return model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()))


def torch_logits(model, x_nhwc: np.ndarray) -> np.ndarray:
    """Logits as numpy: the output, or its .logits (transformers' models)."""
    out = torch_forward(model, x_nhwc)
    return getattr(out, "logits", out).numpy()


def numpy_state(model: torch.nn.Module) -> dict:
    return {k: t.detach().numpy() for k, t in model.state_dict().items()}


def randomised(model: torch.nn.Module, *, seed: int | None, conv=None, linear=None):
    """The model in eval mode with its BatchNorm affine parameters and running statistics
    away from their init (so that each one matters), and conv / linear layers redrawn by
    `conv(m, generator)` / `linear(m, generator)` where given: one generator of `seed`
    (None: torch's global one), drawn in module order."""
    g = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.3, generator=g)
                m.bias.normal_(0.0, 0.3, generator=g)
                m.running_mean.normal_(0.0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
            elif conv and isinstance(m, torch.nn.Conv2d):
                conv(m, g)
            elif linear and isinstance(m, torch.nn.Linear):
                linear(m, g)
    return model.eval()


def normal_init(weight_std: float, bias_std: float):
    """A `randomised` layer rule: weights N(0, weight_std), biases N(0, bias_std)."""

    def draw(m, g):
        m.weight.normal_(0.0, weight_std, generator=g)
        m.bias.normal_(0.0, bias_std, generator=g)

    return draw


# --- Keras references (Keras on JAX: tests/conftest.py) ---


def keras_on_jax():
    """keras, or a skip where it is missing or runs on another backend."""
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip(f"keras runs on {keras.backend.backend()}; these tests call it under jax.jit")
    return keras


@contextlib.contextmanager
def keras_zero_init():
    """Glorot's init as zeros while a Keras model builds: it compiles one XLA program per
    shape (a second or more each on 2 cores), and every value is drawn again after."""
    keras = keras_on_jax()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(keras.initializers.GlorotUniform, "__call__",
                   lambda self, shape, dtype=None: keras.ops.zeros(shape, dtype))  # fmt: skip
        yield mp


def keras_batchnorm_draws(rng: np.random.Generator) -> dict:
    """Keras weight name -> its draw (a function of the shape) for BatchNormalization: the
    affine parameters and statistics away from 1 / 0, as `randomised` does in PyTorch."""
    return {"gamma": lambda s: rng.normal(1.0, 0.3, s), "beta": lambda s: rng.normal(0, 0.3, s),
            "moving_mean": lambda s: rng.normal(0, 0.5, s),
            "moving_variance": lambda s: rng.uniform(0.5, 2.0, s)}  # fmt: skip


def keras_randomised(model, *, seed: int):
    """Every variable drawn: kernels at O(1) activations (3x3 depthwise kernels' fan-in 9),
    biases N(0, 0.1), BatchNorm statistics away from 1 / 0."""
    rng = np.random.default_rng(seed)
    draws = {**keras_batchnorm_draws(rng), "bias": lambda s: rng.normal(0, 0.1, s)}
    for var in model.weights:
        shape = tuple(var.shape)
        draw = draws.get(var.path.rsplit("/", 1)[1])
        fan_in = 9 if "depthwise" in var.path else np.prod(shape[:-1])
        value = draw(shape) if draw else rng.normal(0, fan_in**-0.5, shape)
        var.assign(value.astype(np.float32))
    return model


def keras_logits_fn(model):
    """The Keras model's inference forward, jitted."""
    trainable = [v.value for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]
    return jax.jit(lambda x: model.stateless_call(trainable, frozen, x, training=False)[0])


def strip_layer_names(src, dst):
    """A Keras 3 .weights.h5 as Keras wrote it before layer names were stored."""
    import h5py

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        f.visititems(lambda name, obj: obj.attrs.__delitem__("name") if "name" in obj.attrs
                     else None)  # fmt: skip


def save_keras_files(model, folder, stem: str, *, top_end: str) -> dict:
    """The model as .weights.h5, .keras and Keras 2's .h5, a .weights.h5 naming no layer
    ('unnamed'), and its backbone up to layer `top_end` as an .h5 ('notop') -> {kind: path}."""
    keras = keras_on_jax()
    files = {fmt: folder / f"{stem}{fmt}" for fmt in (".weights.h5", ".keras", ".h5")}
    model.save_weights(files[".weights.h5"])
    model.save(files[".keras"])
    model.save(files[".h5"])  # Keras 3 still writes Keras 2's layout
    files["unnamed"] = folder / "unnamed.weights.h5"
    strip_layer_names(files[".weights.h5"], files["unnamed"])
    files["notop"] = folder / f"{stem}_notop.h5"
    keras.Model(model.input, model.get_layer(top_end).output).save(files["notop"])
    return files


def in_keras_cache(monkeypatch, tmp_path, file, name: str):
    """`file` where keras.applications keeps KERAS_FILES[name] ($KERAS_HOME/models)."""
    from tlflax.weights import sources

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    cached = tmp_path / "models" / sources.KERAS_FILES[name].filename
    cached.parent.mkdir(exist_ok=True)
    shutil.copy(file, cached)
    return cached


# --- strategies and runs ---


def last_k_trainable(spec, params, k: int) -> dict[str, bool]:
    """'/'-joined parameter name -> trainable, in the one phase of strategy last_k."""
    from tlflax import config_lib, optim, tree

    config = config_lib.get_base_config()
    config.optim.update({"strategy": "last_k", "k": k})
    (phase,) = optim.make_phases(config.optim, train_config=config.train, params=params,
                                 spec=spec, steps_per_epoch=1)  # fmt: skip
    return tree.flatten(phase.trainable)


def pth_run_config(tmp_path, model: torch.nn.Module, name: str, *, image_size: int, settings):
    """A base config training model `name` on the digits (16 a batch) from `model`'s state
    dict saved with torch.save as weights.source; `settings`: more flattened keys and values
    ({'optim.strategy': 'last_k', ...})."""
    from tlflax import config_lib

    pth = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), pth)
    config = config_lib.get_base_config()
    config.update_from_flattened_dict({
        "model.name": name, "data.source": "digits", "data.val_fraction": 0.1,
        "data.image_size": image_size, "data.batch_size": 16, "weights.source": str(pth),
        "train.log_every": 1, **settings,
    })  # fmt: skip
    return config


def run_preprocessing(workdir) -> dict:
    """The preprocessing a run recorded (preprocessing.json)."""
    return json.loads((workdir / "preprocessing.json").read_text())


def restored_state(workdir, step: int) -> dict:
    """The train state a run saved at `step`."""
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(workdir / f"checkpoints/{step}/state")
