"""Torch-free, code-execution-free reading of EDM pickles and `torch.save` files.

Every pickle is read by a `pickle.Unpickler` whose `find_class` resolves only an explicit
allow-list of globals, each mapped to a plain-data stand-in written here:

* `torch_utils.persistence._reconstruct_persistent_obj` -> `PersistentObject` (class name,
  version, state; the embedded `module_src` is kept as a string and never executed);
* `torch.nn.modules.container.ModuleDict` -> `TorchModuleDict`, `collections.OrderedDict`;
* `torch._utils._rebuild_tensor{,_v2}`, `_rebuild_parameter` -> numpy arrays (strided views over
  the storage, bounds-checked, copied to contiguous native-endian arrays once loading ends);
* `torch.storage._load_from_bytes` -> a legacy `torch.save` stream parsed by a second unpickler
  that allows only `torch.<Type>Storage` names;
* `torch.<Type>Storage` -> `StorageType`; `numpy.dtype` and `numpy.{core,_core}.multiarray.scalar`.

Anything else raises `UnsafePickleError` at the moment the pickle names it, before any call runs.
Malformed input raises `CheckpointFormatError`. Both are `ValueError`s whose one-line message
starts with the file path.
"""

import collections
import dataclasses
import hashlib
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, Callable

import ml_dtypes
import numpy as np

try:  # NumPy >= 2.
  from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:  # NumPy 1.x.
  from numpy.core.multiarray import scalar as _numpy_scalar

_TORCH_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_PROTOCOL = 1001
_ZIP_MAGIC = b'PK\x03\x04'


class UnsafePickleError(ValueError):
  """A pickle names a global outside the allow-list (nothing it names has run)."""


class CheckpointFormatError(ValueError):
  """A file is missing, truncated, not a pickle, or does not have the expected structure."""


@dataclasses.dataclass(frozen=True)
class StorageType:
  """Stand-in for a `torch.<name>` storage class: its element dtype."""
  name: str
  dtype: np.dtype


_STORAGE_TYPES = {
    name: StorageType(name, np.dtype(dtype)) for name, dtype in (
        ('DoubleStorage', np.float64), ('FloatStorage', np.float32),
        ('HalfStorage', np.float16), ('BFloat16Storage', ml_dtypes.bfloat16),
        ('LongStorage', np.int64), ('IntStorage', np.int32), ('ShortStorage', np.int16),
        ('CharStorage', np.int8), ('ByteStorage', np.uint8), ('BoolStorage', np.bool_))
}


class _Storage:
  """A torch storage: a flat numpy array (filled in place for the legacy format)."""

  def __init__(self, array: np.ndarray):
    self.array = array


@dataclasses.dataclass
class PersistentObject:
  """An EDM `torch_utils.persistence` object, recorded as data; its source is never run.

  Attributes:
    class_name: e.g. 'EDMPrecond'.
    version: the persistence format version (6 for every EDM release).
    module_src: the embedded source of the defining module, as an inert string.
    state: the object's pickled `__dict__`.
  """
  class_name: str
  version: int
  module_src: str = dataclasses.field(repr=False)
  state: dict

  @property
  def module_src_sha256(self) -> str:
    return hashlib.sha256(self.module_src.encode('utf-8')).hexdigest()


class TorchModuleDict:
  """Stand-in for a pickled `torch.nn.ModuleDict`; `state` holds its `__dict__`."""

  def __setstate__(self, state: Any) -> None:
    if not isinstance(state, dict):
      raise CheckpointFormatError(f'ModuleDict state is {type(state).__name__}, expected dict')
    self.state = state

  def __getstate__(self) -> dict:
    return self.state


def _reconstruct_persistent_obj(meta: Any) -> PersistentObject:
  """Records EDM's persistent-object metadata instead of exec'ing `meta['module_src']`."""
  if not isinstance(meta, dict) or meta.get('type') != 'class':
    raise CheckpointFormatError('persistent object metadata is not a dict with type "class"')
  fields = dict(class_name=str, version=int, module_src=str, state=dict)
  for key, kind in fields.items():
    if not isinstance(meta.get(key), kind):
      raise CheckpointFormatError(f'persistent object metadata field {key!r} is missing or not '
                                  f'a {kind.__name__}')
  return PersistentObject(**{key: meta[key] for key in fields})


def _tensor_view(storage: Any, offset: Any, size: Any, stride: Any) -> np.ndarray:
  """Read-only strided view [*size] of `storage` (offset and strides in elements)."""
  if not isinstance(storage, _Storage):
    raise CheckpointFormatError(f'tensor storage is {type(storage).__name__}, not a storage')
  size, stride = tuple(size), tuple(stride)
  if not (isinstance(offset, int) and offset >= 0 and len(size) == len(stride) and
          all(isinstance(v, int) and v >= 0 for v in size + stride)):
    raise CheckpointFormatError(f'bad tensor geometry offset={offset!r} size={size!r} '
                                f'stride={stride!r}')
  array = storage.array
  if 0 in size:
    return np.zeros(size, array.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= array.size:
    raise CheckpointFormatError(f'tensor of size {size}, stride {stride}, offset {offset} '
                                f'exceeds its storage of {array.size} elements')
  return np.lib.stride_tricks.as_strided(
      array[offset:], shape=size, strides=[s * array.itemsize for s in stride], writeable=False)


def _rebuild_tensor(storage, storage_offset, size, stride):
  """`torch._utils._rebuild_tensor` (torch < 1.0 files)."""
  return _tensor_view(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  """`torch._utils._rebuild_tensor_v2`; gradients, hooks and metadata are dropped."""
  del requires_grad, backward_hooks, metadata
  return _tensor_view(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  """`torch._utils._rebuild_parameter`: a parameter is its data."""
  del requires_grad, backward_hooks
  if not isinstance(data, np.ndarray):
    raise CheckpointFormatError(f'parameter data is {type(data).__name__}, not a tensor')
  return data


def _load_from_bytes(payload: Any) -> _Storage:
  """`torch.storage._load_from_bytes`: a legacy `torch.save` of a single storage."""
  if not isinstance(payload, bytes):
    raise CheckpointFormatError(f'storage payload is {type(payload).__name__}, not bytes')
  storage = _read_legacy(io.BytesIO(payload), len(payload), _STORAGE_GLOBALS)
  if not isinstance(storage, _Storage):
    raise CheckpointFormatError(f'storage payload holds a {type(storage).__name__}')
  return storage


_STORAGE_GLOBALS = {('torch', name): stype for name, stype in _STORAGE_TYPES.items()}

SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    **_STORAGE_GLOBALS,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_persistent_obj,
    ('torch.nn.modules.container', 'ModuleDict'): TorchModuleDict,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch.storage', '_load_from_bytes'): _load_from_bytes,
    ('numpy', 'dtype'): np.dtype,
    ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler resolving only `allowed` globals; persistent ids go to `persistent`."""

  def __init__(self, file: BinaryIO, allowed: dict, persistent: Callable | None = None):
    super().__init__(file)
    self._allowed = allowed
    self._persistent = persistent

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self._allowed[(module, name)]
    except KeyError:
      raise UnsafePickleError(f'global {module}.{name} is not in the allow-list') from None

  def persistent_load(self, pid: Any) -> Any:
    if self._persistent is None:
      raise CheckpointFormatError(f'unexpected persistent id {str(pid)[:80]}')
    return self._persistent(pid)


def _storage_pid(pid: Any) -> tuple[StorageType, str, int, Any]:
  """Validates ('storage', StorageType, key, location, numel[, view]) -> type, key, numel, view."""
  if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == 'storage' and
          isinstance(pid[1], StorageType) and isinstance(pid[2], str) and
          isinstance(pid[4], int) and pid[4] >= 0):
    raise CheckpointFormatError(f'bad storage persistent id {str(pid)[:80]}')
  return pid[1], pid[2], pid[4], pid[5] if len(pid) == 6 else None


def _read_legacy(f: BinaryIO, nbytes: int, allowed: dict) -> Any:
  """Reads a legacy (non-zip) `torch.save` stream of `nbytes` bytes."""
  if _RestrictedUnpickler(f, {}).load() != _TORCH_MAGIC:
    raise CheckpointFormatError('not a torch.save file (bad magic number)')
  if _RestrictedUnpickler(f, {}).load() != _TORCH_PROTOCOL:
    raise CheckpointFormatError('unsupported torch.save protocol version')
  sys_info = _RestrictedUnpickler(f, {}).load()
  if not isinstance(sys_info, dict):
    raise CheckpointFormatError('torch.save sys_info is not a dict')
  order = '<' if sys_info.get('little_endian', True) else '>'
  storages: dict[str, _Storage] = {}

  def persistent(pid):
    stype, key, numel, view = _storage_pid(pid)
    if key not in storages:
      if numel * stype.dtype.itemsize > nbytes:
        raise CheckpointFormatError(f'storage {key} of {numel} elements exceeds the file size')
      storages[key] = _Storage(np.zeros(numel, stype.dtype.newbyteorder(order)))
    root = storages[key]
    if view is None:
      return root
    _, offset, view_numel = view
    if not (isinstance(offset, int) and isinstance(view_numel, int) and offset >= 0 and
            view_numel >= 0 and offset + view_numel <= root.array.size):
      raise CheckpointFormatError(f'bad storage view {str(view)[:80]}')
    return _Storage(root.array[offset:offset + view_numel])

  obj = _RestrictedUnpickler(f, allowed, persistent).load()
  keys = _RestrictedUnpickler(f, {}).load()
  if not (isinstance(keys, list) and sorted(keys) == sorted(storages)):
    raise CheckpointFormatError('storage key list does not match the storages referenced')
  for key in keys:
    array = storages[key].array
    header = f.read(8)
    if len(header) != 8:
      raise CheckpointFormatError(f'truncated before the data of storage {key}')
    (numel,) = struct.unpack(order + 'q', header)
    if numel != array.size:
      raise CheckpointFormatError(f'storage {key} has {numel} elements, expected {array.size}')
    data = f.read(array.nbytes)
    if len(data) != array.nbytes:
      raise CheckpointFormatError(f'truncated inside the data of storage {key}')
    array[...] = np.frombuffer(data, array.dtype)
  return obj


def _read_zip(path: str) -> Any:
  """Reads a zip-archive `torch.save` file (`<name>/data.pkl`, `<name>/data/<key>`)."""
  with zipfile.ZipFile(path) as archive:
    names = set(archive.namelist())
    pickles = [n for n in names if n.endswith('/data.pkl') and n.count('/') == 1]
    if len(pickles) != 1:
      raise CheckpointFormatError('zip archive has no single <name>/data.pkl record')
    prefix = pickles[0][:-len('data.pkl')]
    byteorder = 'little'
    if prefix + 'byteorder' in names:
      byteorder = archive.read(prefix + 'byteorder').decode('ascii', 'replace').strip()
    if byteorder not in ('little', 'big'):
      raise CheckpointFormatError(f'unknown byteorder record {byteorder[:20]!r}')
    order = '<' if byteorder == 'little' else '>'
    storages: dict[str, _Storage] = {}

    def persistent(pid):
      stype, key, numel, _ = _storage_pid(pid)
      if key not in storages:
        record = f'{prefix}data/{key}'
        if record not in names:
          raise CheckpointFormatError(f'missing storage record {record}')
        dtype = stype.dtype.newbyteorder(order)
        info = archive.getinfo(record)
        if info.compress_type != zipfile.ZIP_STORED:  # torch never compresses; no zip bombs
          raise CheckpointFormatError(f'storage record {record} is compressed')
        if info.file_size != numel * dtype.itemsize:
          raise CheckpointFormatError(f'storage record {record} does not hold {numel} '
                                      f'{stype.name} elements')
        storages[key] = _Storage(np.frombuffer(archive.read(record), dtype))
      return storages[key]

    with archive.open(pickles[0]) as f:
      return _RestrictedUnpickler(f, SAFE_GLOBALS, persistent).load()


def _materialize(obj: Any, seen: set[int]) -> Any:
  """Replaces tensor views and storages in `obj` by contiguous, native-endian copies."""
  if isinstance(obj, _Storage):
    obj = obj.array
  if isinstance(obj, np.ndarray):
    dtype = obj.dtype if obj.dtype.isnative else obj.dtype.newbyteorder('=')
    return obj.astype(dtype, order='C', copy=True)
  if isinstance(obj, tuple):
    return tuple(_materialize(v, seen) for v in obj)
  if id(obj) in seen:
    return obj
  seen.add(id(obj))
  if isinstance(obj, dict):
    for key, value in obj.items():
      obj[key] = _materialize(value, seen)
  elif isinstance(obj, list):
    obj[:] = [_materialize(v, seen) for v in obj]
  elif isinstance(obj, (PersistentObject, TorchModuleDict)):
    _materialize(obj.state, seen)
  return obj


def _one_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else type(error).__name__)[:200]


def _guarded_load(path: str | os.PathLike, reader: Callable[[str], Any]) -> Any:
  """Runs `reader(path)` and turns every failure into a one-line error naming `path`."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointFormatError(f'{path}: no such file')
  try:
    return _materialize(reader(path), set())
  except UnsafePickleError as e:
    raise UnsafePickleError(f'{path}: {_one_line(e)}') from None
  except CheckpointFormatError as e:
    raise CheckpointFormatError(f'{path}: {_one_line(e)}') from None
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
          AttributeError, OverflowError, MemoryError, RecursionError, struct.error,
          zipfile.BadZipFile, UnicodeDecodeError) as e:
    raise CheckpointFormatError(
        f'{path}: not a valid pickle/torch file ({type(e).__name__}: {_one_line(e)})') from None


def _read_pickle(path: str) -> Any:
  with open(path, 'rb') as f:
    return _RestrictedUnpickler(f, SAFE_GLOBALS).load()


def _read_torch(path: str) -> Any:
  with open(path, 'rb') as f:
    is_zip = f.read(4) == _ZIP_MAGIC
    if not is_zip:
      f.seek(0)
      return _read_legacy(f, os.fstat(f.fileno()).st_size, SAFE_GLOBALS)
  return _read_zip(path)


def load_pickle(path: str | os.PathLike) -> Any:
  """Loads a plain pickle (e.g. an EDM snapshot `.pkl`) with the restricted unpickler.

  Tensors come back as numpy arrays, persistent objects as `PersistentObject`s.
  """
  return _guarded_load(path, _read_pickle)


def load_torch_file(path: str | os.PathLike) -> Any:
  """Loads a `torch.save` file (legacy stream or zip archive); tensors become numpy arrays."""
  return _guarded_load(path, _read_torch)


def load_torch_state_dict(path: str | os.PathLike,
                          strip_prefix: str | None = None) -> dict[str, np.ndarray]:
  """Loads a `torch.save`d state dict as a flat {name: array} dict.

  Args:
    path: the file; if it holds a dict with a 'state_dict' entry (as training checkpoints do),
      that entry is used. Nested dicts are flattened with '.'.
    strip_prefix: removed from the start of every key that has it (e.g. 'module.').
  """
  obj = load_torch_file(path)
  if isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict):
    obj = obj['state_dict']
  if not isinstance(obj, dict):
    raise CheckpointFormatError(f'{os.fspath(path)}: holds a {type(obj).__name__}, '
                                'not a state dict')
  flat = {}

  def flatten(tree: dict, prefix: str) -> None:
    for key, value in tree.items():
      name = f'{prefix}{key}'
      if isinstance(value, dict):
        flatten(value, name + '.')
      elif isinstance(value, np.ndarray):
        if strip_prefix and name.startswith(strip_prefix):
          name = name[len(strip_prefix):]
        flat[name] = value
      else:
        raise CheckpointFormatError(f'{os.fspath(path)}: state dict entry {name!r} is a '
                                    f'{type(value).__name__}, not a tensor')

  flatten(obj, '')
  return flat


def sha256_file(path: str | os.PathLike) -> str:
  """Hex sha256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()
