"""The one parallel path: jax.jit over a ('data', 'model') Mesh with NamedShardings.

The same code runs on 1 CPU, 8 fake CPU devices, a GPU and a TPU pod: batches are split over
'data'; parameters (and the optimizer state that mirrors them) are replicated, or, when the
'model' axis is larger than 1, large weights are split over it (FSDP-style) so that a model too
big for one device's memory still fits. Multi-host runs call maybe_initialize_distributed()
first and feed each host's slice of the global batch through host_to_global().
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

DATA, MODEL = "data", "model"


def make_mesh(*, data: int = -1, model: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, model) mesh over `devices` (default: every device of every process).

    data=-1 takes all devices that `model` leaves; data * model must equal the device count
    (pass devices=jax.devices()[:n] to use fewer).
    """
    devices = list(jax.devices() if devices is None else devices)
    n_devices = len(devices)
    if model < 1 or n_devices % model:
        raise ValueError(
            f"make_mesh: model={model} does not divide the {n_devices} devices; "
            f"use a divisor of {n_devices} (1 = no parameter sharding)"
        )
    if data == -1:
        data = n_devices // model
    if data < 1 or data * model != n_devices:
        raise ValueError(
            f"make_mesh: data={data} x model={model} = {data * model} devices, but there are "
            f"{n_devices}; use data=-1 (all that model leaves) or sizes whose product is "
            f"{n_devices}"
        )
    # Auto axes: jit propagates shardings itself; Explicit (make_mesh's default) would make
    # every intermediate's sharding part of its type.
    return jax.make_mesh(
        (data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data', the rest whole."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_shardings(params_tree: Any, mesh: Mesh, *, min_size: int = 2**18) -> Any:
    """A NamedSharding for every leaf of any pytree of arrays / ShapeDtypeStructs.

    With a 'model' axis of size 1 everything is replicated. Otherwise each leaf with >= 2 axes
    and >= min_size elements is split over 'model' along its largest axis that the axis size
    divides; smaller leaves (biases, norms, scalars, PRNG keys) stay replicated. Optimizer
    states mirror parameter shapes, so the same call shards a whole train state consistently.
    """
    n_model = mesh.shape[MODEL]

    def sharding_of(leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, _leaf_spec(shape, n_model=n_model, min_size=min_size))

    return jax.tree.map(sharding_of, params_tree)


def _leaf_spec(shape: tuple[int, ...], *, n_model: int, min_size: int) -> PartitionSpec:
    """'model' on the largest axis it divides, for a large 2-D+ leaf; otherwise replicated."""
    if n_model == 1 or len(shape) < 2 or int(np.prod(shape)) < min_size:
        return PartitionSpec()
    candidates = [axis for axis, size in enumerate(shape) if size % n_model == 0]
    if not candidates:
        return PartitionSpec()
    # Ties go to the later axis (the output features of a kernel).
    axis = max(candidates, key=lambda a: (shape[a], a))
    return PartitionSpec(*[MODEL if a == axis else None for a in range(len(shape))])


# XLA's CPU backend compiles tlflax's large steps 13-16 % faster at LLVM optimisation level
# 1 than at its default, to the same numbers and at the same step time (Lite0's full step at
# 64 px: 17.1 s -> 14.6 s, 0.513 -> 0.503 s per step; at 224 px 14.1 s -> 12.2 s; ResNet-50's
# 5.6 s -> 5.0 s: benchmarks/cpu_compile.py, benchmarks/RESULTS.md). Level 0 compiles faster
# still but runs 2.5x slower. None leaves XLA's default.
CPU_BACKEND_OPT_LEVEL: int | None = 1


def compiler_options(mesh: Mesh) -> dict | None:
    """jax.jit's compiler_options for a step on `mesh`: the CPU's optimisation level, unless
    the mesh is not on the CPU or XLA_FLAGS sets a level itself (the user's choice wins)."""
    if CPU_BACKEND_OPT_LEVEL is None or mesh.devices.flat[0].platform != "cpu":
        return None
    if "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", ""):
        return None
    return {"xla_backend_optimization_level": CPU_BACKEND_OPT_LEVEL}


def put_global(tree: Any, shardings: Any) -> Any:
    """jax.device_put(tree, shardings) that also works when the shardings span processes.

    For a state that every process computed identically (same seed, same weights): across
    processes, device_put of an array already on a local device yields a broken global array
    (jax 0.10.2: "input arrays must have one shard each" when it is used), while an identity
    jit with out_shardings places it correctly.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return jax.jit(lambda t: t, out_shardings=shardings)(tree)


# ---------------------------------------------------------------------- batches


def host_to_global(batch: Any, sharding: jax.sharding.Sharding) -> Any:
    """This process's slice of the global batch (numpy, leading axis) -> global jax.Arrays.

    Each process passes its own rows (global_batch / process_count of them); with one process
    the slice is the whole batch. Works for any pytree of arrays (usually a flat dict).
    """
    return jax.tree.map(
        lambda local: jax.make_array_from_process_local_data(sharding, np.asarray(local)), batch
    )


def local_batch_size(global_batch: int, *, mesh: Mesh | None = None) -> int:
    """Rows of the global batch that this process loads.

    The global batch must split evenly over the processes and over the 'data' axis
    (mesh's, or all devices when no mesh is given).
    """
    n_processes = jax.process_count()
    n_data = mesh.shape[DATA] if mesh is not None else jax.device_count()
    for count, what in ((n_processes, "processes"), (n_data, "devices on the 'data' axis")):
        if global_batch < 1 or global_batch % count:
            raise ValueError(
                f"global batch size {global_batch} does not split over the {count} {what}; "
                f"use a multiple of {count} (e.g. {max(count, global_batch // count * count)})"
            )
    return global_batch // n_processes


# ---------------------------------------------------------------------- multi-host


def maybe_initialize_distributed(
    *,
    enabled: bool,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    cpu_collectives: str | None = "gloo",
) -> bool:
    """jax.distributed.initialize() when enabled (before any other jax call); True if it ran.

    On TPU VMs and managed clusters the arguments are found automatically (leave them None);
    elsewhere give all three. cpu_collectives is the CPU backend's cross-process collective
    implementation ('gloo' or 'mpi'; None leaves jax's setting): without one, CPU processes
    cannot run a computation together (jax 0.10.2 defaults to gloo; older releases to none).
    """
    if not enabled:
        return False
    if jax.distributed.is_initialized():
        log.info("jax.distributed is already initialized; not initializing again")
        return False
    if cpu_collectives is not None:
        # Only the CPU client reads this option, so setting it on GPU/TPU hosts is harmless.
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
