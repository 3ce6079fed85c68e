"""Isotropic Gaussian-mixture toy data with its exact EDM denoiser, sliced W2 and mode coverage.

The data law is p_0 = sum_k w_k N(mu_k, s^2 I) in `dim` dimensions. Adding EDM noise of std sigma
gives the noisy marginal p_sigma = sum_k w_k N(mu_k, (s^2 + sigma^2) I), so the denoiser (posterior
mean E[x_0 | x_0 + sigma n = x]), the score and the log-density are all closed-form at every sigma:

  r_k(x, sigma) = softmax_k(log w_k - |x - mu_k|^2 / (2 (s^2 + sigma^2)))   (responsibilities)
  D(x, sigma)   = sum_k r_k (s^2 x + sigma^2 mu_k) / (s^2 + sigma^2)
  grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2 = sum_k r_k (mu_k - x) / (s^2 + sigma^2)

The default `ring()` is the classic "8 Gaussians" toy scaled to EDM's sigma_data = 0.5: 8 equally
weighted modes on a circle of radius 0.7 with std 0.07, so every coordinate has variance
0.7^2 / 2 + 0.07^2 = 0.2499 (std 0.4999) and neighbouring centres are 7.7 stds apart (the 3-std
discs used by `modes_covered` do not overlap).
"""

import dataclasses
import os
from typing import Any, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from uni_instruct_jax import paths

RING_RADIUS = 0.7
RING_STD = 0.07


class ToyDataError(ValueError):
  """Raised for malformed toy-data inputs (wrong shapes, non-finite samples, bad parameters)."""


def _as_points(name: str, x: Any, dim: int) -> np.ndarray:
  """Host float64 copy of points [N, dim], checked for shape and finiteness."""
  x = np.asarray(x, dtype=np.float64)
  if x.ndim != 2 or x.shape[1] != dim:
    raise ToyDataError(f"{name} must have shape [N, {dim}], got {x.shape}")
  bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
  if bad:
    raise ToyDataError(f"{name} contains {bad} non-finite values")
  return x


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
  """Isotropic Gaussian mixture sum_k w_k N(means[k], std^2 I).

  Attributes:
    means: component centres [K, dim] (data units).
    std: per-coordinate standard deviation s of every component (data units, > 0).
    weights: mixture weights [K] (non-negative, normalised on construction); uniform if None.
  """
  means: Any
  std: float
  weights: Optional[Any] = None

  def __post_init__(self):
    means = np.asarray(self.means, dtype=np.float64)
    if means.ndim != 2 or means.shape[0] < 1 or means.shape[1] < 1:
      raise ToyDataError(f"means must have shape [K, dim], got {means.shape}")
    if not np.all(np.isfinite(means)):
      raise ToyDataError("means contain non-finite values")
    if not (np.isfinite(self.std) and self.std > 0):
      raise ToyDataError(f"std must be a positive finite number, got {self.std}")
    k = means.shape[0]
    weights = np.full(k, 1.0 / k) if self.weights is None else np.asarray(self.weights, np.float64)
    if weights.shape != (k,) or not np.all(np.isfinite(weights)) or np.any(weights < 0) or \
        weights.sum() <= 0:
      raise ToyDataError(f"weights must be {k} non-negative finite numbers with a positive sum, "
                         f"got {self.weights}")
    object.__setattr__(self, "means", means)
    object.__setattr__(self, "std", float(self.std))
    object.__setattr__(self, "weights", weights / weights.sum())

  @classmethod
  def ring(cls, num_modes: int = 8, radius: float = RING_RADIUS, std: float = RING_STD,
           dim: int = 2) -> "GaussianMixture":
    """`num_modes` equal-weight modes at angles 2 pi k / num_modes on a circle in the first two
    coordinates (other coordinates of the centres are 0)."""
    if num_modes < 1 or dim < 2:
      raise ToyDataError(f"ring needs num_modes >= 1 and dim >= 2, got {num_modes}, {dim}")
    angles = 2 * np.pi * np.arange(num_modes) / num_modes
    means = np.zeros((num_modes, dim))
    means[:, 0], means[:, 1] = radius * np.cos(angles), radius * np.sin(angles)
    return cls(means=means, std=std)

  @property
  def num_modes(self) -> int:
    return self.means.shape[0]

  @property
  def dim(self) -> int:
    return self.means.shape[1]

  @property
  def mean(self) -> np.ndarray:
    """Data mean [dim]."""
    return self.weights @ self.means

  @property
  def covariance(self) -> np.ndarray:
    """Data covariance [dim, dim]."""
    centred = self.means - self.mean
    return (centred.T * self.weights) @ centred + self.std**2 * np.eye(self.dim)

  @property
  def data_std(self) -> float:
    """Root-mean-square per-coordinate std of the data (EDM's sigma_data)."""
    return float(np.sqrt(np.trace(self.covariance) / self.dim))

  def sample(self, key: jax.Array, n: int) -> jnp.ndarray:
    """n exact data samples [n, dim] float32."""
    k_comp, k_noise = jax.random.split(key)
    comp = jax.random.choice(k_comp, self.num_modes, (n,), p=jnp.asarray(self.weights, jnp.float32))
    noise = jax.random.normal(k_noise, (n, self.dim), jnp.float32)
    return jnp.asarray(self.means, jnp.float32)[comp] + self.std * noise

  def _noisy_terms(self, x: jnp.ndarray, sigma: Any):
    """(x [B, dim] f32, sigma^2 [B, 1] or [], variance s^2 + sigma^2, component log-joint [B, K])."""
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 2 or x.shape[-1] != self.dim:
      raise ToyDataError(f"x must have shape [B, {self.dim}], got {x.shape}")
    sigma = jnp.asarray(sigma, jnp.float32)
    if sigma.ndim > 1 or (sigma.ndim == 1 and sigma.shape[0] not in (1, x.shape[0])):
      raise ToyDataError(f"sigma must be a scalar or have shape [{x.shape[0]}], got {sigma.shape}")
    sigma2 = jnp.square(sigma.reshape(-1, 1) if sigma.ndim == 1 else sigma)
    var = self.std**2 + sigma2
    means = jnp.asarray(self.means, jnp.float32)
    sq_dist = jnp.sum(jnp.square(x[:, None, :] - means[None]), axis=-1)  # [B, K]
    with np.errstate(divide="ignore"):
      log_w = jnp.asarray(np.log(self.weights), jnp.float32)
    return x, sigma2, var, log_w - 0.5 * sq_dist / var

  def responsibilities(self, x: jnp.ndarray, sigma: Any) -> jnp.ndarray:
    """Posterior component probabilities r_k(x, sigma) [B, K]."""
    _, _, _, logits = self._noisy_terms(x, sigma)
    return jax.nn.softmax(logits, axis=-1)

  def denoiser(self, x: jnp.ndarray, sigma: Any) -> jnp.ndarray:
    """Exact EDM denoiser E[x_0 | x_sigma = x] [B, dim]; x [B, dim], sigma scalar or [B]."""
    x, sigma2, var, logits = self._noisy_terms(x, sigma)
    resp = jax.nn.softmax(logits, axis=-1)
    posterior_centre = resp @ jnp.asarray(self.means, jnp.float32)  # sum_k r_k mu_k
    return (self.std**2 * x + sigma2 * posterior_centre) / var

  def score(self, x: jnp.ndarray, sigma: Any) -> jnp.ndarray:
    """grad_x log p_sigma(x) [B, dim] (1 / data units)."""
    x, _, var, logits = self._noisy_terms(x, sigma)
    resp = jax.nn.softmax(logits, axis=-1)
    return (resp @ jnp.asarray(self.means, jnp.float32) - x) / var

  def log_density(self, x: jnp.ndarray, sigma: Any) -> jnp.ndarray:
    """log p_sigma(x) [B] of the noisy marginal (density w.r.t. Lebesgue measure)."""
    x, _, var, logits = self._noisy_terms(x, sigma)
    log_norm = -0.5 * self.dim * jnp.log(2 * jnp.pi * var)
    return jax.nn.logsumexp(logits, axis=-1) + log_norm.reshape(-1)

  def modes_covered(self, samples: Any, num_stds: float = 3.0,
                    min_fraction: float = 0.2) -> Tuple[int, np.ndarray]:
    """(covered_count, per_mode_counts [K] int) for samples [N, dim].

    per_mode_counts[k] counts samples within `num_stds` * std (Euclidean) of centre k; mode k is
    covered when that count is at least `min_fraction` of its fair share N * w_k.
    """
    samples = _as_points("samples", samples, self.dim)
    dist = np.linalg.norm(samples[:, None, :] - self.means[None], axis=-1)  # [N, K]
    counts = np.sum(dist <= num_stds * self.std, axis=0).astype(np.int64)
    covered = counts >= min_fraction * len(samples) * self.weights
    return int(np.sum(covered & (self.weights > 0))), counts


def random_directions(key_or_seed: Union[int, jax.Array], dim: int,
                      num_directions: int = 256) -> np.ndarray:
  """Unit vectors [num_directions, dim] float64, uniform on the sphere, fixed by the key or seed."""
  if isinstance(key_or_seed, (int, np.integer)):
    dirs = np.random.default_rng(int(key_or_seed)).standard_normal((num_directions, dim))
  else:
    dirs = np.asarray(jax.random.normal(key_or_seed, (num_directions, dim), jnp.float32),
                      np.float64)
  return dirs / np.linalg.norm(dirs, axis=1, keepdims=True)


def sliced_w2(x: Any, y: Any, key_or_seed: Union[int, jax.Array],
              num_directions: int = 256) -> float:
  """Sliced Wasserstein-2 distance between equal-size samples x, y [N, dim] (data units).

  SW2 = sqrt(mean_theta W2^2(theta.x, theta.y)) over `num_directions` fixed random unit directions;
  each 1-D W2 is exact for empirical measures (sorted projections matched in order). Float64.
  """
  x = np.asarray(x)
  if x.ndim != 2:
    raise ToyDataError(f"x must have shape [N, dim], got {x.shape}")
  x, y = _as_points("x", x, x.shape[1]), _as_points("y", y, x.shape[1])
  if len(x) != len(y) or len(x) == 0:
    raise ToyDataError(f"sliced_w2 needs equal, non-zero sample sizes, got {len(x)} and {len(y)}")
  dirs = random_directions(key_or_seed, x.shape[1], num_directions)
  proj_x = np.sort(x @ dirs.T, axis=0)
  proj_y = np.sort(y @ dirs.T, axis=0)
  return float(np.sqrt(np.mean(np.square(proj_x - proj_y))))


def write_scatter_png(path: Union[str, os.PathLike], student: Any, data: Any, *,
                      size: int = 512, extent: Optional[float] = None,
                      centres: Optional[Sequence[Sequence[float]]] = None) -> None:
  """Writes a PNG scatter of 2-D student samples (red) over data samples (blue).

  student [N, 2], data [M, 2] (data units; only the first two coordinates are drawn); the view is
  the square [-extent, extent]^2 (default: 1.15 x the largest |coordinate| of data). `centres`
  [K, 2] are marked with black crosses.
  """
  student, data = _as_points("student", student, 2), _as_points("data", data, 2)
  if extent is None:
    extent = 1.15 * float(np.max(np.abs(data))) if len(data) else 1.0
  if not extent > 0:
    raise ToyDataError(f"extent must be positive, got {extent}")
  image = Image.new("RGB", (size, size), "white")
  draw = ImageDraw.Draw(image)

  def to_pixels(points):
    return (np.asarray(points, np.float64) / extent + 1.0) * 0.5 * (size - 1) * np.array([1, -1]) \
        + np.array([0, size - 1])

  for points, colour in ((data, (40, 90, 220)), (student, (220, 40, 40))):
    for px, py in to_pixels(points):
      draw.rectangle([px - 1, py - 1, px + 1, py + 1], fill=colour)
  if centres is not None:
    for px, py in to_pixels(np.asarray(centres, np.float64)[:, :2]):
      draw.line([px - 5, py, px + 5, py], fill="black", width=2)
      draw.line([px, py - 5, px, py + 5], fill="black", width=2)
  draw.text((6, 4), "data", fill=(40, 90, 220))
  draw.text((6, 16), "student", fill=(220, 40, 40))
  path = paths.workdir_path(path)  # local or gs://
  paths.makedirs(path.parent)
  with paths.open_file(path, "wb") as f:
    image.save(f, format="PNG")
