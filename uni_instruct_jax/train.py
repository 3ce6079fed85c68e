"""The distillation loop: `train_and_evaluate(config, workdir)`.

Reading order for a newcomer:
  1. `builders.setup(config, workdir)` validates every input and builds the networks, the state
     and the per-phase jitted steps (raising `SetupError` before any compute).
  2. `steps.py` holds one iteration: a fake-score + discriminator update, then a generator update
     with the loss of the current phase (none during warm-up), then the generator EMA.
  3. `train_and_evaluate` (here) runs the loop: it picks each step's phase on the host from the
     images seen, and per tick writes the status line, metrics.jsonl and TensorBoard, snapshots
     (EMA sample grids), checkpoints (orbax, resumable bitwise) and finally summary.json.
"""

import json
import pathlib
import resource
import time
from typing import Any, Dict

import jax
import ml_collections
import numpy as np

from uni_instruct_jax import builders
from uni_instruct_jax import parallel
from uni_instruct_jax import train_state as ts
from uni_instruct_jax.builders import SetupError  # pylint: disable=unused-import  # API
from uni_instruct_jax.evaluation import run as eval_run


class MetricsLog:
  """W/metrics.jsonl (one JSON record per tick) and TensorBoard (process 0 only)."""

  def __init__(self, workdir: pathlib.Path, resume_step: int):
    self.path = workdir / "metrics.jsonl"
    self.enabled = jax.process_index() == 0
    self.writer = None
    if not self.enabled:
      return
    if self.path.exists():  # drop records written after the checkpoint we resume from
      kept = [line for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line).get("step", 0) <= resume_step]
      self.path.write_text("".join(line + "\n" for line in kept))
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.writer = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, record: Dict[str, Any]) -> None:
    if not self.enabled:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")
    for k, v in record.items():
      if isinstance(v, (int, float)) and k not in ("step", "tick"):
        self.writer.add_scalar(k, v, record["step"])
    self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def _memory_gb() -> float:
  """Peak host RSS in GiB (Linux reports KiB), plus device peak bytes where the backend has them."""
  host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  stats = jax.local_devices()[0].memory_stats() or {}
  return host + stats.get("peak_bytes_in_use", 0) / 2**30


def _status_line(record: Dict[str, Any], total_kimg: float) -> str:
  frac = min(record["kimg"] / total_kimg, 1.0)
  bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
  eta = record["sec_per_kimg"] * max(total_kimg - record["kimg"], 0.0)
  parts = [f"[{bar}] {100 * frac:5.1f}%", f"kimg {record['kimg']:.1f}",
           f"sec/kimg {record['sec_per_kimg']:.2f}", f"ETA {eta / 60:.1f} min"]
  for key in ("loss_fake", "loss_disc", "loss_gen", "r_mean", "r_min", "r_max"):
    if key in record:
      parts.append(f"{key} {record[key]:.4g}")
  parts.append(f"nan {int(record['nan_samples'] + record['nan_grads'])}")
  parts.append(f"mem {record['memory_gb']:.2f}GB")
  return " | ".join(parts)


def _toy_metrics(run: builders.Run) -> Dict[str, Any]:
  from uni_instruct_jax import toy_run  # pylint: disable=g-import-not-at-top
  return toy_run.toy_metrics(run.mixture, lambda num, seed: eval_run.sample_ema(run, num, seed))


def _checkpoint_meta(run: builders.Run, step: int, extra: Dict[str, Any]) -> Dict[str, Any]:
  return {"step": step, "images_seen": step * run.config.training.batch_size,
          "data": run.dataset.state(), **extra}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Runs (or resumes) a distillation run in `workdir`; returns the summary dict.

  Raises SetupError on bad input before any compute. Rerunning a finished run changes nothing.
  """
  run = builders.setup(config, workdir)
  workdir = run.workdir
  start_step = int(run.meta.get("step", 0))
  summary_path = workdir / "summary.json"
  if start_step >= run.total_steps and summary_path.exists():
    print(f"run in {workdir} already finished at step {start_step}; nothing to do", flush=True)
    run.checkpointer.close()
    return json.loads(summary_path.read_text())

  extra = {k: run.meta[k] for k in ("init_metric", "init") if k in run.meta}
  if run.mixture is not None and "init_metric" not in extra:
    init = _toy_metrics(run)  # EMA == generator at step 0
    extra["init_metric"] = init["student_metric"]
    if "student" in init:  # image mixture: every metric of the initial generator
      extra["init"] = init["student"]
  if start_step == 0:
    eval_run.write_snapshot(run, "fakes_init.png")
    run.checkpointer.save(0, run.state, _checkpoint_meta(run, 0, extra))
  log = MetricsLog(workdir, start_step)
  batch = config.training.batch_size
  total_kimg = run.total_steps * batch / 1000
  print(f"training {run.total_steps} steps ({total_kimg:.1f} kimg) from step {start_step} in "
        f"{workdir} on {jax.device_count()} device(s)", flush=True)

  state, step, pending = run.state, start_step, []
  tick_start = time.time()
  tick_step = step
  while step < run.total_steps:
    global_batch = parallel.global_batch(run.mesh, run.dataset.next())
    # The phase's program is chosen from the images seen, known on the host: no device sync.
    state, metrics = run.step_fn(state, global_batch, run.frozen, step * batch)
    pending.append(metrics)
    step += 1
    if step % run.tick_steps and step != run.total_steps:
      continue
    # Tick: the only host sync of the loop.
    tick = step // run.tick_steps
    means = jax.tree.map(lambda *xs: float(np.mean(xs)), *parallel.to_host(pending))
    pending = []
    elapsed = time.time() - tick_start
    record = {"step": step, "tick": tick, "kimg": step * batch / 1000,
              "sec_per_kimg": elapsed / max((step - tick_step) * batch / 1000, 1e-9),
              "memory_gb": _memory_gb(), **means}
    log.write(record)
    print(_status_line(record, total_kimg), flush=True)
    run.state = state
    done = step == run.total_steps
    if done or tick % config.ckpt.every_ticks == 0:
      run.checkpointer.save(step, state, _checkpoint_meta(run, step, extra))
    if done or tick % config.training.snapshot_ticks == 0:
      eval_run.write_snapshot(run, f"fakes_{step * batch // 1000:06d}.png")
    if run.detector is not None and (done or tick % config.eval.every_ticks == 0):
      extra["best_metric"] = eval_run.evaluate_during_training(run, step,
                                                               extra.get("best_metric"))
    tick_start, tick_step = time.time(), step

  run.state = state
  compilations = run.step_fn.compilations()
  print(f"compiled the train step {compilations} time(s), once per phase run", flush=True)
  summary = {"steps": step, "kimg": step * batch / 1000, "resumed_from_step": start_step,
             "generator_params_sha256": ts.params_sha256(parallel.to_host(state.ema_params)),
             "num_devices": jax.device_count(), "compilations": compilations}
  if run.mixture is not None:
    summary.update(_toy_metrics(run), **{k: v for k, v in extra.items() if k.startswith("init")})
    eval_run.write_snapshot(run, "scatter.png")
  if jax.process_index() == 0:
    summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
  log.close()
  run.checkpointer.close()
  return summary
