"""Uni-Instruct losses: the unified generator loss, the fake-score loss, the discriminator, sigma samplers.

Conventions (spec §1.1; docs/design.md): teacher noisy marginal q_sigma, generator noisy marginal
p_sigma, ratio r = q_sigma / p_sigma, D_f(q || p) = E_p f(q/p), H(r) = r^2 f''(r). Everything is in
EDM denoiser units, D(x, sigma) = x + sigma^2 grad log p(x). Arrays are [B, *dims] with any rank of
dims (2-D toy points and NHWC images share the code); per-sample quantities are [B].

All batch statistics (batch means of BCE values or weights) are plain means over the array's batch
axis, i.e. over the *global* batch when the array is sharded over devices under jit. On one device this
equals the official code's per-GPU statistics; with several GPUs the official code uses each GPU's
local batch (`batch_gpu`), which these functions do not reproduce.

Non-finite samples (NaN/Inf in x_g, a denoiser output, a log-ratio or a logit) are handled with
shape-static per-sample masks: their loss is 0 and they are left out of every batch statistic.
"""

from typing import Any, Callable, Dict, Optional, Tuple, Union

import jax
import jax.numpy as jnp

from uni_instruct_jax import divergences

Array = jax.Array
DenoiseFn = Callable[[Array, Array], Array]
LogRatioFn = Callable[[Array, Array], Array]

SIGMA_DATA = 0.5
P_MEAN, P_STD = -1.2, 1.2  # EDM log-normal sigma of the fake-score / discriminator step.
LOGIT_CLAMP = 10.0  # |log r| and the generator's BCE logits are clamped to this (spec §1.5).
LOG_R_MAX = 13.815  # log(1e6): r is kept in [1e-6, 1e6], the divergences' safe domain.
W_F_MIN = 1e-5  # lower clip of the SiD normaliser w_f.
MODES = ("exact", "official", "di")
RATIO_SOURCES = ("logit", "official_bce")


# ----------------------------------------------------------------------------------------------
# Small helpers.

def _bcast(v: Array, x: Array) -> Array:
  """Reshapes per-sample v [B] to broadcast against x [B, *dims]."""
  return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def _sum(x: Array) -> Array:
  """Sum over every non-batch axis: [B, ...] -> [B]."""
  return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def _mean(x: Array) -> Array:
  """Mean over every non-batch axis: [B, ...] -> [B]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _finite(x: Array) -> Array:
  """Per-sample finiteness: [B, ...] -> bool [B]."""
  return jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))


def _masked_mean(v: Array, ok: Array) -> Array:
  """Mean of v [B] over the samples where ok [B] holds (0 when none does)."""
  return jnp.sum(jnp.where(ok, v, 0.0)) / jnp.maximum(jnp.sum(ok), 1)


def _clean(x: Array, ok: Array) -> Array:
  """Zeroes the samples of x [B, ...] where ok [B] is False, so they cannot poison sums."""
  return jnp.where(_bcast(ok, x), x, jnp.zeros_like(x))


def _frozen_call(fn: DenoiseFn, x: Array, sigma: Array) -> Array:
  """fn(x, sigma) with stop-gradient on everything fn closes over (e.g. network parameters).

  Gradients still flow through the inputs x and sigma. jax.closure_convert lifts the traced values
  fn closes over into explicit arguments, which are then stopped.
  """
  converted, consts = jax.closure_convert(fn, x, sigma)
  return converted(x, sigma, *[jax.lax.stop_gradient(c) for c in consts])


def _check_batch(name: str, v: Array, batch: int) -> None:
  if v.shape != (batch,):
    raise ValueError(f"{name} must have shape ({batch},), got {v.shape}")


# ----------------------------------------------------------------------------------------------
# Noise levels and the EDM weight.

def edm_weight(sigma: Array) -> Array:
  """EDM loss weight lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2, sigma_d = 0.5."""
  return (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2


def karras_sigma(t: Array, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0) -> Array:
  """Karras schedule sigma(t) = (smax^(1/rho) + (1-t)(smin^(1/rho) - smax^(1/rho)))^rho, t in [0, 1].

  t = 0 gives sigma_min, t = 1 gives sigma_max (t = 0.8 gives 24.41).
  """
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  return (hi + (1.0 - t) * (lo - hi)) ** rho


def sample_fake_sigma(key: Array, batch: int) -> Array:
  """Fake-score / discriminator noise levels [batch]: ln sigma ~ N(-1.2, 1.2^2)."""
  return jnp.exp(P_MEAN + P_STD * jax.random.normal(key, (batch,)))


def sample_generator_sigma(key: Array, batch: int, tmax: int = 800) -> Array:
  """Generator-step noise levels [batch]: karras_sigma(t), t ~ U[0, tmax/1000] (0.002..24.4 for 800)."""
  if not 0 < tmax <= 1000:
    raise ValueError(f"tmax must be in (0, 1000], got {tmax}")
  return karras_sigma(jax.random.uniform(key, (batch,)) * (tmax / 1000.0))


# ----------------------------------------------------------------------------------------------
# Fake-score (EDM denoising) loss.

def fake_score_loss(denoise_fn: DenoiseFn, x: Array, sigma: Array, noise: Array) -> Array:
  """EDM denoising loss of the fake score network on generator samples, per sample [B].

  loss_i = lambda(sigma_i) * sum_dims (denoise_fn(x + sigma n, sigma) - x)^2 with lambda = edm_weight.

  Args:
    denoise_fn: (x_noisy [B, *dims], sigma [B]) -> denoised [B, *dims] (the fake net, params closed
      over; its parameters are what is trained).
    x: clean generator samples [B, *dims]; treated as data (stop-gradient).
    sigma: noise levels [B] (e.g. sample_fake_sigma).
    noise: standard normal [B, *dims].
  """
  _check_batch("sigma", sigma, x.shape[0])
  if noise.shape != x.shape:
    raise ValueError(f"noise shape {noise.shape} != x shape {x.shape}")
  x = jax.lax.stop_gradient(x)
  d = denoise_fn(x + _bcast(sigma, x) * noise, sigma)
  ok = _finite(x) & _finite(d) & jnp.isfinite(sigma)
  loss = edm_weight(sigma) * _sum(jnp.square(_clean(d, ok) - _clean(x, ok)))
  return jnp.where(ok, loss, 0.0)


# ----------------------------------------------------------------------------------------------
# Discriminator = the fake-score network's encoder (spec §1.5).

def _bce_real(logits: Array) -> Array:
  """BCE(logit, label 1) = softplus(-logit), elementwise."""
  return jax.nn.softplus(-logits)


def discriminator_logits(features: Array) -> Array:
  """Discriminator logit map: mean over the channel (last) axis, no parameters.

  features: the fake-score network's bottleneck map [B, h, w, C] (or [B, C] for an MLP's hidden
  layer; any rank >= 2) -> logits [B, h, w, 1] (or [B, 1]).
  """
  if features.ndim < 2:
    raise ValueError(f"features must have rank >= 2 ([B, ..., C]), got shape {features.shape}")
  return jnp.mean(features, axis=-1, keepdims=True)


def log_ratio_from_logits(logits: Array) -> Array:
  """Per-sample log r = clamp(mean of the logits over non-batch axes, -10, 10): [B, ...] -> [B].

  With D = sigmoid(logit) ~ P(real | x_t), r = q/p ~ D / (1 - D) = exp(logit).
  """
  return jnp.clip(_mean(logits), -LOGIT_CLAMP, LOGIT_CLAMP)


def discriminator_loss(logits_real: Array, logits_fake: Array, sigma: Array,
                       batch_mean: bool = False) -> Array:
  """lambda(sigma)-weighted discriminator BCE per sample [B].

  loss_i = lambda(sigma_i) * 1/2 [BCE(real_i, 1) + BCE(fake_i, 0)], each BCE the mean over sample i's
  logits. Real and fake logits must come from the same sigma and noise (both passes in train mode).
  With batch_mean=True the BCEs are averaged over the whole batch (all logits of all samples, as
  torch's BCEWithLogitsLoss in the official code, where "batch" is each GPU's local batch), then
  multiplied by each lambda(sigma_i): the official recipe. Non-finite samples get 0 and are left out.

  Args:
    logits_real: [B, ...] logits of x_real + sigma n.
    logits_fake: [B, ...] logits of sg(x_g) + sigma n.
    sigma: [B].
    batch_mean: official batch-mean BCE (see above).
  """
  if logits_real.shape != logits_fake.shape:
    raise ValueError(f"logits_real {logits_real.shape} and logits_fake {logits_fake.shape} differ")
  _check_batch("sigma", sigma, logits_real.shape[0])
  ok = _finite(logits_real) & _finite(logits_fake) & jnp.isfinite(sigma)
  bce_real = _mean(_bce_real(_clean(logits_real, ok)))
  bce_fake = _mean(jax.nn.softplus(_clean(logits_fake, ok)))  # BCE(logit, 0) = softplus(logit)
  bce = 0.5 * (bce_real + bce_fake)
  if batch_mean:
    bce = jnp.broadcast_to(_masked_mean(bce, ok), bce.shape)
  return jnp.where(ok, edm_weight(jnp.where(ok, sigma, 1.0)) * bce, 0.0)


def generator_gan_loss(logits_fake: Array, scale: Optional[Array] = None,
                       batch_mean: bool = False, valid: Optional[Array] = None) -> Array:
  """The generator's GAN term per sample [B]: scale_i * BCE(clamp(logit, -10, 10), 1).

  BCE is the mean over sample i's logits, or with batch_mean=True the mean over all logits of the
  global batch (the official code's BCEWithLogitsLoss over its per-GPU batch). The official term is
  L_gan,i = C*H*W * BCE_batch / w_f,i, i.e. scale = C*H*W / w_f and batch_mean=True; generator_loss
  builds it that way from its own w_f. Gradients flow into the logits; samples with non-finite
  logits (or valid = False) get 0 and are left out of the batch mean.

  Args:
    logits_fake: [B, ...] discriminator logits of x_t = x_g + sigma noise (differentiable).
    scale: per-sample factor [B] or scalar (stop-gradient; default 1).
    batch_mean: average the BCE over the batch instead of per sample.
    valid: optional bool [B]; False marks samples to drop.
  """
  ok = _finite(logits_fake) if valid is None else _finite(logits_fake) & valid
  bce = _mean(_bce_real(jnp.clip(_clean(logits_fake, ok), -LOGIT_CLAMP, LOGIT_CLAMP)))
  if batch_mean:
    bce = jnp.broadcast_to(_masked_mean(bce, ok), bce.shape)
  if scale is not None:
    bce = bce * jax.lax.stop_gradient(scale)
  return jnp.where(ok, bce, 0.0)


# ----------------------------------------------------------------------------------------------
# The generator loss.

def official_weights(div: divergences.Divergence, r: Array) -> Tuple[Array, Array]:
  """(w_sim, w_di) of the released code's branches (spec §1.6), per sample, for ratios r [B].

  official loss_i = w_sim * l_SiD,i - w_di * sum x_g * sg((D_q - D_psi) ||D_q - D_psi||_i).
  Generic rule: w_sim = H(r), w_di = r^2 H''(r), which gives the code's FKL (r, 0) and Chi-Square
  (2r^2, 4r^2) branches; two code-specific exceptions: Jeffreys is the 0.4/0.6 mix of the FKL- and
  RKL-weighted SiD terms (0.4 r + 0.6, 0), not H = 1 + r; Jensen-Shannon uses the unnormalised weight
  r/(1+r) = 2H (w_di = 2 r^2 H'' = -2r^2/(1+r)^3).
  """
  if div.name == "jeffreys":
    return 0.4 * r + 0.6, jnp.zeros_like(r)
  scale = 2.0 if div.name == "jensen_shannon" else 1.0
  return scale * div.H(r), scale * r * r * div.d2H(r)


def _official_bce_ratio(div: divergences.Divergence, l_gan: Array) -> Array:
  """The released code's "density ratio" from the scaled generator BCE L_gan,i (bug included).

  r = -L/(1-L) in the Forward-KL / Jeffrey-KL branches, L/(1-L) in the others (Chi-Square,
  Jensen-Shannon, f-distill). Since L ~ C*H*W*BCE/w_f >> 1, r ~ 1 (or ~ -1): not a density ratio.
  """
  ratio = l_gan / (l_gan - 1.0)
  return ratio if div.name in ("forward_kl", "jeffreys") else -ratio


def generator_loss(
    x_g: Array,
    sigma: Array,
    noise: Array,
    teacher_fn: DenoiseFn,
    fake_fn: DenoiseFn,
    log_ratio_fn: Optional[LogRatioFn],
    divergence: Union[str, divergences.Divergence],
    mode: str = "exact",
    weight: Optional[Array] = None,
    return_aux: bool = False,
    *,
    alpha: float = 1.0,
    normalize: bool = False,
    ratio_source: str = "logit",
    ratio_clip: Optional[Tuple[float, float]] = None,
    normalize_h: bool = False,
    logits_fn: Optional[DenoiseFn] = None,
    gan_weight: float = 0.0,
) -> Union[Array, Tuple[Array, Dict[str, Array]]]:
  """Per-sample Uni-Instruct generator loss [B] (and with return_aux, a dict of batch statistics).

  The networks are evaluated at x_t = x_g + sigma * noise: D_q = teacher_fn(x_t, sigma),
  D_psi = fake_fn(x_t, sigma), log r = log_ratio_fn(x_t, sigma) [B] (then r = exp(log r), log r
  clipped to +-13.8). Every stop-gradient is applied here: nothing flows into whatever the passed
  functions close over (network parameters, precomputed values), nor into r, H, alpha, lambda_DI,
  w_f or weight; gradients flow into x_g directly and through the inputs x_t of teacher_fn/fake_fn.
  Let d = D_psi - D_q and w_f = sg(max(mean_dims |x_g - D_q|, 1e-5)).

  Modes:
    'exact' (spec §1.4 in denoiser units, d = sigma^2 u): with exact D_psi and log r,
        E[grad_theta mean(loss)] = grad_theta E_{p_sigma}[H(r) ||D_psi - D_q||^2]   (sum over dims):
      loss = 2 H(r) [d.(x_g - D_q) - alpha(r) ||d||^2] + lambda~ * sg(d).x_g,
      lambda~ = [r^2 H''(r) ||d||^2 + 2 r H'(r) d.(D_psi - x_g)] / sigma^2
      (the bracket is sigma^4 S_alpha = the SiD loss without w_f; lambda~ = sigma^2 lambda_DI, whose
      second part has zero mean given x_t and keeps the gradient unbiased).
    'official' (the released Uni-Instruct code, spec §1.6, per sample before the loop's x100/B):
      loss = w_sim(r) l_SiD - w_di(r) sum_dims x_g * sg((D_q - D_psi) ||D_q - D_psi||_i),
      l_SiD = sum_dims (D_q - D_psi)((D_q - x_g) - alpha (D_q - D_psi)) / w_f; see official_weights
      (JKL 0.4/0.6 mix; the chi^2/JS DI terms are done per sample with each sample's own norm, where
      the released code crashes). reverse_kl with alpha = 1.2 / 1.0 is exactly SiD / SiDA's SiD term.
    'di' (single noise level, f-distill): loss = h(r) sum_dims x_g * sg(D_psi - D_q), with h = H
      (divided by its batch mean if normalize_h, as FastGen's f-distill); gradient
      h(r) (D_psi - D_q)^T dx_g/dtheta = sigma^2 h(r) Grad(DI). reverse_kl is Diff-Instruct; with
      normalize=True it is DMD/DMD2's distribution-matching gradient (D_psi - D_q)/mean|x_g - D_q|.

  Args:
    x_g: generator output [B, *dims] (differentiable).
    sigma: noise levels [B].
    noise: standard normal [B, *dims].
    teacher_fn, fake_fn: (x [B, *dims], sigma [B]) -> denoised [B, *dims].
    log_ratio_fn: (x [B, *dims], sigma [B]) -> log r [B]; if None, log r comes from logits_fn
      (log_ratio_from_logits), else r = 1 (allowed for reverse_kl only, or with 'official_bce').
    divergence: a divergences.Divergence or its registered name.
    mode: 'exact', 'official' or 'di'.
    weight: per-sample time weighting [B] or scalar (stop-gradient, default 1); multiplies the
      divergence term (not the GAN term).
    return_aux: also return the statistics dict (jnp scalars over the valid samples of the batch:
      nan_count, r_mean, r_min, r_max, H_mean (the H-type weight applied: H, w_sim or h), alpha_mean
      (the SiD coefficient applied; 0 in 'di' mode), w_f_mean).
    alpha: SiD coefficient of 'official' mode (SiD 1.2, SiDA / Uni-Instruct code 1.0).
    normalize: divide the 'exact' / 'di' loss by w_f (SiD normaliser = DMD's normaliser); 'official'
      always divides its SiD term by w_f.
    ratio_source: 'logit' (r = exp(log r)) or 'official_bce' (the released code's ratio from the
      scaled batch-mean generator BCE L_gan,i = numel * BCE_batch / w_f,i, bug included; needs
      logits_fn; see _official_bce_ratio).
    ratio_clip: optional (lo, hi) clip of r (f-distill uses (0.1, 20)).
    normalize_h: 'di' mode only: divide h(r) by its batch mean.
    logits_fn: (x [B, *dims], sigma [B]) -> discriminator logits [B, ...] (the fake net's encoder
      + discriminator_logits, eval mode), called on x_t with its closure stopped like fake_fn; used
      by the GAN term, by 'official_bce' and, when log_ratio_fn is None, for log r.
    gan_weight: weight of the generator GAN term added per sample. In 'official' mode the term is
      L_gan,i = numel * BCE_batch / w_f,i (numel = prod(dims)); in the other modes numel * BCE_i,
      divided by w_f when normalize. Relative to the per-sample divergence term: the recipe's
      lsg_gan / lsg = 0.01 / 100 is gan_weight = 1e-4.

  Returns:
    loss [B], or (loss, aux) with return_aux.
  """
  div = divergences.get(divergence)
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if ratio_source not in RATIO_SOURCES:
    raise ValueError(f"ratio_source must be one of {RATIO_SOURCES}, got {ratio_source!r}")
  if x_g.ndim < 2:
    raise ValueError(f"x_g must be [B, *dims] with at least one data axis, got {x_g.shape}")
  batch = x_g.shape[0]
  _check_batch("sigma", sigma, batch)
  if noise.shape != x_g.shape:
    raise ValueError(f"noise shape {noise.shape} != x_g shape {x_g.shape}")
  if logits_fn is None and (gan_weight != 0.0 or ratio_source == "official_bce"):
    raise ValueError("logits_fn is required for gan_weight != 0 or ratio_source='official_bce'")
  if (log_ratio_fn is None and logits_fn is None and ratio_source == "logit"
      and div.name != "reverse_kl"):
    raise ValueError(f"log_ratio_fn or logits_fn is required for divergence {div.name!r}")

  sg = jax.lax.stop_gradient
  sigma = sg(sigma)
  x_t = x_g + _bcast(sigma, x_g) * noise
  d_q = _frozen_call(teacher_fn, x_t, sigma)
  d_p = _frozen_call(fake_fn, x_t, sigma)
  for name, out in (("teacher_fn", d_q), ("fake_fn", d_p)):
    if out.shape != x_g.shape:
      raise ValueError(f"{name} returned shape {out.shape}, expected {x_g.shape}")

  ok = _finite(x_g) & _finite(noise) & _finite(d_q) & _finite(d_p) & jnp.isfinite(sigma)
  if logits_fn is not None:
    logits = _frozen_call(logits_fn, x_t, sigma)
    if logits.shape[:1] != (batch,):
      raise ValueError(f"logits_fn returned shape {logits.shape}, expected [{batch}, ...]")
    ok = ok & _finite(logits)
  x_g, d_q, d_p = _clean(x_g, ok), _clean(d_q, ok), _clean(d_p, ok)
  numel = x_g[0].size
  w_f = sg(jnp.maximum(_mean(jnp.abs(x_g - d_q)), W_F_MIN))

  # Density ratio r [B] (stop-gradient).
  if ratio_source == "official_bce":
    l_gan = generator_gan_loss(sg(logits), scale=numel / w_f, batch_mean=True, valid=ok)
    r = _official_bce_ratio(div, l_gan)
  elif log_ratio_fn is None and logits_fn is None:
    r = jnp.ones((batch,), x_g.dtype)
  else:
    log_r = sg(log_ratio_fn(x_t, sigma) if log_ratio_fn is not None
               else log_ratio_from_logits(logits))
    _check_batch("log_ratio_fn output", log_r, batch)
    ok = ok & jnp.isfinite(log_r)
    r = jnp.exp(jnp.clip(jnp.where(ok, log_r, 0.0), -LOG_R_MAX, LOG_R_MAX))
  if ratio_clip is not None:
    r = jnp.clip(r, *ratio_clip)
  r = jnp.where(ok, r, 1.0)

  d = d_p - d_q
  if mode == "exact":
    h, a = sg(div.H(r)), sg(div.alpha(r))
    d_sg = sg(d)
    lam = sg((r * r * div.d2H(r) * _sum(d_sg * d_sg) + 2.0 * r * div.dH(r) * _sum(d_sg * (d_p - x_g)))
             / (sigma * sigma))
    loss = 2.0 * h * (_sum(d * (x_g - d_q)) - a * _sum(d * d)) + lam * _sum(d_sg * x_g)
  elif mode == "official":
    w_sim, w_di = (sg(w) for w in official_weights(div, r))
    h, a = w_sim, jnp.full_like(r, alpha)
    delta = -d  # D_q - D_psi
    l_sid = _sum(delta * ((d_q - x_g) - alpha * delta)) / w_f
    di_dir = sg(delta * _bcast(jnp.sqrt(_sum(delta * delta)), delta))
    loss = w_sim * l_sid - w_di * _sum(x_g * di_dir)
  else:  # 'di'
    h = sg(div.H(r))
    if normalize_h:
      h = h / _masked_mean(h, ok)
    a = jnp.zeros_like(r)
    loss = h * _sum(x_g * sg(d))
  if normalize and mode != "official":
    loss = loss / w_f
  if weight is not None:
    loss = loss * sg(weight)
  if gan_weight != 0.0:
    official = mode == "official"
    scale = numel / w_f if (official or normalize) else jnp.full_like(w_f, numel)
    loss = loss + gan_weight * generator_gan_loss(logits, scale, batch_mean=official, valid=ok)
  loss = jnp.where(ok, loss, 0.0)
  if not return_aux:
    return loss
  aux = {
      "nan_count": batch - jnp.sum(ok),
      "r_mean": _masked_mean(r, ok),
      "r_min": jnp.min(jnp.where(ok, r, jnp.inf)),
      "r_max": jnp.max(jnp.where(ok, r, -jnp.inf)),
      "H_mean": _masked_mean(h, ok),
      "alpha_mean": _masked_mean(a, ok),
      "w_f_mean": _masked_mean(w_f, ok),
  }
  return loss, aux


# ----------------------------------------------------------------------------------------------
# Method presets.

_METHODS = ("uni_instruct", "uni_instruct_official", "sid", "sida", "diff_instruct", "dmd",
            "f_distill")


def method_options(method: str, divergence: Optional[str] = None, **overrides: Any) -> Dict[str, Any]:
  """Keyword arguments of generator_loss for a named method (overrides win).

  The GAN term is part of generator_loss (gan_weight, in per-sample loss units; pass logits_fn when
  gan_weight != 0), so `generator_loss(x_g, sigma, noise, teacher_fn, fake_fn, log_ratio_fn,
  logits_fn=..., **method_options(...))` is the whole generator objective per sample; the trainer
  then applies its loss scaling (recipe: x100, i.e. lsg) to the batch mean.

  Methods:
    'uni_instruct': expanded f-divergence with the exact unbiased gradient (spec §1.4), normalised
      by the SiD w_f, plus the GAN term (recipe ratio 0.01/100 -> gan_weight 1e-4). divergence
      required.
    'uni_instruct_official': the released code's recipe (spec §1.6): official mode, alpha 1, r from
      the discriminator logit (use ratio_source='official_bce' to reproduce the code's ratio), GAN
      weight 1e-4 (the code's Forward-Clean branch: gan_weight=0). divergence required.
    'sid': SiD, Zhou et al. 2024: reverse_kl, official, alpha 1.2, no GAN:
      sum (D_q - D_psi)((D_q - x_g) - 1.2 (D_q - D_psi)) / w_f.
    'sida': SiDA, Zhou et al. 2024 (arXiv 2410.14919): 0.5 * SiD(alpha 1) + 0.5 * GAN, with the
      loop's scales 100 and 0.01: weight 0.5, gan_weight 0.5e-4.
    'diff_instruct': Diff-Instruct, Luo et al. 2023: Grad(DI) = sum x_g * sg(D_psi - D_q)
      ('di' mode, reverse_kl, no normaliser).
    'dmd': DMD/DMD2, Yin et al. 2024: the same gradient divided by mean|x_g - D_q| (normalize=True).
    'f_distill': f-distill, Xu, Nie & Vahdat 2025: single-level E[H(r) Grad(DI)] ('di' mode) with
      r clipped to [0.1, 20] and h divided by its batch mean (FastGen); FastGen's per-time-bin EMA
      normalisation of r is not included. divergence required.
  """
  if method not in _METHODS:
    raise ValueError(f"unknown method {method!r}; known: {_METHODS}")
  needs_div = method in ("uni_instruct", "uni_instruct_official", "f_distill")
  if needs_div and divergence is None:
    raise ValueError(f"method {method!r} needs a divergence")
  if not needs_div and divergence not in (None, "reverse_kl"):
    raise ValueError(f"method {method!r} is the reverse_kl special case, got divergence {divergence!r}")
  presets = {
      "uni_instruct": dict(mode="exact", normalize=True, gan_weight=1e-4),
      "uni_instruct_official": dict(mode="official", alpha=1.0, gan_weight=1e-4),
      "sid": dict(mode="official", alpha=1.2, gan_weight=0.0),
      "sida": dict(mode="official", alpha=1.0, weight=0.5, gan_weight=0.5e-4),
      "diff_instruct": dict(mode="di", normalize=False, gan_weight=0.0),
      "dmd": dict(mode="di", normalize=True, gan_weight=0.0),
      "f_distill": dict(mode="di", ratio_clip=(0.1, 20.0), normalize_h=True, gan_weight=0.0),
  }
  options = dict(presets[method], divergence=divergences.get(divergence or "reverse_kl").name)
  options.update(overrides)
  return options
