"""Training state pytree, generator EMA, optimizers and preemption-safe checkpoints.

The state holds everything a resumed run needs besides the data position (saved alongside it as
JSON metadata): generator params, their EMA, fake-score params, the two Adam states, the step,
the images seen and the base RNG key (raw uint32 key data, so it checkpoints like any array).
"""

import hashlib
import json
import time
from typing import Any, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from uni_instruct_jax import paths


@flax.struct.dataclass
class TrainState:
  """Distillation state (a pytree; all leaves are arrays).

  gen_params / ema_params / fake_params: network 'params' trees (float32).
  gen_opt / fake_opt: optax states. step: int32 scalar (updates done). images_seen: int64-free
  int32 count of real images consumed (global). rng: uint32[2] raw key data. disc_updates: int32
  count of discriminator updates (0 while it has never trained; steps checks every ratio read).
  """
  gen_params: Any
  ema_params: Any
  fake_params: Any
  gen_opt: Any
  fake_opt: Any
  step: jnp.ndarray
  images_seen: jnp.ndarray
  rng: jnp.ndarray
  disc_updates: jnp.ndarray


def make_optimizer(lr: float, b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  """Adam as in the recipe (beta=(0, 0.999), eps 1e-8)."""
  return optax.adam(learning_rate=lr, b1=b1, b2=b2, eps=eps)


def create_state(gen_params: Any, fake_params: Any, gen_tx: optax.GradientTransformation,
                 fake_tx: optax.GradientTransformation, seed: int) -> TrainState:
  """A fresh state: EMA = generator, zero counters, RNG from `seed`."""
  return TrainState(
      gen_params=gen_params,
      ema_params=jax.tree.map(jnp.array, gen_params),
      fake_params=fake_params,
      gen_opt=gen_tx.init(gen_params),
      fake_opt=fake_tx.init(fake_params),
      step=jnp.zeros((), jnp.int32),
      images_seen=jnp.zeros((), jnp.int32),
      rng=jax.random.key_data(jax.random.key(seed)),
      disc_updates=jnp.zeros((), jnp.int32))


def ema_beta(batch_size: int, images_seen: jnp.ndarray, halflife_kimg: float,
             rampup_ratio: Optional[float]) -> jnp.ndarray:
  """EMA decay for one step of `batch_size` images: 0.5 ** (batch / halflife_images).

  halflife_images = min(halflife_kimg * 1000, rampup_ratio * images_seen) when a ramp is set
  (EDM/SiD convention), floored at 1e-8.
  """
  halflife = jnp.asarray(halflife_kimg * 1000.0, jnp.float32)
  if rampup_ratio is not None:
    halflife = jnp.minimum(halflife, rampup_ratio * images_seen.astype(jnp.float32))
  return 0.5 ** (batch_size / jnp.maximum(halflife, 1e-8))


def ema_update(ema_params: Any, params: Any, beta: jnp.ndarray) -> Any:
  """theta_ema <- beta * theta_ema + (1 - beta) * theta."""
  return jax.tree.map(lambda e, p: beta * e + (1.0 - beta) * p, ema_params, params)


def params_sha256(params: Any) -> str:
  """sha256 of float32 parameters, leaves in sorted key-path order (shape and bytes)."""
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    arr = np.ascontiguousarray(np.asarray(leaf, np.float32))
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(str(arr.shape).encode())
    digest.update(arr.tobytes())
  return digest.hexdigest()


class CheckpointError(ValueError):
  """A checkpoint directory exists but cannot be restored (or a save cannot be written)."""


def _host_array(x: Any) -> np.ndarray:
  """The full value of a leaf on this host: the local copy when this process holds every element
  (fully addressable or replicated over the processes), else gathered from all processes (a
  collective: every process must call it)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def tree_digest(tree: Any) -> Dict[str, str]:
  """{key path: sha256 hex of the leaf's dtype, shape and C-order bytes} of a pytree.

  The digest is of each array's full value, independent of how it is sharded: a checkpoint saved
  on one mesh verifies after a restore onto another. Leaves sharded over several processes are
  gathered first (every process computes the same digests; only the values are hashed, so the
  cost is one pass over the state per save and per restore).
  """
  digests = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    arr = np.ascontiguousarray(_host_array(leaf))
    digest = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    digest.update(arr.tobytes())
    digests[jax.tree_util.keystr(path)] = digest.hexdigest()
  return digests


FILE_DIGESTS = "file_digests.json"


def file_digests(step_dir: Any) -> Dict[str, str]:
  """{relative path: sha256 hex} of every file under a saved step directory (local or gs://),
  except the FILE_DIGESTS record itself."""
  step_dir = paths.workdir_path(step_dir)
  digests, todo = {}, [step_dir]
  while todo:  # epath has no recursive glob on object stores: walk the listing
    for path in todo.pop().iterdir():
      if path.is_dir():
        todo.append(path)
      elif path.name != FILE_DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as f:
          for chunk in iter(lambda: f.read(1 << 22), b""):  # pylint: disable=cell-var-from-loop
            digest.update(chunk)
        digests[str(path.relative_to(step_dir))] = digest.hexdigest()
  return dict(sorted(digests.items()))


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else type(e).__name__


class Checkpointer:
  """Orbax CheckpointManager of {'state': TrainState, 'meta': JSON dict, 'digest': JSON dict}
  under W/<name>.

  Saves are atomic (orbax writes a temporary directory and renames it; a kill mid-save leaves
  only that directory, which the next run deletes) and the last `keep` steps are kept.
  'digest' holds `tree_digest(state)`, checked on every restore, so a changed byte in any array
  is refused instead of restored; after the save, process 0 also records the sha256 of every file
  of the step in `<step>/file_digests.json` (checked before a restore: a flip in any byte, even
  one the restore would not read, refuses the step). W/checkpoints holds the latest steps;
  W/checkpoints-best the best-FID one (keep=1).
  """

  def __init__(self, workdir: paths.PathLike, keep: int, name: str = "checkpoints",
               read_only: bool = False):
    self.directory = paths.workdir_path(workdir) / name  # gs:// kept: orbax reads epath
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                             read_only=read_only,
                                             cleanup_tmp_directories=not read_only,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, meta: Dict[str, Any]) -> None:
    """Writes step `step` (blocking, so a kill after return never loses it). A step already on
    disk is kept as it is (the state of a step is deterministic), so a rerun never fails on it.
    CheckpointError (one line) when the directory cannot be written (disk full, read-only)."""
    if step in self.manager.all_steps():
      return
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
          digest=ocp.args.JsonSave(tree_digest(state))), force=True)
      self.manager.wait_until_finished()
      if jax.process_index() == 0:  # after orbax's final barrier: every process's files exist
        step_dir = paths.workdir_path(self.directory) / str(step)
        paths.write_text(step_dir / FILE_DIGESTS, json.dumps(file_digests(step_dir), indent=1))
    except (OSError, ValueError, RuntimeError) as e:  # tensorstore reports I/O errors as these
      raise CheckpointError(f"cannot write checkpoint step {step} in {self.directory}: "
                            f"{_first_line(e)}") from e

  def restore(self, abstract_state: TrainState, step: Optional[int] = None
              ) -> Tuple[TrainState, Dict[str, Any]]:
    """Restores (state placed like `abstract_state`'s shardings, meta) of `step` or the latest,
    verifying every array against the saved digest (CheckpointError on any difference)."""
    step = self.latest_step() if step is None else step
    self._check_files(step)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore(),
          digest=ocp.args.JsonRestore()))
      saved, state = restored["digest"], restored["state"]
      if not isinstance(saved, dict) or not isinstance(restored["meta"], dict):
        raise ValueError("digest or meta is not a JSON object")
    except Exception as e:  # orbax raises many types for unreadable or mismatched trees
      raise CheckpointError(f"cannot restore checkpoint step {step} in {self.directory}: "
                            f"{_first_line(e)}") from e
    actual = tree_digest(state)
    bad = sorted(k for k in set(saved) | set(actual) if saved.get(k) != actual.get(k))
    if bad:
      raise CheckpointError(f"checkpoint step {step} in {self.directory}: {len(bad)} array(s) "
                            f"differ from the saved digest (first: {bad[0]})")
    return state, restored["meta"]

  def _check_files(self, step: int) -> None:
    """CheckpointError unless every file of `step` has the sha256 recorded after its save. A
    step without the record (a kill between orbax's commit and that write) is checked by the
    array digests alone."""
    step_dir = paths.workdir_path(self.directory) / str(step)
    record = step_dir / FILE_DIGESTS
    if not record.exists():
      return
    try:
      saved = json.loads(record.read_text())
      actual = file_digests(step_dir)
    except (OSError, ValueError) as e:
      raise CheckpointError(f"cannot verify checkpoint step {step} in {self.directory}: "
                            f"{_first_line(e)}") from e
    bad = sorted(k for k in saved if saved[k] != actual.get(k)) if isinstance(saved, dict) else [
        FILE_DIGESTS]
    if bad:
      raise CheckpointError(f"checkpoint step {step} in {self.directory}: {len(bad)} file(s) "
                            f"missing or changed since the save (first: {bad[0]})")

  def restore_latest_intact(self, abstract_state: TrainState, move_damaged: bool = True
                            ) -> Optional[Tuple[TrainState, Dict[str, Any], int]]:
    """(state, meta, step) of the newest checkpoint that restores and verifies; None when there
    is no checkpoint. A damaged newer one is reported on one line and, when `move_damaged`
    (process 0 of a writing run), renamed to `<step>.corrupt-<UTC time>` (kept for inspection;
    orbax no longer lists it). CheckpointError when every checkpoint is damaged."""
    damaged = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, meta = self.restore(abstract_state, step)
      except CheckpointError as e:
        damaged.append((step, str(e)))
        continue
      self._report_damaged(damaged, move_damaged, f"resuming from step {step}")
      return state, meta, step
    if damaged:
      self._report_damaged(damaged, move_damaged, "no intact checkpoint left")
      steps = ", ".join(str(s) for s, _ in damaged)
      raise CheckpointError(f"no intact checkpoint in {self.directory} (damaged steps {steps}: "
                            f"{damaged[0][1]})")
    return None

  def _report_damaged(self, damaged, move: bool, outcome: str) -> None:
    for step, reason in damaged:
      where = "left in place"
      if move and jax.process_index() == 0:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.directory / f"{step}.corrupt-{stamp}"
        (self.directory / str(step)).rename(target)
        where = f"moved to {target.name}"
      if jax.process_index() == 0:
        print(f"warning: {reason}; {where}; {outcome}", flush=True)
    if damaged and move:
      self.manager.reload()

  def close(self) -> None:
    self.manager.close()


def abstract_like(state: TrainState, shardings: Any) -> TrainState:
  """ShapeDtypeStructs of `state` carrying `shardings` (the restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)

