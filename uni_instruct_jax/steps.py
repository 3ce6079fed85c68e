"""The pure step functions of one distillation iteration (spec §3.2).

Data flow of one iteration (two compiled programs, run one after the other on the host):
  1. `fake_score_update(state, batch, frozen)`: fake-score DSM + discriminator BCE on generator
     samples (every iteration; one program for the whole run).
  2. `generator_update(state, batch, frozen, phase)`: the generator loss of `phase` against the
     updated fake score (none in the warm-up), then the generator EMA and the step / images_seen
     advance (one program per phase).
The phase is a static Python int chosen on the host by `phase_at(images_seen, cfg)`: 0 warm-up
(fake score and discriminator only), 1 SiD-only, 1 + k the k-th entry of the divergence schedule.
No conditional runs around a gradient; `merge_metrics` joins the two programs' metrics.
"""

import dataclasses
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from uni_instruct_jax import augment as augment_lib
from uni_instruct_jax import losses
from uni_instruct_jax import nets as nets_lib
from uni_instruct_jax import train_state as ts

WARMUP = 0   # the phase without a generator update.
# Noise-level laws of the discriminator's training inputs: 'fake' = the fake score's
# ln sigma ~ N(-1.2, 1.2^2) (released code; shares the fake score's noisy pass), 'generator' = the
# generator step's Karras sigma of t ~ U[0, tmax/1000] (where r is read), 'mixture' = every other
# sample from each.
DISC_SIGMA_LAWS = ("fake", "generator", "mixture")
# Metrics that are counts: summed over micro-batches (the others are averaged).
COUNT_METRICS = ("nan_samples", "ratio_invalid_count") + tuple(
    f"sigma_bin{k}_count" for k in range(len(losses.SIGMA_BIN_EDGES) + 1))


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
  disc_sigma_law: str = ""                   # DISC_SIGMA_LAWS, '' = by mode (make_step_fns).
  fake_updates_per_gen: int = 1              # losses.method_settings (DMD2: 5).


def phase_at(images_seen: int, cfg: StepConfig) -> int:
  """The phase of the step taken after `images_seen` images (a host int, no device sync):
  0 warm-up, 1 SiD-only, 1 + k from the start of schedule entry k (1-based) on."""
  if images_seen < cfg.warmup_images:
    return WARMUP
  if images_seen < cfg.sid_images:
    return 1
  return 1 + sum(images_seen >= start for start, _ in cfg.schedule)


def loss_preset(method: str, mode: str) -> str:
  """The losses.method_options preset: 'uni_instruct' + mode 'official' is the released recipe
  ('uni_instruct_official'); other methods carry their own mode."""
  if method == "uni_instruct" and mode == "official":
    return "uni_instruct_official"
  if method == "uni_instruct" and mode != "exact":
    raise ValueError(f"config.loss.mode must be 'official' or 'exact', got {mode!r}")
  return method


def phase_options(cfg: StepConfig) -> List[Dict[str, Any]]:
  """generator_loss kwargs of each generator phase: [SiD-only (alpha 1, no GAN), schedule...];
  phase p >= 1 uses entry p - 1."""
  preset = loss_preset(cfg.method, cfg.mode)
  sid = losses.method_options("sid", alpha=1.0)
  main = [losses.method_options(preset, div if preset in losses.DIVERGENCE_METHODS else None,
                                **dict(cfg.option_overrides))
          for _, div in cfg.schedule]
  return [sid] + main




def disc_sigma(key, batch: int, law: str, tmax: int) -> jnp.ndarray:
  """Discriminator noise levels [batch] of `law` (DISC_SIGMA_LAWS); 'mixture' alternates the
  fake-score law (even rows) and the generator law (odd rows), so every device shard and
  micro-batch gets half of each."""
  if law not in DISC_SIGMA_LAWS:
    raise ValueError(f"disc_sigma_law must be one of {DISC_SIGMA_LAWS}, got {law!r}")
  k_f, k_g = jax.random.split(key)
  fake, gen = losses.sample_fake_sigma(k_f, batch), losses.sample_generator_sigma(k_g, batch, tmax)
  if law == "fake":
    return fake
  if law == "generator":
    return gen
  return jnp.where(jnp.arange(batch) % 2 == 0, fake, gen)


def sample_labels(key, batch: int, label_dim: int) -> jnp.ndarray:
  """Uniform one-hot class labels [batch, label_dim] (float32; [batch, 0] when unconditional)."""
  if not label_dim:
    return jnp.zeros((batch, 0), jnp.float32)
  return jax.nn.one_hot(jax.random.randint(key, (batch,), 0, label_dim), label_dim)


def _sanitize(tree: Any) -> Tuple[Any, jnp.ndarray]:
  """nan -> 0, +-inf -> +-1e5 (spec §1.6); also returns the number of non-finite entries."""
  bad = sum(jnp.sum(~jnp.isfinite(g)) for g in jax.tree.leaves(tree))
  return jax.tree.map(lambda g: jnp.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5), tree), bad


def noisy(noise: jnp.ndarray, sigma: jnp.ndarray) -> jnp.ndarray:
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


def _finish_metrics(metrics: Dict[str, jnp.ndarray], num_micro: int) -> Dict[str, jnp.ndarray]:
  """Micro-batch means -> global values: COUNT_METRICS become sums, and log_r_sigma_bin{k} (carried
  as count-weighted sums) become means over the bin's samples of all micro-batches."""
  out = {k: v * num_micro if k in COUNT_METRICS else v for k, v in metrics.items()}
  for k in range(len(losses.SIGMA_BIN_EDGES) + 1):
    if f"log_r_sigma_bin{k}" in out:
      out[f"log_r_sigma_bin{k}"] = out[f"log_r_sigma_bin{k}"] * num_micro / jnp.maximum(
          out[f"sigma_bin{k}_count"], 1.0)
  return out


class StepFns(NamedTuple):
  """The pure step functions. fake_score_update(state, batch, frozen) -> (state, metrics);
  generator_update takes a fourth, static argument `phase` (see phase_at). One iteration is
  fake_score_update, then generator_update (metrics joined by merge_metrics)."""
  fake_score_update: Callable
  generator_update: Callable


def merge_metrics(fake: Dict[str, jnp.ndarray], gen: Dict[str, jnp.ndarray]
                  ) -> Dict[str, jnp.ndarray]:
  """The metrics of one iteration from those of its two updates (NaN counts summed)."""
  return {**fake, **gen, **{k: fake[k] + gen[k] for k in ("nan_samples", "nan_grads")}}


def make_step_fns(nets: nets_lib.Nets, cfg: StepConfig, gen_tx: optax.GradientTransformation,
                  fake_tx: optax.GradientTransformation,
                  augment_pipe: Optional[augment_lib.AugmentPipe]) -> StepFns:
  """Builds the step functions of one iteration (cfg.fake_updates_per_gen fake-score updates,
  then a generator update).

  batch: {'label': [B, label_dim]} and, when the discriminator trains, 'image': [B, *data_shape]
    real data in data units (a data-free run has no images).
  frozen: {'teacher': teacher variables, 'buffers': generator/fake 'buffers' collection or {}}.
  metrics: dict of float32 scalars over the global batch.
  """
  phase_opts = phase_options(cfg)
  # The discriminator trains whenever some phase reads r or the GAN term from it.
  disc_on = any(losses.reads_discriminator(o) for o in phase_opts)
  official_disc = cfg.mode == "official"
  # '' = by loss mode: the released law in 'official' mode, 'mixture' in 'exact' mode.
  disc_law = cfg.disc_sigma_law or ("fake" if cfg.mode == "official" else "mixture")

  def labels_of(batch):
    return batch["label"] if nets.label_dim else None

  def batch_shape(mb):
    return (mb["label"].shape[0],) + tuple(nets.data_shape)

  def fake_grad(fake_params, mb, key, gen_params, buffers):
    """Fake-score DSM + discriminator BCE on one micro-batch (spec §1.6)."""
    k_z, k_sigma, k_n, k_drop, k_aug, k_disc = jax.random.split(key, 6)
    labels = labels_of(mb)
    shape = batch_shape(mb)
    z = jax.random.normal(k_z, shape, jnp.float32)
    x_g = jax.lax.stop_gradient(nets_lib.generate(nets, gen_params, buffers, z, labels,
                                                  cfg.sigma_init))
    x_real = mb["image"] if disc_on else None
    aug_labels = aug_real = None
    if augment_pipe is not None:
      k_ag, k_ar = jax.random.split(k_aug)
      x_g, aug_labels = augment_pipe(k_ag, x_g)
      if disc_on:
        x_real, aug_real = augment_pipe(k_ar, x_real)
    sigma = losses.sample_fake_sigma(k_sigma, shape[0])
    noise = jax.random.normal(k_n, shape, jnp.float32)

    def loss_fn(p):
      k_d1, k_d2 = jax.random.split(k_drop)
      fake_features = []

      def denoise(x, s):
        d, feats = nets_lib.apply(nets.fake, p, buffers, x, s, labels, train=True, key=k_d1,
                                  augment_labels=aug_labels, return_features=True)
        fake_features.append(feats)
        return d

      def encode(x, s, aug, k):
        return nets.fake.apply(nets_lib.variables(p, buffers), x, s, labels, aug, train=True,
                               method="encode", rngs={"dropout": k})

      dsm, f_aux = losses.fake_score_loss(denoise, x_g, sigma, noise, return_aux=True)
      metrics = {"loss_fake": dsm.mean()}
      total = dsm
      nan_samples = f_aux["nan_count"]
      if disc_on:
        if disc_law == "fake":  # the released code: reuse the fake score's noisy pass
          s_d, n_d, feats_fake = sigma, noise, fake_features[0]
        else:
          k_s, k_n2, k_d3 = jax.random.split(k_disc, 3)
          s_d = disc_sigma(k_s, shape[0], disc_law, cfg.tmax)
          n_d = jax.random.normal(k_n2, shape, jnp.float32)
          x_ft, s_f, _ = losses.noisy_inputs(x_g, s_d, n_d, valid=f_aux["valid"])
          feats_fake = encode(x_ft, s_f, aug_labels, k_d3)
        x_rt, s_r, ok_r = losses.noisy_inputs(x_real, s_d, n_d, valid=f_aux["valid"])
        feats_real = encode(x_rt, s_r, aug_real, k_d2)
        disc, d_aux = losses.discriminator_loss(
            losses.discriminator_logits(feats_real), losses.discriminator_logits(feats_fake), s_r,
            batch_mean=official_disc, valid=ok_r, return_aux=True)
        total = total + disc
        metrics["loss_disc"] = disc.mean()
        nan_samples = jnp.sum(~ok_r) + d_aux["nan_count"]
      metrics["nan_samples"] = nan_samples.astype(jnp.float32)
      return total.mean(), metrics

    grads, metrics = jax.grad(loss_fn, has_aux=True)(fake_params)
    return grads, metrics

  def gen_grad(gen_params, mb, key, fake_params, teacher_vars, buffers, opts):
    """Generator loss with generator_loss options `opts` (one phase) on one micro-batch; its
    labels are drawn afresh (uniform classes), not the fake-score step's."""
    k_z, k_sigma, k_n, k_drop, k_label = jax.random.split(key, 5)
    shape = batch_shape(mb)
    labels = sample_labels(k_label, shape[0], nets.label_dim) if nets.label_dim else None
    z = jax.random.normal(k_z, shape, jnp.float32)
    sigma = losses.sample_generator_sigma(k_sigma, shape[0], tmax=cfg.tmax)
    noise = jax.random.normal(k_n, shape, jnp.float32)
    fake_params = jax.lax.stop_gradient(fake_params)

    def teacher_fn(x, s):
      return nets.teacher(teacher_vars, x, s, labels)

    # The discriminator logits only come out if this phase uses them; they are read off the
    # bottleneck features of the same fake-score forward (no second encoder pass).
    needs_logits = losses.reads_discriminator(opts)

    def fake_fn(x, s):
      out = nets_lib.apply(nets.fake, fake_params, buffers, x, s, labels, train=False, key=None,
                           return_features=needs_logits)
      if not needs_logits:
        return out
      denoised, feats = out
      return denoised, losses.discriminator_logits(feats.astype(jnp.float32))

    def loss_fn(p):
      x_g = nets_lib.generate(nets, p, buffers, z, labels, cfg.sigma_init, train=True, key=k_drop)
      per_sample, aux = losses.generator_loss(
          x_g, sigma, noise, teacher_fn, fake_fn, None, return_aux=True,
          fake_returns_logits=needs_logits, **opts)
      mean = per_sample.mean()
      metrics = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items() if k != "nan_count"}
      for k in range(len(losses.SIGMA_BIN_EDGES) + 1):  # count-weighted, see _finish_metrics
        metrics[f"log_r_sigma_bin{k}"] *= metrics[f"sigma_bin{k}_count"]
      metrics["loss_gen"] = mean
      metrics["nan_samples"] = aux["nan_count"].astype(jnp.float32)
      return cfg.loss_scale * mean, metrics

    return jax.grad(loss_fn, has_aux=True)(gen_params)

  def step_keys(state):
    """(fake-score key, generator key) of this step: fold_in(rng, step), split."""
    return jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step))

  def fake_score_update(state: ts.TrainState, batch: Dict[str, jnp.ndarray],
                        frozen: Dict[str, Any], repeat=0):
    """1. Fake score + discriminator (every step): new fake_params / fake_opt, and
    disc_updates + 1 when the discriminator trains. `repeat` (an int, traced or not) is the index
    of this update within the step (DMD2's several fake-score updates draw different noise)."""
    f_grads, metrics = _accumulate(
        lambda p, mb, k: fake_grad(p, mb, k, state.gen_params, frozen["buffers"]),
        state.fake_params, batch, jax.random.fold_in(step_keys(state)[0], repeat), cfg.num_micro)
    metrics = _finish_metrics(metrics, cfg.num_micro)
    f_grads, f_bad = _sanitize(f_grads)
    if disc_on and cfg.fake_grad_clip:
      f_grads = jax.tree.map(lambda g: jnp.clip(g, -cfg.fake_grad_clip, cfg.fake_grad_clip),
                             f_grads)
    f_updates, fake_opt = fake_tx.update(f_grads, state.fake_opt, state.fake_params)
    metrics["nan_grads"] = f_bad.astype(jnp.float32)
    return state.replace(fake_params=optax.apply_updates(state.fake_params, f_updates),
                         fake_opt=fake_opt,
                         disc_updates=state.disc_updates + int(disc_on)), metrics

  def gen_update(state, batch, frozen, opts):
    """(new gen_params, gen_opt, metrics) of one generator step with loss options `opts`."""
    grads, metrics = _accumulate(
        lambda p, mb, k: gen_grad(p, mb, k, state.fake_params, frozen["teacher"],
                                  frozen["buffers"], opts),
        state.gen_params, batch, step_keys(state)[1], cfg.num_micro)
    metrics = _finish_metrics(metrics, cfg.num_micro)
    grads, bad = _sanitize(grads)
    updates, gen_opt = gen_tx.update(grads, state.gen_opt, state.gen_params)
    metrics["nan_grads"] = bad.astype(jnp.float32)
    # 1 when this update read r or the GAN term from a discriminator that never trained (a bug:
    # train_step always trains it first; tests/test_recipes.py asserts 0).
    reads = losses.reads_discriminator(opts)
    metrics["disc_untrained_reads"] = jnp.asarray(reads, jnp.float32) * (state.disc_updates == 0)
    return optax.apply_updates(state.gen_params, updates), gen_opt, metrics

  def generator_update(state: ts.TrainState, batch: Dict[str, jnp.ndarray],
                       frozen: Dict[str, Any], phase: int):
    """2. Generator against the current fake score with the loss of `phase` (skipped in the
    warm-up: zero metrics), 3. generator EMA, then step / images_seen advance."""
    if phase == WARMUP:
      metrics = jax.eval_shape(lambda: gen_update(state, batch, frozen, phase_opts[0]))[2]
      gen_params, gen_opt = state.gen_params, state.gen_opt
      metrics = jax.tree.map(jnp.zeros_like, metrics)
    else:
      gen_params, gen_opt, metrics = gen_update(state, batch, frozen, phase_opts[phase - 1])
    images_seen = state.images_seen + cfg.batch_size
    beta = ts.ema_beta(cfg.batch_size, images_seen, cfg.ema_halflife_kimg, cfg.ema_rampup)
    metrics["generator_phase"] = jnp.asarray(phase, jnp.float32)
    metrics["ema_beta"] = beta
    return state.replace(gen_params=gen_params, gen_opt=gen_opt,
                         ema_params=ts.ema_update(state.ema_params, gen_params, beta),
                         step=state.step + 1, images_seen=images_seen), metrics

  def fake_score_step(state: ts.TrainState, batch: Dict[str, jnp.ndarray], frozen: Dict[str, Any]):
    """cfg.fake_updates_per_gen fake_score_updates on the same batch (DMD2's two-time-scale rule;
    1 otherwise), in one program; the metrics are the last update's."""
    state, metrics = fake_score_update(state, batch, frozen)
    if cfg.fake_updates_per_gen > 1:
      def more(carry, i):
        return fake_score_update(carry[0], batch, frozen, i), None
      (state, metrics), _ = jax.lax.scan(more, (state, metrics),
                                         jnp.arange(1, cfg.fake_updates_per_gen))
    return state, metrics

  return StepFns(fake_score_step, generator_update)
