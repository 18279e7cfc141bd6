"""The data-parallel mesh, host-batch sharding and multi-host start-up.

Every train step runs under `jax.shard_map` over one named mesh axis, DATA_AXIS.
Parameters and optimiser state are replicated (`PartitionSpec()`); batches are
split along their leading dimension (`PartitionSpec(DATA_AXIS)`). The same code
runs on one device, on many devices of one host, and on several hosts.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

# Specs for shard_map and NamedSharding: batch split over the data axis, or
# the same value on every device.
BATCH_SPEC = P(DATA_AXIS)
REPLICATED_SPEC = P()


def make_data_mesh(
    devices: Sequence[jax.Device] | None = None,
) -> jax.sharding.Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes).

  The axis is Explicit so that arrays built on it carry their sharding in
  their type; inside `shard_map` it is manual in any case.
  """
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh(
      (len(devices),),
      (DATA_AXIS,),
      axis_types=(jax.sharding.AxisType.Explicit,),
      devices=devices,
  )


def data_size(mesh: jax.sharding.Mesh) -> int:
  """Number of devices along DATA_AXIS."""
  return mesh.shape[DATA_AXIS]


def check_global_batch(global_batch: int, mesh: jax.sharding.Mesh,
                       what: str = "global batch size") -> int:
  """Returns the per-device batch; raises if `global_batch` does not divide.

  Also checks that the batch divides by the process count, since each host
  loads `global_batch / process_count` examples.
  """
  n = data_size(mesh)
  if global_batch <= 0 or global_batch % n:
    raise ValueError(
        f"{what} {global_batch} is not a positive multiple of the "
        f"{n} devices on the '{DATA_AXIS}' mesh axis")
  if global_batch % jax.process_count():
    raise ValueError(
        f"{what} {global_batch} is not a multiple of the "
        f"{jax.process_count()} processes")
  return global_batch // n


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sharding of a batch: leading dimension split over DATA_AXIS."""
  return NamedSharding(mesh, BATCH_SPEC)


def replicated_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sharding of a value held whole on every device."""
  return NamedSharding(mesh, REPLICATED_SPEC)


def shard_host_batch(batch: Mapping[str, Any],
                     mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Turns this process's slice of a batch into global sharded arrays.

  Args:
    batch: dict of numpy arrays, each (B_process, ...); B_process is the
      global batch divided by `jax.process_count()`, and processes hold
      consecutive slices in process-index order.
    mesh: the data mesh.

  Returns:
    dict of jax.Arrays of shape (B_global, ...), sharded over DATA_AXIS.
  """
  sharding = batch_sharding(mesh)
  local_devices = sum(d.process_index == jax.process_index()
                      for d in mesh.devices.flat)
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.ndim == 0 or value.shape[0] % local_devices:
      raise ValueError(
          f"batch['{key}'] has shape {value.shape}; its leading dimension "
          f"must be a multiple of the {local_devices} local devices")
    global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
    out[key] = jax.make_array_from_process_local_data(
        sharding, value, global_shape)
  return out


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places a pytree of host values (identical on every process) on all devices.

  Leaves may be numpy or jax arrays, scalars, or typed PRNG keys.
  """
  sharding = replicated_sharding(mesh)

  def place(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(place(jax.random.key_data(x)),
                                      impl=jax.random.key_impl(x))
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, x.shape)
  return jax.tree.map(place, tree)


def initialize_distributed(coordinator_address: str, num_processes: int,
                           process_id: int,
                           local_device_ids: Sequence[int] | None = None,
                           ) -> None:
  """Joins this process to a multi-process JAX job.

  Must run before any other JAX call. On CPU, cross-process collectives need
  an explicit implementation; gloo ships with jaxlib. The setting is ignored
  by GPU and TPU backends, so it is set unconditionally.

  Args:
    coordinator_address: 'host:port' of process 0's coordinator service.
    num_processes: total number of processes.
    process_id: this process's index in [0, num_processes).
    local_device_ids: devices this process drives (default: all visible).
  """
  if not 0 <= process_id < num_processes:
    raise ValueError(
        f"process_id {process_id} is outside [0, {num_processes})")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      local_device_ids=local_device_ids,
  )
