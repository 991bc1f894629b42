"""The device mesh and the shardings every part of the trainer uses.

One mesh axis, 'data': batches are split along it, parameters and datasets are replicated. Global
arrays are built with `jax.make_array_from_process_local_data`, so the same code runs on one host
and on many (each host holds the whole array and copies only the rows of its own devices).
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

__all__ = [
    'DATA_AXIS',
    'batch_sharding',
    'make_mesh',
    'program_barrier',
    'replicate',
    'replicated',
    'to_global',
]

DATA_AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
  """A one-axis mesh named 'data' over `devices` (default: every device of every host)."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError('devices is empty.')
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the mesh axis 'data', other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device of the mesh."""
  return NamedSharding(mesh, P())


def to_global(array, mesh: Mesh) -> jax.Array:
  """A global array sharded over the batch axis, from a NumPy array that every host holds in full.

  On one host this is `jax.device_put(array, batch_sharding(mesh))`. On several hosts each must pass
  the same array; each copies only the rows of its own devices. (Hosts that hold only their own rows
  should call `jax.make_array_from_process_local_data(batch_sharding(mesh), rows)` instead.)

  Args:
    array: `[B, ...]` array with B divisible by the number of devices in `mesh`.
    mesh: the mesh from `make_mesh`.

  Returns:
    `[B, ...]` jax.Array with sharding `batch_sharding(mesh)`.
  """
  array = np.asarray(array)
  if array.ndim == 0 or array.shape[0] % mesh.size:
    raise ValueError(f'array must have a leading axis divisible by the {mesh.size} devices of the mesh, '
                     f'got shape {array.shape}.')
  return jax.make_array_from_process_local_data(batch_sharding(mesh), array, array.shape)


def replicate(array, mesh: Mesh) -> jax.Array:
  """A global array with a full copy of `array` (held in full by every host) on every device."""
  array = np.asarray(array)
  return jax.make_array_from_process_local_data(replicated(mesh), array, array.shape)


def program_barrier(mesh: Mesh):
  """`jax.block_until_ready` where each program must finish before the next is dispatched, else identity.

  XLA:CPU runs every device of a multi-device program on one shared thread pool: two such programs
  in flight at once (the next batch's gather beside this step's collectives) can each hold part of
  the pool at a rendezvous and wait for the rest forever ("Termination timeout for all to all",
  seen with 8 fake CPU devices). So on a multi-device CPU mesh the loop waits for each program;
  accelerators keep the overlap.
  """
  if mesh.devices.size > 1 and mesh.devices.flat[0].platform == 'cpu':
    return jax.block_until_ready
  return lambda x: x
