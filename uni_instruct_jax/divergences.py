"""The f-divergence family used by Uni-Instruct.

Convention (spec §1.1, §2): teacher noisy marginal q, student noisy marginal p, ratio r = q / p,
D_f(q || p) = E_p f(q / p) with f convex and f(1) = 0. The expanded divergence weighs the squared
score difference by H(r) = r^2 f''(r); its exact gradient (spec §1.4) also needs H'(r), H''(r) and
alpha(r) = 1/2 + r H'(r) / (2 H(r)).

Every method takes an array of ratios r > 0 (any shape) and returns an array of the same shape.
The built-in divergences use closed forms that stay finite for r in [1e-6, 1e6] in float32;
`register(name, f)` derives H, H', H'' by automatic differentiation of f alone.
"""

import dataclasses
from typing import Callable, Dict, Union

import jax
import jax.numpy as jnp

Array = jax.Array
_Fn = Callable[[Array], Array]
SAFE_MIN, SAFE_MAX = 1e-6, 1e6  # the ratios the losses pass (they clip log r to +-13.8).


@dataclasses.dataclass(frozen=True)
class Divergence:
  """An f-divergence with its weight function H = r^2 f'' and the derivatives the losses need.

  Attributes:
    name: registry name.
    f: the generator f(r) of D_f(q || p) = E_p f(q/p).
    H: weight r^2 f''(r) of the expanded divergence (SIM weight).
    dH: H'(r).
    d2H: H''(r); r^2 H''(r) is the mean part of the Diff-Instruct weight lambda_DI.
    alpha: alpha(r) = 1/2 + r H'(r) / (2 H(r)), the per-sample SiD coefficient of the exact gradient.
  """
  name: str
  f: _Fn
  H: _Fn
  dH: _Fn
  d2H: _Fn
  alpha: _Fn


_REGISTRY: Dict[str, Divergence] = {}


def _const(value: float) -> _Fn:
  return lambda r: jnp.full_like(r, value)


def _add(div: Divergence) -> Divergence:
  if div.name in _REGISTRY:
    raise ValueError(f"divergence {div.name!r} is already registered")
  _REGISTRY[div.name] = div
  return div


def _elementwise(fn: Callable[[Array], Array]) -> _Fn:
  """Lifts a scalar function to arrays of any shape (compiled, so eager calls are fast too)."""
  return jax.jit(jnp.vectorize(fn))


def _check_safe_domain(div: Divergence) -> None:
  """ValueError unless H > 0 and H, H', H'', alpha are finite on the safe domain (float32).

  alpha = 1/2 + r H' / (2 H) divides by H: an f whose f'' vanishes somewhere (not strictly
  convex) or is non-finite would give NaN alpha in the exact loss.
  """
  r = jnp.concatenate([jnp.geomspace(SAFE_MIN, SAFE_MAX, 241, dtype=jnp.float32),
                       jnp.ones((1,), jnp.float32)])
  h = div.H(r)
  bad = ~(jnp.isfinite(h) & (h > 0))
  if bool(jnp.any(bad)):
    raise ValueError(f"divergence {div.name!r}: H = r^2 f''(r) must be finite and > 0 on "
                     f"[{SAFE_MIN:g}, {SAFE_MAX:g}], got {float(h[jnp.argmax(bad)])} at "
                     f"r = {float(r[jnp.argmax(bad)]):g}")
  for label, fn in (("H'", div.dH), ("H''", div.d2H), ("alpha", div.alpha)):
    v = fn(r)
    if not bool(jnp.all(jnp.isfinite(v))):
      i = jnp.argmax(~jnp.isfinite(v))
      raise ValueError(f"divergence {div.name!r}: {label} is not finite at r = {float(r[i]):g}")


def register(name: str, f: Callable[[Array], Array]) -> Divergence:
  """Registers D_f from f alone; H = r^2 f'', H', H'' and alpha come from autodiff.

  Args:
    name: new registry name (ValueError if taken).
    f: scalar-in, scalar-out jax-traceable convex function with f(1) = 0 and f'' > 0 on the safe
      domain [1e-6, 1e6] (ValueError otherwise, e.g. for f = (r - 1)^4, whose H vanishes at 1).

  Returns:
    The registered Divergence.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"divergence name must be a non-empty string, got {name!r}")
  if not callable(f):
    raise ValueError(f"divergence {name!r}: f must be callable, got {type(f).__name__}")
  d2f = jax.grad(jax.grad(f))
  h = lambda r: r * r * d2f(r)
  dh = jax.grad(h)
  d2h = jax.grad(dh)
  H, dH, d2H = _elementwise(h), _elementwise(dh), _elementwise(d2h)
  div = Divergence(name=name, f=_elementwise(f), H=H, dH=dH, d2H=d2H,
                   alpha=jax.jit(lambda r: 0.5 + r * dH(r) / (2.0 * H(r))))
  try:
    _check_safe_domain(div)
  except (TypeError, jax.errors.JAXTypeError) as e:  # f not traceable as a scalar function
    raise ValueError(f"divergence {name!r}: f must map a scalar to a scalar: {e}") from None
  return _add(div)


def get(name_or_div: Union[str, Divergence]) -> Divergence:
  """Returns the Divergence registered under `name_or_div` (a Divergence is passed through)."""
  if isinstance(name_or_div, Divergence):
    return name_or_div
  try:
    return _REGISTRY[name_or_div]
  except (KeyError, TypeError):
    raise ValueError(f"unknown divergence {name_or_div!r}; known: {sorted(_REGISTRY)}") from None


def names() -> list:
  """Names of all registered divergences."""
  return sorted(_REGISTRY)


# reverse KL, KL(p || q): H = 1 -> pure SiD/SIM gradient with alpha = 1/2.
_add(Divergence(
    name="reverse_kl", f=lambda r: -jnp.log(r), H=_const(1.0), dH=_const(0.0),
    d2H=_const(0.0), alpha=_const(0.5)))

# forward KL, KL(q || p): H = r.
_add(Divergence(
    name="forward_kl", f=lambda r: r * jnp.log(r), H=lambda r: r, dH=_const(1.0),
    d2H=_const(0.0), alpha=_const(1.0)))

# Jeffreys, KL(p || q) + KL(q || p): H = 1 + r.
_add(Divergence(
    name="jeffreys", f=lambda r: (r - 1.0) * jnp.log(r), H=lambda r: 1.0 + r, dH=_const(1.0),
    d2H=_const(0.0), alpha=lambda r: 0.5 + 0.5 * r / (1.0 + r)))

# Jensen-Shannon, normalised: f = [r log r - (1+r) log((1+r)/2)] / 2, H = r / (2 (1+r)).
_add(Divergence(
    name="jensen_shannon",
    f=lambda r: 0.5 * (r * jnp.log(r) - (1.0 + r) * (jnp.log1p(r) - jnp.log(2.0))),
    H=lambda r: 0.5 * r / (1.0 + r), dH=lambda r: 0.5 / jnp.square(1.0 + r),
    d2H=lambda r: -1.0 / (1.0 + r) ** 3, alpha=lambda r: 0.5 + 0.5 / (1.0 + r)))

# Pearson chi^2(q || p) = E_p (q/p - 1)^2: H = 2 r^2.
_add(Divergence(
    name="pearson_chi2", f=lambda r: jnp.square(r - 1.0), H=lambda r: 2.0 * r * r,
    dH=lambda r: 4.0 * r, d2H=_const(4.0), alpha=_const(1.5)))

# Neyman chi^2(p || q) = E_q (p/q - 1)^2: H = 2 / r.
_add(Divergence(
    name="neyman_chi2", f=lambda r: jnp.square(1.0 - r) / r, H=lambda r: 2.0 / r,
    dH=lambda r: -2.0 / (r * r), d2H=lambda r: 4.0 / r ** 3, alpha=_const(0.0)))

# squared Hellinger, f = (sqrt r - 1)^2: H = sqrt(r) / 2.
_add(Divergence(
    name="squared_hellinger", f=lambda r: jnp.square(jnp.sqrt(r) - 1.0),
    H=lambda r: 0.5 * jnp.sqrt(r), dH=lambda r: 0.25 / jnp.sqrt(r),
    d2H=lambda r: -0.125 * r ** -1.5, alpha=_const(0.75)))
