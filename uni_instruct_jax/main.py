"""Command-line entry point (thin): flags, distributed init, dispatch to the library.

  python -m uni_instruct_jax.main --config=configs/toy2d.py --workdir=/tmp/toy2d
  python -m uni_instruct_jax.main --config=configs/cifar10.py --workdir=W --config.loss.mode=exact
  python -m uni_instruct_jax.main --config=configs/cifar10.py --workdir=W --mode=sample

Bad input (unknown config key, missing config file, missing teacher/data path, teacher/dataset
mismatch, unreadable checkpoint) prints one `error: ...` line on stderr and exits with code 2
before any compute.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from uni_instruct_jax import parallel

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples, summary.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "ref"], "What to run.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator for a "
                    "multi-process run JAX cannot discover (env JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Processes of a multi-process run (env "
                     "JAX_NUM_PROCESSES); 1 = single process.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes) (env "
                     "JAX_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_BAD_INPUT = 2


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_BAD_INPUT)


def _parse_flags(argv):
  """absl parsing with a one-line error and exit code 2 (absl's default prints usage, exits 1)."""
  for arg in argv[1:]:  # config_flags would only fail later, on first use of the config
    if arg.startswith("--config="):
      path = arg[len("--config="):].split(":")[0]
      if not os.path.isfile(path):
        _fail(f"--config: no such config file {path!r}")
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
  except (OSError, ImportError, KeyError, AttributeError, ValueError, TypeError) as e:
    # config_flags raises these while loading or overriding the config file.
    _fail(f"--config: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS["verbosity"].present:  # orbax logs every save at INFO; -v 0 brings it back.
    logging.set_verbosity(logging.WARNING)
  try:
    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id)
  except parallel.DistributedSetupError as e:
    _fail(str(e))
  from uni_instruct_jax import train  # pylint: disable=g-import-not-at-top
  try:
    if FLAGS.mode == "train":
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
      train.sample(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "eval":
      train.evaluate(FLAGS.config, FLAGS.workdir)
    else:
      train.make_reference(FLAGS.config, FLAGS.workdir)
  except train.SetupError as e:
    logging.flush()
    _fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
