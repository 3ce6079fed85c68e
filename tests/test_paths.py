"""uni_instruct_jax.paths: workdir I/O on local paths and on gs:// (an in-memory fake GCS)."""

import ast
import functools
import importlib
import json
import pathlib

import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.memory import MemoryFileSystem

from uni_instruct_jax import paths


class _FakeGcs(MemoryFileSystem):
  """gs:// in memory: what epath's fsspec backend reaches instead of gcsfs."""
  protocol = ("gs", "gcs")
  store = {}
  pseudo_dirs = [""]


@pytest.fixture
def fake_gcs(monkeypatch):
  monkeypatch.setenv("EPATH_USE_TF", "false")  # epath picks tf.io.gfile for gs:// when TF is there
  registry = importlib.import_module("fsspec.registry")
  registry = registry._registry  # pylint: disable=protected-access
  for name in _FakeGcs.protocol:  # restored by monkeypatch at teardown
    monkeypatch.setitem(registry, name, _FakeGcs)
  caches = (gpath._is_tf_installed,  # pylint: disable=protected-access
            epath_backend.fsspec_backend._get_filesystem)  # pylint: disable=protected-access
  for cache in caches:
    cache.cache_clear()
  _FakeGcs.store.clear()
  yield _FakeGcs.store
  _FakeGcs.store.clear()
  monkeypatch.undo()
  for cache in caches:
    cache.cache_clear()


def _exercise(root):
  """The workdir operations of a run; returns the files' texts."""
  run = paths.makedirs(paths.workdir_path(root) / "run")
  paths.write_text(run / "config.json", "{}\n")
  paths.write_text(run / "config.json", '{"a": 1}\n')  # replaced, not appended
  paths.append_text(run / "metrics.jsonl", '{"step": 1}\n')
  paths.append_text(run / "metrics.jsonl", '{"step": 2}\n')
  with paths.open_file(run / "fakes.png", "wb") as f:
    f.write(b"\x89PNG")
  with paths.open_file(run / "fakes.png", "rb") as f:
    png = f.read()
  return (paths.read_text(run / "config.json"), paths.read_text(run / "metrics.jsonl"), png,
          sorted(p.name for p in run.iterdir()))


def test_local_workdir(tmp_path):
  config, metrics, png, names = _exercise(str(tmp_path))
  assert config == '{"a": 1}\n' and metrics == '{"step": 1}\n{"step": 2}\n' and png == b"\x89PNG"
  assert names == ["config.json", "fakes.png", "metrics.jsonl"]  # no temporary file left
  assert (tmp_path / "run" / "config.json").read_text() == config  # a real local file


def test_gs_workdir_stays_a_url(fake_gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  path = paths.workdir_path("gs://bucket/exp")
  assert str(path) == "gs://bucket/exp" and paths.is_url(path)
  config, metrics, png, names = _exercise("gs://bucket/exp")
  assert config == '{"a": 1}\n' and metrics == '{"step": 1}\n{"step": 2}\n' and png == b"\x89PNG"
  assert names == ["config.json", "fakes.png", "metrics.jsonl"]
  assert any(key.endswith("bucket/exp/run/metrics.jsonl") for key in fake_gcs)
  assert not list(tmp_path.iterdir())  # nothing local, no folder named 'gs:'


def test_bad_use_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="empty path"):
    paths.workdir_path("")
  with pytest.raises(ValueError, match="append_text"):
    paths.open_file(tmp_path / "m.jsonl", "a")


def _toy_config():
  """configs/toy2d.py shrunk to 2 steps of 64 (1 tick each) and a 20-step teacher fit."""
  import runpy  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(__file__).resolve().parents[1]
  config = runpy.run_path(str(root / "configs" / "toy2d.py"))["get_config"]()
  config.teacher.fit_steps, config.teacher.fit_batch = 20, 64
  config.training.batch_size, config.training.total_kimg = 64, 0.128
  config.training.tick_kimg, config.training.snapshot_ticks, config.ckpt.every_ticks = 0.064, 1, 1
  config.loss.warmup_kimg, config.loss.sid_kimg = 0.0, 0.064
  return config


@pytest.mark.slow
def test_toy_run_with_gs_workdir(fake_gcs, tmp_path, monkeypatch):
  """A toy run on a gs:// workdir: every file but the checkpoints lands in the (fake) bucket and
  nothing in the local cwd. orbax writes arrays with tensorstore, whose gs:// driver cannot reach
  an fsspec fake, so the checkpoints alone go to a local folder here; the Checkpointer gets the
  gs:// workdir unchanged."""
  from uni_instruct_jax import toy_run  # pylint: disable=g-import-not-at-top
  from uni_instruct_jax import train  # pylint: disable=g-import-not-at-top
  from uni_instruct_jax import train_state as ts  # pylint: disable=g-import-not-at-top
  given = []

  class LocalCheckpointer(ts.Checkpointer):
    def __init__(self, workdir, keep, name="checkpoints"):
      given.append(str(workdir))
      super().__init__(tmp_path / "ckpt", keep, name)

  monkeypatch.setattr(ts, "Checkpointer", LocalCheckpointer)
  monkeypatch.setattr(toy_run, "toy_metrics", functools.partial(toy_run.toy_metrics, num=500))
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  summary = train.train_and_evaluate(_toy_config(), "gs://bucket/run")
  assert summary["steps"] == 2 and given and set(given) == {"gs://bucket/run"}
  names = sorted(key.split("bucket/run/", 1)[1] for key in fake_gcs)
  for name in ("config.json", "metrics.jsonl", "summary.json", "fakes_init.png", "scatter.png"):
    assert name in names, names
  assert any(n.startswith("tensorboard/events.out.tfevents") for n in names), names
  bucket = paths.workdir_path("gs://bucket/run")
  records = [json.loads(l) for l in paths.read_text(bucket / "metrics.jsonl").splitlines()]
  assert [r["step"] for r in records] == [1, 2]
  assert json.loads(paths.read_text(bucket / "summary.json")) == summary
  assert not list(cwd.iterdir())  # no local folder named 'gs:'


# Workdir I/O of these modules must go through uni_instruct_jax.paths (gs:// safe).
_WORKDIR_MODULES = ("train.py", "builders.py", "train_state.py", "evaluation/run.py",
                    "evaluation/evaluate.py", "evaluation/fid.py", "evaluation/refs.py")
_LOCAL_ONLY = {("os", "makedirs"), ("os", "mkdir"), ("os", "replace"), ("os", "rename"),
               ("os", "remove"), ("shutil", None)}


def _bypasses(source: str):
  """(line, what) of local-only file I/O in `source`: pathlib, builtin open, os/shutil file
  calls, np.save/savez/load on anything but an already opened file object."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
      if any(n.split(".")[0] in ("pathlib", "shutil") for n in names):
        found.append((node.lineno, "import pathlib/shutil"))
    if not isinstance(node, ast.Call):
      continue
    fn = node.func
    if isinstance(fn, ast.Name) and fn.id == "open":
      found.append((node.lineno, "open()"))
    if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name):
      owner, attr = fn.value.id, fn.attr
      if (owner, attr) in _LOCAL_ONLY or (owner, None) in _LOCAL_ONLY:
        found.append((node.lineno, f"{owner}.{attr}()"))
      if (owner in ("np", "numpy") and attr in ("save", "savez", "savez_compressed", "load")
          and node.args and not isinstance(node.args[0], (ast.Name, ast.Call))):
        found.append((node.lineno, f"{owner}.{attr}(path)"))
      if owner in ("np", "numpy") and attr == "load" and node.args and isinstance(
          node.args[0], ast.Name) and node.args[0].id == "path":
        found.append((node.lineno, "np.load(path)"))
  return found


def test_workdir_io_goes_through_paths():
  package = pathlib.Path(paths.__file__).parent
  offenders = {name: _bypasses((package / name).read_text()) for name in _WORKDIR_MODULES}
  assert not any(offenders.values()), offenders


def test_bypass_check_can_fail():
  bad = ("import pathlib\nf = open('x')\nos.makedirs('d')\nnp.savez(w / 'a.npz', a=1)\n"
         "np.load(path)\n")
  assert [line for line, _ in _bypasses(bad)] == [1, 2, 3, 4, 5]
  good = "with paths.open_file(p, 'wb') as f:\n  np.savez(f, a=1)\nx = np.load(io.BytesIO(b))\n"
  assert not _bypasses(good)
