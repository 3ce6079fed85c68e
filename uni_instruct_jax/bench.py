"""Speed benchmark of one distillation iteration (fake-score update + generator update).

  python -m uni_instruct_jax.bench --config=configs/cifar10.py --batch=64 --compute_dtype=bfloat16
  python -m uni_instruct_jax.bench --config=configs/tiny.py --steps=3          # CPU smoke

Builds random-init teacher / fake score / generator of the config's real architecture (no
checkpoint, no dataset: real images are random data of the right shape), compiles and warms up
every function, then times `--steps` calls of each and prints one JSON line:

  sec_per_kimg, images_per_sec   generated images per second, one batch per iteration (as SiD).
  sample_images_per_sec          one-step generator sampling (eval mode) at the same batch.
  step_ms                        {fake_score, generator, iteration} milliseconds per call.
  peak_memory_gb                 device peak bytes in use (null where the backend has none).
  compute_dtype, batch (global), params_m (one network, millions), devices, device_kind,
  flops_per_image                XLA's count for all passes of one iteration, per image.
  mfu                            achieved FLOP/s over PEAK_FLOPS[device_kind] (null if unknown).

Timings exclude compilation and warm-up; every call is synchronised with block_until_ready.
Progress (calls done / total, rate, ETA) goes to stderr; stdout holds only the JSON line.
The generator update is timed in the phase past the warm-up and SiD-only ones (images_seen set
beyond loss.sid_kimg; steps.phase_at), so that it runs the configured divergence + GAN loss.
"""

import functools
import json
import sys
import time
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from uni_instruct_jax import builders
from uni_instruct_jax import nets as nets_lib
from uni_instruct_jax import parallel
from uni_instruct_jax import progress
from uni_instruct_jax import steps as steps_lib
from uni_instruct_jax import train_state as ts

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_integer("batch", 0, "Global batch (0: the config's training.batch_size).")
flags.DEFINE_integer("steps", 10, "Timed calls of each function after warm-up.")
flags.DEFINE_integer("warmup", 2, "Untimed calls after compilation.")
flags.DEFINE_enum("compute_dtype", None, ["bfloat16", "float32"],
                  "Network compute dtype (params, losses and Adam stay float32); default: config.")
flags.mark_flags_as_required(["config"])

# Dense peak FLOP/s per device kind (vendor datasheets; no sparsity) for the MFU column:
# {substring of jax.Device.device_kind: {compute dtype: FLOP/s}}. float32 on GPUs is the non-TF32
# rate, since XLA keeps float32 matmuls in full precision by default.
PEAK_FLOPS = {
    "H200": {"bfloat16": 989e12, "float32": 67e12},
    "H100": {"bfloat16": 989e12, "float32": 67e12},   # SXM; PCIe parts are lower (756e12)
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},
    "L4": {"bfloat16": 121e12, "float32": 30.3e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12 / 4},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12 / 4},
    "TPU v5e": {"bfloat16": 197e12, "float32": 197e12 / 4},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12 / 4},
    "TPU v6": {"bfloat16": 918e12, "float32": 918e12 / 4},
}


def peak_flops(device_kind: str, dtype: str) -> Optional[float]:
  """Nominal dense peak FLOP/s of one device, or None for unknown kinds (e.g. CPUs)."""
  for name, table in PEAK_FLOPS.items():
    if name.lower() in device_kind.lower():
      return table.get(dtype)
  return None


def _time(fn: Callable[[], Any], steps: int, report: progress.Progress) -> float:
  """Median seconds of `steps` synchronised calls of fn(); `report` counts each call."""
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
    report.advance()
  return float(np.median(times))


def _flops(compiled) -> Optional[float]:
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def _peak_memory_gb() -> Optional[float]:
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2 ** 30


def benchmark(config, steps: int = 10, warmup: int = 2) -> Dict[str, Any]:
  """Times one distillation iteration of `config` on random data; returns the JSON record."""
  config = config.copy_and_resolve_references()
  config.teacher.source = "random"
  batch = config.training.batch_size
  mesh = parallel.make_mesh(config.mesh.model_parallelism)
  nets, frozen, init_params = builders.build_image_nets(config)
  step_cfg = builders.step_config(config)
  gen_tx, fake_tx = builders.make_optimizers(config)
  fns = steps_lib.make_step_fns(nets, step_cfg, gen_tx, fake_tx,
                                builders.make_augment_pipe(config))

  def fresh_state(params):
    return ts.create_state(*params, gen_tx, fake_tx, config.seed)

  params = init_params(jax.random.key(config.seed))
  state_shardings = parallel.param_shardings(mesh, jax.eval_shape(fresh_state, params))
  replicated = parallel.replicated(mesh)
  frozen = jax.device_put(frozen, jax.tree.map(lambda _: replicated, frozen))
  key_x, key_c = jax.random.split(jax.random.key(1))
  images = 0.5 * jax.random.normal(key_x, (batch,) + nets.data_shape, jnp.float32)
  labels = jax.nn.one_hot(jax.random.randint(key_c, (batch,), 0, max(nets.label_dim, 1)),
                          nets.label_dim)
  data = jax.device_put({"image": images, "label": labels}, parallel.data_sharding(mesh))
  # Past warm-up and the SiD-only phase: the generator runs the configured divergence loss.
  late = int(max(step_cfg.sid_images, step_cfg.warmup_images, 0)) + batch
  phase = steps_lib.phase_at(late, step_cfg)
  state = jax.jit(fresh_state, out_shardings=state_shardings)(params)
  state = state.replace(images_seen=jax.device_put(jnp.asarray(late, jnp.int32),
                                                   state_shardings.images_seen))

  shardings = (state_shardings, parallel.data_sharding(mesh), jax.tree.map(lambda _: replicated,
                                                                           frozen))
  step_fns = {"fake_score_update": fns.fake_score_update,
              "generator_update": functools.partial(fns.generator_update, phase=phase),
              "train_step": functools.partial(fns.train_step, phase=phase)}
  jitted = {name: jax.jit(fn, in_shardings=shardings, out_shardings=(state_shardings, replicated),
                          donate_argnums=(0,))
            for name, fn in step_fns.items()}
  print(f"bench: compiling {len(jitted)} step programs and the sampler", file=sys.stderr,
        flush=True)
  compiled = {name: fn.lower(state, data, frozen).compile() for name, fn in jitted.items()}

  holder = {"state": state}

  def call(name):
    holder["state"], metrics = compiled[name](holder["state"], data, frozen)
    return metrics

  def generate(params, key):
    z = jax.random.normal(key, (batch,) + nets.data_shape, jnp.float32)
    return nets_lib.generate(nets, params, frozen["buffers"], z,
                             labels if nets.label_dim else None, config.training.sigma_init)
  sampler = jax.jit(generate).lower(state.ema_params, jax.random.key(0)).compile()

  seconds = {}
  report = progress.Progress("bench", (len(compiled) + 1) * (warmup + steps), unit="calls")
  for name in compiled:
    for _ in range(warmup):
      jax.block_until_ready(call(name))
      report.advance()
    seconds[name] = _time(lambda name=name: call(name), steps, report)
  for _ in range(warmup):
    jax.block_until_ready(sampler(holder["state"].ema_params, jax.random.key(0)))
    report.advance()
  sample_s = _time(lambda: sampler(holder["state"].ema_params, jax.random.key(0)), steps, report)

  iteration = seconds["train_step"]
  params_m = sum(x.size for x in jax.tree.leaves(holder["state"].gen_params)) / 1e6
  flops = _flops(compiled["train_step"])
  flops_per_image = None if flops is None else flops * len(jax.devices()) / batch
  dtype = str(config.network.dtype)
  device_kind = jax.devices()[0].device_kind
  peak = peak_flops(device_kind, dtype)
  images_per_sec = batch / iteration
  mfu = None
  if peak and flops_per_image:
    mfu = flops_per_image * images_per_sec / (peak * len(jax.devices()))
  return {
      "sec_per_kimg": 1000.0 / images_per_sec,
      "images_per_sec": images_per_sec,
      "sample_images_per_sec": batch / sample_s,
      "step_ms": {"fake_score": 1e3 * seconds["fake_score_update"],
                  "generator": 1e3 * seconds["generator_update"], "iteration": 1e3 * iteration},
      "peak_memory_gb": _peak_memory_gb(),
      "compute_dtype": dtype,
      "batch": batch,
      "params_m": params_m,
      "devices": len(jax.devices()),
      "device_kind": device_kind,
      "flops_per_image": flops_per_image,
      "mfu": mfu,
      "steps": steps,
  }


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
    sys.exit(2)
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  with config.unlocked():
    if FLAGS.batch:
      config.training.batch_size = FLAGS.batch
      config.training.micro_batch_size = 0
    if FLAGS.compute_dtype:
      config.network.dtype = FLAGS.compute_dtype
  record = {"config": config_flags.get_config_filename(FLAGS["config"]),
            **benchmark(config, FLAGS.steps, FLAGS.warmup)}
  print(json.dumps(record), flush=True)


if __name__ == "__main__":
  app.run(main)
