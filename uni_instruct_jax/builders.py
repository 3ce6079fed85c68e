"""Run setup: `setup(config, workdir)` validates every input (config, workdir, data, teacher,
checkpoint) and builds the networks, the state and the per-phase jitted steps. It raises
`SetupError` before any compute, so bad input never touches what is already in the workdir."""

import dataclasses
import functools
import json
import math
import pathlib
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from uni_instruct_jax import augment as augment_lib
from uni_instruct_jax import config_schema
from uni_instruct_jax import divergences
from uni_instruct_jax import nets as nets_lib
from uni_instruct_jax import parallel
from uni_instruct_jax import steps
from uni_instruct_jax import train_state as ts

# Config keys a resumed run may change (run length, logging, evaluation); anything else differing
# from the workdir's saved config.json makes setup refuse to resume.
RESUMABLE_CHANGES = ("training.total_kimg", "training.tick_kimg", "training.snapshot_ticks",
                     "ckpt.", "eval.", "sample.")


class SetupError(ValueError):
  """Bad input detected before any compute (config, paths, teacher/data mismatch, checkpoint)."""


# --------------------------------------------------------------------------------------------
# Config pieces


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


def step_config(config: ml_collections.ConfigDict) -> steps.StepConfig:
  """The static StepConfig of a run config (SetupError on a bad batch split or schedule)."""
  batch = config.training.batch_size
  micro = config.training.micro_batch_size or batch
  if batch <= 0 or batch % micro:
    raise SetupError(f"training.batch_size {batch} must be a positive multiple of "
                     f"training.micro_batch_size {micro}")
  return steps.StepConfig(
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


def _steps(config) -> Tuple[int, int]:
  batch = config.training.batch_size
  total = max(1, int(math.ceil(config.training.total_kimg * 1000 / batch)))
  tick = max(1, int(math.ceil(config.training.tick_kimg * 1000 / batch)))
  return total, tick


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


# --------------------------------------------------------------------------------------------
# Networks and detector


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

  nets = nets_lib.Nets(gen=module, fake=module, teacher=teacher, data_shape=data_shape,
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


def load_detector(config, mesh):
  """The configured feature network (eval.detector 'inception' | 'proxy'), or SetupError."""
  from uni_instruct_jax.evaluation import evaluate as ev  # pylint: disable=g-import-not-at-top
  kind = config.eval.detector or "inception"
  try:
    return ev.load_detector(kind, config.eval.detector_path or None,
                            config.eval.resize_mode if kind == "inception" else None, mesh=mesh)
  except (ValueError, OSError) as e:
    raise SetupError(f"config.eval.detector {kind!r}: {e}") from e


# --------------------------------------------------------------------------------------------
# The run


class PhaseSteps:
  """`(state, batch, frozen, images_seen) -> (state, metrics)`: the train_step of the phase at
  the host int `images_seen` (steps.phase_at; no device sync), one jax.jit per phase (state
  donated), made on first use and cached."""

  def __init__(self, jit_phase: Callable[[int], Callable], cfg: steps.StepConfig):
    self._jit_phase = jit_phase
    self._cfg = cfg
    self._jitted: Dict[int, Callable] = {}

  def __call__(self, state, batch, frozen, images_seen: int):
    phase = steps.phase_at(images_seen, self._cfg)
    if phase not in self._jitted:
      self._jitted[phase] = self._jit_phase(phase)
    return self._jitted[phase](state, batch, frozen)

  def compilations(self) -> int:
    """Step programs compiled so far (the sizes of the per-phase jit caches)."""
    return sum(fn._cache_size() for fn in self._jitted.values())  # pylint: disable=protected-access


@dataclasses.dataclass
class Run:
  """Everything `setup` validated and built."""
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  mesh: Any
  nets: nets_lib.Nets
  dataset: Any
  frozen: Dict[str, Any]
  state: ts.TrainState
  state_shardings: Any
  step_fn: PhaseSteps
  checkpointer: ts.Checkpointer
  meta: Dict[str, Any]          # restored checkpoint metadata ({} for a fresh run).
  total_steps: int
  tick_steps: int
  mixture: Any                  # toy.GaussianMixture (or its ImageMixture) or None.
  detector: Any = None          # FID detector when eval.every_ticks > 0.
  jit_cache: Dict[str, Callable] = dataclasses.field(default_factory=dict)  # see evaluation.run.


def setup(config: ml_collections.ConfigDict, workdir: str, write_config: bool = True) -> Run:
  """Validates inputs and builds the run; raises SetupError on bad input (nothing written yet
  except the workdir directory itself and, for a fresh run, config.json)."""
  config_schema.validate(config)  # ConfigError: one line naming the key and its valid values
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
  if config.teacher.source in ("toy", "image_mixture"):
    from uni_instruct_jax import image_mixture, toy_run  # pylint: disable=g-import-not-at-top
    try:
      mixture = toy_run.build_mixture(config)
    except image_mixture.ImageMixtureError as e:
      raise SetupError(f"config.data: {e}") from e
    nets, frozen, init_params = toy_run.build_toy_nets(config, mixture)
    dataset_factory = lambda state: toy_run.ToyDataset(mixture, local_batch, config.seed,
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
    train_step = steps.make_step_fns(nets, step_cfg, gen_tx, fake_tx, augment_pipe).train_step
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

  def jit_phase(phase):
    return jax.jit(functools.partial(train_step, phase=phase),
                   in_shardings=(state_shardings, batch_shardings, frozen_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))

  detector = None
  if config.eval.every_ticks:
    if not config.eval.ref or not pathlib.Path(config.eval.ref).is_file():
      raise SetupError(f"config.eval.every_ticks needs config.eval.ref; {config.eval.ref!r} is "
                       "not a file")
    detector = load_detector(config, mesh)

  # Validation done: persist the resolved config, then build the initial state (compute).
  workdir.mkdir(parents=True, exist_ok=True)
  config_json = config.to_json_best_effort(indent=2, sort_keys=True)
  config_path = workdir / "config.json"
  if write_config and (not config_path.exists() or config_path.read_text() != config_json):
    config_path.write_text(config_json)
  if checkpointer is None:
    checkpointer = ts.Checkpointer(workdir, config.ckpt.keep)
  if state is None:  # the toy's teacher fit runs here, only for a fresh run
    state = jax.jit(fresh_state, out_shardings=state_shardings)(init_params(init_key))
  frozen = jax.device_put(frozen, frozen_shardings)
  total_steps, tick_steps = _steps(config)
  return Run(config=config, workdir=workdir, mesh=mesh, nets=nets, dataset=dataset,
             frozen=frozen, state=state, state_shardings=state_shardings,
             step_fn=PhaseSteps(jit_phase, step_cfg), checkpointer=checkpointer, meta=meta,
             total_steps=total_steps, tick_steps=tick_steps, mixture=mixture, detector=detector)
