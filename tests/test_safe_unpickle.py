"""Restricted unpickler and torch.save readers: hostile pickles, malformed files, both formats.

Pickles are fabricated without torch: stub modules registered in sys.modules make `pickle`
emit the same global names (torch._utils._rebuild_tensor_v2, torch.FloatStorage, ...) as torch.
"""

import builtins
import collections
import contextlib
import io
import os
import pickle
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest

from conftest import shared_path
from uni_instruct_jax.convert import CheckpointFormatError
from uni_instruct_jax.convert import UnsafePickleError
from uni_instruct_jax.convert import safe_unpickle

_MAGIC = 0x1950A86A20F9469CFC6C
_STUB_MODULES = ('torch', 'torch._utils', 'torch.storage', 'torch.nn', 'torch.nn.modules',
                 'torch.nn.modules.container', 'torch_utils', 'torch_utils.persistence')


@contextlib.contextmanager
def torch_stubs():
  """Registers empty stand-ins for torch / torch_utils so that pickle can name their globals."""
  saved = {name: sys.modules.get(name) for name in _STUB_MODULES}
  modules = {name: types.ModuleType(name) for name in _STUB_MODULES}

  def register(module, name, obj):
    obj.__module__, obj.__qualname__ = module, name
    setattr(modules[module], name, obj)
    return obj

  def unusable(*args):
    raise AssertionError('stub called')

  for fn in ('_rebuild_tensor_v2', '_rebuild_parameter'):
    register('torch._utils', fn, types.FunctionType(unusable.__code__, {}, fn))
  register('torch.storage', '_load_from_bytes',
           types.FunctionType(unusable.__code__, {}, '_load_from_bytes'))
  register('torch_utils.persistence', '_reconstruct_persistent_obj',
           types.FunctionType(unusable.__code__, {}, '_reconstruct_persistent_obj'))
  for cls in ('FloatStorage', 'LongStorage', 'HalfStorage'):
    register('torch', cls, type(cls, (), {}))
  register('torch.nn.modules.container', 'ModuleDict', type('ModuleDict', (), {}))
  sys.modules.update(modules)
  try:
    yield types.SimpleNamespace(**{n.replace('.', '_'): m for n, m in modules.items()})
  finally:
    for name, module in saved.items():
      if module is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module


class Reduce:
  """Pickles as `fn(*args)`, with an optional BUILD state."""

  def __init__(self, fn, *args, state=None):
    self.fn, self.args, self.state = fn, args, state

  def __reduce__(self):
    return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


class Storage:
  """A fabricated torch storage: a flat numpy array and its key in the file."""

  def __init__(self, key, array):
    self.key, self.array = key, np.ascontiguousarray(array).ravel()


def tensor(stubs, storage, offset, size, stride, parameter=False):
  """Pickles like torch's Tensor/Parameter __reduce_ex__ (sizes and strides in elements)."""
  t = Reduce(stubs.torch__utils._rebuild_tensor_v2, storage, offset, tuple(size), tuple(stride),
             False, collections.OrderedDict())
  return Reduce(stubs.torch__utils._rebuild_parameter, t, True,
                collections.OrderedDict()) if parameter else t


_STORAGE_NAMES = {np.dtype(np.float32): 'FloatStorage', np.dtype(np.int64): 'LongStorage',
                  np.dtype(np.float16): 'HalfStorage'}


def _dump_with_storages(stubs, obj, protocol, legacy):
  """Pickles `obj`, turning each `Storage` into torch's persistent id; returns (bytes, storages)."""
  storages = {}

  class Pickler(pickle.Pickler):

    def persistent_id(self, o):
      if not isinstance(o, Storage):
        return None
      storages[o.key] = o
      stype = getattr(stubs.torch, _STORAGE_NAMES[o.array.dtype])
      return ('storage', stype, o.key, 'cpu', o.array.size) + ((None,) if legacy else ())

  buf = io.BytesIO()
  Pickler(buf, protocol=protocol).dump(obj)
  return buf.getvalue(), storages


def legacy_bytes(stubs, obj, byteorder='little'):
  """A legacy (non-zip) torch.save stream of `obj`."""
  main, storages = _dump_with_storages(stubs, obj, 2, legacy=True)
  out = [pickle.dumps(_MAGIC, 2), pickle.dumps(1001, 2),
         pickle.dumps(dict(protocol_version=1001, little_endian=byteorder == 'little'), 2),
         main, pickle.dumps(list(storages), 2)]
  order = '<' if byteorder == 'little' else '>'
  for s in storages.values():
    out.append(np.array(s.array.size, order + 'i8').tobytes())
    out.append(s.array.astype(s.array.dtype.newbyteorder(order)).tobytes())
  return b''.join(out)


def write_zip(stubs, obj, path):
  """A zip-archive torch.save file of `obj`."""
  main, storages = _dump_with_storages(stubs, obj, 2, legacy=False)
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as z:
    z.writestr('archive/data.pkl', main)
    z.writestr('archive/byteorder', 'little')
    for s in storages.values():
      z.writestr(f'archive/data/{s.key}', s.array.tobytes())
    z.writestr('archive/version', '3\n')


def storage_blob(stubs, storage):
  """Pickles like a torch storage inside a plain pickle: `_load_from_bytes(<legacy stream>)`."""
  return Reduce(stubs.torch_storage._load_from_bytes, legacy_bytes(stubs, storage))


def _expected_tensors():
  base = np.arange(24, dtype=np.float32) * 0.5 - 3.0
  return base, dict(
      w=base[2:14].reshape(3, 4).T,           # offset and transposed strides
      v=base[:6],                             # shares the storage
      n=np.arange(5, dtype=np.int64) - 2)


def _fabricated_state(stubs):
  base, expected = _expected_tensors()
  s0, s1 = Storage('0', base), Storage('1', expected['n'])
  state = collections.OrderedDict(
      w=tensor(stubs, s0, 2, (4, 3), (1, 4)), v=tensor(stubs, s0, 0, (6,), (1,), parameter=True),
      n=tensor(stubs, s1, 0, (5,), (1,)))
  return dict(state_dict=state, epoch=3), expected


def _assert_state(obj, expected):
  assert obj['epoch'] == 3
  assert list(obj['state_dict']) == list(expected)
  for key, want in expected.items():
    got = obj['state_dict'][key]
    assert got.dtype == want.dtype and got.shape == want.shape, key
    np.testing.assert_array_equal(got, want)
    assert got.flags.c_contiguous and got.flags.writeable


@pytest.mark.parametrize('fmt', ['zip', 'legacy', 'legacy_bigendian'])
def test_torch_file_formats(tmp_path, fmt):
  path = tmp_path / 'state.pt'
  before = {name: sys.modules.get(name) for name in _STUB_MODULES}
  with torch_stubs() as stubs:
    obj, expected = _fabricated_state(stubs)
    if fmt == 'zip':
      write_zip(stubs, obj, path)
    else:
      path.write_bytes(legacy_bytes(stubs, obj, 'big' if fmt.endswith('bigendian') else 'little'))
  assert {name: sys.modules.get(name) for name in _STUB_MODULES} == before  # stubs removed
  _assert_state(safe_unpickle.load_torch_file(path), expected)
  flat = safe_unpickle.load_torch_state_dict(path)
  assert sorted(flat) == ['n', 'v', 'w']


def test_storage_bytes_in_plain_pickle(tmp_path):
  base, expected = _expected_tensors()
  with torch_stubs() as stubs:
    blob = storage_blob(stubs, Storage('7', base))
    data = pickle.dumps(dict(w=tensor(stubs, blob, 2, (4, 3), (1, 4), parameter=True)), 4)
  path = tmp_path / 'plain.pkl'
  path.write_bytes(data)
  np.testing.assert_array_equal(safe_unpickle.load_pickle(path)['w'], expected['w'])


def test_tensor_outside_its_storage_is_rejected(tmp_path):
  with torch_stubs() as stubs:
    obj = dict(state_dict=dict(w=tensor(stubs, Storage('0', np.zeros(4, np.float32)), 1,
                                        (2, 2), (2, 1))))
    path = tmp_path / 'oob.pt'
    write_zip(stubs, obj, path)
  with pytest.raises(CheckpointFormatError, match='exceeds its storage'):
    safe_unpickle.load_torch_file(path)


def test_strip_prefix_and_resnet_weights():
  path = shared_path('weights', 'resnet56-cifar10-4bfd9763.th')
  obj = safe_unpickle.load_torch_file(path)
  assert set(obj) == {'best_prec1', 'state_dict'} and obj['best_prec1'] == pytest.approx(93.62)
  sd = safe_unpickle.load_torch_state_dict(path, strip_prefix='module.')
  # conv1+bn1, 27 BasicBlocks of (conv, bn) x 2, linear; BN carries weight/bias/mean/var.
  assert len(sd) == 5 + 27 * 10 + 2
  assert all(not k.startswith('module.') and v.dtype == np.float32 for k, v in sd.items())
  shapes = {'conv1.weight': (16, 3, 3, 3), 'bn1.running_var': (16,),
            'layer1.8.conv2.weight': (16, 16, 3, 3), 'layer2.0.conv1.weight': (32, 16, 3, 3),
            'layer3.0.conv1.weight': (64, 32, 3, 3), 'layer3.8.bn2.weight': (64,),
            'linear.weight': (10, 64), 'linear.bias': (10,)}
  for key, shape in shapes.items():
    assert sd[key].shape == shape, key
  assert np.all(sd['bn1.running_var'] > 0) and np.all(np.isfinite(sd['linear.weight']))


def test_numpy_scalar_spellings(tmp_path):
  new = pickle.dumps(np.float64(0.2), protocol=3)  # GLOBAL opcodes, raw bytes
  assert b'numpy._core.multiarray\nscalar' in new
  old = new.replace(b'numpy._core.multiarray\nscalar', b'numpy.core.multiarray\nscalar')
  for name, data in (('new', new), ('old', old)):
    (tmp_path / name).write_bytes(data)
    value = safe_unpickle.load_pickle(tmp_path / name)
    assert value == 0.2 and isinstance(value, np.float64)


def test_fixture_kwargs_hold_numpy_scalars_and_module_src_is_inert():
  snapshot = safe_unpickle.load_pickle(shared_path('fixtures', 'edm', 'ncsnpp-tiny-cond.pkl'))
  ema = snapshot['ema']
  assert isinstance(ema, safe_unpickle.PersistentObject)
  assert (ema.class_name, ema.version) == ('EDMPrecond', 6)
  assert 'class SongUNet' in ema.module_src and len(ema.module_src_sha256) == 64
  assert snapshot['loss_fn'].class_name == 'EDMLoss'


# ----------------------------------------------------------------------------------------------
# Hostile input: every payload would create `marker`; none may run.


def _payloads(marker):
  code = f'open({str(marker)!r}, "w").close()'
  return {
      'os.system': Reduce(os.system, f'touch {marker}'),
      'exec': Reduce(builtins.exec, code),
      'eval': Reduce(builtins.eval, f'({code}, 0)[1]'),
      'subprocess': Reduce(subprocess.call, ['touch', str(marker)]),
      'builtins.getattr': Reduce(builtins.getattr, Reduce(builtins.__import__, 'os'), 'system'),
  }


def test_payload_control_runs_with_plain_pickle(tmp_path):
  """The marker mechanism works: an unrestricted unpickler does run the payload."""
  marker = tmp_path / 'ran'
  pickle.loads(pickle.dumps(_payloads(marker)['exec']))
  assert marker.exists()


@pytest.mark.parametrize('kind', ['os.system', 'exec', 'eval', 'subprocess', 'builtins.getattr'])
@pytest.mark.parametrize('fmt', ['pickle', 'legacy', 'zip'])
def test_hostile_globals_are_refused(tmp_path, kind, fmt):
  marker = tmp_path / 'ran'
  payload = _payloads(marker)[kind]
  path = tmp_path / 'evil.pkl'
  if fmt == 'pickle':
    path.write_bytes(pickle.dumps(dict(ema=payload), 4))
  else:
    with torch_stubs() as stubs:
      obj = dict(state_dict=dict(x=payload))
      if fmt == 'zip':
        write_zip(stubs, obj, path)
      else:
        path.write_bytes(legacy_bytes(stubs, obj))
  loader = safe_unpickle.load_pickle if fmt == 'pickle' else safe_unpickle.load_torch_file
  with pytest.raises(UnsafePickleError, match='not in the allow-list') as info:
    loader(path)
  assert str(path) in str(info.value) and '\n' not in str(info.value)
  assert not marker.exists()


@pytest.mark.parametrize('module,name', [('torch.nn.modules.linear', 'Linear'),
                                         ('numpy', 'load'), ('collections', 'Counter'),
                                         ('torch_utils.persistence', '_src_to_module')])
def test_unknown_classes_are_refused(tmp_path, module, name):
  path = tmp_path / 'unknown.pkl'
  path.write_bytes(b'\x80\x02c' + f'{module}\n{name}\n'.encode() + b')R.')
  with pytest.raises(UnsafePickleError, match=f'{module}.{name}'):
    safe_unpickle.load_pickle(path)


def test_payload_inside_storage_bytes_is_refused(tmp_path):
  marker = tmp_path / 'ran'
  with torch_stubs() as stubs:
    blob = Reduce(stubs.torch_storage._load_from_bytes,
                  legacy_bytes(stubs, _payloads(marker)['exec']))
    # A global allowed in the outer pickle is still refused inside a storage payload.
    nested_tensor = Reduce(stubs.torch_storage._load_from_bytes, legacy_bytes(
        stubs, tensor(stubs, Storage('0', np.zeros(2, np.float32)), 0, (2,), (1,))))
    data = [pickle.dumps(dict(w=tensor(stubs, b, 0, (1,), (1,))), 4)
            for b in (blob, nested_tensor)]
  for i, payload in enumerate(data):
    path = tmp_path / f'nested{i}.pkl'
    path.write_bytes(payload)
    with pytest.raises(UnsafePickleError, match='allow-list'):
      safe_unpickle.load_pickle(path)
  assert not marker.exists()


def _edm_shaped(stubs, marker, state_extra):
  """An EDM-snapshot-shaped pickle whose embedded module source would create `marker`."""
  src = f'import os\nopen({str(marker)!r}, "w").close()\nclass EDMPrecond: pass\n'
  meta = dict(type='class', version=6, module_src=src, class_name='EDMPrecond',
              state=dict(_parameters={}, _buffers={}, _modules={}, **state_extra))
  ema = Reduce(stubs.torch_utils_persistence._reconstruct_persistent_obj, meta)
  return pickle.dumps(dict(ema=ema, loss_fn=None, augment_pipe=None, dataset_kwargs={}), 4)


def test_edm_shaped_pickle_with_payload_in_source_and_global(tmp_path):
  from uni_instruct_jax.convert import load_edm_pickle  # pylint: disable=g-import-not-at-top
  marker = tmp_path / 'ran'
  with torch_stubs() as stubs:
    evil = _edm_shaped(stubs, marker, dict(_init_kwargs=_payloads(marker)['exec']))
    inert = _edm_shaped(stubs, marker, {})
  (tmp_path / 'evil.pkl').write_bytes(evil)
  (tmp_path / 'inert.pkl').write_bytes(inert)
  for loader in (safe_unpickle.load_pickle, load_edm_pickle):
    with pytest.raises(UnsafePickleError, match='builtins.exec'):
      loader(tmp_path / 'evil.pkl')
  # With no forbidden global the snapshot loads, and its source stays an inert string.
  ema = safe_unpickle.load_pickle(tmp_path / 'inert.pkl')['ema']
  assert 'open(' in ema.module_src
  with pytest.raises(CheckpointFormatError, match='_init_kwargs'):
    load_edm_pickle(tmp_path / 'inert.pkl')
  assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# Malformed files.


def _assert_one_line_error(path, loader, match=None):
  with pytest.raises(CheckpointFormatError, match=match) as info:
    loader(path)
  message = str(info.value)
  assert message.startswith(str(path)) and '\n' not in message
  assert not isinstance(info.value, UnsafePickleError)


def test_truncated_and_non_pickle_files(tmp_path):
  fixture = shared_path('fixtures', 'edm', 'ddpmpp-tiny-uncond.pkl').read_bytes()
  resnet = shared_path('weights', 'resnet56-cifar10-4bfd9763.th').read_bytes()
  cases = {
      'half.pkl': (fixture[:len(fixture) // 2], safe_unpickle.load_pickle),
      'tail.pkl': (fixture[:-1], safe_unpickle.load_pickle),
      'text.pkl': (b'hello, I am not a pickle\n', safe_unpickle.load_pickle),
      'empty.pkl': (b'', safe_unpickle.load_pickle),
      'half.th': (resnet[:len(resnet) // 2], safe_unpickle.load_torch_file),
      'tail.th': (resnet[:-3], safe_unpickle.load_torch_file),
      'plain.th': (pickle.dumps({'a': 1}), safe_unpickle.load_torch_file),
      'badzip.pt': (b'PK\x03\x04' + b'\0' * 40, safe_unpickle.load_torch_file),
  }
  for name, (data, loader) in cases.items():
    (tmp_path / name).write_bytes(data)
    _assert_one_line_error(tmp_path / name, loader)
  _assert_one_line_error(tmp_path / 'missing.pkl', safe_unpickle.load_pickle, 'no such file')


def test_zip_with_missing_storage_record(tmp_path):
  with torch_stubs() as stubs:
    obj, _ = _fabricated_state(stubs)
    write_zip(stubs, obj, tmp_path / 'full.pt')
  with zipfile.ZipFile(tmp_path / 'full.pt') as src, \
      zipfile.ZipFile(tmp_path / 'cut.pt', 'w') as dst:
    for info in src.infolist():
      if info.filename != 'archive/data/1':
        dst.writestr(info, src.read(info))
  _assert_one_line_error(tmp_path / 'cut.pt', safe_unpickle.load_torch_file,
                         'missing storage record archive/data/1')
