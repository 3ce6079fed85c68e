"""Device mesh, shardings and global batches (jax.jit over global arrays; no pmap).

The mesh has two axes: 'data' (the batch is split over it) and 'model' (optional parameter
sharding for large networks; size 1 by default). Every process feeds its own slice of the global
batch and `global_batch` assembles the global `jax.Array`.
"""

from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"


def initialize_distributed() -> None:
  """Calls `jax.distributed.initialize()` on multi-host runs; a no-op on one host.

  On Cloud TPU pods and SLURM/MPI clusters JAX discovers the coordinator itself; on a single
  machine the call raises ValueError (nothing to discover), which is ignored.
  """
  try:
    jax.distributed.initialize()
  except (ValueError, RuntimeError) as e:  # single host, or already initialised
    logging.info("jax.distributed.initialize() skipped: %s", str(e).splitlines()[0])


def make_mesh(model_parallelism: int = 1, devices=None) -> Mesh:
  """A ('data', 'model') mesh over all devices; 'data' gets devices // model_parallelism."""
  devices = jax.devices() if devices is None else list(devices)
  if model_parallelism < 1 or len(devices) % model_parallelism:
    raise ValueError(f"model_parallelism={model_parallelism} does not divide the "
                     f"{len(devices)} devices")
  grid = np.asarray(devices).reshape(len(devices) // model_parallelism, model_parallelism)
  return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'; other axes replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated placement."""
  return NamedSharding(mesh, P())


def data_size(mesh: Mesh) -> int:
  """Number of devices along the batch axis."""
  return mesh.shape[DATA_AXIS]


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """This process's share of a global batch; checks divisibility by the data axis."""
  if global_batch_size % data_size(mesh):
    raise ValueError(f"global batch {global_batch_size} is not divisible by the "
                     f"{data_size(mesh)} devices of the 'data' mesh axis")
  return global_batch_size // jax.process_count()


def global_batch(mesh: Mesh, local: Any) -> Any:
  """Assembles per-process numpy batches (a pytree) into global arrays sharded on 'data'."""
  sharding = data_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def to_host(tree: Any) -> Any:
  """Fetches a pytree of (possibly sharded, multi-host) global arrays to numpy on every host."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, tree)


def param_shardings(mesh: Mesh, tree: Any) -> Any:
  """Placement of a parameter/state pytree: replicated, or with model parallelism the last axis of
  every array of rank >= 2 whose size divides by the 'model' axis split over it."""
  model = mesh.shape[MODEL_AXIS]

  def place(x):
    shape = getattr(x, "shape", ())
    if model > 1 and len(shape) >= 2 and shape[-1] % model == 0:
      return NamedSharding(mesh, P(*([None] * (len(shape) - 1)), MODEL_AXIS))
    return replicated(mesh)
  return jax.tree.map(place, tree)
