"""Torch-free, code-execution-free reading of EDM pickles and `torch.save` files.

Every pickle is run by `pickle_vm` (a bounded opcode interpreter, not `pickle.Unpickler`). Its
globals resolve, per load, to validating wrappers written here:

* `torch_utils.persistence._reconstruct_persistent_obj` -> `PersistentObject` (class name,
  version, state; the embedded `module_src` is kept as a string and never executed);
* `torch.nn.modules.container.ModuleDict` -> a fresh `TorchModuleDict`; `collections.OrderedDict`
  -> a plain dict (its pickled attributes, e.g. torch's `_metadata`, are checked and dropped);
* `torch._utils._rebuild_tensor{,_v2}`, `_rebuild_parameter` -> numpy arrays (strided views over
  the storage, bounds-checked, copied to contiguous native-endian arrays once loading ends);
* `torch.storage._load_from_bytes` -> a legacy `torch.save` stream run by a second interpreter
  that allows only `torch.<Type>Storage` names;
* `torch.<Type>Storage` -> `StorageType`; `numpy.dtype` -> a placeholder for a plain bool/int/
  float descriptor whose BUILD state must be the canonical one; `numpy.{core,_core}.multiarray.
  scalar` -> a scalar of such a dtype read from exactly `itemsize` bytes; `_codecs.encode` ->
  latin-1 bytes (how protocol 2 spells bytes).

Anything else raises `UnsafePickleError` at the moment the pickle names it, before any call runs.
No module-level object is ever handed to BUILD, so no load can change a later one. Every load has
a memory budget of `BUDGET_FACTOR` x the file size + `BUDGET_SLACK` bytes for the objects,
storages and tensor copies it makes (a tensor referenced many times is copied once); zip members
are size-checked against the archive before they are read. Malformed input raises
`CheckpointFormatError`. Both are `ValueError`s whose one-line message starts with the file path.
"""

import dataclasses
import hashlib
import io
import math
import os
import struct
import zipfile
from typing import Any, Callable

import ml_dtypes
import numpy as np

from uni_instruct_jax.convert import pickle_vm
from uni_instruct_jax.convert.pickle_vm import Allowed
from uni_instruct_jax.convert.pickle_vm import CheckpointFormatError
from uni_instruct_jax.convert.pickle_vm import describe
from uni_instruct_jax.convert.pickle_vm import UnsafePickleError

_TORCH_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_PROTOCOL = 1001
_ZIP_MAGIC = b'PK\x03\x04'
BUDGET_FACTOR = 4
BUDGET_SLACK = 16 << 20
MAX_KEY_CHARS = 1024  # of a flattened state-dict key
_MAX_DIM = 1 << 40  # per tensor dimension, offset and stride (elements)
_MAX_NDIM = 32
# numpy.dtype descriptors a pickle may name (as `np.dtype.__reduce__` spells them).
_SCALAR_DTYPES = ('b1', 'i1', 'i2', 'i4', 'i8', 'u1', 'u2', 'u4', 'u8', 'f2', 'f4', 'f8')
_STORAGE_DTYPES = {
    'DoubleStorage': np.dtype(np.float64), 'FloatStorage': np.dtype(np.float32),
    'HalfStorage': np.dtype(np.float16), 'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype(np.int64), 'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16), 'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8), 'BoolStorage': np.dtype(np.bool_)}
_NUMPY_SCALAR_MODULES = ('numpy.core.multiarray', 'numpy._core.multiarray')


@dataclasses.dataclass(frozen=True)
class StorageType:
  """Stand-in for a `torch.<name>` storage class: its element dtype."""
  name: str
  dtype: np.dtype


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
    return hashlib.sha256(self.module_src.encode('utf-8', 'surrogatepass')).hexdigest()


class TorchModuleDict:
  """Stand-in for a pickled `torch.nn.ModuleDict`; `state` holds its `__dict__`."""

  def __setstate__(self, state: Any) -> None:
    if type(state) is not dict:
      raise CheckpointFormatError(f'ModuleDict state is {type(state).__name__}, expected dict')
    self.state = state

  def __getstate__(self) -> dict:
    return self.state


class NumpyDtype:
  """Placeholder for a pickled `numpy.dtype` of a plain bool/int/float descriptor."""

  def __init__(self, dtype: np.dtype):
    self.dtype = dtype

  def set_state(self, state: Any) -> None:
    """Accepts only `np.dtype.__reduce__`'s canonical state (3, order, None x 3, -1, -1, 0)."""
    orders = ('|',) if self.dtype.itemsize == 1 else ('<', '>', '=')
    if not (type(state) is tuple and len(state) in (8, 9) and state[0] in (3, 4) and
            type(state[1]) is str and state[1] in orders and
            all(v is None for v in state[2:5] + state[8:]) and
            all(type(v) is int for v in state[5:8]) and state[5:8] == (-1, -1, 0)):
      raise UnsafePickleError(f'numpy.dtype({self.dtype.str[1:]!r}) has a non-canonical state')
    self.dtype = self.dtype.newbyteorder(state[1])


def _int(value: Any, what: str, low: int = 0, high: int = _MAX_DIM) -> int:
  if type(value) is not int or not low <= value <= high:
    raise CheckpointFormatError(f'{what} is {describe(value)}, not an int in [{low}, {high}]')
  return value


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
  if type(value) is not tuple or len(value) > _MAX_NDIM:
    raise CheckpointFormatError(f'{what} is {describe(value)}, not a tuple of at most '
                                f'{_MAX_NDIM} ints')
  return tuple(_int(v, what) for v in value)


def _args(args: tuple, name: str, low: int, high: int) -> tuple:
  if not low <= len(args) <= high:
    raise CheckpointFormatError(f'{name} takes {low}..{high} arguments, got {len(args)}')
  return args


def _tensor_view(storage: Any, offset: Any, size: Any, stride: Any) -> np.ndarray:
  """Read-only strided view [*size] of `storage` (offset and strides in elements)."""
  if not isinstance(storage, _Storage):
    raise CheckpointFormatError(f'tensor storage is {describe(storage)}, not a storage')
  offset = _int(offset, 'tensor offset')
  size, stride = _int_tuple(size, 'tensor size'), _int_tuple(stride, 'tensor stride')
  if len(size) != len(stride):
    raise CheckpointFormatError(f'tensor size {size} and stride {stride} differ in length')
  array = storage.array
  if 0 in size:
    return np.zeros(size, array.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= array.size:
    raise CheckpointFormatError(f'tensor of size {size}, stride {stride}, offset {offset} '
                                f'exceeds its storage of {array.size} elements')
  return np.lib.stride_tricks.as_strided(
      array[offset:], shape=size, strides=[s * array.itemsize for s in stride], writeable=False)


def _reconstruct_persistent_obj(meta: Any) -> PersistentObject:
  """Records EDM's persistent-object metadata instead of exec'ing `meta['module_src']`."""
  if type(meta) is not dict or meta.get('type') != 'class':
    raise CheckpointFormatError('persistent object metadata is not a dict with type "class"')
  fields = dict(class_name=str, version=int, module_src=str, state=dict)
  for key, kind in fields.items():
    if type(meta.get(key)) is not kind:
      raise CheckpointFormatError(f'persistent object metadata field {key!r} is missing or not '
                                  f'a {kind.__name__}')
  return PersistentObject(**{key: meta[key] for key in fields})


def _rebuild_parameter(*args) -> np.ndarray:
  """`torch._utils._rebuild_parameter(data, requires_grad, backward_hooks)`: its data."""
  data = _args(args, '_rebuild_parameter', 1, 3)[0]
  if not isinstance(data, np.ndarray):
    raise CheckpointFormatError(f'parameter data is {describe(data)}, not a tensor')
  return data


def _drop_attributes(state: Any) -> None:
  """BUILD state of an OrderedDict: its instance attributes (torch's `_metadata`), dropped."""
  if not (state is None or (type(state) is dict and all(type(k) is str for k in state))):
    raise UnsafePickleError(f'OrderedDict state is {describe(state)}, not an attribute dict')


def _storage_pid(pid: Any) -> tuple[StorageType, str, int, Any]:
  """Validates ('storage', StorageType, key, location, numel[, view]) -> type, key, numel, view."""
  if not (type(pid) is tuple and len(pid) in (5, 6) and pid[0] == 'storage' and
          isinstance(pid[1], StorageType) and type(pid[2]) is str):
    raise CheckpointFormatError(f'bad storage persistent id ({describe(pid)})')
  return pid[1], pid[2], _int(pid[4], 'storage size'), pid[5] if len(pid) == 6 else None


class _TorchLoad(pickle_vm.Load):
  """One load: its budget, BUILD registry and the wrappers that its pickles may call."""

  def __init__(self, budget: pickle_vm.Budget):
    super().__init__(budget)
    rebuild = lambda *a: _tensor_view(*_args(a, '_rebuild_tensor', 4, 7)[:4])
    self.globals = {
        ('collections', 'OrderedDict'): Allowed('OrderedDict', call=self.ordered_dict),
        ('torch_utils.persistence', '_reconstruct_persistent_obj'): Allowed(
            '_reconstruct_persistent_obj', call=_reconstruct_persistent_obj),
        ('torch.nn.modules.container', 'ModuleDict'): Allowed('ModuleDict',
                                                               new=self.module_dict),
        ('torch._utils', '_rebuild_tensor'): Allowed('_rebuild_tensor', call=rebuild),
        ('torch._utils', '_rebuild_tensor_v2'): Allowed('_rebuild_tensor_v2', call=rebuild),
        ('torch._utils', '_rebuild_parameter'): Allowed('_rebuild_parameter',
                                                        call=_rebuild_parameter),
        ('torch.storage', '_load_from_bytes'): Allowed('_load_from_bytes',
                                                       call=self.load_from_bytes),
        ('numpy', 'dtype'): Allowed('numpy.dtype', call=self.numpy_dtype),
        ('_codecs', 'encode'): Allowed('_codecs.encode', call=self.codecs_encode),
        **{(module, 'scalar'): Allowed('numpy scalar', call=self.numpy_scalar)
           for module in _NUMPY_SCALAR_MODULES},
    }

  def resolve(self, module: str, name: str) -> Any:
    """Any allowed global (the outer pickle of every format)."""
    if (module, name) in self.globals:
      return self.globals[(module, name)]
    return self.resolve_storage(module, name)

  def resolve_storage(self, module: str, name: str) -> StorageType:
    """Only `torch.<Type>Storage` (the pickles inside a legacy stream's storage payloads)."""
    if module == 'torch' and name in _STORAGE_DTYPES:
      return StorageType(name, _STORAGE_DTYPES[name])
    raise UnsafePickleError(f'global {module}.{name} is not in the allow-list')

  def ordered_dict(self, *args) -> dict:
    items = _args(args, 'OrderedDict', 0, 1)
    out = self.register({}, _drop_attributes)
    for pair in (items[0] if items else ()):
      if type(pair) not in (list, tuple) or len(pair) != 2:
        raise CheckpointFormatError(f'OrderedDict item is {describe(pair)}, not a pair')
      out[pickle_vm.check_key(pair[0])] = pair[1]
    return out

  def module_dict(self, *args) -> TorchModuleDict:
    _args(args, 'ModuleDict', 0, 0)
    obj = TorchModuleDict()
    return self.register(obj, obj.__setstate__)

  def numpy_dtype(self, *args) -> NumpyDtype:
    descr = _args(args, 'numpy.dtype', 1, 3)[0]
    if type(descr) is not str or descr not in _SCALAR_DTYPES or \
        any(type(flag) is not bool for flag in args[1:]):
      raise UnsafePickleError(f'numpy.dtype({describe(descr)}) is not a plain bool/int/float '
                              'dtype')
    obj = NumpyDtype(np.dtype(descr))
    return self.register(obj, obj.set_state)

  def numpy_scalar(self, *args) -> np.generic:
    dtype, data = _args(args, 'numpy scalar', 2, 2)
    if type(dtype) is not NumpyDtype or type(data) is not bytes or \
        len(data) != dtype.dtype.itemsize or (dtype.dtype.kind == 'b' and data not in b'\x00\x01'):
      raise UnsafePickleError(f'numpy scalar of {describe(dtype)} from {describe(data)}: not a '
                              'plain dtype with exactly its item size of bytes')
    return np.frombuffer(data, dtype.dtype).astype(dtype.dtype.newbyteorder('='))[0]

  def codecs_encode(self, *args) -> bytes:
    text, encoding = _args(args, '_codecs.encode', 2, 2)
    if type(text) is not str or encoding not in ('latin1', 'latin-1'):
      raise UnsafePickleError('_codecs.encode is allowed only as latin-1 encoding of a str')
    self.budget.charge(len(text), 'encoded bytes')
    return text.encode('latin-1')

  def load_from_bytes(self, *args) -> _Storage:
    """`torch.storage._load_from_bytes`: a legacy `torch.save` of a single storage."""
    payload = _args(args, '_load_from_bytes', 1, 1)[0]
    if type(payload) is not bytes:
      raise CheckpointFormatError(f'storage payload is {describe(payload)}, not bytes')
    storage = _read_legacy(self, memoryview(payload), self.resolve_storage)
    if not isinstance(storage, _Storage):
      raise CheckpointFormatError(f'storage payload holds a {describe(storage)}')
    return storage


def _read_legacy(load: _TorchLoad, data: memoryview, resolve: Callable[[str, str], Any]) -> Any:
  """Reads a legacy (non-zip) `torch.save` stream held in `data`."""
  header = []
  pos = 0
  for _ in range(3):
    value, pos = pickle_vm.run(data, pos, load, pickle_vm.no_globals)
    header.append(value)
  if header[0] != _TORCH_MAGIC or type(header[0]) is not int:
    raise CheckpointFormatError('not a torch.save file (bad magic number)')
  if header[1] != _TORCH_PROTOCOL or type(header[1]) is not int:
    raise CheckpointFormatError('unsupported torch.save protocol version')
  if type(header[2]) is not dict:
    raise CheckpointFormatError('torch.save sys_info is not a dict')
  order = '<' if header[2].get('little_endian', True) else '>'
  storages: dict[str, _Storage] = {}
  total = [0]

  def persistent(pid):
    stype, key, numel, view = _storage_pid(pid)
    if key not in storages:
      nbytes = numel * stype.dtype.itemsize
      total[0] += nbytes
      if total[0] > len(data):
        raise CheckpointFormatError(f'storage {key} of {numel} elements takes the storages past '
                                    'the stream size')
      load.budget.charge(nbytes, f'storage {key}')
      storages[key] = _Storage(np.empty(numel, stype.dtype.newbyteorder(order)))
    root = storages[key]
    if view is None:
      return root
    if not (type(view) is tuple and len(view) == 3):
      raise CheckpointFormatError(f'bad storage view ({describe(view)})')
    offset = _int(view[1], 'storage view offset')
    view_numel = _int(view[2], 'storage view size')
    if offset + view_numel > root.array.size:
      raise CheckpointFormatError(f'storage view [{offset}, +{view_numel}) exceeds its storage')
    return _Storage(root.array[offset:offset + view_numel])

  obj, pos = pickle_vm.run(data, pos, load, resolve, persistent)
  keys, pos = pickle_vm.run(data, pos, load, pickle_vm.no_globals)
  if not (type(keys) is list and all(type(k) is str for k in keys) and
          len(keys) == len(storages) and set(keys) == set(storages)):
    raise CheckpointFormatError('storage key list does not match the storages referenced')
  for key in keys:
    array = storages[key].array
    if pos + 8 + array.nbytes > len(data):
      raise CheckpointFormatError(f'truncated inside the data of storage {key}')
    (numel,) = struct.unpack(order + 'q', data[pos:pos + 8])
    if numel != array.size:
      raise CheckpointFormatError(f'storage {key} has {numel} elements, expected {array.size}')
    array[...] = np.frombuffer(data, array.dtype, array.size, pos + 8)
    pos += 8 + array.nbytes
  return obj


def _read_member(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
  """A zip member's bytes, refused before reading if it claims more than `limit` bytes or needs
  a decompressor other than inflate (LZMA's dictionary size is chosen by the file)."""
  info = archive.getinfo(name)
  if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
    raise UnsafePickleError(f'zip member {name} uses compression method {info.compress_type} '
                            '(only stored and deflated are read)')
  if info.file_size > limit:
    raise UnsafePickleError(f'zip member {name} claims {info.file_size} bytes, more than the '
                            f'archive\'s {limit}')
  with archive.open(info) as f:
    data = f.read(info.file_size + 1)
  if len(data) != info.file_size:
    raise CheckpointFormatError(f'zip member {name} does not hold its {info.file_size} bytes')
  return data


def _read_zip(path: str, load: _TorchLoad) -> Any:
  """Reads a zip-archive `torch.save` file (`<name>/data.pkl`, `<name>/data/<key>`)."""
  limit = os.path.getsize(path)
  with zipfile.ZipFile(path) as archive:
    names = set(archive.namelist())
    pickles = [n for n in names if n.endswith('/data.pkl') and n.count('/') == 1]
    if len(pickles) != 1:
      raise CheckpointFormatError('zip archive has no single <name>/data.pkl record')
    prefix = pickles[0][:-len('data.pkl')]
    byteorder = 'little'
    if prefix + 'byteorder' in names:
      byteorder = _read_member(archive, prefix + 'byteorder', 16).decode('ascii', 'replace')
    if byteorder.strip() not in ('little', 'big'):
      raise CheckpointFormatError(f'unknown byteorder record {byteorder[:20]!r}')
    order = '<' if byteorder.strip() == 'little' else '>'
    storages: dict[str, _Storage] = {}

    def persistent(pid):
      stype, key, numel, _ = _storage_pid(pid)
      if key not in storages:
        record = f'{prefix}data/{key}'
        if record not in names:
          raise CheckpointFormatError(f'missing storage record {record}')
        info = archive.getinfo(record)
        if info.compress_type != zipfile.ZIP_STORED:  # torch never compresses tensor data
          raise CheckpointFormatError(f'storage record {record} is compressed')
        if info.file_size != numel * stype.dtype.itemsize:
          raise CheckpointFormatError(f'storage record {record} does not hold {numel} '
                                      f'{stype.name} elements')
        load.budget.charge(info.file_size, f'storage record {record}')
        storages[key] = _Storage(np.frombuffer(_read_member(archive, record, limit),
                                               stype.dtype.newbyteorder(order)))
      return storages[key]

    data = _read_member(archive, pickles[0], limit)
    load.budget.charge(len(data), 'the data.pkl record')
    obj, end = pickle_vm.run(memoryview(data), 0, load, load.resolve, persistent)
    if end != len(data):
      raise CheckpointFormatError('data.pkl has bytes after its pickle')
    return obj


def _read_npz(path: str, load: _TorchLoad) -> dict[str, np.ndarray]:
  """Reads an `.npz` of plain bool/int/float arrays, checking every size before reading it."""
  limit = os.path.getsize(path)
  out = {}
  with zipfile.ZipFile(path) as archive:
    for name in archive.namelist():
      if not name.endswith('.npy'):
        raise CheckpointFormatError(f'npz member {name} is not an .npy record')
      data = _read_member(archive, name, limit)
      load.budget.charge(len(data), f'npz member {name}')
      f = io.BytesIO(data)
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                     np.lib.format.read_array_header_2_0)
      shape, fortran, dtype = read_header(f)
      if dtype.kind not in 'biuf' or dtype.fields is not None or dtype.subdtype is not None:
        raise UnsafePickleError(f'npz member {name} has dtype {dtype.str}, not plain numbers')
      count = math.prod(shape)
      if count * dtype.itemsize != len(data) - f.tell():
        raise CheckpointFormatError(f'npz member {name} does not hold {shape} {dtype} values')
      array = np.frombuffer(data, dtype, count, f.tell())
      out[name[:-len('.npy')]] = array.reshape(shape[::-1]).T if fortran else array.reshape(shape)
  return out


def _children(obj: Any) -> list | None:
  """Members of a loaded container (`pickle_vm.check_graph`); None for a leaf."""
  if isinstance(obj, (list, tuple)):
    return list(obj)
  if isinstance(obj, dict):
    return [*obj.keys(), *obj.values()]
  if isinstance(obj, (PersistentObject, TorchModuleDict)):
    return [getattr(obj, 'state', None)]
  return None


def _materialize(obj: Any, load: _TorchLoad, done: dict[int, Any]) -> Any:
  """Replaces tensor views and storages in `obj` by contiguous, native-endian copies.

  Each view is copied once however often it is referenced; copies are charged to the budget.
  `obj` is acyclic and shallow (`check_graph` ran first).
  """
  if id(obj) in done:
    return done[id(obj)]
  if isinstance(obj, (_Storage, np.ndarray)):
    array = obj.array if isinstance(obj, _Storage) else obj
    load.budget.charge(array.nbytes, f'a tensor of {array.nbytes} bytes')
    if array.dtype == np.bool_:  # bytes other than 0/1 become True
      done[id(obj)] = np.not_equal(array.view(np.uint8), 0)
    else:
      done[id(obj)] = array.astype(array.dtype.newbyteorder('='), order='C', copy=True)
    done[id(done[id(obj)])] = done[id(obj)]
    return done[id(obj)]
  done[id(obj)] = obj
  if isinstance(obj, tuple):
    done[id(obj)] = tuple(_materialize(v, load, done) for v in obj)
  elif isinstance(obj, dict):
    for key, value in obj.items():
      obj[key] = _materialize(value, load, done)
  elif isinstance(obj, list):
    obj[:] = [_materialize(v, load, done) for v in obj]
  elif isinstance(obj, (PersistentObject, TorchModuleDict)) and hasattr(obj, 'state'):
    _materialize(obj.state, load, done)
  return done[id(obj)]


def _one_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else type(error).__name__)[:200]


def _guarded_load(path: str | os.PathLike, reader: Callable[[str, _TorchLoad], Any]) -> Any:
  """Runs `reader(path, load)` and turns every failure into a one-line error naming `path`."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointFormatError(f'{path}: no such file')
  load = _TorchLoad(pickle_vm.Budget(BUDGET_FACTOR * os.path.getsize(path) + BUDGET_SLACK))
  try:
    obj = reader(path, load)
    pickle_vm.check_graph(obj, _children, max_text=load.budget.limit)
    return _materialize(obj, load, {})
  except UnsafePickleError as e:
    raise UnsafePickleError(f'{path}: {_one_line(e)}') from None
  except CheckpointFormatError as e:
    raise CheckpointFormatError(f'{path}: {_one_line(e)}') from None
  except Exception as e:  # pylint: disable=broad-except  (any parse failure is a bad file)
    raise CheckpointFormatError(
        f'{path}: not a valid pickle/torch file ({type(e).__name__}: {_one_line(e)})') from None


def _read_file(path: str) -> memoryview:
  with open(path, 'rb') as f:
    return memoryview(f.read())


def _read_pickle(path: str, load: _TorchLoad) -> Any:
  data = _read_file(path)
  obj, end = pickle_vm.run(data, 0, load, load.resolve)
  if end != len(data):
    raise CheckpointFormatError('bytes after the pickle')
  return obj


def _read_torch(path: str, load: _TorchLoad) -> Any:
  with open(path, 'rb') as f:
    is_zip = f.read(4) == _ZIP_MAGIC
  if is_zip:
    return _read_zip(path, load)
  return _read_legacy(load, _read_file(path), load.resolve)


def load_pickle(path: str | os.PathLike) -> Any:
  """Loads a plain pickle (e.g. an EDM snapshot `.pkl`) with the restricted unpickler.

  Tensors come back as numpy arrays, persistent objects as `PersistentObject`s.
  """
  return _guarded_load(path, _read_pickle)


def load_torch_file(path: str | os.PathLike) -> Any:
  """Loads a `torch.save` file (legacy stream or zip archive); tensors become numpy arrays."""
  return _guarded_load(path, _read_torch)


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Loads an `.npz` of numeric arrays {name: array} with the same bounds and errors."""
  return _guarded_load(path, _read_npz)


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
      if len(name) > MAX_KEY_CHARS:
        raise CheckpointFormatError(f'{os.fspath(path)}: a state dict key is longer than '
                                    f'{MAX_KEY_CHARS} characters')
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
