"""Converts an EDM snapshot pickle into a teacher directory (orbax variables + network.json).

  python -m uni_instruct_jax.convert --edm_pkl=edm-cifar10-32x32-cond-vp.pkl --out=teachers/cifar

Nothing in the pickle is executed and torch is not needed. Bad input prints one `error: ...` line
on stderr and exits with status 2. Load the result with `uni_instruct_jax.checkpoint.load_teacher`.
"""

import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
import jax

from uni_instruct_jax import checkpoint
from uni_instruct_jax.convert.edm_to_flax import convert_edm_pickle

_EDM_PKL = flags.DEFINE_string('edm_pkl', None, 'EDM snapshot pickle (network-snapshot-*.pkl).')
_OUT = flags.DEFINE_string('out', None, 'Output teacher directory.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace a teacher already in --out.')


def _check_out(out: str) -> None:
  """Refuses an `--out` that is, or lies under, something other than a directory."""
  for path in (pathlib.Path(out), *pathlib.Path(out).parents):
    if path.exists() or path.is_symlink():
      if not path.is_dir():
        raise ValueError(f'--out={out}: {path} exists and is not a directory')
      return


def convert(edm_pkl: str | None, out: str | None, overwrite: bool = False) -> int:
  """Runs the conversion; returns the exit status (0, or 2 after one error line on stderr)."""
  try:
    if not edm_pkl or not out:
      raise ValueError('both --edm_pkl and --out are required')
    _check_out(out)
    model, variables, metadata = convert_edm_pickle(edm_pkl)
    directory = checkpoint.save_teacher(out, variables, metadata, overwrite=overwrite)
  except (ValueError, OSError) as e:  # CheckpointFormatError, UnsafePickleError, unwritable --out.
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f'error: {message}', file=sys.stderr)
    return 2
  count = sum(x.size for x in jax.tree.leaves(variables.get('params', {})))
  print(f'{type(model).__name__}({metadata.init_kwargs.get("model_type")}) with {count:,} '
        f'parameters from {metadata.source_path} (sha256 {metadata.sha256[:16]}...) -> {directory}')
  return 0


def main(argv):
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every step of a save at INFO
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}', file=sys.stderr)
    sys.exit(2)
  sys.exit(convert(_EDM_PKL.value, _OUT.value, _OVERWRITE.value))


if __name__ == '__main__':
  app.run(main)
