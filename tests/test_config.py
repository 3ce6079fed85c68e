"""Config schema (configs/default.py SCHEMA), validation, print_config, unknown keys, references."""

import math
import os
import pathlib
import runpy
import subprocess
import sys
import zipfile

import ml_collections
import numpy as np
import pytest

from uni_instruct_jax import config_schema
from uni_instruct_jax.evaluation import evaluate
from uni_instruct_jax.evaluation import fid
from uni_instruct_jax.evaluation import refs

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.py"))
SCHEMA, RULES = config_schema.load_schema()


def load(name="toy2d.py"):
  return runpy.run_path(str(ROOT / "configs" / name))["get_config"]()


def with_value(config, name, value):
  *sections, key = name.split(".")
  node = config
  for section in sections:
    node = node[section]
  with config.ignore_type():
    node[key] = value
  return config


def run_main(*args):
  return subprocess.run([sys.executable, "-m", "uni_instruct_jax.main", *args], cwd=ROOT,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                        text=True, timeout=300)


# ------------------------------------------------------------------------------------------------
# The schema covers every config


@pytest.mark.parametrize("name", CONFIGS)
def test_every_field_of_every_config_is_documented_and_valid(name):
  config = load(name)
  assert config_schema.undocumented(config) == []
  config_schema.validate(config)


def test_schema_entries_are_one_line_and_defaults_match_get_config():
  default = config_schema.leaves(load("default.py"))
  for name, field in SCHEMA.items():
    assert field.doc and "\n" not in field.doc, name
    if field.has_default:
      assert default[name] == field.default and field.error(field.default) is None, name
  assert set(r.name for r in RULES) <= set(SCHEMA)


def test_undocumented_field_is_reported():
  config = load("tiny.py")
  config.training.unlisted = 3
  assert config_schema.undocumented(config) == ["training.unlisted"]
  config_schema.validate(config)  # not an error at runtime


# ------------------------------------------------------------------------------------------------
# Validation: ranges, types, choices, rules


ISSUE_EXAMPLES = [  # issue 12 §3 and ckpt.keep=0 (§2)
    ("optim.lr", float("nan"), "(0, inf)"),
    ("ckpt.every_ticks", 0, "[1, inf)"),
    ("training.snapshot_ticks", 0, "[1, inf)"),
    ("training.sigma_init", float("nan"), "(0, inf)"),
    ("loss.tmax", -5, "(0, 1000]"),
    ("training.total_kimg", 0.0, "(0, inf)"),
    ("training.total_kimg", -1.0, "(0, inf)"),
    ("loss.overrides.ratio_clip", (4.0, 0.25), "0 < lo < hi"),
    ("optim.eps", -1.0, "(0, inf)"),
    ("ckpt.keep", 0, "[1, inf)"),
]


@pytest.mark.parametrize("name,value,valid", ISSUE_EXAMPLES)
def test_issue_examples_are_rejected_with_one_line_naming_the_key(name, value, valid):
  config = with_value(load(), name, value)
  with pytest.raises(config_schema.ConfigError) as info:
    config_schema.validate(config)
  message = str(info.value)
  assert "\n" not in message and f"config.{name}=" in message and valid in message
  assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name,value", [
    ("optim.lr", float("inf")), ("optim.gen_lr", 0.0), ("optim.b1", 1.0), ("optim.b2", -0.1),
    ("loss.tmax", 1001), ("loss.scale", float("nan")), ("training.batch_size", 0),
    ("training.batch_size", 8.0), ("training.batch_size", True), ("training.tick_kimg", -1.0),
    ("ema.halflife_kimg", 0.0), ("ema.rampup_ratio", float("nan")), ("seed", -1),
    ("eval.num_samples", 0), ("network.dtype", "float16"), ("loss.method", "gan"),
    ("loss.divergence", "kl"), ("teacher.source", "url"), ("data.prefetch", -1),
    ("network.kwargs.hidden", (128, 0)), ("network.kwargs.dropout", 1.0),
    ("fake_score.augment.p", 1.5), ("loss.overrides.ratio_clip", (0.0, 4.0)),
    ("loss.overrides.ratio_clip", (1.0, 1.0)), ("loss.overrides.ratio_clip", (0.1, 1.0, 2.0)),
    ("loss.overrides.ratio_clip", (0.1, float("nan"))), ("training.micro_batch_size", 100),
    ("training.micro_batch_size", 512), ("eval.num_samples", 2048), ("ckpt.keep", "3"),
])
def test_out_of_range_values_are_rejected(name, value):
  with pytest.raises(config_schema.ConfigError, match=f"config.{name}="):
    config_schema.validate(with_value(load(), name, value))


@pytest.mark.parametrize("name,value", [
    ("loss.tmax", 1000), ("loss.tmax", 1), ("ckpt.keep", 1), ("optim.b1", 0.0),
    ("optim.fake_grad_clip", 0.0), ("optim.lr", 3), ("training.micro_batch_size", 64),
    ("training.micro_batch_size", 0), ("loss.overrides.ratio_clip", [0.1, 20.0]),
    ("eval.num_samples", 2049), ("network.kwargs.hidden", (4,)),
])
def test_boundary_values_are_accepted(name, value):
  config_schema.validate(with_value(load(), name, value))


def test_proxy_detector_needs_only_more_samples_than_its_features():
  config = with_value(load(), "eval.detector", "proxy")
  config_schema.validate(with_value(config, "eval.num_samples", 65))
  with pytest.raises(config_schema.ConfigError, match="eval.num_samples=64"):
    config_schema.validate(with_value(config, "eval.num_samples", 64))


def test_interval_field_semantics():
  field = config_schema.Field(float, "x", "(0, inf]")
  assert field.error(math.inf) is None and field.error(1e-30) is None
  assert field.error(0.0) and field.error(math.nan) and field.error(-math.inf)
  assert config_schema.Field(1.0, "any finite or infinite number").error(math.nan)
  with pytest.raises(ValueError, match="not an interval"):
    config_schema.Field(1, "x", "1..3")


# ------------------------------------------------------------------------------------------------
# Printing and key suggestions


def test_describe_prints_every_field_with_description_and_range():
  config = load("tiny.py")
  config.optim.lr = 3e-4
  lines = config_schema.describe(config).splitlines()
  assert len(lines) == len(config_schema.leaves(config))
  lr = next(l for l in lines if l.startswith("optim.lr "))
  assert "= 0.0003" in lr and SCHEMA["optim.lr"].doc in lr and "(0, inf)" in lr
  assert not any("(undocumented)" in l for l in lines)


def test_closest_keys():
  config = load("tiny.py")
  assert config_schema.closest_keys("training.batchsize", config) == ["training.batch_size"]
  assert config_schema.closest_keys("trainin", config) == ["training"]
  assert config_schema.closest_keys("zzzz", config) == []


# ------------------------------------------------------------------------------------------------
# CLI


def test_cli_rejects_bad_values_before_touching_the_workdir(tmp_path):
  metrics = tmp_path / "metrics.jsonl"
  metrics.write_text('{"step": 2}\n')
  for override, valid in (("optim.lr=nan", "(0, inf)"), ("loss.tmax=-5", "(0, 1000]")):
    proc = run_main("--config=configs/toy2d.py", f"--workdir={tmp_path}", f"--config.{override}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    key = override.split("=")[0]
    assert len(lines) == 1 and lines[0].startswith(f"error: config.{key}=") and valid in lines[0]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
  assert metrics.read_text() == '{"step": 2}\n'


def test_cli_print_config_help_and_unknown_keys(tmp_path):
  proc = run_main("--config=configs/tiny.py", "--mode=print_config", "--config.optim.lr=0.002")
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert len(lines) == len(config_schema.leaves(load("tiny.py")))
  assert any(l.startswith("optim.lr = 0.002 ") and SCHEMA["optim.lr"].doc in l for l in lines)

  proc = run_main("--config=configs/tiny.py", "--config.training.batchsize=3")
  assert proc.returncode == 2 and proc.stderr.strip() == (
      "error: unknown config key 'training.batchsize'; did you mean 'training.batch_size'?")

  # A documented key the file does not set: say so, even where a similar key exists.
  proc = run_main("--config=configs/toy2d.py", "--config.loss.overrides.gan_weight=0")
  assert proc.returncode == 2 and proc.stderr.strip() == (
      "error: unknown config key 'loss.overrides.gan_weight' (documented, but configs/toy2d.py "
      "does not set it, so it cannot be overridden; set it in a config file)")

  proc = run_main("--config=configs/tiny.py")
  assert proc.returncode == 2
  assert proc.stderr.strip() == "error: --workdir is required for --mode=train"

  proc = run_main("--help")
  assert "print_config" in proc.stdout  # absl exits 1 after --help
  for mode in ("train", "sample", "eval", "ref"):
    assert mode in proc.stdout


# ------------------------------------------------------------------------------------------------
# Reference statistics checked before sampling


PROXY = evaluate.Detector("proxy", evaluate.PROXY_NAME, "proxy_fd_resnet56", 64, None, None)


def save_ref(path, dim=64, **metadata):
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(dim + 8, dim))
  fid.save_statistics(path, fid.FeatureStatistics(
      mu=feats.mean(0), sigma=np.cov(feats, rowvar=False), metadata=metadata))
  return path


def test_check_reference_accepts_matching_statistics(tmp_path):
  path = save_ref(tmp_path / "ref.npz", detector=evaluate.PROXY_NAME, resize_mode="none",
                  resolution=32)
  ref = refs.check_reference(path, PROXY, resolution=32)
  assert ref.mu.shape == (64,) and ref.metadata["resolution"] == 32
  edm_style = tmp_path / "edm.npz"
  np.savez(edm_style, mu=ref.mu, sigma=ref.sigma)  # no metadata: only the dimension is checked
  refs.check_reference(edm_style, PROXY, resolution=64)


def _bad_refs(tmp_path):
  good = save_ref(tmp_path / "good.npz")
  (tmp_path / "text.npz").write_text("not a zip\n")
  (tmp_path / "truncated.npz").write_bytes(good.read_bytes()[:200])
  np.save(tmp_path / "array.npy", np.zeros(3))
  np.savez(tmp_path / "nosigma.npz", mu=np.zeros(64))
  np.savez(tmp_path / "pickled.npz", mu=np.array([{}], dtype=object), sigma=np.eye(64))
  np.savez(tmp_path / "strings.npz", mu=np.array(["a"] * 64), sigma=np.eye(64))
  np.savez(tmp_path / "nan.npz", mu=np.full(64, np.nan), sigma=np.eye(64))
  np.savez(tmp_path / "meta.npz", mu=np.zeros(64), sigma=np.eye(64), meta_detector=np.zeros(3))
  with zipfile.ZipFile(tmp_path / "otherzip.npz", "w") as z:
    z.writestr("images/0.png", b"x")
  return {
      "": "is not a file", str(tmp_path / "absent.npz"): "is not a file",
      str(tmp_path): "is not a file", str(tmp_path / "text.npz"): "not a readable .npz",
      str(tmp_path / "truncated.npz"): "not a readable .npz",
      str(tmp_path / "array.npy"): "not a readable .npz",
      str(tmp_path / "nosigma.npz"): "lacks keys mu and sigma",
      str(tmp_path / "pickled.npz"): "not a readable .npz",
      str(tmp_path / "strings.npz"): "malformed", str(tmp_path / "nan.npz"): "NaN",
      str(tmp_path / "meta.npz"): "malformed", str(tmp_path / "otherzip.npz"): "lacks keys",
      str(save_ref(tmp_path / "dim.npz", dim=32)): "32-d features",
      str(save_ref(tmp_path / "det.npz", detector=evaluate.INCEPTION_NAME)): "detector=",
      str(save_ref(tmp_path / "res.npz", resolution=64)): "resolution=64",
  }


def test_check_reference_rejects_every_unusable_file_with_one_line(tmp_path):
  for path, expected in _bad_refs(tmp_path).items():
    with pytest.raises(fid.StatisticsError) as info:
      refs.check_reference(path, PROXY, resolution=32)
    message = str(info.value)
    assert expected in message and "\n" not in message, (path, message)
    assert message.startswith("config.eval.ref"), message


def test_replaced_sections_are_validated():
  # A section replaced by a plain dict (as configs do with network.kwargs) is checked too.
  config = load("tiny.py")
  config.network.kwargs = dict(img_resolution=8.5, img_channels=3)
  with pytest.raises(config_schema.ConfigError, match="network.kwargs.img_resolution=8.5"):
    config_schema.validate(config)
  assert isinstance(config.network.kwargs, ml_collections.ConfigDict)
