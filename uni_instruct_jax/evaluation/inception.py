"""The FID variant of InceptionV3 (pytorch-fid 0.3.0 structure) in Linen, NHWC.

Blocks follow pytorch-fid's `fid_inception_v3()`: FIDInceptionA/C/E_1/E_2 (average pools with
`count_include_pad=False`, a max-pool branch in `Mixed_7c`), torchvision's InceptionB/D, BatchNorm
eps 1e-3 and the 1008-class `fc` head of the TF 2015-12-05 graph.

Parameters: each `BasicConv2d` (conv without bias + BatchNorm + ReLU) is stored with its
inference-mode BatchNorm folded into the convolution, as
`params[<torch module path with '.' -> '/'>] = {'kernel': HWIO, 'bias': [O]}`, e.g. torch
`Mixed_5b.branch1x1.{conv.weight, bn.*}` -> `params['Mixed_5b']['branch1x1']`; `fc` holds
`kernel` [2048, 1008] and `bias` [1008].

Preprocessing (`resize_mode`):
  'pytorch-fid': bilinear resize to 299 with align_corners=False (half-pixel centres, no
      antialiasing; torch `F.interpolate`), then 2 * x / 255 - 1.
  'tf': the TF 2015 graph's legacy `ResizeBilinear` (source = dst * in / out, no half-pixel
      offset, clamped at the border) then (x - 128) / 128, as emulated by the StyleGAN/EDM
      TorchScript detector (`inception-2015-12-05.pkl`). EDM, StyleGAN and Uni-Instruct numbers use
      this detector.
"""

import functools
import pathlib
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from uni_instruct_jax import parallel
from uni_instruct_jax.convert import safe_unpickle

RESIZE_MODES = ("pytorch-fid", "tf")
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BN_EPS = 1e-3
PYTORCH_FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                           "pt_inception-2015-12-05-6726825d.pth")
_HIGHEST = lax.Precision.HIGHEST


class InceptionWeightsError(ValueError):
  """A state dict that does not match the FID InceptionV3 (missing/unexpected/misshaped keys)."""


# ----------------------------------------------------------------------------- resize


def resize_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
  """Bilinear interpolation as a [out_size, in_size] float32 matrix (rows sum to 1).

  'pytorch-fid': src = (dst + 0.5) * in / out - 0.5, clamped below at 0 (torch, align_corners=False).
  'tf':          src = dst * in / out (TF1 legacy ResizeBilinear, align_corners=False).
  Both clamp the upper neighbour at in_size - 1; no antialiasing when downsampling.
  """
  if mode not in RESIZE_MODES:
    raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {mode!r}")
  scale = in_size / out_size
  dst = np.arange(out_size, dtype=np.float64)
  src = dst * scale if mode == "tf" else np.maximum((dst + 0.5) * scale - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  mat = np.zeros((out_size, in_size), np.float64)
  np.add.at(mat, (dst.astype(np.int64), lo), 1.0 - frac)
  np.add.at(mat, (dst.astype(np.int64), hi), frac)
  return mat.astype(np.float32)


def preprocess(images: jax.Array, resize_mode: str) -> jax.Array:
  """uint8 (or float in [0, 255]) [N, H, W, 3] -> float32 [N, 299, 299, 3] in about [-1, 1]."""
  _, h, w, _ = images.shape
  x = images.astype(jnp.float32)
  if (h, w) != (INPUT_SIZE, INPUT_SIZE):
    rh = jnp.asarray(resize_matrix(h, INPUT_SIZE, resize_mode))
    rw = jnp.asarray(resize_matrix(w, INPUT_SIZE, resize_mode))
    x = jnp.einsum("oh,nhwc->nowc", rh, x, precision=_HIGHEST)
    x = jnp.einsum("pw,nowc->nopc", rw, x, precision=_HIGHEST)
  if resize_mode == "tf":
    return (x - 128.0) / 128.0
  return x * (2.0 / 255.0) - 1.0


# ----------------------------------------------------------------------------- network


def _conv(name, features, kh=1, kw=None, strides=1, same=True):
  """pytorch-fid's BasicConv2d (conv + BatchNorm, here folded into kernel/bias) followed by ReLU.

  `same=True` pads by half the kernel size (torch `padding=k//2`), otherwise no padding.
  Must be called inside a compact method; the conv is named after the torch module.
  """
  kw = kh if kw is None else kw
  padding = ((kh // 2, kh // 2), (kw // 2, kw // 2)) if same else ((0, 0), (0, 0))
  conv = nn.Conv(features, (kh, kw), strides=strides, padding=padding, precision=_HIGHEST,
                 name=name)
  return lambda x: nn.relu(conv(x))


def _avg_pool_3x3(x):
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride):
  pad = ((1, 1), (1, 1)) if stride == 1 else "VALID"
  return nn.max_pool(x, (3, 3), (stride, stride), pad)


class InceptionA(nn.Module):
  """FIDInceptionA (Mixed_5b/c/d): 35x35 block; output 224 + pool_features channels."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = _conv("branch1x1", 64)(x)
    b5 = _conv("branch5x5_2", 64, 5)(_conv("branch5x5_1", 48)(x))
    b3 = _conv("branch3x3dbl_1", 64)(x)
    b3 = _conv("branch3x3dbl_3", 96, 3)(_conv("branch3x3dbl_2", 96, 3)(b3))
    bp = _conv("branch_pool", self.pool_features)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """InceptionB (Mixed_6a): 35x35 -> 17x17 reduction; output 768 channels."""

  @nn.compact
  def __call__(self, x):
    b3 = _conv("branch3x3", 384, 3, strides=2, same=False)(x)
    bd = _conv("branch3x3dbl_2", 96, 3)(_conv("branch3x3dbl_1", 64)(x))
    bd = _conv("branch3x3dbl_3", 96, 3, strides=2, same=False)(bd)
    bp = _max_pool_3x3(x, 2)
    return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
  """FIDInceptionC (Mixed_6b..e): 17x17 block with factorised 7x7 convs; output 768 channels."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = _conv("branch1x1", 192)(x)
    b7 = _conv("branch7x7_1", c7)(x)
    b7 = _conv("branch7x7_2", c7, 1, 7)(b7)
    b7 = _conv("branch7x7_3", 192, 7, 1)(b7)
    bd = _conv("branch7x7dbl_1", c7)(x)
    bd = _conv("branch7x7dbl_2", c7, 7, 1)(bd)
    bd = _conv("branch7x7dbl_3", c7, 1, 7)(bd)
    bd = _conv("branch7x7dbl_4", c7, 7, 1)(bd)
    bd = _conv("branch7x7dbl_5", 192, 1, 7)(bd)
    bp = _conv("branch_pool", 192)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """InceptionD (Mixed_7a): 17x17 -> 8x8 reduction; output 1280 channels."""

  @nn.compact
  def __call__(self, x):
    b3 = _conv("branch3x3_1", 192)(x)
    b3 = _conv("branch3x3_2", 320, 3, strides=2, same=False)(b3)
    b7 = _conv("branch7x7x3_1", 192)(x)
    b7 = _conv("branch7x7x3_2", 192, 1, 7)(b7)
    b7 = _conv("branch7x7x3_3", 192, 7, 1)(b7)
    b7 = _conv("branch7x7x3_4", 192, 3, strides=2, same=False)(b7)
    bp = _max_pool_3x3(x, 2)
    return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
  """FIDInceptionE_1 (Mixed_7b, avg-pool branch) / FIDInceptionE_2 (Mixed_7c, max-pool branch)."""
  max_pool_branch: bool

  @nn.compact
  def __call__(self, x):
    b1 = _conv("branch1x1", 320)(x)
    b3 = _conv("branch3x3_1", 384)(x)
    b3 = jnp.concatenate([_conv("branch3x3_2a", 384, 1, 3)(b3),
                          _conv("branch3x3_2b", 384, 3, 1)(b3)], axis=-1)
    bd = _conv("branch3x3dbl_2", 384, 3)(_conv("branch3x3dbl_1", 448)(x))
    bd = jnp.concatenate([_conv("branch3x3dbl_3a", 384, 1, 3)(bd),
                          _conv("branch3x3dbl_3b", 384, 3, 1)(bd)], axis=-1)
    pooled = _max_pool_3x3(x, 1) if self.max_pool_branch else _avg_pool_3x3(x)
    bp = _conv("branch_pool", 192)(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """Preprocessed [N, 299, 299, 3] -> (pool3 [N, 2048], logits [N, 1008], block means).

  `block_means` holds the spatial channel means after blocks 0/1/2 (64/192/768 channels), the
  debugging aid of the parity fixture.
  """

  @nn.compact
  def __call__(self, x):
    x = _conv("Conv2d_1a_3x3", 32, 3, strides=2, same=False)(x)
    x = _conv("Conv2d_2a_3x3", 32, 3, same=False)(x)
    x = _conv("Conv2d_2b_3x3", 64, 3)(x)
    x = _max_pool_3x3(x, 2)
    block0 = x
    x = _conv("Conv2d_3b_1x1", 80)(x)
    x = _conv("Conv2d_4a_3x3", 192, 3, same=False)(x)
    x = _max_pool_3x3(x, 2)
    block1 = x
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    block2 = x
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(False, name="Mixed_7b")(x)
    x = InceptionE(True, name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_CLASSES, precision=_HIGHEST, name="fc")(pool3)
    means = tuple(jnp.mean(b, axis=(1, 2)) for b in (block0, block1, block2))
    return pool3, logits, means


# ----------------------------------------------------------------------------- weights


@functools.lru_cache(maxsize=1)
def _param_shapes() -> dict:
  """Flat {torch module path: {'kernel': shape, 'bias': shape}} of the Linen parameters."""
  shapes = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]:
    keys = [p.key for p in path]
    flat.setdefault(".".join(keys[:-1]), {})[keys[-1]] = tuple(leaf.shape)
  return flat


def expected_state_dict_shapes() -> dict:
  """{pytorch-fid state-dict name: shape} (566 entries) that `params_from_torch_state_dict` needs."""
  out = {}
  for module, shapes in _param_shapes().items():
    if module == "fc":
      out["fc.weight"] = shapes["kernel"][::-1]
      out["fc.bias"] = shapes["bias"]
      continue
    kh, kw, cin, cout = shapes["kernel"]
    out[f"{module}.conv.weight"] = (cout, cin, kh, kw)
    for stat in ("weight", "bias", "running_mean", "running_var"):
      out[f"{module}.bn.{stat}"] = (cout,)
    out[f"{module}.bn.num_batches_tracked"] = ()
  return out


def check_state_dict(sd: Mapping[str, np.ndarray], expected: Mapping[str, tuple], what: str):
  """Raises InceptionWeightsError naming missing, unexpected, misshaped or non-finite entries."""
  missing = sorted(set(expected) - set(sd))
  unexpected = sorted(set(sd) - set(expected))
  misshaped = [f"{k}: {tuple(np.shape(sd[k]))} != {expected[k]}" for k in expected
               if k in sd and tuple(np.shape(sd[k])) != tuple(expected[k])]
  nonfinite = [k for k in expected if k in sd and not np.all(np.isfinite(np.asarray(sd[k])))]
  problems = []
  for label, items in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped),
                       ("non-finite", nonfinite)):
    if items:
      more = ", ..." if len(items) > 5 else ""
      problems.append(f"{len(items)} {label} ({', '.join(items[:5])}{more})")
  if problems:
    raise InceptionWeightsError(f"not a {what} state dict: " + "; ".join(problems))


def fold_batchnorm(sd: Mapping[str, np.ndarray], conv_key: str, bn_prefix: str, eps: float):
  """torch conv weight (OIHW, no bias) + inference BatchNorm -> {'kernel': HWIO, 'bias': [O]}."""
  get = lambda k: np.asarray(sd[k], np.float64)
  scale = get(f"{bn_prefix}.weight") / np.sqrt(get(f"{bn_prefix}.running_var") + eps)
  return {"kernel": (get(conv_key).transpose(2, 3, 1, 0) * scale).astype(np.float32),
          "bias": (get(f"{bn_prefix}.bias") - get(f"{bn_prefix}.running_mean") * scale
                   ).astype(np.float32)}


def params_from_torch_state_dict(sd: Mapping[str, np.ndarray]) -> dict:
  """pytorch-fid state dict (numpy arrays, OIHW convs) -> Linen variables with BatchNorm folded.

  Raises InceptionWeightsError naming every missing, unexpected or misshaped key.
  """
  check_state_dict(sd, expected_state_dict_shapes(), "pytorch-fid FID-InceptionV3")
  params = {}
  for module in _param_shapes():
    if module == "fc":
      leaf = {"kernel": np.asarray(sd["fc.weight"], np.float32).T,
              "bias": np.asarray(sd["fc.bias"], np.float32)}
    else:
      leaf = fold_batchnorm(sd, f"{module}.conv.weight", f"{module}.bn", BN_EPS)
    *parents, last = module.split(".")
    node = params
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = leaf
  return {"params": params}


def load_inception_params(path) -> dict:
  """Reads pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (any torch.save format, no torch)
  or an `.npz` of the same state dict, and returns Linen variables."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(
        f"Inception weights not found at {path}. Download pytorch-fid's {PYTORCH_FID_WEIGHTS_URL} "
        "and pass its path (--inception_path / config.eval.inception_path).")
  if path.suffix == ".npz":
    sd = safe_unpickle.load_npz(path)
  else:
    sd = safe_unpickle.load_torch_state_dict(path)
  try:
    return params_from_torch_state_dict(sd)
  except InceptionWeightsError as e:
    raise InceptionWeightsError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------- inference


@functools.partial(jax.jit, static_argnames=("resize_mode", "with_block_means"))
def forward(variables, images, resize_mode, with_block_means=False):
  """uint8 [N, H, W, 3] -> (pool3 [N, 2048], logits [N, 1008]) (+ block means), jitted."""
  pool3, logits, means = FIDInceptionV3().apply(variables, preprocess(images, resize_mode))
  return (pool3, logits, means) if with_block_means else (pool3, logits)


def check_images(images) -> np.ndarray:
  """Validates uint8 NHWC images with 1 or 3 channels; grayscale is repeated to RGB (as EDM)."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 in [0, 255] (NHWC), got dtype {images.dtype}; "
                     "convert with np.clip(np.rint((x + 1) * 127.5), 0, 255).astype(np.uint8)")
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be NHWC with 1 or 3 channels, got shape {images.shape}")
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return images


def sharded_apply(fn, variables, images, mesh) -> tuple:
  """Applies jitted `fn(variables, images)` to this process's batch, sharded over 'data'.

  `images` [n, ...] is zero-padded to a multiple of the local device count, assembled into a global
  array (every process must pass the same n), and the outputs are gathered to numpy on every host
  with the padding removed: each output leaf is [process_count * n, ...], process-major.
  `variables` should already be replicated on the mesh (see `parallel.replicated`).
  """
  n = images.shape[0]
  pad = -n % jax.local_device_count()
  padded = np.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1))
  out = parallel.to_host(fn(variables, parallel.global_batch(mesh, padded)))
  return jax.tree.map(
      lambda a: a.reshape((jax.process_count(), n + pad) + a.shape[1:])[:, :n].reshape(
          (jax.process_count() * n,) + a.shape[1:]), out)


def features(params, images_uint8_nhwc, resize_mode: str = "pytorch-fid", mesh=None,
             with_block_means: bool = False):
  """uint8 [N, H, W, 3] -> (pool3 [N, 2048], logits [N, 1008]) float32 numpy, fc bias included.

  Jitted, with the batch sharded over the mesh's 'data' axis (default: `parallel.make_mesh()`).
  `params` are the variables of `params_from_torch_state_dict`. With `with_block_means` a third
  output holds the block0/1/2 channel means ([N, 64], [N, 192], [N, 768]).
  """
  if resize_mode not in RESIZE_MODES:
    raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
  mesh = parallel.make_mesh() if mesh is None else mesh
  fn = functools.partial(forward, resize_mode=resize_mode, with_block_means=with_block_means)
  variables = jax.device_put(params, parallel.replicated(mesh))
  return sharded_apply(fn, variables, check_images(images_uint8_nhwc), mesh)


def resize_difference(resolution: int) -> dict:
  """Pixel-level difference between the 'tf' and 'pytorch-fid' resizes of a random uint8 image.

  Returns max/mean absolute difference in [0, 255] units after resizing to 299 (before the
  normalisation, which additionally differs: /128 vs /127.5) and the sampling-grid offset
  (pytorch-fid samples 0.5 * (1 - in/299) input pixels left of the TF graph).
  """
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (resolution, resolution)).astype(np.float64)
  out = {}
  for mode in RESIZE_MODES:
    m = resize_matrix(resolution, INPUT_SIZE, mode).astype(np.float64)
    out[mode] = m @ img @ m.T
  diff = np.abs(out["tf"] - out["pytorch-fid"])
  return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
          "offset_input_pixels": 0.5 * (1 - resolution / INPUT_SIZE)}
