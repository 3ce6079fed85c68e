"""uni_instruct_jax.bench: the CLI's JSON record (CPU smoke on configs/tiny.py, FLOP accounting),
the peak-FLOP/s table, and bf16 compute leaving the tiny config's loss curve unchanged."""

import json
import os
import pathlib
import runpy
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import shared_path
from uni_instruct_jax import bench
from uni_instruct_jax import parallel
from uni_instruct_jax import builders

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**network):
  config = runpy.run_path(str(ROOT / "configs" / "tiny.py"))["get_config"]()
  config.network.update(network)
  return config


def test_peak_flops_table():
  assert bench.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert bench.peak_flops("TPU v5 lite", "bfloat16") == 197e12
  assert bench.peak_flops("cpu", "float32") is None


@pytest.mark.slow
def test_bench_cli_smoke_on_tiny():
  proc = subprocess.run([sys.executable, "-m", "uni_instruct_jax.bench", "--config=configs/tiny.py",
                         "--steps=2", "--warmup=1"], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1, proc.stdout  # stdout is the JSON line; progress goes to stderr
  record = json.loads(lines[-1])
  assert "bench: compiling" in proc.stderr and "bench: 12/12 calls (100.0%)" in proc.stderr
  for key in ("sec_per_kimg", "images_per_sec", "sample_images_per_sec", "step_ms",
              "peak_memory_gb", "compute_dtype", "batch", "params_m", "devices", "device_kind",
              "flops_per_image", "mfu", "compiled_memory_gb", "flops_ratio",
              "analytic_fwd_equivalents", "xla_flops_ratio", "residual_memory_gb"):
    assert key in record, key
  assert record["batch"] == 8 and record["devices"] == 1 and record["device_kind"] == "cpu"
  assert record["compute_dtype"] == "float32" and record["mfu"] is None
  np.testing.assert_allclose(record["sec_per_kimg"] * record["images_per_sec"], 1000.0, rtol=1e-6)
  steps = record["step_ms"]
  assert set(steps) == {"fake_score", "generator", "iteration"}
  assert all(v > 0 for v in steps.values()) and record["sample_images_per_sec"] > 0
  # One network of the tiny config.
  nets, _, init_params = builders.build_image_nets(tiny_config())
  gen_params, _ = init_params(None)
  assert record["params_m"] == pytest.approx(
      sum(x.size for x in jax.tree.leaves(gen_params)) / 1e6)
  assert record["flops_per_image"] > 0 and record["compiled_memory_gb"] > 0
  # Every pass the iteration runs is in the accounting (docs/performance.md); the tiny config's
  # non-network work (losses, Adam, EMA) is ~5 % of its FLOPs.
  assert 11 < record["analytic_fwd_equivalents"] < 14
  assert 0.95 < record["xla_flops_ratio"] < 1.08
  assert record["peak_memory_gb"] is None or record["peak_memory_gb"] > 0


def test_remat_cuts_the_residuals_a_backward_pass_keeps():
  """residual_memory_gb (traced, no compile): 'block' keeps only the UNet blocks' inputs,
  'block_save_convs' also their convolution outputs; both well under no remat."""
  got = {}
  for remat in ("", "block", "block_save_convs"):
    config = tiny_config()
    config.network.remat = remat
    got[remat] = bench.benchmark(config, memory_only=True)["residual_memory_gb"]
  assert got["block"] < got["block_save_convs"] < 0.6 * got[""]


def _loss_curve(config, workdir, steps):
  run = builders.setup(config, str(workdir))
  state, curve = run.state, []
  for step in range(steps):
    batch = parallel.global_batch(run.mesh, run.dataset.next())
    state, metrics = run.step_fn(state, batch, run.frozen, step * config.training.batch_size)
    curve.append({k: float(metrics[k]) for k in ("loss_fake", "loss_gen", "loss_disc")})
  run.checkpointer.close()
  return curve


@pytest.mark.slow
def test_bfloat16_compute_keeps_the_tiny_loss_curve(tmp_path):
  """Eight steps (warm-up, SiD-only, Jeffreys + GAN) of configs/tiny.py on the shared JPEG zip:
  bf16 compute moves every loss by < 3 % of its scale along the fp32 curve."""
  zip_path = str(shared_path("data", "cifar10-test-jpeg.zip"))
  curves = {}
  for dtype in ("float32", "bfloat16"):
    config = tiny_config(dtype=dtype)
    config.data.path = zip_path
    curves[dtype] = _loss_curve(config, tmp_path / dtype, 8)
  for key in ("loss_fake", "loss_gen", "loss_disc"):
    f32 = np.asarray([c[key] for c in curves["float32"]])
    b16 = np.asarray([c[key] for c in curves["bfloat16"]])
    scale = np.abs(f32).max()
    assert scale > 0 and np.isfinite(b16).all(), key
    assert np.abs(b16 - f32).max() < 0.03 * scale, (key, f32, b16)
