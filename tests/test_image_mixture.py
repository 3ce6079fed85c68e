"""Tests of the CIFAR-10 image mixture and its known-answer metrics (uni_instruct_jax.image_mixture,
uni_instruct_jax.mixture_metrics)."""

import io
import zipfile

import runpy

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from conftest import ROOT, shared_path
from uni_instruct_jax import image_mixture as im
from uni_instruct_jax import mixture_metrics as mm
from uni_instruct_jax import toy

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture(scope="module")
def zip_path():
  return str(shared_path("data", "cifar10-train-jpeg.zip"))


@pytest.fixture(scope="module")
def mix8(zip_path):
  """K = 32 means at 8x8 (d = 192), the issue's main scale."""
  return im.cifar10_mixture(zip_path, num_modes=32, resolution=8)


@pytest.fixture(scope="module")
def exact8(mix8):
  """4000 exact samples [4000, 192]."""
  return np.asarray(mix8.sample(jax.random.key(1), 4000))


def test_means_are_box_downsampled_cifar_images_taken_in_turn_from_the_classes(zip_path, mix8):
  assert (mix8.num_modes, mix8.dim, mix8.image_shape) == (32, 192, (8, 8, 3))
  assert [s.split("/")[1] for s in mix8.sources] == [CLASSES[k % 10] for k in range(32)]
  assert mix8.sources[10] == "train/airplane/0001.jpg"
  with zipfile.ZipFile(zip_path) as zf:
    native = np.asarray(PIL.Image.open(io.BytesIO(zf.read(mix8.sources[5]))).convert("RGB"))
  # Independent box filter on the native 32x32 pixels: 4x4 block means, in data units.
  boxed = native.astype(np.float64).reshape(8, 4, 8, 4, 3).mean(axis=(1, 3)) / 127.5 - 1
  np.testing.assert_allclose(mix8.to_images(mix8.means[5:6])[0], boxed, atol=0.5 / 127.5 + 1e-6)
  assert np.all(np.abs(mix8.means) <= 1.0) and 0.35 < mix8.data_std < 0.55


def test_image_flat_round_trip_is_nhwc(mix8):
  images = np.arange(2 * 192, dtype=np.float32).reshape(2, 8, 8, 3)
  flat = mix8.to_flat(images)
  assert flat[0, 3 * (8 * 1 + 2) + 1] == images[0, 1, 2, 1]
  np.testing.assert_array_equal(mix8.to_images(flat), images)
  np.testing.assert_array_equal(jax.jit(mix8.to_flat)(jnp.asarray(images)), flat)
  with pytest.raises(im.ImageMixtureError, match="shape"):
    mix8.to_flat(np.zeros((2, 4, 4, 3)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_modes=0), "num_modes must be an integer >= 1"),
    (dict(num_modes=50_001), "exceeds the images"),
    (dict(resolution=5), "resolution must divide 32"),
    (dict(resolution=0), "resolution must divide 32"),
])
def test_bad_k_or_r_is_a_one_line_error(zip_path, kwargs, match):
  with pytest.raises(im.ImageMixtureError, match=match) as e:
    im.cifar10_mixture(zip_path, **kwargs)
  assert "\n" not in str(e.value)


def test_missing_or_bad_zip_is_a_one_line_error(tmp_path):
  with pytest.raises(im.ImageMixtureError, match="does not exist"):
    im.cifar10_mixture(str(tmp_path / "nope.zip"))
  (tmp_path / "bad.zip").write_bytes(b"not a zip")
  with pytest.raises(im.ImageMixtureError, match="not a readable zip"):
    im.cifar10_mixture(str(tmp_path / "bad.zip"))


def test_exact_score_is_toys_closed_form(mix8, exact8):
  """The mixture is a toy.GaussianMixture: its score is (D - x) / sigma^2 at every sigma."""
  x = exact8[:64] + 0.3 * np.asarray(jax.random.normal(jax.random.key(2), (64, 192)))
  np.testing.assert_allclose(mix8.score(x, 0.3), (mix8.denoiser(x, 0.3) - x) / 0.09,
                             rtol=1e-4, atol=1e-3)
  assert isinstance(mix8, toy.GaussianMixture)


def test_radius_fits_high_dimension_where_the_toys_3_std_radius_sees_nothing(mix8, exact8):
  radius = mm.mode_radius(mix8)
  assert 1.2 < radius / (mix8.std * np.sqrt(192)) < 1.3
  _, dist = mm.assign_modes(exact8, mix8)
  assert abs(np.mean(dist) / (mix8.std * np.sqrt(191.5)) - 1) < 0.01  # E chi_d ~ sqrt(d - 1/2)
  assert toy.GaussianMixture(mix8.means, mix8.std).modes_covered(exact8)[0] == 0
  # The radius balls of the two closest means do not overlap.
  gaps = np.linalg.norm(mix8.means[:, None] - mix8.means[None], axis=-1) + np.eye(32) * 1e9
  assert gaps.min() > 2 * radius


def test_exact_samples_cover_all_modes_with_precision_one(mix8, exact8):
  assert mm.modes_covered(exact8, mix8) == 32
  assert mm.precision(exact8, mix8) == 1.0
  assert abs(mm.mode_distance(exact8, mix8) - 1) < 0.01
  assert mm.mode_balance(exact8, mix8) < 3 * mm.tv_floor(mix8.weights, len(exact8))


def test_single_mode_generator_covers_one_of_k(mix8, exact8):
  nearest, _ = mm.assign_modes(exact8, mix8)
  one_mode = exact8 - mix8.means[nearest] + mix8.means[7]  # component-7 samples
  assert mm.modes_covered(one_mode, mix8) == 1
  assert mm.precision(one_mode, mix8) == 1.0
  assert mm.mode_balance(one_mode, mix8) == pytest.approx(1 - 1 / 32)


def test_shifted_means_give_precision_zero(mix8, exact8):
  shifted = exact8 + 3.0  # every pixel above 2 > max pixel of any mean
  assert mm.precision(shifted, mix8) == 0.0
  # A per-pixel offset e = 2 s puts the samples at sqrt(1 + e^2 / s^2) = sqrt(5) s sqrt(d).
  nudged = exact8 + 2 * mix8.std
  assert mm.mode_distance(nudged, mix8) == pytest.approx(np.sqrt(5), rel=0.02)
  assert mm.precision(nudged, mix8) == 0.0
  assert mm.modes_covered(shifted, mix8) == 0


def test_balance_of_exact_samples_matches_the_floor_formula():
  """Mean TV over 200 draws of N = 1000 exact mode labels vs 0.5 sum sqrt(2 w (1 - w) / (pi N))."""
  weights = np.array([0.1] * 5 + [0.025] * 20)
  mixture = toy.GaussianMixture(means=np.eye(25) * 10, std=0.1, weights=weights)
  rng = np.random.default_rng(0)
  tvs = []
  for _ in range(200):
    labels = rng.choice(25, 1000, p=weights)
    tvs.append(mm.mode_balance(mixture.means[labels] + 0.1 * rng.standard_normal((1000, 25)),
                               mixture))
  assert np.mean(tvs) == pytest.approx(mm.tv_floor(weights, 1000), rel=0.05)
  assert mm.tv_floor(np.full(32, 1 / 32), 1000) == pytest.approx(
      0.5 * np.sqrt(2 * 32 / (np.pi * 1000)) * np.sqrt(1 - 1 / 32))


def test_pixel_frechet_of_isotropic_gaussians():
  """FD(N(0, a^2 I), N(v, b^2 I)) = |v|^2 + d (a - b)^2, here 0.25 + 8 * 0.04 = 0.57."""
  rng = np.random.default_rng(0)
  x = 1.0 * rng.standard_normal((200_000, 8))
  y = 1.2 * rng.standard_normal((200_000, 8)) + np.array([0.5] + [0.0] * 7)
  assert mm.pixel_frechet(x, y) == pytest.approx(0.57, abs=0.02)
  assert mm.pixel_frechet(x, x) == pytest.approx(0.0, abs=1e-9)
  with pytest.raises(mm.MixtureMetricsError, match="full-rank"):
    mm.pixel_frechet(x[:5], y)


def test_teacher_rows_at_tiny_scale_reach_the_floor(zip_path):
  """K = 16 means at 2x2 (d = 12): the 35-NFE teacher is at the exact-sample floor; the 1-NFE
  Euler step returns D(80 z, 80) ~ the data mean, which is no mode at all."""
  mixture = im.cifar10_mixture(zip_path, num_modes=16, resolution=2, std=0.05)
  floor = mm.floor_row(mixture, 2000, seed=0)
  rows = {r["nfe"]: r for r in mm.teacher_rows(mixture, 2000, seed=0)}
  assert sorted(rows) == [1, 3, 35]
  assert floor["modes_covered"] == 16 and floor["precision"] == 1.0
  assert abs(floor["mode_balance_tv"] - floor["tv_floor_formula"]) < 0.03
  heun = rows[35]
  assert heun["modes_covered"] == 16 and heun["precision"] > 0.98
  # Heun with 18 steps spreads these sharp modes by ~10 % (mode_distance ~ 1.08 vs 0.97).
  assert abs(heun["mode_distance"] - floor["mode_distance"]) < 0.15
  assert heun["mode_balance_tv"] < floor["tv_floor_formula"] + 0.03
  assert heun["pixel_fd"] < 3 * floor["pixel_fd"] + 0.01
  assert rows[1]["precision"] == 0.0 and rows[1]["pixel_fd"] > 10 * floor["pixel_fd"]


def test_config_builds_the_mixture(zip_path):
  config = runpy.run_path(str(ROOT / "configs" / "cifar10_mixture.py"))["get_config"]()
  assert config.teacher.source == "image_mixture" and config.network.class_name == "MLPPrecond"
  config.data.path = zip_path
  config.data.num_modes = 12
  mixture = im.mixture_from_config(config.data)
  assert (mixture.num_modes, mixture.dim, mixture.std) == (12, 192, config.data.mixture_std)
