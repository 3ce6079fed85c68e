"""Fréchet distance, streaming statistics, .npz I/O, IS, KID and precision/recall."""

import numpy as np
import pytest
import scipy.linalg

from uni_instruct_jax.evaluation import fid as fid_lib


def sample_stats(rng, n, d, scale=1.0, shift=0.0):
  x = rng.standard_normal((n, d)) @ (scale * rng.standard_normal((d, d)) / np.sqrt(d)) + shift
  return x.mean(0), np.cov(x, rowvar=False)


def scipy_fid(mu1, s1, mu2, s2):
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_matches_scipy_sqrtm():
  rng = np.random.default_rng(0)
  for d in (8, 64, 256):
    mu1, s1 = sample_stats(rng, 4 * d, d)
    mu2, s2 = sample_stats(rng, 4 * d, d, scale=1.3, shift=0.2)
    ours, ref = fid_lib.frechet_distance(mu1, s1, mu2, s2), scipy_fid(mu1, s1, mu2, s2)
    assert abs(ours - ref) <= 1e-6 * abs(ref), (d, ours, ref)


def test_frechet_analytic_commuting_covariances():
  """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T: FD = |dmu|^2 + sum (sqrt a - sqrt b)^2."""
  rng = np.random.default_rng(1)
  q, _ = np.linalg.qr(rng.standard_normal((32, 32)))
  a, b = rng.uniform(0.1, 3, 32), rng.uniform(0.1, 3, 32)
  mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = fid_lib.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
  assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_singular_covariances():
  """Rank-deficient (N < D) covariances: identical ones give exactly |dmu|^2."""
  rng = np.random.default_rng(2)
  x = rng.standard_normal((20, 100))
  sigma = np.cov(x, rowvar=False)
  assert np.linalg.matrix_rank(sigma) < 100
  mu1, mu2 = rng.standard_normal(100), rng.standard_normal(100)
  assert fid_lib.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(
      np.sum((mu1 - mu2) ** 2), rel=1e-8, abs=1e-8)
  assert fid_lib.frechet_distance(mu1, sigma, mu1, sigma) == pytest.approx(0, abs=1e-8)


def test_frechet_rejects_bad_input():
  mu, sigma = np.zeros(4), np.eye(4)
  with pytest.raises(fid_lib.StatisticsError, match="dimensions differ"):
    fid_lib.frechet_distance(mu, sigma, np.zeros(5), np.eye(5))
  with pytest.raises(fid_lib.StatisticsError, match="sigma"):
    fid_lib.frechet_distance(mu, np.eye(3), mu, sigma)
  with pytest.raises(fid_lib.StatisticsError, match="NaN"):
    fid_lib.frechet_distance(mu, sigma * np.nan, mu, sigma)


def test_running_statistics_match_numpy_with_large_offset():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((1000, 16)) * rng.uniform(0.01, 2, 16) + 1e4
  running = fid_lib.RunningStatistics(16)
  for batch in np.array_split(x.astype(np.float32), 7):
    running.update(batch)
  stats = running.finalize()
  x32 = x.astype(np.float32).astype(np.float64)
  np.testing.assert_allclose(stats.mu, x32.mean(0), rtol=1e-12)
  np.testing.assert_allclose(stats.sigma, np.cov(x32, rowvar=False, ddof=1), rtol=1e-9, atol=1e-12)
  assert stats.num_samples == 1000


def test_running_statistics_errors():
  running = fid_lib.RunningStatistics(8)
  with pytest.raises(fid_lib.StatisticsError, match=r"\[n, 8\]"):
    running.update(np.zeros((3, 7)))
  with pytest.raises(fid_lib.StatisticsError, match="NaN"):
    running.update(np.full((3, 8), np.nan))
  running.update(np.random.default_rng(0).standard_normal((5, 8)))
  with pytest.raises(fid_lib.StatisticsError, match="full-rank"):
    running.finalize()
  assert running.finalize(allow_rank_deficient=True).sigma.shape == (8, 8)


def test_npz_roundtrip_and_edm_layout(tmp_path):
  rng = np.random.default_rng(4)
  mu, sigma = sample_stats(rng, 50, 6)
  stats = fid_lib.FeatureStatistics(mu, sigma, 50, {"detector": "x", "resolution": 32},
                                    rng.standard_normal((10, 6)).astype(np.float32))
  fid_lib.save_statistics(tmp_path / "ours.npz", stats)
  back = fid_lib.load_statistics(tmp_path / "ours.npz")
  np.testing.assert_array_equal(back.mu, mu)
  np.testing.assert_array_equal(back.sigma, sigma)
  assert back.metadata == {"detector": "x", "resolution": 32} and back.num_samples == 50
  np.testing.assert_array_equal(back.features, stats.features)
  np.savez(tmp_path / "edm.npz", mu=mu, sigma=sigma)  # EDM's fid-refs hold exactly these keys
  edm = fid_lib.load_statistics(tmp_path / "edm.npz")
  assert edm.metadata == {} and edm.features is None and edm.num_samples is None
  with open(tmp_path / "edm.npz", "rb") as f:
    assert set(np.load(f).files) == {"mu", "sigma"}


def test_npz_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="absent.npz"):
    fid_lib.load_statistics(tmp_path / "absent.npz")
  np.savez(tmp_path / "nokeys.npz", mean=np.zeros(3))
  with pytest.raises(fid_lib.StatisticsError, match="mu and sigma"):
    fid_lib.load_statistics(tmp_path / "nokeys.npz")
  (tmp_path / "junk.npz").write_bytes(b"junk")
  with pytest.raises(fid_lib.StatisticsError, match="junk.npz"):
    fid_lib.load_statistics(tmp_path / "junk.npz")


def test_inception_score_analytic():
  """Confident, class-balanced predictions over C classes give IS = C; constant ones give 1."""
  classes = 7
  logits = 200.0 * np.eye(1008)[np.arange(700) % classes]
  mean, std = fid_lib.inception_score(logits)
  assert mean == pytest.approx(classes, rel=1e-6) and std == pytest.approx(0, abs=1e-6)
  mean, _ = fid_lib.inception_score(np.tile(np.random.default_rng(0).standard_normal(1008), (50, 1)))
  assert mean == pytest.approx(1.0, abs=1e-9)
  with pytest.raises(fid_lib.StatisticsError, match="IS needs"):
    fid_lib.inception_score(np.zeros((5, 1008)))


def test_kid_analytic_point_masses():
  """All gen at a, all ref at b: unbiased MMD^2 = k(a,a) + k(b,b) - 2 k(a,b)."""
  rng = np.random.default_rng(5)
  a, b = rng.standard_normal(16), rng.standard_normal(16)
  kernel = lambda x, y: (x @ y / 16 + 1) ** 3
  kid = fid_lib.kernel_inception_distance(np.tile(a, (30, 1)), np.tile(b, (40, 1)), num_subsets=3)
  assert kid == pytest.approx(kernel(a, a) + kernel(b, b) - 2 * kernel(a, b), rel=1e-10)


def test_kid_same_vs_shifted_distribution():
  rng = np.random.default_rng(6)
  ref = rng.standard_normal((600, 32))
  same = fid_lib.kernel_inception_distance(rng.standard_normal((600, 32)), ref, num_subsets=20,
                                           max_subset_size=300)
  shifted = fid_lib.kernel_inception_distance(rng.standard_normal((600, 32)) + 0.5, ref,
                                              num_subsets=20, max_subset_size=300)
  assert abs(same) < 0.02 < shifted


def test_precision_recall_analytic():
  """ref = 0..99 on a line; gen = 0..49 plus a far cluster. k=3 radii are 3 (grid spacing 1):
  precision = 50/100 (far half outside), recall = ref points 0..52 covered = 0.53."""
  line = lambda v: np.stack([v, np.zeros_like(v)], axis=1)
  ref = line(np.arange(100.0))
  gen = np.concatenate([line(np.arange(50.0)), line(1e6 + np.arange(50.0))])
  precision, recall = fid_lib.precision_recall(gen, ref, k=3, chunk=17)
  assert precision == pytest.approx(0.5) and recall == pytest.approx(0.53)
  assert fid_lib.precision_recall(ref, ref) == (1.0, 1.0)
  with pytest.raises(fid_lib.StatisticsError, match="more than 3"):
    fid_lib.precision_recall(ref[:3], ref)
