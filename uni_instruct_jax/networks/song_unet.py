"""EDM's SongUNet (DDPM++ and NCSN++ of Song et al. 2021) in Flax Linen, NHWC."""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uni_instruct_jax.networks import layers
from uni_instruct_jax.networks.layers import Init, LayerSpec

EMBEDDING_TYPES = ('positional', 'fourier')
ENCODER_TYPES = ('standard', 'skip', 'residual')
DECODER_TYPES = ('standard', 'skip')


class SongUNet(nn.Module):
  """DDPM++ / NCSN++ UNet: x [B,R,R,in_channels], noise_labels [B] -> F [B,R,R,out_channels].

  Fields and defaults are EDM's. Submodules are named `map_*`, `enc_{R}x{R}_*`, `dec_{R}x{R}_*`
  after EDM's state dict. `dtype` is the compute dtype of the UNet body; the mapping network runs
  in float32 (as EDM's does under use_fp16).
  """
  img_resolution: int
  in_channels: int
  out_channels: int
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 2, 2)
  channel_mult_emb: int = 4
  num_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.10
  label_dropout: float = 0.0
  embedding_type: str = 'positional'
  channel_mult_noise: int = 1
  encoder_type: str = 'standard'
  decoder_type: str = 'standard'
  resample_filter: Sequence[float] = (1, 1)
  dtype: jnp.dtype = jnp.float32
  attn_implementation: Optional[str] = None
  remat: str = ''  # layers.REMAT_POLICIES

  def _check(self):
    for field, value, allowed in (('embedding_type', self.embedding_type, EMBEDDING_TYPES),
                                  ('encoder_type', self.encoder_type, ENCODER_TYPES),
                                  ('decoder_type', self.decoder_type, DECODER_TYPES)):
      if value not in allowed:
        raise ValueError(f'SongUNet: {field}={value!r} is not one of {allowed}')

  def layout(self) -> tuple[list[LayerSpec], list[LayerSpec]]:
    """EDM's `enc` and `dec` ModuleDicts as ordered LayerSpec lists (pure Python, no variables)."""
    self._check()
    mc = self.model_channels
    enc, dec = [], []
    cout = caux = self.in_channels
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      if level == 0:
        enc.append(LayerSpec(f'{res}x{res}_conv', 'conv', cout, mc))
        cout = mc
      else:
        enc.append(LayerSpec(f'{res}x{res}_down', 'block', cout, cout, (('down', True),)))
        if self.encoder_type == 'skip':
          enc.append(LayerSpec(f'{res}x{res}_aux_down', 'aux_down', caux, caux))
          enc.append(LayerSpec(f'{res}x{res}_aux_skip', 'aux_skip', caux, cout))
        if self.encoder_type == 'residual':
          enc.append(LayerSpec(f'{res}x{res}_aux_residual', 'aux_residual', caux, cout))
          caux = cout
      for idx in range(self.num_blocks):
        cin, cout = cout, mc * mult
        enc.append(LayerSpec(f'{res}x{res}_block{idx}', 'block', cin, cout,
                             (('attention', res in self.attn_resolutions),)))
    skips = [spec.out_channels for spec in enc if 'aux' not in spec.kind]

    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = self.img_resolution >> level
      if level == len(self.channel_mult) - 1:
        dec.append(LayerSpec(f'{res}x{res}_in0', 'block', cout, cout, (('attention', True),)))
        dec.append(LayerSpec(f'{res}x{res}_in1', 'block', cout, cout))
      else:
        dec.append(LayerSpec(f'{res}x{res}_up', 'block', cout, cout, (('up', True),)))
      for idx in range(self.num_blocks + 1):
        cin, cout = cout + skips.pop(), mc * mult
        attn = idx == self.num_blocks and res in self.attn_resolutions
        dec.append(LayerSpec(f'{res}x{res}_block{idx}', 'block', cin, cout, (('attention', attn),)))
      if self.decoder_type == 'skip' or level == 0:
        if self.decoder_type == 'skip' and level < len(self.channel_mult) - 1:
          dec.append(LayerSpec(f'{res}x{res}_aux_up', 'aux_up', self.out_channels, self.out_channels))
        dec.append(LayerSpec(f'{res}x{res}_aux_norm', 'aux_norm', cout, cout))
        dec.append(LayerSpec(f'{res}x{res}_aux_conv', 'aux_conv', cout, self.out_channels))
    return enc, dec

  def resample_filter_keys(self) -> dict:
    """Torch buffer keys (relative to this UNet, e.g. 'enc.16x16_down.conv0.resample_filter') -> f."""
    enc, dec = self.layout()
    return {**layers.resample_filter_keys('enc', enc, self.resample_filter),
            **layers.resample_filter_keys('dec', dec, self.resample_filter)}

  @nn.compact
  def __call__(self, x: jax.Array, noise_labels: jax.Array, class_labels: Optional[jax.Array] = None,
               augment_labels: Optional[jax.Array] = None, train: bool = False,
               return_features: bool = False, decode: bool = True):
    """F(x) [B,R,R,out] (dtype); `(F, bottleneck)` if return_features; bottleneck only if not decode.

    The bottleneck [B,r,r,C] is the encoder loop's output at the lowest resolution (after the last
    encoder block and its residual/skip aux path).
    """
    enc, dec = self.layout()
    batch = x.shape[0]
    block_cls = layers.unet_block(self.remat)
    init = Init('xavier_uniform')
    init_zero = Init('xavier_uniform', 1e-5)
    init_attn = Init('xavier_uniform', float(np.sqrt(0.2)))
    emb_channels = self.model_channels * self.channel_mult_emb
    noise_channels = self.model_channels * self.channel_mult_noise
    block = dict(
        num_heads=1, dropout=self.dropout, skip_scale=float(np.sqrt(0.5)), eps=1e-6,
        resample_filter=tuple(self.resample_filter), resample_proj=True, adaptive_scale=False,
        init_spec=init, init_zero=init_zero, init_attn=init_attn,
        attn_implementation=self.attn_implementation, dtype=self.dtype)

    # Mapping (float32).
    if self.embedding_type == 'positional':
      emb = layers.positional_embedding(noise_labels, noise_channels, endpoint=True)
    else:
      emb = layers.FourierEmbedding(noise_channels, name='map_noise')(noise_labels)
    emb = emb.reshape(emb.shape[0], 2, -1)[:, ::-1].reshape(emb.shape)  # [sin, cos]
    if self.label_dim:
      labels = layers.as_class_labels(class_labels, self.label_dim, batch)
      labels = layers.drop_labels(self, labels, self.label_dropout, batch, train)
      emb = emb + layers.Linear(noise_channels, init_spec=init, name='map_label')(
          labels * np.sqrt(self.label_dim))
    if self.augment_dim:
      # map_augment has no bias, so all-zero labels add exactly zero (EDM skips it when None).
      aug = jnp.zeros((batch, self.augment_dim)) if augment_labels is None else augment_labels
      emb = emb + layers.Linear(noise_channels, use_bias=False, init_spec=init, name='map_augment')(
          jnp.asarray(aug, jnp.float32))
    emb = nn.silu(layers.Linear(emb_channels, init_spec=init, name='map_layer0')(emb))
    emb = nn.silu(layers.Linear(emb_channels, init_spec=init, name='map_layer1')(emb))

    # Encoder.
    x = x.astype(self.dtype)
    skips = []
    aux = x
    for spec in enc:
      name = f'enc_{spec.name}'
      if spec.kind == 'aux_down':
        aux = layers.Conv2d(spec.out_channels, 0, down=True, resample_filter=self.resample_filter,
                            dtype=self.dtype, name=name)(aux)
      elif spec.kind == 'aux_skip':
        x = skips[-1] = x + layers.Conv2d(spec.out_channels, 1, init_spec=init, dtype=self.dtype,
                                          name=name)(aux)
      elif spec.kind == 'aux_residual':
        res = layers.Conv2d(spec.out_channels, 3, down=True, resample_filter=self.resample_filter,
                            fused_resample=True, init_spec=init, dtype=self.dtype, name=name)(aux)
        x = skips[-1] = aux = (x + res) / float(np.sqrt(2))
      elif spec.kind == 'conv':
        x = layers.Conv2d(spec.out_channels, 3, init_spec=init, dtype=self.dtype, name=name)(x)
        skips.append(x)
      else:
        x = block_cls(spec.out_channels, name=name, **block, **dict(spec.block))(x, emb, train)
        skips.append(x)
    features = x
    if not decode:
      return features

    # Decoder.
    aux = tmp = None
    for spec in dec:
      name = f'dec_{spec.name}'
      if spec.kind == 'aux_up':
        aux = layers.Conv2d(spec.out_channels, 0, up=True, resample_filter=self.resample_filter,
                            dtype=self.dtype, name=name)(aux)
      elif spec.kind == 'aux_norm':
        tmp = layers.group_norm(spec.in_channels, 1e-6, self.dtype, name)(x)
      elif spec.kind == 'aux_conv':
        tmp = layers.Conv2d(spec.out_channels, 3, init_spec=init_zero, dtype=self.dtype, name=name)(
            nn.silu(tmp))
        aux = tmp if aux is None else tmp + aux
      else:
        if x.shape[-1] != spec.in_channels:
          x = jnp.concatenate([x, skips.pop()], axis=-1)
        x = block_cls(spec.out_channels, name=name, **block, **dict(spec.block))(x, emb, train)
    return (aux, features) if return_features else aux
