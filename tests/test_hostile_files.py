"""Hostile files against every loader entry point, each run in one bounded subprocess.

The files are built here from hand-written pickle opcodes, `zipfile` and `struct` (issue 12 §1):
type confusion through numpy globals, BUILD on module-level stand-ins, memory exhaustion from small
files (stride-0 views, memo indices, zip bombs, object floods, repeated storage payloads), deep
nesting, equal-hash keys, reference cycles and out-of-range network kwargs. A subprocess with an
address-space limit loads legitimate fixtures, then every hostile file, then the fixtures again,
and reports per load: the exception type and message, the peak resident memory above the level
before the load (VmHWM after resetting it through /proc/self/clear_refs) and the time taken.

Run the battery alone and print its per-case table:
  python3 -m pytest -q -s tests/test_hostile_files.py
"""

import hashlib
import io
import json
import os
import pathlib
import pickle
import resource
import shutil
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from conftest import ROOT
from conftest import SHARED

_MAGIC = 0x1950A86A20F9469CFC6C
_GIB = 1 << 30
_PEAK_BOUND = _GIB  # issue 12: files under 10 MB stay within 1 GB of the loader's baseline
_TIME_BOUND = 15.0  # seconds per hostile load (2 shared CPU cores)
_FIXTURES = {'edm': 'fixtures/edm/ddpmpp-tiny-uncond.pkl',
             'resnet': 'weights/resnet56-cifar10-4bfd9763.th',
             'inception_npz': 'fixtures/inception/fid-inception-rule-weights.npz'}


# ------------------------------------------------------------------------------------- opcodes


def g(module, name):
  """GLOBAL."""
  return b'c' + f'{module}\n{name}\n'.encode()


def s(text):
  """BINUNICODE."""
  data = text.encode()
  return b'X' + struct.pack('<I', len(data)) + data


def by(data):
  """BINBYTES."""
  return b'B' + struct.pack('<I', len(data)) + data


def i(value):
  """BININT, or LONG1 beyond 32 bits."""
  if -2**31 <= value < 2**31:
    return b'J' + struct.pack('<i', value)
  data = value.to_bytes((value.bit_length() + 8) // 8, 'little', signed=True)
  return b'\x8a' + bytes([len(data)]) + data


def put(n):
  return b'r' + struct.pack('<I', n)


def get(n):
  return b'j' + struct.pack('<I', n)


def tup(*items):
  return b'(' + b''.join(items) + b't'


def call(fn, *args):
  return fn + tup(*args) + b'R'


P2 = b'\x80\x02'
NONE, TRUE, FALSE, STOP = b'N', b'\x88', b'\x89', b'.'
EMPTY_DICT, EMPTY_LIST, EMPTY_SET = b'}', b']', b'\x8f'
DTYPE, SCALAR = g('numpy', 'dtype'), g('numpy._core.multiarray', 'scalar')
REBUILD = g('torch._utils', '_rebuild_tensor_v2')
ODICT = call(g('collections', 'OrderedDict'))


def dtype_state(order='<', flags=0, elsize=-1):
  return tup(i(3), s(order), NONE, NONE, NONE, i(elsize), i(-1), i(flags))


def pid(key, numel, stype='FloatStorage'):
  return tup(s('storage'), g('torch', stype), s(key), s('cpu'), i(numel)) + b'Q'


def tensor(key, numel, offset, size, stride):
  return call(REBUILD, pid(key, numel), i(offset), tup(*map(i, size)), tup(*map(i, stride)),
              FALSE, ODICT)


def state_dict(*pairs):
  """An OrderedDict pickled as torch does: OrderedDict() then SETITEMS."""
  return ODICT + b'(' + b''.join(s(k) + v for k, v in pairs) + b'u'


def legacy(body, storages=()):
  """A legacy torch.save stream around the pickle `body` (storages: [(key, float32 array)])."""
  out = [pickle.dumps(_MAGIC, 2), pickle.dumps(1001, 2),
         pickle.dumps(dict(protocol_version=1001, little_endian=True), 2), body,
         pickle.dumps([k for k, _ in storages], 2)]
  for _, array in storages:
    out += [struct.pack('<q', array.size), array.astype('<f4').tobytes()]
  return b''.join(out)


def torch_zip(body, storages=(), compress=zipfile.ZIP_STORED):
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w', compress) as z:
    z.writestr('archive/data.pkl', body)
    z.writestr('archive/byteorder', 'little')
    for key, array in storages:
      z.writestr(f'archive/data/{key}', np.asarray(array, '<f4').tobytes(), zipfile.ZIP_STORED)
  return buf.getvalue()


def patch_zip_size(data, name, size):
  """Rewrites the uncompressed size that the local and central headers of `name` declare."""
  data = bytearray(data)
  encoded = name.encode()
  for signature, size_at, length_at, name_at in ((b'PK\x03\x04', 22, 26, 30),
                                                 (b'PK\x01\x02', 24, 28, 46)):
    at = data.find(signature)
    while at >= 0:
      length = struct.unpack_from('<H', data, at + length_at)[0]
      if data[at + name_at:at + name_at + length] == encoded:
        struct.pack_into('<I', data, at + size_at, size)
      at = data.find(signature, at + 4)
  return bytes(data)


def deflate_bomb(name, mib):
  """A zip whose member `name` inflates to `mib` MiB of zeros."""
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w', zipfile.ZIP_DEFLATED, compresslevel=1) as z:
    with z.open(name, 'w') as f:
      chunk = bytes(1 << 20)
      for _ in range(mib):
        f.write(chunk)
  return buf.getvalue()


def persistent(class_name, kwargs, modules, extra_state=b''):
  """`_reconstruct_persistent_obj(meta)` of an EDM module with no tensors (raw pickled parts)."""
  state = (EMPTY_DICT + b'(' + s('_init_kwargs') + kwargs + s('_init_args') + b')' +
           s('_parameters') + EMPTY_DICT + s('_buffers') + EMPTY_DICT + s('_modules') + modules +
           extra_state + b'u')
  meta = (EMPTY_DICT + b'(' + s('type') + s('class') + s('version') + i(6) + s('module_src') +
          s('') + s('class_name') + s(class_name) + s('state') + state + b'u')
  return call(g('torch_utils.persistence', '_reconstruct_persistent_obj'), meta)


def edm_snapshot(init_kwargs, inner_kwargs=None):
  """An EDM-snapshot-shaped pickle with no tensors; kwargs are objects or raw opcodes."""
  def raw(obj):
    return obj if isinstance(obj, bytes) else pickle.dumps(obj, 2)[2:-1]

  inner = persistent('SongUNet', raw(inner_kwargs or {}), EMPTY_DICT)
  ema = persistent('EDMPrecond', raw(init_kwargs), EMPTY_DICT + s('model') + inner + b's')
  return P2 + EMPTY_DICT + s('ema') + ema + b's' + STOP


_GOOD_KWARGS = dict(img_resolution=16, img_channels=3, label_dim=0, model_type='SongUNet',
                    model_channels=16, channel_mult=[1, 2], num_blocks=1)


# ----------------------------------------------------------------------------------- the cases


def _pickle_cases():
  """name -> plain pickle bytes (also wrapped as legacy and zip torch.save files)."""
  f8 = call(DTYPE, s('f8'), FALSE, TRUE)
  cases = {
      # Type confusion through numpy.
      'dtype_O8_build_scalar': P2 + call(SCALAR, call(DTYPE, s('O8'), FALSE, TRUE) +
                                         dtype_state('|', flags=63) + b'b', by(b'A' * 8)) + STOP,
      'dtype_f8_flags_cleared': P2 + call(SCALAR, f8 + dtype_state('<', flags=63) + b'b',
                                          by(b'A' * 8)) + STOP,
      'dtype_f8_elsize': P2 + call(SCALAR, f8 + dtype_state('<', elsize=4096) + b'b',
                                   by(b'A' * 8)) + STOP,
      'dtype_structured_object_field': P2 + call(
          DTYPE, b'(' + tup(s('a'), s('O')) + tup(s('b'), s('<f8')) + b'l', FALSE, TRUE) + STOP,
      'scalar_short_bytes': P2 + call(SCALAR, f8, by(b'A' * 4)) + STOP,
      'scalar_of_a_dict': P2 + call(SCALAR, EMPTY_DICT, by(b'A' * 8)) + STOP,
      'build_on_numpy_dtype_global': P2 + DTYPE + EMPTY_DICT + b'b' + STOP,
      'build_on_storage_type': P2 + g('torch', 'FloatStorage') + EMPTY_DICT + s('dtype') +
                               s('float64') + b's' + b'b' + STOP,
      'build_on_function': P2 + REBUILD + EMPTY_DICT + b'b' + STOP,
      'build_on_persistent_object': P2 + persistent('EDMPrecond', EMPTY_DICT, EMPTY_DICT) +
                                    EMPTY_DICT + b'b' + STOP,
      'module_dict_list_state': P2 + g('torch.nn.modules.container', 'ModuleDict') + b')\x81' +
                                EMPTY_LIST + b'b' + STOP,
      'ordered_dict_list_state': P2 + ODICT + EMPTY_LIST + b'b' + STOP,
      'codecs_encode_utf7': P2 + call(g('_codecs', 'encode'), s('x'), s('utf-7')) + STOP,
      'ext_code': P2 + b'\x82\x01' + STOP,
      'inst': b'(i__builtin__\nobject\n.',
      # Memory: memo index, integer and object floods.
      'long_binput_2_27': P2 + NONE + put(1 << 27) + STOP,
      'binget_unset': P2 + get(5) + STOP,
      'long4_one_megabyte': P2 + b'\x8b' + struct.pack('<i', 1 << 20) + b'\x01' * (1 << 20) +
                            STOP,
      'text_int_200_digits': b'I' + b'9' * 200 + b'\n.',
      'empty_set_flood': P2 + EMPTY_LIST + b'(' + EMPTY_SET * 2_000_000 + b'e' + STOP,
      'mark_flood': P2 + b'(' * 2_000_000 + NONE + STOP,
      'memo_flood': P2 + NONE + b''.join(put(k) for k in range(1_000_000)) + STOP,
      # Nesting, hashing, cycles.
      'deep_tuple_dict_key': P2 + EMPTY_DICT + b')' + b'\x85' * 1_000_000 + NONE + b's' + STOP,
      'deep_tuple_set_item': P2 + EMPTY_SET + b'(' + b')' + b'\x85' * 200_000 + b'\x90' + STOP,
      'deep_tuple_frozenset': P2 + b'(' + b')' + b'\x85' * 200_000 + b'\x91' + STOP,
      'deep_list_10k': P2 + EMPTY_LIST * 10_000 + b'a' * 9_999 + STOP,
      'deep_dict_1m': P2 + EMPTY_DICT + (s('k') + EMPTY_DICT) * 300_000 + b's' * 300_000 + STOP,
      'equal_hash_ints': P2 + EMPTY_DICT + b'(' + b''.join(
          i(5 + k * (2**61 - 1)) + NONE for k in range(1, 60_001)) + b'u' + STOP,
      'float_keys': P2 + EMPTY_DICT + b'(' + b''.join(
          b'G' + struct.pack('>d', float(k)) + NONE for k in range(1000)) + b'u' + STOP,
      'list_cycle': P2 + EMPTY_LIST + put(0) + get(0) + b'a' + STOP,
      'dict_cycle': P2 + EMPTY_DICT + put(0) + s('self') + get(0) + b's' + STOP,
      'module_dict_cycle': P2 + g('torch.nn.modules.container', 'ModuleDict') + b')\x81' + put(0) +
                           EMPTY_DICT + s('_modules') + EMPTY_DICT + s('m') + get(0) + b'ss' +
                           b'b' + STOP,
      'billion_laughs': P2 + NONE + put(0) + b'0' + b''.join(
          get(k) + get(k) + b'\x86' + put(k + 1) + b'0' for k in range(60)) + get(60) + STOP,
      'shared_string_100k_refs': P2 + by(b'x' * 200_000) + put(0) + b'0' + EMPTY_LIST + b'(' +
                                 get(0) * 100_000 + b'e' + STOP,
      'bool_scalar_byte_7': P2 + call(SCALAR, call(DTYPE, s('b1'), FALSE, TRUE) +
                                      dtype_state('|') + b'b', by(b'\x07')) + STOP,
      # Tensors.
      'stride0_view_memo_6x': P2 + EMPTY_LIST + b'(' + tensor('0', 16, 0, (3 * 2**26,), (0,)) +
                              put(1) + get(1) * 5 + b'e' + STOP,
      'stride0_views_distinct_6x': P2 + EMPTY_LIST + b'(' + tensor('0', 16, 0, (2**24,), (0,)) * 6 +
                                   b'e' + STOP,
      'negative_stride': P2 + tensor('0', 16, 15, (4,), (-1,)) + STOP,
      'huge_dimension': P2 + tensor('0', 16, 0, (2**62, 0), (1, 1)) + STOP,
      'view_past_storage': P2 + tensor('0', 16, 8, (4, 4), (4, 1)) + STOP,
  }
  return cases


def _torch_files(tmp):
  """name -> (path, loaders): hostile torch.save files (legacy and zip) and npz archives."""
  files = {}

  def add(name, data, loaders, suffix='.pt'):
    path = tmp / f'{name}{suffix}'
    path.write_bytes(data)
    files[name] = (str(path), loaders)

  torch_loaders = ['load_torch_file', 'load_torch_state_dict', 'inception', 'proxy']
  for name, body in _pickle_cases().items():
    if len(body) > 100_000:  # floods: one entry point per reader keeps the battery fast
      add(f'pkl_{name}', body, ['load_pickle'], '.pkl')
      add(f'zip_{name}', torch_zip(body, [('0', np.zeros(16, np.float32))]),
          ['load_torch_state_dict'])
      continue
    add(f'pkl_{name}', body, ['load_pickle', 'load_edm_pickle'], '.pkl')
    add(f'legacy_{name}', legacy(body, [('0', np.zeros(16, np.float32))]), torch_loaders)
    add(f'zip_{name}', torch_zip(body, [('0', np.zeros(16, np.float32))]), torch_loaders)
  # Valid data, but flattened state-dict names would take 20000 x 90 x 60 kB.
  chain = (P2 + s('k' * 60_000) + put(0) + b'0' + EMPTY_DICT + (get(0) + EMPTY_DICT) * 90 + b'(' +
           b''.join(s(str(k)) + NONE for k in range(20_000)) + b'u' + b's' * 90 + STOP)
  add('zip_long_key_chain_wide_bottom', torch_zip(chain), torch_loaders[1:])
  add('pkl_long_key_chain_wide_bottom', chain, ['load_edm_pickle'], '.pkl')
  # A legitimate teacher with BUILD onto the FloatStorage stand-in appended before its STOP.
  edm = (SHARED / _FIXTURES['edm']).read_bytes()
  add('edm_then_build_on_float_storage',
      edm[:-1] + g('torch', 'FloatStorage') + EMPTY_DICT + b'b0' + STOP,
      ['load_pickle', 'load_edm_pickle'], '.pkl')
  # Zip bombs: honest and lying size fields, on data.pkl, a storage record and an npz member.
  bomb = deflate_bomb('archive/data.pkl', 64)
  add('zip_bomb_data_pkl', bomb, torch_loaders)
  add('zip_bomb_claims_3gib', patch_zip_size(bomb, 'archive/data.pkl', 3 * _GIB), torch_loaders)
  add('zip_bomb_claims_100b', patch_zip_size(bomb, 'archive/data.pkl', 100), torch_loaders)
  add('npz_bomb', deflate_bomb('w.npy', 64), ['inception'], '.npz')
  for method in (zipfile.ZIP_LZMA, zipfile.ZIP_BZIP2):
    add(f'zip_data_pkl_method_{method}', torch_zip(P2 + NONE + STOP, compress=method),
        torch_loaders)
  record = torch_zip(P2 + tensor('0', 2**28, 0, (4,), (1,)) + STOP, [('0', np.zeros(4))])
  add('zip_storage_claims_1gib', patch_zip_size(record, 'archive/data/0', _GIB), torch_loaders)
  buf = io.BytesIO()
  np.savez(buf, w=np.zeros(3, object).astype(object))
  add('npz_object_dtype', buf.getvalue(), ['inception'], '.npz')
  buf = io.BytesIO()
  np.savez(buf, w=np.zeros(3, [('a', '<f8'), ('b', '<i4')]))
  add('npz_structured', buf.getvalue(), ['inception'], '.npz')
  # Legacy: many storages each claiming the whole stream; one payload decoded many times.
  many = P2 + EMPTY_LIST + b'(' + b''.join(pid(str(k), 1 << 20) for k in range(64)) + b'e' + STOP
  add('legacy_storages_past_stream', legacy(many), torch_loaders)
  payload = legacy(P2 + pid('0', 1 << 18) + STOP, [('0', np.zeros(1 << 18, np.float32))])
  repeated = P2 + by(payload) + put(2) + b'0' + EMPTY_LIST + b'(' + b''.join(
      call(g('torch.storage', '_load_from_bytes'), get(2)) for _ in range(200)) + b'e' + STOP
  add('load_from_bytes_same_payload_200x', repeated, ['load_pickle', 'load_edm_pickle'], '.pkl')
  return files


def _kwargs_cases(tmp):
  """name -> (path, loaders): EDM snapshots whose network kwargs are out of range or cyclic."""
  bad = {'num_blocks_3000': dict(num_blocks=3000), 'resolution_65536': dict(img_resolution=65536),
         'resolution_negative': dict(img_resolution=-16), 'label_dim_1e9': dict(label_dim=10**9),
         'channels_1e6': dict(model_channels=10**6), 'mult_100_levels': dict(channel_mult=[1] * 100),
         'dropout_nan': dict(dropout=float('nan')), 'resolution_odd': dict(img_resolution=15),
         'resolution_bool': dict(img_resolution=True), 'params_past_file': dict(model_channels=512),
         'megabyte_string': dict(embedding_type='x' * 2**20)}
  files = {}
  for name, change in bad.items():
    kwargs = dict(_GOOD_KWARGS, **change)
    path = tmp / f'kwargs_{name}.pkl'
    path.write_bytes(edm_snapshot({k: v for k, v in kwargs.items() if k != 'model_type'},
                                  {k: v for k, v in kwargs.items() if k not in (
                                      'img_channels', 'model_type')}))
    files[f'kwargs_{name}'] = (str(path), ['load_edm_pickle'])
  cyclic = EMPTY_DICT + put(9) + s('self') + get(9) + b's'
  path = tmp / 'kwargs_cycle.pkl'
  path.write_bytes(edm_snapshot(cyclic, cyclic))
  files['kwargs_cycle'] = (str(path), ['load_pickle', 'load_edm_pickle'])
  path = tmp / 'kwargs_O8_scalar.pkl'
  path.write_bytes(edm_snapshot(EMPTY_DICT + s('img_resolution') + call(
      SCALAR, call(DTYPE, s('O8'), FALSE, TRUE) + dtype_state('|') + b'b', by(b'A' * 8)) + b's'))
  files['kwargs_O8_scalar'] = (str(path), ['load_pickle', 'load_edm_pickle'])
  return files


def _teacher_cases(tmp, teacher):
  """name -> (directory, ['load_teacher']): copies of a converted teacher with hostile records."""
  cases = {'num_blocks_3000': dict(num_blocks=3000), 'resolution_65536': dict(img_resolution=65536),
           'resolution_negative': dict(img_resolution=-16), 'channel_mult_16x8':
           dict(channel_mult=[16] * 8, model_channels=2048), 'kwargs_list': None}
  files = {}
  out = tmp / 'teacher_deep_json'
  shutil.copytree(teacher, out)
  (out / 'network.json').write_text('[' * 100_000 + ']' * 100_000)
  files['teacher_deep_json'] = (str(out), ['load_teacher'])
  for name, change in cases.items():
    out = tmp / f'teacher_{name}'
    shutil.copytree(teacher, out)
    record = json.loads((out / 'network.json').read_text())
    record['init_kwargs'] = [] if change is None else dict(record['init_kwargs'], **change)
    (out / 'network.json').write_text(json.dumps(record))
    files[f'teacher_{name}'] = (str(out), ['load_teacher'])
  return files


# -------------------------------------------------------------------------- subprocess runner


def _status():
  fields = dict(line.split(':', 1) for line in open('/proc/self/status') if line.startswith('Vm'))
  return {k: int(v.split()[0]) * 1024 for k, v in fields.items()}


def _digest(tree):
  """sha256 over a nested structure of arrays and plain values, in key order."""
  h = hashlib.sha256()

  def walk(x):
    if isinstance(x, dict):
      for k in sorted(x, key=str):
        h.update(str(k).encode())
        walk(x[k])
    elif isinstance(x, (list, tuple)):
      for v in x:
        walk(v)
    elif isinstance(x, (set, frozenset)):
      walk(sorted(x, key=str))
    elif hasattr(x, 'state'):  # PersistentObject, TorchModuleDict
      h.update(type(x).__name__.encode())
      walk([getattr(x, 'class_name', ''), x.state])
    elif hasattr(x, 'shape') and hasattr(x, 'dtype'):
      a = np.asarray(x)
      h.update(f'{a.dtype.str}{a.shape}'.encode())
      h.update(np.ascontiguousarray(a).tobytes())
    else:
      h.update(repr(x).encode())
  walk(tree)
  return h.hexdigest()


def _process_state():
  """What a poisoned process would show: numpy's builtin dtypes, the loaders' stand-ins."""
  from uni_instruct_jax.convert import safe_unpickle  # pylint: disable=g-import-not-at-top
  dtypes = [np.dtype(c) for c in '?bBhHiIlLqQefdgFD'] + list(safe_unpickle._STORAGE_DTYPES.values())
  return repr([(d.str, d.itemsize, d.flags, d.kind, d.alignment, d.__reduce__()) for d in dtypes])


def _run(cases_path):
  """Subprocess body: legitimate loads, every hostile case, legitimate loads again."""
  from uni_instruct_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from uni_instruct_jax.convert import safe_unpickle  # pylint: disable=g-import-not-at-top
  from uni_instruct_jax.convert import edm_to_flax  # pylint: disable=g-import-not-at-top
  from uni_instruct_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
  from uni_instruct_jax.evaluation import proxy  # pylint: disable=g-import-not-at-top
  spec = json.loads(pathlib.Path(cases_path).read_text())
  loaders = {'load_pickle': safe_unpickle.load_pickle,
             'load_torch_file': safe_unpickle.load_torch_file,
             'load_torch_state_dict': safe_unpickle.load_torch_state_dict,
             'load_edm_pickle': edm_to_flax.load_edm_pickle,
             'inception': inception.load_inception_params, 'proxy': proxy.load_proxy_params,
             'load_teacher': checkpoint.load_teacher}
  legit = {'pickle': lambda: safe_unpickle.load_pickle(spec['fixtures']['edm']),
           'edm': lambda: edm_to_flax.load_edm_pickle(spec['fixtures']['edm'])[1],
           'resnet_state_dict': lambda: safe_unpickle.load_torch_state_dict(
               spec['fixtures']['resnet']),
           'proxy': lambda: proxy.load_proxy_params(spec['fixtures']['resnet']),
           'inception_npz': lambda: safe_unpickle.load_npz(spec['fixtures']['inception_npz']),
           'teacher': lambda: checkpoint.load_teacher(spec['teacher'])[1],
           'probe': lambda: safe_unpickle.load_torch_file(spec['probe'])}
  before = {k: _digest(f()) for k, f in legit.items()}
  state = _process_state()
  limit = _status()['VmSize'] + spec['address_space_headroom']
  resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
  results = []
  for name, (path, names) in spec['cases'].items():
    for loader in names:
      with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # resets VmHWM to the current resident size
      base, start = _status()['VmRSS'], time.perf_counter()
      try:
        loaders[loader](path)
        error = None
      except Exception as e:  # pylint: disable=broad-except
        error = e
      results.append(dict(
          case=name, loader=loader, path=path, seconds=time.perf_counter() - start,
          peak=_status()['VmHWM'] - base, type=type(error).__name__,
          value_error=isinstance(error, ValueError), message=str(error),
          probe_same=_digest(legit['probe']()) == before['probe']))
  after = {k: _digest(f()) for k, f in legit.items()}
  json.dump(dict(results=results, legit_same={k: after[k] == before[k] for k in before},
                 state_same=_process_state() == state), sys.stdout)


@pytest.fixture(scope='module')
def battery(tmp_path_factory):
  """Runs every hostile case in one subprocess; returns its report."""
  for rel in _FIXTURES.values():
    if not (SHARED / rel).exists():
      pytest.skip(f'shared file {SHARED / rel} not found')
  tmp = tmp_path_factory.mktemp('hostile')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  teacher = tmp / 'teacher'
  subprocess.run([sys.executable, '-m', 'uni_instruct_jax.convert',
                  f'--edm_pkl={SHARED / _FIXTURES["edm"]}', f'--out={teacher}'], cwd=ROOT,
                 env=env, check=True, capture_output=True, timeout=300)
  cases = {**_torch_files(tmp), **_kwargs_cases(tmp), **_teacher_cases(tmp, teacher)}
  probe = tmp / 'probe.pt'  # reloaded after every hostile load: tensors and a float64 scalar
  probe.write_bytes(torch_zip(P2 + state_dict(
      ('w', tensor('0', 16, 2, (3, 4), (1, 3))), ('v', tensor('0', 16, 0, (16,), (1,))),
      ('x', call(SCALAR, call(DTYPE, s('f8'), FALSE, TRUE) + dtype_state() + b'b',
                 by(struct.pack('<d', 0.1))))) + STOP, [('0', np.arange(16) * 0.5 - 3)]))
  listing = sorted(str(p) for p in tmp.rglob('*'))
  spec = dict(cases=cases, teacher=str(teacher), probe=str(probe), address_space_headroom=3 * _GIB,
              fixtures={k: str(SHARED / v) for k, v in _FIXTURES.items()})
  (tmp / 'cases.json').write_text(json.dumps(spec))
  start = time.perf_counter()
  result = subprocess.run([sys.executable, __file__, str(tmp / 'cases.json')], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout)
  report['seconds'] = time.perf_counter() - start
  report['sizes'] = {name: _size(path) for name, (path, _) in cases.items()}
  (tmp / 'cases.json').unlink()
  report['listing_same'] = sorted(str(p) for p in tmp.rglob('*')) == listing
  worst = max(report['results'], key=lambda r: r['peak'])
  for r in sorted(report['results'], key=lambda r: -r['seconds'])[:8]:
    print(f"{r['case']:40s} {r['loader']:22s} {r['seconds']:6.2f} s {r['peak'] / 2**20:7.1f} MiB")
  print(f"\n{len(report['results'])} hostile loads in {report['seconds']:.1f} s; worst peak "
        f"{worst['peak'] / 2**20:.1f} MiB ({worst['case']} via {worst['loader']}); slowest "
        f"{max(r['seconds'] for r in report['results']):.2f} s")
  return report


def _size(path):
  path = pathlib.Path(path)
  return path.stat().st_size if path.is_file() else sum(
      p.stat().st_size for p in path.rglob('*') if p.is_file())


@pytest.mark.slow
def test_every_hostile_load_is_refused_with_one_line(battery):
  bad = [r for r in battery['results'] if not (
      r['value_error'] and r['type'] in ('UnsafePickleError', 'CheckpointFormatError',
                                         'StateDictMismatchError', 'InceptionWeightsError') and
      '\n' not in r['message'] and r['path'] in r['message'])]
  assert not bad, [(r['case'], r['loader'], r['type'], r['message'][:200]) for r in bad]


@pytest.mark.slow
def test_no_bound_is_reached_by_running_out_of_resources(battery):
  """Refusals come from the loaders' own checks, not from MemoryError / RecursionError."""
  bad = [r for r in battery['results'] if any(
      word in r['message'] for word in ('MemoryError', 'RecursionError', 'Segmentation'))]
  assert not bad, [(r['case'], r['loader'], r['message'][:200]) for r in bad]


@pytest.mark.slow
def test_memory_and_time_are_bounded(battery):
  for r in battery['results']:
    assert battery['sizes'][r['case']] < 10 * 2**20, r['case']
    assert r['peak'] < _PEAK_BOUND, (r['case'], r['loader'], r['peak'])
    assert r['seconds'] < _TIME_BOUND, (r['case'], r['loader'], r['seconds'])


@pytest.mark.slow
def test_later_loads_are_bit_identical_and_nothing_else_changes(battery):
  assert all(r['probe_same'] for r in battery['results']), [
      r['case'] for r in battery['results'] if not r['probe_same']]
  assert battery['legit_same'] == {k: True for k in battery['legit_same']}
  assert battery['state_same']
  assert battery['listing_same']


@pytest.mark.slow
def test_expected_refusals_name_the_bound(battery):
  """Spot checks that each attack class is stopped by the bound written for it."""
  expect = {
      ('pkl_dtype_O8_build_scalar', 'load_pickle'): 'not a plain bool/int/float dtype',
      ('pkl_dtype_f8_flags_cleared', 'load_pickle'): 'non-canonical state',
      ('pkl_build_on_storage_type', 'load_pickle'): 'BUILD on a StorageType',
      ('edm_then_build_on_float_storage', 'load_edm_pickle'): 'BUILD on a StorageType',
      ('pkl_long_binput_2_27', 'load_pickle'): 'memo index 134217728',
      ('zip_stride0_view_memo_6x', 'load_torch_file'): 'memory bound',
      ('zip_bomb_claims_3gib', 'load_torch_file'): 'claims 3221225472 bytes',
      ('npz_bomb', 'inception'): 'claims 67108864 bytes',
      ('zip_data_pkl_method_14', 'proxy'): 'compression method 14',
      ('pkl_deep_tuple_dict_key', 'load_pickle'): 'memory bound',
      ('pkl_deep_tuple_set_item', 'load_pickle'): 'dict key or set item is a tuple',
      ('pkl_equal_hash_ints', 'load_pickle'): 'dict key or set item is a int',
      ('pkl_deep_list_10k', 'load_edm_pickle'): 'nests deeper than',
      ('pkl_billion_laughs', 'load_pickle'): 'tree far larger',
      ('pkl_shared_string_100k_refs', 'load_pickle'): 'shared strings expand',
      ('zip_long_key_chain_wide_bottom', 'load_torch_state_dict'): 'longer than 1024',
      ('pkl_bool_scalar_byte_7', 'load_pickle'): 'exactly its item size',
      ('pkl_list_cycle', 'load_pickle'): 'reference cycle',
      ('kwargs_cycle', 'load_edm_pickle'): 'reference cycle',
      ('kwargs_num_blocks_3000', 'load_edm_pickle'): 'num_blocks=3000',
      ('kwargs_resolution_65536', 'load_edm_pickle'): 'img_resolution=65536',
      ('kwargs_params_past_file', 'load_edm_pickle'): 'parameters, more than',
      ('legacy_storages_past_stream', 'load_torch_file'): 'past the stream size',
      ('load_from_bytes_same_payload_200x', 'load_pickle'): 'memory bound',
      ('teacher_resolution_65536', 'load_teacher'): 'img_resolution=65536',
  }
  messages = {(r['case'], r['loader']): r['message'] for r in battery['results']}
  for key, text in expect.items():
    assert text in messages[key], (key, messages[key])


def test_legitimate_files_are_far_inside_the_nesting_bound():
  from uni_instruct_jax.convert import pickle_vm  # pylint: disable=g-import-not-at-top
  from uni_instruct_jax.convert import safe_unpickle  # pylint: disable=g-import-not-at-top
  for name, rel in _FIXTURES.items():
    if not (SHARED / rel).exists():
      pytest.skip(f'shared file {SHARED / rel} not found')
    loader = safe_unpickle.load_npz if rel.endswith('.npz') else safe_unpickle.load_torch_file \
        if name == 'resnet' else safe_unpickle.load_pickle
    pickle_vm.check_graph(loader(SHARED / rel), safe_unpickle._children, max_text=2**30,
                          max_depth=pickle_vm.MAX_DEPTH // 4)


def test_shared_view_is_materialised_once(tmp_path):
  """A stride-0 view referenced six times through the memo costs one copy, within the budget."""
  from uni_instruct_jax.convert import safe_unpickle  # pylint: disable=g-import-not-at-top
  n = 2**21  # 8 MiB: six copies would pass the budget of a 300-byte file, one does not
  path = tmp_path / 'shared.pt'
  path.write_bytes(torch_zip(P2 + EMPTY_LIST + b'(' + tensor('0', 1, 0, (n,), (0,)) + put(1) +
                             get(1) * 5 + b'e' + STOP, [('0', np.float32([2.5]))]))
  assert 6 * n * 4 > safe_unpickle.BUDGET_FACTOR * path.stat().st_size + safe_unpickle.BUDGET_SLACK
  out = safe_unpickle.load_torch_file(path)
  assert len(out) == 6 and all(x is out[0] for x in out)
  assert out[0].shape == (n,) and np.all(out[0] == 2.5) and out[0].flags.c_contiguous


def test_cli_prints_one_error_line_and_exits_2(tmp_path, capsys):
  """Hostile snapshots and an --out that is, or lies under, a file: `error: ...`, status 2."""
  from uni_instruct_jax.convert import __main__ as cli  # pylint: disable=g-import-not-at-top
  files = {'o8.pkl': _pickle_cases()['dtype_O8_build_scalar'],
           'cycle.pkl': edm_snapshot(EMPTY_DICT + put(9) + s('self') + get(9) + b's'),
           'blocks.pkl': edm_snapshot(dict(_GOOD_KWARGS, num_blocks=3000)),
           'negative.pkl': edm_snapshot(dict(_GOOD_KWARGS, img_resolution=-16))}
  for name, data in files.items():
    (tmp_path / name).write_bytes(data)
    assert cli.convert(str(tmp_path / name), str(tmp_path / 'out')) == 2, name
    err = capsys.readouterr().err
    assert err.startswith(f'error: {tmp_path / name}: ') and err.count('\n') == 1, err
  (tmp_path / 'file').write_text('x')
  good = SHARED / _FIXTURES['edm']
  for out in (tmp_path / 'file', tmp_path / 'file' / 'sub' / 'dir'):
    assert cli.convert(str(good), str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: --out={out}: ') and err.count('\n') == 1, err
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*files, 'file'])


if __name__ == '__main__':
  _run(sys.argv[1])
