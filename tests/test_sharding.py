"""Mesh, shardings and host batches on 8 fake CPU devices; two real processes for multi-host.

This file is also the worker script of the two-process test: `python tests/test_sharding.py
ROLE DIR [PORT]` runs one process of it (_worker_main), with its own XLA_FLAGS.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from tlflax import checkpointing, sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _child_env() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"  # one device per process
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _worker_main(argv: list[str]) -> None:
    """One process of the two-process test; prints one JSON line of results."""
    role, workdir = argv[0], pathlib.Path(argv[1])
    if role == "restore":
        _restore_worker(workdir)
        return
    port, process_id = int(argv[2]), int(role)
    assert sharding.maybe_initialize_distributed(
        enabled=True,
        coordinator_address=f"localhost:{port}",
        num_processes=2,
        process_id=process_id,
    )
    mesh = sharding.make_mesh()
    n_local = sharding.local_batch_size(8, mesh=mesh)
    full = np.arange(8 * 3, dtype=np.float32).reshape(8, 3) ** 1.5
    local = full[process_id * n_local : (process_id + 1) * n_local]
    batch = sharding.host_to_global({"x": local}, sharding.batch_sharding(mesh))
    mean = jax.jit(lambda b: jnp.mean(b["x"], axis=0), out_shardings=sharding.replicated(mesh))(
        batch
    )
    # 'w' replicated, 'v' split by rows: each process writes its own half of it.
    state_sh = {"step": sharding.replicated(mesh), "w": sharding.replicated(mesh)}
    state_sh["v"] = sharding.batch_sharding(mesh)
    state = sharding.put_global(_small_state(), state_sh)
    assert [s.data.shape for s in state["v"].addressable_shards] == [(2, 3)]
    ckpt = checkpointing.Checkpointer(
        workdir, keep_last=1, keep_best=0, best_metric="m", best_mode="max", async_save=True
    )
    ckpt.save(3, state, metrics={"m": 1.0})  # every process calls save: orbax syncs them
    ckpt.wait()
    ckpt.close()
    result = {
        "process_count": jax.process_count(),
        "global_shape": list(batch["x"].shape),
        "mean": np.asarray(mean).tolist(),
    }
    print("RESULT " + json.dumps(result), flush=True)


def _small_state() -> dict:
    return {
        "step": jnp.asarray(3, jnp.int32),
        "w": jnp.arange(12, dtype=jnp.float32).reshape(4, 3) / 8.0 - 0.75,
        "v": jnp.arange(12, dtype=jnp.int32).reshape(4, 3) * 3 - 5,
    }


def _restore_worker(workdir: pathlib.Path) -> None:
    ckpt = checkpointing.Checkpointer(
        workdir, keep_last=1, keep_best=0, best_metric="m", best_mode="max", async_save=False
    )
    restored = ckpt.restore_latest(jax.eval_shape(_small_state))
    result = {
        "latest": ckpt.latest_step(),
        "step": int(restored["step"]),
        "w": np.asarray(restored["w"]).tolist(),
        "v": np.asarray(restored["v"]).tolist(),
        "devices": jax.device_count(),
    }
    print("RESULT " + json.dumps(result), flush=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _result_of(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, f"worker printed no RESULT line:\n{out[-3000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def test_conftest_gives_eight_devices():
    assert jax.device_count() == 8


def test_make_mesh_sizes():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data", "model")
    assert dict(mesh.shape) == {"data": 8, "model": 1}
    assert dict(sharding.make_mesh(model=2).shape) == {"data": 4, "model": 2}
    assert dict(sharding.make_mesh(data=2, model=4).shape) == {"data": 2, "model": 4}
    small = sharding.make_mesh(data=2, devices=jax.devices()[:2])
    assert small.devices.size == 2


@pytest.mark.parametrize(
    ("data", "model", "message"),
    [
        (-1, 3, "model=3 does not divide the 8 devices"),
        (3, 1, "data=3 x model=1 = 3 devices, but there are 8"),
        (2, 2, "data=2 x model=2 = 4 devices, but there are 8"),
        (16, 1, "data=16 x model=1 = 16 devices"),
        (-1, 0, "model=0"),
    ],
)
def test_make_mesh_bad_sizes(data, model, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        sharding.make_mesh(data=data, model=model)


def test_jitted_sum_over_sharded_batch_equals_numpy():
    mesh = sharding.make_mesh()
    x = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32)
    batch = sharding.host_to_global({"x": x}, sharding.batch_sharding(mesh))
    # Really split: each of the 8 devices holds 2 rows.
    shard_shapes = {s.data.shape for s in batch["x"].addressable_shards}
    assert shard_shapes == {(2, 5)}
    total = jax.jit(lambda b: b["x"].sum(axis=0))(batch)
    np.testing.assert_allclose(np.asarray(total), x.sum(axis=0), rtol=1e-5, atol=1e-5)


def test_host_to_global_roundtrip():
    mesh = sharding.make_mesh(model=2)
    batch = {
        "image": np.random.default_rng(1).integers(0, 255, (8, 4, 4, 3), dtype=np.uint8),
        "label": np.arange(8, dtype=np.int32),
    }
    out = sharding.host_to_global(batch, sharding.batch_sharding(mesh))
    for name, local in batch.items():
        assert isinstance(out[name], jax.Array)
        assert out[name].dtype == local.dtype
        assert out[name].sharding == sharding.batch_sharding(mesh)
        np.testing.assert_array_equal(np.asarray(out[name]), local)


def test_param_shardings_model_axis_splits_big_kernel_replicates_bias():
    mesh = sharding.make_mesh(model=2)
    params = {
        "dense": {"kernel": jnp.zeros((512, 1024)), "bias": jnp.zeros((1024,))},
        "odd": {"kernel": jnp.zeros((513, 1023))},  # large, but no axis divisible by 2
        "small": {"kernel": jnp.zeros((16, 16))},
        "conv": {"kernel": jnp.zeros((3, 3, 256, 512))},
    }
    shardings = sharding.param_shardings(params, mesh)
    assert shardings["dense"]["kernel"].spec == PartitionSpec(None, "model")
    assert shardings["dense"]["bias"].spec == PartitionSpec()
    assert shardings["odd"]["kernel"].spec == PartitionSpec()
    assert shardings["small"]["kernel"].spec == PartitionSpec()
    assert shardings["conv"]["kernel"].spec == PartitionSpec(None, None, None, "model")
    placed = jax.device_put(params, shardings)
    kernel_shards = {s.data.shape for s in placed["dense"]["kernel"].addressable_shards}
    assert kernel_shards == {(512, 512)}
    bias_shards = {s.data.shape for s in placed["dense"]["bias"].addressable_shards}
    assert bias_shards == {(1024,)}


def test_param_shardings_replicated_without_model_axis():
    mesh = sharding.make_mesh()
    shardings = sharding.param_shardings({"k": jnp.zeros((1024, 1024))}, mesh)
    assert shardings["k"].spec == PartitionSpec()
    assert shardings["k"].is_fully_replicated


def test_param_shardings_mirror_into_optimizer_state_and_shapes():
    mesh = sharding.make_mesh(model=4)
    params = {"w": jnp.zeros((1024, 768)), "b": jnp.zeros((768,))}
    opt_state = optax.adam(1e-3).init(params)
    abstract = jax.eval_shape(lambda: {"params": params, "opt_state": opt_state})
    shardings = sharding.param_shardings(abstract, mesh, min_size=1024)
    adam = shardings["opt_state"][0]
    assert adam.mu["w"].spec == PartitionSpec("model", None)
    assert adam.nu["w"].spec == shardings["params"]["w"].spec
    assert adam.count.spec == PartitionSpec()
    assert shardings["params"]["b"].spec == PartitionSpec()
    # A jitted update keeps the layout it was given.
    step = jax.jit(
        lambda t: jax.tree.map(lambda a: a + 1, t),
        in_shardings=(shardings,),
        out_shardings=shardings,
    )
    out = step(jax.device_put({"params": params, "opt_state": opt_state}, shardings))
    assert out["opt_state"][0].mu["w"].sharding.spec == PartitionSpec("model", None)


def test_put_global_places_like_device_put():
    mesh = sharding.make_mesh(model=2)
    tree = {"w": jnp.arange(1024.0).reshape(32, 32), "key": jax.random.key(0)}
    shardings = sharding.param_shardings(tree, mesh, min_size=16)
    placed = sharding.put_global(tree, shardings)
    assert placed["w"].sharding == shardings["w"]
    assert placed["w"].sharding.spec == PartitionSpec(None, "model")
    np.testing.assert_array_equal(np.asarray(placed["w"]), np.asarray(tree["w"]))
    assert placed["key"].sharding.is_fully_replicated


def test_local_batch_size():
    assert sharding.local_batch_size(32) == 32  # one process
    assert sharding.local_batch_size(4, mesh=sharding.make_mesh(data=4, model=2)) == 4
    with pytest.raises(ValueError, match="global batch size 12 does not split over the 8"):
        sharding.local_batch_size(12)
    with pytest.raises(ValueError, match="'data' axis"):
        sharding.local_batch_size(6, mesh=sharding.make_mesh(data=4, model=2))


def test_distributed_not_initialized_unless_enabled():
    assert sharding.maybe_initialize_distributed(enabled=False) is False
    assert not jax.distributed.is_initialized()


def test_replicated_and_batch_sharding_specs():
    mesh = sharding.make_mesh()
    assert sharding.replicated(mesh) == NamedSharding(mesh, PartitionSpec())
    assert sharding.batch_sharding(mesh) == NamedSharding(mesh, PartitionSpec("data"))


@pytest.mark.slow
def test_two_processes_global_mean_and_checkpoint(tmp_path):
    port, ckpt_dir = _free_port(), tmp_path / "ckpt"
    script, env = str(pathlib.Path(__file__)), _child_env()
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(i), str(ckpt_dir), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=40)[0])
    finally:
        for proc in procs:
            proc.kill()
    for proc, out in zip(procs, outs, strict=True):
        assert proc.returncode == 0, out[-3000:]
    results = [_result_of(out) for out in outs]
    full = np.arange(8 * 3, dtype=np.float32).reshape(8, 3) ** 1.5
    for result in results:
        assert result["process_count"] == 2
        assert result["global_shape"] == [8, 3]
        np.testing.assert_allclose(result["mean"], full.mean(axis=0), rtol=1e-6)
    assert results[0]["mean"] == results[1]["mean"]

    # A single fresh process (one device, no distributed runtime) reads what both wrote.
    done = subprocess.run(
        [sys.executable, script, "restore", str(ckpt_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=40,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    restored = _result_of(done.stdout)
    assert restored["devices"] == 1
    assert restored["latest"] == 3 and restored["step"] == 3
    expected = np.arange(12, dtype=np.float32).reshape(4, 3) / 8.0 - 0.75
    np.testing.assert_array_equal(np.asarray(restored["w"], np.float32), expected)
    np.testing.assert_array_equal(restored["v"], np.arange(12).reshape(4, 3) * 3 - 5)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])


def test_cpu_steps_compile_at_the_cpu_level_unless_xla_flags_set_one(monkeypatch):
    mesh = sharding.make_mesh(devices=jax.devices()[:2])
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    options = sharding.compiler_options(mesh)
    assert options == {"xla_backend_optimization_level": sharding.CPU_BACKEND_OPT_LEVEL}
    fn = jax.jit(lambda x: x * 2.0, compiler_options=options)  # XLA knows the option
    assert float(fn(jax.numpy.float32(1.5))) == 3.0
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3")
    assert sharding.compiler_options(mesh) is None
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(sharding, "CPU_BACKEND_OPT_LEVEL", None)
    assert sharding.compiler_options(mesh) is None


def test_compiler_options_leave_other_platforms_alone():
    class Device:
        platform = "gpu"

    mesh = types.SimpleNamespace(devices=np.asarray([Device()], dtype=object))
    assert sharding.compiler_options(mesh) is None
