"""Generator architectures other than the teacher's (issue 10 §5): Flax modules mapping
(z [B, *data_shape] ~ N(0, I), one-hot labels [B, label_dim] or None) -> samples [B, *data_shape]
in data units, trained from scratch or from their own earlier parameters (Diff-Instruct's "any
generator whose samples are differentiable in its parameters"). The fake score always keeps the
teacher's architecture.

Registry GENERATORS (config `generator.network`):
  'mlp': a 3-layer SiLU MLP on the flattened latent and label (any data shape; the toy's 2-D points).
  'dcgan': a DCGAN-like image generator (NHWC, side divisible by 4): project a 64-d code of the
    latent and label to a 4x4 (side/4) map, two nearest-neighbour x2 upsamplings with 3x3 convs.
"""

import functools
import math
from typing import Any, Optional, Sequence, Tuple

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class MLPGenerator(nn.Module):
  """z [B, *shape] (+ labels) -> [B, *shape] by an MLP of widths `hidden`."""
  data_shape: Tuple[int, ...]
  hidden: Sequence[int] = (128, 128, 128)

  @nn.compact
  def __call__(self, z, labels: Optional[jnp.ndarray] = None, train: bool = False):
    del train
    h = z.reshape((z.shape[0], -1))
    if labels is not None:
      h = jnp.concatenate([h, labels.astype(h.dtype)], axis=-1)
    for width in self.hidden:
      h = nn.silu(nn.Dense(width)(h))
    return nn.Dense(math.prod(self.data_shape))(h).reshape(z.shape)


class DCGANGenerator(nn.Module):
  """z [B, H, W, C] (+ labels) -> [B, H, W, C]: latent code -> (H/4, W/4, 2 ch) map -> 2 x
  (upsample x2, conv 3x3, SiLU) -> conv 3x3 to C channels."""
  data_shape: Tuple[int, int, int]
  channels: int = 32
  code_dim: int = 64

  @nn.compact
  def __call__(self, z, labels: Optional[jnp.ndarray] = None, train: bool = False):
    del train
    h, w, c = self.data_shape
    code = nn.Dense(self.code_dim)(z.reshape((z.shape[0], -1)))
    if labels is not None:
      code = code + nn.Dense(self.code_dim, use_bias=False)(labels.astype(code.dtype))
    x = nn.Dense((h // 4) * (w // 4) * 2 * self.channels)(nn.silu(code))
    x = nn.silu(x.reshape((z.shape[0], h // 4, w // 4, 2 * self.channels)))
    for width in (2 * self.channels, self.channels):
      x = jax.image.resize(x, (x.shape[0], 2 * x.shape[1], 2 * x.shape[2], x.shape[3]), "nearest")
      x = nn.silu(nn.Conv(width, (3, 3))(x))
    return nn.Conv(c, (3, 3))(x)


GENERATORS = {"mlp": MLPGenerator, "dcgan": DCGANGenerator}


def build_generator(name: str, data_shape: Sequence[int]) -> nn.Module:
  """The registered generator `name` for samples of `data_shape`; ValueError when unknown or
  when the shape does not fit it."""
  if name not in GENERATORS:
    raise ValueError(f"unknown generator network {name!r}; known: {sorted(GENERATORS)}")
  data_shape = tuple(int(d) for d in data_shape)
  if name == "dcgan" and (len(data_shape) != 3 or data_shape[0] % 4 or data_shape[1] % 4):
    raise ValueError(f"'dcgan' needs [H, W, C] images with H, W divisible by 4, got {data_shape}")
  return GENERATORS[name](data_shape=data_shape)


def init_generator(module: nn.Module, key, label_dim: int):
  """Fresh 'params' of a registered generator (one sample of zeros traced)."""
  z = jnp.zeros((1,) + tuple(module.data_shape), jnp.float32)
  labels = jnp.zeros((1, label_dim), jnp.float32) if label_dim else None
  return module.init(key, z, labels)["params"]


def check_params(module: nn.Module, label_dim: int, params: Any) -> Any:
  """`params` (nested dicts of arrays, e.g. restored from a checkpoint) as numpy arrays, after
  checking them against the tree of `init_generator` (traced, no compute): ValueError naming the
  first key, in sorted order, that is missing, unexpected, not an array, of another shape or
  dtype, or non-finite."""
  expected = traverse_util.flatten_dict(jax.eval_shape(
      functools.partial(init_generator, module, label_dim=label_dim), jax.random.key(0)))
  if not isinstance(params, dict) or not params:
    raise ValueError(f"not a tree of parameters (a {type(params).__name__})")
  got = traverse_util.flatten_dict(params)
  for key in sorted(set(expected) | set(got), key=lambda k: "/".join(map(str, k))):
    name, want, value = "/".join(map(str, key)), expected.get(key), got.get(key)
    if value is None:
      raise ValueError(f"missing key {name} (a {type(module).__name__} has it)")
    if want is None:
      raise ValueError(f"unexpected key {name}: a {type(module).__name__} has no such parameter")
    if not isinstance(value, (np.ndarray, jax.Array)):
      raise ValueError(f"key {name}: not an array (a {type(value).__name__})")
    if (value.shape, value.dtype) != (want.shape, want.dtype):
      raise ValueError(f"key {name}: {value.dtype.name}{list(value.shape)} but the generator "
                       f"expects {want.dtype.name}{list(want.shape)}")
    if not np.all(np.isfinite(value)):
      raise ValueError(f"key {name}: non-finite values")
  return traverse_util.unflatten_dict({k: np.asarray(v) for k, v in got.items()})
