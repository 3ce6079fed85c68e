"""uni_instruct_jax.paths: workdir I/O on local paths and on gs:// (an in-memory fake GCS)."""

import importlib

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
