"""Orbax I/O of converted teachers (training-state checkpoints live in train_state.py).

A teacher directory holds
  network.json   the `TeacherMetadata` (class_name, init_kwargs, dataset_kwargs, source path and
                 sha256 of the source pickle, sha256 of its embedded source);
  variables/     the Flax variables {'params': ..., ['buffers': ...]} as an orbax
                 StandardCheckpointer item (float32).
"""

import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from uni_instruct_jax.convert.edm_to_flax import abstract_variables
from uni_instruct_jax.convert.edm_to_flax import build_teacher
from uni_instruct_jax.convert.edm_to_flax import MAX_PARAMS
from uni_instruct_jax.convert.edm_to_flax import TeacherMetadata
from uni_instruct_jax.convert.safe_unpickle import CheckpointFormatError

NETWORK_JSON = 'network.json'
VARIABLES = 'variables'


def save_teacher(directory: str | os.PathLike, variables: Any, metadata: TeacherMetadata,
                 overwrite: bool = False) -> pathlib.Path:
  """Writes `variables` and `metadata` to `directory` (created if needed); returns its path.

  Raises CheckpointFormatError if the directory already holds a teacher and not `overwrite`.
  """
  directory = pathlib.Path(directory).resolve()
  if (directory / NETWORK_JSON).exists() or (directory / VARIABLES).exists():
    if not overwrite:
      raise CheckpointFormatError(f'{directory}: already holds a teacher '
                                  '(overwrite=True / --overwrite replaces it)')
  directory.mkdir(parents=True, exist_ok=True)
  (directory / NETWORK_JSON).unlink(missing_ok=True)  # a half-written dir never looks complete
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / VARIABLES, variables, force=overwrite)
    checkpointer.wait_until_finished()
  tmp = directory / (NETWORK_JSON + '.tmp')
  tmp.write_text(json.dumps(metadata.to_json(), indent=2, sort_keys=True) + '\n')
  tmp.replace(directory / NETWORK_JSON)
  return directory


def load_teacher_metadata(directory: str | os.PathLike) -> TeacherMetadata:
  """The `TeacherMetadata` recorded in a teacher directory."""
  path = pathlib.Path(directory) / NETWORK_JSON
  if not pathlib.Path(directory).is_dir():
    raise CheckpointFormatError(f'{directory}: no such teacher directory')
  try:
    return TeacherMetadata.from_json(json.loads(path.read_text()))
  except FileNotFoundError:
    raise CheckpointFormatError(f'{directory}: not a teacher directory (no {NETWORK_JSON}; '
                                'convert with python -m uni_instruct_jax.convert)') from None
  except (ValueError, UnicodeDecodeError, RecursionError) as e:
    raise CheckpointFormatError(f'{path}: unreadable teacher metadata '
                                f'({str(e).splitlines()[0]})') from None


def load_teacher(directory: str | os.PathLike, sharding: Any = None, dtype=jnp.float32
                 ) -> tuple[Any, dict]:
  """(model, variables) of a converted teacher, as `load_edm_pickle` returns them.

  Args:
    directory: written by `save_teacher` / `python -m uni_instruct_jax.convert`.
    sharding: a `jax.sharding.Sharding` for every array (e.g. replicated over a mesh), or a pytree
      of shardings matching the variables; None gives uncommitted arrays on the default device,
      as `load_edm_pickle` does.
    dtype: compute dtype of the model (params stay float32).
  """
  metadata = load_teacher_metadata(directory)
  path = pathlib.Path(directory).resolve() / VARIABLES
  if not path.is_dir():
    raise CheckpointFormatError(f'{directory}: no {VARIABLES}/ checkpoint beside {NETWORK_JSON}')
  stored_bytes = sum(f.stat().st_size for f in path.rglob('*') if f.is_file())
  # 4-byte float32 parameters, allowing the checkpoint's compression up to 64x.
  model = build_teacher(metadata, dtype, max_params=min(MAX_PARAMS, 16 * stored_bytes),
                        where=str(directory))
  try:
    abstract = abstract_variables(model)
  except CheckpointFormatError as e:
    raise CheckpointFormatError(f'{directory}: {e}') from None
  if sharding is None:  # restore to host, then place like load_edm_pickle (uncommitted)
    target = jax.tree.map(lambda a: np.empty(a.shape, a.dtype), abstract)
  else:
    if isinstance(sharding, jax.sharding.Sharding):
      sharding = jax.tree.map(lambda _: sharding, abstract)
    try:
      target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, sharding)
    except ValueError as e:
      raise ValueError(f'sharding does not match the teacher variables: {e}') from None
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      stored = checkpointer.metadata(path)  # orbax >= 0.12: StepMetadata; older: the tree
      stored = getattr(stored, 'item_metadata', stored)
      stored = getattr(stored, 'tree', stored)
      if not stored:
        raise ValueError('no array metadata')
      _check_stored_shapes(path, stored, abstract)
      variables = checkpointer.restore(path, target)
  except CheckpointFormatError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds on bad data)
    message = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    raise CheckpointFormatError(f'{path}: cannot restore the teacher variables ({message})'
                                ) from None
  if sharding is None:
    variables = jax.tree.map(jnp.asarray, variables)
  return model, variables


def _check_stored_shapes(path: pathlib.Path, stored: Any, abstract: Any) -> None:
  """Refuses, before anything is restored, a checkpoint whose arrays differ from the network's."""
  def flat(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  stored, abstract = flat(stored), flat(abstract)
  for key, want in abstract.items():
    got = stored.get(key)
    if got is None:
      raise CheckpointFormatError(f'{path}: variable {key} is missing')
    if tuple(got.shape) != want.shape or np.dtype(got.dtype) != want.dtype:
      raise CheckpointFormatError(f'{path}: variable {key} is {np.dtype(got.dtype)}'
                                  f'{list(got.shape)}, the network expects '
                                  f'{want.dtype}{list(want.shape)}')
  extra = sorted(set(stored) - set(abstract))
  if extra:
    raise CheckpointFormatError(f'{path}: unexpected variable {extra[0]}')
