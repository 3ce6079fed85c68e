"""Tests of the EDM network ports: parameter counts, layers against NumPy references of EDM's torch
code, encoder bottleneck, dropout, dtype policy, preconditioners, naming rule."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uni_instruct_jax.networks import (build_network, layers, resample_filters,
                                       torch_key_to_flax_path, torch_value_to_flax)

KEY = jax.random.key(0)

# ---------------------------------------------------------------------------------------------
# NumPy references, written from EDM's torch code (NCHW, OIHW).


def np_conv2d(x, w, stride=1, pad=0, groups=1):
  """torch.nn.functional.conv2d: x [N,C,H,W], w [O,C/groups,k,k]."""
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  n, _, h, wd = x.shape
  o, ig, k, _ = w.shape
  oh, ow = (h - k) // stride + 1, (wd - k) // stride + 1
  og = o // groups
  out = np.zeros((n, o, oh, ow))
  for g in range(groups):
    xs, ws = x[:, g * ig:(g + 1) * ig], w[g * og:(g + 1) * og]
    for i in range(k):
      for j in range(k):
        patch = xs[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
        out[:, g * og:(g + 1) * og] += np.einsum('nchw,oc->nohw', patch, ws[:, :, i, j])
  return out


def np_conv_transpose2d(x, w, stride=1, pad=0, groups=1):
  """torch.nn.functional.conv_transpose2d (scatter form): x [N,C,H,W], w [C,O/groups,k,k]."""
  n, c, h, wd = x.shape
  _, og, k, _ = w.shape
  ig = c // groups
  out = np.zeros((n, og * groups, (h - 1) * stride + k, (wd - 1) * stride + k))
  for g in range(groups):
    xs, ws = x[:, g * ig:(g + 1) * ig], w[g * ig:(g + 1) * ig]
    for i in range(k):
      for j in range(k):
        out[:, g * og:(g + 1) * og, i:i + stride * h:stride, j:j + stride * wd:stride] += np.einsum(
            'nchw,co->nohw', xs, ws[:, :, i, j])
  return out[:, :, pad:out.shape[2] - pad, pad:out.shape[3] - pad]


def np_edm_conv(x, w, b, up, down, f, fused):
  """EDM Conv2d.forward: x [N,C,H,W], w OIHW or None, f the 1-D resample filter."""
  f = np.asarray(f, np.float64)
  f = (np.outer(f, f) / f.sum() ** 2)[None, None]
  cin = x.shape[1]
  w_pad = w.shape[-1] // 2 if w is not None else 0
  f_pad = (f.shape[-1] - 1) // 2
  if fused and up and w is not None:
    x = np_conv_transpose2d(x, np.tile(f * 4, (cin, 1, 1, 1)), 2, max(f_pad - w_pad, 0), cin)
    x = np_conv2d(x, w, pad=max(w_pad - f_pad, 0))
  elif fused and down and w is not None:
    x = np_conv2d(x, w, pad=w_pad + f_pad)
    x = np_conv2d(x, np.tile(f, (w.shape[0], 1, 1, 1)), 2, 0, w.shape[0])
  else:
    if up:
      x = np_conv_transpose2d(x, np.tile(f * 4, (cin, 1, 1, 1)), 2, f_pad, cin)
    if down:
      x = np_conv2d(x, np.tile(f, (cin, 1, 1, 1)), 2, f_pad, cin)
    if w is not None:
      x = np_conv2d(x, w, pad=w_pad)
  return x if b is None else x + b[None, :, None, None]


def np_group_norm(x, groups, scale, bias, eps):
  """torch group_norm on NCHW."""
  n, c, h, w = x.shape
  xg = x.reshape(n, groups, -1)
  xg = (xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + eps)
  return xg.reshape(n, c, h, w) * scale[None, :, None, None] + bias[None, :, None, None]


def np_edm_attention(qkv, heads):
  """EDM UNetBlock attention core on NCHW qkv [N,3C,H,W] -> [N,C,H,W]."""
  n, c3, h, w = qkv.shape
  c = c3 // 3
  q, k, v = np.moveaxis(qkv.reshape(n * heads, c // heads, 3, h * w), 2, 0)
  s = np.einsum('ncq,nck->nqk', q, k / np.sqrt(c // heads))
  s = np.exp(s - s.max(axis=2, keepdims=True))
  s /= s.sum(axis=2, keepdims=True)
  return np.einsum('nqk,nck->ncq', s, v).reshape(n, c, h, w)


def nhwc(x):
  return np.asarray(x, np.float64).transpose(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------
# Parameter counts of the published teachers (jax_edm_notes.md §3.5).

CIFAR = dict(img_resolution=32, img_channels=3, label_dim=0, use_fp16=False, model_type='SongUNet',
             augment_dim=9, model_channels=128, channel_mult=[2, 2, 2], channel_mult_noise=1,
             dropout=0.13, embedding_type='positional', encoder_type='standard',
             decoder_type='standard', resample_filter=[1, 1], num_blocks=4, attn_resolutions=[16])
IMAGENET = dict(img_resolution=64, img_channels=3, label_dim=1000, use_fp16=True,
                model_type='DhariwalUNet', augment_dim=0, model_channels=192,
                channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.1)


def abstract_variables(net, label_dim=0):
  r, c = net.img_resolution, net.img_channels
  return jax.eval_shape(net.init, KEY, jnp.zeros((1, r, r, c)), jnp.ones((1,)),
                        jnp.zeros((1, label_dim)) if label_dim else None)


@pytest.mark.parametrize('kwargs, expected, num_filters', [
    (CIFAR, 55_733_891, 8),
    (dict(CIFAR, label_dim=10), 55_735_299, 8),
    (IMAGENET, 295_899_267, 12),
], ids=['cifar-uncond', 'cifar-cond', 'imagenet64-adm'])
def test_teacher_parameter_counts(kwargs, expected, num_filters):
  net = build_network('EDMPrecond', kwargs)
  variables = abstract_variables(net, kwargs['label_dim'])
  assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables['params'])) == expected
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
  assert len(resample_filters(net)) == num_filters


def test_teacher_state_dict_names_map_to_params():
  net = build_network('EDMPrecond', dict(CIFAR, label_dim=10))
  params = abstract_variables(net, 10)['params']
  examples = {  # torch key -> torch shape, from the real checkpoint (jax_edm_notes.md §3.6)
      'model.enc.32x32_conv.weight': (128, 3, 3, 3),
      'model.enc.32x32_block0.skip.weight': (256, 128, 1, 1),
      'model.enc.16x16_block0.qkv.weight': (768, 256, 1, 1),
      'model.dec.32x32_block4.conv0.weight': (256, 384, 3, 3),
      'model.dec.32x32_aux_conv.weight': (3, 256, 3, 3),
      'model.map_augment.weight': (128, 9),
      'model.dec.32x32_aux_norm.weight': (256,),
  }
  for key, shape in examples.items():
    collection, *path = torch_key_to_flax_path(key)
    leaf = functools.reduce(lambda d, k: d[k], path, params)
    assert leaf.shape == torch_value_to_flax(key, np.zeros(shape)).shape, key


# ---------------------------------------------------------------------------------------------
# Layers against the NumPy references.

@pytest.mark.parametrize('kernel, up, down, filt, fused', [
    (0, False, True, (1, 1), False),
    (0, True, False, (1, 1), False),
    (0, False, True, (1, 3, 3, 1), False),
    (0, True, False, (1, 3, 3, 1), False),
    (0, True, False, (1, 2, 1), False),
    (1, False, True, (1, 1), False),
    (3, False, True, (1, 3, 3, 1), False),
    (3, True, False, (1, 2, 3, 4), False),
    (3, False, True, (1, 1), True),
    (3, False, True, (1, 3, 3, 1), True),
    (3, True, False, (1, 1), True),
    (3, True, False, (1, 3, 3, 1), True),
    (3, False, False, (1, 1), False),
])
def test_conv2d_resampling_matches_edm(kernel, up, down, filt, fused):
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  features = 6 if kernel else 4
  conv = layers.Conv2d(features, kernel, up=up, down=down, resample_filter=filt,
                       fused_resample=fused, init_spec=layers.Init('xavier_uniform', 1.0, 0.5))
  variables = conv.init(KEY, x)
  y = conv.apply(variables, x)
  p = variables.get('params', {})
  w = np.asarray(p['kernel'], np.float64).transpose(3, 2, 0, 1) if kernel else None
  b = np.asarray(p['bias'], np.float64) if kernel else None
  ref = np_edm_conv(nhwc(x), w, b, up, down, filt, fused)
  assert nhwc(y).shape == ref.shape
  np.testing.assert_allclose(nhwc(y), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('heads', [1, 2])
def test_attention_uses_edm_qkv_channel_order(heads):
  qkv = jax.random.normal(jax.random.key(2), (2, 4, 4, 3 * 8))
  ref = np_edm_attention(nhwc(qkv), heads)
  np.testing.assert_allclose(nhwc(layers.attention(qkv, heads)), ref, atol=1e-5, rtol=1e-5)
  # Splitting q/k/v as three contiguous chunks (a naive NHWC port) gives something else.
  q, k, v = jnp.split(qkv, 3, axis=-1)
  naive = layers.attention(jnp.stack([q, k, v], axis=-1).reshape(qkv.shape), heads)
  assert np.abs(nhwc(naive) - ref).max() > 1e-2


@pytest.mark.parametrize('channels, groups', [(8, 2), (64, 16), (256, 32)])
def test_group_norm_groups_and_eps(channels, groups):
  assert layers.num_groups(channels) == groups
  x = 3 + 2 * jax.random.normal(jax.random.key(3), (2, 4, 4, channels))
  gn = layers.group_norm(channels, 1e-6, jnp.float32, None)
  scale = jax.random.normal(jax.random.key(4), (channels,))
  bias = jax.random.normal(jax.random.key(5), (channels,))
  y = gn.apply({'params': {'scale': scale, 'bias': bias}}, x)
  ref = np_group_norm(nhwc(x), groups, np.asarray(scale), np.asarray(bias), 1e-6)
  np.testing.assert_allclose(nhwc(y), ref, atol=2e-5, rtol=1e-5)


def test_group_norm_rejects_uneven_groups():
  assert layers.num_groups(6) == 1 and layers.num_groups(256) == 32
  with pytest.raises(ValueError, match='2 channels'):
    layers.num_groups(2)


@pytest.mark.parametrize('endpoint', [False, True])
def test_positional_embedding(endpoint):
  x = np.array([-3.2, 0.0, 0.7, 250.0], np.float32)
  freqs = (1 / 10000) ** (np.arange(8) / (8 - endpoint))
  ref = np.concatenate([np.cos(np.outer(x, freqs)), np.sin(np.outer(x, freqs))], axis=1)
  np.testing.assert_allclose(layers.positional_embedding(jnp.asarray(x), 16, endpoint=endpoint),
                             ref, atol=2e-5)


def test_fourier_embedding_reads_buffer():
  x = np.array([-1.1, 0.0, 0.3], np.float32)
  emb = layers.FourierEmbedding(8)
  variables = emb.init(KEY, jnp.asarray(x))
  assert set(variables) == {'buffers'} and variables['buffers']['freqs'].shape == (4,)
  drawn = layers.FourierEmbedding(4000).init(KEY, jnp.zeros(1))['buffers']['freqs']
  np.testing.assert_allclose(np.std(np.asarray(drawn)), 16, rtol=0.1)  # EDM: N(0, 16^2)
  freqs = np.array([0.5, -2.0, 7.0, 16.0], np.float32)
  arg = 2 * np.pi * np.outer(x, freqs)
  np.testing.assert_allclose(emb.apply({'buffers': {'freqs': freqs}}, jnp.asarray(x)),
                             np.concatenate([np.cos(arg), np.sin(arg)], axis=1), atol=2e-5)


@pytest.mark.parametrize('mode, bound', [
    ('xavier_uniform', np.sqrt(6 / (30 + 50))), ('kaiming_uniform', np.sqrt(3 / 30))])
def test_uniform_initializers(mode, bound):
  w = np.asarray(layers.edm_initializer(mode, 30, 50, 0.5)(KEY, (200, 200)))
  assert np.abs(w).max() <= 0.5 * bound
  np.testing.assert_allclose(w.std(), 0.5 * bound / np.sqrt(3), rtol=0.02)


@pytest.mark.parametrize('mode, std', [
    ('xavier_normal', np.sqrt(2 / (30 + 50))), ('kaiming_normal', np.sqrt(1 / 30))])
def test_normal_initializers(mode, std):
  w = np.asarray(layers.edm_initializer(mode, 30, 50, 2.0)(KEY, (200, 200)))
  np.testing.assert_allclose(w.std(), 2 * std, rtol=0.02)
  assert not np.any(np.asarray(layers.edm_initializer(mode, 30, 50, 0.0)(KEY, (4,))))


# ---------------------------------------------------------------------------------------------
# Tiny networks (the sizes of ../shared/fixtures/edm).

TINY_SONG = dict(img_resolution=16, img_channels=3, label_dim=0, model_type='SongUNet',
                 augment_dim=9, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                 attn_resolutions=[8], dropout=0.13)
TINY_NCSN = dict(TINY_SONG, label_dim=10, embedding_type='fourier', encoder_type='residual',
                 channel_mult_noise=2, resample_filter=[1, 3, 3, 1])
TINY_ADM = dict(img_resolution=16, img_channels=3, label_dim=10, model_type='DhariwalUNet',
                augment_dim=9, model_channels=32, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[8], dropout=0.13)


def randomize(variables, std=0.2):
  """Replace every parameter by N(0, std^2) so that each one influences the output."""
  leaves, tree = jax.tree.flatten(variables['params'])
  keys = jax.random.split(jax.random.key(7), len(leaves))
  params = jax.tree.unflatten(tree, [std * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])
  return {**variables, 'params': params}


def inputs(label_dim, batch=3):
  k = jax.random.split(jax.random.key(11), 3)
  x = jax.random.normal(k[0], (batch, 16, 16, 3))
  sigma = jnp.array([0.02, 0.7, 5.0][:batch])
  labels = jax.nn.one_hot(jax.random.randint(k[1], (batch,), 0, label_dim), label_dim) if label_dim else None
  return x, sigma, labels, jax.random.normal(k[2], (batch, 9))


@functools.lru_cache(maxsize=None)
def tiny(name, class_name='EDMPrecond', dtype=jnp.float32):
  kwargs = {'song': TINY_SONG, 'ncsn': TINY_NCSN, 'adm': TINY_ADM}[name]
  net = build_network(class_name, kwargs, dtype=dtype)
  x, sigma, labels, _ = inputs(kwargs['label_dim'])
  return net, randomize(net.init(KEY, x, sigma, labels))


@pytest.mark.parametrize('name', ['song', 'ncsn', 'adm'])
def test_encode_is_the_bottleneck_of_the_full_pass(name):
  net, variables = tiny(name)
  x, sigma, labels, aug = inputs(net.label_dim)
  d, features = net.apply(variables, x, sigma, labels, aug, return_features=True)
  encoded = net.apply(variables, x, sigma, labels, aug, method='encode')
  assert d.shape == x.shape and d.dtype == jnp.float32
  np.testing.assert_array_equal(encoded, features)
  channels = {'song': 32, 'ncsn': 32, 'adm': 64}[name]
  assert encoded.shape == (3, 8, 8, channels)
  # Cross-check with the module outputs captured during the full pass.
  _, state = net.apply(variables, x, sigma, labels, aug, capture_intermediates=True,
                       mutable=['intermediates'])
  inter = state['intermediates']['model']
  np.testing.assert_array_equal(encoded, inter['enc_8x8_block0']['__call__'][0])
  if name == 'ncsn':  # the residual aux path feeds the lowest level, so it shapes the bottleneck
    assert 'enc_8x8_aux_residual' in inter
    params = jax.tree_util.tree_map(lambda a: a, variables['params'])
    params['model']['enc_8x8_aux_residual'] = jax.tree.map(
        jnp.zeros_like, params['model']['enc_8x8_aux_residual'])
    no_aux = net.apply({**variables, 'params': params}, x, sigma, labels, aug, method='encode')
    assert np.abs(no_aux - encoded).max() > 1e-2


def test_dropout_only_in_train_mode():
  net, variables = tiny('song')
  x, sigma, _, aug = inputs(0)
  eval_a = net.apply(variables, x, sigma, None, aug)
  eval_b = net.apply(variables, x, sigma, None, aug, train=False)
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a = net.apply(variables, x, sigma, None, aug, train=True, rngs={'dropout': jax.random.key(1)})
  train_b = net.apply(variables, x, sigma, None, aug, train=True, rngs={'dropout': jax.random.key(2)})
  assert np.abs(train_a - eval_a).max() > 1e-3 and np.abs(train_a - train_b).max() > 1e-3
  with pytest.raises(Exception, match='dropout'):
    net.apply(variables, x, sigma, None, aug, train=True)


def test_label_dropout_zeroes_labels_in_train_mode():
  kwargs = dict(TINY_ADM, dropout=0.0, label_dropout=1.0)
  net = build_network('EDMPrecond', kwargs)
  _, variables = tiny('adm')
  x, sigma, labels, aug = inputs(10)
  rngs = {'dropout': jax.random.key(3)}
  dropped = net.apply(variables, x, sigma, labels, aug, train=True, rngs=rngs)
  zeros = net.apply(variables, x, sigma, jnp.zeros_like(labels), aug, train=True, rngs=rngs)
  np.testing.assert_allclose(dropped, zeros, atol=1e-6)
  assert np.abs(net.apply(variables, x, sigma, labels, aug) - dropped).max() > 1e-3


@pytest.mark.parametrize('name', ['ncsn', 'adm'])
def test_conditional_without_labels_uses_zeros(name):
  net, variables = tiny(name)
  x, sigma, labels, _ = inputs(10)
  none = net.apply(variables, x, sigma)
  np.testing.assert_array_equal(none, net.apply(variables, x, sigma, jnp.zeros_like(labels)))
  assert np.abs(none - net.apply(variables, x, sigma, labels)).max() > 1e-3


def test_augment_labels_none_skips_mapping():
  net, variables = tiny('song')
  x, sigma, _, aug = inputs(0)
  np.testing.assert_array_equal(net.apply(variables, x, sigma),
                                net.apply(variables, x, sigma, None, jnp.zeros_like(aug)))
  assert np.abs(net.apply(variables, x, sigma) - net.apply(variables, x, sigma, None, aug)).max() > 1e-3


def test_sigma_shapes_are_equivalent():
  net, variables = tiny('song')
  x, sigma, _, _ = inputs(0)
  ref = net.apply(variables, x, sigma)
  np.testing.assert_array_equal(net.apply(variables, x, sigma.reshape(-1, 1, 1, 1)), ref)
  np.testing.assert_allclose(net.apply(variables, x, 0.7)[1], ref[1], atol=1e-6)
  with pytest.raises(ValueError, match='sigma'):
    net.apply(variables, x, jnp.ones(2))
  with pytest.raises(ValueError, match='NHWC'):
    net.apply(variables, x.transpose(0, 3, 1, 2), sigma)


@pytest.mark.parametrize('name', ['song', 'adm'])
def test_bfloat16_compute_is_close_to_float32(name):
  net32, variables = tiny(name)
  net16 = build_network('EDMPrecond', {'song': TINY_SONG, 'adm': TINY_ADM}[name], dtype=jnp.bfloat16)
  x, sigma, labels, aug = inputs(net32.label_dim)
  d32 = net32.apply(variables, x, sigma, labels, aug)
  d16, feat16 = net16.apply(variables, x, sigma, labels, aug, return_features=True)
  assert d16.dtype == jnp.float32 and feat16.dtype == jnp.bfloat16
  err = np.abs(np.asarray(d16) - np.asarray(d32)).max() / np.abs(np.asarray(d32)).max()
  assert 0 < err < 3e-2
  # The skip path c_skip x stays float32: at tiny sigma (c_out = 0.02) only c_out F sees bf16.
  small = np.abs(np.asarray(d16[0]) - np.asarray(d32[0])).max()
  assert small < 0.1 * err * np.abs(np.asarray(d32)).max()


def test_vp_and_ve_preconditioning():
  for class_name in ('VPPrecond', 'VEPrecond'):
    net = build_network(class_name, TINY_SONG)
    x, sigma, _, aug = inputs(0)
    variables = randomize(net.init(KEY, x, sigma))
    s = np.asarray(sigma, np.float64).reshape(-1, 1, 1, 1)
    if class_name == 'VPPrecond':
      t = (np.sqrt(0.1 ** 2 + 2 * 19.9 * np.log1p(s ** 2)) - 0.1) / 19.9
      c_skip, c_out, c_in, c_noise = 1, -s, 1 / np.sqrt(s ** 2 + 1), 999 * t
      np.testing.assert_allclose(net.sigma_min, np.sqrt(np.expm1(0.5 * 19.9 * 1e-10 + 0.1 * 1e-5)),
                                 rtol=1e-5)
      np.testing.assert_allclose(net.sigma_max, np.sqrt(np.expm1(0.5 * 19.9 + 0.1)), rtol=1e-5)
    else:
      c_skip, c_out, c_in, c_noise = 1, s, 1, np.log(s / 2)
      assert (net.sigma_min, net.sigma_max) == (0.02, 100.0)
    unet = net.unet_config()[0](**net.unet_config()[1])
    f = unet.apply({'params': variables['params']['model']}, jnp.asarray(c_in * x, jnp.float32),
                   jnp.asarray(c_noise.reshape(-1), jnp.float32), None, aug)
    np.testing.assert_allclose(net.apply(variables, x, sigma, None, aug),
                               c_skip * np.asarray(x) + c_out * np.asarray(f), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Constructor kwargs, naming rule, resample filters.

def test_build_network_rejects_bad_kwargs():
  with pytest.raises(ValueError, match="'bogus'"):
    build_network('EDMPrecond', dict(TINY_SONG, bogus=1))
  with pytest.raises(ValueError, match='channels_per_head'):
    build_network('EDMPrecond', dict(TINY_ADM, channels_per_head=32))
  with pytest.raises(ValueError, match='beta_d'):
    build_network('EDMPrecond', dict(TINY_SONG, beta_d=19.9))
  with pytest.raises(ValueError, match='iDDPMPrecond'):
    build_network('iDDPMPrecond', TINY_SONG)
  with pytest.raises(ValueError, match='img_resolution'):
    build_network('EDMPrecond', {k: v for k, v in TINY_SONG.items() if k != 'img_resolution'})
  with pytest.raises(ValueError, match='model_type'):
    build_network('EDMPrecond', dict(TINY_SONG, model_type='UNet2D'))
  net = build_network('EDMPrecond', dict(TINY_SONG, encoder_type='fancy'))
  with pytest.raises(ValueError, match='encoder_type'):
    abstract_variables(net)


def test_build_network_accepts_pickled_values():
  net = build_network('training.networks.EDMPrecond',
                      dict(TINY_SONG, channel_mult=np.array([1, 2]), dropout=np.float64(0.13),
                           sigma_data=np.float32(0.5)))
  assert dict(net.model_kwargs)['channel_mult'] == (1, 2)
  assert type(dict(net.model_kwargs)['dropout']) is float and net.sigma_data == 0.5


def test_torch_key_to_flax_path():
  assert torch_key_to_flax_path('model.enc.32x32_block0.conv0.weight') == (
      'params', 'model', 'enc_32x32_block0', 'conv0', 'kernel')
  assert torch_key_to_flax_path('model.dec.16x16_in0.norm2.weight') == (
      'params', 'model', 'dec_16x16_in0', 'norm2', 'scale')
  assert torch_key_to_flax_path('model.dec.32x32_aux_norm.bias') == (
      'params', 'model', 'dec_32x32_aux_norm', 'bias')
  assert torch_key_to_flax_path('model.out_norm.weight') == ('params', 'model', 'out_norm', 'scale')
  assert torch_key_to_flax_path('model.map_label.weight') == ('params', 'model', 'map_label', 'kernel')
  assert torch_key_to_flax_path('model.map_noise.freqs') == ('buffers', 'model', 'map_noise', 'freqs')
  for bad in ('model.enc.16x16_down.conv0.resample_filter', 'model..weight', 'weight',
              'model.enc.weight', 'model.map_layer0.running_mean'):
    with pytest.raises(ValueError):
      torch_key_to_flax_path(bad)
  w = np.arange(2 * 3 * 5 * 5).reshape(2, 3, 5, 5)
  assert torch_value_to_flax('a.conv.weight', w)[4, 1, 2, 0] == w[0, 2, 4, 1]
  assert torch_value_to_flax('a.map_layer0.weight', w[:, :, 0, 0]).shape == (3, 2)
  assert torch_value_to_flax('a.conv.bias', w[0, 0, 0]).shape == (5,)


def test_resample_filters_and_init_tree_cover_all_variants():
  kwargs = dict(TINY_NCSN, encoder_type='skip', decoder_type='skip', channel_mult=[1, 2, 2])
  net = build_network('EDMPrecond', kwargs)
  filters = resample_filters(net)
  f = np.array([1, 3, 3, 1]) / 8
  for key in ('model.enc.8x8_down.conv0.resample_filter', 'model.enc.8x8_down.skip.resample_filter',
              'model.enc.8x8_aux_down.resample_filter', 'model.dec.8x8_aux_up.resample_filter',
              'model.dec.16x16_up.skip.resample_filter'):
    np.testing.assert_allclose(filters[key], np.outer(f, f)[None, None], rtol=1e-6)
  assert len(filters) == 4 * 2 + 2 + 2
  params = abstract_variables(net, 10)['params']['model']
  assert {'enc_8x8_aux_skip', 'dec_8x8_aux_norm', 'dec_8x8_aux_conv'} <= set(params)
  assert 'enc_8x8_aux_down' not in params and 'kernel' in params['enc_8x8_down']['skip']
  assert 'enc_4x4_aux_residual' in abstract_variables(
      build_network('EDMPrecond', dict(kwargs, encoder_type='residual')), 10)['params']['model']


def test_init_schemes_of_both_unets():
  song = build_network('EDMPrecond', TINY_SONG).init(KEY, *inputs(0)[:2])['params']['model']
  block = song['enc_8x8_block0']
  assert not np.any(np.asarray(block['conv0']['bias']))  # xavier_uniform, init_bias 0
  assert 0 < np.abs(block['conv1']['kernel']).max() < 1e-5 * np.sqrt(6 / (32 * 9 * 2))
  bound = np.sqrt(0.2) * np.sqrt(6 / (32 + 96))
  assert 0.5 * bound < np.abs(block['qkv']['kernel']).max() <= bound
  adm = build_network('EDMPrecond', TINY_ADM).init(KEY, *inputs(10)[:3])['params']['model']
  assert 'bias' not in adm['map_label'] and 'bias' not in adm['map_augment']
  assert 'skip' not in adm['enc_8x8_down'] and 'skip' in adm['enc_8x8_block0']  # weightless resampler
  assert not np.any(np.asarray(adm['out_conv']['kernel'])) and not np.any(np.asarray(adm['map_augment']['kernel']))
  bias = np.asarray(adm['enc_16x16_conv']['bias'])
  assert 0 < np.abs(bias).max() <= np.sqrt(3 / 27) * np.sqrt(1 / 3)
  np.testing.assert_allclose(np.asarray(adm['map_label']['kernel']).std(), 1.0, rtol=0.1)


@pytest.mark.parametrize('name,remat', [('song', 'block'), ('adm', 'block_save_convs')])
def test_remat_keeps_values_gradients_and_the_parameter_tree(name, remat):
  """network.remat changes what the backward pass stores, not the parameter tree (checkpoints and
  converted teachers stay loadable) nor the loss and its gradients."""
  net, variables = tiny(name)
  x, sigma, labels, aug = inputs(net.label_dim)

  def loss(v, policy):
    d = net.clone(remat=policy).apply(v, x, sigma, labels, aug)
    return jnp.sum(jnp.square(d - x))

  fresh = jax.eval_shape(net.clone(remat=remat).init, KEY, x, sigma, labels)
  assert jax.tree.structure(fresh) == jax.tree.structure(variables)
  assert jax.tree.map(lambda a: a.shape, fresh) == jax.tree.map(jnp.shape, variables)
  ref, got = (jax.jit(jax.value_and_grad(functools.partial(loss, policy=p)))(variables)
              for p in ('', remat))
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
  for g, r in zip(jax.tree.leaves(got[1]), jax.tree.leaves(ref[1])):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(jnp.abs(r).max()))
  with pytest.raises(ValueError, match='remat must be one of'):
    net.clone(remat='everything').apply(variables, x, sigma, labels, aug)
