"""Several processes, one run: start-up, and the few collective helpers host-side code needs.

Every process runs the same program. Each one rolls out its own share of the step's queries with
its own sampler on its own devices (weights in the sampling layout are replicated across
processes, so sampling needs no cross-process traffic), and the exact token records of all
processes join one global batch for the update (`global_batch`), which every process computes
with the same jitted programs on arrays of the same shapes.

    distributed.initialize()            # TPU pods and SLURM from their environment, or explicit
    mesh = sharding.make_mesh({"fsdp": -1})         # over every process's devices
    local = distributed.local_mesh(mesh)            # this process's sub-mesh (sampling)

On one process every helper is the identity or a plain local operation.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, Sharding

from agentflow_jax.errors import UserError

ENV_COORDINATOR = "AGENTFLOW_COORDINATOR"       # host:port of process 0
ENV_NUM_PROCESSES = "AGENTFLOW_NUM_PROCESSES"
ENV_PROCESS_ID = "AGENTFLOW_PROCESS_ID"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins the run's processes (`jax.distributed.initialize`), before any JAX computation.

    Explicit arguments win; else the AGENTFLOW_COORDINATOR / AGENTFLOW_NUM_PROCESSES /
    AGENTFLOW_PROCESS_ID variables; else JAX's own detection of the cluster (SLURM jobs, or any
    cluster JAX knows, e.g. Cloud TPU slices, when AGENTFLOW_DISTRIBUTED=auto). CPU processes
    exchange data through gloo. Nothing happens for a single process without any of these.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    explicit = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        raise UserError("multi-process runs need all of the coordinator address, the number of processes and this "
                        f"process's id (flags or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})")
    detected = os.environ.get("AGENTFLOW_DISTRIBUTED") == "auto" or "SLURM_JOB_ID" in os.environ
    if coordinator_address is None and not detected:
        return
    if (os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or "") == "cpu":
        # CPU processes talk through gloo; and run each program to its end before the next (GPUs and
        # TPUs order programs per device stream): with asynchronous dispatch, independent programs'
        # collectives can interleave in another order on each process and wait on each other forever.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} must be an integer") from None


def process_slice(total: int, index: int | None = None, count: int | None = None) -> slice:
    """This process's contiguous share of `total` items (each process gets total / count)."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    if total % count:
        raise UserError(f"{total} items cannot be split evenly over {count} processes; make it a multiple of "
                        f"{count}")
    share = total // count
    return slice(index * share, (index + 1) * share)


# ----------------------------------------------------------------------------------------------
# Host-side collectives (small arrays; identity on one process)
# ----------------------------------------------------------------------------------------------


def allgather(value: Any) -> np.ndarray:
    """[P, ...]: every process's `value` (same shape everywhere), in process order."""
    value = np.asarray(value)
    if jax.process_count() == 1:
        return value[None]
    return np.asarray(multihost_utils.process_allgather(value))


def gather_ragged(values: np.ndarray) -> np.ndarray:
    """The concatenation, in process order, of each process's 1-D or N-D array (leading axes may differ)."""
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values
    counts = allgather(len(values))
    padded = np.zeros((int(counts.max()),) + values.shape[1:], values.dtype)
    padded[:len(values)] = values
    everything = allgather(padded)
    return np.concatenate([rows[:count] for rows, count in zip(everything, counts)])


def global_max(value: int) -> int:
    return int(allgather(np.asarray(value, np.int64)).max())


def global_sum(value: float) -> float:
    return float(allgather(np.asarray(value, np.float64)).sum())


# ----------------------------------------------------------------------------------------------
# Device arrays
# ----------------------------------------------------------------------------------------------


def local_mesh(mesh: Mesh) -> Mesh:
    """The sub-mesh of this process's devices (same axis names; `mesh` itself on one process).

    Raises:
      UserError: this process's devices are not a block of the mesh (e.g. a tensor-parallel group
        spanning hosts), so it cannot sample on its own.
    """
    owner = np.vectorize(lambda d: d.process_index)(mesh.devices)
    mine = np.argwhere(owner == jax.process_index())
    low, high = mine.min(axis=0), mine.max(axis=0) + 1
    block = mesh.devices[tuple(slice(a, b) for a, b in zip(low, high))]
    if block.size != len(mine):
        raise UserError(f"process {jax.process_index()}'s devices do not form a block of the mesh "
                        f"{dict(mesh.shape)}; keep tensor-parallel groups within a host")
    return Mesh(block, mesh.axis_names)


def global_batch(local: np.ndarray, sharding: NamedSharding, global_shape: tuple[int, ...]) -> jax.Array:
    """A global array of `global_shape` made of every process's `local` block (process order along
    the one axis the processes split; the batch), laid out as `sharding` says."""
    return jax.make_array_from_process_local_data(sharding, np.asarray(local), global_shape)


def scalar(value: jax.Array) -> float:
    """A replicated device scalar (e.g. a loss) as a float on every process."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        value = value.addressable_data(0)
    return float(np.asarray(value))


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a global [B, ...] array sharded on its rows only, as numpy."""
    if array.is_fully_addressable:
        return np.asarray(array)
    pieces: dict[int, jax.Array] = {}
    for shard in array.addressable_shards:  # replicas over other mesh axes hold the same rows
        pieces.setdefault(shard.index[0].start or 0, shard.data)
    return np.concatenate([np.asarray(pieces[start]) for start in sorted(pieces)], axis=0)


def to_local(array: jax.Array, sharding: Sharding) -> jax.Array:
    """A copy of a global array that every process holds whole (replicated across processes) as an
    array on this process's devices only, laid out as `sharding` (on the local mesh); on device."""
    if jax.process_count() == 1:
        return jax.device_put(array, sharding)
    by_device = {s.device: s for s in array.addressable_shards}
    wanted = sharding.addressable_devices_indices_map(array.shape)
    held = array.sharding.devices_indices_map(array.shape)
    pieces = []
    for device, index in wanted.items():
        if device not in by_device or _normalise(held[device], array.shape) != _normalise(index, array.shape):
            raise ValueError(f"device {device} does not hold the slice {index} of this array; reshard it so that "
                             "every process holds it whole first")
        pieces.append(by_device[device].data)
    return jax.make_array_from_single_device_arrays(array.shape, sharding, pieces)


def _normalise(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((s.start or 0, s.stop if s.stop is not None else n) for s, n in zip(index, shape))
