"""Device mesh, shardings and global batches (jax.jit over global arrays; no pmap).

The mesh has two axes: 'data' (the batch is split over it) and 'model' (optional parameter
sharding for large networks; size 1 by default). Every process feeds its own slice of the global
batch and `global_batch` assembles the global `jax.Array`. `initialize_distributed` joins the
processes of a multi-host job (or fails loudly) before anything touches a device.
"""

import atexit
import os
import socket
import sys
import threading
import time
from typing import Any, Optional

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"
# A process that sends no heartbeat for this long counts as dead and the others stop with an
# error (JAX's default is 100 s).
HEARTBEAT_TIMEOUT_S = 50
# How long processes wait for each other (and for the coordinator) at start-up: workers of a pod
# start minutes apart.
INITIALIZATION_TIMEOUT_S = 300
# Exit code of a process whose peer died (see `exit_on_peer_failure`, `start_peer_watchdog`).
EXIT_PEER_LOST = 3
# The peer watchdog's timeout: below HEARTBEAT_TIMEOUT_S, so its one-line error comes before
# JAX's fatal abort (a stack dump) for a peer that died while this process waits.
PEER_TIMEOUT_S = 15
_BEAT_DIR = "uni_instruct_jax/beat/"


class DistributedSetupError(ValueError):
  """A multi-process job that cannot start: bad arguments, unreachable coordinator."""


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name, "")
  try:
    return int(value) if value else None
  except ValueError:
    raise DistributedSetupError(f"{name}={value!r} is not an integer") from None


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Returns once a TCP connection to host:port succeeds; DistributedSetupError after timeout_s
  (JAX's client would abort the process with a stack trace instead of raising)."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise DistributedSetupError(f"coordinator address {address!r} is not host:port")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise DistributedSetupError(
            f"coordinator {address} unreachable for {timeout_s:g} s ({e}); is process 0 running "
            f"and is the address reachable from this host?") from None
      time.sleep(0.5)


def _cluster_environment() -> Optional[str]:
  """The cluster JAX would auto-detect (Cloud TPU, SLURM, Open MPI, Kubernetes) or None."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top  # initialize()'s own probe
  env = next((e for e in clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
              if not e.opt_in_only_method and e.is_env_present()), None)
  return None if env is None else env.__name__


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, *,
                           heartbeat_timeout_seconds: int = HEARTBEAT_TIMEOUT_S,
                           initialization_timeout: int = INITIALIZATION_TIMEOUT_S) -> bool:
  """Joins the multi-process job (`jax.distributed.initialize`); returns False for one process.

  Arguments left None come from JAX_COORDINATOR_ADDRESS (which JAX itself reads),
  JAX_NUM_PROCESSES and JAX_PROCESS_ID; what is still unset JAX detects on Cloud TPU, SLURM,
  Open MPI and Kubernetes. A single process (num_processes == 1, or nothing given and no cluster
  detected) skips the call. Anything else that fails (unreachable coordinator, missing or
  inconsistent arguments) raises DistributedSetupError with one line: a job must never silently
  split into independent runs sharing one workdir.
  """
  if jax.distributed.is_initialized():
    return True
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  count = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  index = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  if count == 1 and index in (None, 0):
    return False
  if address is None and count is None and index is None:
    cluster = _cluster_environment()
    if cluster is None:
      logging.info("single process: no coordinator given and no cluster environment detected")
      return False
    logging.info("jax.distributed: detected %s", cluster)
  if address is not None and index not in (None, 0):
    _wait_for_coordinator(address, initialization_timeout)
  try:
    jax.distributed.initialize(address, count, index,
                               initialization_timeout=initialization_timeout,
                               heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  except Exception as e:  # pylint: disable=broad-except  # ValueError, (Xla)RuntimeError, ...
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    raise DistributedSetupError(
        f"jax.distributed.initialize(coordinator_address={address}, num_processes={count}, "
        f"process_id={index}) failed: {lines[0] if lines else type(e).__name__}") from e
  logging.info("process %d of %d (coordinator %s)", jax.process_index(), jax.process_count(),
               address or "auto-detected")
  start_peer_watchdog()
  return True


def _peer_lost(reason: str) -> None:
  """One `error:` line on stderr and exit EXIT_PEER_LOST at once (no jax.distributed barrier)."""
  sys.stdout.flush()
  print(f"error: process {jax.process_index()} of {jax.process_count()}: {reason}; rerun the "
        "job to resume from the last checkpoint", file=sys.stderr, flush=True)
  os._exit(EXIT_PEER_LOST)  # pylint: disable=protected-access


def start_peer_watchdog(interval_s: float = 2.0, timeout_s: float = PEER_TIMEOUT_S) -> None:
  """Daemon thread of a multi-process job: publishes a beat in the coordination service's
  key-value store every interval_s and ends the process through `_peer_lost` when a peer's beat
  has not changed for timeout_s (it died; the others would otherwise wait in a collective or a
  checkpoint barrier until JAX aborts them) or the store is unreachable (process 0 died)."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  if client is None or jax.process_count() == 1:
    return
  me = jax.process_index()
  exiting = threading.Event()

  def on_exit():  # runs before jax.distributed's own exit handler (atexit is LIFO)
    exiting.set()
    try:  # a finished process is not a dead one: peers still at work keep going
      client.key_value_set(f"{_BEAT_DIR}{me}", "exit", allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass
  atexit.register(on_exit)

  def watch():
    changed, beat = {}, 0  # peer -> (last beat seen, local time it changed)
    while not exiting.is_set():
      beat += 1
      try:
        client.key_value_set(f"{_BEAT_DIR}{me}", str(beat), allow_overwrite=True)
        beats = dict(client.key_value_dir_get(_BEAT_DIR))
      except Exception as e:  # pylint: disable=broad-except  # XlaRuntimeError and kin
        if exiting.is_set():
          return
        lines = str(e).strip().splitlines()
        _peer_lost(f"the coordination service is unreachable ({lines[0] if lines else e!r})")
      now = time.monotonic()
      for key, value in beats.items():
        if changed.get(key, (None,))[0] != value:
          changed[key] = (value, now)
      stale = [key.rsplit("/", 1)[-1] for key, (value, t) in changed.items()
               if value != "exit" and now - t > timeout_s]
      if stale:
        _peer_lost(f"process {stale[0]} sent no heartbeat for {timeout_s:g} s (died or "
                   "unreachable)")
      time.sleep(interval_s)
  threading.Thread(target=watch, name="peer-watchdog", daemon=True).start()


def exit_on_peer_failure(error: BaseException) -> None:
  """Ends a multi-process job's process whose collective failed (another process died, was
  preempted or is unreachable) with one `error:` line and EXIT_PEER_LOST, at once: the normal exit
  would wait in jax.distributed's shutdown barrier for the dead peer, then abort with a stack dump.
  Returns (the caller re-raises) for one process and for other errors."""
  if jax.process_count() == 1 or not isinstance(error, jax.errors.JaxRuntimeError):
    return
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  _peer_lost("a collective failed, another process of the job died or is unreachable "
             f"({lines[0] if lines else 'no detail'})")


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


def process_rows(x: Any) -> np.ndarray:
  """Rows [p n / P, (p + 1) n / P) of x [n, ...] for this process p of P, as numpy: read from
  this process's shards of a global array (sharded on axis 0 over a process-major mesh, or
  replicated), never gathered from other hosts; a numpy x is sliced. n must divide by P."""
  n, index, count = x.shape[0], jax.process_index(), jax.process_count()
  if n % count:
    raise ValueError(f"a batch of {n} rows does not split over {count} processes")
  lo, hi = index * n // count, (index + 1) * n // count
  if not isinstance(x, jax.Array):
    return np.asarray(x[lo:hi])
  out, filled = np.empty((hi - lo,) + x.shape[1:], x.dtype), np.zeros(hi - lo, bool)
  for shard in x.addressable_shards:
    start, stop, _ = shard.index[0].indices(n) if shard.index else (0, n, 1)
    a, b = max(start, lo), min(stop, hi)
    if a < b:
      out[a - lo:b - lo] = np.asarray(shard.data)[a - start:b - start]
      filled[a - lo:b - lo] = True
  if not filled.all():
    raise ValueError(f"process {index} does not hold rows [{lo}, {hi}) of the global array")
  return out


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
