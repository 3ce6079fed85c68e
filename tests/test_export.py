"""Export of a student as an EDM/PyTorch state dict: EDM's names and values, the torch zip format,
weights_only-safe pickle opcodes, and the CLI (torch itself is never imported)."""

import collections
import json
import pickle
import pickletools
import runpy
import struct
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

from conftest import ROOT, shared_path
from uni_instruct_jax import export
from uni_instruct_jax import image_folder
from uni_instruct_jax import networks
from uni_instruct_jax import builders
from uni_instruct_jax import train_state as ts
from uni_instruct_jax.convert import edm_to_flax
from uni_instruct_jax.convert import safe_unpickle

# What torch's weights_only unpickler (torch/_weights_only_unpickler.py) executes: its opcodes,
# and the allow-listed globals a state dict of CPU tensors needs.
WEIGHTS_ONLY_OPCODES = {
    'APPEND', 'APPENDS', 'BINFLOAT', 'BINGET', 'BININT', 'BININT1', 'BININT2', 'BINPERSID',
    'BINPUT', 'BINUNICODE', 'BUILD', 'EMPTY_DICT', 'EMPTY_LIST', 'EMPTY_SET', 'EMPTY_TUPLE',
    'GLOBAL', 'LONG1', 'LONG_BINGET', 'LONG_BINPUT', 'MARK', 'NEWFALSE', 'NEWOBJ', 'NEWTRUE',
    'NONE', 'PROTO', 'REDUCE', 'SETITEM', 'SETITEMS', 'SHORT_BINSTRING', 'STOP', 'TUPLE',
    'TUPLE1', 'TUPLE2', 'TUPLE3'}
WEIGHTS_ONLY_GLOBALS = {'collections OrderedDict', 'torch._utils _rebuild_tensor_v2'} | {
    f'torch {name}' for name in ('DoubleStorage', 'FloatStorage', 'HalfStorage', 'LongStorage',
                                 'IntStorage', 'ShortStorage', 'CharStorage', 'ByteStorage',
                                 'BoolStorage')}
PKL = 'ncsnpp-tiny-cond.pkl'  # fourier freqs buffers and [1, 3, 3, 1] resample filters


def _perturbed(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.default_rng(seed)
  return treedef.unflatten([np.asarray(x) + rng.normal(0, 0.01, np.shape(x)).astype(np.float32)
                            for x in leaves])


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A workdir with the NCSN++ fixture as teacher: step 3 in checkpoints/ (perturbed EMA, fake
  score = teacher), step 2 in checkpoints-best/ (another EMA)."""
  pkl = shared_path('fixtures', 'edm', PKL)
  config = runpy.run_path(str(ROOT / 'configs' / 'cifar10.py'))['get_config']()
  config.teacher.path = str(pkl)
  nets, frozen, init_params = builders.build_image_nets(config)
  gen, fake = init_params(None)
  gen_tx, fake_tx = builders.make_optimizers(config)
  state = ts.create_state(gen, fake, gen_tx, fake_tx, 0)
  path = tmp_path_factory.mktemp('export_workdir')
  (path / 'config.json').write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  saved = {}
  for name, step, seed in (('checkpoints', 3, 1), ('checkpoints-best', 2, 2)):
    saved[name] = state.replace(ema_params=_perturbed(gen, seed), step=np.int32(step))
    checkpointer = ts.Checkpointer(path, 1, name=name)
    checkpointer.save(step, saved[name], {'step': step})
    checkpointer.close()
  return dict(path=path, pkl=pkl, model=nets.gen, buffers=frozen['buffers'], states=saved)


@pytest.fixture(scope='module')
def exported(workdir, tmp_path_factory):
  """{'ema': [student.pt, .json, -fake_score.pt, .json], 'best': [best.pt, best.json]}."""
  out = tmp_path_factory.mktemp('exported')
  return {'ema': export.export(workdir['path'], out / 'student.pt', fake_score=True, reference=3),
          'best': export.export(workdir['path'], out / 'best.pt', which='best')}


def test_unchanged_teacher_exports_as_edms_own_state_dict(workdir, exported):
  """The fake score (still the teacher) comes out bit for bit as EDM's state_dict() of the pickle:
  names, torch shapes, dtypes, values, freqs and resample_filter buffers included."""
  paths = exported['ema']
  assert [p.name for p in paths] == ['student.pt', 'student.json', 'student-fake_score.pt',
                                     'student-fake_score.json', 'student-reference.npz']
  metadata, reference = edm_to_flax.read_edm_snapshot(workdir['pkl'])
  loaded = safe_unpickle.load_torch_state_dict(paths[2])
  assert sorted(loaded) == sorted(reference)
  for key, value in reference.items():
    assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
    np.testing.assert_array_equal(loaded[key], value, err_msg=key)
  # The constructor kwargs build the same network as the pickle's own kwargs.
  meta = json.loads(paths[1].read_text())
  assert meta['class_name'] == metadata.class_name == 'EDMPrecond'
  assert (networks.build_network(meta['class_name'], meta['kwargs'])
          == networks.build_network(metadata.class_name, metadata.init_kwargs))
  # The network the JSON describes, with the file's tensors, gives torch EDM's recorded outputs.
  ref = np.load(str(workdir['pkl']).replace('.pkl', '.npz'))
  net = networks.build_network(meta['class_name'], meta['kwargs'])
  variables = edm_to_flax.state_dict_to_variables(net, loaded)
  out = jax.jit(net.apply)(variables, np.transpose(ref['x'], (0, 2, 3, 1)), ref['sigma'],
                          ref['class_labels'], ref['augment_labels'])
  np.testing.assert_allclose(np.transpose(np.asarray(out), (0, 3, 1, 2)), ref['denoised'],
                             rtol=0, atol=1e-4 * np.abs(ref['denoised']).max())
  assert meta['sigma_init'] == 2.5 and meta['source']['step'] == 3
  assert meta['network'] == 'generator' and meta['state_dict'] == 'student.pt'


@pytest.mark.parametrize('which', ['ema', 'best'])
def test_round_trip_to_identical_flax_variables(workdir, exported, which):
  out = exported[which][0]
  state = workdir['states']['checkpoints' if which == 'ema' else 'checkpoints-best']
  state_dict = safe_unpickle.load_torch_state_dict(out)
  variables = edm_to_flax.state_dict_to_variables(workdir['model'], state_dict)
  want = {'params': state.ema_params, 'buffers': workdir['buffers']}
  assert jax.tree.structure(variables) == jax.tree.structure(want)
  for got, expected in zip(jax.tree.leaves(variables), jax.tree.leaves(want)):
    np.testing.assert_array_equal(got, np.asarray(expected))
  meta = json.loads(out.with_suffix('.json').read_text())
  assert meta['params_sha256'] == ts.params_sha256(state.ema_params)
  assert meta['source']['step'] == int(state.step)


def _data_offsets(path):
  """{record name: offset of its data} from the local headers of a zip file."""
  raw = path.read_bytes()
  offsets = {}
  with zipfile.ZipFile(path) as archive:
    for info in archive.infolist():
      name_len, extra_len = struct.unpack('<HH', raw[info.header_offset + 26:
                                                     info.header_offset + 30])
      offsets[info.filename] = info.header_offset + 30 + name_len + extra_len
  return offsets


class _PidRecorder(pickle.Unpickler):
  """Unpickles with stand-ins for the allowed globals, recording the storage persistent ids."""

  def __init__(self, data):
    super().__init__(__import__('io').BytesIO(data))
    self.pids = []

  def find_class(self, module, name):
    assert f'{module} {name}' in WEIGHTS_ONLY_GLOBALS, (module, name)
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if module == 'torch':
      return name
    return lambda *args: ('tensor', args)

  def persistent_load(self, pid):
    self.pids.append(pid)
    return pid


def test_file_layout_and_opcodes_are_torchs(tmp_path):
  arrays = {'conv.weight': np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
            'half': np.linspace(-1, 1, 5).astype(np.float16),
            'count': np.asarray(70000, np.int64), 'mask': np.asarray([True, False]),
            'empty': np.zeros((2, 0, 3), np.float32),
            'transposed': np.arange(6, dtype=np.float64).reshape(2, 3).T}
  torch_strides = {'conv.weight': (12, 4, 2, 1), 'half': (1,), 'count': (), 'mask': (1,),
                   'empty': (3, 3, 1), 'transposed': (2, 1)}
  path = tmp_path / 'x.pt'
  export.write_torch_state_dict(path, arrays)
  loaded = safe_unpickle.load_torch_file(path)
  assert isinstance(loaded, dict) and list(loaded) == list(arrays)  # key order preserved
  for key, value in arrays.items():
    assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
    np.testing.assert_array_equal(loaded[key], value)

  with zipfile.ZipFile(path) as archive:
    infos = archive.infolist()
    names = [i.filename for i in infos]
    # No '.format_version': with an empty storage torch must read the data offsets from headers.
    assert names == ['archive/data.pkl', 'archive/.storage_alignment', 'archive/byteorder',
                     *[f'archive/data/{i}' for i in range(len(arrays))], 'archive/version',
                     'archive/.data/serialization_id']
    assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
    assert archive.read('archive/version') == b'3\n'
    assert archive.read('archive/byteorder') == b'little'
    data_pkl = archive.read('archive/data.pkl')
    storages = {n: archive.read(n) for n in names if n.startswith('archive/data/')}
  offsets = _data_offsets(path)
  assert all(offset % 64 == 0 for offset in offsets.values()), offsets

  ops = list(pickletools.genops(data_pkl))
  assert ops[0][0].name == 'PROTO' and ops[0][1] == 2 and ops[-1][0].name == 'STOP'
  assert {op.name for op, _, _ in ops} <= WEIGHTS_ONLY_OPCODES
  assert {arg for op, arg, _ in ops if op.name == 'GLOBAL'} <= WEIGHTS_ONLY_GLOBALS
  assert sum(op.name == 'BINPERSID' for op, _, _ in ops) == len(arrays)
  recorder = _PidRecorder(data_pkl)
  tensors = recorder.load()
  for i, (pid, (key, value)) in enumerate(zip(recorder.pids, arrays.items())):
    kind, storage_type, storage_key, location, numel = pid
    assert (kind, storage_key, location, numel) == ('storage', str(i), 'cpu', value.size)
    assert storage_type == export.STORAGE_NAMES[value.dtype]
    assert len(storages[f'archive/data/{i}']) == value.nbytes
    _, (_, offset, size, stride, requires_grad, hooks) = tensors[key]
    assert (offset, size, requires_grad, hooks) == (0, value.shape, False, {})
    assert stride == torch_strides[key]


def test_flax_names_invert_the_edm_naming_rule():
  for key in ('model.enc.16x16_block0.conv0.weight', 'model.dec.8x8_in0.norm0.weight',
              'model.map_noise.freqs', 'model.map_layer0.bias', 'model.enc.32x32_conv.bias'):
    assert export.flax_path_to_torch_key(networks.torch_key_to_flax_path(key)) == key
  value = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
  for key, array in (('a.weight', value), ('b.weight', value[0, 0]), ('c.bias', value[0, 0, 0])):
    np.testing.assert_array_equal(
        networks.torch_value_to_flax(key, export.flax_value_to_torch(key, array)), array)
  with pytest.raises(export.ExportError, match='no EDM state-dict name'):
    export.flax_path_to_torch_key(('params', 'model', 'conv', 'embedding'))


def test_bad_input_is_one_error_line(workdir, tmp_path, capsys):
  toy = tmp_path / 'toy'
  toy.mkdir()
  (toy / 'config.json').write_text(json.dumps({'teacher': {'source': 'toy'}}))
  dcgan = tmp_path / 'dcgan'
  dcgan.mkdir()
  (dcgan / 'config.json').write_text(json.dumps({'teacher': {'source': 'pkl'},
                                                 'generator': {'network': 'dcgan'}}))
  cases = [(tmp_path / 'nowhere', tmp_path / 'a.pt', 'ema', 'no config.json'),
           (toy, tmp_path / 'a.pt', 'ema', 'toy'),
           (dcgan, tmp_path / 'a.pt', 'ema', 'not an EDM denoiser'),
           (workdir['path'], tmp_path / 'no' / 'a.pt', 'ema', 'does not exist'),
           (workdir['path'], tmp_path / 'a.json', 'ema', 'must not end in .json'),
           (workdir['path'], tmp_path / 'a.pt', 'last', '--which')]
  for path, out, which, message in cases:
    with pytest.raises(SystemExit) as exit_info:
      export.cli(str(path), str(out), which)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and message in err and err.count('\n') == 1, err
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'config.json').write_text((workdir['path'] / 'config.json').read_text())
  with pytest.raises(SystemExit):
    export.cli(str(empty), str(tmp_path / 'a.pt'), 'best')
  assert 'no checkpoint in' in capsys.readouterr().err
  assert not list(tmp_path.glob('a*'))
  proc = subprocess.run([sys.executable, '-m', 'uni_instruct_jax.export', f'--workdir={empty}'],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and proc.stderr == 'error: both --workdir and --out are required\n'
  proc = subprocess.run([sys.executable, '-m', 'uni_instruct_jax.export', '--which=last'],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and proc.stderr.startswith('error: flag --which=last')


def test_storage_offsets_follow_minizs_layout(exported):
  """With '.format_version' 1, torch (serialization._load's _get_offset: fake-tensor and
  calculate_storage_offsets loads) computes every storage's data offset without reading headers:
  the first from its header, each next one from the end of the previous data + a 16-byte data
  descriptor + a local header '<archive>/data/<k>' with an 'FB' extra padding it to 64 bytes."""
  path = exported['ema'][0]
  offsets = _data_offsets(path)
  raw = path.read_bytes()
  with zipfile.ZipFile(path) as archive:
    assert archive.read('archive/.format_version') == b'1'
    assert archive.read('archive/.storage_alignment') == b'64'
    infos = [i for i in archive.infolist() if i.filename.startswith('archive/data/')]
  assert [i.filename for i in infos] == [f'archive/data/{k}' for k in range(len(infos))]
  current = None
  for info in infos:
    flags, crc = struct.unpack('<H6xI', raw[info.header_offset + 6:info.header_offset + 18])
    assert flags & 0x08 and crc == 0  # sizes and CRC follow the data, in a data descriptor
    if current is None:
      computed = offsets[info.filename]
    else:
      start = current + 30 + len(info.filename) + 4
      computed = start + -start % 64
    assert computed == offsets[info.filename], info.filename
    descriptor = raw[computed + info.file_size:computed + info.file_size + 16]
    assert descriptor == struct.pack('<4I', 0x08074B50, info.CRC, info.file_size, info.file_size)
    current = computed + info.file_size + 16


def test_reference_batch_is_what_the_exported_files_compute(exported):
  """student-reference.npz: seeds 0..2 through D(sigma_init z, sigma_init), which the network the
  JSON describes, with the .pt's tensors, reproduces (what a torch user checks against)."""
  pt, meta_path, *_, npz = exported['ema']
  ref = np.load(npz)
  meta = json.loads(meta_path.read_text())
  net = networks.build_network(meta['class_name'], meta['kwargs'])
  z, classes = image_folder.seed_inputs(range(3), (16, 16, 3), 10)
  np.testing.assert_allclose(ref['x'], np.transpose(2.5 * np.asarray(z), (0, 3, 1, 2)), rtol=1e-6)
  np.testing.assert_array_equal(ref['sigma'], [2.5] * 3)
  np.testing.assert_array_equal(ref['class_labels'], np.eye(10)[np.asarray(classes)])
  variables = edm_to_flax.state_dict_to_variables(net, safe_unpickle.load_torch_state_dict(pt))
  out = jax.jit(net.apply)(variables, np.transpose(ref['x'], (0, 2, 3, 1)), ref['sigma'],
                           ref['class_labels'])
  np.testing.assert_allclose(np.transpose(np.asarray(out), (0, 3, 1, 2)), ref['denoised'],
                             rtol=0, atol=1e-5 * np.abs(ref['denoised']).max())
  assert np.abs(ref['denoised'] - ref['x']).max() > 0.1  # the network did something
