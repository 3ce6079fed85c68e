"""EDM's preconditioners (EDMPrecond, VPPrecond, VEPrecond): the denoiser D(x, sigma) in NHWC.

D(x, sigma) = c_skip x + c_out F(c_in x, c_noise), computed in float32 whatever the compute dtype of
the UNet F. `use_fp16` is accepted for compatibility with EDM's constructor kwargs and recorded, but
does not change precision (EDM itself honours it only on CUDA): pass `dtype=jnp.bfloat16` instead.
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uni_instruct_jax.networks.dhariwal_unet import DhariwalUNet
from uni_instruct_jax.networks.song_unet import SongUNet

MODEL_TYPES = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet}
# UNet fields that the preconditioner sets itself.
_MODEL_FIELDS_SET_BY_PRECOND = ('img_resolution', 'in_channels', 'out_channels', 'label_dim', 'dtype',
                                'attn_implementation', 'remat')


def model_class(model_type: str) -> type:
  """The UNet class for EDM's `model_type` string."""
  if model_type not in MODEL_TYPES:
    raise ValueError(f'unknown model_type {model_type!r}; expected one of {sorted(MODEL_TYPES)}')
  return MODEL_TYPES[model_type]


def model_kwarg_names(model_type: str) -> frozenset:
  """Keyword arguments that EDM's preconditioner forwards to the UNet (`**model_kwargs`)."""
  names = {f.name for f in dataclasses.fields(model_class(model_type)) if f.init}
  return frozenset(names - set(_MODEL_FIELDS_SET_BY_PRECOND) - {'parent', 'name'})


def check_model_kwargs(model_type: str, model_kwargs: dict):
  """Raises ValueError naming any kwarg that `model_type` does not accept."""
  unknown = sorted(set(model_kwargs) - model_kwarg_names(model_type))
  if unknown:
    raise ValueError(f'{model_type} does not accept the keyword argument(s) {unknown}')


class Precond(nn.Module):
  """Base preconditioner: x [B,R,R,C] (NHWC), sigma [B] -> D(x, sigma) [B,R,R,C] float32.

  `model_kwargs` holds the UNet kwargs as sorted (name, value) pairs (lists as tuples); the UNet is
  the submodule `model`.
  """
  img_resolution: int
  img_channels: int
  label_dim: int = 0
  use_fp16: bool = False
  model_type: str = 'SongUNet'
  model_kwargs: tuple = ()
  dtype: Any = jnp.float32
  attn_implementation: Optional[str] = None
  remat: str = ''  # UNet block rematerialisation, one of layers.REMAT_POLICIES

  def unet_config(self) -> tuple[type, dict]:
    """(UNet class, its constructor kwargs)."""
    kwargs = dict(self.model_kwargs)
    check_model_kwargs(self.model_type, kwargs)
    kwargs.update(img_resolution=self.img_resolution, in_channels=self.img_channels,
                  out_channels=self.img_channels, label_dim=self.label_dim, dtype=self.dtype,
                  attn_implementation=self.attn_implementation, remat=self.remat)
    return model_class(self.model_type), kwargs

  def setup(self):
    cls, kwargs = self.unet_config()
    self.model = cls(**kwargs)

  def preconditioning(self, sigma: jax.Array) -> tuple[jax.Array, ...]:
    """(c_skip, c_out, c_in, c_noise) for float32 sigma [B,1,1,1]."""
    raise NotImplementedError

  def _prepare(self, x, sigma, class_labels):
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 4 or x.shape[1:] != (self.img_resolution, self.img_resolution, self.img_channels):
      raise ValueError(f'{type(self).__name__}: x must be NHWC [B, {self.img_resolution}, '
                       f'{self.img_resolution}, {self.img_channels}], got shape {x.shape}')
    sigma = jnp.asarray(sigma, jnp.float32)
    if sigma.size == 1:
      sigma = jnp.broadcast_to(sigma.reshape(()), (x.shape[0],))
    elif sigma.size != x.shape[0]:
      raise ValueError(f'{type(self).__name__}: sigma of shape {sigma.shape} does not match '
                       f'batch {x.shape[0]}; expected [B], [B,1,1,1] or a scalar')
    sigma = sigma.reshape(-1, 1, 1, 1)
    class_labels = None if self.label_dim == 0 else class_labels
    return x, sigma, class_labels

  def __call__(self, x: jax.Array, sigma: jax.Array, class_labels: Optional[jax.Array] = None,
               augment_labels: Optional[jax.Array] = None, train: bool = False,
               return_features: bool = False):
    """D(x, sigma) [B,R,R,C] float32, or (D, bottleneck [B,r,r,C']) if return_features."""
    x, sigma, class_labels = self._prepare(x, sigma, class_labels)
    c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
    f_x, features = self.model((c_in * x).astype(self.dtype), c_noise.reshape(-1), class_labels,
                               augment_labels, train=train, return_features=True)
    d_x = c_skip * x + c_out * f_x.astype(jnp.float32)
    return (d_x, features) if return_features else d_x

  def encode(self, x: jax.Array, sigma: jax.Array, class_labels: Optional[jax.Array] = None,
             augment_labels: Optional[jax.Array] = None, train: bool = False) -> jax.Array:
    """The UNet encoder's bottleneck feature map [B,r,r,C'] (compute dtype), decoder not run."""
    x, sigma, class_labels = self._prepare(x, sigma, class_labels)
    _, _, c_in, c_noise = self.preconditioning(sigma)
    return self.model((c_in * x).astype(self.dtype), c_noise.reshape(-1), class_labels,
                      augment_labels, train=train, decode=False)


class EDMPrecond(Precond):
  """Karras et al. preconditioning: c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4."""
  model_type: str = 'DhariwalUNet'  # EDM's default for EDMPrecond (VP/VE default to SongUNet)
  sigma_min: float = 0.0
  sigma_max: float = float('inf')
  sigma_data: float = 0.5

  def preconditioning(self, sigma):
    sd = self.sigma_data
    c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
    c_out = sigma * sd / jnp.sqrt(sigma ** 2 + sd ** 2)
    c_in = 1 / jnp.sqrt(sd ** 2 + sigma ** 2)
    c_noise = jnp.log(sigma) / 4
    return c_skip, c_out, c_in, c_noise


class VPPrecond(Precond):
  """Variance-preserving preconditioning: c_out = -s, c_noise = (M-1) t(s) of the VP schedule."""
  beta_d: float = 19.9
  beta_min: float = 0.1
  M: int = 1000
  epsilon_t: float = 1e-5

  def sigma(self, t):
    """VP noise level sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (expm1: accurate at small t)."""
    t = jnp.asarray(t, jnp.float32)
    return jnp.sqrt(jnp.expm1(0.5 * self.beta_d * t ** 2 + self.beta_min * t))

  def sigma_inv(self, sigma):
    """Inverse of `sigma(t)`."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return (jnp.sqrt(self.beta_min ** 2 + 2 * self.beta_d * jnp.log(1 + sigma ** 2))
            - self.beta_min) / self.beta_d

  @property
  def sigma_min(self) -> float:
    return float(self.sigma(self.epsilon_t))

  @property
  def sigma_max(self) -> float:
    return float(self.sigma(1.0))

  def preconditioning(self, sigma):
    return 1.0, -sigma, 1 / jnp.sqrt(sigma ** 2 + 1), (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(Precond):
  """Variance-exploding preconditioning: c_skip = 1, c_out = s, c_in = 1, c_noise = ln(s/2)."""
  sigma_min: float = 0.02
  sigma_max: float = 100.0

  def preconditioning(self, sigma):
    return 1.0, sigma, 1.0, jnp.log(0.5 * sigma)


PRECONDS = {'EDMPrecond': EDMPrecond, 'VPPrecond': VPPrecond, 'VEPrecond': VEPrecond}


def plain_value(value):
  """Pickled EDM kwarg value -> hashable Python value (NumPy scalars unwrapped, lists as tuples)."""
  if isinstance(value, np.ndarray):
    value = value.tolist()
  if isinstance(value, (list, tuple)):
    return tuple(plain_value(v) for v in value)
  if isinstance(value, np.generic):
    return value.item()
  return value
