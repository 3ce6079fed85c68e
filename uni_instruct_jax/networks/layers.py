"""Building blocks of NVlabs/edm `training/networks.py`, ported to Flax Linen in NHWC layout.

Parameters are float32; the module field `dtype` is the compute dtype of convolutions and linear
layers. Normalisation statistics and the attention softmax are always computed in float32.
"""

from typing import NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = jnp.dtype


class Init(NamedTuple):
  """EDM's init scheme: `mode` with fans of the layer, weight times `weight`, bias times `bias`."""
  mode: str = 'kaiming_normal'
  weight: float = 1.0
  bias: float = 0.0


INIT_MODES = ('xavier_uniform', 'xavier_normal', 'kaiming_uniform', 'kaiming_normal')


def edm_initializer(mode: str, fan_in: int, fan_out: int, gain: float):
  """Initializer drawing EDM's `weight_init(shape, mode, fan_in, fan_out) * gain` (zeros if gain=0)."""
  if mode not in INIT_MODES:
    raise ValueError(f'invalid init mode {mode!r}; expected one of {INIT_MODES}')

  def init(key, shape, dtype=jnp.float32):
    if gain == 0:
      return jnp.zeros(shape, dtype)
    if mode == 'xavier_uniform':
      w = np.sqrt(6 / (fan_in + fan_out)) * jax.random.uniform(key, shape, dtype, -1, 1)
    elif mode == 'xavier_normal':
      w = np.sqrt(2 / (fan_in + fan_out)) * jax.random.normal(key, shape, dtype)
    elif mode == 'kaiming_uniform':
      w = np.sqrt(3 / fan_in) * jax.random.uniform(key, shape, dtype, -1, 1)
    else:
      w = np.sqrt(1 / fan_in) * jax.random.normal(key, shape, dtype)
    return (w * gain).astype(dtype)

  return init


def resample_filter_2d(resample_filter: Sequence[float]) -> np.ndarray:
  """EDM's separable resampling kernel outer(f, f) / sum(f)^2, float32 [k, k]."""
  f = np.asarray(resample_filter, dtype=np.float32)
  if f.ndim != 1 or f.size == 0 or f.sum() == 0:
    raise ValueError(f'resample_filter must be a non-empty 1-D list with non-zero sum, got {resample_filter!r}')
  return np.outer(f, f) / np.square(f.sum())


def _is_box2(resample_filter: Sequence[float], pad: int) -> bool:
  """True when resampling with this filter is plain 2x2 average pooling / nearest upsampling."""
  return pad == 0 and len(resample_filter) == 2 and resample_filter[0] == resample_filter[1]


def downsample(x: jax.Array, resample_filter: Sequence[float], pad: int) -> jax.Array:
  """Depthwise filter then stride 2, zero padding `pad` on each side: [B,H,W,C] -> [B,H',W',C]."""
  if _is_box2(resample_filter, pad):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  f = resample_filter_2d(resample_filter)
  c = x.shape[-1]
  kernel = jnp.asarray(np.tile(f[:, :, None, None], (1, 1, 1, c)), x.dtype)
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(2, 2), padding=((pad, pad), (pad, pad)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c)


def upsample(x: jax.Array, resample_filter: Sequence[float], pad: int) -> jax.Array:
  """Torch's depthwise `conv_transpose2d(x, 4 f, stride=2, padding=pad)`: [B,H,W,C] -> [B,H',W',C]."""
  if _is_box2(resample_filter, pad):
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)
  f = resample_filter_2d(resample_filter) * 4
  k = f.shape[0]
  c = x.shape[-1]
  # A transposed convolution is a correlation of the 2x-dilated input with the flipped kernel.
  kernel = jnp.asarray(np.tile(f[::-1, ::-1, None, None], (1, 1, 1, c)), x.dtype)
  p = k - 1 - pad
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding=((p, p), (p, p)), lhs_dilation=(2, 2),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c)


class Linear(nn.Module):
  """EDM Linear: y = x @ kernel + bias with kernel [in, out] (torch weight transposed)."""
  features: int
  use_bias: bool = True
  init_spec: Init = Init()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in, fan_out = x.shape[-1], self.features
    spec = self.init_spec
    kernel = self.param('kernel', edm_initializer(spec.mode, fan_in, fan_out, spec.weight),
                        (fan_in, fan_out), jnp.float32)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param('bias', edm_initializer(spec.mode, fan_in, fan_out, spec.bias),
                        (fan_out,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class Conv2d(nn.Module):
  """EDM Conv2d in NHWC with optional up/down resampling; `kernel=0` is a weightless resampler.

  Non-fused order is resample first, then the kxk convolution (symmetric padding k//2). Kernel HWIO
  [k, k, in, out]; `features` is ignored when `kernel=0` (the channel count is unchanged).
  """
  features: int
  kernel: int
  use_bias: bool = True
  up: bool = False
  down: bool = False
  resample_filter: Sequence[float] = (1, 1)
  fused_resample: bool = False
  init_spec: Init = Init()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.up and self.down:
      raise ValueError(f'{self.name}: Conv2d cannot both upsample and downsample')
    x = x.astype(self.dtype)
    cin, k = x.shape[-1], self.kernel
    w = b = None
    if k:
      fans = (cin * k * k, self.features * k * k)
      spec = self.init_spec
      w = self.param('kernel', edm_initializer(spec.mode, *fans, spec.weight),
                     (k, k, cin, self.features), jnp.float32).astype(self.dtype)
      if self.use_bias:
        b = self.param('bias', edm_initializer(spec.mode, *fans, spec.bias),
                       (self.features,), jnp.float32).astype(self.dtype)
    w_pad = k // 2
    f_pad = (len(self.resample_filter) - 1) // 2

    if self.fused_resample and self.up and w is not None:
      x = upsample(x, self.resample_filter, max(f_pad - w_pad, 0))
      x = _conv(x, w, max(w_pad - f_pad, 0))
    elif self.fused_resample and self.down and w is not None:
      x = _conv(x, w, w_pad + f_pad)
      x = downsample(x, self.resample_filter, 0)
    else:
      if self.up:
        x = upsample(x, self.resample_filter, f_pad)
      if self.down:
        x = downsample(x, self.resample_filter, f_pad)
      if w is not None:
        x = _conv(x, w, w_pad)
    if b is not None:
      x = x + b
    return x


def _conv(x: jax.Array, w: jax.Array, pad: int) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, w, window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def num_groups(num_channels: int, max_groups: int = 32, min_channels_per_group: int = 4) -> int:
  """EDM's GroupNorm group count min(32, C // 4)."""
  groups = min(max_groups, num_channels // min_channels_per_group)
  if groups < 1 or num_channels % groups:
    raise ValueError(f'GroupNorm: {num_channels} channels cannot form {groups} equal groups')
  return groups


def group_norm(num_channels: int, eps: float, dtype: Dtype, name: str) -> nn.GroupNorm:
  """EDM GroupNorm for NHWC: min(32, C//4) groups, float32 two-pass statistics; `scale`, `bias` [C]."""
  return nn.GroupNorm(num_groups=num_groups(num_channels), epsilon=eps, dtype=dtype,
                      param_dtype=jnp.float32, use_fast_variance=False, name=name)


def positional_embedding(x: jax.Array, num_channels: int, max_positions: int = 10000,
                         endpoint: bool = False) -> jax.Array:
  """EDM PositionalEmbedding: x [B] -> [B, C] = [cos(x f), sin(x f)], f_i = (1/max)^(i/(C/2-endpoint))."""
  half = num_channels // 2
  freqs = np.arange(half, dtype=np.float32) / np.float32(half - (1 if endpoint else 0))
  freqs = jnp.asarray((1 / max_positions) ** freqs, jnp.float32)
  x = jnp.outer(x.astype(jnp.float32), freqs)
  return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


class FourierEmbedding(nn.Module):
  """EDM FourierEmbedding: x [B] -> [B, C] = [cos(2 pi x f), sin(2 pi x f)], f ~ N(0, scale^2) [C/2].

  `freqs` lives in the 'buffers' collection (loaded from checkpoints, never trained).
  """
  num_channels: int
  scale: float = 16.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    freqs = self.variable(
        'buffers', 'freqs',
        lambda: jax.random.normal(self.make_rng('params'), (self.num_channels // 2,)) * self.scale)
    x = jnp.outer(x.astype(jnp.float32), (2 * np.pi * freqs.value).astype(jnp.float32))
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


def as_class_labels(class_labels: Optional[jax.Array], label_dim: int, batch: int) -> jax.Array:
  """Float32 labels [B or 1, label_dim]; zeros [1, label_dim] when None (EDM's unconditional input)."""
  if class_labels is None:
    return jnp.zeros((1, label_dim), jnp.float32)
  class_labels = jnp.asarray(class_labels, jnp.float32)
  if class_labels.size not in (label_dim, batch * label_dim):
    raise ValueError(f'class_labels of shape {class_labels.shape} do not fit batch {batch} '
                     f'x label_dim {label_dim}')
  return class_labels.reshape(-1, label_dim)


def drop_labels(module: nn.Module, labels: jax.Array, rate: float, batch: int,
                train: bool) -> jax.Array:
  """EDM label dropout: zero whole label rows with probability `rate` (train only, 'dropout' rng)."""
  if not (train and rate):
    return labels
  keep = jax.random.uniform(module.make_rng('dropout'), (batch, 1)) >= rate
  return labels * keep.astype(labels.dtype)


def attention(qkv: jax.Array, num_heads: int, implementation: Optional[str] = None) -> jax.Array:
  """EDM self-attention: qkv [B,H,W,3C] with channels ordered [head, channel, {q,k,v}] -> [B,H,W,C].

  Output channel = head * (C/heads) + c; scores scaled by 1/sqrt(C/heads), softmax in float32.
  """
  b, h, w, c3 = qkv.shape
  c = c3 // 3
  qkv = qkv.reshape(b, h * w, num_heads, c // num_heads, 3)
  a = jax.nn.dot_product_attention(qkv[..., 0], qkv[..., 1], qkv[..., 2],
                                   implementation=implementation)
  return a.reshape(b, h, w, c)


class UNetBlock(nn.Module):
  """EDM UNetBlock (DDPM++/NCSN++/ADM union): [B,H,W,Cin], emb [B,E] -> [B,H',W',out_channels].

  Submodules: norm0, conv0, affine, norm1, conv1, skip (if out!=in or up/down), norm2/qkv/proj (if
  attention). Attention keeps EDM's qkv channel order [head, channel, {q,k,v}].
  """
  out_channels: int
  up: bool = False
  down: bool = False
  attention: bool = False
  num_heads: Optional[int] = None
  channels_per_head: int = 64
  dropout: float = 0.0
  skip_scale: float = 1.0
  eps: float = 1e-5
  resample_filter: Sequence[float] = (1, 1)
  resample_proj: bool = False
  adaptive_scale: bool = True
  init_spec: Init = Init()
  init_zero: Init = Init(weight=0.0)
  init_attn: Optional[Init] = None
  attn_implementation: Optional[str] = None
  dtype: Dtype = jnp.float32

  @property
  def heads(self) -> int:
    if not self.attention:
      return 0
    return self.num_heads if self.num_heads is not None else self.out_channels // self.channels_per_head

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool = False) -> jax.Array:
    cin, cout = x.shape[-1], self.out_channels
    resample = dict(up=self.up, down=self.down, resample_filter=self.resample_filter)
    orig = x
    x = group_norm(cin, self.eps, self.dtype, 'norm0')(x)
    x = Conv2d(cout, 3, init_spec=self.init_spec, dtype=self.dtype, name='conv0', **resample)(nn.silu(x))

    params = Linear(cout * (2 if self.adaptive_scale else 1), init_spec=self.init_spec,
                    dtype=jnp.float32, name='affine')(emb)
    params = params[:, None, None, :].astype(self.dtype)
    norm1 = group_norm(cout, self.eps, self.dtype, 'norm1')
    if self.adaptive_scale:
      scale, shift = jnp.split(params, 2, axis=-1)
      x = nn.silu(shift + norm1(x) * (scale + 1))
    else:
      x = nn.silu(norm1(x + params))

    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = Conv2d(cout, 3, init_spec=self.init_zero, dtype=self.dtype, name='conv1')(x)
    if cout != cin or self.up or self.down:
      kernel = 1 if self.resample_proj or cout != cin else 0
      orig = Conv2d(cout, kernel, init_spec=self.init_spec, dtype=self.dtype, name='skip',
                    **resample)(orig)
    x = (x + orig) * self.skip_scale

    heads = self.heads
    if heads:
      c = x.shape[-1]
      init_attn = self.init_spec if self.init_attn is None else self.init_attn
      qkv = Conv2d(3 * c, 1, init_spec=init_attn, dtype=self.dtype, name='qkv')(
          group_norm(c, self.eps, self.dtype, 'norm2')(x))
      a = attention(qkv, heads, self.attn_implementation)
      a = Conv2d(c, 1, init_spec=self.init_zero, dtype=self.dtype, name='proj')(a)
      x = (a + x) * self.skip_scale
    return x


# Rematerialisation policies of the UNet blocks (config network.remat): '' stores every activation
# the backward pass needs; 'block' stores only each UNetBlock's inputs and recomputes the block in
# the backward pass (jax.checkpoint around each block); 'block_save_convs' also stores the block's
# convolution / matmul outputs and recomputes only the cheap ops between them (GroupNorm, SiLU,
# dropout, affine, softmax).
REMAT_POLICIES = ('', 'block', 'block_save_convs')


def _save_convs(prim, *_, **__) -> bool:
  """jax.checkpoint policy: keep convolution and matmul outputs."""
  return prim in (jax.lax.conv_general_dilated_p, jax.lax.dot_general_p)


def unet_block(remat: str) -> type:
  """The UNetBlock class under the rematerialisation policy `remat` (one of REMAT_POLICIES).

  Rematerialisation changes what the backward pass stores, never the values or the parameter tree
  (a block keeps its name)."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f'remat must be one of {REMAT_POLICIES}, got {remat!r}')
  if not remat:
    return UNetBlock
  policy = _save_convs if remat == 'block_save_convs' else None
  return nn.remat(UNetBlock, static_argnums=(3,), policy=policy)  # (self, x, emb, train)


class LayerSpec(NamedTuple):
  """One entry of a UNet's `enc`/`dec` ModuleDict, in EDM's order.

  kind: 'conv' | 'block' | 'aux_down' | 'aux_skip' | 'aux_residual' | 'aux_up' | 'aux_norm' |
  'aux_conv'; `block` holds the UNetBlock keyword overrides (up/down/attention).
  """
  name: str
  kind: str
  in_channels: int
  out_channels: int
  block: tuple = ()


def resample_filter_keys(group: str, specs: Sequence[LayerSpec],
                         resample_filter: Sequence[float]) -> dict:
  """Torch buffer keys (relative to the UNet) of every resampling Conv2d -> its 1-D filter."""
  keys = {}
  for spec in specs:
    opts = dict(spec.block)
    if spec.kind == 'block' and (opts.get('up') or opts.get('down')):
      for sub in ('conv0', 'skip'):
        keys[f'{group}.{spec.name}.{sub}.resample_filter'] = tuple(resample_filter)
    elif spec.kind in ('aux_down', 'aux_residual', 'aux_up'):
      keys[f'{group}.{spec.name}.resample_filter'] = tuple(resample_filter)
  return keys
