"""The embedded default (configs/toy2d.py) end to end: acceptance numbers and kill -9 / resume."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "toy2d.py")
# A shortened run for the resume test: 1200 steps, 12 ticks, a checkpoint every 2 ticks.
SHORT = ["--config.training.total_kimg=307.2", "--config.training.tick_kimg=25.6",
         "--config.loss.warmup_kimg=15.36", "--config.loss.sid_kimg=30.72",
         "--config.teacher.fit_steps=500"]


def _main(workdir, *overrides):
  return [sys.executable, "-m", "uni_instruct_jax.main", f"--config={CONFIG}",
          f"--workdir={workdir}", *overrides]


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def _run(workdir, *overrides, timeout=600):
  proc = subprocess.run(_main(workdir, *overrides), cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads((pathlib.Path(workdir) / "summary.json").read_text())


@pytest.mark.slow
def test_toy2d_demo_meets_acceptance_numbers(tmp_path):
  start = time.time()
  summary = _run(tmp_path)
  elapsed = time.time() - start
  assert elapsed < 180, f"toy2d took {elapsed:.0f} s (budget 3 min)"
  for key in ("metric_name", "init_metric", "student_metric", "teacher_metric",
              "student_modes_covered", "num_modes", "steps", "resumed_from_step",
              "generator_params_sha256"):
    assert key in summary, key
  assert summary["metric_name"] == "sliced_w2"
  assert summary["resumed_from_step"] == 0
  assert summary["student_metric"] <= summary["init_metric"] / 3
  assert summary["student_modes_covered"] == summary["num_modes"] == 8
  assert (tmp_path / "scatter.png").stat().st_size > 0
  # Checkpoints at least every 10 % of the run.
  cfg = json.loads((tmp_path / "config.json").read_text())
  ticks = cfg["training"]["total_kimg"] / cfg["training"]["tick_kimg"]
  assert cfg["ckpt"]["every_ticks"] <= ticks / 10
  # Rerunning a finished run changes nothing and exits 0.
  before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
  again = _run(tmp_path)
  assert again == summary
  after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
  assert before == after


@pytest.mark.slow
def test_toy2d_killed_halfway_resumes_bitwise(tmp_path):
  reference = _run(tmp_path / "straight", *SHORT)

  workdir = tmp_path / "killed"
  proc = subprocess.Popen(_main(workdir, *SHORT), cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = workdir / "checkpoints"
  deadline = time.time() + 400
  try:
    while time.time() < deadline:  # wait for a checkpoint past the middle of the run
      steps = [int(p.name) for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.exists() else []
      if steps and max(steps) >= 600:
        break
      assert proc.poll() is None, "run ended before it could be killed"
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait()
  assert not (workdir / "summary.json").exists()

  resumed = _run(workdir, *SHORT)
  assert resumed["resumed_from_step"] >= 600
  assert resumed["generator_params_sha256"] == reference["generator_params_sha256"]
  for key in ("student_metric", "teacher_metric", "init_metric", "student_modes_covered", "steps"):
    assert resumed[key] == reference[key], key
