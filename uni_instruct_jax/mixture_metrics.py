"""Sample-quality metrics of an isotropic Gaussian mixture in any dimension, and their baselines.

All metrics are pure functions of samples [N, d] (data units) and a `toy.GaussianMixture`
sum_k w_k N(mu_k, s^2 I); host float64.

* Radius. A sample of component k lies at s chi_d from mu_k, and chi_d concentrates at sqrt(d)
  (mean ~ sqrt(d - 1/2), std ~ 1/sqrt(2)). `mode_radius` = s sqrt(chi2_{1-1e-6}(d)) =
  s sqrt(d) (1 + c) puts the radius at the 1 - 1e-6 quantile of that distance: c = 0.25 at d = 192
  (8x8x3), 0.12 at d = 768 (16x16x3), ~ 5 / sqrt(2 d) for large d; at d = 2 it is 5.3 s. A fixed
  multiple of s does not fit high dimension: toy.py's 3 s discs contain no exact sample at d = 192.
* Assignment: each sample goes to its nearest mean (Euclidean).
* modes_covered: modes k with at least `min_fraction` (0.2) of their fair share N w_k of samples
  assigned to k AND within the radius of mu_k (toy.py's rule, with the new radius).
* mode_balance_tv: total variation 0.5 sum_k |h_k - w_k| between the histogram h of nearest-mean
  assignments of ALL samples (precise or not) and the weights w.
* precision: fraction of samples within the radius of their nearest mean.
* mode_distance: median distance to the nearest mean in units of s sqrt(d) (exact samples ~ 1; a
  continuous view of what precision thresholds: a sample with per-pixel error e beyond the
  component noise sits at ~ sqrt(1 + e^2 / s^2)).
* pixel_fd: Fréchet distance between Gaussians fitted (mean, unbiased covariance) to the flat
  samples and to a reference set of exact samples (evaluation.fid.frechet_distance).

Finite-sample floor: even exact samples give TV > 0 and FD > 0 against an independent reference
of the same size N. `tv_floor` is the normal approximation of E TV for exact samples,
0.5 sum_k sqrt(2 w_k (1 - w_k) / (pi N)) (= 0.5 sqrt(2 K / (pi N)) sqrt(1 - 1/K) for equal
weights); `floor_row` measures every metric on exact samples. `teacher_rows` evaluates the exact
teacher's deterministic samplers: Heun with N steps (2N - 1 NFE; 18 steps = 35 NFE, 2 = 3 NFE) and
the 1-NFE Euler step from sigma_max = 80 to 0, which returns D(80 z, 80).
"""

import math
from typing import Any, Dict, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from uni_instruct_jax import sampling
from uni_instruct_jax import toy
from uni_instruct_jax.evaluation import fid

RADIUS_TAIL = 1e-6
MIN_FRACTION = 0.2
TEACHER_HEUN_STEPS = (18, 2)  # 35 and 3 NFE.
SAMPLER_CHUNK = 1024          # rows per call of the exact denoiser (its [B, K, d] temporaries).


class MixtureMetricsError(toy.ToyDataError):
  """Bad metric inputs: shapes, too few samples, bad counts."""


def mode_radius(mixture: toy.GaussianMixture, tail: float = RADIUS_TAIL) -> float:
  """s sqrt(chi2 quantile 1 - tail, d dof): exact samples fall outside with probability `tail`."""
  return mixture.std * math.sqrt(stats.chi2.ppf(1.0 - tail, mixture.dim))


def assign_modes(samples: Any, mixture: toy.GaussianMixture):
  """(nearest mean index [N] int64, distance to it [N] float64) of samples [N, d]."""
  x = toy._as_points("samples", samples, mixture.dim)  # pylint: disable=protected-access
  means = mixture.means
  sq = (np.sum(x * x, axis=1)[:, None] - 2 * x @ means.T + np.sum(means * means, axis=1)[None])
  nearest = np.argmin(sq, axis=1)
  return nearest, np.sqrt(np.maximum(sq[np.arange(len(x)), nearest], 0.0))


def modes_covered(samples: Any, mixture: toy.GaussianMixture,
                  min_fraction: float = MIN_FRACTION) -> int:
  """Modes k (of K) holding >= min_fraction N w_k samples assigned to k and within the radius."""
  nearest, dist = assign_modes(samples, mixture)
  counts = np.bincount(nearest[dist <= mode_radius(mixture)], minlength=mixture.num_modes)
  covered = (counts >= min_fraction * len(nearest) * mixture.weights) & (mixture.weights > 0)
  return int(np.sum(covered))


def mode_balance(samples: Any, mixture: toy.GaussianMixture) -> float:
  """Total variation between the nearest-mean histogram of all samples and the weights."""
  nearest, _ = assign_modes(samples, mixture)
  hist = np.bincount(nearest, minlength=mixture.num_modes) / len(nearest)
  return float(0.5 * np.sum(np.abs(hist - mixture.weights)))


def precision(samples: Any, mixture: toy.GaussianMixture) -> float:
  """Fraction of samples within `mode_radius` of their nearest mean."""
  _, dist = assign_modes(samples, mixture)
  return float(np.mean(dist <= mode_radius(mixture)))


def mode_distance(samples: Any, mixture: toy.GaussianMixture) -> float:
  """Median distance of samples to their nearest mean, in units of s sqrt(d)."""
  _, dist = assign_modes(samples, mixture)
  return float(np.median(dist) / (mixture.std * math.sqrt(mixture.dim)))


def pixel_frechet(samples: Any, reference: Any) -> float:
  """Fréchet distance of Gaussians fitted to flat samples [N, d] and reference [M, d] (N, M > d)."""
  fitted = []
  for name, x in (("samples", samples), ("reference", reference)):
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[1] != np.shape(samples)[-1]:
      raise MixtureMetricsError(f"{name} must have shape [N, d] with one d, got {x.shape}")
    running = fid.RunningStatistics(x.shape[1])
    try:
      running.update(x)
      fitted.append(running.finalize())
    except fid.StatisticsError as e:
      raise MixtureMetricsError(f"{name}: {e}") from e
  return fid.frechet_distance(fitted[0].mu, fitted[0].sigma, fitted[1].mu, fitted[1].sigma)


def tv_floor(weights: Any, n: int) -> float:
  """Normal-approximation E TV(histogram of n exact samples, weights): 0.5 sum sqrt(2 w(1-w)/(pi n))."""
  if n < 1:
    raise MixtureMetricsError(f"n must be >= 1, got {n}")
  w = np.asarray(weights, np.float64)
  return float(0.5 * np.sum(np.sqrt(2 * w * (1 - w) / (math.pi * n))))


def sample_metrics(samples: Any, mixture: toy.GaussianMixture, reference: Any) -> Dict[str, Any]:
  """The metric dict of samples [N, d] against the mixture and exact reference samples [M, d]."""
  return {
      "num_samples": int(np.shape(samples)[0]),
      "num_modes": mixture.num_modes,
      "modes_covered": modes_covered(samples, mixture),
      "mode_balance_tv": mode_balance(samples, mixture),
      "precision": precision(samples, mixture),
      "mode_distance": mode_distance(samples, mixture),
      "pixel_fd": pixel_frechet(samples, reference),
  }


def _keys(seed: int):
  """(reference, floor, teacher latents) keys of a seed."""
  base = jax.random.key(seed)
  return tuple(jax.random.fold_in(base, i) for i in range(3))


def reference_samples(mixture: toy.GaussianMixture, n: int, seed: int) -> np.ndarray:
  """The exact reference samples [n, d] that every row of `seed` is compared with."""
  return np.asarray(mixture.sample(_keys(seed)[0], n))


def floor_row(mixture: toy.GaussianMixture, n: int, seed: int) -> Dict[str, Any]:
  """Metrics of n fresh exact samples vs the n reference samples (the finite-sample floor), plus
  the normal-approximation `tv_floor_formula`."""
  exact = np.asarray(mixture.sample(_keys(seed)[1], n))
  return {"source": "exact", "nfe": 0,
          **sample_metrics(exact, mixture, reference_samples(mixture, n, seed)),
          "tv_floor_formula": tv_floor(mixture.weights, n)}


def _chunked(fn, x: jnp.ndarray, chunk: int) -> np.ndarray:
  """fn over row chunks of x [N, d] (padded to a multiple of `chunk`; one compilation)."""
  n = x.shape[0]
  padded = jnp.pad(x, ((0, -n % chunk), (0, 0)))
  out = jax.jit(lambda xs: jax.lax.map(fn, xs))(padded.reshape(-1, chunk, x.shape[1]))
  return np.asarray(out.reshape(-1, x.shape[1])[:n])


def heun_row(denoise, mixture: toy.GaussianMixture, n: int, seed: int, steps: int,
             source: str) -> Dict[str, Any]:
  """Metric row of Heun with `steps` steps (2 steps - 1 NFE) of denoise(x [b, d], sigma [b], None)
  -> [b, d] from the seed's teacher latents, vs `reference_samples`: the same latents for every
  denoiser, so the exact teacher and a network fitted to it are compared sample for sample."""
  latents = jax.random.normal(_keys(seed)[2], (n, mixture.dim), jnp.float32)
  samples = _chunked(lambda z: sampling.heun_sampler(denoise, z, num_steps=steps), latents,
                     min(SAMPLER_CHUNK, n))
  return {"source": source, "nfe": sampling.nfe(steps),
          **sample_metrics(samples, mixture, reference_samples(mixture, n, seed))}


def teacher_rows(mixture: toy.GaussianMixture, n: int, seed: int,
                 heun_steps: Sequence[int] = TEACHER_HEUN_STEPS) -> List[Dict[str, Any]]:
  """Metric rows of the exact teacher's samplers from the same n latents: Heun with each of
  `heun_steps` (2N - 1 NFE) and the 1-NFE Euler step D(80 z, 80); vs `reference_samples`."""
  denoise = lambda x, s, _: mixture.denoiser(x, s)
  rows = [heun_row(denoise, mixture, n, seed, steps, "teacher_heun") for steps in heun_steps]
  latents = jax.random.normal(_keys(seed)[2], (n, mixture.dim), jnp.float32)
  sigma_max = sampling.karras_schedule(2)[0]
  samples = _chunked(lambda z: mixture.denoiser(sigma_max * z, sigma_max), latents,
                     min(SAMPLER_CHUNK, n))
  rows.append({"source": "teacher_euler", "nfe": 1,
               **sample_metrics(samples, mixture, reference_samples(mixture, n, seed))})
  return rows
