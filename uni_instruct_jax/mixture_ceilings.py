"""What an image-mixture run's networks can reach whatever the distillation loss (issue 11's why).

Two reference rows for a toy / image-mixture config, each a `mixture_metrics.sample_metrics` dict:

* 'fitted_sampler': the denoiser fitted to the exact teacher (where the generator AND the fake
  score of every row start, toy_run.build_toy_nets) used as a 35-NFE Heun sampler, from the same
  latents as the exact teacher's 35-NFE row. It measures how well the fake score's architecture
  and fit represent the data law before any distillation: a fake score that cannot represent the
  data law cannot tell the generator where the data is.
* 'ode_regression': the generator with the rows' architecture and start, G(z) = D(sigma_init z,
  sigma_init), trained with the rows' generator step count, batch and Adam settings by direct
  regression on the exact teacher's deterministic map z -> Heun-35(80 z) (mean over the batch of
  ||G(z) - x||^2, fresh pairs every step). A supervised one-step generator with the rows' budget:
  how sharp a one-step map of this architecture gets in that many steps when it is told the answer.
  'ode_regression_long' is the same with LONG_FACTOR times the steps.

`ceilings(config)` computes both for a config (seed config.seed's fit) and caches them on disk
beside the teacher fit ($UNI_INSTRUCT_FIT_CACHE). Cost on 2 CPU cores for configs/cifar10_mixture.py:
~8 min (each regression step runs a 35-NFE exact-teacher chain on its batch).
"""

import json
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax

from uni_instruct_jax import mixture_metrics
from uni_instruct_jax import nets as nets_lib
from uni_instruct_jax import sampling
from uni_instruct_jax import toy
from uni_instruct_jax import toy_run

TEACHER_STEPS = 18  # Heun steps of the teacher map and of the fitted sampler (35 NFE).
LONG_FACTOR = 4     # 'ode_regression_long' trains this many times the rows' steps.


def fitted_sampler_row(denoise: Callable, mixture: toy.GaussianMixture, num: int,
                       seed: int) -> Dict[str, Any]:
  """35-NFE Heun row of denoise(x [b, d], sigma [b], None) -> [b, d] (metric seed `seed`)."""
  return mixture_metrics.heun_row(denoise, mixture, num, seed, TEACHER_STEPS, "fitted_heun")


def ode_regression(generate: Callable, params: Any, mixture: toy.GaussianMixture,
                   tx: optax.GradientTransformation, num_steps: int, batch: int,
                   key: jax.Array) -> Any:
  """Params after `num_steps` Adam steps of min E||generate(params, z) - ode(z)||^2 over fresh
  z [batch, d] ~ N(0, I); ode(z) = the exact teacher's Heun-35 sample from 80 z. generate(params,
  z [b, d]) -> [b, d]. One jitted scan."""
  def teacher_map(z):
    return sampling.heun_sampler(lambda x, s, _: mixture.denoiser(x, s), z,
                                 num_steps=TEACHER_STEPS)

  def loss_fn(p, z, target):
    return jnp.mean(jnp.sum(jnp.square(generate(p, z) - target), axis=-1))

  @jax.jit
  def run(p, key):
    def body(carry, k):
      p, opt = carry
      z = jax.random.normal(k, (batch, mixture.dim), jnp.float32)
      grads = jax.grad(loss_fn)(p, z, teacher_map(z))
      updates, opt = tx.update(grads, opt, p)
      return (optax.apply_updates(p, updates), opt), None
    (p, _), _ = jax.lax.scan(body, (p, tx.init(p)), jax.random.split(key, num_steps))
    return p

  return run(params, key)


def ceilings(config, num: int = toy_run.IMAGE_METRICS_NUM,
             seed: int = toy_run.IMAGE_METRICS_SEED) -> Dict[str, Dict[str, Any]]:
  """{'fitted_sampler', 'ode_regression', 'ode_regression_long'} metric rows (module docstring) of
  a toy / image-mixture config whose generator is its fitted denoiser (generator.network ''): the
  fit of config.seed, the rows' step count (training.total_kimg / batch; LONG_FACTOR times that
  for 'ode_regression_long': is it the budget or the architecture?), batch, generator lr and Adam
  betas / eps.
  Cached on disk with the teacher fit; each row also records the settings it ran with."""
  if config.generator.network:
    raise ValueError("ceilings are defined for the fitted-denoiser generator (generator.network "
                     f"''), got {config.generator.network!r}")
  mixture = toy_run.build_mixture(config)
  nets, frozen, init_params = toy_run.build_toy_nets(config, mixture)
  batch = config.training.batch_size
  steps = int(round(config.training.total_kimg * 1000 / batch))
  o = config.optim
  settings = {"network": config.network.to_dict(), "seed": config.seed,
              "fit": [config.teacher.fit_steps, config.teacher.fit_batch, config.teacher.fit_lr],
              "steps": steps, "batch": batch, "sigma_init": config.training.sigma_init,
              "adam": [o.gen_lr, o.b1, o.b2, o.eps], "num": num, "metric_seed": seed}
  settings = json.loads(json.dumps(settings))  # as stored (tuples -> lists): fresh == cached
  flat = lambda x: x.reshape(x.shape[0], -1)
  unflat = lambda x: x.reshape((x.shape[0],) + nets.data_shape)

  def compute():
    gen_params, fake_params = init_params(jax.random.key(config.seed))
    buffers = frozen["buffers"]

    def denoise(x, sigma, _):
      return flat(nets_lib.apply(nets.fake, fake_params, buffers, unflat(x), sigma, None,
                                 train=False, key=None))

    def generate(p, z):
      return flat(nets_lib.generate(nets, p, buffers, unflat(z), None,
                                    config.training.sigma_init))

    z = jax.random.normal(jax.random.key(seed + 1), (num, mixture.dim), jnp.float32)
    reference = mixture_metrics.reference_samples(mixture, num, seed)
    sample = jax.jit(generate)  # one compilation for every chunk of both regressions

    def regression_row(num_steps):
      tx = optax.adam(o.gen_lr, b1=o.b1, b2=o.b2, eps=o.eps)
      trained = ode_regression(generate, gen_params, mixture, tx, num_steps, batch,
                               jax.random.fold_in(jax.random.key(config.seed), 1))
      samples = np.concatenate([np.asarray(sample(trained, c))
                                for c in np.array_split(np.asarray(z), max(1, num // 2048))])
      return {"source": "ode_regression", "nfe": 1, "steps": num_steps,
              **mixture_metrics.sample_metrics(samples, mixture, reference), "settings": settings}

    return {"fitted_sampler": {**fitted_sampler_row(denoise, mixture, num, seed),
                               "settings": settings},
            "ode_regression": regression_row(steps),
            "ode_regression_long": regression_row(LONG_FACTOR * steps)}

  return toy_run.cached_on_disk("ceilings", mixture, settings, compute)
