"""The distillation loop: `train_and_evaluate(config, workdir)`.

Reading order for a newcomer:
  1. `builders.setup(config, workdir)` validates every input and builds the networks, the state
     and the jitted step programs (raising `SetupError` before any compute).
  2. `steps.py` holds one iteration: a fake-score + discriminator update (one program), then a
     generator update with the loss of the current phase (none during warm-up) and the generator
     EMA (one program per phase).
  3. `train_and_evaluate` (here) runs the loop: it picks each step's phase on the host from the
     images seen, and per tick writes the status line, metrics.jsonl and TensorBoard, snapshots
     (EMA sample grids), checkpoints (orbax, resumable bitwise) and finally summary.json, whose
     contents it also prints.

sec/kimg (and the ETA) leaves out the first step of each phase, which compiles that phase's
program; a 'compiling' line is printed before it. TensorBoard steps are kimg (integers, as EDM's).
Ctrl-C raises `Interrupted`, whose message names the last checkpoint (main.py prints it).
"""

import contextlib
import json
import resource
import signal
import threading
import time
from typing import Any, Dict, Optional

import jax
import ml_collections
import numpy as np

from uni_instruct_jax import builders
from uni_instruct_jax import metrics_log
from uni_instruct_jax import parallel
from uni_instruct_jax import paths
from uni_instruct_jax import progress
from uni_instruct_jax import steps as steps_lib
from uni_instruct_jax import train_state as ts
from uni_instruct_jax import workdir_lock
from uni_instruct_jax.builders import SetupError
from uni_instruct_jax.evaluation import run as eval_run


class Interrupted(KeyboardInterrupt):
  """Ctrl-C during training; the message says where the last checkpoint is."""


def _memory_gb() -> float:
  """Peak host RSS in GiB (Linux reports KiB), plus device peak bytes where the backend has them."""
  host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  stats = jax.local_devices()[0].memory_stats() or {}
  return host + stats.get("peak_bytes_in_use", 0) / 2**30


def _status_line(record: Dict[str, Any], total_kimg: float,
                 sec_per_kimg: Optional[float]) -> str:
  """One tick's line; the ETA uses `sec_per_kimg`, the last rate measured without compilation
  (None: not measured yet)."""
  frac = min(record["kimg"] / total_kimg, 1.0)
  bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
  eta = ("after compiling" if sec_per_kimg is None else
         progress.format_duration(sec_per_kimg * max(total_kimg - record["kimg"], 0.0)))
  parts = [f"[{bar}] {100 * frac:5.1f}%", f"kimg {record['kimg']:.1f}",
           f"sec/kimg {record['sec_per_kimg']:.2f}", f"ETA {eta}"]
  if record["compile_s"]:
    parts.append(f"compile {record['compile_s']:.1f} s")
  for key in ("loss_fake", "loss_disc", "loss_gen", "r_mean", "r_min", "r_max"):
    if key in record:
      parts.append(f"{key} {record[key]:.4g}")
  parts.append(f"nan {int(record['nan_samples'] + record['nan_grads'])}")
  parts.append(f"mem {record['memory_gb']:.2f}GB")
  return " | ".join(parts)


def _toy_metrics(run: builders.Run) -> Dict[str, Any]:
  from uni_instruct_jax import toy_run  # pylint: disable=g-import-not-at-top
  return toy_run.toy_metrics(  # flat samples [num, d], whatever the networks' layout
      run.mixture, lambda num, seed: eval_run.sample_ema(run, num, seed).reshape(num, -1))


def _checkpoint_meta(run: builders.Run, step: int, extra: Dict[str, Any]) -> Dict[str, Any]:
  return {"step": step, "images_seen": step * run.config.training.batch_size,
          "data": run.dataset.state(), **extra}


@contextlib.contextmanager
def _deferred_interrupt():
  """Defers Ctrl-C (SIGINT) to the end of the block, so that a checkpoint save completes."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  received = []
  previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
  if received:
    raise KeyboardInterrupt


def _interrupted_message(run: builders.Run) -> str:
  last = run.checkpointer.latest_step()
  if last is None:
    return "no checkpoint was written yet; rerunning the same command starts afresh"
  kimg = last * run.config.training.batch_size / 1000
  return (f"the last checkpoint is {run.workdir / 'checkpoints' / str(last)} (step {last}, kimg "
          f"{kimg:g}); rerun the same command to resume from it")


def _summary_text(summary: Dict[str, Any], last: Dict[str, Any], workdir) -> str:
  """The end-of-run report: summary.json's values, the last tick's means, and where files are."""
  lines = [f"finished {summary['steps']} steps ({summary['kimg']:g} kimg) in {workdir}"]
  lines += [f"  {k}: {v}" for k, v in sorted(summary.items()) if k not in ("steps", "kimg")]
  means = [f"{k} {v:.4g}" for k, v in sorted(last.items())
           if k.startswith(("loss_", "r_")) and isinstance(v, float)]
  if means:
    lines.append(f"  last tick: {', '.join(means)}")
  lines.append(f"  files in {workdir}: summary.json, metrics.jsonl, tensorboard/, checkpoints/, "
               "fakes_*.png" + (", scatter.png" if "init_metric" in summary else ""))
  return "\n".join(lines)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Runs (or resumes) a distillation run in `workdir`; returns the summary dict.

  Raises SetupError on bad input before any compute, when another run holds the workdir
  (workdir_lock), and on a failed write (disk full, read-only; the checkpoints written before
  stay intact); Interrupted on Ctrl-C. Rerunning a finished run changes nothing.
  """
  path = paths.workdir_path(workdir)
  created = not path.exists()
  lock = None
  try:
    if jax.process_index() == 0 and (created or path.is_dir()):
      paths.makedirs(path)
      lock = workdir_lock.WorkdirLock(path).acquire()
    return _setup_and_train(config, workdir)
  except (OSError, ts.CheckpointError) as e:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise SetupError(f"{text} (workdir {workdir}; the checkpoints written before are "
                     "intact)") from e
  finally:
    if lock is not None:
      lock.release()
    if created and path.is_dir() and not any(path.iterdir()):  # failed before writing anything
      path.rmdir()


def _setup_and_train(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """train_and_evaluate without the lock and the error translation."""
  run = builders.setup(config, workdir)
  try:
    return _train(run)
  except KeyboardInterrupt:
    message = _interrupted_message(run)
    run.checkpointer.close()
    raise Interrupted(message) from None


def _train(run: builders.Run) -> Dict[str, Any]:
  """The loop of `train_and_evaluate` on a set-up run."""
  config, workdir = run.config, run.workdir
  start_step = int(run.meta.get("step", 0))
  summary_path = workdir / "summary.json"
  if start_step >= run.total_steps and summary_path.exists():
    print(f"run in {workdir} already finished at step {start_step}; nothing to do", flush=True)
    run.checkpointer.close()
    return json.loads(paths.read_text(summary_path))

  extra = {k: run.meta[k] for k in ("init_metric", "init") if k in run.meta}
  if run.mixture is not None and "init_metric" not in extra:
    init = _toy_metrics(run)  # EMA == generator at step 0
    extra["init_metric"] = init["student_metric"]
    if "student" in init:  # image mixture: every metric of the initial generator
      extra["init"] = init["student"]
  if not run.meta:  # a fresh run (a rerun after a kill before this save is one too)
    eval_run.write_snapshot(run, "fakes_init.png")
    with _deferred_interrupt():
      run.checkpointer.save(0, run.state, _checkpoint_meta(run, 0, extra))
  log = metrics_log.MetricsLog(workdir, start_step, fresh=not run.meta)
  batch = config.training.batch_size
  total_kimg = run.total_steps * batch / 1000
  print(f"training {run.total_steps} steps ({total_kimg:.1f} kimg) from step {start_step} in "
        f"{workdir} on {jax.device_count()} device(s)", flush=True)

  state, step, pending, record = run.state, start_step, [], {}
  step_cfg = run.step_fn.cfg  # setup's StepConfig (phase_at picks each step's program)
  compiled_phases, sec_per_kimg = set(), None  # sec_per_kimg: last rate without compilation
  tick_start = time.time()
  tick_step, compile_s, compile_steps = step, 0.0, 0
  while step < run.total_steps:
    global_batch = parallel.global_batch(run.mesh, run.dataset.next())
    # The phase's program is chosen from the images seen, known on the host: no device sync.
    phase = steps_lib.phase_at(step * batch, step_cfg)
    call_start = time.time()
    if phase not in compiled_phases:
      print(f"kimg {step * batch / 1000:.1f} | compiling the train step of phase {phase}",
            flush=True)
    state, metrics = run.step_fn(state, global_batch, run.frozen, step * batch)
    if phase not in compiled_phases:  # the call returns once compiled; execution is async
      compiled_phases.add(phase)
      compile_s += time.time() - call_start
      compile_steps += 1
    pending.append(metrics)
    step += 1
    if step % run.tick_steps and step != run.total_steps:
      continue
    # Tick: the only host sync of the loop.
    tick = step // run.tick_steps
    means = jax.tree.map(lambda *xs: float(np.mean(xs)), *parallel.to_host(pending))
    pending = []
    elapsed = time.time() - tick_start
    timed_kimg = (step - tick_step - compile_steps) * batch / 1000
    if timed_kimg > 0:  # the steps that did not compile
      sec_per_kimg = (elapsed - compile_s) / timed_kimg
    record = {"step": step, "tick": tick, "kimg": step * batch / 1000,
              "sec_per_kimg": sec_per_kimg if timed_kimg > 0 else  # else: compilation included
                              elapsed / ((step - tick_step) * batch / 1000),
              "compile_s": compile_s, "memory_gb": _memory_gb(), **means}
    log.write(record)
    print(_status_line(record, total_kimg, sec_per_kimg), flush=True)
    run.state = state
    done = step == run.total_steps
    if done or tick % config.ckpt.every_ticks == 0:
      with _deferred_interrupt():
        run.checkpointer.save(step, state, _checkpoint_meta(run, step, extra))
    if done or tick % config.training.snapshot_ticks == 0:
      log.image("fakes", eval_run.write_snapshot(run, f"fakes_{step * batch // 1000:06d}.png"),
                record["kimg"])
    if run.detector is not None and (done or tick % config.eval.every_ticks == 0):
      extra["best_metric"] = eval_run.evaluate_during_training(run, step,
                                                               extra.get("best_metric"))
    tick_start, tick_step, compile_s, compile_steps = time.time(), step, 0.0, 0

  run.state = state
  compilations = run.step_fn.compilations()
  print(f"compiled {compilations} step program(s): the fake-score update and one generator "
        "update per phase run", flush=True)
  summary = {"steps": step, "kimg": step * batch / 1000, "resumed_from_step": start_step,
             "generator_params_sha256": ts.params_sha256(parallel.to_host(state.ema_params)),
             "num_devices": jax.device_count(), "compilations": compilations}
  if run.mixture is not None:
    summary.update(_toy_metrics(run), **{k: v for k, v in extra.items() if k.startswith("init")})
    eval_run.write_snapshot(run, "scatter.png")
  if jax.process_index() == 0:
    paths.write_text(summary_path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(_summary_text(summary, record, workdir), flush=True)
  log.close()
  run.checkpointer.close()
  return summary
