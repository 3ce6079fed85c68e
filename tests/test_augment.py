"""Tests of the JAX port of EDM's AugmentPipe (uni_instruct_jax/augment.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uni_instruct_jax import augment
from uni_instruct_jax.augment import AugmentPipe

# Every augmentation off: tests switch on one at a time.
OFF = {f.name: 0.0 for f in dataclasses.fields(AugmentPipe)
       if f.name in dict(augment._LABEL_WIDTHS)}  # pylint: disable=protected-access


def only(name, p=1.0, **kwargs):
  """A pipe with just augmentation `name` enabled."""
  return AugmentPipe(**{**OFF, name: 1.0, "p": p, **kwargs})


def smooth_images(n, size=16, channels=3, seed=0):
  """[n, size, size, channels] smooth random images in about [-1, 1] (low frequencies only)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  out = np.zeros((n, size, size, channels), np.float32)
  for _ in range(3):
    fx, fy = rng.uniform(0.3, 1.2, size=(2, n, 1, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1, channels))
    out += 0.3 * np.sin(2 * np.pi * (fx * xx[..., None] + fy * yy[..., None]) + phase)
  return jnp.asarray(out)


def noise_images(n, size=8, channels=3, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), (n, size, size, channels), minval=-1,
                            maxval=1)


def test_label_layout_and_config():
  assert AugmentPipe().augment_dim == 9
  for name, width in augment._LABEL_WIDTHS:  # pylint: disable=protected-access
    assert only(name).augment_dim == width, name
  config = augment.get_augment_config()
  assert augment.build_augment_pipe(config) is None
  config.enabled = True
  config.p = 0.2
  assert augment.build_augment_pipe(config) == AugmentPipe(p=0.2)
  config.bogus = 1.0
  with pytest.raises(ValueError, match="bogus"):
    augment.build_augment_pipe(config)
  with pytest.raises(ValueError, match="AugmentPipe.p"):
    AugmentPipe(p=-0.1)


def test_p0_is_identity_with_zero_labels():
  x = noise_images(4)
  y, labels = AugmentPipe(p=0.0)(jax.random.PRNGKey(0), x)
  assert labels.shape == (4, 9) and labels.dtype == jnp.float32
  np.testing.assert_array_equal(labels, 0)
  np.testing.assert_allclose(y, x, atol=5e-5)  # sym6 up/down resampling is exact up to rounding


@pytest.mark.parametrize("name,axis", [("xflip", 2), ("yflip", 1)])
def test_flip(name, axis):
  x = noise_images(64)
  y, labels = only(name)(jax.random.PRNGKey(1), x)
  assert labels.shape == (64, 1)
  flipped = labels[:, 0] == 1
  assert set(np.unique(labels).tolist()) == {0.0, 1.0}
  np.testing.assert_array_equal(y[flipped], jnp.flip(x, axis)[flipped])
  np.testing.assert_array_equal(y[~flipped], x[~flipped])


def test_rotate_int_labels_match_rot90():
  x = noise_images(48)
  y, labels = only("rotate_int")(jax.random.PRNGKey(2), x)
  quarter_turns = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}
  seen = set()
  for xi, yi, label in zip(np.asarray(x), np.asarray(y), np.asarray(labels).astype(int)):
    k = quarter_turns[tuple(label)]
    seen.add(k)
    np.testing.assert_array_equal(yi, np.rot90(xi, k, axes=(0, 1)))
  assert seen == {0, 1, 2, 3}


def test_translate_int_matches_reflect_pad_reference():
  n, size, max_frac = 32, 8, 0.25
  x = noise_images(n, size)
  y, labels = only("translate_int", translate_int_max=max_frac)(jax.random.PRNGKey(3), x)
  assert np.all(np.abs(labels) <= 1)
  shifts = np.round(np.asarray(labels) * size * max_frac).astype(int)  # [n, (tx, ty)]
  assert len({tuple(s) for s in shifts}) > 5
  pad = size - 1
  padded = np.pad(np.asarray(x), [(0, 0), (pad, pad), (pad, pad), (0, 0)], mode="reflect")
  for i, (tx, ty) in enumerate(shifts):
    # EDM reads the source at (x - tx, y + ty).
    ref = padded[i, pad + ty:pad + ty + size, pad - tx:pad - tx + size]
    np.testing.assert_array_equal(y[i], ref)


def test_geometric_integer_translation_is_exact():
  x = noise_images(2, 12)
  tx, ty = jnp.array([3.0, -2.0]), jnp.array([-1.0, 4.0])
  g_inv = augment._translate2d(tx, ty, 2)  # pylint: disable=protected-access
  y = augment.geometric_transform(x, g_inv)
  pad = 11
  padded = np.pad(np.asarray(x), [(0, 0), (pad, pad), (pad, pad), (0, 0)], mode="reflect")
  for i in range(2):
    ref = padded[i, pad + int(ty[i]):pad + int(ty[i]) + 12, pad + int(tx[i]):pad + int(tx[i]) + 12]
    np.testing.assert_allclose(y[i], ref, atol=5e-5)


def test_geometric_rotation_direction_and_scale():
  x = smooth_images(2)
  quarter = augment._rotate2d(jnp.full((2,), np.pi / 2), 2)  # pylint: disable=protected-access
  y = np.asarray(augment.geometric_transform(x, quarter))
  # The asymmetric sym6 filter makes a quarter turn inexact, but only at high frequencies.
  assert np.abs(y - np.rot90(x, 1, axes=(1, 2))).max() < 0.03
  assert np.abs(y - np.rot90(x, -1, axes=(1, 2))).max() > 0.3
  # g_inv = scale(1/2) reads the input at half the distance from the centre: a 2x zoom.
  ramp = jnp.broadcast_to(jnp.arange(16.0)[None, :, None], (16, 16, 1))[None] / 8 - 0.9375
  half = augment._scale2d(0.5, 0.5, 1)  # pylint: disable=protected-access
  zoomed = np.asarray(augment.geometric_transform(ramp, half))
  np.testing.assert_allclose(np.diff(zoomed[0, 8, 4:12, 0]), 1 / 16, atol=1e-3)


def test_geometric_labels():
  x = noise_images(64)
  _, rot = only("rotate_frac")(jax.random.PRNGKey(4), x)
  np.testing.assert_allclose((rot[:, 0] + 1) ** 2 + rot[:, 1] ** 2, 1, atol=1e-5)
  assert np.abs(rot[:, 1]).max() > 0.5
  _, aniso = only("aniso", aniso_rotate_prob=0.0)(jax.random.PRNGKey(5), x)
  np.testing.assert_array_equal(aniso[:, 1], 0)  # w sin(r), r = 0
  _, trans = only("translate_frac")(jax.random.PRNGKey(6), x)
  assert trans.shape == (64, 2) and np.all(trans != 0)


def test_applied_probabilities():
  n = 4000
  x = noise_images(n, 4)
  _, labels = jax.jit(AugmentPipe())(jax.random.PRNGKey(7), x)
  labels = np.asarray(labels)
  tol = 5 * np.sqrt(0.12 * 0.88 / n)
  # Columns: xflip, yflip, scale, rotate (cos-1, sin), aniso (2), translate (2).
  assert abs(labels[:, 0].mean() - 0.5) < 5 * np.sqrt(0.25 / n)  # xflip * p >= 1: a fair coin
  assert abs((labels[:, 1] != 0).mean() - 0.06) < tol  # yflip: p, then a fair coin
  for col in (2, 4, 5, 7):
    assert abs((labels[:, col] != 0).mean() - 0.12) < tol, col
  np.testing.assert_array_equal(labels[:, 7] != 0, labels[:, 8] != 0)  # one gate for (tx, ty)
  applied = labels[labels[:, 2] != 0, 2]
  assert abs(applied.std() - 1) < 0.15  # scale labels are the N(0, 1) draws


def test_colour_transforms():
  x = smooth_images(16)
  luma = x.mean(-1)
  y, w = only("brightness")(jax.random.PRNGKey(8), x)
  np.testing.assert_allclose(y - x, jnp.broadcast_to(w[:, None, None] * 0.2, x.shape), atol=1e-6)
  y, w = only("contrast")(jax.random.PRNGKey(9), x)
  np.testing.assert_allclose(y, x * jnp.exp2(w[:, None, None] * 0.5), rtol=1e-5, atol=1e-6)
  y, w = only("lumaflip")(jax.random.PRNGKey(10), x)
  flip = w[:, 0, None, None, None]
  np.testing.assert_allclose(y, x - 2 * flip * luma[..., None], atol=1e-5)
  for name in ("hue", "saturation"):
    y, w = only(name)(jax.random.PRNGKey(11), x)
    assert np.abs(w).max() > 0
    np.testing.assert_allclose(y.mean(-1), luma, atol=1e-5)  # luma is preserved
  grey = x[..., :1]
  y, w = only("brightness")(jax.random.PRNGKey(8), grey)
  np.testing.assert_allclose(y - grey, jnp.broadcast_to(w[:, None, None] * 0.2, grey.shape),
                             atol=1e-6)
  with pytest.raises(augment.AugmentError, match="channels"):
    only("brightness")(jax.random.PRNGKey(8), x[..., :2])


def test_jit_determinism_shape_and_finiteness():
  pipe = AugmentPipe(p=1.0)
  x = smooth_images(8)
  fn = jax.jit(pipe)
  y1, l1 = fn(jax.random.PRNGKey(12), x)
  y2, l2 = fn(jax.random.PRNGKey(12), x)
  y3, _ = fn(jax.random.PRNGKey(13), x)
  np.testing.assert_array_equal(y1, y2)
  np.testing.assert_array_equal(l1, l2)
  assert not np.allclose(y1, y3)
  assert y1.shape == x.shape and y1.dtype == jnp.float32 and l1.shape == (8, 9)
  assert np.isfinite(y1).all() and np.isfinite(l1).all()
  y_eager, l_eager = pipe(jax.random.PRNGKey(12), x)
  np.testing.assert_allclose(y_eager, y1, atol=1e-4)
  np.testing.assert_allclose(l_eager, l1, atol=1e-6)


def test_bad_input():
  with pytest.raises(augment.AugmentError, match=r"\(8, 8, 3\)"):
    AugmentPipe()(jax.random.PRNGKey(0), jnp.zeros((8, 8, 3)))
  with pytest.raises(augment.AugmentError, match="square"):
    only("rotate_int")(jax.random.PRNGKey(0), jnp.zeros((2, 8, 6, 3)))
