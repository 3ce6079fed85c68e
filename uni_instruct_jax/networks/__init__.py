"""Flax Linen ports of NVlabs/edm's networks, and the torch-state-dict naming rule.

Naming rule (torch state-dict key -> Flax variables path), used by the checkpoint converter:
  * the segment after `enc`/`dec` is joined to it with '_':
    `model.enc.32x32_block0.conv0.weight` -> ('params', 'model', 'enc_32x32_block0', 'conv0', 'kernel');
  * `weight` -> `kernel` (Conv2d OIHW -> HWIO, Linear [out,in] -> [in,out]), or `scale` for GroupNorm
    (modules whose name contains 'norm'); `bias` -> `bias`;
  * `freqs` (FourierEmbedding) -> ('buffers', ..., 'freqs');
  * `resample_filter` buffers are constants of the config, not variables: compare them with
    `resample_filters(model)[key]`.
"""

from typing import Union

import jax.numpy as jnp
import numpy as np

from uni_instruct_jax.networks.dhariwal_unet import DhariwalUNet
from uni_instruct_jax.networks.layers import resample_filter_2d
from uni_instruct_jax.networks.precond import (EDMPrecond, PRECONDS, Precond, VEPrecond, VPPrecond,
                                               check_model_kwargs, plain_value)
from uni_instruct_jax.networks.song_unet import SongUNet

__all__ = [
    'DhariwalUNet', 'EDMPrecond', 'Precond', 'SongUNet', 'VEPrecond', 'VPPrecond', 'build_network',
    'resample_filters', 'torch_key_to_flax_path', 'torch_value_to_flax',
]

_PRECOND_ARGS = {
    'EDMPrecond': ('sigma_min', 'sigma_max', 'sigma_data'),
    'VPPrecond': ('beta_d', 'beta_min', 'M', 'epsilon_t'),
    'VEPrecond': ('sigma_min', 'sigma_max'),
}
_COMMON_ARGS = ('img_resolution', 'img_channels', 'label_dim', 'use_fp16', 'model_type')


def build_network(class_name: str, init_kwargs: dict, dtype=jnp.float32,
                  attn_implementation=None) -> Precond:
  """Flax preconditioner from EDM's pickled constructor kwargs (`_init_kwargs`).

  Args:
    class_name: 'EDMPrecond' | 'VPPrecond' | 'VEPrecond' (a dotted prefix such as
      'training.networks.EDMPrecond' is allowed).
    init_kwargs: img_resolution, img_channels, label_dim, use_fp16, the preconditioner's constants,
      model_type ('SongUNet' | 'DhariwalUNet') and the UNet kwargs, exactly as EDM passes them.
    dtype: compute dtype of the UNet (float32 or bfloat16); params stay float32.
    attn_implementation: forwarded to `jax.nn.dot_product_attention` (None = default).
  Raises:
    ValueError naming an unknown class, a missing required kwarg, or unknown kwargs.
  """
  name = class_name.rsplit('.', 1)[-1]
  if name not in PRECONDS:
    raise ValueError(f'unknown preconditioner class {class_name!r}; expected one of {sorted(PRECONDS)}')
  kwargs = {k: plain_value(v) for k, v in init_kwargs.items()}
  precond_names = _COMMON_ARGS + _PRECOND_ARGS[name]
  precond_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in precond_names}
  missing = [k for k in ('img_resolution', 'img_channels') if k not in precond_kwargs]
  if missing:
    raise ValueError(f'{name}: missing required keyword argument(s) {missing}')
  model_type = precond_kwargs.setdefault('model_type', PRECONDS[name].model_type)
  check_model_kwargs(model_type, kwargs)
  return PRECONDS[name](**precond_kwargs, model_kwargs=tuple(sorted(kwargs.items())),
                        dtype=jnp.dtype(dtype), attn_implementation=attn_implementation)


def torch_key_to_flax_path(key: str) -> tuple[str, ...]:
  """Flax variables path (collection first) of an EDM state-dict key; see the module docstring.

  Raises ValueError for resample_filter buffers (config constants) and for keys outside the grammar.
  """
  segments = key.split('.')
  if len(segments) < 2 or not all(segments):
    raise ValueError(f'malformed EDM state-dict key {key!r}')
  *modules, leaf = segments
  path = []
  i = 0
  while i < len(modules):
    if modules[i] in ('enc', 'dec'):
      if i + 1 == len(modules):
        raise ValueError(f'malformed EDM state-dict key {key!r}: nothing after {modules[i]!r}')
      path.append(f'{modules[i]}_{modules[i + 1]}')
      i += 2
    else:
      path.append(modules[i])
      i += 1
  if leaf == 'weight':
    return ('params', *path, 'scale' if 'norm' in path[-1] else 'kernel')
  if leaf == 'bias':
    return ('params', *path, 'bias')
  if leaf == 'freqs':
    return ('buffers', *path, 'freqs')
  if leaf == 'resample_filter':
    raise ValueError(f'{key!r} is a constant of the config, not a variable; '
                     'check it against resample_filters(model)')
  raise ValueError(f'EDM state-dict key {key!r} has an unknown leaf {leaf!r}')


def torch_value_to_flax(key: str, value: np.ndarray) -> np.ndarray:
  """Torch tensor -> Flax layout: conv weight OIHW -> HWIO, linear weight [out,in] -> [in,out]."""
  value = np.asarray(value)
  if key.rsplit('.', 1)[-1] == 'weight':
    if value.ndim == 4:
      return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
      return value.T
  return value


def resample_filters(model: Union[Precond, SongUNet, DhariwalUNet]) -> dict[str, np.ndarray]:
  """Every `resample_filter` buffer EDM registers for this config: torch key -> float32 [1,1,k,k].

  Keys are as in EDM's state dict, e.g. 'model.enc.16x16_down.conv0.resample_filter' for a
  preconditioner ('enc.16x16_down...' for a bare UNet). Values are outer(f, f) / sum(f)^2.
  """
  if isinstance(model, Precond):
    cls, kwargs = model.unet_config()
    unet, prefix = cls(**kwargs, parent=None), 'model.'
  elif isinstance(model, (SongUNet, DhariwalUNet)):
    unet, prefix = model, ''
  else:
    raise ValueError(f'resample_filters expects a preconditioner or UNet, got {type(model).__name__}')
  return {prefix + k: resample_filter_2d(f)[None, None] for k, f in unet.resample_filter_keys().items()}
