"""uni_instruct_jax.parallel's multi-process start-up and launch/local_multiprocess.sh: a single
host needs nothing, a misconfigured job fails with one line, the launcher stops all on a failure."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import pytest

from uni_instruct_jax import parallel

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
               "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
               "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST")


@pytest.fixture
def jax_init(monkeypatch):
  """A clean environment and a recording stand-in for jax.distributed.initialize."""
  for name in CLUSTER_ENV:
    monkeypatch.delenv(name, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  return calls


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_single_host_skips_initialization(jax_init):
  assert parallel.initialize_distributed() is False
  assert parallel.initialize_distributed(num_processes=1) is False
  assert not jax_init


def test_flags_and_environment_reach_jax_with_a_bounded_heartbeat(jax_init, monkeypatch):
  with socket.socket() as coordinator:  # the pre-flight connects to it
    coordinator.bind(("127.0.0.1", 0))
    coordinator.listen()
    address = f"127.0.0.1:{coordinator.getsockname()[1]}"
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", address)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert parallel.initialize_distributed() is True
    assert parallel.initialize_distributed(num_processes=2, process_id=1) is True  # flags win
  (args0, kwargs0), (args1, _) = jax_init
  assert args0 == (address, 4, 3) and args1 == (address, 2, 1)
  assert 0 < kwargs0["heartbeat_timeout_seconds"] <= 60


def test_a_detected_cluster_is_joined_and_its_failure_is_one_line(jax_init, monkeypatch):
  for name, value in (("SLURM_JOB_ID", "7"), ("SLURM_STEP_NODELIST", "node1"),
                      ("SLURM_NTASKS", "2"), ("SLURM_PROCID", "1"), ("SLURM_LOCALID", "0")):
    monkeypatch.setenv(name, value)
  assert parallel.initialize_distributed() is True and jax_init[0][0] == (None, None, None)

  def fail(*args, **kwargs):
    raise RuntimeError("DEADLINE_EXCEEDED: Barrier timed out\nTask /job:jax_worker/task:0 ...")
  monkeypatch.setattr(jax.distributed, "initialize", fail)
  with pytest.raises(parallel.DistributedSetupError) as error:
    parallel.initialize_distributed()
  assert "DEADLINE_EXCEEDED: Barrier timed out" in str(error.value)
  assert "\n" not in str(error.value)


def test_bad_settings_and_an_unreachable_coordinator_fail_fast(jax_init, monkeypatch):
  start = time.monotonic()
  with pytest.raises(parallel.DistributedSetupError, match="unreachable for 1 s"):
    parallel.initialize_distributed(f"127.0.0.1:{_free_port()}", 2, 1, initialization_timeout=1)
  assert time.monotonic() - start < 10 and not jax_init
  with pytest.raises(parallel.DistributedSetupError, match="not host:port"):
    parallel.initialize_distributed("localhost", 2, 1)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(parallel.DistributedSetupError, match="JAX_NUM_PROCESSES='two'"):
    parallel.initialize_distributed()


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in CLUSTER_ENV}
  env.update(JAX_PLATFORMS="cpu", **extra)
  return env


def test_main_reports_a_bad_multiprocess_setup_in_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "uni_instruct_jax.main", "--config=configs/toy2d.py",
       f"--workdir={tmp_path / 'w'}", "--num_processes=2", "--process_id=5"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert errors == [proc.stderr.strip().splitlines()[-1]]
  assert "jax.distributed.initialize" in errors[0] and "process_id=5" in errors[0]
  assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------------------------
# launch/local_multiprocess.sh

FAKE_PYTHON = """#!/usr/bin/env bash
# Stand-in interpreter: -c runs the real one; else process 1 fails, the others sleep.
[ "$1" = "-c" ] && exec {python} "$@"
for arg; do case $arg in --process_id=*) id=${{arg#*=}};; esac; done
echo "args $* XLA_FLAGS=$XLA_FLAGS JAX_PLATFORMS=$JAX_PLATFORMS"
[ "$id" = 1 ] && {{ sleep 1; echo "process 1 fails" >&2; exit 3; }}
exec sleep 120
"""


def _launch(*args, timeout=120, **env):
  return subprocess.run(["bash", "launch/local_multiprocess.sh", *args], cwd=ROOT,
                        env=_env(**env), capture_output=True, text=True, timeout=timeout)


def test_launcher_prefixes_output_and_stops_all_on_the_first_failure(tmp_path):
  fake = tmp_path / "python"
  fake.write_text(FAKE_PYTHON.format(python=sys.executable))
  fake.chmod(0o755)
  start = time.monotonic()
  proc = _launch("3", "--workdir=W", PYTHON=str(fake), DEVICES_PER_PROCESS="4")
  assert time.monotonic() - start < 60  # the sleepers were killed, not waited for
  assert proc.returncode == 3, proc.stdout + proc.stderr
  lines = proc.stdout.splitlines()
  for p in range(3):
    line = next(l for l in lines if l.startswith(f"[{p}] args"))
    assert f"--num_processes=3 --process_id={p} --workdir=W" in line
    assert "--coordinator_address=127.0.0.1:" in line
    assert "--xla_force_host_platform_device_count=4" in line and "JAX_PLATFORMS=cpu" in line
  assert "[1] process 1 fails" in lines
  assert "error: process 1 of 3 exited with code 3" in proc.stderr
  assert _launch("0").returncode == 2 and "usage" in _launch("x").stderr


def test_launch_scripts_parse_and_tpu_commands_are_complete():
  for script in sorted((ROOT / "launch").glob("*.sh")) + [ROOT / "launch" / "slurm.sbatch"]:
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
  dry = subprocess.run(["bash", "launch/tpu.sh", "create", "uij", "v5p-64"], cwd=ROOT,
                       env=_env(DRY_RUN="1", ZONE="us-east5-a"), capture_output=True, text=True)
  assert dry.stdout.split() == ["gcloud", "compute", "tpus", "tpu-vm", "create", "uij",
                                "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5",
                                "--zone=us-east5-a"], dry.stderr


@pytest.mark.slow
def test_toy2d_runs_as_two_processes(tmp_path):
  workdir = tmp_path / "toy"
  proc = _launch("2", "--config=configs/toy2d.py", f"--workdir={workdir}",
                 "--config.teacher.fit_steps=1", "--config.training.total_kimg=0.512",
                 "--config.training.tick_kimg=0.512", "--config.loss.warmup_kimg=0",
                 "--config.loss.sid_kimg=0", timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["steps"] == 2 and summary["num_devices"] == 4  # 2 processes x 2 devices
  for p in range(2):
    assert any(l.startswith(f"[{p}] training 2 steps") for l in proc.stdout.splitlines())
