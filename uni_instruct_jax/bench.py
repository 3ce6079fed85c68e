"""Speed, FLOP and memory benchmark of one distillation iteration (fake-score + generator update).

  python -m uni_instruct_jax.bench --config=configs/cifar10.py --batch=64 --compute_dtype=bfloat16
  python -m uni_instruct_jax.bench --config=configs/tiny.py --steps=3          # CPU smoke
  python -m uni_instruct_jax.bench --config=configs/cifar10.py --batch=64 --compile_only  # no run
  python -m uni_instruct_jax.bench --config=configs/cifar10.py --batch=64 --memory_only --remat=block

Builds random-init teacher / fake score / generator of the config's real architecture (no
checkpoint, no dataset: real images are random data of the right shape), compiles the two step
programs the trainer runs (builders.PhaseSteps: the fake-score update, then the generator update
of one phase), warms them up, then times `--steps` calls of each and prints one JSON line:

  sec_per_kimg, images_per_sec   generated images per second, one batch per iteration (as SiD).
  sample_images_per_sec          one-step generator sampling (eval mode) at the same batch.
  step_ms                        {fake_score, generator, iteration} milliseconds per call.
  peak_memory_gb                 device peak GiB in use (null where the backend has none).
  compiled_memory_gb             XLA's memory analysis of the iteration: the larger of the two
                                 programs' arguments + outputs + temporaries - aliased (donated)
                                 bytes, GiB (the programs run one after the other).
  residual_memory_gb             what one differentiated network forward keeps for its backward
                                 pass (JAX's vjp residuals w.r.t. params and input, train mode, at
                                 the global batch), GiB: the activation memory `network.remat`
                                 controls, counted by tracing only (any backend, no compile). The
                                 generator update holds three such passes at once (generator,
                                 teacher, fake score). XLA:CPU's compiled_memory_gb does not show
                                 remat (docs/performance.md); this does.
  compute_dtype, batch (global), params_m (one network, millions), devices, device_kind,
  flops_per_image                XLA's count for all passes of one iteration, per image.
  flops_ratio                    XLA FLOPs of the generator program / the fake-score program.
  analytic_fwd_equivalents       the passes one iteration must run, in network forwards (see
                                 analytic_fwd_equivalents and docs/performance.md).
  xla_flops_ratio                XLA FLOPs of the iteration / (analytic_fwd_equivalents x XLA FLOPs
                                 of one network forward at the same batch): 1 when nothing runs
                                 that the accounting does not name.
  mfu                            achieved FLOP/s over PEAK_FLOPS[device_kind] (null if unknown).

Timings exclude compilation and warm-up; every call is synchronised with block_until_ready. With
--compile_only nothing runs: the timing fields are null. Progress (calls done / total, rate, ETA)
goes to stderr; stdout holds only the JSON line. The generator update is timed in the phase past
the warm-up and SiD-only ones (images_seen set beyond loss.sid_kimg; steps.phase_at), so that it
runs the configured divergence + GAN loss.
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
from uni_instruct_jax import losses
from uni_instruct_jax import nets as nets_lib
from uni_instruct_jax import parallel
from uni_instruct_jax import progress
from uni_instruct_jax import steps as steps_lib
from uni_instruct_jax import train_state as ts
from uni_instruct_jax.networks import layers

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_integer("batch", 0, "Global batch (0: the config's training.batch_size).")
flags.DEFINE_integer("steps", 10, "Timed calls of each function after warm-up.")
flags.DEFINE_integer("warmup", 2, "Untimed calls after compilation.")
flags.DEFINE_enum("compute_dtype", None, ["bfloat16", "float32"],
                  "Network compute dtype (params, losses and Adam stay float32); default: config.")
flags.DEFINE_bool("compile_only", False, "Compile and analyse (FLOPs, memory) without running.")
flags.DEFINE_bool("memory_only", False, "Only residual_memory_gb (traced, no compile; seconds).")
flags.DEFINE_enum("remat", None, list(layers.REMAT_POLICIES),
                  "UNet block rematerialisation (network.remat); default: config.")
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


def _analysis(compiled) -> Dict[str, Any]:
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return {}
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return analysis or {}


def _flops(compiled) -> Optional[float]:
  """XLA's FLOP count of a compiled program (per device), or None."""
  flops = _analysis(compiled).get("flops")
  return float(flops) if flops and flops > 0 else None


def compiled_memory_gb(compiled) -> Optional[float]:
  """XLA's memory analysis of a compiled program: arguments + outputs + temporaries - aliased
  (donated inputs reused as outputs count once), GiB; None where the backend has none."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return total / 2 ** 30


def _peak_memory_gb() -> Optional[float]:
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2 ** 30


def analytic_fwd_equivalents(encoder_share: float, trains_discriminator: bool,
                             augment_share: float) -> float:
  """Network forwards one iteration must run (docs/performance.md): a forward = 1, a backward to
  the inputs = 1, a backward to inputs and parameters = 2, an encoder-only pass = encoder_share.

  fake-score update: generator forward (no grad) 1 + fake forward/backward (params) on x_g 3
    + [discriminator: encoder forward/backward (params) on real data 3 * encoder_share]
    + the augment pipe on x_g and on the real batch (2 * augment_share, forward only);
  generator update: generator forward/backward (params) 3 + teacher forward + input-backward 2
    + fake forward + input-backward 2 (the discriminator logits come from that same forward).
  """
  fake = 1 + 3 + (3 * encoder_share if trains_discriminator else 0.0) + 2 * augment_share
  return fake + 3 + 2 + 2


def residual_memory_gb(nets, frozen, params, data) -> float:
  """GiB of the residuals jax.vjp keeps from one fake-network forward (train mode, w.r.t. params
  and input) for its backward pass, at the batch of `data`; traced with eval_shape, no compute."""
  labels = data["label"] if nets.label_dim else None
  sigma = jnp.ones((data["image"].shape[0],), jnp.float32)
  variables = nets_lib.variables(params, frozen["buffers"])

  def forward(v, x):
    return nets.fake.apply(v, x, sigma, labels, None, train=True,
                           rngs={"dropout": jax.random.key(0)})

  residuals = jax.eval_shape(lambda v, x: jax.vjp(forward, v, x)[1], variables, data["image"])
  return sum(r.size * r.dtype.itemsize for r in jax.tree.leaves(residuals)) / 2 ** 30


def _forward_flops(nets, frozen, params, data, augment_pipe):
  """XLA FLOPs (total over devices) of one fake-network forward, of its encoder alone, and of one
  augment-pipe call, at the global batch."""
  labels = data["label"] if nets.label_dim else None
  sigma = jnp.ones((data["image"].shape[0],), jnp.float32)
  variables = nets_lib.variables(params, frozen["buffers"])

  def count(fn, *args):
    return _flops(jax.jit(fn).lower(*args).compile())

  forward = count(lambda v, x: nets.fake.apply(v, x, sigma, labels, None), variables, data["image"])
  encoder = count(lambda v, x: nets.fake.apply(v, x, sigma, labels, None, method="encode"),
                  variables, data["image"])
  augment = 0.0
  if augment_pipe is not None:
    augment = count(lambda k, x: augment_pipe(k, x), jax.random.key(0), data["image"]) or 0.0
  return forward, encoder, augment


def benchmark(config, steps: int = 10, warmup: int = 2, compile_only: bool = False,
              memory_only: bool = False) -> Dict[str, Any]:
  """Times one distillation iteration of `config` on random data; returns the JSON record.
  memory_only: trace only (seconds, no compile): residual_memory_gb and the run's shape."""
  config = config.copy_and_resolve_references()
  config.teacher.source = "random"
  batch = config.training.batch_size
  mesh = parallel.make_mesh(config.mesh.model_parallelism)
  nets, frozen, init_params = builders.build_image_nets(config)
  step_cfg = builders.step_config(config)
  gen_tx, fake_tx = builders.make_optimizers(config)
  augment_pipe = builders.make_augment_pipe(config)
  fns = steps_lib.make_step_fns(nets, step_cfg, gen_tx, fake_tx, augment_pipe)

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
  if memory_only:
    return {"residual_memory_gb": residual_memory_gb(nets, frozen, params[1], data),
            "compute_dtype": str(config.network.dtype), "remat": config.network.remat,
            "batch": batch, "params_m": sum(x.size for x in jax.tree.leaves(params[0])) / 1e6}
  # Past warm-up and the SiD-only phase: the generator runs the configured divergence loss.
  late = int(max(step_cfg.sid_images, step_cfg.warmup_images, 0)) + batch
  phase = steps_lib.phase_at(late, step_cfg)
  state = jax.jit(fresh_state, out_shardings=state_shardings)(params)
  state = state.replace(images_seen=jax.device_put(jnp.asarray(late, jnp.int32),
                                                   state_shardings.images_seen))

  shardings = (state_shardings, parallel.data_sharding(mesh), jax.tree.map(lambda _: replicated,
                                                                           frozen))
  step_fns = {"fake_score": fns.fake_score_update,
              "generator": functools.partial(fns.generator_update, phase=phase)}
  print(f"bench: compiling {len(step_fns)} step programs", file=sys.stderr, flush=True)
  compiled = {name: jax.jit(fn, in_shardings=shardings, out_shardings=(state_shardings, replicated),
                            donate_argnums=(0,)).lower(state, data, frozen).compile()
              for name, fn in step_fns.items()}
  devices = len(jax.devices())
  flops = {name: _flops(c) for name, c in compiled.items()}
  memory = [compiled_memory_gb(c) for c in compiled.values()]
  fwd, enc, aug = _forward_flops(nets, frozen, params[1], data, augment_pipe)
  analytic = None
  if fwd and enc:
    trains_disc = any(losses.reads_discriminator(o) for o in steps_lib.phase_options(step_cfg))
    analytic = analytic_fwd_equivalents(enc / fwd, trains_disc, aug / fwd)
  iteration_flops = None if None in flops.values() else sum(flops.values()) * devices
  record = {
      "compiled_memory_gb": None if None in memory else max(memory),
      "residual_memory_gb": residual_memory_gb(nets, frozen, params[1], data),
      "compute_dtype": str(config.network.dtype),
      "remat": config.network.remat,
      "batch": batch,
      "params_m": sum(x.size for x in jax.tree.leaves(params[0])) / 1e6,
      "devices": devices,
      "device_kind": jax.devices()[0].device_kind,
      "flops_per_image": None if iteration_flops is None else iteration_flops / batch,
      "flops_ratio": (flops["generator"] / flops["fake_score"]
                      if iteration_flops is not None else None),
      "analytic_fwd_equivalents": analytic,
      "xla_flops_ratio": (iteration_flops / (analytic * fwd)
                          if analytic and iteration_flops is not None else None),
  }
  timing = dict.fromkeys(("sec_per_kimg", "images_per_sec", "sample_images_per_sec", "step_ms",
                          "peak_memory_gb", "mfu"))
  if compile_only:
    return {**timing, **record, "steps": 0}

  holder = {"state": state}

  def call(name):
    holder["state"], metrics = compiled[name](holder["state"], data, frozen)
    return metrics

  def iteration():
    return steps_lib.merge_metrics(call("fake_score"), call("generator"))

  def generate(params, key):
    z = jax.random.normal(key, (batch,) + nets.data_shape, jnp.float32)
    return nets_lib.generate(nets, params, frozen["buffers"], z,
                             labels if nets.label_dim else None, config.training.sigma_init)
  sampler = jax.jit(generate).lower(state.ema_params, jax.random.key(0)).compile()

  timed = {"fake_score": lambda: call("fake_score"), "generator": lambda: call("generator"),
           "iteration": iteration,
           "sample": lambda: sampler(holder["state"].ema_params, jax.random.key(0))}
  seconds = {}
  report = progress.Progress("bench", len(timed) * (warmup + steps), unit="calls")
  for name, fn in timed.items():
    for _ in range(warmup):
      jax.block_until_ready(fn())
      report.advance()
    seconds[name] = _time(fn, steps, report)

  images_per_sec = batch / seconds["iteration"]
  peak = peak_flops(record["device_kind"], record["compute_dtype"])
  mfu = None
  if peak and record["flops_per_image"]:
    mfu = record["flops_per_image"] * images_per_sec / (peak * devices)
  timing.update(
      sec_per_kimg=1000.0 / images_per_sec, images_per_sec=images_per_sec,
      sample_images_per_sec=batch / seconds["sample"],
      step_ms={k: 1e3 * seconds[k] for k in ("fake_score", "generator", "iteration")},
      peak_memory_gb=_peak_memory_gb(), mfu=mfu)
  return {**timing, **record, "steps": steps}


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
    if FLAGS.remat is not None:
      config.network.remat = FLAGS.remat
  record = {"config": config_flags.get_config_filename(FLAGS["config"]),
            **benchmark(config, FLAGS.steps, FLAGS.warmup, FLAGS.compile_only,
                        FLAGS.memory_only)}
  print(json.dumps(record), flush=True)


if __name__ == "__main__":
  app.run(main)
