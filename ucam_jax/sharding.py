"""Data parallelism: one ('data',) mesh over every device; parameters replicated, batches split.

Multi-host: each process feeds its local slice of the global batch and the arrays are assembled
with `jax.make_array_from_process_local_data`, so the same code runs on one CPU or a TPU pod.
"""

import jax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A ('data',) mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), ('data',), axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel(mesh) -> NamedSharding:
  """Leading (batch) axis split over the 'data' axis."""
  return NamedSharding(mesh, P('data'))


def shard_batch(batch, mesh):
  """Process-local numpy batch -> global jax arrays split over devices along the batch axis."""
  sharding = data_parallel(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def to_host(tree):
  """Global jax arrays -> numpy arrays holding their whole value, on every process. np.asarray
  cannot read an array split over several processes' devices; this gathers it first."""
  return multihost_utils.process_allgather(tree, tiled=True)
