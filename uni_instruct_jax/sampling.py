"""Sampling: EDM's Heun sampler for teachers, one-step generation, uint8 images and PNG grids.

`heun_sampler` follows NVlabs/edm `generate.py:edm_sampler` (Karras et al. 2022, Alg. 2): the
Karras rho-schedule is computed on the host in float64 (as EDM does) and cast to float32; each of
the N steps optionally "churns" (adds noise to raise sigma from t_i to t_hat_i), takes an Euler
step to t_{i+1} and, except on the last step (t_N = 0), a second-order Heun correction, so it
costs `nfe(N) = 2N - 1` denoiser calls. The loop is a `lax.fori_loop` over the precomputed grid,
so the sampler is traceable inside `jax.jit`, and it runs batch-sharded when the latents are
(see `make_heun_sampler`).

Denoisers are called as `denoise_fn(x, sigma, class_labels) -> D` with x [B, ...] float32, sigma
[B] float32 (noise std, data units) and class_labels [B, label_dim] one-hot or None.
"""

import functools
import math
import os
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from uni_instruct_jax import parallel
from uni_instruct_jax import paths

DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray, Optional[jnp.ndarray]], jnp.ndarray]


class SamplingError(ValueError):
  """Raised for invalid sampler settings or inputs (shapes, schedule parameters, missing key)."""


def nfe(num_steps: int) -> int:
  """Denoiser evaluations of an N-step Heun sampler: 2N - 1 (no correction on the last step)."""
  _check_num_steps(num_steps)
  return 2 * num_steps - 1


def _check_num_steps(num_steps: int) -> None:
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 2:
    raise SamplingError(f"num_steps must be an integer >= 2, got {num_steps!r}")


def karras_schedule(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.,
                    rho: float = 7.) -> np.ndarray:
  """EDM time steps t_0 = sigma_max > ... > t_{N-1} = sigma_min, t_N = 0: float64 [N + 1].

  t_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
  """
  _check_num_steps(num_steps)
  if not (0 < sigma_min <= sigma_max < math.inf):
    raise SamplingError(f"need 0 < sigma_min <= sigma_max < inf, got sigma_min={sigma_min}, "
                        f"sigma_max={sigma_max}")
  if not (0 < rho < math.inf):
    raise SamplingError(f"rho must be positive and finite, got {rho}")
  i = np.arange(num_steps, dtype=np.float64)
  lo, hi = np.float64(sigma_min) ** (1 / rho), np.float64(sigma_max) ** (1 / rho)
  t = (hi + i / (num_steps - 1) * (lo - hi)) ** rho
  return np.concatenate([t, np.zeros(1)])


def _heun_grid(num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise):
  """Host float64 grid -> float32 [N] arrays t_cur, t_hat (after churn), t_next, churn noise std."""
  t = karras_schedule(num_steps, sigma_min, sigma_max, rho)
  t_cur, t_next = t[:-1], t[1:]
  in_range = (S_min <= t_cur) & (t_cur <= S_max)
  gamma = np.where(in_range, min(S_churn / num_steps, np.sqrt(2.0) - 1.0), 0.0)
  t_hat = t_cur + gamma * t_cur
  noise_std = np.sqrt(t_hat**2 - t_cur**2) * S_noise
  return tuple(a.astype(np.float32) for a in (t_cur, t_hat, t_next, noise_std))


def heun_sampler(denoise_fn: DenoiseFn, latents: jnp.ndarray,
                 class_labels: Optional[jnp.ndarray] = None, *, key: Optional[jax.Array] = None,
                 num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.,
                 rho: float = 7., S_churn: float = 0., S_min: float = 0.,  # pylint: disable=invalid-name
                 S_max: float = float("inf"), S_noise: float = 1.,  # pylint: disable=invalid-name
                 net_sigma_min: float = 0., net_sigma_max: float = float("inf")) -> jnp.ndarray:
  """EDM's (stochastic) Heun sampler; returns samples x_0 [B, ...] float32 in data units.

  Args:
    denoise_fn: `denoise_fn(x, sigma [B], class_labels) -> D(x, sigma)` of x's shape.
    latents: standard normal noise [B, ...]; the chain starts at x = latents * sigma_max.
    class_labels: one-hot [B, label_dim] passed to every denoiser call, or None.
    key: PRNG key for the churn noise; required when S_churn > 0.
    num_steps: N >= 2 (EDM CIFAR-10: 18 = 35 NFE; ImageNet-64: 256).
    sigma_min, sigma_max, rho: Karras schedule; the range is clipped to the network's
      [net_sigma_min, net_sigma_max] as EDM does (max(0.002, net.sigma_min), ...).
    S_churn, S_min, S_max, S_noise: stochasticity; gamma = min(S_churn / N, sqrt(2) - 1) on steps
      with S_min <= t_i <= S_max (EDM ImageNet-64: 40, 0.05, 50, 1.003).
  """
  if latents.ndim < 2:
    raise SamplingError(f"latents must be batched [B, ...], got shape {latents.shape}")
  batch = latents.shape[0]
  if class_labels is not None and (class_labels.ndim != 2 or class_labels.shape[0] != batch):
    raise SamplingError(f"class_labels must have shape [{batch}, label_dim], got "
                        f"{class_labels.shape}")
  t_cur, t_hat, t_next, noise_std = _heun_grid(
      num_steps, max(sigma_min, net_sigma_min), min(sigma_max, net_sigma_max), rho,
      S_churn, S_min, S_max, S_noise)
  stochastic = bool(np.any(noise_std > 0))
  if stochastic and key is None:
    raise SamplingError("heun_sampler needs a PRNG `key` when S_churn > 0")

  def denoise(x, sigma):
    d = denoise_fn(x, jnp.full((batch,), sigma, jnp.float32), class_labels)
    if d.shape != x.shape:
      raise SamplingError(f"denoise_fn returned shape {d.shape} for input of shape {x.shape}")
    return d.astype(jnp.float32)

  def step(i, x, grid, heun):
    hat, nxt, std = (g[i] for g in grid)
    if stochastic:  # churn: raise the noise level of x from t_cur to t_hat
      x = x + std * jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
    d_cur = (x - denoise(x, hat)) / hat
    x_next = x + (nxt - hat) * d_cur
    if heun:
      d_prime = (x_next - denoise(x_next, nxt)) / nxt
      x_next = x + (nxt - hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next

  grid = tuple(jnp.asarray(g) for g in (t_hat, t_next, noise_std))
  x = latents.astype(jnp.float32) * t_cur[0]
  x = jax.lax.fori_loop(0, num_steps - 1, functools.partial(step, grid=grid, heun=True), x)
  return step(num_steps - 1, x, grid, heun=False)  # Euler to t_N = 0


def make_class_labels(key: Optional[jax.Array], batch: int, label_dim: int,
                      class_idx: Optional[int] = None) -> Optional[jnp.ndarray]:
  """One-hot labels [batch, label_dim] float32 (None when label_dim == 0), as EDM's generate.py:
  rows of eye(label_dim) at uniformly random classes, or all `class_idx` when given."""
  if label_dim == 0:
    return None
  if class_idx is not None:
    if not 0 <= class_idx < label_dim:
      raise SamplingError(f"class_idx {class_idx} is outside [0, {label_dim})")
    classes = jnp.full((batch,), class_idx)
  else:
    if key is None:
      raise SamplingError("make_class_labels needs a PRNG key for random classes")
    classes = jax.random.randint(key, (batch,), 0, label_dim)
  return jax.nn.one_hot(classes, label_dim, dtype=jnp.float32)


def one_step_generate(generator_fn: DenoiseFn, key: jax.Array, batch: int, shape: Sequence[int],
                      class_labels: Optional[jnp.ndarray] = None, *, label_dim: int = 0,
                      sigma_init: float = 2.5) -> jnp.ndarray:
  """One-step samples x_g = G(sigma_init z, sigma_init, c) [batch, *shape] float32, z ~ N(0, I).

  `generator_fn(x, sigma [B], class_labels)` is the distilled generator (a denoiser network);
  `shape` is one sample's shape (H, W, C) or (dim,). With label_dim > 0 and no class_labels,
  random one-hot labels are drawn from `key`.
  """
  key_z, key_c = jax.random.split(key)
  if class_labels is None:
    class_labels = make_class_labels(key_c, batch, label_dim)
  elif class_labels.shape[0] != batch:
    raise SamplingError(f"class_labels has {class_labels.shape[0]} rows for batch {batch}")
  z = jax.random.normal(key_z, (batch, *shape), jnp.float32)
  sigma = jnp.full((batch,), sigma_init, jnp.float32)
  return generator_fn(sigma_init * z, sigma, class_labels).astype(jnp.float32)


def make_heun_sampler(apply_fn: Callable[..., jnp.ndarray], mesh: Optional[jax.sharding.Mesh] = None,
                      **sampler_kwargs) -> Callable[..., jax.Array]:
  """Jitted, batch-sharded Heun sampler.

  Returns `sample(variables, latents, class_labels=None, key=None) -> x_0` where
  `apply_fn(variables, x, sigma, class_labels)` is the denoiser (e.g. `model.apply`); latents and
  labels are placed with the batch split over the mesh's 'data' axis (default mesh: all devices),
  variables are passed as arguments (not baked into the program), and x_0 keeps the batch sharding.
  `sampler_kwargs` are `heun_sampler`'s keyword arguments (num_steps, S_churn, ...).
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  batch_sharding = parallel.data_sharding(mesh)

  @functools.partial(jax.jit, out_shardings=batch_sharding)
  def run(variables, latents, class_labels, key):
    return heun_sampler(functools.partial(apply_fn, variables), latents, class_labels, key=key,
                        **sampler_kwargs)

  def sample(variables, latents, class_labels=None, key=None):
    if latents.shape[0] % parallel.data_size(mesh):
      raise SamplingError(f"batch {latents.shape[0]} is not divisible by the "
                          f"{parallel.data_size(mesh)} devices of the 'data' mesh axis")
    latents, class_labels = jax.device_put((latents, class_labels), batch_sharding)
    return run(variables, latents, class_labels, key)

  return sample


def to_uint8(x: jnp.ndarray) -> jnp.ndarray:
  """Images in [-1, 1] (any layout) -> uint8 as EDM's generate.py: (x 127.5 + 128).clip(0, 255)."""
  return jnp.clip(jnp.asarray(x, jnp.float32) * 127.5 + 128, 0, 255).astype(jnp.uint8)


def image_grid(images: Any, grid: Optional[Tuple[int, int]] = None) -> np.ndarray:
  """Tiles images [B, H, W, C] (uint8, or float in [-1, 1]) into one [rows H, cols W, C] uint8.

  Default grid: cols = ceil(sqrt(B)), rows = ceil(B / cols); unused cells are black.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
    raise SamplingError(f"images must be NHWC [B, H, W, 1 or 3] with B > 0, got {images.shape}")
  if images.dtype != np.uint8:
    images = np.asarray(to_uint8(images))
  b, h, w, c = images.shape
  if grid is None:
    cols = math.ceil(math.sqrt(b))
    grid = (math.ceil(b / cols), cols)
  rows, cols = grid
  if rows * cols < b:
    raise SamplingError(f"grid {rows}x{cols} is too small for {b} images")
  canvas = np.zeros((rows * cols, h, w, c), np.uint8)
  canvas[:b] = images
  return canvas.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def save_image_grid(images: Any, path: Union[str, os.PathLike],
                    grid: Optional[Tuple[int, int]] = None) -> None:
  """Writes `image_grid(images, grid)` as a PNG (grayscale for C = 1, RGB for C = 3)."""
  tiled = image_grid(images, grid)
  path = paths.workdir_path(path)  # local or gs://
  paths.makedirs(path.parent)
  with paths.open_file(path, "wb") as f:
    Image.fromarray(tiled[..., 0] if tiled.shape[-1] == 1 else tiled).save(f, format="PNG")
