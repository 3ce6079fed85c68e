"""Tests of the Gaussian-mixture toy: exact denoiser, density, sliced W2, mode coverage, PNG."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import stats

from uni_instruct_jax import toy

SIGMAS = (0.002, 0.05, 0.5, 3.0, 80.0)


@pytest.fixture(scope="module")
def ring():
  return toy.GaussianMixture.ring()


@pytest.fixture(scope="module")
def ring_samples(ring):
  """20,000 exact ring samples [20000, 2] (one shape, so `sample` compiles once)."""
  return np.asarray(ring.sample(jax.random.PRNGKey(10), 20000))


@pytest.fixture(scope="module")
def uneven3d():
  """An unequal-weight, overlapping mixture in 3-D."""
  return toy.GaussianMixture(means=[[0., 0., 0.], [0.4, -0.3, 0.2], [-1., 1., 0.5]], std=0.25,
                             weights=[0.5, 0.3, 0.2])


def test_ring_defaults_match_edm_sigma_data(ring):
  assert ring.num_modes == 8 and ring.dim == 2
  np.testing.assert_allclose(np.linalg.norm(ring.means, axis=1), toy.RING_RADIUS)
  np.testing.assert_allclose(ring.covariance, 0.2499 * np.eye(2), atol=1e-12)
  assert abs(ring.data_std - 0.5) < 1e-3
  # Neighbouring 3-std discs are disjoint.
  assert np.linalg.norm(ring.means[0] - ring.means[1]) > 6 * ring.std


@pytest.mark.parametrize("name", ["ring", "uneven3d"])
def test_denoiser_is_tweedie_of_log_density(name, request):
  """D = x + sigma^2 grad log p_sigma, with the gradient taken by autodiff of log_density."""
  mix = request.getfixturevalue(name)
  x = mix.sample(jax.random.PRNGKey(0), 64) * 1.5 + 0.1

  @jax.jit
  def evaluate(x_sigma, sigma):
    grad = jax.grad(lambda z: mix.log_density(z, sigma).sum())(x_sigma)
    return grad, mix.score(x_sigma, sigma), mix.denoiser(x_sigma, jnp.full((64,), sigma))

  for sigma in SIGMAS:
    x_sigma = x + sigma * jax.random.normal(jax.random.PRNGKey(1), x.shape)
    grad, score, denoised = evaluate(x_sigma, sigma)
    np.testing.assert_allclose(score, grad, rtol=1e-4, atol=1e-4 / (mix.std**2 + sigma**2))
    np.testing.assert_allclose(denoised, x_sigma + sigma**2 * grad, rtol=1e-4,
                               atol=1e-4 * (1 + sigma))


def test_denoiser_equals_posterior_mean_by_quadrature():
  """In 1-D the posterior mean E[x0 | x] is an explicit integral over x0."""
  mix = toy.GaussianMixture(means=[[-1.], [0.5], [2.]], std=0.3, weights=[0.2, 0.5, 0.3])
  grid = np.linspace(-5, 6, 40001)
  prior = sum(w * stats.norm.pdf(grid, m[0], 0.3) for w, m in zip(mix.weights, mix.means))
  for sigma in (0.01, 0.3, 1.0, 5.0):
    xs = np.array([-2.0, -0.7, 0.0, 0.6, 1.3, 3.5])
    lik = stats.norm.pdf(xs[:, None], grid[None], sigma)
    expected = np.trapezoid(grid * prior * lik, grid, axis=1) / np.trapezoid(prior * lik, grid,
                                                                               axis=1)
    got = mix.denoiser(xs[:, None], sigma)[:, 0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_single_gaussian_denoiser_closed_form():
  m, s = np.array([0.3, -1.2]), 0.6
  mix = toy.GaussianMixture(means=[m], std=s)
  x = np.random.default_rng(0).standard_normal((16, 2)) * 4
  sigma = np.linspace(0.01, 40, 16)
  expected = (s**2 * x + sigma[:, None]**2 * m) / (s**2 + sigma[:, None]**2)
  np.testing.assert_allclose(mix.denoiser(x, sigma), expected, rtol=1e-5, atol=1e-6)


def test_log_density_matches_scipy(uneven3d):
  x = np.random.default_rng(1).standard_normal((32, 3))
  for sigma in (0.0, 0.1, 2.0):
    var = uneven3d.std**2 + sigma**2
    expected = np.log(sum(w * stats.multivariate_normal.pdf(x, m, var * np.eye(3))
                          for w, m in zip(uneven3d.weights, uneven3d.means)))
    np.testing.assert_allclose(uneven3d.log_density(x, sigma), expected, rtol=1e-5, atol=1e-4)


def test_far_points_are_stable(ring):
  """Far from every mode the responsibilities saturate without under/overflow."""
  x = jnp.array([[100., 0.], [0., -300.], [1e4, 1e4]])
  evaluate = jax.jit(lambda s: (ring.denoiser(x, s), ring.log_density(x, s), ring.score(x, s)))
  for sigma in (0.002, 0.5, 80.0):
    assert all(np.all(np.isfinite(v)) for v in evaluate(sigma))
  near = ring.means[np.argmax(ring.means @ np.array([1., 0.]))]
  s2, sig2 = ring.std**2, 0.002**2
  np.testing.assert_allclose(evaluate(0.002)[0][0], (s2 * x[0] + sig2 * near) / (s2 + sig2),
                             rtol=1e-5)


def test_sample_moments_and_weights(uneven3d, ring, ring_samples):
  n = 20000
  x = np.asarray(uneven3d.sample(jax.random.PRNGKey(3), n))
  assert x.shape == (n, 3) and x.dtype == np.float32
  np.testing.assert_allclose(x.mean(0), uneven3d.mean, atol=4 * 0.6 / np.sqrt(n))
  np.testing.assert_allclose(np.cov(x.T), uneven3d.covariance, atol=0.02)
  y = ring_samples
  nearest = np.argmin(np.linalg.norm(y[:, None] - ring.means[None], axis=-1), axis=1)
  freq = np.bincount(nearest, minlength=8) / n
  np.testing.assert_allclose(freq, 1 / 8, atol=4 * np.sqrt(1 / 8 * 7 / 8 / n))


def test_sliced_w2_same_law_is_small(ring, ring_samples):
  x, y = ring_samples, ring.sample(jax.random.PRNGKey(11), 20000)
  value = toy.sliced_w2(x, y, 0)
  assert 0 < value < 0.03
  x, y = x[:1000], y[:1000]
  assert toy.sliced_w2(x, x, 0) == 0.0
  assert toy.sliced_w2(x, y, 0) == toy.sliced_w2(y, x, 0)
  assert toy.sliced_w2(x, y, jax.random.PRNGKey(5)) == toy.sliced_w2(x, y, jax.random.PRNGKey(5))


def test_sliced_w2_exact_for_a_translation():
  """Translating a sample by m shifts every sorted projection by theta.m exactly."""
  x = np.random.default_rng(2).standard_normal((500, 3))
  m = np.array([0.5, -1.0, 2.0])
  dirs = toy.random_directions(7, 3, 256)
  np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0)
  np.testing.assert_allclose(toy.sliced_w2(x, x + m, 7), np.sqrt(np.mean((dirs @ m)**2)),
                             rtol=1e-10)


def test_sliced_w2_shifted_scaled_gaussians_analytic():
  """N(0, I) vs N(m, c^2 I): per direction W2^2 = (theta.m)^2 + (1 - c)^2."""
  n, c, m = 20000, 1.5, np.array([1.0, -0.5])
  rng = np.random.default_rng(3)
  x, y = rng.standard_normal((n, 2)), m + c * rng.standard_normal((n, 2))
  dirs = toy.random_directions(0, 2)
  analytic = np.sqrt(np.mean((dirs @ m)**2) + (1 - c)**2)
  assert abs(toy.sliced_w2(x, y, 0) - analytic) < 0.02
  # Over many directions the mean of (theta.m)^2 tends to |m|^2 / dim.
  assert abs(np.mean((toy.random_directions(1, 2, 20000) @ m)**2) - m @ m / 2) < 0.02


@pytest.mark.parametrize("x_shape,y_shape,bad,match", [
    ((10, 2), (11, 2), None, "equal"),
    ((10, 2), (10, 3), None, r"\[N, 2\]"),
    ((10,), (10,), None, r"\[N, dim\]"),
    ((10, 2), (10, 2), "y", "y contains 1 non-finite"),
])
def test_sliced_w2_rejects_bad_input(x_shape, y_shape, bad, match):
  x, y = np.zeros(x_shape), np.ones(y_shape)
  if bad:
    y[0, 0] = np.nan
  with pytest.raises(toy.ToyDataError, match=match):
    toy.sliced_w2(x, y, 0)


def test_modes_covered_counts_constructed_samples(ring, ring_samples):
  """800 samples: fair share 100, so a mode needs >= 20 samples within 3 std of its centre."""
  s, mu = ring.std, ring.means
  radial = mu / np.linalg.norm(mu, axis=1, keepdims=True)
  pieces = [
      np.repeat(mu[:1], 20, 0),                      # mode 0: exactly 20 -> covered
      np.repeat(mu[1:2], 19, 0),                     # mode 1: 19 -> not covered
      np.repeat(mu[2:3] + 2.9 * s * radial[2], 25, 0),  # mode 2: inside 3 std -> covered
      np.repeat(mu[3:4] + 3.1 * s * radial[3], 25, 0),  # mode 3: outside 3 std -> 0
      np.repeat(mu[4:] + 0.5 * s, 30, 0),            # modes 4..7: 30 each -> covered
  ]
  filler = np.zeros((800 - sum(len(p) for p in pieces), 2))  # origin: 10 std from every centre
  covered, counts = ring.modes_covered(np.concatenate(pieces + [filler]))
  np.testing.assert_array_equal(counts, [20, 19, 25, 0, 30, 30, 30, 30])
  assert covered == 6
  covered, counts = ring.modes_covered(ring_samples)
  assert covered == 8 and counts.sum() > 0.98 * len(ring_samples)
  with pytest.raises(toy.ToyDataError, match="samples must have shape"):
    ring.modes_covered(np.zeros((5, 3)))


def test_write_scatter_png(tmp_path, ring, ring_samples):
  data = ring_samples[:2000]
  student = np.array([[0.0, 0.0]])
  path = tmp_path / "sub" / "scatter.png"
  toy.write_scatter_png(path, student, data, size=200, extent=1.0, centres=ring.means)
  image = np.asarray(Image.open(path).convert("RGB"))
  assert image.shape == (200, 200, 3)
  np.testing.assert_array_equal(image[100, 100], [220, 40, 40])  # the student point at the origin
  assert np.all(image[2, 198] == 255)  # empty corner
  with pytest.raises(toy.ToyDataError, match="student must have shape"):
    toy.write_scatter_png(path, np.zeros((3, 3)), data)


@pytest.mark.parametrize("kwargs,match", [
    (dict(means=[[0., 0.]], std=0.0), "std"),
    (dict(means=[[0., 0.]], std=1.0, weights=[-1.0]), "weights"),
    (dict(means=[[0., 0.], [1., 1.]], std=1.0, weights=[1.0]), "weights"),
    (dict(means=[0., 0.], std=1.0), "means"),
    (dict(means=[[np.nan, 0.]], std=1.0), "non-finite"),
])
def test_mixture_rejects_bad_parameters(kwargs, match):
  with pytest.raises(toy.ToyDataError, match=match):
    toy.GaussianMixture(**kwargs)


def test_denoiser_rejects_bad_shapes(ring):
  with pytest.raises(toy.ToyDataError, match=r"x must have shape \[B, 2\]"):
    ring.denoiser(jnp.zeros((4, 3)), 1.0)
  with pytest.raises(toy.ToyDataError, match="sigma"):
    ring.denoiser(jnp.zeros((4, 2)), jnp.ones((3,)))
