"""Tests of uni_instruct_jax.divergences: closed forms vs autodiff of f, spec §2 values, registry."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uni_instruct_jax import divergences

BUILTIN = ("reverse_kl", "forward_kl", "jeffreys", "jensen_shannon", "pearson_chi2", "neyman_chi2",
           "squared_hellinger")
CUSTOM = "test_power_1p5"  # alpha-family f = (r^1.5 - 1 - 1.5 (r - 1)) / 0.75: H = r^1.5.


def custom_divergence():
  """The custom divergence of these tests (registered once per process)."""
  if CUSTOM in divergences.names():
    return divergences.get(CUSTOM)
  return divergences.register(CUSTOM, lambda r: (r ** 1.5 - 1.0 - 1.5 * (r - 1.0)) / 0.75)


def _autodiff(fn):
  return jax.jit(jnp.vectorize(jax.grad(fn)))


@pytest.mark.parametrize("name", BUILTIN)
def test_closed_forms_match_autodiff_of_f(name):
  div = divergences.get(name)
  r = jnp.geomspace(1e-3, 1e3, 25)
  with jax.enable_x64(True):
    r64 = jnp.asarray(np.geomspace(1e-3, 1e3, 25), jnp.float64)
    d2f = _autodiff(jax.grad(div.f))
    h_ref = r64 ** 2 * d2f(r64)
    dh_ref = _autodiff(lambda x: x * x * jax.grad(jax.grad(div.f))(x))(r64)
    d2h_ref = _autodiff(jax.grad(lambda x: x * x * jax.grad(jax.grad(div.f))(x)))(r64)
    np.testing.assert_allclose(div.f(jnp.float64(1.0)), 0.0, atol=1e-12)
    np.testing.assert_allclose(div.H(r64), h_ref, rtol=1e-9)
    np.testing.assert_allclose(div.dH(r64), dh_ref, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(div.d2H(r64), d2h_ref, rtol=1e-8, atol=1e-6)
    np.testing.assert_allclose(div.alpha(r64), 0.5 + r64 * dh_ref / (2 * h_ref), rtol=1e-9,
                               atol=1e-9)
  chex.assert_shape(div.H(r), r.shape)


@pytest.mark.parametrize("name,h,alpha,di", [
    # spec §2 table: H, alpha and the DI weight r^2 H'' at r = 2.
    ("reverse_kl", 1.0, 0.5, 0.0),
    ("forward_kl", 2.0, 1.0, 0.0),
    ("jeffreys", 3.0, 0.5 + 1.0 / 3.0, 0.0),
    ("jensen_shannon", 1.0 / 3.0, 0.5 + 1.0 / 6.0, -4.0 / 27.0),
    ("pearson_chi2", 8.0, 1.5, 16.0),
    ("neyman_chi2", 1.0, 0.0, 2.0),
    ("squared_hellinger", np.sqrt(2.0) / 2.0, 0.75, -np.sqrt(2.0) / 8.0),
])
def test_spec_table_values(name, h, alpha, di):
  div = divergences.get(name)
  r = jnp.full((2, 3), 2.0)
  np.testing.assert_allclose(div.H(r), h, rtol=1e-6)
  np.testing.assert_allclose(div.alpha(r), alpha, rtol=1e-6)
  np.testing.assert_allclose(r * r * div.d2H(r), di, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", BUILTIN + (CUSTOM,))
def test_finite_on_safe_domain_float32_jit_vmap(name):
  div = custom_divergence() if name == CUSTOM else divergences.get(name)
  r = jnp.geomspace(1e-6, 1e6, 200, dtype=jnp.float32).reshape(20, 10)
  all_methods = lambda x: [fn(x) for fn in (div.f, div.H, div.dH, div.d2H, div.alpha)]
  out = jax.jit(all_methods)(r)
  chex.assert_shape(out, [r.shape] * 5)
  chex.assert_tree_all_finite(out)
  chex.assert_trees_all_close(jax.vmap(all_methods)(r), out, rtol=1e-5, atol=1e-7)
  assert bool(jnp.all(div.H(r) > 0)), f"{name}: H must be positive"


def test_registered_divergence_from_f_alone():
  div = custom_divergence()
  r = jnp.asarray([0.01, 0.5, 1.0, 3.0, 200.0])
  np.testing.assert_allclose(div.H(r), r ** 1.5, rtol=1e-5)
  np.testing.assert_allclose(div.dH(r), 1.5 * r ** 0.5, rtol=1e-5)
  np.testing.assert_allclose(div.d2H(r), 0.75 * r ** -0.5, rtol=1e-5)
  np.testing.assert_allclose(div.alpha(r), 1.25, rtol=1e-5)
  assert divergences.get(CUSTOM) is div
  assert divergences.get(div) is div


def test_registry_errors():
  with pytest.raises(ValueError, match="unknown divergence 'nope'"):
    divergences.get("nope")
  with pytest.raises(ValueError, match="already registered"):
    divergences.register("forward_kl", lambda r: r * jnp.log(r))
  with pytest.raises(ValueError, match="must be callable"):
    divergences.register("not_callable", 3.0)
  assert set(BUILTIN) <= set(divergences.names())


@pytest.mark.parametrize("name,f,match", [
    ("test_quartic", lambda r: (r - 1.0) ** 4, r"H = r\^2 f''\(r\) must be finite and > 0"),  # H(1) = 0
    ("test_concave", lambda r: -r * jnp.log(r), "must be finite and > 0"),                   # H < 0
    ("test_nan_below_2", lambda r: (r - 1.0) ** 2 + jnp.sqrt(r - 2.0), "must be finite"),
    ("test_vector", lambda r: jnp.stack([r, r]), "scalar to a scalar"),
])
def test_register_rejects_f_with_vanishing_or_non_finite_h(name, f, match):
  """alpha = 1/2 + r H'/(2H) would be NaN where H vanishes: register refuses such an f."""
  with pytest.raises(ValueError, match=match):
    divergences.register(name, f)
  assert name not in divergences.names()
