"""The three denoisers of a run (`Nets`) and their calling convention (apply, generate)."""

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Nets:
  """The three denoisers. `gen` and `fake` are Linen preconditioners (same architecture), or `gen`
  is a networks.generators module (z, labels) -> x when gen_is_denoiser is False;
  `teacher(frozen_teacher, x, sigma, labels)` is the frozen teacher's D(x, sigma)."""
  gen: Any
  fake: Any
  teacher: Callable[..., jnp.ndarray]
  data_shape: Tuple[int, ...]     # per-sample shape, e.g. (32, 32, 3) or (2,).
  label_dim: int
  gen_is_denoiser: bool = True


def variables(params: Any, buffers: Any) -> Dict[str, Any]:
  """Linen variables {'params', 'buffers' (when non-empty)}."""
  return {"params": params, **({"buffers": buffers} if buffers else {})}


def apply(module, params, buffers, x, sigma, labels, *, train, key, augment_labels=None,
          return_features=False):
  """module.apply with the design's calling convention; dropout rng only when training."""
  rngs = {"dropout": key} if train else None
  return module.apply(variables(params, buffers), x, sigma, labels, augment_labels, train=train,
                      return_features=return_features, rngs=rngs)


def generate(nets: Nets, params: Any, buffers: Any, z: jnp.ndarray, labels: Optional[jnp.ndarray],
             sigma_init: float, *, train: bool = False, key=None) -> jnp.ndarray:
  """One-step generator x_g = G(sigma_init * z, sigma_init, labels); z [B, *data_shape] ~ N(0, I).
  A generator that is not a denoiser maps x_g = G(z, labels) (no buffers, no sigma)."""
  if not nets.gen_is_denoiser:
    return nets.gen.apply({"params": params}, z, labels, train=train)
  sigma = jnp.full((z.shape[0],), sigma_init, jnp.float32)
  return apply(nets.gen, params, buffers, sigma_init * z, sigma, labels, train=train, key=key)
