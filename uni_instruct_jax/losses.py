"""Uni-Instruct losses: the unified generator loss, the fake-score loss, the discriminator, sigma samplers.

Conventions (spec §1.1; docs/design.md): teacher noisy marginal q_sigma, generator noisy marginal
p_sigma, ratio r = q_sigma / p_sigma, D_f(q || p) = E_p f(q/p), H(r) = r^2 f''(r). Everything is in
EDM denoiser units, D(x, sigma) = x + sigma^2 grad log p(x). Arrays are [B, *dims] with any rank of
dims (2-D toy points and NHWC images share the code); per-sample quantities are [B].

All batch statistics (batch means of BCE values or weights) are plain means over the array's batch
axis, i.e. over the *global* batch when the array is sharded over devices under jit. On one device this
equals the official code's per-GPU statistics; with several GPUs the official code uses each GPU's
local batch (`batch_gpu`), which these functions do not reproduce.

Non-finite samples (NaN/Inf in x_g, the noise, a denoiser output, a log-ratio, a logit, or a
non-positive ratio) are handled with shape-static per-sample masks: their loss is 0 and they are left
out of every batch statistic. Every network input is cleaned first (bad samples zeroed with
jnp.where, see noisy_inputs), so a bad sample never reaches a network and its gradient is exactly 0
(a NaN input would otherwise give 0 * NaN = NaN in every parameter gradient). The same per-sample
`valid` mask argument drops samples on purpose: `valid=False` is "loss weight 0 and left out of the
batch statistics", which is what a poisoned sample turns into.
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
MODES = ("exact", "official", "di", "sim")
RATIO_SOURCES = ("logit", "official_bce")
NORMALIZERS = ("w_f", "sigma")
SIM_DISTANCES = ("pseudo_huber", "squared_l2")
# Noise-level bins of the log-ratio diagnostics log_r_sigma_bin{k}: bin k holds the samples with
# SIGMA_BIN_EDGES[k-1] <= sigma < SIGMA_BIN_EDGES[k] (bin 0 below 0.1, bin 3 from 2.5 up). The
# fake-score sigma law (ln sigma ~ N(-1.2, 1.2^2)) puts 18/48/30/4 % of its mass in the four bins;
# the generator's (Karras, t ~ U[0, 0.8]) puts 37 % in bin 3.
SIGMA_BIN_EDGES = (0.1, 0.5, 2.5)


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


def _valid(valid: Optional[Array], batch: int) -> Array:
  """The caller's per-sample mask as bool [B] (all True when None)."""
  if valid is None:
    return jnp.ones((batch,), bool)
  valid = jnp.asarray(valid)
  _check_batch("valid", valid, batch)
  return valid.astype(bool)


def noisy_inputs(x: Array, sigma: Array, noise: Array,
                 valid: Optional[Array] = None) -> Tuple[Array, Array, Array]:
  """Cleaned network inputs x + sigma * noise, the cleaned sigma, and the per-sample mask.

  Call this on every network input: a sample with a non-finite x, noise or sigma (or valid = False)
  is replaced by x_t = 0 at sigma = 1 before any network sees it, so the backward pass through the
  network gets a finite input and a zero cotangent for it (its gradient is exactly 0).

  Args:
    x: clean samples [B, *dims].
    sigma: noise levels [B].
    noise: standard normal [B, *dims].
    valid: optional bool [B]; False drops a sample on purpose.

  Returns:
    (x_t [B, *dims], sigma [B], ok bool [B]).
  """
  ok = _valid(valid, x.shape[0]) & _finite(x) & _finite(noise) & jnp.isfinite(sigma)
  sigma = jnp.where(ok, sigma, 1.0)
  return _clean(x, ok) + _bcast(sigma, x) * _clean(noise, ok), sigma, ok


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


def sigma_normalizer(sigma: Array) -> Array:
  """The exact mode's normaliser n(sigma) = sqrt(2/pi) sigma sigma_d / sqrt(sigma^2 + sigma_d^2) [B].

  It is E[mean_dims |x_g - D_q(x_g + sigma n)|], the expectation of SiD's per-sample w_f, when data
  and generator are both N(0, sigma_d^2 I) (then x_g - D_q is N(0, c_out(sigma)^2) per dimension):
  the same scale per noise level as w_f (~ 0.8 sigma for small sigma, ~ 0.4 for large), but a
  function of sigma alone. Why not w_f itself, a function of x_t, or a batch statistic: dividing
  the per-sample surrogate by sg(c) only keeps E[grad] = grad E_p[H ||D_p - D_q||^2 / c] when c does
  not vary with the sample given sigma. w_f depends on x_g and the noise (measured: cosine
  0.988-0.995 with the target gradient); a function c(x_t) would need extra grad_x c terms in the
  surrogate; a stop-gradient batch mean correlates with the samples it divides (an O(1/B) bias)
  and mixes the noise levels of a batch. A function of sigma is a time weighting w(t), under which
  the identity of spec §1.4 holds exactly.
  """
  return jnp.sqrt(2.0 / jnp.pi) * sigma * SIGMA_DATA / jnp.sqrt(sigma ** 2 + SIGMA_DATA ** 2)


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

def fake_score_loss(denoise_fn: DenoiseFn, x: Array, sigma: Array, noise: Array, *,
                    valid: Optional[Array] = None,
                    return_aux: bool = False) -> Union[Array, Tuple[Array, Dict[str, Array]]]:
  """EDM denoising loss of the fake score network on generator samples, per sample [B].

  loss_i = lambda(sigma_i) * sum_dims (denoise_fn(x + sigma n, sigma) - x)^2 with lambda = edm_weight.
  The network input is cleaned first (noisy_inputs): a sample with non-finite x or noise (or
  valid = False) is evaluated at x_t = 0, sigma = 1 and gets loss 0 and exactly zero gradient, as
  does a sample whose denoiser output is non-finite.

  Args:
    denoise_fn: (x_noisy [B, *dims], sigma [B]) -> denoised [B, *dims] (the fake net, params closed
      over; its parameters are what is trained).
    x: clean generator samples [B, *dims]; treated as data (stop-gradient).
    sigma: noise levels [B] (e.g. sample_fake_sigma).
    noise: standard normal [B, *dims].
    valid: optional bool [B]; False drops a sample (loss weight 0).
    return_aux: also return {'nan_count': int32 number of dropped samples not already False in
      valid, 'valid': bool [B] the samples kept} (pass 'valid' on to discriminator_loss).
  """
  _check_batch("sigma", sigma, x.shape[0])
  if noise.shape != x.shape:
    raise ValueError(f"noise shape {noise.shape} != x shape {x.shape}")
  wanted = _valid(valid, x.shape[0])
  x = jax.lax.stop_gradient(x)
  x_t, sigma, ok = noisy_inputs(x, sigma, noise, wanted)
  d = denoise_fn(x_t, sigma)
  ok = ok & _finite(d)
  loss = jnp.where(ok, edm_weight(sigma) * _sum(jnp.square(_clean(d, ok) - _clean(x, ok))), 0.0)
  if not return_aux:
    return loss
  return loss, {"nan_count": jnp.sum(wanted & ~ok).astype(jnp.int32), "valid": ok}


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
                       batch_mean: bool = False, *, valid: Optional[Array] = None,
                       return_aux: bool = False) -> Union[Array, Tuple[Array, Dict[str, Array]]]:
  """lambda(sigma)-weighted discriminator BCE per sample [B].

  loss_i = lambda(sigma_i) * 1/2 [BCE(real_i, 1) + BCE(fake_i, 0)], each BCE the mean over sample i's
  logits. Real and fake logits must come from the same sigma and noise (both passes in train mode).
  With batch_mean=True the BCEs are averaged over the whole batch (all logits of all samples, as
  torch's BCEWithLogitsLoss in the official code, where "batch" is each GPU's local batch), then
  multiplied by each lambda(sigma_i): the official recipe. Non-finite samples (and valid = False)
  get 0 and are left out. The logits' inputs must already be clean: build the real input with
  noisy_inputs(x_real, sigma, noise, valid) and the fake one inside fake_score_loss.

  Args:
    logits_real: [B, ...] logits of x_real + sigma n.
    logits_fake: [B, ...] logits of sg(x_g) + sigma n.
    sigma: [B].
    batch_mean: official batch-mean BCE (see above).
    valid: optional bool [B]; False drops a sample (e.g. the mask of fake_score_loss and of the real
      inputs' noisy_inputs).
    return_aux: also return {'nan_count': int32 number of dropped samples not already False in
      valid}.
  """
  if logits_real.shape != logits_fake.shape:
    raise ValueError(f"logits_real {logits_real.shape} and logits_fake {logits_fake.shape} differ")
  _check_batch("sigma", sigma, logits_real.shape[0])
  wanted = _valid(valid, sigma.shape[0])
  ok = wanted & _finite(logits_real) & _finite(logits_fake) & jnp.isfinite(sigma)
  bce_real = _mean(_bce_real(_clean(logits_real, ok)))
  bce_fake = _mean(jax.nn.softplus(_clean(logits_fake, ok)))  # BCE(logit, 0) = softplus(logit)
  bce = 0.5 * (bce_real + bce_fake)
  if batch_mean:
    bce = jnp.broadcast_to(_masked_mean(bce, ok), bce.shape)
  loss = jnp.where(ok, edm_weight(jnp.where(ok, sigma, 1.0)) * bce, 0.0)
  if not return_aux:
    return loss
  return loss, {"nan_count": jnp.sum(wanted & ~ok).astype(jnp.int32)}


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


def _sim_distance(name: str, c: float) -> Callable[[Array], Array]:
  """SIM distance d(delta) per sample: [B, *dims] -> [B] (sums over the data axes)."""
  if name == "pseudo_huber":
    return lambda delta: jnp.sqrt(_sum(jnp.square(delta)) + c * c) - c
  return lambda delta: _sum(jnp.square(delta))


def _sigma_bin_stats(log_r: Array, sigma: Array, ok: Array) -> Dict[str, Array]:
  """Mean log r over the ok samples of each SIGMA_BIN_EDGES bin (0 for an empty bin) and counts."""
  k = jnp.searchsorted(jnp.asarray(SIGMA_BIN_EDGES, sigma.dtype), sigma, side="right")
  out = {}
  for b in range(len(SIGMA_BIN_EDGES) + 1):
    in_bin = ok & (k == b)
    out[f"log_r_sigma_bin{b}"] = _masked_mean(log_r, in_bin)
    out[f"sigma_bin{b}_count"] = jnp.sum(in_bin).astype(jnp.int32)
  return out


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
    normalizer: str = "w_f",
    ratio_source: str = "logit",
    ratio_clip: Optional[Tuple[float, float]] = None,
    normalize_h: bool = False,
    logits_fn: Optional[DenoiseFn] = None,
    fake_returns_logits: bool = False,
    gan_weight: float = 0.0,
    gan_normalize: Optional[bool] = None,
    sim_distance: str = "pseudo_huber",
    sim_c: float = 1.0,
    valid: Optional[Array] = None,
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
      second part has zero mean given x_t and keeps the gradient unbiased). With normalize and
      normalizer='sigma' the identity holds for E_p[H ||d||^2] / sigma_normalizer(sigma).
    'official' (the released Uni-Instruct code, spec §1.6, per sample before the loop's x100/B):
      loss = w_sim(r) l_SiD - w_di(r) sum_dims x_g * sg((D_q - D_psi) ||D_q - D_psi||_i),
      l_SiD = sum_dims (D_q - D_psi)((D_q - x_g) - alpha (D_q - D_psi)) / w_f; see official_weights
      (JKL 0.4/0.6 mix; the chi^2/JS DI terms are done per sample with each sample's own norm, where
      the released code crashes). reverse_kl with alpha = 1.2 / 1.0 is exactly SiD / SiDA's SiD term.
    'di' (single noise level, f-distill): loss = h(r) sum_dims x_g * sg(D_psi - D_q), with h = H
      (divided by its batch mean if normalize_h, as FastGen's f-distill); gradient
      h(r) (D_psi - D_q)^T dx_g/dtheta = sigma^2 h(r) Grad(DI). reverse_kl is Diff-Instruct; with
      normalize=True it is DMD/DMD2's distribution-matching gradient (D_psi - D_q)/mean|x_g - D_q|.
    'sim' (SIM, Luo et al. 2024; divergence must be reverse_kl, r is not used): with exact D_psi,
        E[grad_theta mean(loss)] = grad_theta E_{p_sigma}[dist(D_psi - D_q)],
      loss = sg(g).(x_g - D_q) + g.sg(x_g - D_psi),  g = grad dist(d) (differentiated through x_t).
      Derivation (score units, u = s_p - s_q, xi = -noise/sigma): grad E_p[dist] is the explicit
      x-path term E[grad_x dist(u(x_t)) dx_t/dtheta] plus E_p[g^T d_theta s_p]; differentiating the
      score-projection identity E_p[a^T s_p] = E[a(x_t)^T xi] (spec §1.2) with a = sg(g) turns the
      latter into E[(J_g^T (xi - s_p) - J_{s_p}^T g)^T dx_t/dtheta], whose J_{s_p} part cancels the
      x-path's, leaving E[(-J_{s_q}^T g + J_g^T (xi - s_p))^T dx_t/dtheta]: the gradient of the
      loss above in denoiser units (sigma^2 (xi - s_q) = x_g - D_q, sigma^2 (xi - s_p) = x_g - D_psi).
      dist: 'pseudo_huber' sqrt(||d||^2 + c^2) - c (c = sim_c > 0) or 'squared_l2' ||d||^2, whose
      loss has the gradient of exact reverse_kl, i.e. of 2 x SiD with alpha = 1/2.

  Args:
    x_g: generator output [B, *dims] (differentiable).
    sigma: noise levels [B].
    noise: standard normal [B, *dims].
    teacher_fn, fake_fn: (x [B, *dims], sigma [B]) -> denoised [B, *dims].
    log_ratio_fn: (x [B, *dims], sigma [B]) -> log r [B]; if None, log r comes from logits_fn
      (log_ratio_from_logits), else r = 1 (allowed for reverse_kl only, or with 'official_bce').
    divergence: a divergences.Divergence or its registered name.
    mode: 'exact', 'official', 'di' or 'sim'.
    weight: per-sample time weighting [B] or scalar (stop-gradient, default 1); multiplies the
      divergence term (not the GAN term).
    return_aux: also return the statistics dict (jnp scalars over the valid samples of the batch,
      the same keys for every option): nan_count (samples dropped for non-finite values, int32),
      ratio_invalid_count (samples dropped because r was non-finite or <= 0 where the divergence
      uses r, int32), ratio_clip_fraction (share of the kept samples whose r ratio_clip changed),
      r_mean, r_min, r_max, H_mean (the H-type weight applied: H, w_sim or h; 1 in 'sim'),
      alpha_mean (the SiD coefficient applied; 0 in 'di' and 'sim'), w_f_mean, and per
      SIGMA_BIN_EDGES bin k = 0..3 log_r_sigma_bin{k} (mean log r before the clip over the kept
      samples with a valid ratio in the bin, 0 if none or if no ratio is read) and
      sigma_bin{k}_count (their number, int32; weight micro-batch means by it).
    alpha: SiD coefficient of 'official' mode (SiD 1.2, SiDA / Uni-Instruct code 1.0).
    normalize: divide the 'exact' / 'di' / 'sim' loss by the normaliser; 'official' always divides
      its SiD term by w_f.
    normalizer: 'w_f' (per sample, SiD / DMD; biases the 'exact' and 'sim' identities) or 'sigma'
      (sigma_normalizer(sigma), a function of sigma alone: keeps them exact).
    ratio_source: 'logit' (r = exp(log r)) or 'official_bce' (the released code's ratio from the
      scaled batch-mean generator BCE L_gan,i = numel * BCE_batch / w_f,i, bug included; needs
      logits_fn; see _official_bce_ratio; it can be <= 0 or infinite, such samples are dropped).
    ratio_clip: optional (lo, hi) clip of r (f-distill uses (0.1, 20)).
    normalize_h: 'di' mode only: divide h(r) by its batch mean.
    logits_fn: (x [B, *dims], sigma [B]) -> discriminator logits [B, ...] (the fake net's encoder
      + discriminator_logits, eval mode), called on x_t with its closure stopped like fake_fn; used
      by the GAN term, by 'official_bce' and, when log_ratio_fn is None, for log r.
    fake_returns_logits: fake_fn returns (denoised, logits) from one forward (the logits of the
      fake net's own bottleneck features) instead of a separate logits_fn pass; its closure is
      stopped the same way and gradients flow through x_t into both outputs.
    gan_weight: weight of the generator GAN term added per sample. In 'official' mode the term is
      L_gan,i = numel * BCE_batch / w_f,i (numel = prod(dims)); in the other modes numel * BCE_i,
      divided by w_f when normalize (whatever the normalizer: the GAN term has no gradient identity
      to keep, and dividing it by sigma_normalizer, ~0.0016 at sigma = 0.002, made the toy2d run
      diverge). Relative to the per-sample divergence term: the recipe's lsg_gan / lsg =
      0.01 / 100 is gan_weight = 1e-4.
    gan_normalize: None (divide the GAN term by w_f as above), or True / False to force it (DMD2:
      False, its GAN term is not normalised).
    sim_distance: 'sim' mode's distance, one of SIM_DISTANCES.
    sim_c: pseudo-Huber c (> 0), in denoiser units summed over dims like ||d||.
    valid: optional bool [B]; False drops a sample (loss 0, zero gradient, left out of the batch
      statistics): the same as a sample with a non-finite input.

  Returns:
    loss [B], or (loss, aux) with return_aux.
  """
  div = divergences.get(divergence)
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if ratio_source not in RATIO_SOURCES:
    raise ValueError(f"ratio_source must be one of {RATIO_SOURCES}, got {ratio_source!r}")
  if normalizer not in NORMALIZERS:
    raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
  if sim_distance not in SIM_DISTANCES:
    raise ValueError(f"sim_distance must be one of {SIM_DISTANCES}, got {sim_distance!r}")
  if mode == "sim" and div.name != "reverse_kl":
    raise ValueError(f"mode 'sim' does not use a divergence (pass reverse_kl), got {div.name!r}")
  if mode == "sim" and sim_distance == "pseudo_huber" and not sim_c > 0:
    raise ValueError(f"sim_c must be > 0 for the pseudo-Huber distance, got {sim_c}")
  if ratio_clip is not None and not 0 < ratio_clip[0] <= ratio_clip[1]:
    raise ValueError(f"ratio_clip must be (lo, hi) with 0 < lo <= hi, got {ratio_clip}")
  if x_g.ndim < 2:
    raise ValueError(f"x_g must be [B, *dims] with at least one data axis, got {x_g.shape}")
  batch = x_g.shape[0]
  _check_batch("sigma", sigma, batch)
  if noise.shape != x_g.shape:
    raise ValueError(f"noise shape {noise.shape} != x_g shape {x_g.shape}")
  if logits_fn is not None and fake_returns_logits:
    raise ValueError("pass logits_fn or fake_returns_logits, not both")
  has_logits = logits_fn is not None or fake_returns_logits
  if not has_logits and (gan_weight != 0.0 or ratio_source == "official_bce"):
    raise ValueError("logits_fn is required for gan_weight != 0 or ratio_source='official_bce'")
  uses_ratio = mode != "sim" and div.name != "reverse_kl"
  if uses_ratio and log_ratio_fn is None and not has_logits and ratio_source == "logit":
    raise ValueError(f"log_ratio_fn or logits_fn is required for divergence {div.name!r}")

  sg = jax.lax.stop_gradient
  wanted = _valid(valid, batch)
  x_t, sigma, ok = noisy_inputs(x_g, sg(sigma), noise, wanted)
  x_g = _clean(x_g, ok)
  d_q = _frozen_call(teacher_fn, x_t, sigma)
  if fake_returns_logits:
    d_p, logits = _frozen_call(fake_fn, x_t, sigma)
  else:
    d_p = _frozen_call(fake_fn, x_t, sigma)
    logits = _frozen_call(logits_fn, x_t, sigma) if has_logits else None
  for name, out in (("teacher_fn", d_q), ("fake_fn", d_p)):
    if out.shape != x_g.shape:
      raise ValueError(f"{name} returned shape {out.shape}, expected {x_g.shape}")
  ok = ok & _finite(d_q) & _finite(d_p)
  if has_logits:
    if logits.shape[:1] != (batch,):
      raise ValueError(f"logits_fn returned shape {logits.shape}, expected [{batch}, ...]")
    ok = ok & _finite(logits)
    logits = _clean(logits, ok)
  x_g, d_q, d_p = _clean(x_g, ok), _clean(d_q, ok), _clean(d_p, ok)
  numel = x_g[0].size
  w_f = sg(jnp.maximum(_mean(jnp.abs(x_g - d_q)), W_F_MIN))

  # Density ratio r [B] (stop-gradient); samples whose r is unusable are dropped where r is used.
  ones = jnp.ones((batch,), x_g.dtype)
  reads_ratio = ratio_source == "official_bce" or log_ratio_fn is not None or has_logits
  if ratio_source == "official_bce":
    l_gan = generator_gan_loss(sg(logits), scale=numel / w_f, batch_mean=True, valid=ok)
    r_raw = jnp.clip(_official_bce_ratio(div, l_gan), None, jnp.exp(LOG_R_MAX))
  elif reads_ratio:
    log_r = sg(log_ratio_fn(x_t, sigma) if log_ratio_fn is not None
               else log_ratio_from_logits(logits))
    _check_batch("log_ratio_fn output", log_r, batch)
    r_raw = jnp.exp(jnp.clip(log_r, -LOG_R_MAX, LOG_R_MAX))
  else:
    r_raw = ones
  ratio_ok = jnp.isfinite(r_raw) & (r_raw > 0)
  bad_ratio = ok & ~ratio_ok if uses_ratio else jnp.zeros_like(ok)
  ok = ok & ~bad_ratio
  r_safe = jnp.where(ratio_ok, jnp.maximum(r_raw, jnp.exp(-LOG_R_MAX)), 1.0)
  r = r_safe if uses_ratio else ones
  clipped = jnp.zeros_like(ok)
  if ratio_clip is not None and uses_ratio:
    clipped = (r < ratio_clip[0]) | (r > ratio_clip[1])
    r = jnp.clip(r, *ratio_clip)
  r = jnp.where(ok, r, 1.0)

  d = d_p - d_q
  if mode == "exact":
    h, a = sg(div.H(r)), sg(div.alpha(r))
    d_sg = sg(d)
    lam = sg((r * r * div.d2H(r) * _sum(d_sg * d_sg) + 2.0 * r * div.dH(r) * _sum(d_sg * (d_p - x_g)))
             / (sigma * sigma))
    weights = (h, a, lam)
  elif mode == "official":
    w_sim, w_di = (sg(w) for w in official_weights(div, r))
    h, a = w_sim, jnp.full_like(r, alpha)
    weights = (w_sim, w_di)
  elif mode == "di":
    h = sg(div.H(r))
    if normalize_h:
      h = h / _masked_mean(h, ok)
    a = jnp.zeros_like(r)
    weights = (h,)
  else:  # 'sim'
    h, a = ones, jnp.zeros_like(r)
    weights = ()
  # A weight that overflowed drops its sample; cleaned weights keep 0 * inf out of the gradient.
  for w in weights:
    ok = ok & jnp.isfinite(w)
  weights = [jnp.where(ok, w, 0.0) for w in weights]
  if mode == "exact":
    h, a, lam = weights
    loss = 2.0 * h * (_sum(d * (x_g - d_q)) - a * _sum(d * d)) + lam * _sum(d_sg * x_g)
  elif mode == "official":
    w_sim, w_di = weights
    delta = -d  # D_q - D_psi
    l_sid = _sum(delta * ((d_q - x_g) - alpha * delta)) / w_f
    di_dir = sg(delta * _bcast(jnp.sqrt(_sum(delta * delta)), delta))
    loss = w_sim * l_sid - w_di * _sum(x_g * di_dir)
  elif mode == "di":
    (h,) = weights
    loss = h * _sum(x_g * sg(d))
  else:
    g = jax.grad(lambda v: jnp.sum(_sim_distance(sim_distance, sim_c)(v)))(d)
    loss = _sum(sg(g) * (x_g - d_q)) + _sum(g * sg(x_g - d_p))
  norm = w_f if normalizer == "w_f" else sg(sigma_normalizer(sigma))
  if normalize and mode != "official":
    loss = loss / norm
  if weight is not None:
    loss = loss * sg(weight)
  if gan_weight != 0.0:
    official = mode == "official"
    divide = (official or normalize) if gan_normalize is None else gan_normalize
    scale = numel / w_f if divide else jnp.full_like(w_f, numel)
    loss = loss + gan_weight * generator_gan_loss(logits, scale, batch_mean=official, valid=ok)
  loss = jnp.where(ok, loss, 0.0)
  if not return_aux:
    return loss
  kept = jnp.maximum(jnp.sum(ok), 1)
  log_r_kept = jnp.where(ok & ratio_ok, jnp.log(r_safe), 0.0) if reads_ratio else 0.0 * r
  aux = {
      "nan_count": jnp.sum(wanted & ~ok & ~bad_ratio).astype(jnp.int32),
      "ratio_invalid_count": jnp.sum(bad_ratio).astype(jnp.int32),
      "ratio_clip_fraction": jnp.sum(ok & clipped) / kept,
      "r_mean": _masked_mean(r, ok),
      "r_min": jnp.min(jnp.where(ok, r, jnp.inf)),
      "r_max": jnp.max(jnp.where(ok, r, -jnp.inf)),
      "H_mean": _masked_mean(h, ok),
      "alpha_mean": _masked_mean(a, ok),
      "w_f_mean": _masked_mean(w_f, ok),
  }
  aux.update(_sigma_bin_stats(log_r_kept, sigma, ok & ratio_ok))
  return loss, aux


# ----------------------------------------------------------------------------------------------
# Method presets.

# The presets of method_options; DIVERGENCE_METHODS take a divergence, the others are reverse_kl.
METHODS = ("uni_instruct", "uni_instruct_official", "sid", "sida", "sid2a", "diff_instruct", "dmd",
           "dmd2", "f_distill", "sim")
DIVERGENCE_METHODS = ("uni_instruct", "uni_instruct_official", "f_distill")


def method_options(method: str, divergence: Optional[str] = None, **overrides: Any) -> Dict[str, Any]:
  """Keyword arguments of generator_loss for a named method (overrides win).

  The GAN term is part of generator_loss (gan_weight, in per-sample loss units; pass logits_fn when
  gan_weight != 0), so `generator_loss(x_g, sigma, noise, teacher_fn, fake_fn, log_ratio_fn,
  logits_fn=..., **method_options(...))` is the whole generator objective per sample; the trainer
  then applies its loss scaling (recipe: x100, i.e. lsg) to the batch mean. What a method needs
  from the trainer besides the loss (fake-score updates per generator update, generator
  initialisation) is in method_settings.

  Methods:
    'uni_instruct': expanded f-divergence with the exact unbiased gradient (spec §1.4), divided by
      sigma_normalizer(sigma) (SiD's scale per noise level, but a function of sigma alone, so the
      expected gradient stays that of E_p[H ||d||^2] / sigma_normalizer), plus the GAN term (recipe
      ratio 0.01/100 -> gan_weight 1e-4). divergence required.
    'uni_instruct_official': the released code's recipe (spec §1.6): official mode, alpha 1, r from
      the discriminator logit (use ratio_source='official_bce' to reproduce the code's ratio), GAN
      weight 1e-4 (the code's Forward-Clean branch: gan_weight=0). divergence required.
    'sid': SiD, Zhou et al. 2024: reverse_kl, official, alpha 1.2, no GAN:
      sum (D_q - D_psi)((D_q - x_g) - 1.2 (D_q - D_psi)) / w_f.
    'sida': SiDA, Zhou et al. 2024 (arXiv 2410.14919): 0.5 * SiD(alpha 1) + 0.5 * GAN, with the
      loop's scales 100 and 0.01: weight 0.5, gan_weight 0.5e-4.
    'sid2a': SiD^2A: the SiDA loss from a SiD-distilled generator (method_settings:
      generator_init 'sid').
    'diff_instruct': Diff-Instruct, Luo et al. 2023: Grad(DI) = sum x_g * sg(D_psi - D_q)
      ('di' mode, reverse_kl, no normaliser).
    'dmd': DMD, Yin et al. 2024: the same gradient divided by mean|x_g - D_q| (normalize=True).
    'dmd2': DMD2, Yin et al. 2024 (arXiv 2405.14867): 'dmd' plus the un-normalised GAN term
      gan_weight * numel * BCE_i with DMD2's ImageNet weight gen_cls_loss_weight = 3e-3 (its loss is
      0.5 * mean((x - sg(x - grad))^2) + 3e-3 * mean(softplus(-logit)): relative to a per-sample
      gradient grad, the GAN term is 3e-3 * numel * BCE_i); 5 fake-score updates per generator
      update (method_settings). DMD2's separate classifier head on clean/noised images is replaced by
      the encoder-mean logits at x_t (spec §1.5).
    'f_distill': f-distill, Xu, Nie & Vahdat 2025: single-level E[H(r) Grad(DI)] ('di' mode) with
      r clipped to [0.1, 20] and h divided by its batch mean (FastGen); FastGen's per-time-bin EMA
      normalisation of r is not included. divergence required.
    'sim': SIM, Luo et al. 2024: minimises E_{p_sigma}[dist(D_psi - D_q)] ('sim' mode), pseudo-Huber
      dist with c = 1 (override sim_distance / sim_c; 'squared_l2' is SiD with alpha 1/2). No GAN.
  """
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; known: {METHODS}")
  needs_div = method in DIVERGENCE_METHODS
  if needs_div and divergence is None:
    raise ValueError(f"method {method!r} needs a divergence")
  if not needs_div and divergence not in (None, "reverse_kl"):
    raise ValueError(f"method {method!r} is the reverse_kl special case, got divergence {divergence!r}")
  sida = dict(mode="official", alpha=1.0, weight=0.5, gan_weight=0.5e-4)
  presets = {
      "uni_instruct": dict(mode="exact", normalize=True, normalizer="sigma", gan_weight=1e-4),
      "uni_instruct_official": dict(mode="official", alpha=1.0, gan_weight=1e-4),
      "sid": dict(mode="official", alpha=1.2, gan_weight=0.0),
      "sida": sida,
      "sid2a": sida,
      "diff_instruct": dict(mode="di", normalize=False, gan_weight=0.0),
      "dmd": dict(mode="di", normalize=True, gan_weight=0.0),
      "dmd2": dict(mode="di", normalize=True, gan_weight=3e-3, gan_normalize=False),
      "f_distill": dict(mode="di", ratio_clip=(0.1, 20.0), normalize_h=True, gan_weight=0.0),
      "sim": dict(mode="sim", sim_distance="pseudo_huber", sim_c=1.0, gan_weight=0.0),
  }
  options = dict(presets[method], divergence=divergences.get(divergence or "reverse_kl").name)
  options.update(overrides)
  return options


def method_settings(method: str) -> Dict[str, Any]:
  """What a named method needs from the trainer besides its generator loss.

  Returns:
    {'fake_updates_per_gen': fake-score/discriminator updates per generator update (DMD2's
     two-time-scale rule: 5; the others 1), 'generator_init': 'teacher' or 'sid' (SiD^2A starts
     from a SiD-distilled generator; the trainer must refuse another init)}.
  """
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; known: {METHODS}")
  return {"fake_updates_per_gen": 5 if method == "dmd2" else 1,
          "generator_init": "sid" if method == "sid2a" else "teacher"}


def reads_discriminator(options: Dict[str, Any]) -> bool:
  """Whether generator_loss(**options) with log_ratio_fn=None (as the trainer calls it) reads the
  discriminator: for the GAN term, for the official BCE ratio, or for r = exp(logit) when the mode
  uses r (every divergence but reverse_kl, outside 'sim'). The discriminator must then be trained,
  and the run needs real data; otherwise neither is needed."""
  uses_ratio = options.get("mode", "exact") != "sim" and options["divergence"] != "reverse_kl"
  return (options.get("gan_weight", 0.0) != 0.0 or options.get("ratio_source") == "official_bce"
          or uses_ratio)
