"""EDM's DhariwalUNet (ADM of Dhariwal & Nichol 2021) in Flax Linen, NHWC."""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uni_instruct_jax.networks import layers
from uni_instruct_jax.networks.layers import Init, LayerSpec

CHANNELS_PER_HEAD = 64  # EDM hardcodes this in DhariwalUNet's block kwargs.


class DhariwalUNet(nn.Module):
  """ADM UNet: x [B,R,R,in_channels], noise_labels [B] -> F [B,R,R,out_channels].

  Fields and defaults are EDM's (attention heads = channels // 64). Submodules are named
  `map_*`, `enc_{R}x{R}_*`, `dec_{R}x{R}_*`, `out_norm`, `out_conv` after EDM's state dict. `dtype`
  is the compute dtype of the UNet body; the mapping network runs in float32.
  """
  img_resolution: int
  in_channels: int
  out_channels: int
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 192
  channel_mult: Sequence[int] = (1, 2, 3, 4)
  channel_mult_emb: int = 4
  num_blocks: int = 3
  attn_resolutions: Sequence[int] = (32, 16, 8)
  dropout: float = 0.10
  label_dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  attn_implementation: Optional[str] = None
  remat: str = ''  # layers.REMAT_POLICIES

  def layout(self) -> tuple[list[LayerSpec], list[LayerSpec]]:
    """EDM's `enc` and `dec` ModuleDicts as ordered LayerSpec lists (pure Python, no variables)."""
    mc = self.model_channels
    enc, dec = [], []
    cout = self.in_channels
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      if level == 0:
        enc.append(LayerSpec(f'{res}x{res}_conv', 'conv', cout, mc * mult))
        cout = mc * mult
      else:
        enc.append(LayerSpec(f'{res}x{res}_down', 'block', cout, cout, (('down', True),)))
      for idx in range(self.num_blocks):
        cin, cout = cout, mc * mult
        enc.append(LayerSpec(f'{res}x{res}_block{idx}', 'block', cin, cout,
                             (('attention', res in self.attn_resolutions),)))
    skips = [spec.out_channels for spec in enc]

    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = self.img_resolution >> level
      if level == len(self.channel_mult) - 1:
        dec.append(LayerSpec(f'{res}x{res}_in0', 'block', cout, cout, (('attention', True),)))
        dec.append(LayerSpec(f'{res}x{res}_in1', 'block', cout, cout))
      else:
        dec.append(LayerSpec(f'{res}x{res}_up', 'block', cout, cout, (('up', True),)))
      for idx in range(self.num_blocks + 1):
        cin, cout = cout + skips.pop(), mc * mult
        dec.append(LayerSpec(f'{res}x{res}_block{idx}', 'block', cin, cout,
                             (('attention', res in self.attn_resolutions),)))
    return enc, dec

  def resample_filter_keys(self) -> dict:
    """Torch buffer keys (relative to this UNet, e.g. 'enc.32x32_down.conv0.resample_filter') -> f."""
    enc, dec = self.layout()
    return {**layers.resample_filter_keys('enc', enc, (1, 1)),
            **layers.resample_filter_keys('dec', dec, (1, 1))}

  @nn.compact
  def __call__(self, x: jax.Array, noise_labels: jax.Array, class_labels: Optional[jax.Array] = None,
               augment_labels: Optional[jax.Array] = None, train: bool = False,
               return_features: bool = False, decode: bool = True):
    """F(x) [B,R,R,out] (dtype); `(F, bottleneck)` if return_features; bottleneck only if not decode.

    The bottleneck [B,r,r,C] is the output of the last encoder block (lowest resolution).
    """
    enc, dec = self.layout()
    batch = x.shape[0]
    block_cls = layers.unet_block(self.remat)
    gain = float(np.sqrt(1 / 3))
    init = Init('kaiming_uniform', gain, gain)
    init_zero = Init('kaiming_uniform', 0.0, 0.0)
    emb_channels = self.model_channels * self.channel_mult_emb
    block = dict(
        channels_per_head=CHANNELS_PER_HEAD, dropout=self.dropout, init_spec=init,
        init_zero=init_zero, attn_implementation=self.attn_implementation, dtype=self.dtype)

    # Mapping (float32).
    emb = layers.positional_embedding(noise_labels, self.model_channels, endpoint=False)
    if self.augment_dim:
      # map_augment has no bias, so all-zero labels add exactly zero (EDM skips it when None).
      aug = jnp.zeros((batch, self.augment_dim)) if augment_labels is None else augment_labels
      emb = emb + layers.Linear(self.model_channels, use_bias=False, init_spec=init_zero,
                                name='map_augment')(jnp.asarray(aug, jnp.float32))
    emb = nn.silu(layers.Linear(emb_channels, init_spec=init, name='map_layer0')(emb))
    emb = layers.Linear(emb_channels, init_spec=init, name='map_layer1')(emb)
    if self.label_dim:
      labels = layers.as_class_labels(class_labels, self.label_dim, batch)
      labels = layers.drop_labels(self, labels, self.label_dropout, batch, train)
      label_init = Init('kaiming_normal', float(np.sqrt(self.label_dim)))
      emb = emb + layers.Linear(emb_channels, use_bias=False, init_spec=label_init,
                                name='map_label')(labels)
    emb = nn.silu(emb)

    # Encoder.
    x = x.astype(self.dtype)
    skips = []
    for spec in enc:
      name = f'enc_{spec.name}'
      if spec.kind == 'conv':
        x = layers.Conv2d(spec.out_channels, 3, init_spec=init, dtype=self.dtype, name=name)(x)
      else:
        x = block_cls(spec.out_channels, name=name, **block, **dict(spec.block))(x, emb, train)
      skips.append(x)
    features = x
    if not decode:
      return features

    # Decoder.
    for spec in dec:
      if x.shape[-1] != spec.in_channels:
        x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = block_cls(spec.out_channels, name=f'dec_{spec.name}', **block, **dict(spec.block))(
          x, emb, train)
    x = layers.group_norm(x.shape[-1], 1e-5, self.dtype, 'out_norm')(x)
    x = layers.Conv2d(self.out_channels, 3, init_spec=init_zero, dtype=self.dtype, name='out_conv')(
        nn.silu(x))
    return (x, features) if return_features else x
