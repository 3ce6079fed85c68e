"""Shared pytest fixtures: the ../shared folder beside the project root."""

import os
import pathlib

import pytest

import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Persistent XLA cache shared by the tests and their subprocesses: the tiny-UNet steps compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "uni_instruct_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("UNI_INSTRUCT_SHARED", ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  """Path of ../shared; skips the test when it is absent."""
  if not SHARED.is_dir():
    pytest.skip(f"../shared not found at {SHARED} (set UNI_INSTRUCT_SHARED to its path)")
  return SHARED


def shared_path(*parts: str) -> pathlib.Path:
  """Path of a file under ../shared, skipping the calling test when it is absent."""
  path = SHARED.joinpath(*parts)
  if not path.exists():
    pytest.skip(f"shared file {path} not found (../shared beside the project root is needed)")
  return path


def set_config_value(config, path, value) -> None:
  """Sets config[path[0]]...[path[-1]] = value (path: the key's parts, e.g. ('loss', 'mode'))."""
  *parents, name = path
  node = config
  for part in parents:
    node = node[part]
  node[name] = value
