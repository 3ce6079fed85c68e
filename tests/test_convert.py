"""EDM pickle -> Flax conversion: parity with the official outputs, and name/shape/filter checks."""

import copy
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import shared_path
from uni_instruct_jax import networks
from uni_instruct_jax.convert import CheckpointFormatError
from uni_instruct_jax.convert import edm_to_flax
from uni_instruct_jax.convert import load_edm_pickle
from uni_instruct_jax.convert import safe_unpickle
from uni_instruct_jax.convert import StateDictMismatchError

FIXTURES = ('ddpmpp-tiny-uncond', 'ncsnpp-tiny-cond', 'adm-tiny-cond')


def _nhwc(x):
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


@pytest.mark.parametrize('name', FIXTURES)
def test_fixture_parity(name):
  model, variables = load_edm_pickle(shared_path('fixtures', 'edm', f'{name}.pkl'))
  ref = np.load(shared_path('fixtures', 'edm', f'{name}.npz'))
  labels = None if ref['class_labels'].shape[1] == 0 else jnp.asarray(ref['class_labels'])
  assert ('buffers' in variables) == (name == 'ncsnpp-tiny-cond')  # FourierEmbedding freqs
  for key, augment in (('denoised', jnp.asarray(ref['augment_labels'])), ('denoised_noaug', None)):
    out = model.apply(variables, _nhwc(ref['x']), jnp.asarray(ref['sigma']), labels, augment)
    out = np.transpose(np.asarray(out), (0, 3, 1, 2))
    error = np.abs(out - ref[key]).max() / np.abs(ref[key]).max()
    print(f'{name} {key}: relative max-abs error {error:.2e}')
    assert error < 1e-4, (name, key, error)


def test_snapshot_metadata():
  path = shared_path('fixtures', 'edm', 'adm-tiny-cond.pkl')
  metadata, state_dict = edm_to_flax.read_edm_snapshot(path)
  assert metadata.class_name == 'EDMPrecond'
  assert metadata.init_kwargs['model_type'] == 'DhariwalUNet'
  assert metadata.init_kwargs['channel_mult'] == [1, 2]
  assert metadata.dataset_kwargs['resolution'] == 16
  assert metadata.sha256 == safe_unpickle.sha256_file(path) and metadata.source_path == str(path)
  assert edm_to_flax.TeacherMetadata.from_json(metadata.to_json()) == metadata
  assert state_dict['model.map_label.weight'].shape == (128, 10)  # no bias in ADM's map_label
  assert 'model.map_label.bias' not in state_dict
  assert state_dict['model.enc.8x8_down.skip.resample_filter'].shape == (1, 1, 2, 2)


@pytest.fixture(scope='module')
def ddpmpp():
  """(snapshot, model, torch state dict) of the smallest fixture."""
  snapshot = safe_unpickle.load_pickle(shared_path('fixtures', 'edm', 'ddpmpp-tiny-uncond.pkl'))
  metadata, state_dict = edm_to_flax.read_edm_snapshot(
      shared_path('fixtures', 'edm', 'ddpmpp-tiny-uncond.pkl'))
  return snapshot, edm_to_flax.build_teacher(metadata), state_dict


def _rename(sd, old, new):
  sd[new] = sd.pop(old)


def _filter_key(sd):
  return sorted(k for k in sd if k.endswith('.resample_filter'))[0]


_CASES = {
    'renamed': (lambda sd: _rename(sd, 'model.enc.16x16_block0.conv0.weight',
                                   'model.enc.16x16_block0.conv_0.weight'),
                'unexpected key model.enc.16x16_block0.conv_0.weight'),
    'unknown_leaf': (lambda sd: _rename(sd, 'model.map_layer0.bias', 'model.map_layer0.beta'),
                     'unexpected key model.map_layer0.beta'),
    'extra': (lambda sd: sd.update({'model.map_extra.weight': np.zeros((4, 4), np.float32)}),
              'unexpected key model.map_extra.weight'),
    'missing': (lambda sd: sd.pop('model.map_layer1.bias'),
                'missing key params/model/map_layer1/bias'),
    'misshaped': (lambda sd: sd.update({'model.map_layer0.weight':
                                        sd['model.map_layer0.weight'][:, :-1]}),
                  r'key model.map_layer0.weight: shape \(64, 15\)'),
    'transposed_conv': (lambda sd: sd.update({'model.enc.16x16_conv.weight': np.transpose(
        sd['model.enc.16x16_conv.weight'], (1, 0, 2, 3))}), 'key model.enc.16x16_conv.weight'),
    'nan': (lambda sd: sd['model.dec.16x16_aux_conv.bias'].__setitem__(0, np.nan),
            'key model.dec.16x16_aux_conv.bias: non-finite'),
    'wrong_filter': (lambda sd: sd.update({_filter_key(sd): sd[_filter_key(sd)] * [[[[1, 2],
                                                                                    [2, 1]]]]}),
                     'resample filter'),
    'missing_filter': (lambda sd: sd.pop(_filter_key(sd)), 'missing key model.*resample_filter'),
}


@pytest.mark.parametrize('case', sorted(_CASES))
def test_state_dict_mismatch_names_the_key(ddpmpp, case):
  _, model, state_dict = ddpmpp
  state_dict = {k: v.copy() for k, v in state_dict.items()}
  mutate, message = _CASES[case]
  mutate(state_dict)
  with pytest.raises(StateDictMismatchError, match=message):
    edm_to_flax.state_dict_to_variables(model, state_dict)


def test_unchanged_state_dict_converts(ddpmpp):
  _, model, state_dict = ddpmpp
  variables = edm_to_flax.state_dict_to_variables(model, state_dict)
  kernel = variables['params']['model']['enc_16x16_block0']['conv0']['kernel']
  np.testing.assert_array_equal(
      kernel, np.transpose(state_dict['model.enc.16x16_block0.conv0.weight'], (2, 3, 1, 0)))
  np.testing.assert_array_equal(variables['params']['model']['map_layer0']['kernel'],
                                state_dict['model.map_layer0.weight'].T)


def _ema(snapshot, **changes):
  ema = copy.deepcopy(snapshot['ema'])
  return dataclasses.replace(ema, **changes)


def test_snapshot_checks(ddpmpp):
  snapshot = ddpmpp[0]
  with pytest.raises(CheckpointFormatError, match='persistence version 5'):
    edm_to_flax.snapshot_ema(dict(snapshot, ema=_ema(snapshot, version=5)))
  with pytest.raises(CheckpointFormatError, match='iDDPMPrecond'):
    edm_to_flax.snapshot_ema(dict(snapshot, ema=_ema(snapshot, class_name='iDDPMPrecond')))
  with pytest.raises(CheckpointFormatError, match='EDM snapshot'):
    edm_to_flax.snapshot_ema([snapshot['ema']])
  ema = _ema(snapshot)
  ema.state['_init_kwargs']['model_channels'] = 32
  with pytest.raises(CheckpointFormatError, match='model_channels=32'):
    edm_to_flax.network_kwargs(ema)
  ema = _ema(snapshot)
  ema.state['_init_kwargs']['img_channels'] = 1
  with pytest.raises(CheckpointFormatError, match='img_channels=1'):
    edm_to_flax.network_kwargs(ema)


def test_model_type_comes_from_the_inner_model(ddpmpp):
  """EDMPrecond defaults to DhariwalUNet: a pickle without model_type must still give SongUNet."""
  ema = _ema(ddpmpp[0])
  del ema.state['_init_kwargs']['model_type']
  assert edm_to_flax.network_kwargs(ema)['model_type'] == 'SongUNet'


@pytest.mark.parametrize('class_name,extra', [('VPPrecond', dict(beta_d=19.9, M=1000)),
                                              ('VEPrecond', dict(sigma_min=0.02, sigma_max=100))])
def test_vp_and_ve_snapshots_convert(ddpmpp, class_name, extra):
  snapshot, _, state_dict = ddpmpp
  ema = _ema(snapshot, class_name=class_name)
  ema.state['_init_kwargs'].update(extra)
  metadata = edm_to_flax.TeacherMetadata(
      class_name=class_name, init_kwargs=edm_to_flax.network_kwargs(ema), dataset_kwargs={},
      source_path='-', sha256='-', module_src_sha256='-')
  model = edm_to_flax.build_teacher(metadata)
  assert isinstance(model, networks.PRECONDS[class_name])
  assert all(getattr(model, k) == v for k, v in extra.items())
  variables = edm_to_flax.state_dict_to_variables(model, edm_to_flax.torch_state_dict(ema))
  assert variables['params']['model']['map_layer0']['kernel'].shape == \
      state_dict['model.map_layer0.weight'].T.shape
