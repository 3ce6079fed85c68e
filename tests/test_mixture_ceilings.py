"""uni_instruct_jax.mixture_ceilings: the fitted-denoiser sampler row and the ODE-regression
generator, with known answers (the exact denoiser reproduces the teacher's row; on one Gaussian
the teacher's map is affine and the regression recovers it), and the cached per-config rows."""

import runpy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import ROOT, shared_path
from uni_instruct_jax import mixture_ceilings as mc
from uni_instruct_jax import mixture_metrics as mm
from uni_instruct_jax import sampling
from uni_instruct_jax import toy


def test_fitted_sampler_of_the_exact_denoiser_is_the_teachers_35_nfe_row():
  mixture = toy.GaussianMixture.ring(num_modes=4)
  row = mc.fitted_sampler_row(lambda x, s, _: mixture.denoiser(x, s), mixture, 500, seed=3)
  teacher = mm.teacher_rows(mixture, 500, seed=3, heun_steps=(18,))[0]
  assert row["source"] == "fitted_heun" and row["nfe"] == teacher["nfe"] == 35
  for key in ("modes_covered", "mode_balance_tv", "precision", "mode_distance", "pixel_fd"):
    assert row[key] == pytest.approx(teacher[key], rel=1e-6), key


def test_ode_regression_recovers_the_affine_teacher_map_of_one_gaussian():
  """p_0 = N(mu, s^2 I): the probability-flow ODE maps x(80) = 80 z to x(sigma) = mu + (80 z - mu)
  sqrt(s^2 + sigma^2) / sqrt(s^2 + 80^2), at sigma_min = 0.002 ~ s z + mu (1 - s / 80); Heun-35's
  map is affine too (slope 6 % above s at s = 0.4: its discretisation error). A linear generator
  a z + b regressed on that map must end at the least-squares line through the Heun pairs."""
  mu = jnp.array([[0.7, -1.2, 0.3]])
  mixture = toy.GaussianMixture(means=mu, std=0.4, weights=jnp.ones((1,)))
  z = jax.random.normal(jax.random.key(5), (4000, 3))
  x = np.asarray(sampling.heun_sampler(lambda x, s, _: mixture.denoiser(x, s), z,
                                       num_steps=mc.TEACHER_STEPS))
  design = np.c_[np.asarray(z).reshape(-1), np.ones(z.size)]
  b_true = np.asarray(mu[0]) * (1 - 0.4 / 80)
  slope = np.linalg.lstsq(design, (x - b_true).reshape(-1), rcond=None)[0][0]
  assert slope == pytest.approx(0.4, rel=0.1)
  generate = lambda p, z: p["a"] * z + p["b"]
  params = {"a": jnp.zeros(()), "b": jnp.zeros((3,))}
  trained = mc.ode_regression(generate, params, mixture, optax.adam(optax.cosine_decay_schedule(
      3e-2, 800)), num_steps=800, batch=256, key=jax.random.key(0))
  assert float(trained["a"]) == pytest.approx(slope, rel=0.01)
  np.testing.assert_allclose(np.asarray(trained["b"]), b_true, atol=0.01)


@pytest.mark.slow
def test_ceilings_of_a_tiny_image_mixture_config_are_cached(tmp_path, monkeypatch):
  monkeypatch.setenv("UNI_INSTRUCT_FIT_CACHE", str(tmp_path))
  config = runpy.run_path(str(ROOT / "configs" / "cifar10_mixture.py"))["get_config"]()
  config.data.path = str(shared_path("data", "cifar10-train-jpeg.zip"))
  config.data.num_modes, config.data.resolution = 4, 2
  config.teacher.fit_steps, config.network.kwargs.hidden = 200, (32, 32)
  config.training.batch_size, config.training.total_kimg = 32, 32 * 40 / 1000  # 40 steps
  out = mc.ceilings(config, num=400, seed=1)
  assert set(out) == {"fitted_sampler", "ode_regression", "ode_regression_long"}
  assert out["ode_regression"]["steps"] == 40
  assert out["ode_regression_long"]["steps"] == 40 * mc.LONG_FACTOR
  for row in out.values():
    assert row["num_samples"] == 400 and np.isfinite(row["pixel_fd"])
  assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["ceilings", "teacher_fit"]
  assert mc.ceilings(config, num=400, seed=1) == out  # read back from the cache
  config.generator.network = "mlp"
  with pytest.raises(ValueError, match="fitted-denoiser generator"):
    mc.ceilings(config, num=400, seed=1)


def test_ode_regression_moves_a_generator_towards_the_teacher_map():
  """On a 2-mode mixture the regression loss falls: the regressed generator is closer to the
  teacher's map than the one it started from (FD to exact samples drops)."""
  mixture = toy.GaussianMixture(means=jnp.array([[-2.0, 0.0], [2.0, 0.0]]), std=0.3,
                                weights=jnp.full((2,), 0.5))
  mlp = lambda p, z: jnp.tanh(z @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  k1, k2 = jax.random.split(jax.random.key(1))
  params = {"w1": jax.random.normal(k1, (2, 32)), "b1": jnp.zeros(32),
            "w2": 0.1 * jax.random.normal(k2, (32, 2)), "b2": jnp.zeros(2)}
  z = jax.random.normal(jax.random.key(2), (2000, 2))
  ref = mm.reference_samples(mixture, 2000, 0)
  before = mm.pixel_frechet(np.asarray(mlp(params, z)), ref)
  trained = mc.ode_regression(mlp, params, mixture, optax.adam(1e-2), 500, 256,
                              jax.random.key(3))
  after = mm.pixel_frechet(np.asarray(mlp(trained, z)), ref)
  assert after < 0.2 * before
