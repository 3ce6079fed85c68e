"""Run setup: `setup(config, workdir)` validates every input (config, workdir, data, teacher,
checkpoint) and builds the networks, the state and the jitted step programs. It raises
`SetupError` before any compute, so bad input never touches what is already in the workdir."""

import dataclasses
import functools
import json
import math
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from uni_instruct_jax import augment as augment_lib
from uni_instruct_jax import config_schema
from uni_instruct_jax import divergences
from uni_instruct_jax import losses
from uni_instruct_jax import nets as nets_lib
from uni_instruct_jax import parallel
from uni_instruct_jax import paths
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
      ema_rampup=config.ema.rampup_ratio if config.ema.rampup_ratio else None,
      disc_sigma_law=config.loss.disc_sigma_law,
      fake_updates_per_gen=losses.method_settings(config.loss.method)["fake_updates_per_gen"])


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


def _check_saved_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Refuses to resume a workdir whose saved config differs beyond RESUMABLE_CHANGES."""
  path = workdir / "config.json"
  if not path.exists():
    return
  try:
    saved = _flatten_config(json.loads(paths.read_text(path)))
  except (ValueError, OSError) as e:
    raise SetupError(f"{path} is not readable JSON ({e}); move it away to start afresh") from e
  current = _flatten_config(json.loads(config.to_json_best_effort()))
  # A field added by a newer version of the code, at its schema default, does not change the run.
  schema, _ = config_schema.load_schema()
  added_at_default = {k for k in set(current) - set(saved) if k in schema
                      and schema[k].has_default
                      and current[k] == json.loads(json.dumps(schema[k].default))}
  differing = sorted(k for k in (set(saved) | set(current)) - added_at_default
                     if saved.get(k) != current.get(k))
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
  elif not path or not paths.workdir_path(path).exists():
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
  if config.network.remat:
    module = module.clone(remat=config.network.remat)
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
  elif config.generator.init not in ("teacher", "scratch", "checkpoint"):
    raise SetupError(f"config.generator.init must be teacher|sid|scratch|checkpoint, got "
                     f"{config.generator.init!r}")

  def init_params(key):
    del key
    return gen_params, variables["params"]  # the fake score always starts from the teacher

  return nets, {"teacher": teacher_vars, "buffers": buffers}, init_params


def _check_generator(config) -> None:
  """SetupError unless generator.network / generator.init / loss.method agree: a registered
  network starts from scratch or from its own checkpoint (generator.init_path), the teacher's
  architecture from the teacher or a SiD generator, and sid2a needs init 'sid'."""
  network, init = config.generator.network, config.generator.init
  if network and init not in ("scratch", "checkpoint"):
    raise SetupError(f"config.generator.network {network!r} is trained from scratch or from its "
                     f"own checkpoint: set config.generator.init='scratch' or 'checkpoint' (got "
                     f"{init!r})")
  if not network and init in ("scratch", "checkpoint"):
    raise SetupError(f"config.generator.init={init!r} needs config.generator.network")
  if init == "checkpoint" and not config.generator.init_path:
    raise SetupError("config.generator.init='checkpoint' needs config.generator.init_path (a "
                     "training workdir or a flax msgpack file of the generator's params)")
  if losses.method_settings(config.loss.method)["generator_init"] == "sid" and init != "sid":
    raise SetupError(f"config.loss.method {config.loss.method!r} starts from a SiD-distilled "
                     f"generator: set config.generator.init='sid' and generator.sid_path")


def _read_generator_params(path: str) -> Any:
  """The params tree at config.generator.init_path: a local training workdir's latest EMA
  generator (export.restore_params), or a flax msgpack file (`flax.serialization.to_bytes` of the
  params, or of {'params': params}). Never unpickles; SetupError (one line) when unreadable."""
  where = f"config.generator.init_path {path!r}"
  target = paths.workdir_path(path)
  if not target.exists():
    raise SetupError(f"{where} does not exist")
  if target.is_dir():
    from uni_instruct_jax import export  # pylint: disable=g-import-not-at-top
    try:
      return export.restore_params(path)[1]["ema_params"]
    except export.ExportError as e:
      raise SetupError(f"{where}: {e}") from None
  from flax import serialization  # pylint: disable=g-import-not-at-top
  try:
    tree = serialization.msgpack_restore(target.read_bytes())
  except Exception as e:  # pylint: disable=broad-except  (msgpack raises many types on bad bytes)
    raise SetupError(f"{where}: not a flax msgpack file ({type(e).__name__})") from None
  return tree["params"] if isinstance(tree, dict) and set(tree) == {"params"} else tree


def with_generator_network(config, nets: nets_lib.Nets, init_params: Callable):
  """(nets, init_params) with the generator replaced by config.generator.network, starting from
  scratch or from the checked params at generator.init_path (the fake score keeps the teacher's
  architecture); unchanged when it is ''."""
  if not config.generator.network:
    return nets, init_params
  from uni_instruct_jax.networks import generators  # pylint: disable=g-import-not-at-top
  try:
    module = generators.build_generator(config.generator.network, nets.data_shape)
  except ValueError as e:
    raise SetupError(f"config.generator.network: {e}") from e
  saved = None
  if config.generator.init == "checkpoint":
    path = config.generator.init_path
    params = _read_generator_params(path)
    try:
      saved = generators.check_params(module, nets.label_dim, params)
    except ValueError as e:
      raise SetupError(f"config.generator.init_path {path!r} is not a {config.generator.network!r} "
                       f"generator for {list(nets.data_shape)} samples: {e}") from None

  def init(key):
    _, fake = init_params(key)
    if saved is not None:
      return saved, fake
    return generators.init_generator(module, jax.random.fold_in(key, 1), nets.label_dim), fake

  return dataclasses.replace(nets, gen=module, gen_is_denoiser=False), init


class LabelDataset:
  """The batches of a data-free run: {'label': uniform one-hot [B / P, label_dim]} (the fake-score
  step's labels; [B / P, 0] when unconditional). One global stream, as data.py: global batch i is
  drawn from (seed, i) and process p of P takes its contiguous rows, so the batches (and a resume)
  do not depend on the process count."""

  def __init__(self, label_dim: int, global_batch: int, seed: int, process_index: int,
               process_count: int, state: Dict[str, Any] = None):
    self.label_dim = label_dim
    self.local_batch = global_batch // process_count
    self._global_batch = global_batch
    self._rows = slice(process_index * self.local_batch, (process_index + 1) * self.local_batch)
    self._seed = seed
    self._index = int((state or {}).get("batch_index", 0))

  def next(self) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng((self._seed, self._index))
    self._index += 1
    if not self.label_dim:
      return {"label": np.zeros((self.local_batch, 0), np.float32)}
    classes = rng.integers(0, self.label_dim, self._global_batch)[self._rows]
    return {"label": np.eye(self.label_dim, dtype=np.float32)[classes]}

  def state(self) -> Dict[str, Any]:
    return {"batch_index": self._index}


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
  """The jitted step programs (state donated), each made and compiled on first use and cached:

    fake_step(state, batch, frozen) -> (state, metrics): the fake-score + discriminator update,
      one program for the whole run;
    gen_step(phase)(state, batch, frozen) -> (state, metrics): the generator update of `phase`
      (none in the warm-up), the EMA and the step advance, one program per phase;
    __call__(state, batch, frozen, images_seen): one iteration, both, in the phase at the host int
      `images_seen` (steps.phase_at; no device sync).
  """

  def __init__(self, fns: steps.StepFns, jit: Callable[[Callable], Callable],
               cfg: steps.StepConfig):
    self._fns = fns
    self._jit = jit
    self.cfg = cfg  # the StepConfig: phase_at(images_seen, cfg) picks the program
    self.fake_step = jit(fns.fake_score_update)
    self._gen: Dict[int, Callable] = {}

  def gen_step(self, phase: int) -> Callable:
    if phase not in self._gen:
      self._gen[phase] = self._jit(functools.partial(self._fns.generator_update, phase=phase))
    return self._gen[phase]

  def __call__(self, state, batch, frozen, images_seen: int):
    state, fake_metrics = self.fake_step(state, batch, frozen)
    state, gen_metrics = self.gen_step(steps.phase_at(images_seen, self.cfg))(state, batch, frozen)
    return state, steps.merge_metrics(fake_metrics, gen_metrics)

  def compilations(self) -> int:
    """Distinct step programs compiled so far (the sizes of the jit caches)."""
    jitted = [self.fake_step, *self._gen.values()]
    return sum(fn._cache_size() for fn in jitted)  # pylint: disable=protected-access


@dataclasses.dataclass
class Run:
  """Everything `setup` validated and built."""
  config: ml_collections.ConfigDict
  workdir: epath.Path
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

  @property
  def fake_step_fn(self) -> Callable:
    """(state, batch, frozen) -> (state, metrics): one fake-score + discriminator update."""
    return self.step_fn.fake_step

  def gen_step_fn(self, phase: int) -> Callable:
    """(state, batch, frozen) -> (state, metrics): the generator update of `phase`, EMA, advance."""
    return self.step_fn.gen_step(phase)


def setup(config: ml_collections.ConfigDict, workdir: str, write_config: bool = True) -> Run:
  """Validates inputs and builds the run; raises SetupError on bad input (nothing written yet
  except the workdir directory itself and, for a fresh run, config.json)."""
  config_schema.validate(config)  # ConfigError: one line naming the key and its valid values
  workdir = paths.workdir_path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise SetupError(f"--workdir {workdir} exists and is not a directory")
  step_cfg = step_config(config)  # validates the batch split and the divergence schedule
  batch = config.training.batch_size
  micro = config.training.micro_batch_size or batch
  try:
    mesh = parallel.make_mesh(config.mesh.model_parallelism)
    parallel.local_batch_size(batch, mesh)  # checks the split
    if micro % parallel.data_size(mesh):
      raise ValueError(f"micro-batch {micro} is not divisible by the "
                       f"{parallel.data_size(mesh)} devices of the 'data' axis")
  except ValueError as e:
    raise SetupError(str(e)) from e
  _check_saved_config(config, workdir)

  checkpointer = None
  if (workdir / "checkpoints").exists():
    checkpointer = ts.Checkpointer(workdir, config.ckpt.keep, read_only=not write_config)

  _check_generator(config)
  try:
    reads_data = any(losses.reads_discriminator(o) for o in steps.phase_options(step_cfg))
  except (ValueError, KeyError) as e:
    raise SetupError(f"config.loss: {e}") from e
  mixture = None
  if config.teacher.source in ("toy", "image_mixture"):
    from uni_instruct_jax import image_mixture, toy_run  # pylint: disable=g-import-not-at-top
    try:
      mixture = toy_run.build_mixture(config)
    except image_mixture.ImageMixtureError as e:
      raise SetupError(f"config.data: {e}") from e
    try:
      nets, frozen, init_params = toy_run.build_toy_nets(config, mixture)
    except ValueError as e:
      raise SetupError(f"config.network: {e}") from e
    dataset_factory = lambda state: toy_run.ToyDataset(mixture, batch, config.seed,
                                                       jax.process_index(), jax.process_count(),
                                                       state, shape=nets.data_shape)
  elif not reads_data:
    if jax.process_index() == 0:
      print("data-free run: no phase reads real data (no discriminator), config.data is not read; "
            "labels are uniform classes", flush=True)
    nets, frozen, init_params = build_image_nets(config, None)
    dataset_factory = lambda state: LabelDataset(nets.label_dim, batch, config.seed,
                                                 jax.process_index(), jax.process_count(), state)
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
  nets, init_params = with_generator_network(config, nets, init_params)

  gen_tx, fake_tx = make_optimizers(config)
  augment_pipe = make_augment_pipe(config)
  try:
    step_fns = steps.make_step_fns(nets, step_cfg, gen_tx, fake_tx, augment_pipe)
  except (ValueError, KeyError) as e:
    raise SetupError(f"config.loss: {e}") from e

  def fresh_state(params):
    return ts.create_state(*params, gen_tx, fake_tx, config.seed)

  init_key = jax.random.key(config.seed)
  abstract = jax.eval_shape(fresh_state, jax.eval_shape(init_params, init_key))
  state_shardings = parallel.param_shardings(mesh, abstract)
  state, meta = None, {}
  if checkpointer is not None:  # the newest intact checkpoint; damaged newer ones set aside
    try:
      restored = checkpointer.restore_latest_intact(ts.abstract_like(abstract, state_shardings),
                                                    move_damaged=write_config)
    except ts.CheckpointError as e:
      raise SetupError(str(e)) from e
    if restored is not None:
      state, meta, _ = restored
  dataset = dataset_factory(meta.get("data"))

  replicated = parallel.replicated(mesh)
  batch_shardings = parallel.data_sharding(mesh)
  frozen_shardings = jax.tree.map(lambda _: replicated, frozen)

  def jit_step(fn):
    return jax.jit(fn, in_shardings=(state_shardings, batch_shardings, frozen_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))

  detector = None
  if config.eval.every_ticks:
    if not config.eval.ref or not paths.workdir_path(config.eval.ref).is_file():
      raise SetupError(f"config.eval.every_ticks needs config.eval.ref; {config.eval.ref!r} is "
                       "not a file")
    detector = load_detector(config, mesh)

  # Validation done: persist the resolved config, then build the initial state (compute).
  config_json = config.to_json_best_effort(indent=2, sort_keys=True)
  config_path = workdir / "config.json"
  if jax.process_index() == 0:
    paths.makedirs(workdir)
    if write_config and (not config_path.exists() or paths.read_text(config_path) != config_json):
      paths.write_text(config_path, config_json)
  if checkpointer is None:
    checkpointer = ts.Checkpointer(workdir, config.ckpt.keep)
  if state is None:  # the toy's teacher fit runs here, only for a fresh run
    state = jax.jit(fresh_state, out_shardings=state_shardings)(init_params(init_key))
  frozen = jax.device_put(frozen, frozen_shardings)
  total_steps, tick_steps = _steps(config)
  return Run(config=config, workdir=workdir, mesh=mesh, nets=nets, dataset=dataset,
             frozen=frozen, state=state, state_shardings=state_shardings,
             step_fn=PhaseSteps(step_fns, jit_step, step_cfg), checkpointer=checkpointer, meta=meta,
             total_steps=total_steps, tick_steps=tick_steps, mixture=mixture, detector=detector)
