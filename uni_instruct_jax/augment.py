"""EDM's AugmentPipe (NVlabs/edm training/augment.py) in pure JAX: jittable, batched, NHWC.

`AugmentPipe(...)(key, images)` returns the augmented images and the augment labels that EDM feeds
to a network's `map_augment` layer. The probability of each augmentation is `multiplier * p`;
an augmentation with multiplier 0 is off and contributes no label columns. Label columns, in
order (as EDM concatenates them):

  xflip (1), yflip (1), rotate_int (2), translate_int (2), scale (1), rotate_frac (2: cos w - 1,
  sin w), aniso (2: w cos r, w sin r), translate_frac (2), brightness (1), contrast (1),
  lumaflip (1), hue (2: cos w - 1, sin w), saturation (1).

The EDM/SiD default set (xflip, yflip, scale, rotate_frac, aniso, translate_frac) gives 9 columns.

Geometric transforms follow EDM: the inverse matrices are composed per sample, the image is
reflect-padded, upsampled 2x with the sym6 wavelet low-pass filter, bilinearly resampled
(torch `grid_sample` semantics: align_corners=False, zeros outside) and downsampled 2x with the
same filter. One deviation, needed for jit: EDM pads by the smallest margin that covers the
transformed corners of the whole batch (a data-dependent shape), clamped to (W-1, H-1); here the
pad is always that clamp, (W-1, H-1) on every side. Reflect padding by more pixels extends the
smaller padding, so the samples EDM takes are taken from the same values; only zero-padding
effects of the wavelet filters at the outer rim of EDM's smaller canvas (which EDM's margin is
designed to keep out of view) can differ. The random draws use JAX's PRNG, so results equal EDM's
in distribution, not bit for bit.
"""

import dataclasses
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# Low-pass filter of the sym6 wavelet (the filter EDM uses for geometric resampling).
_SYM6 = np.asarray([
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
], dtype=np.float32)
_HZ_PAD = len(_SYM6) // 4

# Label columns contributed by each augmentation when it is enabled (EDM's order).
_LABEL_WIDTHS = (
    ("xflip", 1), ("yflip", 1), ("rotate_int", 2), ("translate_int", 2), ("scale", 1),
    ("rotate_frac", 2), ("aniso", 2), ("translate_frac", 2), ("brightness", 1), ("contrast", 1),
    ("lumaflip", 1), ("hue", 2), ("saturation", 1),
)


class AugmentError(ValueError):
  """Images that the augment pipe cannot process (wrong rank, channels or shape)."""


# ---------------------------------------------------------------------------------------------
# Batched transformation matrices ([N, 3, 3] for 2-D homogeneous, [N, 4, 4] for colour).

def _stack_matrix(rows, n):
  """Builds [n, R, C] from nested rows of scalars or [n] arrays."""
  return jnp.stack([jnp.stack([jnp.broadcast_to(jnp.asarray(e, jnp.float32), (n,)) for e in row],
                              axis=-1) for row in rows], axis=-2)


def _translate2d(tx, ty, n):
  return _stack_matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], n)


def _scale2d(sx, sy, n):
  return _stack_matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], n)


def _rotate2d(theta, n):
  c, s = jnp.cos(theta), jnp.sin(theta)
  return _stack_matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]], n)


def _translate3d(t, n):
  return _stack_matrix([[1, 0, 0, t], [0, 1, 0, t], [0, 0, 1, t], [0, 0, 0, 1]], n)


def _scale3d(s, n):
  return _stack_matrix([[s, 0, 0, 0], [0, s, 0, 0], [0, 0, s, 0], [0, 0, 0, 1]], n)


def _rotate3d(v, theta, n):
  """Rotation by `theta` [n] about the unit axis `v` (3,) (Rodrigues), homogeneous 4x4."""
  vx, vy, vz = (float(a) for a in v)
  s, c = jnp.sin(theta), jnp.cos(theta)
  cc = 1 - c
  return _stack_matrix([
      [vx * vx * cc + c, vx * vy * cc - vz * s, vx * vz * cc + vy * s, 0],
      [vy * vx * cc + vz * s, vy * vy * cc + c, vy * vz * cc - vx * s, 0],
      [vz * vx * cc - vy * s, vz * vy * cc + vx * s, vz * vz * cc + c, 0],
      [0, 0, 0, 1]], n)


# ---------------------------------------------------------------------------------------------
# Resampling helpers (NHWC; `axis` is 1 for y, 2 for x).

def _correlate(x, taps, axis, pad, stride=1):
  """1-D cross-correlation along `axis` with zero padding `pad` on both sides (torch conv1d)."""
  xp = jnp.pad(x, [(pad, pad) if a == axis else (0, 0) for a in range(x.ndim)])
  n_out = (xp.shape[axis] - len(taps)) // stride + 1
  out = 0.0
  for k, tap in enumerate(taps):
    out = out + float(tap) * jax.lax.slice_in_dim(xp, k, k + stride * (n_out - 1) + 1, stride,
                                                  axis)
  return out


def _upsample2x(x, axis):
  """Zero-insertion 2x upsampling followed by the sym6 filter, as EDM (length 2L)."""
  zeros = jnp.zeros_like(x)
  inter = jnp.stack([x, zeros], axis=axis + 1)
  shape = list(x.shape)
  shape[axis] *= 2
  inter = jax.lax.slice_in_dim(inter.reshape(shape), 0, shape[axis] - 1, axis=axis)
  return _correlate(inter, _SYM6[::-1], axis, (len(_SYM6) + 1) // 2)


def _downsample2x(x, axis):
  """The sym6 filter with stride 2, then a crop of _HZ_PAD on both sides, as EDM."""
  y = _correlate(x, _SYM6, axis, (len(_SYM6) - 1) // 2, stride=2)
  return jax.lax.slice_in_dim(y, _HZ_PAD, y.shape[axis] - _HZ_PAD, axis=axis)


def _grid_sample_bilinear(image, ix, iy):
  """Bilinear sample of one image [H, W, C] at pixel coordinates ix, iy [h, w]; zeros outside."""
  height, width = image.shape[:2]
  x0, y0 = jnp.floor(ix), jnp.floor(iy)
  out = 0.0
  for dx in (0, 1):
    for dy in (0, 1):
      xs, ys = x0 + dx, y0 + dy
      weight = (1 - jnp.abs(ix - xs)) * (1 - jnp.abs(iy - ys))
      valid = (xs >= 0) & (xs <= width - 1) & (ys >= 0) & (ys <= height - 1)
      xi = jnp.clip(xs, 0, width - 1).astype(jnp.int32)
      yi = jnp.clip(ys, 0, height - 1).astype(jnp.int32)
      out = out + jnp.where(valid, weight, 0.0)[..., None] * image[yi, xi]
  return out


def geometric_transform(images: jax.Array, g_inv: jax.Array) -> jax.Array:
  """Applies per-sample inverse 2-D transforms the way EDM's AugmentPipe does.

  Args:
    images: [N, H, W, C] float.
    g_inv: [N, 3, 3] float32 inverse homogeneous transforms in pixel units about the image centre
      (x right, y down): an output pixel at centred position (x, y) reads the input at
      g_inv @ (x, y, 1).

  Returns:
    [N, H, W, C] float32 resampled images (reflect-padded, sym6 2x up/down-sampling).
  """
  n, height, width, _ = images.shape
  images = jnp.pad(images.astype(jnp.float32),
                   [(0, 0), (height - 1, height - 1), (width - 1, width - 1), (0, 0)],
                   mode="reflect")
  images = _upsample2x(_upsample2x(images, axis=2), axis=1)
  g_inv = _scale2d(2, 2, n) @ g_inv @ _scale2d(0.5, 0.5, n)
  g_inv = _translate2d(-0.5, -0.5, n) @ g_inv @ _translate2d(0.5, 0.5, n)

  # torch affine_grid + grid_sample (align_corners=False), written in pixel coordinates.
  in_h, in_w = images.shape[1:3]
  out_h, out_w = (height + 2 * _HZ_PAD) * 2, (width + 2 * _HZ_PAD) * 2
  g_inv = (_scale2d(2 / in_w, 2 / in_h, n) @ g_inv @ _scale2d(out_w / 2, out_h / 2, n))
  xn = (2 * jnp.arange(out_w, dtype=jnp.float32) + 1) / out_w - 1
  yn = (2 * jnp.arange(out_h, dtype=jnp.float32) + 1) / out_h - 1
  xg, yg = jnp.meshgrid(xn, yn)  # [out_h, out_w]
  gx = g_inv[:, 0, 0, None, None] * xg + g_inv[:, 0, 1, None, None] * yg + g_inv[:, 0, 2, None,
                                                                                  None]
  gy = g_inv[:, 1, 0, None, None] * xg + g_inv[:, 1, 1, None, None] * yg + g_inv[:, 1, 2, None,
                                                                                  None]
  ix = ((gx + 1) * in_w - 1) / 2
  iy = ((gy + 1) * in_h - 1) / 2
  images = jax.vmap(_grid_sample_bilinear)(images, ix, iy)

  return _downsample2x(_downsample2x(images, axis=2), axis=1)


def _reflect_index(i, size):
  """Reflection of integer index i into [0, size) without repeating the edge (EDM's formula)."""
  return size - 1 - jnp.abs(size - 1 - i % (size * 2 - 2))


@dataclasses.dataclass(frozen=True)
class AugmentPipe:
  """EDM's AugmentPipe; defaults are the EDM/SiD CIFAR-10 setting (augment_dim 9).

  Field meanings, units and defaults follow EDM: `p` is the overall probability multiplier; each
  other multiplier enables an augmentation (0 = off) applied with probability multiplier * p.
  """
  p: float = 0.12
  # Pixel blitting.
  xflip: float = 1e8
  yflip: float = 1.0
  rotate_int: float = 0.0
  translate_int: float = 0.0
  translate_int_max: float = 0.125
  # Geometric transformations.
  scale: float = 1.0
  rotate_frac: float = 1.0
  aniso: float = 1.0
  translate_frac: float = 1.0
  scale_std: float = 0.2
  rotate_frac_max: float = 1.0
  aniso_std: float = 0.2
  aniso_rotate_prob: float = 0.5
  translate_frac_std: float = 0.125
  # Colour transformations.
  brightness: float = 0.0
  contrast: float = 0.0
  lumaflip: float = 0.0
  hue: float = 0.0
  saturation: float = 0.0
  brightness_std: float = 0.2
  contrast_std: float = 0.5
  hue_max: float = 1.0
  saturation_std: float = 1.0

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"AugmentPipe.{field.name} must be a finite number >= 0, got {value!r}")

  @property
  def augment_dim(self) -> int:
    """Number of augment-label columns (the network's `augment_dim`)."""
    return sum(width for name, width in _LABEL_WIDTHS if getattr(self, name) > 0)

  def __call__(self, key: jax.Array, images: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Augments a batch.

    Args:
      key: a PRNG key.
      images: [N, H, W, C] float (any range; EDM applies it to images in [-1, 1]).

    Returns:
      (images [N, H, W, C] float32, augment_labels [N, augment_dim] float32).
    """
    if images.ndim != 4:
      raise AugmentError(f"AugmentPipe expects NHWC images [N, H, W, C], got shape "
                         f"{tuple(images.shape)}")
    n, height, width, channels = images.shape
    images = images.astype(jnp.float32)
    keys = iter(jax.random.split(key, 32))
    labels = []

    def gate(multiplier, value, shape=(n,)):
      """Keeps `value` where a uniform draw < multiplier * p, else zeros."""
      apply = jax.random.uniform(next(keys), shape) < multiplier * self.p
      return jnp.where(apply, value, jnp.zeros_like(value))

    def per_sample(x):
      return x[:, None, None, None]

    # Pixel blitting.
    if self.xflip > 0:
      w = gate(self.xflip, jax.random.randint(next(keys), (n,), 0, 2))
      images = jnp.where(per_sample(w == 1), images[:, :, ::-1], images)
      labels.append(w)
    if self.yflip > 0:
      w = gate(self.yflip, jax.random.randint(next(keys), (n,), 0, 2))
      images = jnp.where(per_sample(w == 1), images[:, ::-1], images)
      labels.append(w)
    if self.rotate_int > 0:
      if height != width:
        raise AugmentError(f"rotate_int needs square images, got H={height}, W={width}")
      w = gate(self.rotate_int, jax.random.randint(next(keys), (n,), 0, 4))
      images = jnp.where(per_sample((w == 1) | (w == 2)), images[:, :, ::-1], images)
      images = jnp.where(per_sample((w == 2) | (w == 3)), images[:, ::-1], images)
      images = jnp.where(per_sample((w == 1) | (w == 3)), images.transpose(0, 2, 1, 3), images)
      labels += [(w == 1) | (w == 2), (w == 2) | (w == 3)]
    if self.translate_int > 0:
      w = jax.random.uniform(next(keys), (2, n), minval=-1.0, maxval=1.0)
      w = gate(self.translate_int, w, shape=(1, n))
      tx = jnp.round(w[0] * (width * self.translate_int_max)).astype(jnp.int32)
      ty = jnp.round(w[1] * (height * self.translate_int_max)).astype(jnp.int32)
      xs = _reflect_index(jnp.arange(width)[None] - tx[:, None], width)  # [N, W]
      ys = _reflect_index(jnp.arange(height)[None] + ty[:, None], height)  # [N, H]
      images = jax.vmap(lambda im, y, x: im[y][:, x])(images, ys, xs)
      labels += [tx / (width * self.translate_int_max), ty / (height * self.translate_int_max)]

    # Geometric transformations (inverse matrices composed as in EDM).
    eye3 = jnp.broadcast_to(jnp.eye(3, dtype=jnp.float32), (n, 3, 3))
    g_inv = eye3
    geometric = False
    if self.scale > 0:
      w = gate(self.scale, jax.random.normal(next(keys), (n,)))
      s = jnp.exp2(w * self.scale_std)
      g_inv = g_inv @ _scale2d(1 / s, 1 / s, n)
      labels.append(w)
      geometric = True
    if self.rotate_frac > 0:
      w = jax.random.uniform(next(keys), (n,), minval=-1.0, maxval=1.0)
      w = gate(self.rotate_frac, w * (np.pi * self.rotate_frac_max))
      g_inv = g_inv @ _rotate2d(w, n)  # EDM: rotate2d_inv(-w)
      labels += [jnp.cos(w) - 1, jnp.sin(w)]
      geometric = True
    if self.aniso > 0:
      w = jax.random.normal(next(keys), (n,))
      r = jax.random.uniform(next(keys), (n,), minval=-1.0, maxval=1.0) * np.pi
      w = gate(self.aniso, w)
      r = jnp.where(jax.random.uniform(next(keys), (n,)) < self.aniso_rotate_prob, r,
                    jnp.zeros_like(r))
      s = jnp.exp2(w * self.aniso_std)
      g_inv = g_inv @ _rotate2d(-r, n) @ _scale2d(1 / s, s, n) @ _rotate2d(r, n)
      labels += [w * jnp.cos(r), w * jnp.sin(r)]
      geometric = True
    if self.translate_frac > 0:
      w = gate(self.translate_frac, jax.random.normal(next(keys), (2, n)), shape=(1, n))
      g_inv = g_inv @ _translate2d(-w[0] * (width * self.translate_frac_std),
                                   -w[1] * (height * self.translate_frac_std), n)
      labels += [w[0], w[1]]
      geometric = True
    if geometric:
      images = geometric_transform(images, g_inv)

    # Colour transformations.
    eye4 = jnp.eye(4, dtype=jnp.float32)
    luma = np.asarray([1, 1, 1, 0], np.float32) / np.sqrt(3)
    luma_outer = jnp.asarray(np.outer(luma, luma))
    m = jnp.broadcast_to(eye4, (n, 4, 4))
    colour = False
    if self.brightness > 0:
      w = gate(self.brightness, jax.random.normal(next(keys), (n,)))
      m = _translate3d(w * self.brightness_std, n) @ m
      labels.append(w)
      colour = True
    if self.contrast > 0:
      w = gate(self.contrast, jax.random.normal(next(keys), (n,)))
      m = _scale3d(jnp.exp2(w * self.contrast_std), n) @ m
      labels.append(w)
      colour = True
    if self.lumaflip > 0:
      w = gate(self.lumaflip, jax.random.randint(next(keys), (n,), 0, 2))
      m = (eye4 - 2 * luma_outer * w[:, None, None]) @ m
      labels.append(w)
      colour = True
    if self.hue > 0:
      w = jax.random.uniform(next(keys), (n,), minval=-1.0, maxval=1.0)
      w = gate(self.hue, w * (np.pi * self.hue_max))
      m = _rotate3d(luma[:3], w, n) @ m
      labels += [jnp.cos(w) - 1, jnp.sin(w)]
      colour = True
    if self.saturation > 0:
      w = gate(self.saturation, jax.random.normal(next(keys), (n,)))
      factor = jnp.exp2(w * self.saturation_std)[:, None, None]
      m = (luma_outer + (eye4 - luma_outer) * factor) @ m
      labels.append(w)
      colour = True
    if colour:
      if channels == 3:
        images = jnp.einsum("nij,nhwj->nhwi", m[:, :3, :3], images) + m[:, None, None, :3, 3]
      elif channels == 1:
        row = m[:, :3, :].mean(axis=1)  # [N, 4]
        images = (images * row[:, None, None, :3].sum(-1, keepdims=True)
                  + row[:, None, None, 3:])
      else:
        raise AugmentError(f"colour augmentations need 3 (RGB) or 1 (L) channels, got "
                           f"{channels}")

    if not labels:
      return images, jnp.zeros((n, 0), jnp.float32)
    return images, jnp.stack([jnp.asarray(l, jnp.float32) for l in labels], axis=1)


def get_augment_config() -> ml_collections.ConfigDict:
  """Default `augment` config section: EDM/SiD CIFAR-10 settings, off unless `enabled`."""
  config = ml_collections.ConfigDict(dataclasses.asdict(AugmentPipe()))
  config.enabled = False
  return config


def build_augment_pipe(config: ml_collections.ConfigDict) -> Optional[AugmentPipe]:
  """AugmentPipe from a config section made by `get_augment_config`; None when not enabled."""
  fields = config.to_dict()
  if not fields.pop("enabled", False):
    return None
  names = {f.name for f in dataclasses.fields(AugmentPipe)}
  unknown = sorted(set(fields) - names)
  if unknown:
    raise ValueError(f"unknown augment config keys: {unknown}")
  return AugmentPipe(**{k: float(v) for k, v in fields.items()})
