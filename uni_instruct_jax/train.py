"""The distillation trainer: `train_and_evaluate(config, workdir)`.

Reading order for a newcomer:
  1. `setup(config, workdir)` validates every input (config, workdir, data, teacher, checkpoint)
     and builds the networks, the state and the jitted step; it raises `SetupError` before any
     compute, so bad input never touches what is already in the workdir.
  2. `make_step_fns(...)` returns the pure function `train_step(state, batch, frozen)`:
     one fake-score + discriminator update, then one generator update (skipped during warm-up),
     then the generator EMA (spec §3.2). Phases are selected by images seen inside the step.
  3. `train_and_evaluate` runs the loop: ticks (status line, metrics.jsonl, TensorBoard),
     snapshots (EMA sample grids), checkpoints (orbax, resumable bitwise) and summary.json.
"""

import dataclasses
import json
import math
import pathlib
import resource
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from uni_instruct_jax import augment as augment_lib
from uni_instruct_jax import divergences
from uni_instruct_jax import losses
from uni_instruct_jax import parallel
from uni_instruct_jax import sampling
from uni_instruct_jax import train_state as ts
from uni_instruct_jax.networks import mlp

# Config keys a resumed run may change (run length, logging, evaluation); anything else differing
# from the workdir's saved config.json makes setup refuse to resume.
RESUMABLE_CHANGES = ("training.total_kimg", "training.tick_kimg", "training.snapshot_ticks",
                     "ckpt.", "eval.", "sample.")


class SetupError(ValueError):
  """Bad input detected before any compute (config, paths, teacher/data mismatch, checkpoint)."""


# --------------------------------------------------------------------------------------------
# Networks


@dataclasses.dataclass(frozen=True)
class Nets:
  """The three denoisers. `gen` and `fake` are Linen preconditioners (same architecture);
  `teacher(frozen_teacher, x, sigma, labels)` is the frozen teacher's D(x, sigma)."""
  gen: Any
  fake: Any
  teacher: Callable[..., jnp.ndarray]
  data_shape: Tuple[int, ...]     # per-sample shape, e.g. (32, 32, 3) or (2,).
  label_dim: int


def _variables(params: Any, buffers: Any) -> Dict[str, Any]:
  return {"params": params, **({"buffers": buffers} if buffers else {})}


def _apply(module, params, buffers, x, sigma, labels, *, train, key, augment_labels=None,
           return_features=False):
  """module.apply with the design's calling convention; dropout rng only when training."""
  rngs = {"dropout": key} if train else None
  return module.apply(_variables(params, buffers), x, sigma, labels, augment_labels, train=train,
                      return_features=return_features, rngs=rngs)


def generate(nets: Nets, params: Any, buffers: Any, z: jnp.ndarray, labels: Optional[jnp.ndarray],
             sigma_init: float, *, train: bool = False, key=None) -> jnp.ndarray:
  """One-step generator x_g = G(sigma_init * z, sigma_init, labels); z [B, *data_shape] ~ N(0, I)."""
  sigma = jnp.full((z.shape[0],), sigma_init, jnp.float32)
  return _apply(nets.gen, params, buffers, sigma_init * z, sigma, labels, train=train, key=key)


# --------------------------------------------------------------------------------------------
# The step


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of `train_step` (hashable; baked into the compiled step)."""
  batch_size: int
  num_micro: int
  sigma_init: float
  warmup_images: int
  sid_images: int
  schedule: Tuple[Tuple[int, str], ...]      # ((start_images, divergence), ...), sorted.
  method: str
  mode: str
  tmax: int
  loss_scale: float
  option_overrides: Tuple[Tuple[str, Any], ...]
  fake_grad_clip: float
  ema_halflife_kimg: float
  ema_rampup: Optional[float]


def loss_preset(method: str, mode: str) -> str:
  """The losses.method_options preset: 'uni_instruct' + mode 'official' is the released recipe
  ('uni_instruct_official'); other methods carry their own mode."""
  if method == "uni_instruct" and mode == "official":
    return "uni_instruct_official"
  if method == "uni_instruct" and mode != "exact":
    raise ValueError(f"config.loss.mode must be 'official' or 'exact', got {mode!r}")
  return method


def phase_options(cfg: StepConfig) -> List[Dict[str, Any]]:
  """generator_loss kwargs of each generator phase: [SiD-only (alpha 1, no GAN), schedule...]."""
  preset = loss_preset(cfg.method, cfg.mode)
  sid = losses.method_options("sid", alpha=1.0)
  main = [losses.method_options(preset, div if preset in _DIVERGENCE_METHODS else None,
                                **dict(cfg.option_overrides))
          for _, div in cfg.schedule]
  return [sid] + main


_DIVERGENCE_METHODS = ("uni_instruct", "uni_instruct_official", "f_distill")


def _sanitize(tree: Any) -> Tuple[Any, jnp.ndarray]:
  """nan -> 0, +-inf -> +-1e5 (spec §1.6); also returns the number of non-finite entries."""
  bad = sum(jnp.sum(~jnp.isfinite(g)) for g in jax.tree.leaves(tree))
  return jax.tree.map(lambda g: jnp.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5), tree), bad


def _masked_mean(per_sample: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Mean over the batch of the finite entries (NaN samples dropped, spec §3.2) and their count."""
  ok = jnp.isfinite(per_sample)
  return jnp.where(ok, per_sample, 0.0).mean(), jnp.sum(~ok)


def _noisy(noise: jnp.ndarray, sigma: jnp.ndarray) -> jnp.ndarray:
  """sigma [B] * noise [B, ...] (unit-variance noise scaled per sample)."""
  return noise * sigma.reshape((-1,) + (1,) * (noise.ndim - 1))


def _micro_batches(tree: Any, num_micro: int) -> Any:
  """[B, ...] -> [num_micro, B / num_micro, ...] taking every num_micro-th row, so each
  micro-batch keeps an equal share on every device of the 'data' axis."""
  def split(x):
    x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, tree)


def _accumulate(grad_fn: Callable, params: Any, batch: Any, key, num_micro: int):
  """Mean of (grads, metrics) of `grad_fn(params, micro_batch, key)` over micro-batches."""
  if num_micro == 1:
    return grad_fn(params, batch, key)
  micro = _micro_batches(batch, num_micro)

  def body(carry, inputs):
    i, mb = inputs
    grads, metrics = grad_fn(params, mb, jax.random.fold_in(key, i))
    return jax.tree.map(jnp.add, carry, (grads, metrics)), None

  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
      grad_fn, params, jax.tree.map(lambda x: x[0], micro), key))
  total, _ = jax.lax.scan(body, zeros, (jnp.arange(num_micro), micro))
  return jax.tree.map(lambda x: x / num_micro, total)


class StepFns(NamedTuple):
  """The pure step functions, each `(state, batch, frozen) -> (state, metrics)`."""
  fake_score_update: Callable
  generator_update: Callable
  train_step: Callable        # fake_score_update, then generator_update.


def make_step_fns(nets: Nets, cfg: StepConfig, gen_tx: optax.GradientTransformation,
                  fake_tx: optax.GradientTransformation,
                  augment_pipe: Optional[augment_lib.AugmentPipe]) -> StepFns:
  """Builds the step functions (train_step = one fake-score then one generator update).

  batch: {'image': [B, *data_shape] real data in data units, 'label': [B, label_dim]}.
  frozen: {'teacher': teacher variables, 'buffers': generator/fake 'buffers' collection or {}}.
  metrics: dict of float32 scalars over the global batch.
  """
  phase_opts = phase_options(cfg)
  gan_on = any(o["gan_weight"] != 0.0 or o.get("ratio_source") == "official_bce"
               for o in phase_opts)
  official_disc = cfg.mode == "official"
  starts = jnp.asarray([s for s, _ in cfg.schedule], jnp.int32)

  def labels_of(batch):
    return batch["label"] if nets.label_dim else None

  def fake_grad(fake_params, mb, key, gen_params, buffers):
    """Fake-score DSM + discriminator BCE on one micro-batch (spec §1.6)."""
    k_z, k_sigma, k_n, k_drop, k_aug = jax.random.split(key, 5)
    labels = labels_of(mb)
    x_real = mb["image"]
    z = jax.random.normal(k_z, x_real.shape, jnp.float32)
    x_g = jax.lax.stop_gradient(generate(nets, gen_params, buffers, z, labels, cfg.sigma_init))
    aug_labels = None
    if augment_pipe is not None:
      k_ag, k_ar = jax.random.split(k_aug)
      x_g, aug_labels = augment_pipe(k_ag, x_g)
      x_real, aug_real = augment_pipe(k_ar, x_real)
    sigma = losses.sample_fake_sigma(k_sigma, x_real.shape[0])
    noise = jax.random.normal(k_n, x_real.shape, jnp.float32)

    def loss_fn(p):
      k_d1, k_d2 = jax.random.split(k_drop)
      fake_features = []

      def denoise(x, s):
        d, feats = _apply(nets.fake, p, buffers, x, s, labels, train=True, key=k_d1,
                          augment_labels=aug_labels, return_features=True)
        fake_features.append(feats)
        return d

      dsm = losses.fake_score_loss(denoise, x_g, sigma, noise)
      metrics = {"loss_fake": dsm}
      total = dsm
      if gan_on:
        feats_real = nets.fake.apply(
            _variables(p, buffers), x_real + _noisy(noise, sigma), sigma, labels,
            aug_real if augment_pipe is not None else None, train=True, method="encode",
            rngs={"dropout": k_d2})
        disc = losses.discriminator_loss(losses.discriminator_logits(feats_real),
                                         losses.discriminator_logits(fake_features[0]), sigma,
                                         batch_mean=official_disc)
        total = total + disc
        metrics["loss_disc"] = disc
      mean, nan_samples = _masked_mean(total)
      metrics = {k: _masked_mean(v)[0] for k, v in metrics.items()}
      metrics["nan_samples"] = nan_samples.astype(jnp.float32)
      return mean, metrics

    grads, metrics = jax.grad(loss_fn, has_aux=True)(fake_params)
    return grads, metrics

  def gen_grad(gen_params, mb, key, fake_params, teacher_vars, buffers, branch):
    """Generator loss of phase `branch` (0: SiD-only, k: schedule entry k-1) on one micro-batch."""
    k_z, k_sigma, k_n, k_drop = jax.random.split(key, 4)
    labels = labels_of(mb)
    shape = mb["image"].shape
    z = jax.random.normal(k_z, shape, jnp.float32)
    sigma = losses.sample_generator_sigma(k_sigma, shape[0], tmax=cfg.tmax)
    noise = jax.random.normal(k_n, shape, jnp.float32)
    fake_params = jax.lax.stop_gradient(fake_params)

    def teacher_fn(x, s):
      return nets.teacher(teacher_vars, x, s, labels)

    def fake_fn(x, s):
      return _apply(nets.fake, fake_params, buffers, x, s, labels, train=False, key=None)

    def encode_logits(x, s):
      feats = nets.fake.apply(_variables(fake_params, buffers), x, s, labels, None, train=False,
                              method="encode")
      return losses.discriminator_logits(feats.astype(jnp.float32))

    def branch_fn(opts):
      """Per-sample loss and statistics of one phase (the discriminator only runs if used)."""
      needs_logits = (opts["gan_weight"] != 0.0 or opts.get("ratio_source") == "official_bce"
                      or opts["divergence"] != "reverse_kl")
      return lambda x_g: losses.generator_loss(
          x_g, sigma, noise, teacher_fn, fake_fn, None, return_aux=True,
          logits_fn=encode_logits if needs_logits else None, **opts)

    def loss_fn(p):
      x_g = generate(nets, p, buffers, z, labels, cfg.sigma_init, train=True, key=k_drop)
      per_sample, aux = jax.lax.switch(branch, [branch_fn(o) for o in phase_opts], x_g)
      mean, nan_samples = _masked_mean(per_sample)
      metrics = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items() if k != "nan_count"}
      metrics["loss_gen"] = mean
      metrics["nan_samples"] = nan_samples.astype(jnp.float32) + aux["nan_count"]
      return cfg.loss_scale * mean, metrics

    return jax.grad(loss_fn, has_aux=True)(gen_params)

  def step_keys(state):
    """(fake-score key, generator key) of this step: fold_in(rng, step), split."""
    return jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step))

  def fake_score_update(state: ts.TrainState, batch: Dict[str, jnp.ndarray],
                        frozen: Dict[str, Any]):
    """1. Fake score + discriminator (every step): new fake_params / fake_opt."""
    f_grads, metrics = _accumulate(
        lambda p, mb, k: fake_grad(p, mb, k, state.gen_params, frozen["buffers"]),
        state.fake_params, batch, step_keys(state)[0], cfg.num_micro)
    f_grads, f_bad = _sanitize(f_grads)
    if gan_on and cfg.fake_grad_clip:
      f_grads = jax.tree.map(lambda g: jnp.clip(g, -cfg.fake_grad_clip, cfg.fake_grad_clip),
                             f_grads)
    f_updates, fake_opt = fake_tx.update(f_grads, state.fake_opt, state.fake_params)
    metrics["nan_grads"] = f_bad.astype(jnp.float32)
    return state.replace(fake_params=optax.apply_updates(state.fake_params, f_updates),
                         fake_opt=fake_opt), metrics

  def generator_update(state: ts.TrainState, batch: Dict[str, jnp.ndarray],
                       frozen: Dict[str, Any]):
    """2. Generator against the current fake score (skipped during the warm-up; phase by images
    seen before this step), 3. generator EMA, then step / images_seen advance."""
    nimg = state.images_seen
    branch = jnp.where(nimg < cfg.sid_images, 0, jnp.sum(nimg >= starts))

    def gen_update(_):
      grads, metrics = _accumulate(
          lambda p, mb, k: gen_grad(p, mb, k, state.fake_params, frozen["teacher"],
                                    frozen["buffers"], branch),
          state.gen_params, batch, step_keys(state)[1], cfg.num_micro)
      grads, bad = _sanitize(grads)
      updates, gen_opt = gen_tx.update(grads, state.gen_opt, state.gen_params)
      metrics["nan_grads"] = bad.astype(jnp.float32)
      return optax.apply_updates(state.gen_params, updates), gen_opt, metrics

    def gen_skip(_):
      metrics = jax.eval_shape(gen_update, None)[2]
      return state.gen_params, state.gen_opt, jax.tree.map(jnp.zeros_like, metrics)

    warm = nimg < cfg.warmup_images
    gen_params, gen_opt, metrics = jax.lax.cond(warm, gen_skip, gen_update, None)
    images_seen = nimg + cfg.batch_size
    beta = ts.ema_beta(cfg.batch_size, images_seen, cfg.ema_halflife_kimg, cfg.ema_rampup)
    metrics["generator_phase"] = jnp.where(warm, 0, branch + 1).astype(jnp.float32)
    metrics["ema_beta"] = beta
    return state.replace(gen_params=gen_params, gen_opt=gen_opt,
                         ema_params=ts.ema_update(state.ema_params, gen_params, beta),
                         step=state.step + 1, images_seen=images_seen), metrics

  def train_step(state: ts.TrainState, batch: Dict[str, jnp.ndarray], frozen: Dict[str, Any]):
    """One distillation iteration: fake_score_update then generator_update."""
    state, f_metrics = fake_score_update(state, batch, frozen)
    state, g_metrics = generator_update(state, batch, frozen)
    metrics = {**f_metrics, **g_metrics}
    for key in ("nan_samples", "nan_grads"):
      metrics[key] = f_metrics[key] + g_metrics[key]
    return state, metrics

  return StepFns(fake_score_update, generator_update, train_step)


# --------------------------------------------------------------------------------------------
# Setup (everything that validates input; raises SetupError before any training compute)


def parse_schedule(loss_config: ml_collections.ConfigDict) -> Tuple[Tuple[int, str], ...]:
  """((start_images, divergence), ...) from loss.schedule 'KIMG:NAME,...' or loss.divergence."""
  known = set(divergences.names())
  if not loss_config.schedule:
    entries = [(0, loss_config.divergence)]
  else:
    entries = []
    for item in str(loss_config.schedule).split(","):
      kimg, sep, name = item.strip().partition(":")
      try:
        entries.append((int(round(float(kimg) * 1000)), name.strip()))
      except ValueError:
        sep = ""
      if not sep:
        raise SetupError(f"config.loss.schedule entry {item!r} is not 'KIMG:DIVERGENCE'")
    entries.sort()
  for _, name in entries:
    if name not in known:
      raise SetupError(f"unknown divergence {name!r} in config.loss (known: {sorted(known)})")
  return tuple(entries)


def _flatten_config(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def _check_saved_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Refuses to resume a workdir whose saved config differs beyond RESUMABLE_CHANGES."""
  path = workdir / "config.json"
  if not path.exists():
    return
  try:
    saved = _flatten_config(json.loads(path.read_text()))
  except (ValueError, OSError) as e:
    raise SetupError(f"{path} is not readable JSON ({e}); move it away to start afresh") from e
  current = _flatten_config(json.loads(config.to_json_best_effort()))
  differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
  refused = [k for k in differing if not k.startswith(RESUMABLE_CHANGES)]
  if refused:
    shown = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in refused[:3])
    raise SetupError(f"workdir {workdir} holds a run with a different config ({shown}"
                     f"{', ...' if len(refused) > 3 else ''}); use another --workdir")
  for k in differing:
    logging.warning("config %s changed on resume: %r -> %r", k, saved.get(k), current.get(k))


class ToyDataset:
  """Endless exact samples of a toy mixture; deterministic per (seed, process, batch index)."""

  def __init__(self, mixture, local_batch: int, seed: int, process_index: int,
               state: Optional[Dict[str, Any]] = None):
    self.mixture = mixture
    self.local_batch = local_batch
    self._key = jax.random.fold_in(jax.random.key(seed), process_index)
    self._index = int((state or {}).get("batch_index", 0))
    self._sample = jax.jit(mixture.sample, static_argnums=1)
    self.label_dim = 0

  def next(self) -> Dict[str, np.ndarray]:
    x = np.asarray(self._sample(jax.random.fold_in(self._key, self._index), self.local_batch))
    self._index += 1
    return {"image": x, "label": np.zeros((self.local_batch, 0), np.float32)}

  def state(self) -> Dict[str, Any]:
    return {"batch_index": self._index}


def _fit_to_teacher(module, params, teacher_fn: Callable, sample_fn: Callable, key,
                    steps: int, batch: int, lr: float):
  """Regresses an MLP denoiser onto the exact teacher (EDM-weighted, log-uniform sigma in
  [0.002, 80]) so the toy generator and fake score start from "the teacher network"."""
  tx = optax.adam(lr)

  def loss_fn(p, k):
    k_x, k_s, k_n = jax.random.split(k, 3)
    x0 = sample_fn(k_x, batch)
    sigma = jnp.exp(jax.random.uniform(k_s, (batch,), minval=math.log(0.002),
                                       maxval=math.log(80.0)))
    x = x0 + _noisy(jax.random.normal(k_n, x0.shape), sigma)
    err = module.apply({"params": p}, x, sigma) - teacher_fn(x, sigma)
    return jnp.mean(losses.edm_weight(sigma) * jnp.sum(jnp.square(err), axis=-1))

  @jax.jit
  def fit(p, k):
    def body(carry, k_i):
      p, opt = carry
      grads = jax.grad(loss_fn)(p, k_i)
      updates, opt = tx.update(grads, opt, p)
      return (optax.apply_updates(p, updates), opt), None
    (p, _), _ = jax.lax.scan(body, (p, tx.init(p)), jax.random.split(k, steps))
    return p

  return fit(params, key)


def _build_toy(config, mixture):
  """(Nets, frozen, init_params(key) -> (generator, fake-score) params) for the toy: exact
  teacher; generator and fake score both start from an MLP denoiser fitted to it."""
  kwargs = dict(config.network.kwargs)
  module = mlp.MLPPrecond(dim=mixture.dim, sigma_data=mixture.data_std, dtype=jnp.float32,
                          **{k: tuple(v) if isinstance(v, (list, tuple)) else v
                             for k, v in kwargs.items()})
  nets = Nets(gen=module, fake=module, teacher=lambda _, x, s, labels: mixture.denoiser(x, s),
              data_shape=(mixture.dim,), label_dim=0)

  def init_params(key):
    k_init, k_fit = jax.random.split(key)
    x = jnp.zeros((1, mixture.dim))
    params = module.init(k_init, x, jnp.ones((1,)))["params"]
    fitted = _fit_to_teacher(module, params, mixture.denoiser, mixture.sample, k_fit,
                             steps=config.teacher.fit_steps, batch=config.teacher.fit_batch,
                             lr=config.teacher.fit_lr)
    return fitted, fitted
  return nets, {"teacher": {}, "buffers": {}}, init_params


def _load_teacher(source: str, path: str, config, what: str = "config.teacher.path"):
  """(module, variables) of an image network: source 'random' (config.network, variables None),
  'pkl' (an EDM snapshot at `path`) or 'converted' (a directory from uni_instruct_jax.convert),
  computing in config.network.dtype; `what` names the path's config field in errors."""
  dtype = jnp.dtype(config.network.dtype)
  if source == "random":
    from uni_instruct_jax.networks import build_network  # pylint: disable=g-import-not-at-top
    module, variables = build_network(config.network.class_name,
                                      config.network.kwargs.to_dict(), dtype), None
  elif source not in ("pkl", "converted"):
    raise SetupError(f"config.teacher.source must be pkl|converted|random|toy, got {source!r}")
  elif not path or not pathlib.Path(path).exists():
    raise SetupError(f"{what} {path!r} does not exist (source {source!r})")
  else:
    try:
      if source == "pkl":
        from uni_instruct_jax.convert import load_edm_pickle  # pylint: disable=g-import-not-at-top
        module, variables = load_edm_pickle(path, dtype)
      else:
        from uni_instruct_jax.checkpoint import load_teacher  # pylint: disable=g-import-not-at-top
        module, variables = load_teacher(path, dtype=dtype)
    except (ValueError, OSError, KeyError) as e:
      raise SetupError(f"cannot load {what} {path!r}: {e}") from e
  if config.network.attn_implementation:
    module = module.clone(attn_implementation=config.network.attn_implementation)
  return module, variables


def build_image_nets(config, dataset=None):
  """(Nets, frozen teacher variables, init_params(key) -> (generator, fake-score) params) for
  image teachers; checks the teacher against `dataset` (resolution, channels, label_dim) unless
  it is None."""
  module, variables = _load_teacher(config.teacher.source, config.teacher.path, config)
  res, ch, label_dim = module.img_resolution, module.img_channels, module.label_dim
  if dataset is None:  # benchmarks: no data to check against
    pass
  elif (res, ch) != (dataset.resolution, dataset.num_channels):
    raise SetupError(f"teacher is {res}x{res}x{ch} but the dataset is {dataset.resolution}x"
                     f"{dataset.resolution}x{dataset.num_channels} (config.data.resolution)")
  elif label_dim != dataset.label_dim:
    raise SetupError(f"teacher label_dim {label_dim} != dataset label_dim {dataset.label_dim} "
                     f"(config.data.use_labels)")
  data_shape = (res, res, ch)
  augment_dim = dict(module.model_kwargs).get("augment_dim", 0)

  def init_variables(key):
    x = jnp.zeros((1,) + data_shape)
    labels = jnp.zeros((1, label_dim)) if label_dim else None
    aug = jnp.zeros((1, augment_dim)) if augment_dim else None
    return module.init({"params": key, "dropout": key}, x, jnp.ones((1,)), labels, aug)

  if variables is None:  # random teacher: deterministic from the seed
    variables = jax.jit(init_variables)(jax.random.key(config.seed + 17))
  variables = dict(variables)
  buffers = variables.get("buffers", {})
  teacher_vars = variables

  def teacher(tv, x, s, labels):
    return module.apply(tv, x, s, labels, None, train=False)

  nets = Nets(gen=module, fake=module, teacher=teacher, data_shape=data_shape,
              label_dim=label_dim)

  gen_params = variables["params"]
  if config.generator.init == "sid":  # SiD-init: the generator starts from a distilled network
    path = config.generator.sid_path
    _, sid_vars = _load_teacher("pkl" if str(path).endswith(".pkl") else "converted",
                                path, config, "config.generator.sid_path")
    if jax.tree.structure(sid_vars["params"]) != jax.tree.structure(gen_params):
      raise SetupError(f"SiD-init generator {path!r} does not have the teacher's architecture")
    gen_params = sid_vars["params"]
  elif config.generator.init != "teacher":
    raise SetupError(f"config.generator.init must be teacher|sid, got {config.generator.init!r}")

  def init_params(key):
    del key
    return gen_params, variables["params"]  # the fake score always starts from the teacher

  return nets, {"teacher": teacher_vars, "buffers": buffers}, init_params


@dataclasses.dataclass
class Run:
  """Everything `setup` validated and built."""
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  mesh: Any
  nets: Nets
  dataset: Any
  frozen: Dict[str, Any]
  state: ts.TrainState
  state_shardings: Any
  step_fn: Callable
  checkpointer: ts.Checkpointer
  meta: Dict[str, Any]          # restored checkpoint metadata ({} for a fresh run).
  total_steps: int
  tick_steps: int
  mixture: Any                  # toy.GaussianMixture or None.
  detector: Any = None          # FID detector when eval.every_ticks > 0.
  jit_cache: Dict[str, Callable] = dataclasses.field(default_factory=dict)  # see _jitted.


def _steps(config) -> Tuple[int, int]:
  batch = config.training.batch_size
  total = max(1, int(math.ceil(config.training.total_kimg * 1000 / batch)))
  tick = max(1, int(math.ceil(config.training.tick_kimg * 1000 / batch)))
  return total, tick


def step_config(config: ml_collections.ConfigDict) -> StepConfig:
  """The static StepConfig of a run config (SetupError on a bad batch split or schedule)."""
  batch = config.training.batch_size
  micro = config.training.micro_batch_size or batch
  if batch <= 0 or batch % micro:
    raise SetupError(f"training.batch_size {batch} must be a positive multiple of "
                     f"training.micro_batch_size {micro}")
  return StepConfig(
      batch_size=batch, num_micro=batch // micro, sigma_init=config.training.sigma_init,
      warmup_images=int(config.loss.warmup_kimg * 1000), sid_images=int(config.loss.sid_kimg * 1000),
      schedule=parse_schedule(config.loss), method=config.loss.method, mode=config.loss.mode,
      tmax=config.loss.tmax, loss_scale=config.loss.scale,
      option_overrides=tuple(sorted(config.loss.overrides.to_dict().items())),
      fake_grad_clip=config.optim.fake_grad_clip,
      ema_halflife_kimg=config.ema.halflife_kimg,
      ema_rampup=config.ema.rampup_ratio if config.ema.rampup_ratio else None)


def make_optimizers(config: ml_collections.ConfigDict):
  """(generator Adam, fake-score Adam) of config.optim."""
  o = config.optim
  return (ts.make_optimizer(o.gen_lr, o.b1, o.b2, o.eps), ts.make_optimizer(o.lr, o.b1, o.b2, o.eps))


def make_augment_pipe(config: ml_collections.ConfigDict):
  """The fake-score AugmentPipe of config.fake_score.augment (None when disabled)."""
  try:
    return augment_lib.build_augment_pipe(config.fake_score.augment)
  except ValueError as e:
    raise SetupError(f"config.fake_score.augment: {e}") from e


def setup(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Validates inputs and builds the run; raises SetupError on bad input (nothing written yet
  except the workdir directory itself and, for a fresh run, config.json)."""
  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise SetupError(f"--workdir {workdir} exists and is not a directory")
  step_cfg = step_config(config)  # validates the batch split and the divergence schedule
  batch = config.training.batch_size
  micro = config.training.micro_batch_size or batch
  try:
    mesh = parallel.make_mesh(config.mesh.model_parallelism)
    local_batch = parallel.local_batch_size(batch, mesh)
    if micro % parallel.data_size(mesh):
      raise ValueError(f"micro-batch {micro} is not divisible by the "
                       f"{parallel.data_size(mesh)} devices of the 'data' axis")
  except ValueError as e:
    raise SetupError(str(e)) from e
  _check_saved_config(config, workdir)

  checkpointer = None
  if (workdir / "checkpoints").exists():
    checkpointer = ts.Checkpointer(workdir, config.ckpt.keep)
  latest = checkpointer.latest_step() if checkpointer else None

  mixture = None
  if config.teacher.source == "toy":
    from uni_instruct_jax import toy  # pylint: disable=g-import-not-at-top
    mixture = toy.GaussianMixture.ring(num_modes=config.data.num_modes)
    nets, frozen, init_params = _build_toy(config, mixture)
    dataset_factory = lambda state: ToyDataset(mixture, local_batch, config.seed,
                                               jax.process_index(), state)
  else:
    from uni_instruct_jax import data as data_lib  # pylint: disable=g-import-not-at-top

    def dataset_factory(state):
      try:
        return data_lib.create_dataset(config.data, batch, config.seed, jax.process_index(),
                                       jax.process_count(), state=state)
      except (ValueError, OSError) as e:
        raise SetupError(f"cannot open dataset {config.data.path!r}: {e}") from e
    dataset = dataset_factory(None)
    nets, frozen, init_params = build_image_nets(config, dataset)

  gen_tx, fake_tx = make_optimizers(config)
  augment_pipe = make_augment_pipe(config)
  try:
    train_step = make_step_fns(nets, step_cfg, gen_tx, fake_tx, augment_pipe).train_step
  except (ValueError, KeyError) as e:
    raise SetupError(f"config.loss: {e}") from e

  def fresh_state(params):
    return ts.create_state(*params, gen_tx, fake_tx, config.seed)

  init_key = jax.random.key(config.seed)
  abstract = jax.eval_shape(fresh_state, jax.eval_shape(init_params, init_key))
  state_shardings = parallel.param_shardings(mesh, abstract)
  meta = {}
  if latest is not None:
    try:
      state, meta = checkpointer.restore(ts.abstract_like(abstract, state_shardings), latest)
    except ts.CheckpointError as e:
      raise SetupError(str(e)) from e
  else:
    state = None
  dataset = dataset_factory(meta.get("data"))

  replicated = parallel.replicated(mesh)
  batch_shardings = parallel.data_sharding(mesh)
  frozen_shardings = jax.tree.map(lambda _: replicated, frozen)
  step_fn = jax.jit(train_step, in_shardings=(state_shardings, batch_shardings, frozen_shardings),
                    out_shardings=(state_shardings, replicated), donate_argnums=(0,))

  detector = None
  if config.eval.every_ticks:
    if not config.eval.ref or not pathlib.Path(config.eval.ref).is_file():
      raise SetupError(f"config.eval.every_ticks needs config.eval.ref; {config.eval.ref!r} is "
                       "not a file")
    detector = _detector(config, mesh)

  # Validation done: persist the resolved config, then build the initial state (compute).
  workdir.mkdir(parents=True, exist_ok=True)
  config_json = config.to_json_best_effort(indent=2, sort_keys=True)
  config_path = workdir / "config.json"
  if not config_path.exists() or config_path.read_text() != config_json:
    config_path.write_text(config_json)
  if checkpointer is None:
    checkpointer = ts.Checkpointer(workdir, config.ckpt.keep)
  if state is None:  # the toy's teacher fit runs here, only for a fresh run
    state = jax.jit(fresh_state, out_shardings=state_shardings)(init_params(init_key))
  frozen = jax.device_put(frozen, frozen_shardings)
  total_steps, tick_steps = _steps(config)
  return Run(config=config, workdir=workdir, mesh=mesh, nets=nets, dataset=dataset,
             frozen=frozen, state=state, state_shardings=state_shardings, step_fn=step_fn,
             checkpointer=checkpointer, meta=meta, total_steps=total_steps,
             tick_steps=tick_steps, mixture=mixture, detector=detector)


# --------------------------------------------------------------------------------------------
# Loop helpers: metrics, status line, snapshots, summary


class MetricsLog:
  """W/metrics.jsonl (one JSON record per tick) and TensorBoard (process 0 only)."""

  def __init__(self, workdir: pathlib.Path, resume_step: int):
    self.path = workdir / "metrics.jsonl"
    self.enabled = jax.process_index() == 0
    self.writer = None
    if not self.enabled:
      return
    if self.path.exists():  # drop records written after the checkpoint we resume from
      kept = [line for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line).get("step", 0) <= resume_step]
      self.path.write_text("".join(line + "\n" for line in kept))
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.writer = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, record: Dict[str, Any]) -> None:
    if not self.enabled:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")
    for k, v in record.items():
      if isinstance(v, (int, float)) and k not in ("step", "tick"):
        self.writer.add_scalar(k, v, record["step"])
    self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def _memory_gb() -> float:
  """Peak host RSS in GiB (Linux reports KiB), plus device peak bytes where the backend has them."""
  host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  stats = jax.local_devices()[0].memory_stats() or {}
  return host + stats.get("peak_bytes_in_use", 0) / 2**30


def _status_line(record: Dict[str, Any], total_kimg: float) -> str:
  frac = min(record["kimg"] / total_kimg, 1.0)
  bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
  eta = record["sec_per_kimg"] * max(total_kimg - record["kimg"], 0.0)
  parts = [f"[{bar}] {100 * frac:5.1f}%", f"kimg {record['kimg']:.1f}",
           f"sec/kimg {record['sec_per_kimg']:.2f}", f"ETA {eta / 60:.1f} min"]
  for key in ("loss_fake", "loss_disc", "loss_gen", "r_mean", "r_min", "r_max"):
    if key in record:
      parts.append(f"{key} {record[key]:.4g}")
  parts.append(f"nan {int(record['nan_samples'] + record['nan_grads'])}")
  parts.append(f"mem {record['memory_gb']:.2f}GB")
  return " | ".join(parts)


def _jitted(run: Run, name: str, fn: Callable) -> Callable:
  """jax.jit(fn), made once per run under `name`, so snapshots and evaluations compile once."""
  if name not in run.jit_cache:
    run.jit_cache[name] = jax.jit(fn)
  return run.jit_cache[name]


def _sample_ema(run: Run, num: int, seed: int) -> np.ndarray:
  """num one-step samples [num, *data_shape] of the EMA generator (fixed seed; labels cycle)."""
  key = jax.random.key(seed)
  z = jax.random.normal(key, (num,) + run.nets.data_shape, jnp.float32)
  labels = None
  if run.nets.label_dim:
    labels = jax.nn.one_hot(jnp.arange(num) % run.nets.label_dim, run.nets.label_dim)
  sample = _jitted(run, "sample_ema", lambda p, b, z, l: generate(
      run.nets, p, b, z, l, run.config.training.sigma_init))
  return parallel.to_host(sample(run.state.ema_params, run.frozen["buffers"], z, labels))


def write_snapshot(run: Run, name: str) -> pathlib.Path:
  """PNG of EMA generator samples: an image grid, or a student-vs-data scatter for the toy."""
  if jax.process_index() != 0:
    return run.workdir / name
  path = run.workdir / name
  if run.mixture is not None:
    from uni_instruct_jax import toy  # pylint: disable=g-import-not-at-top
    student = _sample_ema(run, 4000, run.config.sample.seed)
    data = np.asarray(run.mixture.sample(jax.random.key(run.config.sample.seed + 1), 4000))
    toy.write_scatter_png(path, student, data, centres=run.mixture.means)
  else:
    grid = run.config.sample.grid
    images = _sample_ema(run, grid * grid, run.config.sample.seed)
    sampling.save_image_grid(images, path, (grid, grid))
  return path


def toy_metrics(run: Run, num: int = 20_000) -> Dict[str, Any]:
  """The embedded default's acceptance numbers (sliced W2 over 256 fixed directions)."""
  from uni_instruct_jax import toy  # pylint: disable=g-import-not-at-top
  mixture = run.mixture
  data = np.asarray(mixture.sample(jax.random.key(10_001), num))
  student = _sample_ema(run, num, 10_002)
  latents = jax.random.normal(jax.random.key(10_003), (num, mixture.dim), jnp.float32)
  teacher = np.asarray(sampling.heun_sampler(
      lambda x, s, _: mixture.denoiser(x, s), latents, num_steps=18))
  covered, _ = mixture.modes_covered(student)
  return {
      "metric_name": "sliced_w2",
      "student_metric": toy.sliced_w2(student, data, 0, num_directions=256),
      "teacher_metric": toy.sliced_w2(teacher, data, 0, num_directions=256),
      "teacher_nfe": sampling.nfe(18),
      "student_modes_covered": covered,
      "num_modes": mixture.num_modes,
  }


# --------------------------------------------------------------------------------------------
# Entry point


def _checkpoint_meta(run: Run, step: int, extra: Dict[str, Any]) -> Dict[str, Any]:
  return {"step": step, "images_seen": step * run.config.training.batch_size,
          "data": run.dataset.state(), **extra}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Runs (or resumes) a distillation run in `workdir`; returns the summary dict.

  Raises SetupError on bad input before any compute. Rerunning a finished run changes nothing.
  """
  run = setup(config, workdir)
  workdir = run.workdir
  start_step = int(run.meta.get("step", 0))
  summary_path = workdir / "summary.json"
  if start_step >= run.total_steps and summary_path.exists():
    print(f"run in {workdir} already finished at step {start_step}; nothing to do", flush=True)
    run.checkpointer.close()
    return json.loads(summary_path.read_text())

  extra = {k: run.meta[k] for k in ("init_metric",) if k in run.meta}
  if run.mixture is not None and "init_metric" not in extra:
    extra["init_metric"] = toy_metrics(run)["student_metric"]  # EMA == generator at step 0
  if start_step == 0:
    write_snapshot(run, "fakes_init.png")
    run.checkpointer.save(0, run.state, _checkpoint_meta(run, 0, extra))
  log = MetricsLog(workdir, start_step)
  batch = config.training.batch_size
  total_kimg = run.total_steps * batch / 1000
  print(f"training {run.total_steps} steps ({total_kimg:.1f} kimg) from step {start_step} in "
        f"{workdir} on {jax.device_count()} device(s)", flush=True)

  state, step, pending = run.state, start_step, []
  tick_start = time.time()
  tick_step = step
  while step < run.total_steps:
    global_batch = parallel.global_batch(run.mesh, run.dataset.next())
    state, metrics = run.step_fn(state, global_batch, run.frozen)
    pending.append(metrics)
    step += 1
    if step % run.tick_steps and step != run.total_steps:
      continue
    # Tick: the only host sync of the loop.
    tick = step // run.tick_steps
    means = jax.tree.map(lambda *xs: float(np.mean(xs)), *parallel.to_host(pending))
    pending = []
    elapsed = time.time() - tick_start
    record = {"step": step, "tick": tick, "kimg": step * batch / 1000,
              "sec_per_kimg": elapsed / max((step - tick_step) * batch / 1000, 1e-9),
              "memory_gb": _memory_gb(), **means}
    log.write(record)
    print(_status_line(record, total_kimg), flush=True)
    run.state = state
    done = step == run.total_steps
    if done or tick % config.ckpt.every_ticks == 0:
      run.checkpointer.save(step, state, _checkpoint_meta(run, step, extra))
    if done or tick % config.training.snapshot_ticks == 0:
      write_snapshot(run, f"fakes_{step * batch // 1000:06d}.png")
    if run.detector is not None and (done or tick % config.eval.every_ticks == 0):
      extra["best_metric"] = _evaluate_during_training(run, step, extra.get("best_metric"))
    tick_start, tick_step = time.time(), step

  run.state = state
  summary = {"steps": step, "kimg": step * batch / 1000, "resumed_from_step": start_step,
             "generator_params_sha256": ts.params_sha256(parallel.to_host(state.ema_params)),
             "num_devices": jax.device_count()}
  if run.mixture is not None:
    summary.update(toy_metrics(run), init_metric=extra["init_metric"])
    write_snapshot(run, "scatter.png")
  if jax.process_index() == 0:
    summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
  log.close()
  run.checkpointer.close()
  return summary


def sample(config: ml_collections.ConfigDict, workdir: str) -> pathlib.Path:
  """--mode=sample: EMA generator samples of the latest checkpoint of `workdir` as a PNG
  (grid, or toy scatter) plus an .npz of config.sample.num_samples raw samples."""
  if not (pathlib.Path(workdir) / "checkpoints").exists():
    raise SetupError(f"no checkpoints in --workdir {workdir}; train first")
  run = setup(config, workdir)
  step = int(run.meta.get("step", 0))
  samples = _sample_ema(run, config.sample.num_samples, config.sample.seed)
  out = run.workdir / f"samples-{step:08d}.npz"
  np.savez(out, samples=samples, step=step)
  png = write_snapshot(run, f"samples-{step:08d}.png")
  run.checkpointer.close()
  print(f"wrote {out} and {png}", flush=True)
  return out


# --------------------------------------------------------------------------------------------
# Evaluation: --mode=eval, --mode=ref, and FID of the EMA generator during training


def _detector(config, mesh):
  """The configured feature network (eval.detector 'inception' | 'proxy'), or SetupError."""
  from uni_instruct_jax.evaluation import evaluate as ev  # pylint: disable=g-import-not-at-top
  kind = config.eval.detector or "inception"
  try:
    return ev.load_detector(kind, config.eval.detector_path or None,
                            config.eval.resize_mode if kind == "inception" else None, mesh=mesh)
  except (ValueError, OSError) as e:
    raise SetupError(f"config.eval.detector {kind!r}: {e}") from e


def _generator_batches(run: Run, params: Any, num: int, batch_size: int, seed: int):
  """uint8 [batch_size, H, W, C] one-step samples of `params`; batch i uses key fold_in(seed, i)
  for its latents and (conditional nets) random labels, so every evaluation sees the same seeds."""
  def gen(p, buffers, key):
    denoise = lambda x, s, c: _apply(run.nets.gen, p, buffers, x, s, c, train=False, key=None)
    return sampling.to_uint8(sampling.one_step_generate(
        denoise, key, batch_size, run.nets.data_shape, label_dim=run.nets.label_dim,
        sigma_init=run.config.training.sigma_init))
  gen = _jitted(run, f"generate_uint8_{batch_size}", gen)
  for i in range(-(-num // batch_size)):
    yield parallel.to_host(gen(params, run.frozen["buffers"],
                               jax.random.fold_in(jax.random.key(seed), i)))


def _teacher_batches(run: Run, num: int, batch_size: int, seed: int, num_steps: int):
  """uint8 batches of the teacher's Heun sampler with `num_steps` steps (2 N - 1 NFE)."""
  def sample(tv, key):
    k_x, k_c = jax.random.split(key)
    latents = jax.random.normal(k_x, (batch_size,) + run.nets.data_shape, jnp.float32)
    labels = sampling.make_class_labels(k_c, batch_size, run.nets.label_dim)
    return sampling.to_uint8(sampling.heun_sampler(
        lambda x, s, c: run.nets.teacher(tv, x, s, c), latents, labels, num_steps=num_steps))
  sample = jax.jit(sample)
  for i in range(-(-num // batch_size)):
    yield np.asarray(sample(run.frozen["teacher"], jax.random.fold_in(jax.random.key(seed), i)))


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
    raise SetupError(f"cannot open images {path or data_config.path!r}: {e}") from e
  return dataset, lambda: dataset.uint8_batches(config.eval.batch_size)


def _fid_of(run: Run, detector, params: Any) -> Dict[str, Any]:
  from uni_instruct_jax.evaluation import evaluate as ev  # pylint: disable=g-import-not-at-top
  cfg = run.config.eval
  return ev.evaluate(detector, _generator_batches(run, params, cfg.num_samples, cfg.batch_size,
                                                  cfg.seed), cfg.num_samples, cfg.ref)


def _evaluate_during_training(run: Run, step: int, best: Optional[float]) -> float:
  """FID of the EMA generator at `step`; keeps the best state in W/checkpoints-best (the
  official save_best_and_last). Returns the best headline metric so far."""
  from uni_instruct_jax.evaluation import evaluate as ev  # pylint: disable=g-import-not-at-top
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
  from uni_instruct_jax.evaluation import evaluate as ev  # pylint: disable=g-import-not-at-top
  cfg = config.eval
  if not cfg.ref or not pathlib.Path(cfg.ref).is_file():
    raise SetupError(f"config.eval.ref {cfg.ref!r} is not a reference statistics file "
                     "(EDM's fid-refs .npz, or one made with --mode=ref)")
  if cfg.images:
    detector = _detector(config, parallel.make_mesh())
    dataset, batches = _folder_batches(config, cfg.images)
    num = min(cfg.num_samples, dataset.num_examples)
    result = ev.evaluate(detector, batches, num, cfg.ref)
    result["source"] = str(cfg.images)
    ev.write_eval_json(workdir, 0, result)
    return result
  if not cfg.teacher_steps and not (pathlib.Path(workdir) / "checkpoints").exists():
    raise SetupError(f"no checkpoints in --workdir {workdir}; train first (or set "
                     "config.eval.teacher_steps / config.eval.images)")
  run = setup(config, workdir)
  detector = _detector(config, run.mesh)
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
  from uni_instruct_jax.evaluation import evaluate as ev  # pylint: disable=g-import-not-at-top
  detector = _detector(config, parallel.make_mesh())
  _, batches = _folder_batches(config, config.eval.images)
  out = pathlib.Path(workdir) / f"{detector.name}-ref.npz"
  try:
    ev.make_reference(detector, batches, out)
  except ValueError as e:
    raise SetupError(str(e)) from e
  print(f"wrote {out}", flush=True)
  return out
