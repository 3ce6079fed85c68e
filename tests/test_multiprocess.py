"""Issue 13: one job as several JAX processes on this machine (CPU backend, localhost coordinator),
the code path of a pod. Every run goes through launch/local_multiprocess.sh N with
DEVICES_PER_PROCESS fake CPU devices per process, so "1 x 4" and "2 x 2" are the same 4-device mesh.

In CI (slow): toy2d under the launcher writes the summary.json metrics of a single-process run,
a 2-process checkpoint resumes with 1 process (and the reverse), and each process reads its own
rows while evaluation gathers only features. With UNI_INSTRUCT_FULL_SCALE_TESTS=1 also (minutes
each on 2 cores): the tiny image config on 2 x 2 ends with the parameters and metrics of 1 x 4,
and kill -9 of one process (docs/scale.md lists the runtimes). Every process a test starts is
killed when the test ends, also on a failure or timeout.
"""

import contextlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import shared_path
from uni_instruct_jax import export

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "local_multiprocess.sh"
FULL = pytest.mark.skipif(os.environ.get("UNI_INSTRUCT_FULL_SCALE_TESTS") != "1",
                          reason="minutes on 2 cores; set UNI_INSTRUCT_FULL_SCALE_TESTS=1")
STEP_KIMG = 0.064  # toy: one step of 64 samples
# configs/toy2d.py shrunk: batch 64, one step per tick, a checkpoint every tick (all kept).
TOY = [f"--config={ROOT / 'configs' / 'toy2d.py'}", "--config.teacher.fit_steps=20",
       "--config.teacher.fit_batch=64", "--config.training.batch_size=64",
       f"--config.training.tick_kimg={STEP_KIMG}", "--config.training.snapshot_ticks=1000",
       "--config.ckpt.every_ticks=1", "--config.ckpt.keep=100", "--config.loss.warmup_kimg=0",
       f"--config.loss.sid_kimg={STEP_KIMG}"]
SUMMARY_METRICS = ("init_metric", "student_metric", "teacher_metric", "student_modes_covered",
                   "steps", "kimg", "num_devices")


def _toy(steps):
  return TOY + [f"--config.training.total_kimg={steps * STEP_KIMG:g}"]


def _env(devices):
  """Environment of processes with `devices` CPU devices each (launched or not), whatever the
  caller's XLA_FLAGS or JAX_NUM_CPU_DEVICES say."""
  return dict(os.environ, PYTHON=sys.executable, DEVICES_PER_PROCESS=str(devices),
              JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


@contextlib.contextmanager
def _processes(commands, env, logs):
  """Starts each command i (cwd ROOT, env) in a session of its own, stdout and stderr to the files
  logs/i.out and logs/i.err (files, not pipes, so no process blocks on a full pipe); yields the
  Popens. On leaving, also on a failure or timeout, every process left in those sessions (the
  training processes of a launcher too) is killed: none outlives the test. A SIGTERM to pytest
  (a CI timeout) stops the session as Ctrl-C does, through the same cleanup."""
  logs = pathlib.Path(logs)
  logs.mkdir(parents=True, exist_ok=True)
  procs = []
  previous = signal.signal(signal.SIGTERM, _interrupt)
  try:
    for i, command in enumerate(commands):
      with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
        procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err,
                                      start_new_session=True))
    yield procs
  finally:
    for proc in procs:
      try:
        os.killpg(proc.pid, signal.SIGKILL)
      except ProcessLookupError:  # nothing left in the session
        pass
      proc.wait()
    signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


def _tail(path, chars=3000):
  return pathlib.Path(path).read_text()[-chars:]


def _launch(num, devices, workdir, flags, timeout=1800):
  """Runs `launch/local_multiprocess.sh num` (devices per process; output in workdir.log/);
  returns summary.json."""
  logs = pathlib.Path(f"{workdir}.log")
  with _processes([["bash", str(LAUNCH), str(num), f"--workdir={workdir}", *flags]],
                  _env(devices), logs) as (proc,):
    try:
      proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      pytest.fail(f"still running after {timeout} s (killed):\n{_tail(logs / '0.out', 2000)}")
  assert proc.returncode == 0, _tail(logs / "0.out", 2000) + _tail(logs / "0.err")
  return json.loads((pathlib.Path(workdir) / "summary.json").read_text())


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _metrics(workdir):
  return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text()
          .splitlines()]


def _assert_same_metrics(got, want, rtol=1e-4):
  assert [r["step"] for r in got] == [r["step"] for r in want]
  for g, w in zip(got, want):
    for key in w:
      if key.startswith(("loss_", "r_", "w_", "nan_", "generator_phase")):
        np.testing.assert_allclose(g[key], w[key], rtol=rtol, atol=1e-6,
                                   err_msg=f"step {w['step']} {key}")


def _assert_same_summary(got, want):
  for key in SUMMARY_METRICS:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-4, err_msg=key)


def _assert_same_params(workdir_a, workdir_b):
  _, a = export.restore_params(workdir_a, fake_score=True)
  _, b = export.restore_params(workdir_b, fake_score=True)
  leaves_a = jax.tree_util.tree_flatten_with_path(a)[0]
  leaves_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  assert len(leaves_a) == len(leaves_b) > 0
  for path, value in leaves_a:
    np.testing.assert_allclose(leaves_b[path], value, rtol=1e-4, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
  """toy2d, 4 steps, as 1 process x 4 devices and as 2 processes x 2 devices."""
  root = tmp_path_factory.mktemp("toy")
  return {n: (root / f"p{n}", _launch(n, 4 // n, root / f"p{n}", _toy(4))) for n in (1, 2)}


@pytest.mark.slow
@FULL
def test_tiny_image_two_processes_match_one(tmp_path):
  zip_path = shared_path("data", "cifar10-train-jpeg.zip")
  flags = ["--config=configs/tiny.py", f"--config.data.path={zip_path}",
           "--config.training.total_kimg=0.016", "--config.training.tick_kimg=0.008",
           "--config.loss.warmup_kimg=0", "--config.loss.sid_kimg=0",
           "--config.training.snapshot_ticks=1000"]
  one, two = tmp_path / "p1", tmp_path / "p2"
  s1, s2 = _launch(1, 4, one, flags), _launch(2, 2, two, flags)
  assert s1["num_devices"] == s2["num_devices"] == 4 and s1["steps"] == s2["steps"] == 2
  _assert_same_metrics(_metrics(two), _metrics(one))
  _assert_same_params(two, one)


@pytest.mark.slow
def test_toy_launcher_two_processes_match_one(toy_runs):
  (one, s1), (two, s2) = toy_runs[1], toy_runs[2]
  _assert_same_summary(s2, s1)
  _assert_same_metrics(_metrics(two), _metrics(one))
  assert (two / "scatter.png").is_file() and (two / "checkpoints" / "4").is_dir()


def _truncate(src, dst, step):
  """A copy of workdir `src` as it was when step `step` was checkpointed."""
  shutil.copytree(src, dst)
  (dst / "summary.json").unlink()
  for ckpt in (dst / "checkpoints").iterdir():
    if ckpt.name.isdigit() and int(ckpt.name) > step:
      shutil.rmtree(ckpt)


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_process_count(toy_runs, tmp_path, before, after):
  (one, s1) = toy_runs[1]
  workdir = tmp_path / "w"
  _truncate(toy_runs[before][0], workdir, 2)
  summary = _launch(after, 4 // after, workdir, _toy(4))
  assert summary["resumed_from_step"] == 2
  _assert_same_summary(summary, s1)
  _assert_same_metrics(_metrics(workdir), _metrics(one))


@FULL
@pytest.mark.slow
def test_kill_one_process_then_resume(tmp_path):
  """kill -9 of process 1 mid-run (processes started as on a pod, no launcher): process 0 stops
  with one `error:` line within 60 s (a failed collective at once, else the 15 s peer watchdog),
  never hangs; the launcher then resumes from the last checkpoint."""
  workdir = tmp_path / "w"
  port = _free_port()
  commands = [[sys.executable, "-m", "uni_instruct_jax.main",
               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={p}",
               f"--workdir={workdir}", *_toy(400), "--config.ckpt.every_ticks=5"] for p in (0, 1)]
  with _processes(commands, _env(2), tmp_path / "logs") as procs:
    deadline = time.monotonic() + 900
    while not (workdir / "checkpoints" / "5").is_dir():
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs), (
          _tail(tmp_path / "logs" / "0.err"))
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    procs[0].wait(timeout=120)
    waited = time.monotonic() - killed
  stderr = (tmp_path / "logs" / "0.err").read_text()
  assert procs[0].returncode != 0
  assert waited <= 60, f"process 0 took {waited:.0f} s to stop"
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("error:") and "process" in last, stderr[-3000:]
  done = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  # Rerunning (a shorter run, same config otherwise) resumes from the last checkpoint.
  summary = _launch(2, 2, workdir, _toy(done + 2))
  assert summary["resumed_from_step"] == done and summary["steps"] == done + 2


_ROWS_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from uni_instruct_jax import parallel
from uni_instruct_jax.evaluation import inception
parallel.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
mesh = parallel.make_mesh()
make = lambda out: jax.jit(lambda k: jax.random.randint(k, (8, 3), 0, 255).astype(jnp.uint8),
                           out_shardings=out)(jax.random.key(0))
full = np.asarray(jax.random.randint(jax.random.key(0), (8, 3), 0, 255).astype(jnp.uint8))
rows = {name: parallel.process_rows(make(sharding)).tolist() for name, sharding in
        (("sharded", parallel.data_sharding(mesh)), ("replicated", parallel.replicated(mesh)))}
# The detector's gather (inception.sharded_apply) with "features" = 2 x the input rows.
double = jax.device_put(jnp.float32(2), parallel.replicated(mesh))
feats = inception.sharded_apply(lambda v, x: x.astype(jnp.float32) * v, double,
                                parallel.process_rows(full), mesh)
print(json.dumps({"rows": rows, "full": full.tolist(), "feats": np.asarray(feats).tolist()}))
"""


@pytest.mark.slow
def test_process_rows_and_feature_gather(tmp_path):
  """Each of 2 processes reads its half of a global batch from its own shards (sharded or
  replicated); the detector gathers only features, in global order."""
  port = _free_port()
  logs = tmp_path / "logs"
  with _processes([[sys.executable, "-c", _ROWS_SCRIPT, f"127.0.0.1:{port}", str(p)]
                   for p in (0, 1)], _env(2), logs) as procs:
    for proc in procs:
      proc.wait(timeout=300)
  for p, proc in enumerate(procs):
    assert proc.returncode == 0, _tail(logs / f"{p}.err")
  results = [json.loads((logs / f"{p}.out").read_text().strip().splitlines()[-1]) for p in (0, 1)]
  full = np.asarray(results[0]["full"])
  for p, result in enumerate(results):
    for name in ("sharded", "replicated"):
      np.testing.assert_array_equal(result["rows"][name], full[4 * p:4 * p + 4], err_msg=name)
    np.testing.assert_array_equal(result["feats"], 2.0 * full)
