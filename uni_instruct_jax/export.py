"""Exports a trained student as a PyTorch state dict that EDM's and SiD's code load (no torch needed).

  python -m uni_instruct_jax.export --workdir=W --out=student.pt [--which=ema|best] [--fake_score]
      [--reference=N]

writes
  student.pt    the EMA generator of W's latest checkpoint (`--which=best`: of W/checkpoints-best)
                as the state dict of EDM's preconditioner: EDM's parameter names, torch layouts
                (conv OIHW, linear [out, in]), float32, in the zip format of `torch.save` that
                `torch.load(..., weights_only=True)` accepts;
  student.json  {"class_name": "EDMPrecond" | "VPPrecond" | "VEPrecond", "kwargs": the constructor
                kwargs, "sigma_init": the generator's input noise level, "source": the checkpoint};
  --fake_score adds student-fake_score.pt / .json, the fake score network of the same checkpoint;
  --reference=N adds student-reference.npz: x = sigma_init z, sigma, class_labels and the JAX
                generator's D(x, sigma) for seeds 0..N-1 (NCHW), to check a torch load against.

With NVlabs/edm (or SiD) on the path, one batch of the one-step student is (SiD's
generate_onestep.py: x = D(sigma_init z, sigma_init)):

  meta = json.load(open('student.json'))
  net = getattr(training.networks, meta['class_name'])(**meta['kwargs']).eval().cuda()
  net.load_state_dict(torch.load('student.pt', weights_only=True))
  z = torch.randn([64, net.img_channels, net.img_resolution, net.img_resolution]).cuda()
  images = net(meta['sigma_init'] * z, torch.full([64], meta['sigma_init']).cuda(), labels)

The file layout follows torch's writer (caffe2/serialize/inline_container.cc and
torch/serialization.py `_save`): zip records `archive/data.pkl` (pickle protocol 2),
`archive/.format_version`, `archive/.storage_alignment`, `archive/byteorder`, `archive/data/<k>`
(raw little-endian storages, numbered in pickle order), `archive/version`,
`archive/.data/serialization_id`; stored uncompressed, every record's data starting on a 64-byte
boundary (an 'FB' zip extra field pads the local header) and followed by a data descriptor, as
torch's miniz writer lays them out (torch computes storage offsets from that layout when
`.format_version` is present). The pickle is written opcode by opcode
and uses only what torch's weights_only unpickler allows: GLOBALs `collections.OrderedDict`,
`torch._utils._rebuild_tensor_v2` and `torch.<Type>Storage`, storages as BINPERSID of
('storage', storage_type, key, 'cpu', numel).

Bad input prints one `error: ...` line on stderr and exits with status 2.
"""

import collections
import dataclasses
import hashlib
import json
import os
import pathlib
import pickle
import struct
import zipfile
import zlib
from typing import Any, Dict, Mapping, Optional, Tuple

from absl import app
from absl import flags
from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from uni_instruct_jax import cli as cli_lib
from uni_instruct_jax import image_folder
from uni_instruct_jax import networks
from uni_instruct_jax import builders
from uni_instruct_jax import train_state as ts

ARCHIVE = 'archive'
ALIGNMENT = 64                 # torch's kFieldAlignment: data records start on this boundary.
FILE_FORMAT_VERSION = '3'      # kProducedFileFormatVersion of torch.save archives.
REBUILD_TENSOR = ('torch._utils', '_rebuild_tensor_v2')
ORDERED_DICT = ('collections', 'OrderedDict')
# numpy dtype -> torch legacy storage class name (the storage type torch.save pickles).
STORAGE_NAMES = {np.dtype(k): v for k, v in (
    ('float64', 'DoubleStorage'), ('float32', 'FloatStorage'), ('float16', 'HalfStorage'),
    ('int64', 'LongStorage'), ('int32', 'IntStorage'), ('int16', 'ShortStorage'),
    ('int8', 'CharStorage'), ('uint8', 'ByteStorage'), ('bool', 'BoolStorage'))}
# Preconditioner fields written to the JSON even when they equal the class default.
_ALWAYS_WRITTEN = ('img_resolution', 'img_channels', 'label_dim', 'model_type')
_NOT_CONSTRUCTOR_ARGS = ('parent', 'name', 'model_kwargs', 'dtype', 'attn_implementation',
                         'remat')
_CHECKPOINT_DIRS = {'ema': 'checkpoints', 'best': 'checkpoints-best'}


class ExportError(ValueError):
  """A workdir, checkpoint or output path that cannot be exported."""


# ------------------------------------------------------------------------------------------------
# torch.save's zip format


class _PickleWriter:
  """Emits pickle protocol-2 opcodes for a flat {name: tensor} OrderedDict."""

  def __init__(self):
    self.out = bytearray(pickle.PROTO + bytes([2]))

  def global_(self, module: str, name: str) -> None:
    self.out += pickle.GLOBAL + f'{module}\n{name}\n'.encode('ascii')

  def string(self, text: str) -> None:
    data = text.encode('utf-8')
    self.out += pickle.BINUNICODE + struct.pack('<I', len(data)) + data

  def int_(self, value: int) -> None:
    if 0 <= value < 1 << 8:
      self.out += pickle.BININT1 + struct.pack('<B', value)
    elif 0 <= value < 1 << 16:
      self.out += pickle.BININT2 + struct.pack('<H', value)
    elif -(1 << 31) <= value < 1 << 31:
      self.out += pickle.BININT + struct.pack('<i', value)
    else:
      data = value.to_bytes((value.bit_length() + 8) // 8, 'little', signed=True)
      self.out += pickle.LONG1 + bytes([len(data)]) + data

  def int_tuple(self, values: Tuple[int, ...]) -> None:
    self.out += pickle.MARK
    for v in values:
      self.int_(v)
    self.out += pickle.TUPLE

  def ordered_dict(self) -> None:
    self.global_(*ORDERED_DICT)
    self.out += pickle.EMPTY_TUPLE + pickle.REDUCE

  def tensor(self, key: str, array: np.ndarray) -> None:
    """_rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict()) of a C-contiguous array."""
    # torch's contiguous strides: products of the later sizes, a size 0 counting as 1.
    strides = tuple(int(np.prod([max(n, 1) for n in array.shape[i + 1:]]))
                    for i in range(array.ndim))
    self.global_(*REBUILD_TENSOR)
    self.out += pickle.MARK
    self.out += pickle.MARK                                   # the storage's persistent id
    self.string('storage')
    self.global_('torch', STORAGE_NAMES[array.dtype])
    self.string(key)
    self.string('cpu')
    self.int_(array.size)
    self.out += pickle.TUPLE + pickle.BINPERSID
    self.int_(0)
    self.int_tuple(tuple(int(n) for n in array.shape))
    self.int_tuple(strides)
    self.out += pickle.NEWFALSE
    self.ordered_dict()
    self.out += pickle.TUPLE + pickle.REDUCE

  def state_dict(self, arrays: Mapping[str, np.ndarray]) -> bytes:
    """OrderedDict([(name, tensor), ...]); tensor i uses storage key str(i)."""
    self.ordered_dict()
    items = list(arrays.items())
    for start in range(0, len(items), 1000):                  # SETITEMS batches as pickle does
      self.out += pickle.MARK
      for i, (name, array) in enumerate(items[start:start + 1000], start):
        self.string(name)
        self.tensor(str(i), array)
      self.out += pickle.SETITEMS
    return bytes(self.out + pickle.STOP)


class _WriteOnly:
  """A file without seek/tell: zipfile then writes each record as torch's miniz writer does, local
  header without sizes (flag bit 3), data, 16-byte data descriptor."""

  def __init__(self, f):
    self._f = f

  def write(self, data) -> int:
    return self._f.write(data)

  def flush(self) -> None:
    self._f.flush()


def _write_record(archive: zipfile.ZipFile, name: str, data) -> int:
  """Writes one stored record whose data starts on a 64-byte boundary; returns its CRC-32."""
  data = memoryview(data)
  full_name = f'{ARCHIVE}/{name}'
  info = zipfile.ZipInfo(full_name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  info.file_size = len(data)
  zip64 = info.file_size * 1.05 > zipfile.ZIP64_LIMIT        # zipfile's own rule for open('w')
  header = 30 + len(full_name.encode('ascii')) + 4 + (20 if zip64 else 0)
  padding = -(archive.fp.tell() + header) % ALIGNMENT
  info.extra = b'FB' + struct.pack('<H', padding) + b'Z' * padding
  with archive.open(info, 'w', force_zip64=zip64) as f:
    f.write(data)
  return zlib.crc32(data)


def write_torch_state_dict(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray]) -> None:
  """Writes {name: array} as `torch.save(OrderedDict of CPU tensors, path)` would (zip format).

  Arrays are stored C-contiguous, little-endian, with their dtype (see STORAGE_NAMES). The file is
  written to a temporary name and renamed, so an interrupted export leaves no partial `path`.
  """
  arrays = collections.OrderedDict()
  for name, value in state_dict.items():
    array = np.asarray(value)
    if array.dtype not in STORAGE_NAMES:
      raise ExportError(f'{name}: dtype {array.dtype} has no torch storage type')
    arrays[name] = array.astype(array.dtype.newbyteorder('<'), order='C', copy=False)
  data_pkl = _PickleWriter().state_dict(arrays)
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + '.tmp')
  names, crcs = [], []
  storages = [(f'data/{i}', a.reshape(-1).view(np.uint8)) for i, a in enumerate(arrays.values())]
  # '.format_version' 1 tells torch it may compute storage offsets from miniz's layout (fake-tensor
  # and mmap loads); zipfile's matches it while no record or offset needs zip64 and no storage is
  # empty (miniz writes no data descriptor after an empty record). Otherwise torch reads headers.
  size = len(data_pkl) + sum(a.nbytes for a in arrays.values()) + 256 * (len(arrays) + 8)
  miniz_layout = size * 1.05 < zipfile.ZIP64_LIMIT and all(a.size for a in arrays.values())
  format_version = [('.format_version', b'1')] if miniz_layout else []
  records = [('data.pkl', data_pkl), *format_version,
             ('.storage_alignment', str(ALIGNMENT).encode()), ('byteorder', b'little'),
             *storages, ('version', f'{FILE_FORMAT_VERSION}\n'.encode())]
  with open(tmp, 'wb') as f, zipfile.ZipFile(_WriteOnly(f), 'w', zipfile.ZIP_STORED,
                                             allowZip64=True) as archive:
    for name, data in records:
      names.append(name)
      crcs.append(_write_record(archive, name, data))
    # torch writes 20 digits of a hash of the record names and 20 of their combined CRC-32s.
    name_hash = int.from_bytes(hashlib.sha256('\n'.join(names).encode()).digest()[:8], 'little')
    crc_hash = int.from_bytes(hashlib.sha256(struct.pack(f'<{len(crcs)}I', *crcs)).digest()[:8],
                              'little')
    _write_record(archive, '.data/serialization_id', f'{name_hash:020d}{crc_hash:020d}'.encode())
  tmp.replace(path)


# ------------------------------------------------------------------------------------------------
# Flax variables -> EDM state dict and constructor kwargs


def flax_path_to_torch_key(path: Tuple[str, ...]) -> str:
  """Inverse of `networks.torch_key_to_flax_path` (checked by running that function back).

  ('params', 'model', 'enc_16x16_block0', 'conv0', 'kernel') -> 'model.enc.16x16_block0.conv0.weight'.
  """
  collection, *modules, leaf = path
  names = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
           ('params', 'bias'): 'bias', ('buffers', 'freqs'): 'freqs'}
  if (collection, leaf) not in names or not modules:
    raise ExportError(f'variable {"/".join(path)} has no EDM state-dict name')
  segments = [m.replace('_', '.', 1) if m.startswith(('enc_', 'dec_')) else m for m in modules]
  key = '.'.join(segments + [names[(collection, leaf)]])
  if networks.torch_key_to_flax_path(key) != tuple(path):
    raise ExportError(f'variable {"/".join(path)} has no unambiguous EDM state-dict name')
  return key


def flax_value_to_torch(key: str, value: np.ndarray) -> np.ndarray:
  """Inverse of `networks.torch_value_to_flax`: HWIO -> OIHW, [in, out] -> [out, in]."""
  value = np.asarray(value)
  if key.rsplit('.', 1)[-1] == 'weight':
    if value.ndim == 4:
      return value.transpose(3, 2, 0, 1)
    if value.ndim == 2:
      return value.T
  return value


def torch_state_dict(model: Any, variables: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """EDM state dict {key: float32 array} of a Flax preconditioner's variables.

  Args:
    model: a `networks.Precond`.
    variables: {'params': ..., ['buffers': ...]} (jax or numpy leaves).
  Returns:
    Every parameter and persistent buffer EDM's `state_dict()` holds, the config's
    `resample_filter` buffers included, in torch layouts.
  """
  out = {}
  for path, value in traverse_util.flatten_dict(dict(variables)).items():
    key = flax_path_to_torch_key(path)
    out[key] = np.ascontiguousarray(flax_value_to_torch(key, np.asarray(value, np.float32)))
  for key, value in networks.resample_filters(model).items():
    out[key] = np.asarray(value, np.float32)
  return dict(sorted(out.items()))


def _json_value(value: Any) -> Any:
  return [_json_value(v) for v in value] if isinstance(value, (list, tuple)) else value


def edm_constructor(model: Any) -> Tuple[str, Dict[str, Any]]:
  """(class name, kwargs) such that EDM's `<class name>(**kwargs)` is `model`'s network.

  kwargs: image size, label_dim, model_type, the preconditioner constants that differ from EDM's
  defaults (e.g. VPPrecond's beta_d) and every UNet kwarg; lists for tuples.
  """
  kwargs = {}
  for field in dataclasses.fields(type(model)):
    if field.name in _NOT_CONSTRUCTOR_ARGS:
      continue
    value = getattr(model, field.name)
    if field.name in _ALWAYS_WRITTEN or value != field.default:
      kwargs[field.name] = _json_value(value)
  kwargs.update({k: _json_value(v) for k, v in model.model_kwargs})
  return type(model).__name__, kwargs


# ------------------------------------------------------------------------------------------------
# Workdir -> files


def _load_config(workdir: pathlib.Path):
  path = workdir / 'config.json'
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except FileNotFoundError:
    raise ExportError(f'{workdir} is not a training workdir (no config.json)') from None
  except (ValueError, UnicodeDecodeError) as e:
    raise ExportError(f'{path}: unreadable ({str(e).splitlines()[0]})') from None


def restore_params(workdir: str | os.PathLike, which: str = 'ema', fake_score: bool = False
                   ) -> Tuple[int, Dict[str, Any]]:
  """(step, {'ema_params': tree[, 'fake_params': tree]}) of W's latest (or best) checkpoint.

  Only these subtrees are read (numpy arrays on the host); optimizer states stay on disk.
  """
  if which not in _CHECKPOINT_DIRS:
    raise ExportError(f'--which must be one of {sorted(_CHECKPOINT_DIRS)}, got {which!r}')
  directory = pathlib.Path(workdir).resolve() / _CHECKPOINT_DIRS[which]
  steps = sorted(int(p.name) for p in directory.glob('*') if p.name.isdigit()
                 and (p / 'state').is_dir()) if directory.is_dir() else []
  if not steps:
    hint = ' (written only when config.eval.every_ticks > 0)' if which == 'best' else ''
    raise ExportError(f'no checkpoint in {directory}{hint}')
  path = directory / str(steps[-1]) / 'state'
  names = ['ema_params'] + (['fake_params'] if fake_score else [])
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      tree = checkpointer.metadata(path).item_metadata.tree
      wanted = {name: tree[name] for name in names}
      params = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
          item=jax.tree.map(lambda m: np.empty(m.shape, m.dtype), wanted),
          restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted),
          partial_restore=True))
  except (KeyError, ValueError, TypeError, OSError, AttributeError) as e:
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    raise ExportError(f'cannot read {path}: {first}') from None
  return steps[-1], params


def sibling(out: pathlib.Path, tag: str = '', suffix: Optional[str] = None) -> pathlib.Path:
  """out with '-tag' added to its stem and/or its suffix replaced (student.pt -> student.json)."""
  return out.with_name(f'{out.stem}{"-" + tag if tag else ""}{suffix or out.suffix}')


def reference_batch(model: Any, variables: Mapping[str, Any], num: int, sigma_init: float
                    ) -> Dict[str, np.ndarray]:
  """One-step outputs of the generator for seeds 0..num-1, to check a PyTorch load against.

  Returns {x, sigma, class_labels, denoised} in EDM's layouts (NCHW; one-hot labels [num, 0] when
  unconditional): x = sigma_init z, sigma [num], denoised = D(x, sigma) computed in float32, with
  z and the classes of `image_folder.seed_inputs` (the latents `--mode=sample` uses per seed).
  """
  shape = (model.img_resolution, model.img_resolution, model.img_channels)
  z, classes = image_folder.seed_inputs(range(num), shape, model.label_dim)
  labels = np.zeros((num, 0), np.float32) if classes is None else np.eye(
      model.label_dim, dtype=np.float32)[np.asarray(classes)]
  x = sigma_init * np.asarray(z)
  sigma = np.full((num,), sigma_init, np.float32)
  denoised = jax.jit(model.clone(dtype=jnp.float32).apply)(
      dict(variables), x, sigma, labels if model.label_dim else None)
  nchw = lambda a: np.ascontiguousarray(np.transpose(np.asarray(a, np.float32), (0, 3, 1, 2)))
  return {'x': nchw(x), 'sigma': sigma, 'class_labels': labels, 'denoised': nchw(denoised)}


def export(workdir: str | os.PathLike, out: str | os.PathLike, which: str = 'ema',
           fake_score: bool = False, reference: int = 0) -> list[pathlib.Path]:
  """Writes the EMA generator (and the fake score) of `workdir` as EDM state-dict files.

  Returns the written paths: out, out.json[, out-fake_score.pt, out-fake_score.json]
  [, out-reference.npz: `reference_batch` of `reference` samples, when reference > 0].
  Raises ExportError (or builders.SetupError for an unloadable teacher) on bad input.
  """
  workdir, out = pathlib.Path(workdir), pathlib.Path(out)
  config = _load_config(workdir)
  if config.teacher.source == 'toy':
    raise ExportError('the toy run has no EDM network to export (teacher.source is "toy")')
  if config.get('generator', {}).get('network', ''):
    raise ExportError(f'the generator is a {config.generator.network!r} network, not an EDM '
                      'denoiser: only EDM-architecture generators export to EDM state dicts')
  if not out.parent.is_dir():
    raise ExportError(f'--out directory {out.parent} does not exist')
  if out.suffix == '.json':
    raise ExportError(f'--out {out} must not end in .json (the kwargs go to {out.stem}.json)')
  step, params = restore_params(workdir, which, fake_score)
  nets, frozen, _ = builders.build_image_nets(config)  # the architecture and the frozen buffers
  model = nets.gen
  class_name, kwargs = edm_constructor(model)
  buffers = {'buffers': frozen['buffers']} if frozen['buffers'] else {}
  written = []
  for name, tag in (('ema_params', ''), ('fake_params', 'fake_score')):
    if name not in params:
      continue
    state_dict = torch_state_dict(model, {'params': params[name], **buffers})
    path = sibling(out, tag)
    write_torch_state_dict(path, state_dict)
    meta = {'class_name': class_name, 'kwargs': kwargs,
            'sigma_init': float(config.training.sigma_init),
            'network': 'fake_score' if tag else 'generator', 'state_dict': path.name,
            'params_sha256': ts.params_sha256(params[name]),
            'source': {'workdir': str(workdir.resolve()), 'checkpoints': _CHECKPOINT_DIRS[which],
                       'step': step, 'kimg': step * config.training.batch_size / 1000}}
    meta_path = sibling(path, suffix='.json')
    meta_path.write_text(json.dumps(meta, indent=2) + '\n')
    written += [path, meta_path]
  if reference > 0:
    path = sibling(out, 'reference', '.npz')
    np.savez(path, **reference_batch(model, {'params': params['ema_params'], **buffers},
                                     reference, float(config.training.sigma_init)))
    written.append(path)
  return written


def cli(workdir: Optional[str], out: Optional[str], which: str = 'ema',
        fake_score: bool = False, reference: int = 0) -> None:
  """Runs the export; bad input ends the process via `cli.fail` (one error line, status 2)."""
  try:
    if not workdir or not out:
      raise ExportError('both --workdir and --out are required')
    paths = export(workdir, out, which, fake_score, reference)
  except (ExportError, builders.SetupError) as e:
    cli_lib.fail(str(e))
  print('wrote ' + ', '.join(str(p) for p in paths))


if __name__ == '__main__':
  # Flags are defined here, not at import, so that importing this module adds no global flags.
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (config.json, checkpoints/).')
  _OUT = flags.DEFINE_string('out', None, 'Output state-dict file, e.g. student.pt.')
  _WHICH = flags.DEFINE_enum('which', 'ema', sorted(_CHECKPOINT_DIRS),
                             'ema: EMA generator of the latest checkpoint; best: that of '
                             'checkpoints-best (the best FID during training).')
  _FAKE_SCORE = flags.DEFINE_bool('fake_score', False, 'Also write OUT-fake_score.pt and .json.')
  _REFERENCE = flags.DEFINE_integer('reference', 0, 'Also write OUT-reference.npz: the JAX '
                                    "generator's outputs for seeds 0..N-1, to check a torch load.")

  def _main(argv):
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.ERROR)  # orbax warns about every metadata file it looks for
    if len(argv) > 1:
      cli_lib.fail(f'unexpected arguments {argv[1:]}')
    cli(_WORKDIR.value, _OUT.value, _WHICH.value, _FAKE_SCORE.value, _REFERENCE.value)

  app.run(_main, flags_parser=cli_lib.parse_flags)
