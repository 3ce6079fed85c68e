"""Training state pytree, generator EMA, optimizers and preemption-safe checkpoints.

The state holds everything a resumed run needs besides the data position (saved alongside it as
JSON metadata): generator params, their EMA, fake-score params, the two Adam states, the step,
the images seen and the base RNG key (raw uint32 key data, so it checkpoints like any array).
"""

import hashlib
import pathlib
from typing import Any, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp


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
  """A checkpoint directory exists but cannot be restored."""


class Checkpointer:
  """Orbax CheckpointManager of {'state': TrainState, 'meta': JSON dict} under W/<name>.

  Saves are atomic (orbax writes to a temporary dir and renames) and the last `keep` steps are kept.
  W/checkpoints holds the latest steps; W/checkpoints-best the best-FID one (keep=1).
  """

  def __init__(self, workdir: pathlib.Path, keep: int, name: str = "checkpoints"):
    self.directory = pathlib.Path(workdir).resolve() / name
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, meta: Dict[str, Any]) -> None:
    """Writes step `step` (blocking, so a kill after return never loses it)."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def restore(self, abstract_state: TrainState, step: Optional[int] = None
              ) -> Tuple[TrainState, Dict[str, Any]]:
    """Restores (state placed like `abstract_state`'s shardings, meta) of `step` or the latest."""
    step = self.latest_step() if step is None else step
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for unreadable or mismatched trees
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointError(f"cannot restore checkpoint step {step} in {self.directory}: "
                            f"{first}") from e
    return restored["state"], restored["meta"]

  def close(self) -> None:
    self.manager.close()


def abstract_like(state: TrainState, shardings: Any) -> TrainState:
  """ShapeDtypeStructs of `state` carrying `shardings` (the restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)

