"""generator_loss against the official SiD code (../shared/fixtures/sid_loss), the stop-gradient
audit, the special cases against their published formulas, and the noise-level samplers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import shared_path
from uni_instruct_jax import divergences, losses
from uni_instruct_jax.convert import load_edm_pickle

TAGS = {"a1p2": 1.2, "a1": 1.0, "a0p5": 0.5}


@pytest.fixture(scope="module")
def sid_fixture():
  ref = dict(np.load(shared_path("fixtures", "sid_loss", "sid-loss.npz")))
  teacher, t_vars = load_edm_pickle(shared_path("fixtures", "edm", "ddpmpp-tiny-uncond.pkl"))
  fake, f_vars = load_edm_pickle(shared_path("fixtures", "sid_loss", "fake-tiny-uncond.pkl"))
  nhwc = lambda a: jnp.asarray(np.transpose(a, (0, 2, 3, 1)))
  teacher_fn = lambda x, s: teacher.apply(t_vars, x, s)
  fake_fn = lambda x, s: fake.apply(f_vars, x, s)
  return ref, nhwc, teacher_fn, fake_fn


def _official_sid(alpha, **options):
  return dict(mode="official", alpha=alpha, divergence="reverse_kl", **options)


@pytest.mark.parametrize("tag", sorted(TAGS))
def test_official_mode_reproduces_the_official_sid_loss(sid_fixture, tag):
  ref, nhwc, teacher_fn, fake_fn = sid_fixture
  x_g, sigma = nhwc(ref["x_g"]), jnp.asarray(ref[f"gen_{tag}_sigma"])
  noise = nhwc(ref[f"gen_{tag}_noise"])

  def total(x):
    per_sample = losses.generator_loss(x, sigma, noise, teacher_fn, fake_fn, None,
                                       **_official_sid(TAGS[tag]))
    return per_sample.sum(), per_sample

  (_, per_sample), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(x_g)
  want = ref[f"gen_{tag}_loss_per_sample"]
  np.testing.assert_allclose(per_sample, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
  want_grad = np.transpose(ref[f"gen_{tag}_grad_x_g"], (0, 2, 3, 1))
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-5 * np.abs(want_grad).max())
  if tag == "a1p2":  # the SiD preset is this configuration
    sid = losses.generator_loss(x_g, sigma, noise, teacher_fn, fake_fn, None,
                                **losses.method_options("sid"))
    np.testing.assert_allclose(sid, per_sample, rtol=1e-5)  # eager vs jit round-off


def test_fake_score_loss_reproduces_the_official_code(sid_fixture):
  ref, nhwc, _, fake_fn = sid_fixture
  got = losses.fake_score_loss(fake_fn, nhwc(ref["x_g"]), jnp.asarray(ref["fake_sigma"]),
                               nhwc(ref["fake_noise"]))
  np.testing.assert_allclose(got, ref["fake_loss_per_sample"], rtol=2e-5)


# ------------------------------------------------------------------------------------------------
# A small differentiable setup: linear "networks" with parameters, a parametric log-ratio.


def _setup(seed=0, batch=5, dims=(4, 3)):
  k = jax.random.split(jax.random.key(seed), 6)
  x_g = jax.random.normal(k[0], (batch,) + dims)
  noise = jax.random.normal(k[1], (batch,) + dims)
  sigma = jnp.exp(jax.random.normal(k[2], (batch,)))
  params = {"teacher": 1.0 + 0.1 * jax.random.normal(k[3], dims),
            "fake": 1.0 + 0.1 * jax.random.normal(k[4], dims),
            "ratio": 0.3 * jax.random.normal(k[5], dims),
            "weight": jnp.linspace(0.5, 1.5, batch)}
  return x_g, noise, sigma, params


def _fns(params):
  bc = lambda s, x: s.reshape((-1,) + (1,) * (x.ndim - 1))
  teacher = lambda x, s: params["teacher"] * x / (1 + bc(s, x) ** 2)
  fake = lambda x, s: params["fake"] * jnp.tanh(x) / (1 + bc(s, x) ** 2)
  log_ratio = lambda x, s: jnp.sum(params["ratio"] * x, axis=tuple(range(1, x.ndim))) / 4
  logits = lambda x, s: (params["ratio"] * x)[..., None]
  return teacher, fake, log_ratio, logits


CONFIGS = [dict(mode="exact", divergence=d) for d in divergences.names()] + [
    dict(mode="official", divergence=d, alpha=1.0) for d in divergences.names()] + [
    dict(mode="di", divergence="forward_kl", normalize_h=True, ratio_clip=(0.1, 20.0)),
    dict(mode="exact", divergence="jeffreys", normalize=True, gan_weight=1e-2),
    dict(mode="official", divergence="forward_kl", ratio_source="official_bce", gan_weight=1e-2)]


@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_stop_gradient_audit(options):
  """Nothing flows into the teacher, fake, ratio or weight parameters; x_g gets a gradient."""
  x_g, noise, sigma, params = _setup()

  def objective(p, x):
    teacher, fake, log_ratio, logits = _fns(p)
    return jnp.sum(losses.generator_loss(x, sigma, noise, teacher, fake, log_ratio,
                                         weight=p["weight"], logits_fn=logits, **options))

  g_params, g_x = jax.grad(objective, argnums=(0, 1))(params, x_g)
  for name, g in g_params.items():
    np.testing.assert_array_equal(g, 0.0, err_msg=name)
  assert float(jnp.abs(g_x).max()) > 0


def test_gradient_flows_through_the_network_inputs():
  """Besides the direct x_g path, the gradient goes through x_t into teacher_fn and fake_fn."""
  x_g, noise, sigma, params = _setup(1)
  teacher, fake, _, _ = _fns(params)
  opts = _official_sid(1.2)
  g = jax.grad(lambda x: losses.generator_loss(x, sigma, noise, teacher, fake, None, **opts).sum())
  # Same loss with the network outputs computed from a constant x_t: only the direct path.
  x_t = x_g + sigma[:, None, None] * noise
  d_q, d_p = teacher(x_t, sigma), fake(x_t, sigma)
  direct = lambda x: losses.generator_loss(x, sigma, noise, lambda *_: d_q, lambda *_: d_p, None,
                                           **opts).sum()
  assert float(jnp.abs(g(x_g) - jax.grad(direct)(x_g)).max()) > 1e-3


# ------------------------------------------------------------------------------------------------
# Special cases against their published formulas


def _w_f(x_g, d_q):
  return jnp.maximum(jnp.mean(jnp.abs(x_g - d_q), axis=(1, 2)), 1e-5)


def _outputs(x_g, noise, sigma, params):
  teacher, fake, log_ratio, logits = _fns(params)
  x_t = x_g + sigma[:, None, None] * noise
  return teacher, fake, log_ratio, logits, teacher(x_t, sigma), fake(x_t, sigma), x_t


def test_sid_and_sida_match_their_formulas():
  x_g, noise, sigma, params = _setup(2)
  teacher, fake, _, logits, d_q, d_p, x_t = _outputs(x_g, noise, sigma, params)
  delta = d_q - d_p
  sid = lambda a: jnp.sum(delta * ((d_q - x_g) - a * delta), axis=(1, 2)) / _w_f(x_g, d_q)
  got = losses.generator_loss(x_g, sigma, noise, teacher, fake, None, **losses.method_options("sid"))
  np.testing.assert_allclose(got, sid(1.2), rtol=1e-5)
  # SiDA (Zhou et al. 2024): 0.5 SiD(alpha 1) + 0.5 x 0.01/100 x C H W BCE_batch(logits, 1) / w_f.
  got = losses.generator_loss(x_g, sigma, noise, teacher, fake, None, logits_fn=logits,
                              **losses.method_options("sida"))
  bce = jnp.mean(jax.nn.softplus(-jnp.clip(logits(x_t, sigma), -10, 10)))
  want = 0.5 * sid(1.0) + 0.5e-4 * 12 * bce / _w_f(x_g, d_q)
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("method", ["diff_instruct", "dmd", "f_distill"])
def test_distribution_matching_gradients(method):
  """Diff-Instruct: grad_x_g = D_psi - D_q (denoiser units); DMD: / mean|x_g - D_q|;
  f-distill: h(r) / mean(h) (D_psi - D_q) with r = exp(log r) clipped to [0.1, 20]."""
  x_g, noise, sigma, params = _setup(3)
  teacher, fake, log_ratio, _, d_q, d_p, x_t = _outputs(x_g, noise, sigma, params)
  div = "forward_kl" if method == "f_distill" else None
  opts = losses.method_options(method, div)
  grad = jax.grad(lambda x: losses.generator_loss(x, sigma, noise, teacher, fake, log_ratio,
                                                  **opts).sum())(x_g)
  want = d_p - d_q
  if method == "dmd":
    want = want / _w_f(x_g, d_q)[:, None, None]
  if method == "f_distill":
    h = jnp.clip(jnp.exp(log_ratio(x_t, sigma)), 0.1, 20.0)  # H(r) = r for forward KL
    want = want * (h / h.mean())[:, None, None]
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)


def test_official_weights_jeffreys_mix_and_per_sample_di_terms():
  x_g, noise, sigma, params = _setup(4)
  teacher, fake, log_ratio, _, d_q, d_p, x_t = _outputs(x_g, noise, sigma, params)
  r = jnp.exp(log_ratio(x_t, sigma))
  delta = d_q - d_p
  l_sid = jnp.sum(delta * ((d_q - x_g) - delta), axis=(1, 2)) / _w_f(x_g, d_q)
  norm = jnp.sqrt(jnp.sum(delta ** 2, axis=(1, 2)))
  di = jnp.sum(x_g * delta, axis=(1, 2)) * norm
  want = {"jeffreys": (0.4 * r + 0.6) * l_sid,                  # the code's JKL mix
          "forward_kl": r * l_sid,
          "pearson_chi2": 2 * r ** 2 * l_sid - 4 * r ** 2 * di,   # per sample: no crash
          "jensen_shannon": r / (1 + r) * l_sid + 2 * r ** 2 / (1 + r) ** 3 * di}
  for name, expected in want.items():
    got = losses.generator_loss(x_g, sigma, noise, teacher, fake, log_ratio, mode="official",
                                divergence=name, alpha=1.0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_official_bce_ratio_reproduces_the_released_code():
  """r = -L/(1-L) (FKL) from L_i = C H W BCE_batch / w_f,i: a number close to 1, as in the code."""
  x_g, noise, sigma, params = _setup(5)
  teacher, fake, _, logits, d_q, d_p, x_t = _outputs(x_g, noise, sigma, params)
  _, aux = losses.generator_loss(x_g, sigma, noise, teacher, fake, None, mode="official",
                                 divergence="forward_kl", ratio_source="official_bce",
                                 logits_fn=logits, return_aux=True)
  big_l = 12 * jnp.mean(jax.nn.softplus(-jnp.clip(logits(x_t, sigma), -10, 10))) / _w_f(x_g, d_q)
  np.testing.assert_allclose(aux["r_mean"], jnp.mean(-big_l / (1 - big_l)), rtol=1e-5)


def test_nan_samples_are_dropped_and_counted():
  x_g, noise, sigma, params = _setup(6)
  teacher, fake, log_ratio, _ = _fns(params)
  x_bad = x_g.at[2].set(jnp.nan)
  loss, aux = losses.generator_loss(x_bad, sigma, noise, teacher, fake, log_ratio,
                                    divergence="jeffreys", return_aux=True)
  assert int(aux["nan_count"]) == 1 and float(loss[2]) == 0.0 and np.isfinite(loss).all()
  clean = losses.generator_loss(x_g, sigma, noise, teacher, fake, log_ratio, divergence="jeffreys")
  np.testing.assert_allclose(np.delete(loss, 2), np.delete(clean, 2), rtol=1e-6)


def test_bad_inputs_raise_clear_errors():
  x_g, noise, sigma, params = _setup(7)
  teacher, fake, log_ratio, _ = _fns(params)
  with pytest.raises(ValueError, match="mode"):
    losses.generator_loss(x_g, sigma, noise, teacher, fake, log_ratio, "jeffreys", mode="nope")
  with pytest.raises(ValueError, match="noise shape"):
    losses.generator_loss(x_g, sigma, noise[:, :2], teacher, fake, log_ratio, "jeffreys")
  with pytest.raises(ValueError, match="log_ratio_fn or logits_fn"):
    losses.generator_loss(x_g, sigma, noise, teacher, fake, None, "jeffreys")
  with pytest.raises(ValueError, match="logits_fn is required"):
    losses.generator_loss(x_g, sigma, noise, teacher, fake, None, "reverse_kl", gan_weight=1.0)
  with pytest.raises(ValueError, match="unknown method"):
    losses.method_options("sid2")


# ------------------------------------------------------------------------------------------------
# Noise levels


def test_noise_level_samplers():
  fake = np.log(np.asarray(losses.sample_fake_sigma(jax.random.key(0), 200_000)))
  assert abs(fake.mean() + 1.2) < 0.01 and abs(fake.std() - 1.2) < 0.01
  gen = np.asarray(losses.sample_generator_sigma(jax.random.key(1), 200_000, tmax=800))
  assert 0.002 <= gen.min() < 0.0025 and 24.0 < gen.max() <= 24.42
  # t ~ U[0, 0.8] on the Karras schedule: the median noise level is sigma(0.4).
  np.testing.assert_allclose(np.median(gen), losses.karras_sigma(0.4), rtol=0.02)
  np.testing.assert_allclose(losses.karras_sigma(jnp.asarray([0.0, 0.8, 1.0])),
                             [0.002, 24.41, 80.0], rtol=1e-3)
  with pytest.raises(ValueError, match="tmax"):
    losses.sample_generator_sigma(jax.random.key(0), 4, tmax=0)


def test_exact_reverse_kl_is_twice_sid_with_half_alpha_and_no_normaliser():
  x_g, noise, sigma, params = _setup(8)
  teacher, fake, _, _, d_q, d_p, _ = _outputs(x_g, noise, sigma, params)
  delta = d_q - d_p
  want = 2 * jnp.sum(delta * ((d_q - x_g) - 0.5 * delta), axis=(1, 2))
  got = losses.generator_loss(x_g, sigma, noise, teacher, fake, None, "reverse_kl", mode="exact")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_discriminator_loss_and_log_ratio():
  k1, k2, k3 = jax.random.split(jax.random.key(9), 3)
  real = 3 * jax.random.normal(k1, (4, 2, 2, 1))
  fake = 3 * jax.random.normal(k2, (4, 2, 2, 1))
  sigma = jnp.exp(jax.random.normal(k3, (4,)))
  bce = 0.5 * (jnp.mean(jax.nn.softplus(-real), axis=(1, 2, 3))
               + jnp.mean(jax.nn.softplus(fake), axis=(1, 2, 3)))
  np.testing.assert_allclose(losses.discriminator_loss(real, fake, sigma),
                             losses.edm_weight(sigma) * bce, rtol=1e-6)
  np.testing.assert_allclose(losses.discriminator_loss(real, fake, sigma, batch_mean=True),
                             losses.edm_weight(sigma) * bce.mean(), rtol=1e-6)
  features = jnp.stack([jnp.full((2, 2, 8), v) for v in (-20.0, 0.5, 30.0)])
  logits = losses.discriminator_logits(features)
  assert logits.shape == (3, 2, 2, 1)
  np.testing.assert_allclose(losses.log_ratio_from_logits(logits), [-10.0, 0.5, 10.0])


def test_jit_vmap_shapes_and_no_tracer_leaks():
  x_g, noise, sigma, params = _setup(10)
  teacher, fake, log_ratio, logits = _fns(params)

  def loss(x, n, s):
    return losses.generator_loss(x, s, n, teacher, fake, log_ratio, "jensen_shannon",
                                 logits_fn=logits, gan_weight=1e-2, normalize=True)

  with jax.checking_leaks():
    eager = loss(x_g, noise, sigma)
    jitted = jax.jit(loss)(x_g, noise, sigma)
    grads = jax.jit(jax.grad(lambda x: loss(x, noise, sigma).sum()))(x_g)
  chex.assert_shape(eager, (5,))
  chex.assert_trees_all_close(jitted, eager, rtol=1e-5, atol=1e-6)
  chex.assert_tree_all_finite(grads)
  chex.assert_equal_shape([grads, x_g])
  # vmap over two independent batches equals two separate calls.
  stacked = jax.vmap(loss)(jnp.stack([x_g, -x_g]), jnp.stack([noise, noise]),
                           jnp.stack([sigma, sigma]))
  chex.assert_trees_all_close(stacked, jnp.stack([eager, loss(-x_g, noise, sigma)]), rtol=1e-5,
                              atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Presets added for issue 10 §5, the ratio's masking and diagnostics (§2).


def test_dmd2_is_dmd_plus_the_unnormalised_gan_term():
  """DMD2: (D_psi - D_q) / mean|x_g - D_q| as gradient, plus 3e-3 * numel * BCE(logit, 1) per
  sample, not divided by w_f; 5 fake-score updates per generator update."""
  x_g, noise, sigma, params = _setup(11)
  teacher, fake, _, logits, _, _, x_t = _outputs(x_g, noise, sigma, params)
  dmd = losses.generator_loss(x_g, sigma, noise, teacher, fake, None, **losses.method_options("dmd"))
  dmd2 = losses.generator_loss(x_g, sigma, noise, teacher, fake, None, logits_fn=logits,
                               **losses.method_options("dmd2"))
  bce = jnp.mean(jax.nn.softplus(-jnp.clip(logits(x_t, sigma), -10, 10)), axis=(1, 2, 3))
  np.testing.assert_allclose(dmd2, dmd + 3e-3 * 12 * bce, rtol=1e-5)
  assert losses.method_settings("dmd2") == {"fake_updates_per_gen": 5, "generator_init": "teacher"}


def test_sid2a_is_sida_from_a_sid_generator():
  assert losses.method_options("sid2a") == losses.method_options("sida")
  assert losses.method_settings("sid2a")["generator_init"] == "sid"
  assert losses.method_settings("sida") == {"fake_updates_per_gen": 1, "generator_init": "teacher"}


def test_sim_squared_l2_has_the_gradient_of_exact_reverse_kl():
  """SIM with d = ||.||^2 is SiD with alpha 1/2 (twice S_1/2 = exact reverse_kl): same gradient."""
  x_g, noise, sigma, params = _setup(12)
  teacher, fake, _, _ = _fns(params)
  grad = lambda **o: jax.grad(lambda x: losses.generator_loss(
      x, sigma, noise, teacher, fake, None, **{"divergence": "reverse_kl", **o}).sum())(x_g)
  np.testing.assert_allclose(grad(mode="sim", sim_distance="squared_l2"), grad(mode="exact"),
                             rtol=1e-5, atol=1e-6)
  huber = grad(**losses.method_options("sim", sim_c=1e4))  # c >> ||d||: d ~ ||d||^2 / (2c)
  np.testing.assert_allclose(huber * 2e4, grad(mode="exact"), rtol=1e-3, atol=1e-4)


def test_non_positive_ratio_is_masked_and_counted():
  """The official BCE 'ratio' of the chi^2 / JS branches is L/(1 - L) < 0: every sample is dropped
  and counted, the gradient is exactly 0; where r is unused (reverse_kl) nothing is dropped."""
  x_g, noise, sigma, params = _setup(13)
  teacher, fake, _, logits = _fns(params)
  for name in ("pearson_chi2", "jensen_shannon", "squared_hellinger"):
    fn = lambda x: losses.generator_loss(x, sigma, noise, teacher, fake, None, name,
                                         mode="official", ratio_source="official_bce",
                                         logits_fn=logits, return_aux=True)
    loss, aux = fn(x_g)
    grad = jax.grad(lambda x: fn(x)[0].sum())(x_g)
    assert int(aux["ratio_invalid_count"]) == 5 and int(aux["nan_count"]) == 0, name
    np.testing.assert_array_equal(loss, 0.0)
    np.testing.assert_array_equal(grad, 0.0)
  loss, aux = losses.generator_loss(x_g, sigma, noise, teacher, fake, None, "reverse_kl",
                                    mode="official", ratio_source="official_bce",
                                    logits_fn=logits, return_aux=True)
  assert int(aux["ratio_invalid_count"]) == 0 and bool(jnp.all(loss != 0))


def test_ratio_clip_fraction_and_log_r_per_sigma_bin():
  """ratio_clip_fraction counts the kept samples whose r the clip changed; log_r_sigma_bin{k}
  is the mean log r before the clip over the samples with SIGMA_BIN_EDGES[k-1] <= sigma <
  SIGMA_BIN_EDGES[k]; a NaN log r drops its sample (counted in ratio_invalid_count)."""
  x_g, noise, _, params = _setup(14, batch=8)
  teacher, fake, _, _ = _fns(params)
  sigma = jnp.asarray([0.05, 0.09, 0.2, 0.4, 0.6, 3.0, 30.0, 1.0])
  log_r = jnp.asarray([-2.0, 0.5, 1.0, 3.0, -0.2, 0.1, 2.0, jnp.nan])
  _, aux = losses.generator_loss(x_g, sigma, noise, teacher, fake, lambda x, s: log_r, "jeffreys",
                                 ratio_clip=(0.25, 4.0), return_aux=True)
  assert int(aux["ratio_invalid_count"]) == 1 and int(aux["nan_count"]) == 0
  np.testing.assert_allclose(aux["ratio_clip_fraction"], 3 / 7, rtol=1e-6)  # -2.0, 3.0, 2.0
  for k, (mean, count) in enumerate([(-0.75, 2), (2.0, 2), (-0.2, 1), (1.05, 2)]):
    np.testing.assert_allclose(aux[f"log_r_sigma_bin{k}"], mean, rtol=1e-6)
    assert int(aux[f"sigma_bin{k}_count"]) == count
  np.testing.assert_allclose(aux["r_max"], 4.0, rtol=1e-6)


def test_aux_keys_are_the_same_for_every_preset():
  """The trainer switches between phases with lax.switch: every option set returns one pytree."""
  x_g, noise, sigma, params = _setup(15)
  teacher, fake, log_ratio, logits = _fns(params)
  structures = set()
  for method in ("uni_instruct", "uni_instruct_official", "sid", "sida", "sid2a", "diff_instruct",
                 "dmd", "dmd2", "f_distill", "sim"):
    div = "forward_kl" if method in ("uni_instruct", "uni_instruct_official", "f_distill") else None
    out = jax.eval_shape(lambda x: losses.generator_loss(
        x, sigma, noise, teacher, fake, None, logits_fn=logits, return_aux=True,
        **losses.method_options(method, div)), x_g)
    structures.add(str(jax.tree.map(lambda a: (a.shape, a.dtype), out)))
  assert len(structures) == 1, structures


def test_reads_discriminator():
  reads = lambda m, d=None, **o: losses.reads_discriminator(losses.method_options(m, d, **o))
  assert not reads("sid") and not reads("diff_instruct") and not reads("dmd") and not reads("sim")
  assert reads("sida") and reads("dmd2") and reads("f_distill", "forward_kl")
  assert not reads("f_distill", "reverse_kl")
  assert reads("uni_instruct_official", "forward_kl", gan_weight=0.0)  # Forward-Clean reads r
  assert not reads("uni_instruct", "reverse_kl", gan_weight=0.0)
  assert reads("uni_instruct_official", "reverse_kl", gan_weight=0.0, ratio_source="official_bce")


def test_new_option_errors():
  x_g, noise, sigma, params = _setup(16)
  teacher, fake, log_ratio, _ = _fns(params)
  call = lambda div="reverse_kl", **o: losses.generator_loss(x_g, sigma, noise, teacher, fake,
                                                             log_ratio, div, **o)
  with pytest.raises(ValueError, match="normalizer"):
    call(normalize=True, normalizer="batch")
  with pytest.raises(ValueError, match="does not use a divergence"):
    call("forward_kl", mode="sim")
  with pytest.raises(ValueError, match="sim_c"):
    call(mode="sim", sim_c=0.0)
  with pytest.raises(ValueError, match="sim_distance"):
    call(mode="sim", sim_distance="l1")
  with pytest.raises(ValueError, match="ratio_clip"):
    call("forward_kl", ratio_clip=(20.0, 0.1))
  with pytest.raises(ValueError, match="valid"):
    call(valid=jnp.ones((3,), bool))
  with pytest.raises(ValueError, match="unknown method"):
    losses.method_settings("sid3")


def test_uni_instruct_preset_is_the_exact_loss_over_sigma_normalizer_plus_gan():
  """'uni_instruct': exact loss / sigma_normalizer(sigma) + 1e-4 * numel * BCE_i / w_f (the GAN
  term keeps SiD's per-sample w_f: it has no gradient identity to keep)."""
  x_g, noise, sigma, params = _setup(17)
  teacher, fake, log_ratio, logits, d_q, _, x_t = _outputs(x_g, noise, sigma, params)
  exact = losses.generator_loss(x_g, sigma, noise, teacher, fake, log_ratio, "jeffreys")
  got = losses.generator_loss(x_g, sigma, noise, teacher, fake, log_ratio, logits_fn=logits,
                              **losses.method_options("uni_instruct", "jeffreys"))
  bce = jnp.mean(jax.nn.softplus(-jnp.clip(logits(x_t, sigma), -10, 10)), axis=(1, 2, 3))
  want = exact / losses.sigma_normalizer(sigma) + 1e-4 * 12 * bce / _w_f(x_g, d_q)
  np.testing.assert_allclose(got, want, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# One fake-score forward for both the denoiser and the discriminator logits


@pytest.mark.parametrize("preset,divergence", [("uni_instruct_official", "jeffreys"),
                                               ("uni_instruct", "forward_kl")])
def test_fake_returns_logits_equals_a_separate_encoder_pass(preset, divergence):
  """fake_fn returning (D_psi, logits of its own bottleneck) gives the loss and the x_g gradient
  of the two-pass call (fake_fn + a separate encode logits_fn), GAN term on; nothing flows into
  the fake net's parameters either way."""
  from uni_instruct_jax.networks import build_network  # pylint: disable=g-import-not-at-top
  net = build_network("EDMPrecond", dict(
      img_resolution=4, img_channels=2, model_type="SongUNet", model_channels=8,
      channel_mult=[1, 1], num_blocks=1, attn_resolutions=[], dropout=0.0))
  k = jax.random.split(jax.random.key(3), 4)
  x_g = jax.random.normal(k[0], (4, 4, 4, 2))
  noise = jax.random.normal(k[1], x_g.shape)
  sigma = jnp.array([0.05, 0.5, 2.0, 20.0])
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(k[2], p.shape),
                        net.init(k[3], x_g, sigma)["params"])
  teacher = lambda x, s: net.apply({"params": jax.tree.map(lambda p: 0.9 * p, params)}, x, s)
  opts = losses.method_options(preset, divergence, gan_weight=0.1)
  assert opts["gan_weight"] != 0.0

  def two_pass(p, x, o):
    fake = lambda xt, s: net.apply({"params": p}, xt, s)
    logits = lambda xt, s: losses.discriminator_logits(
        net.apply({"params": p}, xt, s, method="encode"))
    return losses.generator_loss(x, sigma, noise, teacher, fake, None, logits_fn=logits, **o)

  def one_pass(p, x, o):
    def fake(xt, s):
      d, feats = net.apply({"params": p}, xt, s, return_features=True)
      return d, losses.discriminator_logits(feats)
    return losses.generator_loss(x, sigma, noise, teacher, fake, None, fake_returns_logits=True,
                                 **o)

  @jax.jit
  def results(p, x):
    out = {}
    for name, fn, o in (("two", two_pass, opts), ("one", one_pass, opts),
                        ("no_gan", one_pass, dict(opts, gan_weight=0.0))):
      g_p, g_x = jax.grad(lambda p, x: fn(p, x, o).sum(), argnums=(0, 1))(p, x)
      g_p_max = jnp.max(jnp.stack([jnp.abs(g).max() for g in jax.tree.leaves(g_p)]))
      out[name] = (fn(p, x, o), g_x, g_p_max)
    return out

  out = results(params, x_g)
  np.testing.assert_allclose(out["one"][0], out["two"][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["one"][1], out["two"][1], rtol=1e-4, atol=1e-6)
  assert float(out["one"][2]) == float(out["two"][2]) == 0.0  # fake params stopped
  assert float(jnp.abs(out["one"][1]).max()) > 0
  # The GAN term reaches x_g through x_t -> features -> logits: without it the gradient differs.
  assert float(jnp.abs(out["no_gan"][1] - out["one"][1]).max()) > 1e-6
  with pytest.raises(ValueError, match="not both"):
    losses.generator_loss(x_g, sigma, noise, teacher, teacher, None, logits_fn=teacher,
                          fake_returns_logits=True, **opts)
