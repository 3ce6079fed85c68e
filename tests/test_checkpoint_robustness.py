"""Checkpoints never strand or silently change a run (issue 12 §2): digests, fallback to the newest
intact step, idempotent saves, metrics.jsonl repair, the workdir lock, kill -9 and full disks."""

import contextlib
import errno
import json
import os
import pathlib
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from conftest import set_config_value
from uni_instruct_jax import builders
from uni_instruct_jax import config_schema
from uni_instruct_jax import metrics_log
from uni_instruct_jax import train_state as ts
from uni_instruct_jax import workdir_lock
from uni_instruct_jax import train
from uni_instruct_jax.builders import SetupError
from uni_instruct_jax.evaluation import run as eval_run

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _state(seed: int, n: int = 4096) -> ts.TrainState:
  """A small TrainState with random float32 parameters (incompressible array bytes)."""
  rng = np.random.default_rng(seed)
  gen = {"w": jnp.asarray(rng.normal(size=n), jnp.float32), "b": jnp.asarray(rng.normal(size=8))}
  fake = {"w": jnp.asarray(rng.normal(size=n), jnp.float32)}
  tx = optax.adam(1e-3)
  return ts.create_state(gen, fake, tx, tx, seed)


# A toy2d run of 8 steps, 4 ticks, checkpoints at steps 0, 4 and 8.
_TOY = {"teacher.fit_steps": 10, "training.batch_size": 64, "training.total_kimg": 0.512,
        "training.tick_kimg": 0.128, "ckpt.every_ticks": 2, "network.kwargs.hidden": (32,),
        "network.kwargs.emb_channels": 16}


def _toy_config():
  config = runpy.run_path(str(ROOT / "configs" / "toy2d.py"))["get_config"]()
  for key, value in _TOY.items():
    set_config_value(config, key.split("."), value)
  return config


def _abstract(state):
  return ts.abstract_like(state, jax.tree.map(lambda x: x.sharding, state))


def _same(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _saved(tmp_path, steps=(0, 4, 8), keep=3):
  """(Checkpointer with `steps` saved, {step: state})."""
  ckpt = ts.Checkpointer(tmp_path, keep)
  states = {}
  for step in steps:
    states[step] = _state(step)
    ckpt.save(step, states[step], {"step": step})
  return ckpt, states


def _data_files(step_dir: pathlib.Path):
  """The array data files of a saved step (ocdbt 'd/' files), largest first."""
  files = [p for p in pathlib.Path(step_dir, "state").rglob("*")
           if p.is_file() and p.parent.name == "d"]
  return sorted(files, key=lambda p: -p.stat().st_size)


# ------------------------------------------------------------------------------------------------
# Digests and fallback


def test_tree_digest_is_per_array_and_sees_one_bit():
  state = _state(0)
  digest = ts.tree_digest(state)
  assert set(digest) == {jax.tree_util.keystr(p) for p, _ in
                         jax.tree_util.tree_flatten_with_path(state)[0]}
  flipped = np.asarray(state.gen_params["w"]).copy()
  flipped.view(np.uint32)[17] ^= 1
  other = ts.tree_digest(state.replace(gen_params={**state.gen_params, "w": jnp.asarray(flipped)}))
  assert [k for k in digest if digest[k] != other[k]] == ["." + "gen_params['w']"]
  # The digest is of the value, not of its layout: a sharded copy has the same digest.
  mesh = jax.make_mesh((1,), ("data",))
  sharded = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.P()))
  assert ts.tree_digest(sharded) == digest


@pytest.mark.parametrize("file_record", [True, False])
def test_flipped_bytes_in_data_files_are_refused(file_record, tmp_path):
  """A flip anywhere is refused by the file digests; without them (a kill right after orbax's
  commit) the array digests still refuse every flip that changes the restored state."""
  ckpt, states = _saved(tmp_path, steps=(0,))
  if not file_record:
    (ckpt.directory / "0" / ts.FILE_DIGESTS).unlink()
  abstract = _abstract(states[0])
  files = _data_files(ckpt.directory / "0")
  assert len(files) >= 2
  outcomes = []
  for path in files:
    data = path.read_bytes()
    for frac in (0.0, 0.05, 0.2, 0.35, 0.5, 0.65, 0.8):
      pos = int(frac * (len(data) - 1))
      damaged = bytearray(data)
      damaged[pos] ^= 0x10
      path.write_bytes(bytes(damaged))
      try:
        restored, _ = ckpt.restore(abstract, 0)
        outcomes.append((path.name, pos, "identical" if _same(restored, states[0]) else "CHANGED"))
      except ts.CheckpointError as e:
        assert "\n" not in str(e)
        outcomes.append((path.name, pos, "refused"))
      path.write_bytes(data)
  if file_record:
    assert all(o[2] == "refused" for o in outcomes), outcomes
  else:  # never a different state; every flip in the array payload (the largest file) refused
    assert not [o for o in outcomes if o[2] == "CHANGED"], outcomes
    assert all(o[2] == "refused" for o in outcomes if o[0] == files[0].name), outcomes
  restored, _ = ckpt.restore(abstract, 0)  # the undamaged checkpoint still restores
  assert _same(restored, states[0])
  ckpt.close()


def _damage(step_dir: pathlib.Path, kind: str) -> None:
  state = step_dir / "state"
  if kind == "truncated":
    path = _data_files(step_dir)[0]
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
  elif kind == "zero_length":
    for path in _data_files(step_dir):
      path.write_bytes(b"")
  elif kind == "bad_manifest":
    (state / "manifest.ocdbt").write_bytes(b"garbage")
  elif kind == "missing_metadata":
    (state / "_METADATA").unlink()
  elif kind == "digest_mismatch":  # the arrays are fine, the recorded digest is not
    (step_dir / ts.FILE_DIGESTS).unlink()  # so that only the array digests can tell
    path = step_dir / "digest" / "metadata"
    digest = json.loads(path.read_text())
    key = sorted(digest)[0]
    digest[key] = "0" * 64
    path.write_text(json.dumps(digest))
  else:
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["truncated", "zero_length", "bad_manifest", "missing_metadata",
                                  "digest_mismatch"])
def test_damaged_latest_falls_back_to_the_newest_intact(kind, tmp_path, capsys):
  ckpt, states = _saved(tmp_path)
  ckpt.close()
  _damage(ckpt.directory / "8", kind)
  ckpt = ts.Checkpointer(tmp_path, 3)
  state, meta, step = ckpt.restore_latest_intact(_abstract(states[8]))
  assert step == 4 and meta == {"step": 4} and _same(state, states[4])
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1 and "step 8" in lines[0] and "resuming from step 4" in lines[0]
  moved = [p.name for p in ckpt.directory.iterdir() if p.name.startswith("8.corrupt-")]
  assert len(moved) == 1 and moved[0] in lines[0]  # kept for inspection, not deleted
  assert ckpt.latest_step() == 4
  # The run goes on: step 8 is written again next to the damaged copy.
  ckpt.save(8, states[8], {"step": 8})
  assert _same(ckpt.restore(_abstract(states[8]), 8)[0], states[8])
  ckpt.close()


def test_no_intact_checkpoint_is_one_error_and_read_only_mode_moves_nothing(tmp_path, capsys):
  ckpt, states = _saved(tmp_path, steps=(0, 4))
  ckpt.close()
  for step in (0, 4):
    _damage(ckpt.directory / str(step), "bad_manifest")
  reader = ts.Checkpointer(tmp_path, 3, read_only=True)
  with pytest.raises(ts.CheckpointError, match="no intact checkpoint") as info:
    reader.restore_latest_intact(_abstract(states[0]), move_damaged=False)
  assert "\n" not in str(info.value) and "damaged steps 4, 0" in str(info.value)
  assert "left in place" in capsys.readouterr().out
  assert sorted(p.name for p in reader.directory.iterdir()) == ["0", "4"]
  reader.close()


def test_save_is_idempotent_and_ignores_an_interrupted_save(tmp_path):
  ckpt, states = _saved(tmp_path, steps=(0,))
  ckpt.save(0, _state(99), {"step": 0})  # a rerun saving step 0 again: no StepAlreadyExistsError
  assert _same(ckpt.restore(_abstract(states[0]), 0)[0], states[0])
  ckpt.close()
  # A kill mid-save leaves orbax's temporary directory: not a step, removed by the next run.
  tmp = ckpt.directory / "4.orbax-checkpoint-tmp"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "junk").write_bytes(b"x" * 100)
  ckpt = ts.Checkpointer(tmp_path, 3)
  assert ckpt.latest_step() == 0
  ckpt.save(4, _state(4), {"step": 4})
  assert ckpt.latest_step() == 4 and not tmp.exists()
  assert _same(ckpt.restore(_abstract(_state(4)), 4)[0], _state(4))
  ckpt.close()


# ------------------------------------------------------------------------------------------------
# Full and read-only disks


@contextlib.contextmanager
def _small_tmpfs(path: pathlib.Path, size: str):
  """A tmpfs of `size` mounted at `path` (skips when mounting is not permitted)."""
  path.mkdir()
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True, text=True, check=False)
  if proc.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


def _assert_save_fails_keeping_step_0(ckpt, states, needle):
  with pytest.raises(ts.CheckpointError, match=needle) as info:
    ckpt.save(4, states[4], {"step": 4})
  assert "\n" not in str(info.value) and "step 4" in str(info.value)
  assert _same(ckpt.restore(_abstract(states[0]), 0)[0], states[0])


def test_full_and_read_only_disks_on_tmpfs(tmp_path):
  """A real ENOSPC and EROFS: 600 KiB states on a 1 MiB tmpfs, then remounted read-only."""
  with _small_tmpfs(tmp_path / "mnt", "1m") as mnt:
    ckpt = ts.Checkpointer(mnt, 3)
    states = {0: _state(0, 50_000), 4: _state(4, 50_000)}
    ckpt.save(0, states[0], {"step": 0})
    _assert_save_fails_keeping_step_0(ckpt, states, "cannot write checkpoint")
    ckpt.close()
    for p in mnt.glob("checkpoints/*tmp*"):
      shutil.rmtree(p)
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    ckpt = ts.Checkpointer(mnt, 3, read_only=True)
    assert _same(ckpt.restore(_abstract(states[0]), 0)[0], states[0])
    ckpt.close()
    with pytest.raises(OSError) as info:
      workdir_lock.WorkdirLock(mnt).acquire()
    assert info.value.errno == errno.EROFS


def test_a_failed_write_is_one_line_checkpoint_error(tmp_path, monkeypatch):
  """The same without tmpfs: orbax's save raising ENOSPC / EROFS (as tensorstore reports it)."""
  ckpt, states = _saved(tmp_path, steps=(0,))
  states[4] = _state(4)
  for error in (OSError(errno.ENOSPC, "No space left on device"),
                ValueError("RESOURCE_EXHAUSTED: Error writing local file: Read-only file system")):
    def failing_save(*args, error=error, **kwargs):
      del args, kwargs
      raise error
    monkeypatch.setattr(ckpt.manager, "save", failing_save)
    _assert_save_fails_keeping_step_0(ckpt, states, re.escape(str(error)))
  ckpt.close()


@pytest.mark.slow
def test_disk_full_mid_run_is_one_setup_error_and_keeps_step_0(tmp_path, monkeypatch):
  config = _toy_config()
  original = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step > 0:
      raise OSError(errno.ENOSPC, "No space left on device")
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  with pytest.raises(SetupError, match="No space left on device") as info:
    train.train_and_evaluate(config, str(tmp_path))
  assert "\n" not in str(info.value) and "step 4" in str(info.value)
  assert not (tmp_path / "run.lock").exists()
  monkeypatch.undo()
  run = builders.setup(config, str(tmp_path), write_config=False)  # restores and verifies step 0
  assert run.meta["step"] == 0 and run.checkpointer.latest_step() == 0
  run.checkpointer.close()
  # --mode=sample reads a workdir that a run holds (it takes no lock).
  with workdir_lock.WorkdirLock(tmp_path):
    assert eval_run.sample(config, str(tmp_path)).name == "samples-00000000.npz"


# ------------------------------------------------------------------------------------------------
# metrics.jsonl


def test_metrics_truncated_last_line_is_repaired(tmp_path, capsys):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 2}\n{"kimg": 0, "fid": 3.0}\n{"step": 4}\n{"step": 6, "lo')
  metrics_log.prepare(path, resume_step=4, fresh=False)
  assert path.read_text() == '{"step": 2}\n{"kimg": 0, "fid": 3.0}\n{"step": 4}\n'
  assert (tmp_path / "metrics.jsonl.bad").read_text() == '{"step": 6, "lo\n'
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 1 and out[0].startswith("warning: 1 unreadable line")


def test_metrics_after_the_checkpoint_are_moved_aside(tmp_path, capsys):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (2, 4, 6, 8)))
  metrics_log.prepare(path, resume_step=4, fresh=False)
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [2, 4]
  side = tmp_path / "metrics.jsonl.after-4"
  assert [json.loads(l)["step"] for l in side.read_text().splitlines()] == [6, 8]
  assert "moved to metrics.jsonl.after-4" in capsys.readouterr().out


def test_a_fresh_run_keeps_an_existing_metrics_file(tmp_path):
  path = tmp_path / "metrics.jsonl"
  for n in (1, 2):
    path.write_text(f'{{"step": {n}}}\n')
    metrics_log.prepare(path, resume_step=0, fresh=True)
    assert not path.exists()
    assert (tmp_path / f"metrics.jsonl.{n}").read_text() == f'{{"step": {n}}}\n'


# ------------------------------------------------------------------------------------------------
# The workdir lock


def test_lock_refuses_a_second_run_and_is_released(tmp_path):
  with workdir_lock.WorkdirLock(tmp_path) as lock:
    record = json.loads((tmp_path / "run.lock").read_text())
    assert record["pid"] == os.getpid() and record["token"] == lock.owner["token"]
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()} on ") as info:
      workdir_lock.WorkdirLock(tmp_path).acquire()
    assert isinstance(info.value, SetupError) and "\n" not in str(info.value)
  assert not (tmp_path / "run.lock").exists()
  with pytest.raises(RuntimeError):  # released on an exception too
    with workdir_lock.WorkdirLock(tmp_path):
      raise RuntimeError("boom")
  assert not (tmp_path / "run.lock").exists()


def test_lock_heartbeat_and_stale_takeover(tmp_path, capsys):
  lock = workdir_lock.WorkdirLock(tmp_path, heartbeat_s=0.05).acquire()
  first = json.loads((tmp_path / "run.lock").read_text())["heartbeat"]
  time.sleep(0.3)
  assert json.loads((tmp_path / "run.lock").read_text())["heartbeat"] > first
  lock.release()
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  owner = {"host": os.uname().nodename, "pid": int(dead.stdout), "start_time": time.time(),
           "heartbeat": time.time(), "token": "x"}
  for stale in (owner, {**owner, "host": "elsewhere", "pid": 1, "heartbeat": time.time() - 3600}):
    (tmp_path / "run.lock").write_text(json.dumps(stale))
    with workdir_lock.WorkdirLock(tmp_path, stale_s=600):
      out = capsys.readouterr().out.strip().splitlines()
      assert len(out) == 1 and out[0].startswith("note: taking over the stale lock")
  # A live holder elsewhere with a fresh heartbeat is respected.
  (tmp_path / "run.lock").write_text(json.dumps({**owner, "host": "elsewhere"}))
  with pytest.raises(workdir_lock.WorkdirLockedError, match="elsewhere"):
    workdir_lock.WorkdirLock(tmp_path).acquire()


_SIGTERM_SCRIPT = """
import sys, time
from uni_instruct_jax import workdir_lock
with workdir_lock.WorkdirLock(sys.argv[1]):
  print('locked', flush=True)
  time.sleep(60)
"""


def test_lock_is_released_on_sigterm(tmp_path):
  proc = subprocess.Popen([sys.executable, "-c", _SIGTERM_SCRIPT, str(tmp_path)], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.stdout.readline().strip() == "locked"
  assert (tmp_path / "run.lock").exists()
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=60) == 128 + signal.SIGTERM
  assert not (tmp_path / "run.lock").exists()


# ------------------------------------------------------------------------------------------------
# End to end: kill -9 after the step-0 checkpoint, a second run, a stale lock, a resume


def _main(workdir, *extra):
  overrides = [f"--config.{k}={v}" for k, v in _TOY.items()]
  return [sys.executable, "-m", "uni_instruct_jax.main", "--config=configs/toy2d.py", *overrides,
          f"--workdir={workdir}", *extra]


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


@pytest.mark.slow
def test_kill_after_step_0_checkpoint_then_second_run_then_resume(tmp_path):
  workdir = tmp_path / "w"
  proc = subprocess.Popen(_main(workdir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "0").is_dir():  # orbax renames a finished save into place
      assert proc.poll() is None and time.time() < deadline, "run ended before step 0 was saved"
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait()
  steps = sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == ["0"] and (workdir / "run.lock").exists()  # the killed run's lock is left

  stale = (workdir / "run.lock").read_text()
  # A second run while another holds the workdir: one line naming the holder, exit 2.
  with workdir_lock.WorkdirLock(workdir):
    second = subprocess.run(_main(workdir), cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=300)
  assert second.returncode == 2, second.stderr[-2000:]
  lines = second.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: workdir ") and f"pid {os.getpid()}" in \
      lines[0]

  # The same command resumes from step 0 (the killed run's stale lock taken over) and finishes.
  (workdir / "run.lock").write_text(stale)
  again = subprocess.run(_main(workdir), cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "taking over the stale lock" in again.stdout
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["resumed_from_step"] == 0 and summary["steps"] == 8
  assert not (workdir / "run.lock").exists()
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [2, 4, 6, 8]


@pytest.mark.slow
def test_cli_unwritable_workdir_is_one_error_line(tmp_path):
  """A workdir that cannot be written (here: a path under a file) fails with one line, exit 2."""
  blocker = tmp_path / "file"
  blocker.write_text("x")
  proc = subprocess.run(_main(blocker / "w"), cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr


def test_keep_zero_is_rejected():
  config = _toy_config()
  config.ckpt.keep = 0
  with pytest.raises(config_schema.ConfigError, match="ckpt.keep"):
    config_schema.validate(config)


def test_saved_config_check_accepts_fields_added_at_their_default(tmp_path):
  """A workdir saved before a field existed resumes when the field is at its schema default;
  any other difference (or the new field set away from its default) is refused on one line."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  config = runpy.run_path(str(ROOT / "configs" / "toy2d.py"))["get_config"]()
  saved = json.loads(config.to_json_best_effort())
  del saved["generator"]["init_path"]  # as written by a version without the field
  (tmp_path / "config.json").write_text(json.dumps(saved))
  builders._check_saved_config(config, epath.Path(tmp_path))  # pylint: disable=protected-access
  config.generator.init_path = "/elsewhere"
  with pytest.raises(SetupError, match=r"generator.init_path: None -> '/elsewhere'"):
    builders._check_saved_config(config, epath.Path(tmp_path))  # pylint: disable=protected-access
  config.generator.init_path = ""
  config.optim.lr = 0.5
  with pytest.raises(SetupError, match=r"optim.lr: 0.001 -> 0.5"):
    builders._check_saved_config(config, epath.Path(tmp_path))  # pylint: disable=protected-access
