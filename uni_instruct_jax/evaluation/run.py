"""Sampling and evaluation of a run: EMA snapshots, --mode=sample, --mode=eval, --mode=ref, and
FID of the EMA generator during training (best state kept in W/checkpoints-best)."""

import json
import pathlib
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from uni_instruct_jax import builders
from uni_instruct_jax import nets as nets_lib
from uni_instruct_jax import parallel
from uni_instruct_jax import sampling
from uni_instruct_jax import train_state as ts
from uni_instruct_jax.evaluation import evaluate as ev
from uni_instruct_jax.evaluation import fid as fid_lib
from uni_instruct_jax.evaluation import refs


def _jitted(run: builders.Run, name: str, fn: Callable) -> Callable:
  """jax.jit(fn), made once per run under `name`, so snapshots and evaluations compile once."""
  if name not in run.jit_cache:
    run.jit_cache[name] = jax.jit(fn)
  return run.jit_cache[name]


def sample_ema(run: builders.Run, num: int, seed: int) -> np.ndarray:
  """num one-step samples [num, *data_shape] of the EMA generator (fixed seed; labels cycle)."""
  key = jax.random.key(seed)
  z = jax.random.normal(key, (num,) + run.nets.data_shape, jnp.float32)
  labels = None
  if run.nets.label_dim:
    labels = jax.nn.one_hot(jnp.arange(num) % run.nets.label_dim, run.nets.label_dim)
  sample_fn = _jitted(run, "sample_ema", lambda p, b, z, l: nets_lib.generate(
      run.nets, p, b, z, l, run.config.training.sigma_init))
  return parallel.to_host(sample_fn(run.state.ema_params, run.frozen["buffers"], z, labels))


def write_snapshot(run: builders.Run, name: str) -> pathlib.Path:
  """PNG of EMA generator samples: an image grid, or a student-vs-data scatter for the toy."""
  if jax.process_index() != 0:
    return run.workdir / name
  path = run.workdir / name
  if hasattr(run.mixture, "to_images"):  # an image_mixture.ImageMixture: 8x8 grid of images
    sampling.save_image_grid(run.mixture.to_images(sample_ema(run, 64, run.config.sample.seed)),
                             path, (8, 8))
  elif run.mixture is not None:
    from uni_instruct_jax import toy  # pylint: disable=g-import-not-at-top
    student = sample_ema(run, 4000, run.config.sample.seed)
    data = np.asarray(run.mixture.sample(jax.random.key(run.config.sample.seed + 1), 4000))
    toy.write_scatter_png(path, student, data, centres=run.mixture.means)
  else:
    grid = run.config.sample.grid
    images = sample_ema(run, grid * grid, run.config.sample.seed)
    sampling.save_image_grid(images, path, (grid, grid))
  return path


def sample(config: ml_collections.ConfigDict, workdir: str) -> pathlib.Path:
  """--mode=sample: EMA generator samples of the latest checkpoint of `workdir` as a PNG
  (grid, or toy scatter) plus an .npz of config.sample.num_samples raw samples."""
  if not (pathlib.Path(workdir) / "checkpoints").exists():
    raise builders.SetupError(f"no checkpoints in --workdir {workdir}; train first")
  run = builders.setup(config, workdir, write_config=False)
  step = int(run.meta.get("step", 0))
  samples = sample_ema(run, config.sample.num_samples, config.sample.seed)
  out = run.workdir / f"samples-{step:08d}.npz"
  np.savez(out, samples=samples, step=step)
  png = write_snapshot(run, f"samples-{step:08d}.png")
  run.checkpointer.close()
  print(f"wrote {out} and {png}", flush=True)
  return out


def _generator_batches(run: builders.Run, params: Any, num: int, batch_size: int, seed: int):
  """uint8 [batch_size, H, W, C] one-step samples of `params`; batch i uses key fold_in(seed, i)
  for its latents and (conditional nets) random labels, so every evaluation sees the same seeds."""
  def gen(p, buffers, key):
    denoise = lambda x, s, c: nets_lib.apply(run.nets.gen, p, buffers, x, s, c, train=False,
                                             key=None)
    return sampling.to_uint8(sampling.one_step_generate(
        denoise, key, batch_size, run.nets.data_shape, label_dim=run.nets.label_dim,
        sigma_init=run.config.training.sigma_init))
  gen = _jitted(run, f"generate_uint8_{batch_size}", gen)
  for i in range(-(-num // batch_size)):
    yield parallel.to_host(gen(params, run.frozen["buffers"],
                               jax.random.fold_in(jax.random.key(seed), i)))


def _teacher_batches(run: builders.Run, num: int, batch_size: int, seed: int, num_steps: int):
  """uint8 batches of the teacher's Heun sampler with `num_steps` steps (2 N - 1 NFE)."""
  def sample_fn(tv, key):
    k_x, k_c = jax.random.split(key)
    latents = jax.random.normal(k_x, (batch_size,) + run.nets.data_shape, jnp.float32)
    labels = sampling.make_class_labels(k_c, batch_size, run.nets.label_dim)
    return sampling.to_uint8(sampling.heun_sampler(
        lambda x, s, c: run.nets.teacher(tv, x, s, c), latents, labels, num_steps=num_steps))
  sample_fn = jax.jit(sample_fn)
  for i in range(-(-num // batch_size)):
    yield np.asarray(sample_fn(run.frozen["teacher"], jax.random.fold_in(jax.random.key(seed), i)))


def _folder_batches(config, path: str = ""):
  """(dataset, uint8 batch iterable factory) over every image of config.data, or of the folder /
  zip at `path` when given, unshuffled."""
  from uni_instruct_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  data_config = ml_collections.ConfigDict(config.data.to_dict())
  if path:
    data_config.update(path=path, source="folder")
  data_config.update(shuffle=False, prefetch=0)
  try:
    dataset = data_lib.create_dataset(data_config, 1, 0, 0, 1)
  except (ValueError, OSError) as e:
    raise builders.SetupError(f"cannot open images {path or data_config.path!r}: {e}") from e
  return dataset, lambda: dataset.uint8_batches(config.eval.batch_size)


def _fid_of(run: builders.Run, detector, params: Any) -> Dict[str, Any]:
  cfg = run.config.eval
  return ev.evaluate(detector, _generator_batches(run, params, cfg.num_samples, cfg.batch_size,
                                                  cfg.seed), cfg.num_samples, cfg.ref)


def evaluate_during_training(run: builders.Run, step: int, best: Optional[float]) -> float:
  """FID of the EMA generator at `step`; keeps the best state in W/checkpoints-best (the
  official save_best_and_last). Returns the best headline metric so far."""
  result = _fid_of(run, run.detector, run.state.ema_params)
  kimg = step * run.config.training.batch_size // 1000
  ev.write_eval_json(run.workdir, kimg, result)
  value = result[result["metric"]]
  print(f"eval at kimg {kimg}: {result['metric']} {value:.4f}", flush=True)
  if best is None or value < best:
    best_ckpt = ts.Checkpointer(run.workdir, 1, name="checkpoints-best")
    best_ckpt.save(step, run.state, {"step": step, result["metric"]: value})
    best_ckpt.close()
    return value
  return best


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """--mode=eval: metrics of the EMA generator of `workdir`'s latest checkpoint (or of the
  teacher's Heun sampler with eval.teacher_steps steps, or of the images at eval.images),
  written to W/eval-<kimg>.json and appended to W/metrics.jsonl."""
  cfg = config.eval
  detector = builders.load_detector(config, parallel.make_mesh())
  try:  # before any sampling: a statistics file made with this detector at this resolution
    refs.check_reference(cfg.ref, detector, config.data.resolution or None)
  except fid_lib.StatisticsError as e:
    raise builders.SetupError(str(e)) from e
  if cfg.images:
    dataset, batches = _folder_batches(config, cfg.images)
    num = min(cfg.num_samples, dataset.num_examples)
    result = ev.evaluate(detector, batches, num, cfg.ref)
    result["source"] = str(cfg.images)
    ev.write_eval_json(workdir, 0, result)
    return result
  if not cfg.teacher_steps and not (pathlib.Path(workdir) / "checkpoints").exists():
    raise builders.SetupError(f"no checkpoints in --workdir {workdir}; train first (or set "
                     "config.eval.teacher_steps / config.eval.images)")
  run = builders.setup(config, workdir, write_config=False)
  kimg = int(run.meta.get("step", 0)) * config.training.batch_size // 1000
  if cfg.teacher_steps:
    batches = _teacher_batches(run, cfg.num_samples, cfg.batch_size, cfg.seed, cfg.teacher_steps)
    result = ev.evaluate(detector, batches, cfg.num_samples, cfg.ref)
    result.update(source="teacher", nfe=sampling.nfe(cfg.teacher_steps))
  else:
    result = _fid_of(run, detector, run.state.ema_params)
    result["source"] = "ema_generator"
  ev.write_eval_json(run.workdir, kimg, result)
  run.checkpointer.close()
  print(json.dumps(result, indent=2), flush=True)
  return result


def make_reference(config: ml_collections.ConfigDict, workdir: str) -> pathlib.Path:
  """--mode=ref: reference statistics of config.data's images (or eval.images) as
  W/<detector>-ref.npz (mu, sigma, metadata, a feature subset for KID/precision/recall)."""
  detector = builders.load_detector(config, parallel.make_mesh())
  _, batches = _folder_batches(config, config.eval.images)
  out = pathlib.Path(workdir) / f"{detector.name}-ref.npz"
  try:
    ev.make_reference(detector, batches, out)
  except ValueError as e:
    raise builders.SetupError(str(e)) from e
  print(f"wrote {out}", flush=True)
  return out
