"""Small MLP denoiser with EDM preconditioning, for 2-D toy distillation runs.

Same calling convention as the image preconditioners (docs/design.md) but on flat points:
`x` [B, D] float, `sigma` [B] (noise std, data units). The raw network F sees `c_in * x` and a
positional embedding of `c_noise = ln(sigma) / 4`; `D(x, sigma) = c_skip x + c_out F`.
`return_features=True` also returns the last hidden layer [B, hidden] (the discriminator head of
the fake score network reads it, as the image runs read the UNet bottleneck).
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp


def _noise_embedding(c_noise: jnp.ndarray, num_channels: int) -> jnp.ndarray:
  """Sinusoidal embedding [B, num_channels] of the scalar noise label c_noise [B]."""
  half = num_channels // 2
  freqs = (1.0 / 10000.0) ** (jnp.arange(half, dtype=jnp.float32) / half)
  angles = c_noise[:, None] * freqs[None, :] * 100.0
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class MLPPrecond(nn.Module):
  """EDM-preconditioned MLP denoiser D(x, sigma) for points x [B, dim].

  Attributes:
    dim: data dimension.
    hidden: widths of the hidden layers.
    emb_channels: width of the noise embedding.
    sigma_data: data standard deviation used by the preconditioning.
    dropout: dropout rate on hidden layers (only with train=True, rng 'dropout').
    dtype: compute dtype (params stay float32).
  """
  dim: int = 2
  hidden: Sequence[int] = (128, 128, 128)
  emb_channels: int = 32
  sigma_data: float = 0.5
  dropout: float = 0.0
  label_dim: int = 0
  dtype: Any = jnp.float32

  def setup(self):
    self.layers = [nn.Dense(width, dtype=self.dtype, name=f"layer{i}")
                   for i, width in enumerate(self.hidden)]
    self.drop = nn.Dropout(self.dropout)
    self.out = nn.Dense(self.dim, dtype=self.dtype, name="out")

  def _hidden(self, x, sigma, class_labels, train):
    """Last hidden activations [B, hidden[-1]] in the compute dtype."""
    if x.ndim != 2 or x.shape[-1] != self.dim:
      raise ValueError(f"MLPPrecond expects x of shape [B, {self.dim}], got {x.shape}")
    sigma = sigma.astype(jnp.float32).reshape(-1)
    c_in = 1.0 / jnp.sqrt(sigma**2 + self.sigma_data**2)
    c_noise = jnp.log(sigma) / 4.0
    h = jnp.concatenate([x.astype(jnp.float32) * c_in[:, None],
                         _noise_embedding(c_noise, self.emb_channels)], axis=-1)
    if self.label_dim and class_labels is not None:
      h = jnp.concatenate([h, class_labels.astype(jnp.float32)], axis=-1)
    h = h.astype(self.dtype)
    for layer in self.layers:
      h = nn.silu(layer(h))
      if self.dropout:
        h = self.drop(h, deterministic=not train)
    return h

  def encode(self, x: jnp.ndarray, sigma: jnp.ndarray, class_labels: Optional[jnp.ndarray] = None,
             augment_labels: Optional[jnp.ndarray] = None, train: bool = False) -> jnp.ndarray:
    """Last hidden layer [B, hidden[-1]] (float32)."""
    del augment_labels
    return self._hidden(x, sigma, class_labels, train).astype(jnp.float32)

  def __call__(self, x: jnp.ndarray, sigma: jnp.ndarray,
               class_labels: Optional[jnp.ndarray] = None,
               augment_labels: Optional[jnp.ndarray] = None, train: bool = False,
               return_features: bool = False):
    """Denoised D(x, sigma) [B, dim] float32, or (D, features [B, hidden[-1]])."""
    del augment_labels
    features = self._hidden(x, sigma, class_labels, train)
    f_x = self.out(features).astype(jnp.float32)
    sigma = sigma.astype(jnp.float32).reshape(-1, 1)
    sd2 = self.sigma_data**2
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * self.sigma_data / jnp.sqrt(sigma**2 + sd2)
    d = c_skip * x.astype(jnp.float32) + c_out * f_x
    if return_features:
      return d, features.astype(jnp.float32)
    return d
