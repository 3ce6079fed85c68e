"""The toy run (teacher.source 'toy' or 'image_mixture'): exact-mixture dataset, MLP nets fitted
to the exact teacher (cached on disk when $UNI_INSTRUCT_FIT_CACHE names a directory), and the
acceptance metrics. The mixture math itself is in `toy`, the image-mixture metrics in
`mixture_metrics`."""

import hashlib
import json
import math
import os
import pathlib
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from uni_instruct_jax import image_mixture
from uni_instruct_jax import losses
from uni_instruct_jax import mixture_metrics
from uni_instruct_jax import nets as nets_lib
from uni_instruct_jax import sampling
from uni_instruct_jax import steps
from uni_instruct_jax import toy
from uni_instruct_jax.networks import mlp


class ToyDataset:
  """Endless exact samples of a toy mixture in ONE global stream: global batch i is drawn from
  (seed, i) and process p of P takes its contiguous rows [p B / P, (p + 1) B / P), as data.py does,
  so the global batch (and a resume) does not depend on the process count."""

  def __init__(self, mixture, global_batch: int, seed: int, process_index: int,
               process_count: int, state: Optional[Dict[str, Any]] = None,
               shape: Optional[Tuple[int, ...]] = None):
    if global_batch % process_count:
      raise ValueError(f"global batch {global_batch} does not split over {process_count} "
                       "processes")
    self.mixture = mixture
    self.global_batch = global_batch
    self.local_batch = global_batch // process_count
    self._rows = slice(process_index * self.local_batch, (process_index + 1) * self.local_batch)
    self._key = jax.random.fold_in(jax.random.key(seed), 0)
    self._index = int((state or {}).get("batch_index", 0))
    self._sample = jax.jit(mixture.sample, static_argnums=1)
    self._shape = tuple(shape or (mixture.dim,))
    self.label_dim = 0

  def next(self) -> Dict[str, np.ndarray]:
    """This process's rows {'image': [B / P, *shape], 'label': [B / P, 0]} of the next global
    batch (shape: (dim,), or the image mixture's (R, R, 3) for image networks)."""
    x = self._sample(jax.random.fold_in(self._key, self._index), self.global_batch)
    self._index += 1
    return {"image": np.asarray(x[self._rows]).reshape((self.local_batch,) + self._shape),
            "label": np.zeros((self.local_batch, 0), np.float32)}

  def state(self) -> Dict[str, Any]:
    return {"batch_index": self._index}


def _fit_to_teacher(module, params, teacher_fn: Callable, sample_fn: Callable, key,
                    num_steps: int, batch: int, lr: float):
  """Regresses a denoiser onto the exact teacher (EDM-weighted, log-uniform sigma in [0.002, 80])
  so the toy generator and fake score start from "the teacher network"; sample_fn(key, n) and
  teacher_fn take and return the module's input shape [n, ...]."""
  tx = optax.adam(lr)

  def loss_fn(p, k):
    k_x, k_s, k_n = jax.random.split(k, 3)
    x0 = sample_fn(k_x, batch)
    sigma = jnp.exp(jax.random.uniform(k_s, (batch,), minval=math.log(0.002),
                                       maxval=math.log(80.0)))
    x = x0 + steps.noisy(jax.random.normal(k_n, x0.shape), sigma)
    err = module.apply({"params": p}, x, sigma) - teacher_fn(x, sigma)
    return jnp.mean(losses.edm_weight(sigma) * jnp.sum(jnp.square(err).reshape(batch, -1), -1))

  @jax.jit
  def fit(p, k):
    def body(carry, k_i):
      p, opt = carry
      grads = jax.grad(loss_fn)(p, k_i)
      updates, opt = tx.update(grads, opt, p)
      return (optax.apply_updates(p, updates), opt), None
    (p, _), _ = jax.lax.scan(body, (p, tx.init(p)), jax.random.split(k, num_steps))
    return p

  return fit(params, key)


FIT_CACHE_ENV = "UNI_INSTRUCT_FIT_CACHE"


def _cache_key(kind: str, mixture: toy.GaussianMixture, settings: Dict[str, Any]) -> str:
  """sha256 of (kind, the mixture's means/std/weights, JSON settings, jax version)."""
  h = hashlib.sha256(kind.encode())
  for a in (mixture.means, mixture.weights, np.float64(mixture.std)):
    h.update(np.ascontiguousarray(a, np.float64).tobytes())
  h.update(json.dumps(settings, sort_keys=True, default=str).encode())
  h.update(jax.__version__.encode())
  return h.hexdigest()[:32]


def _cache_dir() -> Optional[pathlib.Path]:
  path = os.environ.get(FIT_CACHE_ENV, "")
  return pathlib.Path(path) if path else None


def cached_on_disk(kind: str, mixture, settings: Dict[str, Any], compute: Callable[[], Any],
                   template: Any = None) -> Any:
  """compute() memoised in $UNI_INSTRUCT_FIT_CACHE/<kind>-<key>.{json,msgpack} (no cache when
  unset): `template` (a pytree of arrays) restores msgpack params; None stores JSON."""
  cache = _cache_dir()
  if cache is None:
    return compute()
  path = cache / f"{kind}-{_cache_key(kind, mixture, settings)}"
  path = path.with_suffix(".json" if template is None else ".msgpack")
  if path.is_file():
    return (json.loads(path.read_text()) if template is None
            else serialization.from_bytes(template, path.read_bytes()))
  value = compute()
  cache.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f".tmp{os.getpid()}")
  if template is None:
    tmp.write_text(json.dumps(value))
  else:
    tmp.write_bytes(serialization.to_bytes(value))
  os.replace(tmp, path)
  return value


def build_mixture(config) -> toy.GaussianMixture:
  """The data law of a toy config: the ring, or the image mixture of config.data
  (image_mixture.ImageMixtureError on bad data settings)."""
  if config.teacher.source == "image_mixture":
    return image_mixture.mixture_from_config(config.data)
  return toy.GaussianMixture.ring(num_modes=config.data.num_modes)


def _mixture_module(config, mixture):
  """(denoiser module, per-sample input shape): the MLP of network.kwargs on flat samples [B, d],
  or, for an image mixture with network.class_name an EDM preconditioner, that image network
  (e.g. a SongUNet, as for CIFAR-10 proper) on NHWC images [B, R, R, 3]."""
  kwargs = config.network.kwargs.to_dict()
  if config.network.class_name == "MLPPrecond":
    return mlp.MLPPrecond(dim=mixture.dim, sigma_data=mixture.data_std, dtype=jnp.float32,
                          **{k: tuple(v) if isinstance(v, (list, tuple)) else v
                             for k, v in kwargs.items()}), (mixture.dim,)
  if not isinstance(mixture, image_mixture.ImageMixture):
    raise ValueError(f"network.class_name {config.network.class_name!r} needs image data "
                     "(teacher.source 'image_mixture'); the 2-D toy takes 'MLPPrecond'")
  from uni_instruct_jax.networks import build_network  # pylint: disable=g-import-not-at-top
  res, channels = mixture.image_shape[0], mixture.image_shape[2]
  if (kwargs.get("img_resolution"), kwargs.get("img_channels")) != (res, channels):
    raise ValueError(f"network.kwargs img_resolution/img_channels must be {res}/{channels} (the "
                     f"image mixture's), got {kwargs.get('img_resolution')}/"
                     f"{kwargs.get('img_channels')}")
  if kwargs.get("label_dim") or kwargs.get("augment_dim"):
    raise ValueError("the image mixture is unconditional without augmentation: set "
                     "network.kwargs.label_dim=0 and augment_dim=0")
  kwargs["sigma_data"] = mixture.data_std
  return build_network(config.network.class_name, kwargs, jnp.float32), mixture.image_shape


def build_toy_nets(config, mixture):
  """(Nets, frozen, init_params(key) -> (generator, fake-score) params) for the toy: exact
  teacher; generator and fake score both start from a denoiser (`_mixture_module`) fitted to it.
  ValueError on a network that does not fit the mixture."""
  module, shape = _mixture_module(config, mixture)

  def as_input(x):  # flat [B, d] -> the module's [B, *shape]
    return x.reshape((x.shape[0],) + shape)

  def teacher_fn(x, sigma):  # exact D(x, sigma) in the module's layout
    return as_input(mixture.denoiser(x.reshape(x.shape[0], -1), sigma))

  nets = nets_lib.Nets(gen=module, fake=module,
                       teacher=lambda _, x, s, labels: teacher_fn(x, s),
                       data_shape=shape, label_dim=0)

  def fit(key):
    k_init, k_fit = jax.random.split(key)
    params = module.init(k_init, jnp.zeros((1,) + shape), jnp.ones((1,)))["params"]
    return _fit_to_teacher(module, params, teacher_fn, lambda k, n: as_input(mixture.sample(k, n)),
                           k_fit, num_steps=config.teacher.fit_steps,
                           batch=config.teacher.fit_batch, lr=config.teacher.fit_lr)

  def init_params(key):
    if isinstance(key, jax.core.Tracer):  # jax.eval_shape: shapes only
      fitted = fit(key)
    else:  # a pure function of (key, network, fit settings, mixture): cached on disk
      settings = {"key": np.asarray(jax.random.key_data(key)).tolist(),
                  "network": config.network.kwargs.to_dict(),
                  "fit": [config.teacher.fit_steps, config.teacher.fit_batch,
                          config.teacher.fit_lr]}
      if config.network.class_name != "MLPPrecond":  # keeps the MLP's existing cache keys
        settings["class_name"] = config.network.class_name
      fitted = cached_on_disk("teacher_fit", mixture, settings, lambda: fit(key),
                              template=jax.eval_shape(fit, key))
      fitted = jax.tree.map(jnp.asarray, fitted)
    return fitted, fitted
  return nets, {"teacher": {}, "buffers": {}}, init_params


def mixture_baselines(mixture: toy.GaussianMixture, num: int, seed: int) -> Dict[str, Any]:
  """{'floor': floor_row, 'teacher': teacher_rows (35, 3 and 1 NFE)} of the mixture at (num,
  seed): computed once per mixture (cached on disk like the teacher fit)."""
  settings = {"num": num, "seed": seed, "heun_steps": mixture_metrics.TEACHER_HEUN_STEPS}
  return cached_on_disk("baselines", mixture, settings, lambda: {
      "floor": mixture_metrics.floor_row(mixture, num, seed),
      "teacher": mixture_metrics.teacher_rows(mixture, num, seed)})


IMAGE_METRICS_SEED = 10_001
IMAGE_METRICS_NUM = 10_000


def image_mixture_metrics(mixture: image_mixture.ImageMixture,
                          sample_student: Callable[[int, int], np.ndarray],
                          num: int = IMAGE_METRICS_NUM) -> Dict[str, Any]:
  """summary.json keys of an image-mixture run (each a mixture_metrics.sample_metrics dict of
  num samples vs num exact reference samples):
    'student': the EMA student (one step); 'floor': exact vs exact samples (+ tv_floor_formula);
    'teacher': the exact teacher's Heun 35 / 3 NFE and Euler 1 NFE rows (source, nfe);
    'metric_name' 'pixel_fd', 'student_metric' / 'teacher_metric' (35 NFE) its values."""
  reference = mixture_metrics.reference_samples(mixture, num, IMAGE_METRICS_SEED)
  student = mixture_metrics.sample_metrics(sample_student(num, IMAGE_METRICS_SEED + 1), mixture,
                                           reference)
  base = mixture_baselines(mixture, num, IMAGE_METRICS_SEED)
  return {"metric_name": "pixel_fd", "student_metric": student["pixel_fd"],
          "teacher_metric": base["teacher"][0]["pixel_fd"], "teacher_nfe": base["teacher"][0]["nfe"],
          "student_modes_covered": student["modes_covered"], "num_modes": mixture.num_modes,
          "student": student, **base}


def toy_metrics(mixture: toy.GaussianMixture, sample_student: Callable[[int, int], np.ndarray],
                num: int = 20_000) -> Dict[str, Any]:
  """The embedded default's acceptance numbers (sliced W2 over 256 fixed directions);
  sample_student(num, seed) -> [num, dim] samples of the EMA generator. Image mixtures:
  `image_mixture_metrics`."""
  if isinstance(mixture, image_mixture.ImageMixture):
    return image_mixture_metrics(mixture, sample_student)
  data = np.asarray(mixture.sample(jax.random.key(10_001), num))
  student = sample_student(num, 10_002)
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
