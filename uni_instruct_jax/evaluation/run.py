"""Sampling and evaluation of a run: EMA snapshots, --mode=sample, --mode=eval, --mode=ref, and
FID of the EMA generator during training (best state kept in W/checkpoints-best). Long jobs print
progress lines on stderr (process 0; `progress.Progress`)."""

import json
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from uni_instruct_jax import builders
from uni_instruct_jax import image_folder
from uni_instruct_jax import nets as nets_lib
from uni_instruct_jax import parallel
from uni_instruct_jax import progress as progress_lib
from uni_instruct_jax import paths
from uni_instruct_jax import sampling
from uni_instruct_jax import train_state as ts
from uni_instruct_jax.evaluation import evaluate as ev
from uni_instruct_jax.evaluation import fid as fid_lib
from uni_instruct_jax.evaluation import refs


def _jitted(run: builders.Run, name: str, fn: Callable, **jit_kwargs) -> Callable:
  """jax.jit(fn, **jit_kwargs), made once per run under `name`, so snapshots and evaluations
  compile once."""
  if name not in run.jit_cache:
    run.jit_cache[name] = jax.jit(fn, **jit_kwargs)
  return run.jit_cache[name]


def _progress(label: str, total: int = 0) -> Optional[progress_lib.Progress]:
  """A stderr progress callback on process 0, None on the others."""
  return progress_lib.Progress(label, total) if jax.process_index() == 0 else None


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


def write_snapshot(run: builders.Run, name: str) -> epath.Path:
  """PNG of EMA generator samples: an image grid, or a student-vs-data scatter for the toy."""
  if jax.process_index() != 0:
    return run.workdir / name
  path = run.workdir / name
  if hasattr(run.mixture, "to_images"):  # an image_mixture.ImageMixture: 8x8 grid of images
    flat = sample_ema(run, 64, run.config.sample.seed).reshape(64, -1)  # MLP or image networks
    sampling.save_image_grid(run.mixture.to_images(flat), path, (8, 8))
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


def write_sample_folder(run: builders.Run, out_dir: str) -> epath.Path:
  """EMA-generator images of seeds sample.seed ... sample.seed + sample.num_samples - 1 as an EDM
  generate.py folder (image_folder: OUT/000000/000000.png ..., labels in OUT/dataset.json), which
  EDM's fid.py reads. Process 0 generates and writes alone (all processes gather the parameters).
  Raises SetupError for an unusable `out_dir` (it must be new or empty)."""
  cfg = run.config.sample
  params, buffers = run.state.ema_params, run.frozen["buffers"]
  if jax.process_count() > 1:  # process 0's jit below must not need the other hosts' shards
    params, buffers = parallel.to_host((params, buffers))
  if jax.process_index() != 0:
    return paths.workdir_path(out_dir)
  gen = _jitted(run, "generate_uint8", lambda p, b, z, l: sampling.to_uint8(nets_lib.generate(
      run.nets, p, b, z, l, run.config.training.sigma_init)))
  try:
    return image_folder.write_generated_folder(
        lambda z, l: np.asarray(gen(params, buffers, z, l)),  # local: no collective
        seeds=range(cfg.seed, cfg.seed + cfg.num_samples), shape=run.nets.data_shape,
        label_dim=run.nets.label_dim, out_dir=out_dir, batch_size=cfg.batch_size,
        progress=_progress("sample"))
  except image_folder.ImageFolderError as e:
    raise builders.SetupError(f"--config.sample.outdir: {e}") from e


def sample(config: ml_collections.ConfigDict, workdir: str) -> epath.Path:
  """--mode=sample: EMA generator samples of the latest checkpoint of `workdir`: with
  config.sample.outdir, config.sample.num_samples PNGs in EDM's generate.py layout there
  (`write_sample_folder`); otherwise a PNG (grid, or toy scatter) plus an .npz of the raw samples
  in the workdir."""
  if not (paths.workdir_path(workdir) / "checkpoints").exists():
    raise builders.SetupError(f"no checkpoints in --workdir {workdir}; train first")
  if config.sample.outdir and config.data.source == "toy":
    raise builders.SetupError("--config.sample.outdir writes images; the toy's samples are 2-D "
                              "points (leave it empty for the .npz and scatter plot)")
  run = builders.setup(config, workdir, write_config=False)
  step = int(run.meta.get("step", 0))
  if config.sample.outdir:
    out = write_sample_folder(run, config.sample.outdir)
    run.checkpointer.close()
    print(f"wrote {config.sample.num_samples} images of step {step} to {out}", flush=True)
    return out
  samples = sample_ema(run, config.sample.num_samples, config.sample.seed)
  out = run.workdir / f"samples-{step:08d}.npz"
  if jax.process_index() == 0:
    with paths.open_file(out, "wb") as f:
      np.savez(f, samples=samples, step=step)
  png = write_snapshot(run, f"samples-{step:08d}.png")
  run.checkpointer.close()
  print(f"wrote {out} and {png}", flush=True)
  return out


def _generator_batches(run: builders.Run, params: Any, num: int, batch_size: int, seed: int):
  """This process's rows (parallel.process_rows) of uint8 [batch_size, H, W, C] one-step samples
  of `params`, generated batch-sharded where batch_size divides by the 'data' axis; batch i uses
  key fold_in(seed, i) for its latents and (conditional nets) random labels, so every evaluation
  sees the same seeds. No image leaves its host: the detector gathers only features."""
  sigma_init = run.config.training.sigma_init

  def gen(p, buffers, key):
    if run.nets.gen_is_denoiser:
      generator = lambda x, s, c: nets_lib.apply(run.nets.gen, p, buffers, x, s, c, train=False,
                                                 key=None)
    else:  # a registered generator maps z = x / sigma_init (one_step_generate's x = sigma_init z)
      generator = lambda x, s, c: nets_lib.generate(run.nets, p, buffers, x / sigma_init, c,
                                                    sigma_init)
    return sampling.to_uint8(sampling.one_step_generate(
        generator, key, batch_size, run.nets.data_shape, label_dim=run.nets.label_dim,
        sigma_init=sigma_init))
  sharded = batch_size % parallel.data_size(run.mesh) == 0
  out = parallel.data_sharding(run.mesh) if sharded else parallel.replicated(run.mesh)
  gen = _jitted(run, f"generate_uint8_{batch_size}", gen, out_shardings=out)
  for i in range(-(-num // batch_size)):
    yield parallel.process_rows(gen(params, run.frozen["buffers"],
                                    jax.random.fold_in(jax.random.key(seed), i)))


def _teacher_batches(run: builders.Run, num: int, batch_size: int, seed: int, num_steps: int):
  """This process's rows of uint8 batches of the teacher's Heun sampler with `num_steps` steps
  (2 N - 1 NFE)."""
  def sample_fn(tv, key):
    k_x, k_c = jax.random.split(key)
    latents = jax.random.normal(k_x, (batch_size,) + run.nets.data_shape, jnp.float32)
    labels = sampling.make_class_labels(k_c, batch_size, run.nets.label_dim)
    return sampling.to_uint8(sampling.heun_sampler(
        lambda x, s, c: run.nets.teacher(tv, x, s, c), latents, labels, num_steps=num_steps))
  sample_fn = jax.jit(sample_fn)
  for i in range(-(-num // batch_size)):
    yield parallel.process_rows(sample_fn(run.frozen["teacher"],
                                          jax.random.fold_in(jax.random.key(seed), i)))


def _folder_batches(config, path: str = ""):
  """(dataset, factory of this process's rows of uint8 batches) over every image of config.data,
  or of the folder / zip at `path` when given, unshuffled."""
  from uni_instruct_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  data_config = ml_collections.ConfigDict(config.data.to_dict())
  if path:
    data_config.update(path=path, source="folder")
  data_config.update(shuffle=False, prefetch=0)
  try:
    dataset = data_lib.create_dataset(data_config, 1, 0, 0, 1)
  except (ValueError, OSError) as e:
    raise builders.SetupError(f"cannot open images {path or data_config.path!r}: {e}") from e
  return dataset, lambda: map(parallel.process_rows,
                              dataset.uint8_batches(config.eval.batch_size))


def _fid_of(run: builders.Run, detector, params: Any) -> Dict[str, Any]:
  cfg = run.config.eval
  return ev.evaluate(detector, _generator_batches(run, params, cfg.num_samples, cfg.batch_size,
                                                  cfg.seed), cfg.num_samples, cfg.ref,
                     progress=_progress("eval"))


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
    result = ev.evaluate(detector, batches, num, cfg.ref, progress=_progress("eval"))
    result["source"] = str(cfg.images)
    ev.write_eval_json(workdir, 0, result)
    return result
  if not cfg.teacher_steps and not (paths.workdir_path(workdir) / "checkpoints").exists():
    raise builders.SetupError(f"no checkpoints in --workdir {workdir}; train first (or set "
                     "config.eval.teacher_steps / config.eval.images)")
  run = builders.setup(config, workdir, write_config=False)
  kimg = int(run.meta.get("step", 0)) * config.training.batch_size // 1000
  if cfg.teacher_steps:
    batches = _teacher_batches(run, cfg.num_samples, cfg.batch_size, cfg.seed, cfg.teacher_steps)
    result = ev.evaluate(detector, batches, cfg.num_samples, cfg.ref, progress=_progress("eval"))
    result.update(source="teacher", nfe=sampling.nfe(cfg.teacher_steps))
  else:
    result = _fid_of(run, detector, run.state.ema_params)
    result["source"] = "ema_generator"
  ev.write_eval_json(run.workdir, kimg, result)
  run.checkpointer.close()
  print(json.dumps(result, indent=2), flush=True)
  return result


def make_reference(config: ml_collections.ConfigDict, workdir: str) -> epath.Path:
  """--mode=ref: reference statistics of config.data's images (or eval.images) as
  W/<detector>-ref.npz (mu, sigma, metadata, a feature subset for KID/precision/recall)."""
  detector = builders.load_detector(config, parallel.make_mesh())
  dataset, batches = _folder_batches(config, config.eval.images)
  out = paths.workdir_path(workdir) / f"{detector.name}-ref.npz"
  try:
    ev.make_reference(detector, batches, out, progress=_progress("ref", dataset.num_examples))
  except ValueError as e:
    raise builders.SetupError(str(e)) from e
  print(f"wrote {out}", flush=True)
  return out
