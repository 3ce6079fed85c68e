"""The trainer: configs, one-line bad-input errors, step semantics, tiny image runs (shared JPEG
zip and mock tfds), and 1 vs 8 devices."""

import dataclasses
import json
import os
import pathlib
import runpy
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from conftest import shared_path
from uni_instruct_jax import builders
from uni_instruct_jax import steps
from uni_instruct_jax import train
from uni_instruct_jax import train_state as ts

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ALL_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.py"))


def load_config(name, **overrides):
  config = runpy.run_path(str(CONFIGS / name))["get_config"]()
  for key, value in overrides.items():
    section, field = key.split("__")
    config[section][field] = value
  return config


def run_main(*args, env=None, timeout=900):
  return subprocess.run([sys.executable, "-m", "uni_instruct_jax.main", *args], cwd=ROOT,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})),
                        capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_every_config_loads_and_serialises(name):
  config = load_config(name)
  for section in ("training", "data", "teacher", "network", "loss", "optim", "ema", "ckpt", "eval"):
    assert section in config, section
  json.loads(config.to_json_best_effort())
  builders.parse_schedule(config.loss)
  steps.phase_options(steps.StepConfig(
      batch_size=8, num_micro=1, sigma_init=2.5, warmup_images=0, sid_images=0,
      schedule=builders.parse_schedule(config.loss), method=config.loss.method,
      mode=config.loss.mode, tmax=800, loss_scale=100.0,
      option_overrides=tuple(sorted(config.loss.overrides.to_dict().items())),
      fake_grad_clip=1.0, ema_halflife_kimg=500.0, ema_rampup=0.05))


def test_cifar10_configs_reproduce_the_published_recipe():
  for name, divergence, labels in (("cifar10.py", "jeffreys", False),
                                   ("cifar10_cond.py", "forward_kl", True)):
    c = load_config(name)
    assert (c.training.batch_size, c.training.sigma_init, c.loss.tmax) == (256, 2.5, 800)
    assert (c.optim.lr, c.optim.gen_lr, c.optim.b1, c.optim.b2, c.optim.eps) == (
        1e-5, 1e-5, 0.0, 0.999, 1e-8)
    assert (c.ema.halflife_kimg, c.ema.rampup_ratio) == (500.0, 0.05)
    assert (c.loss.warmup_kimg, c.loss.sid_kimg, c.optim.fake_grad_clip) == (100.0, 200.0, 1.0)
    assert c.network.kwargs.dropout == 0.13
    assert (c.loss.mode, c.loss.divergence, c.data.use_labels) == ("official", divergence, labels)
    assert c.fake_score.augment.enabled and c.fake_score.augment.p == 0.12
    official = steps.phase_options(steps.StepConfig(
        8, 1, 2.5, 0, 0, builders.parse_schedule(c.loss), c.loss.method, c.loss.mode, 800, 100.0,
        tuple(sorted(c.loss.overrides.to_dict().items())), 1.0, 500.0, 0.05))[1]
    assert official["mode"] == "official" and official["gan_weight"] > 0


def test_imagenet64_config():
  c = load_config("imagenet64.py")
  assert c.training.batch_size == 8192 and 0 < c.training.micro_batch_size < 8192
  assert c.training.batch_size % c.training.micro_batch_size == 0
  assert c.optim.lr == c.optim.gen_lr == 4e-6
  assert c.network.dtype == "bfloat16" and c.loss.divergence == "forward_kl"
  schedule = builders.parse_schedule(load_config("imagenet64.py", loss__schedule=
                                              "0:reverse_kl,20000:forward_kl").loss)
  assert schedule == ((0, "reverse_kl"), (20_000_000, "forward_kl"))


def test_schedule_rejects_bad_entries():
  for bad in ("0:nope", "abc", "x:reverse_kl"):
    with pytest.raises(builders.SetupError):
      builders.parse_schedule(load_config("cifar10.py", loss__schedule=bad).loss)


@pytest.mark.parametrize("method,expect", [
    ("sid", dict(mode="official", alpha=1.2, gan_weight=0.0, divergence="reverse_kl")),
    ("sida", dict(mode="official", alpha=1.0, divergence="reverse_kl")),
    ("diff_instruct", dict(mode="di")),
    ("dmd", dict(mode="di", normalize=True)),
    ("f_distill", dict(mode="di")),
])
def test_special_cases_are_selectable_by_config(method, expect):
  c = load_config("cifar10.py", loss__method=method)
  opts = steps.phase_options(steps.StepConfig(
      8, 1, 2.5, 0, 0, builders.parse_schedule(c.loss), c.loss.method, c.loss.mode, 800, 100.0,
      (), 1.0, 500.0, 0.05))[1]
  for key, value in expect.items():
    assert opts[key] == value, (key, opts[key])
  if method == "sida":
    assert opts["gan_weight"] > 0


# ------------------------------------------------------------------------------------------------
# Bad input: one `error:` line on stderr, exit code 2, nothing already written lost


def _bad_input_cases():
  zip_path = str(shared_path("data", "cifar10-test-jpeg.zip"))
  ddpmpp = str(shared_path("fixtures", "edm", "ddpmpp-tiny-uncond.pkl"))   # 16x16, uncond
  adm = str(shared_path("fixtures", "edm", "adm-tiny-cond.pkl"))           # 16x16, 10 classes
  tiny = "--config=configs/tiny.py"
  return {
      "unknown config key": ([tiny, "--config.training.no_such_key=1"], "no_such_key"),
      "missing config file": (["--config=configs/no_such_config.py"], "no_such_config"),
      "missing teacher": (["--config=configs/cifar10.py", f"--config.data.path={zip_path}",
                           "--config.data.source=folder",
                           "--config.teacher.path=/no/such/edm.pkl"], "/no/such/edm.pkl"),
      "missing data": ([tiny, "--config.data.path=/no/such/data.zip"], "/no/such/data.zip"),
      "resolution mismatch": ([tiny, f"--config.data.path={zip_path}",
                               "--config.teacher.source=pkl", f"--config.teacher.path={ddpmpp}"],
                              "16x16x3"),
      "label mismatch": ([tiny, f"--config.data.path={zip_path}", "--config.data.resolution=16",
                          "--config.data.use_labels=False", "--config.teacher.source=pkl",
                          f"--config.teacher.path={adm}"], "label_dim"),
  }


@pytest.mark.parametrize("case", ["unknown config key", "missing config file", "missing teacher",
                                  "missing data", "resolution mismatch", "label mismatch"])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path):
  args, needle = _bad_input_cases()[case]
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text('{"step": 1}\n')
  proc = run_main(*args, f"--workdir={workdir}", timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith("error: ")]
  assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr[-2000:]
  assert needle in errors[0]
  assert "Traceback" not in proc.stderr
  assert sorted(p.name for p in workdir.iterdir()) == ["metrics.jsonl"]
  assert (workdir / "metrics.jsonl").read_text() == '{"step": 1}\n'


# ------------------------------------------------------------------------------------------------
# Teacher sources and SiD-init


def test_teacher_sources_and_sid_init(tmp_path):
  from uni_instruct_jax import checkpoint
  from uni_instruct_jax.convert import convert_edm_pickle
  pkl = str(shared_path("fixtures", "edm", "ddpmpp-tiny-uncond.pkl"))
  fake_pkl = str(shared_path("fixtures", "sid_loss", "fake-tiny-uncond.pkl"))
  _, variables, metadata = convert_edm_pickle(pkl)
  converted = checkpoint.save_teacher(tmp_path / "teacher", variables, metadata)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  sigma = jnp.asarray([0.5, 3.0])
  outputs = {}
  for source, path in (("pkl", pkl), ("converted", str(converted))):
    config = load_config("cifar10.py", teacher__source=source, teacher__path=path)
    nets, frozen, init_params = builders.build_image_nets(config)
    assert nets.data_shape == (16, 16, 3) and nets.label_dim == 0
    outputs[source] = nets.teacher(frozen["teacher"], x, sigma, None)
    gen, fake = init_params(None)
    assert _max_diff(gen, frozen["teacher"]["params"]) == 0.0 == _max_diff(fake, gen)
  np.testing.assert_array_equal(outputs["pkl"], outputs["converted"])
  # SiD-init: the generator starts from the given network, the fake score from the teacher.
  config = load_config("cifar10.py", teacher__path=pkl, generator__init="sid",
                       generator__sid_path=fake_pkl)
  _, frozen, init_params = builders.build_image_nets(config)
  gen, fake = init_params(None)
  assert _max_diff(fake, frozen["teacher"]["params"]) == 0.0 < _max_diff(gen, fake)
  # An architecture mismatch and a bad init name are setup errors.
  config = load_config("cifar10.py", teacher__path=pkl, generator__init="sid",
                       generator__sid_path=str(shared_path("fixtures", "edm", "adm-tiny-cond.pkl")))
  with pytest.raises(builders.SetupError, match="architecture"):
    builders.build_image_nets(config)
  with pytest.raises(builders.SetupError, match="generator.init"):
    builders.build_image_nets(load_config("cifar10.py", teacher__path=pkl, generator__init="x"))


# ------------------------------------------------------------------------------------------------
# Step semantics (toy nets: cheap)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
  config = load_config("toy2d.py", teacher__fit_steps=10, training__batch_size=64)
  return builders.setup(config, str(tmp_path_factory.mktemp("toy")))


def _max_diff(a, b):
  return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_phase_at_selects_warmup_sid_and_each_schedule_entry():
  cfg = steps.StepConfig(64, 1, 2.5, warmup_images=100, sid_images=200,
                         schedule=((0, "reverse_kl"), (300, "forward_kl"), (500, "jeffreys")),
                         method="uni_instruct", mode="exact", tmax=800, loss_scale=1.0,
                         option_overrides=(), fake_grad_clip=1.0, ema_halflife_kimg=500.0,
                         ema_rampup=0.05)
  phases = [steps.phase_at(n, cfg) for n in (0, 99, 100, 199, 200, 299, 300, 499, 500, 10 ** 9)]
  assert phases == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
  late_start = dataclasses.replace(cfg, schedule=((1000, "reverse_kl"),))
  assert [steps.phase_at(n, late_start) for n in (200, 999, 1000)] == [1, 1, 2]


def test_warmup_step_trains_only_the_fake_score_and_updates_ema(toy_run):
  run = toy_run
  batch = {k: jnp.asarray(v) for k, v in run.dataset.next().items()}
  state0 = jax.device_get(run.state)  # host copy: the step donates its input buffers
  state1, metrics = run.step_fn(jax.tree.map(jnp.asarray, state0), batch, run.frozen, 0)
  assert float(metrics["generator_phase"]) == 0.0
  assert _max_diff(state1.gen_params, state0.gen_params) == 0.0
  assert _max_diff(state1.fake_params, state0.fake_params) > 0.0
  assert int(state1.step) == 1 and int(state1.images_seen) == 64
  beta = 0.5 ** (64 / min(run.config.ema.halflife_kimg * 1000, run.config.ema.rampup_ratio * 64))
  np.testing.assert_allclose(float(metrics["ema_beta"]), beta, rtol=1e-6)
  expected = jax.tree.map(lambda e, g: beta * e + (1 - beta) * g, state0.ema_params,
                          state1.gen_params)
  assert _max_diff(state1.ema_params, expected) < 1e-6

  # Past the warm-up and the SiD-only phase the generator moves, and the phase index says so.
  late = jax.tree.map(jnp.asarray, state0).replace(images_seen=jnp.asarray(10 ** 6, jnp.int32))
  state2, metrics2 = run.step_fn(late, batch, run.frozen, 10 ** 6)
  assert float(metrics2["generator_phase"]) == 2.0
  assert _max_diff(state2.gen_params, state0.gen_params) > 0.0
  assert np.isfinite(float(metrics2["loss_gen"]))


@pytest.mark.slow
def test_one_compilation_per_phase_run(tmp_path):
  """A toy run through warm-up, SiD-only and two schedule entries compiles 5 step programs: the
  fake-score update once, and the generator update (EMA and step advance only in the warm-up)
  once per phase."""
  config = load_config("toy2d.py", teacher__fit_steps=10, training__batch_size=64,
                       network__kwargs=dict(hidden=(32,), emb_channels=16, dropout=0.0),
                       training__total_kimg=0.512, training__tick_kimg=0.256,
                       loss__warmup_kimg=0.064, loss__sid_kimg=0.128,
                       loss__schedule="0:reverse_kl,0.256:forward_kl")
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["steps"] == 8 and summary["compilations"] == 1 + 4
  phases = [json.loads(l)["generator_phase"]
            for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert phases == [(0 + 1 + 2 + 2) / 4, 3.0]


def test_gradient_accumulation_equals_the_full_batch_mean():
  params = {"w": jnp.arange(3.0)}
  batch = {"x": jnp.arange(24.0).reshape(8, 3)}

  def grad_fn(p, mb, key):
    del key
    g = jax.grad(lambda q: jnp.mean((mb["x"] @ q["w"]) ** 2))(p)
    return g, {"n": jnp.asarray(mb["x"].shape[0], jnp.float32)}

  full = steps._accumulate(grad_fn, params, batch, jax.random.key(0), 1)
  micro = steps._accumulate(grad_fn, params, batch, jax.random.key(0), 4)
  np.testing.assert_allclose(micro[0]["w"], full[0]["w"], rtol=1e-6)
  assert float(micro[1]["n"]) == 2.0


def test_ema_beta_follows_the_half_life():
  beta = ts.ema_beta(256, jnp.asarray(10 ** 7), 500.0, 0.05)
  np.testing.assert_allclose(float(beta) ** (500_000 / 256), 0.5, rtol=1e-4)
  ramp = ts.ema_beta(256, jnp.asarray(51_200), 500.0, 0.05)  # half-life 2,560 images
  np.testing.assert_allclose(float(ramp), 0.5 ** 0.1, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Tiny image runs


@pytest.mark.slow
def test_tiny_run_on_shared_jpeg_zip(tmp_path):
  zip_path = shared_path("data", "cifar10-test-jpeg.zip")
  args = ["--config=configs/tiny.py", f"--workdir={tmp_path}", f"--config.data.path={zip_path}"]
  proc = run_main(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [2, 4]
  # Tick means of the per-step phase: (warm-up 0 + SiD-only 1) / 2, then Jeffreys + GAN (2) twice.
  assert [r["generator_phase"] for r in records] == [0.5, 2.0]
  for r in records:
    assert np.isfinite([r["loss_fake"], r["loss_gen"], r["loss_disc"]]).all()
    assert r["nan_samples"] == 0
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["steps"] == 4 and summary["resumed_from_step"] == 0
  assert (tmp_path / "checkpoints" / "4").is_dir()
  assert (tmp_path / "fakes_init.png").stat().st_size > 0
  assert json.loads((tmp_path / "config.json").read_text())["data"]["path"] == str(zip_path)
  # The same command on a finished run changes nothing and exits 0.
  again = run_main(*args)
  assert again.returncode == 0 and "already finished" in again.stdout
  assert json.loads((tmp_path / "summary.json").read_text()) == summary

  # --mode=sample: EMA samples of the latest checkpoint.
  proc = run_main(*args, "--mode=sample")
  assert proc.returncode == 0, proc.stderr[-3000:]
  samples = np.load(tmp_path / "samples-00000004.npz")["samples"]
  assert samples.shape == (4, 8, 8, 3) and np.isfinite(samples).all()
  assert (tmp_path / "samples-00000004.png").stat().st_size > 0
  # --config.sample.outdir: one PNG per seed in EDM generate.py's layout, labels in dataset.json.
  folder = tmp_path / "fid"
  proc = run_main(*args, "--mode=sample", f"--config.sample.outdir={folder}",
                  "--config.sample.num_samples=5", "--config.sample.batch_size=4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  labels = json.loads((folder / "dataset.json").read_text())["labels"]
  assert [name for name, _ in labels] == [f"000000/{i:06d}.png" for i in range(5)]
  assert all(0 <= c < 10 for _, c in labels) and "sample: 5/5 images" in proc.stderr
  assert np.asarray(PIL.Image.open(folder / "000000" / "000004.png")).shape == (8, 8, 3)
  proc = run_main(*args, "--mode=sample", f"--config.sample.outdir={folder}")
  assert proc.returncode == 2 and "not an empty directory" in proc.stderr.splitlines()[-1]

  # --mode=ref, then --mode=eval, with the ResNet56 proxy (labelled as not-FID everywhere).
  proxy = ["--config.eval.detector=proxy",
           f"--config.eval.detector_path={shared_path('weights', 'resnet56-cifar10-4bfd9763.th')}",
           "--config.eval.batch_size=128"]
  proc = run_main(*args, "--mode=ref", *proxy, "--config.data.max_size=512")
  assert proc.returncode == 0, proc.stderr[-3000:]
  ref = tmp_path / "proxy_resnet56-ref.npz"
  assert ref.is_file() and "ref: 512/512 images" in proc.stderr
  proc = run_main(*args, "--mode=eval", *proxy, f"--config.eval.ref={ref}",
                  "--config.eval.num_samples=256")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / "eval-proxy_fd_resnet56-000000.json").read_text())
  for key in ("fid", "is_mean", "is_std", "kid", "precision", "recall", "num_samples", "detector",
              "resize_mode", "ref"):
    assert key in result, key
  assert result["fid"] is None and result["proxy_fd_resnet56"] > 0
  assert result["num_samples"] == 256 and result["detector"] == "proxy_resnet56"
  assert "eval: 256/256 images" in proc.stderr
  last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
  assert last["proxy_fd_resnet56"] == result["proxy_fd_resnet56"]
  # Without the Inception weights the FID evaluation stops with one line saying where to get them.
  proc = run_main(*args, "--mode=eval", f"--config.eval.ref={ref}")
  assert proc.returncode == 2 and "pt_inception-2015-12-05" in proc.stderr.splitlines()[-1]

  # Evaluation during training: every tick, the best state kept besides the latest ones.
  fid_dir = tmp_path / "with_eval"
  proc = run_main("--config=configs/tiny.py", f"--workdir={fid_dir}",
                  f"--config.data.path={zip_path}", *proxy, "--config.eval.every_ticks=1",
                  f"--config.eval.ref={ref}", "--config.eval.num_samples=128")
  assert proc.returncode == 0, proc.stderr[-3000:]
  evals = [json.loads(l) for l in (fid_dir / "metrics.jsonl").read_text().splitlines()
           if "proxy_fd_resnet56" in l]
  assert len(evals) == 2 and all(e["proxy_fd_resnet56"] > 0 for e in evals)
  best = [p.name for p in (fid_dir / "checkpoints-best").iterdir() if p.name.isdigit()]
  assert len(best) == 1 and int(best[0]) in (2, 4)
  assert (fid_dir / "checkpoints" / "4").is_dir()


@pytest.mark.slow
def test_tiny_run_on_mock_tfds(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  config = load_config("tiny.py", data__source="tfds", data__tfds_name="cifar10",
                       data__tfds_download=False, training__total_kimg=0.016)
  with tfds.testing.mock_data(num_examples=32):
    summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["steps"] == 2
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [2] and np.isfinite(records[0]["loss_fake"])


_DEVICE_SCRIPT = """
import json, sys
import jax, numpy as np, runpy
from uni_instruct_jax import builders, train
config = runpy.run_path('configs/tiny.py')['get_config']()
config.data.path = sys.argv[2]
config.mesh.model_parallelism = int(sys.argv[3])
summary = train.train_and_evaluate(config, sys.argv[1])
run = builders.setup(config, sys.argv[1])
leaves = {jax.tree_util.keystr(p): np.asarray(v) for p, v in
          jax.tree_util.tree_flatten_with_path((run.state.ema_params, run.state.fake_params))[0]}
np.savez(sys.argv[1] + '/final.npz', **leaves)
print(json.dumps({'devices': jax.device_count()}))
"""


@pytest.mark.slow
def test_one_and_eight_devices_agree(tmp_path):
  """The tiny run on 1 device, on 8 (batch split), and on 4 x 2 (parameters sharded too)."""
  zip_path = str(shared_path("data", "cifar10-test-jpeg.zip"))
  results = {}
  # (devices, model_parallelism): 1 device; 8 on 'data'; 4 on 'data' x 2 sharding parameters.
  for devices, model in ((1, 1), (8, 1), (8, 2)):
    workdir = tmp_path / f"d{devices}m{model}"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.run([sys.executable, "-c", _DEVICE_SCRIPT, str(workdir), zip_path,
                           str(model)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["devices"] == devices
    metrics = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    results[devices, model] = (dict(np.load(workdir / "final.npz")), metrics)
  p1, m1 = results[1, 1]
  for other in ((8, 1), (8, 2)):
    p8, m8 = results[other]
    assert p1.keys() == p8.keys()
    for key in p1:
      np.testing.assert_allclose(p8[key], p1[key], rtol=1e-4, atol=1e-4, err_msg=f"{other} {key}")
    for r1, r8 in zip(m1, m8):
      for key in ("loss_fake", "loss_gen", "loss_disc", "r_mean", "w_f_mean"):
        np.testing.assert_allclose(r8[key], r1[key], rtol=1e-3, atol=1e-5, err_msg=f"{other} {key}")
