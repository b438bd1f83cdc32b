"""Data parallelism over a one-axis ``('data',)`` device mesh, one or many processes.

A training step sees one padded batch per device, stacked on a leading axis of size
``jax.device_count()``: the global batch. Parameters and optimiser state are replicated. The
step body (``train.py``) runs under :func:`data_parallel` (``jax.shard_map``): each device works
on its own batch and the loss is built from ``jax.lax.psum`` of masked sums and counts, so
gradients and metrics are those of the whole global batch however the real graphs are spread
over devices. One device is the same code with a mesh of size 1.

Several processes (hosts, or processes on one machine) join with
:func:`initialize_distributed`; each loads only its own devices' batches and
:func:`shard_batch` assembles the global array with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)
AXIS = "data"


def initialize_distributed(
    coordinator_address: str = "", num_processes: int = 0, process_id: int = -1
) -> bool:
    """Starts ``jax.distributed`` when the run spans several processes.

    Arguments left empty are read from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``. On CPU, cross-process collectives use gloo. Must run before any other
    JAX call that touches devices.

    Args:
      coordinator_address: ``"host:port"`` of process 0.
      num_processes: total number of processes; ≤ 1 means a single-process run.
      process_id: this process's rank in [0, num_processes).

    Returns:
      True if ``jax.distributed`` was initialised.

    Raises:
      ValueError: if a multi-process run lacks the coordinator address or a valid rank.
    """
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    count = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
    rank = process_id if process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
    if count <= 1:
        return False
    if not address or not 0 <= rank < count:
        raise ValueError(
            f"multi-process run ({count} processes) needs a coordinator address and a process id "
            f"in [0, {count}); got address={address!r}, process_id={rank}"
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=rank)
    log.info("process %d of %d joined %s", rank, count, address)
    return True


def make_mesh() -> Mesh:
    """A mesh over every device of every process, with the single axis ``'data'``."""
    return Mesh(np.asarray(jax.devices()), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places identical host values on every device (also across processes)."""
    sharding = replicated(mesh)

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        return jax.make_array_from_callback(np.shape(x), sharding, lambda index: np.asarray(x)[index])

    return jax.tree.map(put, tree)


def shard_batch(local_batches: Any, mesh: Mesh) -> Any:
    """Assembles the global batch from this process's per-device batches.

    Args:
      local_batches: pytree of numpy arrays with leading axis ``jax.local_device_count()``
        (one padded batch per local device, in local device order).
      mesh: the data mesh.

    Returns:
      The same pytree of global ``jax.Array``s, leading axis ``jax.device_count()``, sharded
      over ``'data'``.
    """
    sharding = sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batches)


def data_parallel(fn: Callable, mesh: Mesh, in_specs: Any, out_specs: Any) -> Callable:
    """``jax.shard_map`` over the data axis; specs use ``P()`` (replicated) and ``P('data')``."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def unstack_local(batch: Any) -> Any:
    """Inside :func:`data_parallel`: drops the per-device leading axis of size 1."""
    return jax.tree.map(lambda x: x[0], batch)


def to_host(tree: Any) -> Any:
    """Fetches a replicated or fully addressable pytree to numpy (any process)."""

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(fetch, tree)
