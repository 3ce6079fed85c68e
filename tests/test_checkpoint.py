"""Teacher directories: the conversion CLI, save_teacher / load_teacher round trip, bad input."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from conftest import shared_path
from uni_instruct_jax import checkpoint
from uni_instruct_jax.convert import __main__ as cli
from uni_instruct_jax.convert import CheckpointFormatError
from uni_instruct_jax.convert import convert_edm_pickle
from uni_instruct_jax.convert import safe_unpickle

FIXTURE = ('fixtures', 'edm', 'ncsnpp-tiny-cond.pkl')  # has a 'buffers' collection (freqs)


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, '-m', 'uni_instruct_jax.convert', *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """(teacher directory written by the CLI, (model, variables, metadata) from the pickle)."""
  pkl = shared_path(*FIXTURE)
  out = tmp_path_factory.mktemp('teacher') / 'ncsnpp'
  result = _cli(f'--edm_pkl={pkl}', f'--out={out}')
  assert result.returncode == 0, result.stderr
  return out, convert_edm_pickle(pkl)


def _assert_same_variables(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype == jnp.float32
    np.testing.assert_array_equal(x, y)


def test_cli_round_trip(converted):
  out, (model, variables, metadata) = converted
  record = json.loads((out / 'network.json').read_text())
  assert record['sha256'] == safe_unpickle.sha256_file(shared_path(*FIXTURE))
  assert record['source_path'] == str(shared_path(*FIXTURE))
  assert record['class_name'] == 'EDMPrecond'
  assert record['init_kwargs']['embedding_type'] == 'fourier'
  assert record['dataset_kwargs']['use_labels'] is True
  assert checkpoint.load_teacher_metadata(out) == metadata

  loaded_model, loaded = checkpoint.load_teacher(out)
  assert loaded_model == model
  _assert_same_variables(loaded, variables)
  assert 'freqs' in loaded['buffers']['model']['map_noise']
  # The parity inputs (same shapes as test_convert, so a suite run reuses its compiled ops).
  ref = np.load(shared_path('fixtures', 'edm', 'ncsnpp-tiny-cond.npz'))
  x = jnp.asarray(np.transpose(ref['x'], (0, 2, 3, 1)))
  sigma, labels = jnp.asarray(ref['sigma']), jnp.asarray(ref['class_labels'])
  out = loaded_model.apply(loaded, x, sigma, labels)
  np.testing.assert_array_equal(out, model.apply(variables, x, sigma, labels))
  out = np.transpose(np.asarray(out), (0, 3, 1, 2))
  assert np.abs(out - ref['denoised_noaug']).max() < 1e-4 * np.abs(ref['denoised_noaug']).max()


def test_load_teacher_with_sharding(converted):
  out = converted[0]
  sharding = jax.sharding.NamedSharding(jax.make_mesh((1,), ('data',)), jax.P())
  _, variables = checkpoint.load_teacher(out, sharding=sharding)
  assert all(leaf.sharding == sharding for leaf in jax.tree.leaves(variables))
  _assert_same_variables(variables, converted[1][1])


def test_save_teacher_refuses_to_overwrite(converted, tmp_path):
  out, (_, variables, metadata) = converted
  with pytest.raises(CheckpointFormatError, match='already holds a teacher'):
    checkpoint.save_teacher(out, variables, metadata)
  copy = tmp_path / 'copy'
  shutil.copytree(out, copy)
  checkpoint.save_teacher(copy, variables, metadata, overwrite=True)
  _assert_same_variables(checkpoint.load_teacher(copy)[1], variables)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
  bad = tmp_path / 'bad.pkl'
  bad.write_bytes(b'this is not a pickle')
  result = _cli(f'--edm_pkl={bad}', f'--out={tmp_path / "out"}')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [result.stderr.strip()]
  assert result.stderr.startswith(f'error: {bad}: not a valid pickle')
  assert not (tmp_path / 'out').exists()


def test_cli_requires_both_flags(tmp_path, capsys):
  assert cli.convert(str(tmp_path / 'x.pkl'), None) == 2
  assert capsys.readouterr().err == 'error: both --edm_pkl and --out are required\n'
  assert cli.convert(str(tmp_path / 'missing.pkl'), str(tmp_path / 'out')) == 2
  assert capsys.readouterr().err == f'error: {tmp_path / "missing.pkl"}: no such file\n'


def _broken_copies(out, root):
  """name -> a damaged copy of the teacher directory `out`."""
  copies = {}
  for name in ('no_json', 'bad_json', 'wrong_json', 'no_variables', 'bad_variables',
               'wrong_shape'):
    copies[name] = root / name
    shutil.copytree(out, copies[name])
  (copies['no_json'] / 'network.json').unlink()
  (copies['bad_json'] / 'network.json').write_text('{"class_name": ')
  (copies['wrong_json'] / 'network.json').write_text('{"class_name": "EDMPrecond"}')
  shutil.rmtree(copies['no_variables'] / 'variables')
  for path in (copies['bad_variables'] / 'variables').rglob('*'):
    if path.is_file() and 'manifest' in path.name:
      path.write_bytes(b'garbage')
  record = json.loads((copies['wrong_shape'] / 'network.json').read_text())
  record['init_kwargs']['model_channels'] = 32
  (copies['wrong_shape'] / 'network.json').write_text(json.dumps(record))
  return copies


def test_load_teacher_bad_directories(converted, tmp_path):
  out = converted[0]
  expected = {'no_json': 'not a teacher directory', 'bad_json': 'unreadable teacher metadata',
              'wrong_json': 'exactly the fields', 'no_variables': 'no variables/',
              'bad_variables': 'cannot restore',
              'wrong_shape': r'float32\[16\], the network expects float32\[32\]'}
  for name, path in _broken_copies(out, tmp_path).items():
    with pytest.raises(CheckpointFormatError, match=expected[name]) as info:
      checkpoint.load_teacher(path)
    assert '\n' not in str(info.value), name
  with pytest.raises(CheckpointFormatError, match='no such teacher directory'):
    checkpoint.load_teacher(pathlib.Path(tmp_path) / 'nowhere')
