"""EDM snapshot pickle -> Flax preconditioner and its variables, with name and shape checks.

The pickle is read by `safe_unpickle.load_pickle` (allow-listed globals, embedded source never run).
The network config comes from the pickled constructor kwargs (`_init_kwargs` of the preconditioner
and of its inner UNet); parameter names and layouts follow `uni_instruct_jax.networks`'s naming
rule (`torch_key_to_flax_path`, `torch_value_to_flax`, `resample_filters`).
"""

import dataclasses
import math
import os
from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from uni_instruct_jax import networks
from uni_instruct_jax.convert import safe_unpickle
from uni_instruct_jax.convert.safe_unpickle import CheckpointFormatError

EDM_PERSISTENCE_VERSION = 6
PRECOND_CLASSES = ('EDMPrecond', 'VPPrecond', 'VEPrecond')
# UNet kwargs that the preconditioner derives from its own (EDM: in/out_channels = img_channels).
_DERIVED_UNET_KWARGS = {'img_resolution': 'img_resolution', 'label_dim': 'label_dim',
                        'in_channels': 'img_channels', 'out_channels': 'img_channels'}


# Sane ranges of the network kwargs, checked before anything is traced or allocated.
MAX_PARAMS = 2_000_000_000
_INT_RANGES = {
    'img_resolution': (1, 1024), 'img_channels': (1, 64), 'label_dim': (0, 100_000),
    'augment_dim': (0, 64), 'model_channels': (1, 2048), 'channel_mult_emb': (1, 16),
    'channel_mult_noise': (1, 16), 'num_blocks': (0, 16), 'M': (1, 100_000)}
_FLOAT_RANGES = {
    'dropout': (0.0, 1.0), 'label_dropout': (0.0, 1.0), 'sigma_min': (0.0, 1e6),
    'sigma_max': (0.0, math.inf), 'sigma_data': (1e-6, 1e3), 'beta_d': (1e-6, 1e3),
    'beta_min': (0.0, 1e3), 'epsilon_t': (1e-12, 1.0)}
_LIST_RANGES = {  # (min length, max length, min value, max value)
    'channel_mult': (1, 8, 1, 16), 'attn_resolutions': (0, 16, 1, 1024),
    'resample_filter': (1, 8, 0, 1024)}
# UNet defaults: (model_channels, channel_mult, num_blocks).
_DEFAULT_WIDTHS = {'DhariwalUNet': (192, (1, 2, 3, 4), 3), 'SongUNet': (128, (1, 2, 2, 2), 4)}


class StateDictMismatchError(CheckpointFormatError):
  """The checkpoint's tensors do not match the network its kwargs describe."""


def _check_number(key: str, value: Any, low: float, high: float, integer: bool) -> None:
  kinds = (int,) if integer else (int, float)
  if type(value) not in kinds or not low <= value <= high:  # NaN fails the comparison
    raise CheckpointFormatError(f'network kwarg {key}={repr(value)[:40]} is not '
                                f'{"an int" if integer else "a number"} in [{low}, {high}]')


def check_network_kwargs(init_kwargs: dict, max_params: int = MAX_PARAMS) -> int:
  """Checks EDM constructor kwargs against sane ranges; returns a lower bound on the parameters.

  Args:
    init_kwargs: `TeacherMetadata.init_kwargs` (JSON types).
    max_params: refuse networks with more parameters than this (e.g. the tensor elements the
      file holds: its state dict must carry every parameter).
  Raises:
    CheckpointFormatError naming the first kwarg outside its range, a resolution that the UNet
    levels do not divide, or a network bound to have more than `max_params` parameters.
  """
  for key, value in init_kwargs.items():
    if type(key) is not str or len(key) > 64 or (type(value) is str and len(value) > 64):
      raise CheckpointFormatError('network kwarg names and string values must be short strings')
    if key in _INT_RANGES:
      _check_number(key, value, *_INT_RANGES[key], integer=True)
    elif key in _FLOAT_RANGES:
      _check_number(key, value, *_FLOAT_RANGES[key], integer=False)
    elif key in _LIST_RANGES:
      min_len, max_len, low, high = _LIST_RANGES[key]
      if not (isinstance(value, list) and min_len <= len(value) <= max_len):
        raise CheckpointFormatError(f'network kwarg {key} is not a list of {min_len}..{max_len} '
                                    'numbers')
      for item in value:
        _check_number(key, item, low, high, integer=True)
    elif key == 'use_fp16' and type(value) is not bool:
      raise CheckpointFormatError(f'network kwarg use_fp16={value!r} is not a bool')
    elif type(value) is not str and key != 'use_fp16':
      raise CheckpointFormatError(f'network kwarg {key} is a {type(value).__name__}')
  for key in ('img_resolution', 'img_channels'):
    if key not in init_kwargs:
      raise CheckpointFormatError(f'network kwargs lack {key}')
  channels, mult, blocks = _DEFAULT_WIDTHS.get(init_kwargs.get('model_type'),
                                                     _DEFAULT_WIDTHS['SongUNet'])
  channels = init_kwargs.get('model_channels', channels)
  mult = init_kwargs.get('channel_mult', mult)
  blocks = init_kwargs.get('num_blocks', blocks)
  if init_kwargs['img_resolution'] % (1 << (len(mult) - 1)):
    raise CheckpointFormatError(f'network kwarg img_resolution={init_kwargs["img_resolution"]} '
                                f'is not divisible by 2^{len(mult) - 1} ({len(mult)} levels)')
  # Every level has >= 2 * num_blocks + 1 3x3 convolutions of its width to itself.
  bound = sum((2 * blocks + 1) * 9 * (channels * m) ** 2 for m in mult)
  bound += init_kwargs.get('label_dim', 0) * channels  # map_label: label_dim -> >= channels
  if bound > max_params:
    raise CheckpointFormatError(f'network kwargs describe at least {bound:,} parameters, more '
                                f'than the {max_params:,} allowed')
  return bound


@dataclasses.dataclass(frozen=True)
class TeacherMetadata:
  """What a converted teacher records about its source.

  Attributes:
    class_name: 'EDMPrecond' | 'VPPrecond' | 'VEPrecond'.
    init_kwargs: the preconditioner's constructor kwargs, `model_type` included (JSON types).
    dataset_kwargs: the snapshot's dataset kwargs (JSON types; informational).
    source_path: path of the source pickle.
    sha256: hex sha256 of the source pickle's bytes.
    module_src_sha256: hex sha256 of the embedded (never executed) networks source.
  """
  class_name: str
  init_kwargs: dict
  dataset_kwargs: dict
  source_path: str
  sha256: str
  module_src_sha256: str

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: Any) -> 'TeacherMetadata':
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    if not isinstance(data, dict) or sorted(data) != sorted(fields):
      raise CheckpointFormatError(f'teacher metadata must have exactly the fields {list(fields)}')
    for name, kind in fields.items():
      if type(data[name]) is not kind:
        raise CheckpointFormatError(f'teacher metadata field {name} is not a {kind.__name__}')
    return cls(**data)


def _json_value(value: Any, where: str, strict: bool = True) -> Any:
  """Pickled kwarg value -> JSON type (tuples as lists); non-JSON values raise, or become
  '<type name>'."""
  if isinstance(value, np.generic):
    value = value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, (list, tuple)):
    return [_json_value(v, where, strict) for v in value]
  if isinstance(value, dict) and all(isinstance(k, str) for k in value):
    return {k: _json_value(v, f'{where}.{k[:100]}', strict) for k, v in value.items()}
  if strict:
    raise CheckpointFormatError(f'{where[:200]} holds a {type(value).__name__}, not a plain '
                                'value')
  return f'<{type(value).__name__}>'


def _persistent(obj: Any, what: str) -> safe_unpickle.PersistentObject:
  if not isinstance(obj, safe_unpickle.PersistentObject):
    raise CheckpointFormatError(f'{what} is a {type(obj).__name__}, not an EDM persistent object')
  if obj.version != EDM_PERSISTENCE_VERSION:
    raise CheckpointFormatError(f'{what} has persistence version {obj.version}, expected '
                                f'{EDM_PERSISTENCE_VERSION}')
  return obj


def _init_kwargs(obj: safe_unpickle.PersistentObject, what: str) -> dict:
  kwargs = obj.state.get('_init_kwargs')
  if not isinstance(kwargs, dict) or obj.state.get('_init_args', ()) != ():
    raise CheckpointFormatError(f'{what} ({obj.class_name}) has no keyword-only _init_kwargs')
  return {k: _json_value(v, f'{what}._init_kwargs.{k}') for k, v in kwargs.items()}


def network_kwargs(ema: safe_unpickle.PersistentObject) -> dict:
  """The preconditioner's constructor kwargs, merged with and checked against its UNet's.

  `model_type` is taken from the inner model's class (EDMPrecond's default is DhariwalUNet, the
  others' SongUNet, so a pickle that omits it is still read right).
  """
  kwargs = _init_kwargs(ema, 'ema')
  modules = ema.state.get('_modules')
  inner = _persistent(modules.get('model') if isinstance(modules, dict) else None, 'ema.model')
  inner_kwargs = _init_kwargs(inner, 'ema.model')
  if kwargs.setdefault('model_type', inner.class_name) != inner.class_name:
    raise CheckpointFormatError(f'ema model_type {kwargs["model_type"]!r} differs from its model '
                                f'class {inner.class_name!r}')
  for key, value in inner_kwargs.items():
    outer_key = _DERIVED_UNET_KWARGS.get(key, key)
    default = 0 if key == 'label_dim' else value
    if kwargs.get(outer_key, default) != value:
      raise CheckpointFormatError(f'ema kwarg {outer_key}={kwargs.get(outer_key)!r} differs from '
                                  f'its model\'s {key}={value!r}')
    if key not in _DERIVED_UNET_KWARGS:
      kwargs[key] = value
  return kwargs


def torch_state_dict(module: Any, prefix: str = '') -> dict[str, np.ndarray]:
  """Flat torch-style state dict {'model.enc.16x16_conv.weight': array, ...} of a pickled module.

  Walks `_parameters`, `_buffers` (persistent ones) and `_modules` as `nn.Module.state_dict` does.
  """
  if not isinstance(module, (safe_unpickle.PersistentObject, safe_unpickle.TorchModuleDict)):
    raise CheckpointFormatError(f'module {prefix or "<root>"} is a {type(module).__name__}')
  state = module.state
  skip = state.get('_non_persistent_buffers_set') or set()
  if not isinstance(skip, (set, frozenset, list, tuple)):
    raise CheckpointFormatError(f'{prefix}_non_persistent_buffers_set is a '
                                f'{type(skip).__name__}')
  out = {}
  if len(prefix) > safe_unpickle.MAX_KEY_CHARS:
    raise CheckpointFormatError(f'a state dict key is longer than {safe_unpickle.MAX_KEY_CHARS} '
                                'characters')
  for group in ('_parameters', '_buffers', '_modules'):
    entries = state.get(group, {})
    if not isinstance(entries, dict):
      raise CheckpointFormatError(f'{prefix}{group} is a {type(entries).__name__}, not a dict')
    for name, value in entries.items():
      if value is None or (group == '_buffers' and name in skip):
        continue
      if group == '_modules':
        out.update(torch_state_dict(value, f'{prefix}{name}.'))
      elif isinstance(value, np.ndarray):
        out[prefix + name] = value
      else:
        raise CheckpointFormatError(f'{prefix}{name} is a {type(value).__name__}, not a tensor')
  return out


def abstract_variables(model: networks.Precond) -> dict:
  """`jax.eval_shape` of the model's variables {'params', ['buffers']} (ShapeDtypeStruct leaves)."""
  res, ch = model.img_resolution, model.img_channels
  x = jax.ShapeDtypeStruct((1, res, res, ch), jnp.float32)
  sigma = jax.ShapeDtypeStruct((1,), jnp.float32)
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
  try:
    return jax.eval_shape(model.init, rngs, x, sigma)
  except Exception as e:  # pylint: disable=broad-except  (kwargs that the networks reject)
    message = str(e).strip().splitlines()[0][:200] if str(e).strip() else ''
    raise CheckpointFormatError(f'cannot build {type(model).__name__} from its kwargs '
                                f'({type(e).__name__}: {message})') from None


def state_dict_to_variables(model: networks.Precond, state_dict: dict[str, np.ndarray]) -> dict:
  """Torch state dict -> Flax variables of `model` (float32 numpy), checking every name and shape.

  Raises:
    StateDictMismatchError naming the first unexpected, missing, misshaped or non-finite key, or a
    `resample_filter` buffer that differs from the config's filter.
  """
  expected = traverse_util.flatten_dict(nn.unbox(abstract_variables(model)))
  filters = networks.resample_filters(model)
  flat = {}
  for key, value in state_dict.items():
    if key.rsplit('.', 1)[-1] == 'resample_filter':
      if key not in filters:
        raise StateDictMismatchError(f'unexpected key {key}: the config has no such filter')
      want = filters[key]
      if value.shape != want.shape or not np.allclose(value, want, rtol=1e-6, atol=1e-7):
        raise StateDictMismatchError(f'key {key}: resample filter {value.reshape(-1).tolist()} '
                                     f'differs from the config\'s {want.reshape(-1).tolist()}')
      continue
    try:
      path = networks.torch_key_to_flax_path(key)
    except ValueError as e:
      raise StateDictMismatchError(f'unexpected key {key}: {e}') from None
    if path not in expected:
      raise StateDictMismatchError(f'unexpected key {key}: the network has no variable '
                                   f'{"/".join(path)}')
    converted = networks.torch_value_to_flax(key, value)
    if converted.shape != expected[path].shape:
      raise StateDictMismatchError(f'key {key}: shape {value.shape} (as {"/".join(path)}: '
                                   f'{converted.shape}) but the network expects '
                                   f'{expected[path].shape}')
    if not np.all(np.isfinite(converted)):
      raise StateDictMismatchError(f'key {key}: non-finite values')
    flat[path] = np.asarray(converted, expected[path].dtype)
  missing = [k for k in filters if k not in state_dict]
  missing += ['/'.join(p) for p in expected if p not in flat]
  if missing:
    raise StateDictMismatchError(f'missing key {missing[0]} ({len(missing)} missing in all)')
  return traverse_util.unflatten_dict(flat)


def snapshot_ema(snapshot: Any) -> safe_unpickle.PersistentObject:
  """The preconditioner of a loaded EDM snapshot dict, checked (version 6, known class)."""
  if not isinstance(snapshot, dict) or 'ema' not in snapshot:
    raise CheckpointFormatError('not an EDM snapshot (a dict with an "ema" network)')
  ema = _persistent(snapshot['ema'], 'ema')
  if ema.class_name not in PRECOND_CLASSES:
    raise CheckpointFormatError(f'ema is a {ema.class_name}, expected one of {PRECOND_CLASSES}')
  return ema


def read_edm_snapshot(path: str | os.PathLike) -> tuple[TeacherMetadata, dict[str, np.ndarray]]:
  """Reads an EDM snapshot pickle -> (metadata, torch state dict of its 'ema' network).

  'loss_fn' and 'augment_pipe' are read as inert records (through the same allow-list) and ignored.
  """
  path = os.fspath(path)
  snapshot = safe_unpickle.load_pickle(path)
  try:
    ema = snapshot_ema(snapshot)
    dataset_kwargs = snapshot.get('dataset_kwargs') or {}
    if not isinstance(dataset_kwargs, dict):
      raise CheckpointFormatError('dataset_kwargs is not a dict')
    metadata = TeacherMetadata(
        class_name=ema.class_name, init_kwargs=network_kwargs(ema),
        dataset_kwargs=_json_value(dataset_kwargs, 'dataset_kwargs', strict=False),
        source_path=os.path.abspath(path), sha256=safe_unpickle.sha256_file(path),
        module_src_sha256=ema.module_src_sha256)
    return metadata, torch_state_dict(ema)
  except CheckpointFormatError as e:
    raise type(e)(f'{path}: {e}') from None
  except Exception as e:  # pylint: disable=broad-except  (any other structure is a bad file)
    message = str(e).strip().splitlines()[0][:200] if str(e).strip() else ''
    raise CheckpointFormatError(f'{path}: not an EDM snapshot ({type(e).__name__}: '
                                f'{message})') from None


def build_teacher(metadata: TeacherMetadata, dtype=jnp.float32, max_params: int = MAX_PARAMS,
                  where: str | None = None) -> networks.Precond:
  """The Flax preconditioner described by `metadata` (compute dtype `dtype`, float32 params).

  The kwargs are checked first (`check_network_kwargs`, with `max_params`), so nothing is traced
  or allocated for a network that no file of this size can hold. Errors start with `where`
  (default: the metadata's source path).
  """
  try:
    if not isinstance(metadata.init_kwargs, dict) or not isinstance(metadata.class_name, str):
      raise CheckpointFormatError('the teacher metadata has no class name and kwargs dict')
    check_network_kwargs(metadata.init_kwargs, max_params)
    return networks.build_network(metadata.class_name, metadata.init_kwargs, dtype)
  except (TypeError, ValueError) as e:
    raise CheckpointFormatError(f'{where or metadata.source_path}: cannot build '
                                f'{str(metadata.class_name)[:100]}: {str(e)[:300]}') from None


def convert_edm_pickle(path: str | os.PathLike, dtype=jnp.float32
                       ) -> tuple[networks.Precond, dict, TeacherMetadata]:
  """EDM snapshot pickle -> (Flax model, variables {'params', ['buffers']}, metadata)."""
  metadata, state_dict = read_edm_snapshot(path)
  elements = sum(value.size for value in state_dict.values())
  model = build_teacher(metadata, dtype, max_params=min(MAX_PARAMS, elements))
  try:
    variables = state_dict_to_variables(model, state_dict)
  except CheckpointFormatError as e:
    raise type(e)(f'{os.fspath(path)}: {e}') from None
  return model, jax.tree.map(jnp.asarray, variables), metadata


def load_edm_pickle(path: str | os.PathLike, dtype=jnp.float32) -> tuple[networks.Precond, dict]:
  """EDM snapshot pickle -> (Flax model, variables); see `convert_edm_pickle`.

  `model.apply(variables, x [B,R,R,C], sigma [B], class_labels, augment_labels)` is EDM's D(x, σ).
  """
  model, variables, _ = convert_edm_pickle(path, dtype)
  return model, variables
