"""Fréchet distance, streaming feature statistics, IS, KID and precision/recall (host, float64).

Conventions follow EDM (`fid.py`) and StyleGAN2-ADA/StyleGAN3 (`metrics/`):
* statistics: mu [D] and the unbiased covariance sigma [D, D] (divisor N - 1) of the detector's
  features, accumulated in float64; reference files are `.npz` with keys `mu`, `sigma` (EDM's
  fid-refs, e.g. cifar10-32x32.npz) plus optional metadata written by `save_statistics`.
* IS: softmax of the 1008 logits computed WITHOUT the fc bias (StyleGAN's `no_output_bias=True`),
  10 splits, exp(mean KL(p(y|x) || p(y))) per split; mean and std over splits.
* KID: cubic polynomial kernel k(x, y) = (x.y / D + 1)^3, unbiased MMD^2 averaged over 100 random
  subsets of min(1000, N_gen, N_ref) samples (StyleGAN's kernel_inception_distance).
* precision/recall: k-NN manifolds (Kynkäänniemi et al. 2019) with k = 3 on the Inception pool3
  features. StyleGAN uses VGG16 features instead, so these numbers are NOT comparable with its
  published precision/recall.
"""

import dataclasses
import io
import zipfile
import zlib
from typing import Optional

import numpy as np
import scipy.linalg
import scipy.special
from absl import logging

from uni_instruct_jax import paths


class StatisticsError(ValueError):
  """Malformed, mismatched or insufficient feature statistics."""


# ----------------------------------------------------------------------------- Fréchet distance


def _check_stats(mu, sigma, which):
  mu = np.asarray(mu, np.float64)
  sigma = np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise StatisticsError(f"{which}: need mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise StatisticsError(f"{which}: mu/sigma contain NaN or inf")
  return mu, sigma


def _clip_eigenvalues(w):
  """Eigenvalues below the round-off floor (D * eps * max|w|) set to 0 (they are noise)."""
  floor = len(w) * np.finfo(np.float64).eps * np.max(np.abs(w), initial=0.0)
  return np.where(w > floor, w, 0.0)


def _psd_sqrt(sigma):
  """Symmetric square root of a (numerically) PSD matrix; noise-level eigenvalues set to 0."""
  w, v = np.linalg.eigh((sigma + sigma.T) / 2)
  return (v * np.sqrt(_clip_eigenvalues(w))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), float64 on the host.

  tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))): a symmetric PSD eigenproblem, robust for
  near-singular covariances (equal to scipy.linalg.sqrtm's trace in exact arithmetic; eigenvalues
  below the round-off floor D * eps * max|eig| count as 0, so a rank-deficient product does not
  add sqrt(round-off) terms). Fallback:
  if the eigendecomposition fails or gives non-finite values, scipy.linalg.sqrtm of
  (S1 + eps I)(S2 + eps I) with eps = 1e-6 (pytorch-fid's offset), real part.
  """
  mu1, sigma1 = _check_stats(mu1, sigma1, "first statistics")
  mu2, sigma2 = _check_stats(mu2, sigma2, "second statistics")
  if mu1.shape != mu2.shape:
    raise StatisticsError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]} "
                          "(statistics from different detectors?)")
  try:
    root1 = _psd_sqrt(sigma1)
    product = root1 @ sigma2 @ root1
    tr_covmean = float(np.sum(np.sqrt(_clip_eigenvalues(np.linalg.eigvalsh(product)))))
    if not np.isfinite(tr_covmean):
      raise np.linalg.LinAlgError("non-finite eigenvalues")
  except np.linalg.LinAlgError as e:
    logging.warning("frechet_distance: eigen route failed (%s); using sqrtm with 1e-6 offset", e)
    offset = np.eye(mu1.shape[0]) * 1e-6
    tr_covmean = float(np.trace(scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset)).real))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# ----------------------------------------------------------------------------- statistics


@dataclasses.dataclass
class FeatureStatistics:
  """mu [D], unbiased sigma [D, D] (float64) of `num_samples` features, plus metadata."""
  mu: np.ndarray
  sigma: np.ndarray
  num_samples: Optional[int] = None
  metadata: dict = dataclasses.field(default_factory=dict)
  features: Optional[np.ndarray] = None  # [K, D] float32 subset for KID / precision-recall
  logits: Optional[np.ndarray] = None    # [N, C] logits without fc bias, for IS (never saved)


class RunningStatistics:
  """Streaming float64 mean/covariance of [n, D] feature batches (host-side).

  Sums are taken around a shift (the first batch's mean) so that the covariance does not suffer
  from cancellation when |mu| >> std.
  """

  def __init__(self, dim: int):
    self.dim = dim
    self.count = 0
    self._shift = None
    self._sum = np.zeros(dim, np.float64)
    self._outer = np.zeros((dim, dim), np.float64)

  def update(self, feats) -> None:
    """Adds a [n, D] batch (any float dtype; NaN/inf rejected)."""
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2 or feats.shape[1] != self.dim:
      raise StatisticsError(f"feature batch must be [n, {self.dim}], got {feats.shape}")
    if not np.all(np.isfinite(feats)):
      raise StatisticsError("feature batch contains NaN or inf (check the generator's output)")
    if self._shift is None:
      self._shift = feats.mean(axis=0)
    centred = feats - self._shift
    self._sum += centred.sum(axis=0)
    self._outer += centred.T @ centred
    self.count += feats.shape[0]

  def finalize(self, allow_rank_deficient: bool = False) -> FeatureStatistics:
    """mu and unbiased sigma (divisor N - 1, as EDM).

    Raises StatisticsError for N < 2, and for N <= D (the covariance cannot be full rank) unless
    `allow_rank_deficient`.
    """
    n = self.count
    if n < 2:
      raise StatisticsError(f"need at least 2 samples for a covariance, got {n}")
    if n <= self.dim and not allow_rank_deficient:
      raise StatisticsError(
          f"{n} samples cannot give a full-rank {self.dim}x{self.dim} covariance (need > {self.dim};"
          " FID is normally computed on 50000); pass allow_rank_deficient=True to proceed anyway")
    mean_c = self._sum / n
    sigma = (self._outer - n * np.outer(mean_c, mean_c)) / (n - 1)
    return FeatureStatistics(mu=self._shift + mean_c, sigma=(sigma + sigma.T) / 2, num_samples=n)


def save_statistics(path, stats: FeatureStatistics) -> None:
  """Writes `.npz` with mu, sigma (EDM fid-refs layout) plus metadata and optional features."""
  arrays = {"mu": stats.mu, "sigma": stats.sigma}
  if stats.num_samples is not None:
    arrays["num_samples"] = np.int64(stats.num_samples)
  if stats.features is not None:
    arrays["features"] = np.asarray(stats.features, np.float32)
  for key, value in stats.metadata.items():
    arrays[f"meta_{key}"] = np.asarray(value)
  with paths.open_file(path, "wb") as f:
    np.savez(f, **arrays)


def load_statistics(path) -> FeatureStatistics:
  """Reads an EDM fid-refs `.npz` (mu, sigma) or one written by `save_statistics`.

  Raises FileNotFoundError for a missing file and StatisticsError (one line naming the file) for
  anything that is not such a statistics file: not an .npz, pickled or non-numeric arrays, missing
  or mis-shaped mu [D] / sigma [D, D], non-finite values, non-scalar metadata, bad features.
  """
  path = paths.workdir_path(path)
  if not path.is_file():
    raise FileNotFoundError(f"reference statistics not found: {path}")
  try:
    loaded = np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
      raise ValueError("a single .npy array, not an .npz archive")
    with loaded as z:
      data = {k: z[k] for k in z.files}
  except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
    raise StatisticsError(f"{path} is not a readable .npz file: {_one_line(e)}") from e
  if "mu" not in data or "sigma" not in data:
    raise StatisticsError(f"{path} lacks keys mu and sigma (has {sorted(data)})")
  try:
    mu, sigma = _check_stats(data["mu"], data["sigma"], str(path))
    meta = {k[5:]: data[k].item() for k in data if k.startswith("meta_")}
    num = int(data["num_samples"]) if "num_samples" in data else None
  except (ValueError, TypeError) as e:
    if isinstance(e, StatisticsError):
      raise
    raise StatisticsError(f"{path}: malformed statistics ({_one_line(e)})") from e
  feats = data.get("features")
  if feats is not None and (feats.ndim != 2 or feats.shape[1] != mu.shape[0]
                            or not np.issubdtype(feats.dtype, np.number)):
    raise StatisticsError(f"{path}: features {feats.shape} {feats.dtype} do not match "
                          f"mu {mu.shape}")
  return FeatureStatistics(mu=mu, sigma=sigma, num_samples=num, metadata=meta, features=feats)


def _one_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


# ----------------------------------------------------------------------------- IS / KID / PR


def inception_score(logits_no_bias, num_splits: int = 10):
  """(mean, std) of exp(E_x KL(p(y|x) || p(y))) over `num_splits` consecutive splits.

  `logits_no_bias` [N, C]: classifier logits WITHOUT the fc bias (StyleGAN/EDM convention).
  """
  logits = np.asarray(logits_no_bias, np.float64)
  if logits.ndim != 2 or logits.shape[0] < num_splits:
    raise StatisticsError(f"IS needs [N >= {num_splits}, C] logits, got {logits.shape}")
  logp = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
  p = np.exp(logp)
  n = logits.shape[0]
  scores = []
  for i in range(num_splits):
    lp = logp[i * n // num_splits:(i + 1) * n // num_splits]
    pp = p[i * n // num_splits:(i + 1) * n // num_splits]
    log_marginal = np.log(pp.mean(axis=0))
    scores.append(np.exp(np.mean(np.sum(pp * (lp - log_marginal), axis=1))))
  return float(np.mean(scores)), float(np.std(scores))


def kernel_inception_distance(gen_features, ref_features, num_subsets: int = 100,
                              max_subset_size: int = 1000, seed: int = 0) -> float:
  """Unbiased MMD^2 with kernel (x.y / D + 1)^3, averaged over random subsets (StyleGAN's KID)."""
  gen = np.asarray(gen_features, np.float64)
  ref = np.asarray(ref_features, np.float64)
  if gen.ndim != 2 or ref.ndim != 2 or gen.shape[1] != ref.shape[1]:
    raise StatisticsError(f"KID needs [N, D] features of equal D, got {gen.shape} and {ref.shape}")
  dim = gen.shape[1]
  m = min(len(gen), len(ref), max_subset_size)
  if m < 2:
    raise StatisticsError(f"KID needs at least 2 samples on each side, got {len(gen)}/{len(ref)}")
  rng = np.random.default_rng(seed)
  total = 0.0
  for _ in range(num_subsets):
    z = np.concatenate([gen[rng.choice(len(gen), m, replace=False)],
                        ref[rng.choice(len(ref), m, replace=False)]])
    k = (z @ z.T / dim + 1) ** 3  # [[Kxx, Kxy], [Kyx, Kyy]]
    within = k[:m, :m].sum() + k[m:, m:].sum() - np.trace(k)
    total += within / (m * (m - 1)) - 2 * k[:m, m:].mean()
  return float(total / num_subsets)


def _sq_dists(a, b):
  """[len(a), len(b)] squared Euclidean distances (float64, clipped at 0)."""
  d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
  return np.maximum(d, 0)


def _knn_radii(x, k, chunk):
  """Squared distance of each row of x to its k-th nearest other row."""
  return np.concatenate([np.partition(_sq_dists(x[i:i + chunk], x), k, axis=1)[:, k]
                         for i in range(0, len(x), chunk)])


def _coverage(manifold, radii, queries, chunk):
  """Fraction of queries inside at least one ball (manifold_i, radius_i)."""
  inside = [np.any(_sq_dists(queries[i:i + chunk], manifold) <= radii[None, :], axis=1)
            for i in range(0, len(queries), chunk)]
  return float(np.mean(np.concatenate(inside)))


def precision_recall(gen_features, ref_features, k: int = 3, chunk: int = 1024):
  """(precision, recall) by k-NN manifolds (Kynkäänniemi et al. 2019) on the given features.

  precision: fraction of generated samples inside the reference manifold (union of balls around
  each reference sample with the radius to its k-th nearest reference neighbour); recall: the
  reverse. On Inception features here, not StyleGAN's VGG16 ones.
  """
  gen = np.asarray(gen_features, np.float64)
  ref = np.asarray(ref_features, np.float64)
  if gen.ndim != 2 or ref.ndim != 2 or gen.shape[1] != ref.shape[1]:
    raise StatisticsError(f"precision/recall need [N, D] features of equal D, got {gen.shape} "
                          f"and {ref.shape}")
  if min(len(gen), len(ref)) <= k:
    raise StatisticsError(f"precision/recall with k={k} need more than {k} samples per side")
  precision = _coverage(ref, _knn_radii(ref, k, chunk), gen, chunk)
  recall = _coverage(gen, _knn_radii(gen, k, chunk), ref, chunk)
  return precision, recall
