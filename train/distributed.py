"""Data-parallel training over a device mesh: mesh, shardings, multi-host start-up.

The loop (:func:`train.loop.train_and_evaluate`) runs on a one-axis mesh ``('data',)`` over
every device JAX sees (all local devices; all devices of all processes in a multi-host run),
or the first ``config.distributed.num_devices``:

* every batch is one **global** array split over ``'data'`` (:func:`shard_batch`: each
  process contributes its own rows, from its shard of :class:`train.data.Pipeline`); the batch
  size must divide by the number of devices (:func:`check_batch_sizes`);
* params, optimiser state, BatchNorm statistics and metric sums are replicated
  (:func:`state_sharding`), or, with ``config.distributed.fsdp``, every array with an axis that
  divides by the device count is split over ``'data'`` along its last such axis (FSDP-style: memory
  per device falls, XLA gathers what a step needs);
* the step is one ``jax.jit`` program over the global arrays, so XLA inserts the cross-device
  sums: gradients are averaged over the global batch and BatchNorm reduces over the global
  batch axis, i.e. 1 and N devices train the same model (up to the order of floating-point
  additions);
* checkpoints (orbax) hold global arrays and restore into any mesh: written on N devices,
  resumed on M.

Multi-host: :func:`initialize` calls ``jax.distributed.initialize`` when the config gives a
coordinator (``coordinator_address``, ``num_processes``, ``process_id``), when
``config.distributed.multi_host`` is set (JAX auto-detects Slurm, Open MPI, Kubernetes and Cloud
TPU clusters), or when the environment is a Slurm job of more than one task
(``SLURM_NTASKS > 1``) or sets ``JAX_COORDINATOR_ADDRESS``. On CPU it selects the ``gloo``
cross-process collectives. Metrics and ``config.json`` are written by process 0 only.
"""

import functools
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

#: The name of the mesh axis that the batch is split over.
DATA_AXIS = "data"
#: The sibling of ``config.json`` that records the mesh(es) a run was trained on.
MESH_FILE = "mesh.json"


def _wants_multi_host(config: Any) -> bool:
    if config is not None and (
        getattr(config, "multi_host", False) or getattr(config, "coordinator_address", None)
    ):
        return True
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    return int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ


def initialize(config: Any = None) -> bool:
    """Starts JAX's multi-process runtime when the config or the environment asks for it.

    Call before the first JAX computation. Nothing happens for a single-process run (the
    default) or when JAX's distributed runtime is already up.

    Args:
      config: a :class:`train.config.TrainConfig` (or ``None``: the environment decides).
        ``coordinator_address`` (``'host:port'`` of process 0), ``num_processes`` and
        ``process_id`` are passed to ``jax.distributed.initialize`` (``None``: auto-detected
        from the cluster environment); ``multi_host=True`` asks for auto-detection.

    Returns:
      Whether this call initialised the distributed runtime.
    """
    if not _wants_multi_host(config) or jax.distributed.is_initialized():
        return False
    if _cpu_only():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if config is not None:
        for name in ("coordinator_address", "num_processes", "process_id"):
            value = getattr(config, name, None)
            if value is not None:
                kwargs[name] = value
    jax.distributed.initialize(**kwargs)
    return True


def _cpu_only() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "") or os.environ.get("JAX_PLATFORM_NAME", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    try:  # Without an accelerator plug-in the CPU is the only backend.
        import importlib.util

        return not any(
            importlib.util.find_spec(name) is not None
            for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu", "jax_rocm60_plugin")
        )
    except (ImportError, ValueError):
        return True


def make_mesh(num_devices: int | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A one-axis mesh ``('data',)`` over ``devices`` (default ``jax.devices()``: every device
    of every process), or over the first ``num_devices`` of them (``None`` or 0: all).

    Raises:
      ValueError: when ``num_devices`` is negative or more than the devices available, or
        (multi-process) not all devices.

    Example:
      >>> make_mesh(1).shape
      OrderedDict([('data', 1)])
    """
    devices = list(jax.devices() if devices is None else devices)
    if num_devices is None or num_devices == 0:
        num_devices = len(devices)
    if not isinstance(num_devices, int) or not 0 < num_devices <= len(devices):
        raise ValueError(
            f"num_devices={num_devices!r} must be an int in [1, {len(devices)}] (0: all)"
        )
    if jax.process_count() > 1 and num_devices != len(devices):
        raise ValueError(
            f"num_devices={num_devices} must be 0 or {len(devices)} (every device) in a "
            f"multi-process run of {jax.process_count()} processes"
        )
    return Mesh(np.asarray(devices[:num_devices]), (DATA_AXIS,))


def check_batch_sizes(mesh: Mesh, **batch_sizes: int) -> None:
    """Checks that every global batch size divides by the number of devices of ``mesh``.

    Raises:
      ValueError: naming the batch size and the device count.
    """
    n = mesh.shape[DATA_AXIS]
    for name, size in batch_sizes.items():
        if size % n:
            raise ValueError(
                f"{name}={size} must be divisible by the number of devices ({n}): the global "
                f"batch is split over the mesh axis {DATA_AXIS!r}"
            )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over ``'data'``: ``NamedSharding(mesh, PartitionSpec('data'))``."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array: ``NamedSharding(mesh, PartitionSpec())``."""
    return NamedSharding(mesh, PartitionSpec())


def leaf_sharding(shape: Sequence[int], mesh: Mesh, fsdp: bool = False) -> NamedSharding:
    """The sharding of one state array: replicated, or (``fsdp``) split over ``'data'`` along
    its last axis whose length divides by the device count (replicated if none does)."""
    n = mesh.shape[DATA_AXIS]
    if fsdp and n > 1:
        for axis in reversed(range(len(shape))):
            if shape[axis] % n == 0 and shape[axis] >= n:
                spec = [None] * len(shape)
                spec[axis] = DATA_AXIS
                return NamedSharding(mesh, PartitionSpec(*spec))
    return replicated(mesh)


def state_sharding(tree: Any, mesh: Mesh, fsdp: bool = False) -> Any:
    """:func:`leaf_sharding` of every array of ``tree`` (a pytree of the same structure)."""
    return jax.tree.map(lambda x: leaf_sharding(np.shape(x), mesh, fsdp), tree)


def place_state(tree: Any, mesh: Mesh, fsdp: bool = False) -> Any:
    """``tree`` on the mesh with :func:`state_sharding` (the same values on every process).

    Values go through the host (``device_put`` of a device array onto devices of other
    processes is not supported); typed PRNG keys as their key data, re-wrapped under ``jit``.
    """

    def put(x, sharding):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.device_put(np.asarray(jax.random.key_data(x)), replicated(mesh))
            wrap = functools.partial(jax.random.wrap_key_data, impl=jax.random.key_impl(x))
            return jax.jit(wrap, out_shardings=sharding)(data)
        return jax.device_put(np.asarray(x), sharding)

    return jax.tree.map(put, tree, state_sharding(tree, mesh, fsdp))


def constrain_state(tree: Any, mesh: Mesh, fsdp: bool = False) -> Any:
    """Inside ``jit``: ``tree`` constrained to :func:`state_sharding` (so a step's output state
    has the sharding of its input)."""
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, leaf_sharding(x.shape, mesh, fsdp)), tree
    )


def host_values(tree: Any) -> Any:
    """``tree``'s global values as numpy arrays on every process (replicated or sharded arrays,
    e.g. FSDP params; a collective gather when several processes hold parts of them)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def shard_batch(mesh: Mesh, *arrays: Any) -> tuple[jax.Array, ...]:
    """Global arrays split over ``'data'`` from this process's rows of a batch.

    Each process passes its own rows (``(local_batch, ...)``; in a single-process run, the
    whole batch); the global array has ``local_batch * process_count`` rows.
    """
    sharding = batch_sharding(mesh)
    local = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
    for a in arrays:
        rows = np.shape(a)[0]
        if rows % local:
            raise ValueError(
                f"a batch of {rows} rows cannot be split over this process's {local} devices "
                f"of the mesh axis {DATA_AXIS!r}: the batch size must be divisible by the "
                "number of devices"
            )
    if jax.process_count() == 1:  # One batched transfer (cheaper than one call per array).
        return tuple(jax.device_put([np.asarray(a) for a in arrays], sharding))
    return tuple(
        jax.make_array_from_process_local_data(sharding, np.asarray(a)) for a in arrays
    )


def mesh_metadata(mesh: Mesh, fsdp: bool = False) -> dict[str, Any]:
    """What a run folder records about the mesh: ``num_devices``, ``mesh_shape``,
    ``mesh_axis_names``, ``process_count``, ``platform`` and ``fsdp``."""
    return {
        "num_devices": int(mesh.devices.size),
        "mesh_shape": [int(s) for s in mesh.devices.shape],
        "mesh_axis_names": list(mesh.axis_names),
        "process_count": int(jax.process_count()),
        "platform": str(mesh.devices.flat[0].platform),
        "fsdp": bool(fsdp),
    }


def record_mesh(run_dir: str | pathlib.Path, mesh: Mesh, fsdp: bool, step: int) -> None:
    """Writes ``run_dir/mesh.json``: :func:`mesh_metadata` of the current mesh and
    ``segments``, the mesh of every (resumed) part of the run with its first step."""
    path = pathlib.Path(run_dir) / MESH_FILE
    current = mesh_metadata(mesh, fsdp)
    segments = json.loads(path.read_text()).get("segments", []) if path.exists() else []
    segments = [seg for seg in segments if seg["from_step"] < step]
    segments.append({"from_step": step, **current})
    path.write_text(json.dumps({**current, "segments": segments}, indent=2, sort_keys=True))


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (nothing in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def is_main_process() -> bool:
    """Whether this is process 0 (the one that writes metrics and ``config.json``)."""
    return jax.process_index() == 0
