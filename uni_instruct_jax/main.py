"""Command-line entry point (thin): flags, distributed init, dispatch to the library.

  python -m uni_instruct_jax.main --config=configs/toy2d.py --workdir=/tmp/toy2d
  python -m uni_instruct_jax.main --config=configs/cifar10.py --workdir=W --config.loss.mode=exact
  python -m uni_instruct_jax.main --config=configs/cifar10.py --workdir=W --mode=sample
  python -m uni_instruct_jax.main --config=configs/cifar10.py --mode=print_config
  python -m uni_instruct_jax.main --config=configs/cifar10.py --mode=prepare --out=cifar10.zip \
      --config.data.source=tfds --config.data.tfds_name=cifar10

Modes: train (default; resumes from W's last checkpoint), sample, eval, ref, print_config (every
field of the resolved config with its description and valid values; no --workdir), and prepare
(config.data's images as an EDM dataset zip at --out, as `python -m uni_instruct_jax.prepare`;
no --workdir). Override any field with --config.SECTION.KEY=VALUE. Long jobs print progress on
stderr. Ctrl-C during training prints where the last checkpoint is and exits with status 130;
rerunning the same command resumes from it.

Bad input (unknown config key, a value outside its documented range, missing config file, missing
teacher/data path, teacher/dataset mismatch, unreadable checkpoint, unusable reference statistics)
prints one `error: ...` line on stderr and exits with code 2 before any compute.
"""

import json
import os
import re
import runpy
import sys
from typing import Optional

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from uni_instruct_jax import cli
from uni_instruct_jax import config_schema
from uni_instruct_jax import parallel

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py). Override any field with "
    "--config.SECTION.KEY=VALUE; --mode=print_config lists every field with its description.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples, summary "
                    "(required except for print_config).")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "ref", "print_config", "prepare"],
                  "train: distil (resumes from the workdir); sample: EMA-generator images of the "
                  "latest checkpoint (config.sample.outdir: PNGs for EDM's fid.py); eval: FID (or "
                  "proxy) vs config.eval.ref; ref: reference statistics of the data; "
                  "print_config: print the resolved config with each field's description and "
                  "valid values, then exit; prepare: write config.data's images as an EDM "
                  "dataset zip at --out.")
flags.DEFINE_string("out", None, "--mode=prepare: the EDM dataset zip to write (e.g. "
                    "cifar10-32x32.zip; must not exist).")
flags.mark_flags_as_required(["config"])
flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator for a "
                    "multi-process run JAX cannot discover (env JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Processes of a multi-process run (env "
                     "JAX_NUM_PROCESSES); 1 = single process.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes) (env "
                     "JAX_PROCESS_ID).")

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


def _unknown_key(argv) -> Optional[str]:
  """'unknown config key ...' for the first --config.KEY override that the config file lacks,
  with the closest existing keys; None if every override exists (or the file cannot be read)."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    return None
  path, _, arg = spec.partition(":")
  try:
    get_config = runpy.run_path(path)["get_config"]
    config = get_config(arg) if arg else get_config()
  except Exception:  # pylint: disable=broad-except  (the caller reports the original error)
    return None
  for a in argv:
    match = re.match(r"^--?(?:no)?config\.([^=]+)", a)
    if not match:
      continue
    name, node = match.group(1), config
    for part in name.split("."):
      if not hasattr(node, "keys") or part not in node.keys():
        if name in config_schema.load_schema()[0]:  # e.g. an optional loss.overrides key
          return (f"unknown config key {name!r} (documented, but {path} does not set it, so it "
                  "cannot be overridden; set it in a config file)")
        close = config_schema.closest_keys(name, config)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown config key {name!r}{hint}"
      node = node[part]
  return None


def _parse_flags(argv):
  """absl parsing with a one-line error and exit code 2 (absl's default prints usage, exits 1)."""
  for arg in argv[1:]:  # config_flags would only fail later, on first use of the config
    if arg.startswith("--config="):
      path = arg[len("--config="):].split(":")[0]
      if not os.path.isfile(path):
        cli.fail(f"--config: no such config file {path!r}")
  try:
    return cli.parse_flags(argv)
  except (OSError, ImportError, KeyError, AttributeError, ValueError, TypeError) as e:
    # config_flags raises these while loading or overriding the config file.
    if isinstance(e, (KeyError, AttributeError)):
      message = _unknown_key(argv)
      if message:
        cli.fail(message)
    cli.fail(f"--config: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.mode == "print_config":
    print(config_schema.describe(FLAGS.config), flush=True)
  try:
    config_schema.validate(FLAGS.config)
  except config_schema.ConfigError as e:
    cli.fail(str(e))
  if FLAGS.mode == "print_config":
    return
  if FLAGS.mode == "prepare":
    _prepare()
    return
  if not FLAGS.workdir:
    cli.fail(f"--workdir is required for --mode={FLAGS.mode}")
  if not FLAGS["verbosity"].present:  # orbax logs every save at INFO; -v 0 brings it back.
    logging.set_verbosity(logging.WARNING)
  try:
    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id)
  except parallel.DistributedSetupError as e:
    cli.fail(str(e))
  # pylint: disable=g-import-not-at-top
  from uni_instruct_jax import builders
  from uni_instruct_jax import train
  from uni_instruct_jax.evaluation import run as eval_run
  from uni_instruct_jax.evaluation.fid import StatisticsError
  # pylint: enable=g-import-not-at-top
  try:
    if FLAGS.mode == "train":
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
      eval_run.sample(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "eval":
      eval_run.evaluate(FLAGS.config, FLAGS.workdir)
    else:
      eval_run.make_reference(FLAGS.config, FLAGS.workdir)
  except (builders.SetupError, config_schema.ConfigError, StatisticsError) as e:
    logging.flush()
    cli.fail(str(e))
  except KeyboardInterrupt as e:  # train.Interrupted says where the last checkpoint is
    print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr, flush=True)
    sys.exit(EXIT_INTERRUPTED)
  except Exception as e:  # pylint: disable=broad-except
    parallel.exit_on_peer_failure(e)  # a dead peer: one line, no wait at exit
    raise


def _prepare():
  """--mode=prepare: config.data's images -> the EDM dataset zip --out; prints its summary."""
  # pylint: disable=g-import-not-at-top
  from uni_instruct_jax import data
  from uni_instruct_jax import prepare
  from uni_instruct_jax import progress
  # pylint: enable=g-import-not-at-top
  if not FLAGS.out:
    cli.fail("--mode=prepare needs --out=FILE.zip (the EDM dataset zip to write)")
  try:
    summary = prepare.prepare_dataset(FLAGS.config.data, FLAGS.out,
                                      progress=progress.Progress("prepare"))
  except (prepare.PrepareError, data.DataError) as e:
    cli.fail(str(e))
  except KeyboardInterrupt:
    print(f"interrupted: {FLAGS.out} was not written", file=sys.stderr, flush=True)
    sys.exit(EXIT_INTERRUPTED)
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
