"""Tests of the EDM Heun sampler, one-step generation and image output on closed-form teachers."""

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from uni_instruct_jax import parallel, sampling, toy

# An anisotropic 3-D Gaussian N(MEAN, COV): D(x, sigma) = m + COV (COV + sigma^2 I)^-1 (x - m).
MEAN = np.array([0.3, -0.2, 0.1])
_A = np.array([[0.5, 0.1, 0.0], [0.0, 0.3, -0.1], [0.1, 0.0, 0.2]])
COV = _A @ _A.T
EVALS, EVECS = np.linalg.eigh(COV)


def gaussian_denoiser(x, sigma, class_labels=None):
  """Exact denoiser of N(MEAN, COV), float32, x [B, 3], sigma [B]."""
  del class_labels
  shrink = EVALS / (EVALS + jnp.square(sigma)[:, None])  # [B, 3], in the eigenbasis of COV
  coords = (x - MEAN) @ EVECS
  return (MEAN + (shrink * coords) @ EVECS.T).astype(jnp.float32)


def reference_edm_sampler(denoise, latents, noises, num_steps, S_churn=0., S_min=0.,  # pylint: disable=invalid-name
                          S_max=np.inf, S_noise=1.):  # pylint: disable=invalid-name
  """Float64 transcription of EDM's edm_sampler loop; noises[i] is step i's churn noise."""
  i = np.arange(num_steps)
  t = (80**(1 / 7) + i / (num_steps - 1) * (0.002**(1 / 7) - 80**(1 / 7)))**7
  t = np.append(t, 0.0)
  x_next = latents.astype(np.float64) * t[0]
  for i, (t_cur, t_next) in enumerate(zip(t[:-1], t[1:])):
    x_cur = x_next
    gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
    t_hat = t_cur + gamma * t_cur
    x_hat = x_cur + np.sqrt(t_hat**2 - t_cur**2) * S_noise * noises[i]
    d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
    x_next = x_hat + (t_next - t_hat) * d_cur
    if i < num_steps - 1:
      d_prime = (x_next - denoise(x_next, t_next)) / t_next
      x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
  return x_next


def numpy_gaussian_denoiser(x, sigma):
  return MEAN + (x - MEAN) @ np.linalg.solve(COV + sigma**2 * np.eye(3), COV)


def test_karras_schedule_matches_edm_formula():
  t = sampling.karras_schedule(18)
  assert t.dtype == np.float64 and t.shape == (19,)
  assert t[0] == 80.0 and t[-1] == 0.0
  np.testing.assert_allclose(t[-2], 0.002, rtol=1e-14)
  np.testing.assert_allclose(t[:-1], np.linspace(80**(1 / 7), 0.002**(1 / 7), 18)**7, rtol=1e-13)
  assert np.all(np.diff(t) < 0)
  t = sampling.karras_schedule(4, sigma_min=0.02, sigma_max=100., rho=3.)
  np.testing.assert_allclose(t, [100., (100**(1 / 3) * 2 / 3 + 0.02**(1 / 3) / 3)**3,
                                 (100**(1 / 3) / 3 + 0.02**(1 / 3) * 2 / 3)**3, 0.02, 0.],
                             rtol=1e-13)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_steps=1), "num_steps"), (dict(num_steps=2.5), "num_steps"),
    (dict(num_steps=5, sigma_min=1., sigma_max=0.5), "sigma_min"),
    (dict(num_steps=5, sigma_min=0.), "sigma_min"), (dict(num_steps=5, rho=0.), "rho"),
])
def test_karras_schedule_rejects_bad_settings(kwargs, match):
  with pytest.raises(sampling.SamplingError, match=match):
    sampling.karras_schedule(**kwargs)


def denoiser_sigmas(num_steps, **kwargs):
  """The sigma of every denoiser call of a jitted Heun run, in call order."""
  calls = []

  def recording(x, sigma, class_labels):
    jax.debug.callback(lambda s: calls.append(float(s[0])), sigma, ordered=True)
    return gaussian_denoiser(x, sigma, class_labels)

  run = jax.jit(lambda z: sampling.heun_sampler(recording, z, num_steps=num_steps, **kwargs))
  jax.block_until_ready(run(jnp.zeros((2, 3))))
  jax.effects_barrier()
  return calls


def test_denoiser_calls_follow_the_grid():
  """2N - 1 calls: at t_i and (Heun) t_{i+1} for i < N - 1, and only at t_{N-1} on the last step."""
  calls = denoiser_sigmas(18)
  t = sampling.karras_schedule(18).astype(np.float32)
  expected = [s for i in range(17) for s in (t[i], t[i + 1])] + [t[17]]
  assert len(calls) == sampling.nfe(18) == 35
  np.testing.assert_array_equal(calls, expected)


@pytest.mark.parametrize("churn", [False, True])
def test_matches_float64_reference_loop(churn):
  """Same result as a plain float64 transcription of EDM's loop (same churn noise)."""
  kw = dict(S_churn=40., S_min=0.05, S_max=50., S_noise=1.003) if churn else {}
  key, num_steps = jax.random.PRNGKey(7), 12
  latents = jax.random.normal(jax.random.PRNGKey(1), (64, 3))
  got = jax.jit(lambda z, k: sampling.heun_sampler(gaussian_denoiser, z, key=k,
                                                    num_steps=num_steps, **kw))(latents, key)
  noises = [np.asarray(jax.random.normal(jax.random.fold_in(key, i), (64, 3)), np.float64)
            for i in range(num_steps)]
  expected = reference_edm_sampler(numpy_gaussian_denoiser, np.asarray(latents), noises,
                                   num_steps, **kw)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-5)


def test_second_order_convergence_to_exact_flow():
  """For N(m, s^2) the probability-flow ODE maps x_T to m + s (x_T - m) / sqrt(s^2 + T^2)."""
  m, s = 0.3, 0.5

  def denoise(x, sigma, class_labels):
    del class_labels
    return (s**2 * x + sigma[:, None]**2 * m) / (s**2 + sigma[:, None]**2)

  z = jnp.linspace(-3, 3, 101)[:, None]
  exact = m + s * (80 * z - m) / np.sqrt(s**2 + 80**2)
  errors = [float(jnp.max(jnp.abs(jax.jit(lambda y, n=n: sampling.heun_sampler(
      denoise, y, num_steps=n))(z) - exact))) for n in (18, 36, 72)]
  assert errors[0] < 0.1
  for coarse, fine in zip(errors, errors[1:]):
    assert 3.5 < coarse / fine < 5.0  # Heun is second order: halving the step quarters the error


@pytest.mark.parametrize("kw", [dict(num_steps=64),
                                dict(num_steps=64, S_churn=40., S_min=0.05, S_max=50.)])
def test_gaussian_moments(kw):
  n = 20000
  latents = jax.random.normal(jax.random.PRNGKey(2), (n, 3))
  x = np.asarray(jax.jit(lambda z, k: sampling.heun_sampler(gaussian_denoiser, z, key=k, **kw))(
      latents, jax.random.PRNGKey(3)))
  np.testing.assert_allclose(x.mean(0), MEAN, atol=4 * np.sqrt(EVALS.max() / n))
  # Monte-Carlo std of a covariance entry ~ sqrt(2 / n) * var ~ 0.003 here.
  np.testing.assert_allclose(np.cov(x.T), COV, atol=0.012)


def test_mixture_modes_weights_and_moments_with_35_nfe():
  """EDM's default 18-step grid on an unequal-weight ring: weights, mean and covariance."""
  weights = np.array([4, 1, 2, 1, 3, 1, 2, 2], np.float64)
  mix = toy.GaussianMixture(toy.GaussianMixture.ring().means, toy.RING_STD, weights)
  n = 20000
  latents = jax.random.normal(jax.random.PRNGKey(4), (n, 2))
  x = np.asarray(jax.jit(lambda z: sampling.heun_sampler(
      lambda y, sigma, c: mix.denoiser(y, sigma), z))(latents))
  covered, counts = mix.modes_covered(x)
  assert covered == 8 and counts.sum() > 0.97 * n
  np.testing.assert_allclose(counts / counts.sum(), mix.weights,
                             atol=4 * np.sqrt(0.25 * 0.75 / n))
  np.testing.assert_allclose(x.mean(0), mix.mean, atol=4 * 0.5 / np.sqrt(n))
  # 18 Heun steps slightly inflate the spread (EDM's discretisation error, ~5% in variance here).
  np.testing.assert_allclose(np.cov(x.T), mix.covariance, atol=0.03)


def test_deterministic_for_a_fixed_key():
  latents = jax.random.normal(jax.random.PRNGKey(5), (16, 3))
  run = jax.jit(lambda k: sampling.heun_sampler(gaussian_denoiser, latents, key=k, num_steps=8,
                                                S_churn=10.))
  a, b, c = run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  ode = jax.jit(lambda k: sampling.heun_sampler(gaussian_denoiser, latents, key=k, num_steps=8))
  np.testing.assert_array_equal(ode(jax.random.PRNGKey(0)), ode(jax.random.PRNGKey(1)))
  with pytest.raises(sampling.SamplingError, match="key"):
    sampling.heun_sampler(gaussian_denoiser, latents, num_steps=8, S_churn=10.)


def test_net_sigma_range_clips_schedule():
  """EDM: sigma_min = max(0.002, net.sigma_min), sigma_max = min(80, net.sigma_max)."""
  calls = denoiser_sigmas(5, net_sigma_min=0.02, net_sigma_max=100.)
  np.testing.assert_allclose([calls[0], calls[-1]], [80., 0.02], rtol=1e-6)
  calls = denoiser_sigmas(5, net_sigma_min=0.001, net_sigma_max=50.)
  np.testing.assert_allclose([calls[0], calls[-1]], [50., 0.002], rtol=1e-6)


def test_class_conditional_sampling():
  """Class c's data is N(centre_c, 0.1^2 I); labels steer every sample to its class."""
  centres = jnp.array([[-1., 0.], [1., 0.], [0., 1.5]])

  def denoise(x, sigma, class_labels):
    m = class_labels @ centres
    s2, sig2 = 0.01, sigma[:, None]**2
    return (s2 * x + sig2 * m) / (s2 + sig2)

  labels = sampling.make_class_labels(jax.random.PRNGKey(0), 3000, 3)
  assert labels.shape == (3000, 3) and labels.dtype == jnp.float32
  np.testing.assert_array_equal(labels.sum(1), 1.0)
  np.testing.assert_allclose(labels.mean(0), 1 / 3, atol=0.04)
  x = jax.jit(lambda z, c: sampling.heun_sampler(denoise, z, c))(
      jax.random.normal(jax.random.PRNGKey(1), (3000, 2)), labels)
  assert float(jnp.max(jnp.linalg.norm(x - labels @ centres, axis=1))) < 0.6
  fixed = sampling.make_class_labels(None, 4, 3, class_idx=2)
  np.testing.assert_array_equal(fixed, np.eye(3)[[2, 2, 2, 2]])
  assert sampling.make_class_labels(None, 4, 0) is None
  with pytest.raises(sampling.SamplingError, match="class_idx 3"):
    sampling.make_class_labels(None, 4, 3, class_idx=3)
  with pytest.raises(sampling.SamplingError, match=r"class_labels must have shape \[5"):
    sampling.heun_sampler(denoise, jnp.zeros((5, 2)), labels[:4])


def test_rejects_bad_denoiser_and_latents():
  with pytest.raises(sampling.SamplingError, match="returned shape"):
    sampling.heun_sampler(lambda x, s, c: x[:, :2], jnp.zeros((4, 3)), num_steps=4)
  with pytest.raises(sampling.SamplingError, match="batched"):
    sampling.heun_sampler(gaussian_denoiser, jnp.zeros((3,)), num_steps=4)


def test_one_step_generate():
  seen = {}

  def generator(x, sigma, class_labels):
    seen.update(sigma=sigma, labels=class_labels)
    return x / sigma[:, None, None, None]

  @functools.partial(jax.jit, static_argnames=("label_dim", "sigma_init"))
  def run(key, class_labels=None, label_dim=0, sigma_init=2.5):
    """one_step_generate; returns (x_g, sigma and labels the generator saw)."""
    x = sampling.one_step_generate(generator, key, 4096, (2, 2, 1), class_labels,
                                   label_dim=label_dim, sigma_init=sigma_init)
    return x, seen["sigma"], seen["labels"]

  x, sigma, labels = run(jax.random.PRNGKey(0), label_dim=10)
  assert x.shape == (4096, 2, 2, 1) and x.dtype == jnp.float32
  np.testing.assert_array_equal(sigma, 2.5)
  assert labels.shape == (4096, 10) and float(labels.sum()) == 4096
  assert abs(float(x.std()) - 1.0) < 0.03 and abs(float(x.mean())) < 0.03  # G(2.5 z)/2.5 = z
  np.testing.assert_array_equal(x, run(jax.random.PRNGKey(0), label_dim=10)[0])
  given = jnp.eye(10)[jnp.arange(4096) % 10]
  _, sigma, labels = run(jax.random.PRNGKey(0), given, sigma_init=1.5)
  np.testing.assert_array_equal(labels, given)
  np.testing.assert_array_equal(sigma, 1.5)


def test_make_heun_sampler_on_available_devices():
  mesh = parallel.make_mesh()
  sample = sampling.make_heun_sampler(
      lambda v, x, s, c: gaussian_denoiser(x * v["scale"], s, c), mesh, num_steps=6)
  n = 4 * jax.device_count()
  latents = jax.random.normal(jax.random.PRNGKey(0), (n, 3))
  x = sample({"scale": jnp.float32(1.)}, latents)
  assert x.sharding.is_equivalent_to(parallel.data_sharding(mesh), 2)
  np.testing.assert_allclose(x, sampling.heun_sampler(gaussian_denoiser, latents, num_steps=6),
                             rtol=1e-6, atol=1e-6)


_SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from uni_instruct_jax import parallel, sampling, toy
    mix = toy.GaussianMixture.ring()
    apply = lambda v, x, s, c: mix.denoiser(x, s) * v
    latents = jax.random.normal(jax.random.PRNGKey(0), (64, 2))
    mesh = parallel.make_mesh()
    sample = sampling.make_heun_sampler(apply, mesh, num_steps=10, S_churn=5.)
    x = sample(jnp.float32(1.), latents, key=jax.random.PRNGKey(1))
    out = dict(x=np.asarray(x).tolist(), shards=len(x.addressable_shards),
               rows=sorted({s.data.shape[0] for s in x.addressable_shards}))
    try:
      sampling.make_heun_sampler(apply, mesh)(jnp.float32(1.), latents[:6])
    except sampling.SamplingError as e:
      out["error"] = str(e)
    json.dump(out, sys.stdout)
""")


def test_sharded_over_four_devices_matches_one_device():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, cwd=root,
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads(proc.stdout)
  assert out["shards"] == 4 and out["rows"] == [16]
  mix = toy.GaussianMixture.ring()
  expected = jax.jit(lambda z, k: sampling.heun_sampler(
      lambda x, s, c: mix.denoiser(x, s), z, key=k, num_steps=10, S_churn=5.))(
          jax.random.normal(jax.random.PRNGKey(0), (64, 2)), jax.random.PRNGKey(1))
  np.testing.assert_allclose(out["x"], expected, rtol=1e-5, atol=1e-6)
  assert "not divisible by the 4 devices" in out["error"]


def test_to_uint8_matches_edm_quantisation():
  x = np.array([-2., -1., -0.5, 0., 0.25, 0.999, 1., 3.], np.float32)
  expected = np.clip(x * 127.5 + 128, 0, 255).astype(np.uint8)  # truncation, as torch .to(uint8)
  got = np.asarray(sampling.to_uint8(x))
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(got, [0, 0, 64, 128, 159, 255, 255, 255])


def test_image_grid_and_png(tmp_path):
  images = np.arange(5 * 2 * 3 * 3, dtype=np.uint8).reshape(5, 2, 3, 3)
  grid = sampling.image_grid(images)  # 5 images -> 2 rows x 3 cols
  assert grid.shape == (4, 9, 3)
  np.testing.assert_array_equal(grid[2:4, 3:6], images[4])
  np.testing.assert_array_equal(grid[0:2, 6:9], images[2])
  np.testing.assert_array_equal(grid[2:4, 6:9], 0)
  path = tmp_path / "a" / "grid.png"
  sampling.save_image_grid(images, path, grid=(1, 5))
  np.testing.assert_array_equal(np.asarray(Image.open(path)),
                                images.transpose(1, 0, 2, 3).reshape(2, 15, 3))
  gray = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 2, 2, 1)
  sampling.save_image_grid(gray, tmp_path / "g.png")
  loaded = Image.open(tmp_path / "g.png")
  assert loaded.mode == "L" and loaded.size == (4, 2)
  with pytest.raises(sampling.SamplingError, match="NHWC"):
    sampling.image_grid(np.zeros((2, 4, 4)))
  with pytest.raises(sampling.SamplingError, match="too small"):
    sampling.image_grid(images, grid=(2, 2))
