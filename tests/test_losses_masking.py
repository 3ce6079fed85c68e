"""One bad sample must not spoil a step (issue 12 §4): with the same random draws, the gradient of
a batch in which k samples are poisoned (NaN / +-Inf) equals the gradient of the clean batch with
those samples dropped (valid = False: loss weight 0, left out of the batch statistics), for the
generator step in every mode and preset and for the fake-score + discriminator step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uni_instruct_jax import losses

B, DIMS = 6, (4, 3)
POISON = {1: [jnp.nan], B - 1: [jnp.nan, jnp.inf, -jnp.inf, jnp.nan, jnp.inf]}  # k -> values


def _draws(seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  z = jax.random.normal(k[0], (B,) + DIMS)
  noise = jax.random.normal(k[1], (B,) + DIMS)
  sigma = jnp.exp(jax.random.normal(k[2], (B,)))
  x_real = jax.random.normal(k[3], (B,) + DIMS)
  return z, noise, sigma, x_real


def _poison_mask(k):
  """(bad [B], values [B]): samples 1..k (sample 0 stays clean) get the POISON[k] values."""
  bad = jnp.zeros((B,), bool).at[1:k + 1].set(True)
  return bad, jnp.zeros((B,)).at[1:k + 1].set(jnp.asarray(POISON[k]))


def _poison(x, bad, values):
  """x [B, ...] with the samples where bad [B] holds set to values [B]."""
  shape = (B,) + (1,) * (x.ndim - 1)
  return jnp.where(bad.reshape(shape), values.reshape(shape), x)


def _networks(scale=1.0):
  """Frozen teacher / fake / log-ratio / logits of the generator step (closed-form, per sample)."""
  w = scale * jnp.linspace(0.8, 1.2, np.prod(DIMS)).reshape(DIMS)
  bc = lambda s: s[:, None, None]
  teacher = lambda x, s: w * x / (1 + bc(s) ** 2)
  fake = lambda x, s: jnp.tanh(x) / (1 + bc(s) ** 2)
  log_ratio = lambda x, s: jnp.sum(0.3 * w * x, axis=(1, 2)) / 4
  logits = lambda x, s: (0.3 * w * x)[..., None]
  return teacher, fake, log_ratio, logits


MODES = [
    dict(mode="exact", divergence="jeffreys", ratio_clip=(0.25, 4.0)),
    dict(mode="exact", divergence="pearson_chi2", normalize=True, normalizer="w_f"),
    dict(mode="official", divergence="pearson_chi2", alpha=1.0),
    dict(mode="official", divergence="forward_kl", ratio_source="official_bce", gan_weight=1e-2),
    dict(mode="di", divergence="jensen_shannon", normalize_h=True),
    dict(mode="sim", divergence="reverse_kl", sim_c=0.5),
]
PRESETS = [("uni_instruct", "jensen_shannon"), ("uni_instruct_official", "forward_kl"),
           ("sid", None), ("sida", None), ("sid2a", None), ("diff_instruct", None), ("dmd", None),
           ("dmd2", None), ("f_distill", "squared_hellinger"), ("sim", None)]
CASES = MODES + [losses.method_options(m, d) for m, d in PRESETS]
IDS = [f"mode-{o['mode']}-{o['divergence']}" for o in MODES] + [m for m, _ in PRESETS]


@pytest.mark.parametrize("options", CASES, ids=IDS)
def test_poisoned_generator_samples_contribute_exactly_zero(options):
  """Generator step: poison the output of a tiny generator x_g = W z + c; the gradient w.r.t.
  (W, c), the per-sample losses and every aux statistic equal those of the clean batch with the
  poisoned samples marked invalid; nan_count counts them."""
  z, noise, sigma, _ = _draws()
  teacher, fake, log_ratio, logits = _networks()
  gen = {"w": 1.0 + 0.1 * jnp.cos(jnp.arange(12.0)).reshape(DIMS), "c": 0.05 * jnp.ones(DIMS)}

  @jax.jit
  def run(params, bad, values, valid):
    def objective(p):
      x_g = _poison(p["w"] * z + p["c"], bad, values)
      loss, aux = losses.generator_loss(x_g, sigma, noise, teacher, fake, log_ratio,
                                        return_aux=True, logits_fn=logits, valid=valid, **options)
      return jnp.mean(loss), (loss, aux)
    return jax.grad(objective, has_aux=True)(params)

  for k in POISON:
    bad, values = _poison_mask(k)
    g_bad, (loss_bad, aux_bad) = run(gen, bad, values, jnp.ones((B,), bool))
    g_ref, (loss_ref, aux_ref) = run(gen, jnp.zeros((B,), bool), values, ~bad)
    assert int(aux_bad["nan_count"]) == k and int(aux_ref["nan_count"]) == 0
    for name in ("w", "c"):
      assert np.isfinite(g_bad[name]).all(), name
      np.testing.assert_allclose(g_bad[name], g_ref[name], rtol=1e-6, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(loss_bad, loss_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(loss_bad[bad], 0.0)
    for key in aux_ref:
      if key != "nan_count":
        np.testing.assert_allclose(aux_bad[key], aux_ref[key], rtol=1e-6, err_msg=key)


def _fake_net(p, x, s):
  """Tiny fake-score network: (denoised [B, *DIMS], bottleneck features [B, 3, 2])."""
  bc = s[:, None, None]
  denoised = p["w"] * jnp.tanh(x) / (1 + bc ** 2) + p["c"]
  features = jnp.einsum("bij,jk->bik", x, p["e"]) / (1 + bc)
  return denoised, features[:, :3, :2]


def _fake_step(p, x_g, x_real, sigma, noise, batch_mean, valid_g, valid_real):
  """The trainer's fake-score + discriminator step, built from the library pieces: the DSM loss
  cleans its input and returns the kept mask; the real input goes through noisy_inputs with that
  mask, so the discriminator sees only clean inputs. Returns (mean loss, nan count)."""
  feats = []

  def denoise(x, s):
    d, f = _fake_net(p, x, s)
    feats.append(f)
    return d

  dsm, aux = losses.fake_score_loss(denoise, x_g, sigma, noise, valid=valid_g, return_aux=True)
  x_rt, s_r, ok = losses.noisy_inputs(x_real, sigma, noise, valid=aux["valid"] & valid_real)
  logits_real = losses.discriminator_logits(_fake_net(p, x_rt, s_r)[1])
  disc, d_aux = losses.discriminator_loss(logits_real, losses.discriminator_logits(feats[0]),
                                          sigma, batch_mean=batch_mean, valid=ok, return_aux=True)
  return jnp.mean(dsm + disc), jnp.sum(~ok) + d_aux["nan_count"]


@pytest.mark.parametrize("batch_mean", [False, True], ids=["per-sample", "official-batch-mean"])
@pytest.mark.parametrize("where", ["x_g", "x_real", "noise"])
def test_poisoned_fake_step_inputs_contribute_exactly_zero(where, batch_mean):
  """Fake-score step: poison the generator samples, the real images or the noise; the gradient
  w.r.t. the fake network's parameters equals that of the clean inputs with those samples dropped,
  and the step counts them."""
  z, noise, sigma, x_real = _draws(1)
  params = {"w": 1.0 + 0.1 * z[0], "c": 0.1 * noise[0], "e": 0.3 * jnp.ones((3, 2))}
  ones = jnp.ones((B,), bool)

  @jax.jit
  def grad(bad, values, valid_g, valid_real):
    inputs = {"x_g": z, "x_real": x_real, "noise": noise}
    inputs[where] = _poison(inputs[where], bad, values)
    return jax.grad(_fake_step, has_aux=True)(params, inputs["x_g"], inputs["x_real"], sigma,
                                             inputs["noise"], batch_mean, valid_g, valid_real)

  for k in POISON:
    bad, values = _poison_mask(k)
    g_bad, n_bad = grad(bad, values, ones, ones)
    g_ref, n_ref = grad(~ones, values, ones if where == "x_real" else ~bad, ~bad)
    assert int(n_bad) == k and int(n_ref) == k  # the reference drops the same samples on purpose
    for name in params:
      assert np.isfinite(g_bad[name]).all(), name
      np.testing.assert_allclose(g_bad[name], g_ref[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_unmasked_nan_input_would_spoil_every_gradient():
  """The control: without cleaning, one NaN sample reaches a network and 0 * NaN poisons all
  parameter gradients even when its loss is masked afterwards."""
  z, noise, sigma, _ = _draws(2)
  params = {"w": 1.0 + 0.1 * z[0], "c": 0.1 * noise[0], "e": 0.3 * jnp.ones((3, 2))}
  bad, values = _poison_mask(1)
  x_bad = _poison(z, bad, values)

  def naive(p):
    d, _ = _fake_net(p, x_bad + sigma[:, None, None] * noise, sigma)
    per_sample = jnp.sum(jnp.square(d - x_bad), axis=(1, 2))
    return jnp.mean(jnp.where(bad, 0.0, per_sample))

  assert not np.isfinite(jax.jit(jax.grad(naive))(params)["w"]).all()
  ones = jnp.ones((B,), bool)
  g = jax.jit(jax.grad(lambda p: _fake_step(p, x_bad, z, sigma, noise, False, ones, ones)[0]))(
      params)
  assert np.isfinite(g["w"]).all()
