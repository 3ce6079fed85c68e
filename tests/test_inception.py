"""FID InceptionV3: parity with pytorch-fid on rule-made weights, resizes, weight loading."""

import json
import os
import zipfile
import zlib

import jax
import numpy as np
import pytest

from conftest import shared_path
from uni_instruct_jax.evaluation import evaluate as eval_lib
from uni_instruct_jax.evaluation import fid as fid_lib
from uni_instruct_jax.evaluation import inception

FIXTURE = ("fixtures", "inception")


def rule_state_dict():
  """The fixture README's weight rule, rebuilt with NumPy."""
  shapes = json.loads(shared_path(*FIXTURE, "fid-inception-state-dict-shapes.json").read_text())
  sd = {}
  for name, shape in shapes.items():
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    if name.endswith("num_batches_tracked"):
      sd[name] = np.zeros(shape, np.int64)
      continue
    if "running_var" in name:
      value = rng.uniform(0.5, 1.5, shape)
    elif "running_mean" in name or name.endswith("bn.bias"):
      value = 0.1 * rng.standard_normal(shape)
    elif name.endswith("bn.weight"):
      value = 1 + 0.1 * rng.standard_normal(shape)
    elif name == "fc.bias":
      value = 0.01 * rng.standard_normal(shape)
    else:
      value = rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))
    sd[name] = np.asarray(value, np.float32)
  return sd


@pytest.fixture(scope="module")
def state_dict():
  return rule_state_dict()


@pytest.fixture(scope="module")
def variables(state_dict):
  return inception.params_from_torch_state_dict(state_dict)


def test_expected_names_match_pytorch_fid():
  shapes = json.loads(shared_path(*FIXTURE, "fid-inception-state-dict-shapes.json").read_text())
  assert inception.expected_state_dict_shapes() == {k: tuple(v) for k, v in shapes.items()}


@pytest.mark.parametrize("resolution", [32, 64])
def test_parity_with_pytorch_fid(variables, resolution):
  ref = np.load(shared_path(*FIXTURE, "fid-inception-rule-weights.npz"))
  pool3, logits, means = inception.features(variables, ref[f"images_{resolution}"],
                                            with_block_means=True)
  rel = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())
  errors = {"pool3": rel(pool3, ref[f"pool3_{resolution}"]),
            "logits": rel(logits, ref[f"logits_{resolution}"])}
  for i, mean in enumerate(means):
    errors[f"block{i}"] = rel(mean, ref[f"block{i}_channel_mean_{resolution}"])
  print(f"resolution {resolution}: max-abs error / max |ref| = {errors}")
  assert pool3.shape == (3, 2048) and logits.shape == (3, 1008)
  assert max(errors.values()) < 1e-3, errors


def test_pytorch_fid_resize_is_half_pixel_bilinear():
  """A ramp f(i) = i resizes to the clamped source coordinate; jax.image.resize agrees."""
  for size in (32, 64, 400):
    mat = inception.resize_matrix(size, 299, "pytorch-fid").astype(np.float64)
    src = np.clip((np.arange(299) + 0.5) * size / 299 - 0.5, 0, size - 1)
    np.testing.assert_allclose(mat @ np.arange(size), src, atol=1e-4)
    np.testing.assert_allclose(mat.sum(1), 1, atol=1e-6)
  img = np.random.default_rng(0).uniform(0, 255, (32, 32))
  mat = inception.resize_matrix(32, 299, "pytorch-fid")
  expected = jax.image.resize(img, (299, 299), "linear", antialias=False)
  np.testing.assert_allclose(mat @ img @ mat.T, expected, atol=1e-3)


def test_tf_resize_is_legacy_align_corners_false():
  """TF1 ResizeBilinear: source coordinate dst * in / out, upper neighbour clamped."""
  for size in (32, 64):
    mat = inception.resize_matrix(size, 299, "tf").astype(np.float64)
    np.testing.assert_allclose(mat @ np.arange(size),
                               np.minimum(np.arange(299) * size / 299, size - 1), atol=1e-4)
  np.testing.assert_allclose(inception.resize_matrix(299, 299, "tf"), np.eye(299))
  with pytest.raises(ValueError, match="resize_mode"):
    inception.resize_matrix(32, 299, "nearest")


def test_resize_modes_differ_by_measured_amount():
  diff = inception.resize_difference(32)
  print(f"tf vs pytorch-fid resize of random 32x32 uint8 noise: {diff}")
  assert 1 < diff["mean_abs"] < 60 and diff["max_abs"] <= 255
  assert diff["offset_input_pixels"] == pytest.approx(0.5 * (1 - 32 / 299))


def test_state_dict_errors_name_the_culprit(state_dict):
  bad = dict(state_dict)
  del bad["Mixed_6b.branch7x7_2.conv.weight"]
  bad["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
  bad["fc.bias"] = np.zeros(1000, np.float32)
  with pytest.raises(inception.InceptionWeightsError) as err:
    inception.params_from_torch_state_dict(bad)
  for culprit in ("Mixed_6b.branch7x7_2.conv.weight", "AuxLogits.fc.weight", "fc.bias"):
    assert culprit in str(err.value)
  nan = dict(state_dict, **{"Mixed_7c.branch_pool.bn.running_var": np.full(192, np.nan, np.float32)})
  with pytest.raises(inception.InceptionWeightsError, match="non-finite.*Mixed_7c.branch_pool"):
    inception.params_from_torch_state_dict(nan)


def test_bad_images_are_rejected():
  with pytest.raises(ValueError, match="uint8"):
    inception.check_images(np.zeros((2, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match="NHWC"):
    inception.check_images(np.zeros((2, 3, 32, 32), np.uint8))
  gray = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)
  np.testing.assert_array_equal(inception.check_images(gray), np.repeat(gray, 3, axis=-1))


def test_weight_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
    inception.load_inception_params(tmp_path / "absent.pth")
  garbage = tmp_path / "garbage.pth"
  garbage.write_bytes(b"not a torch file")
  with pytest.raises(ValueError, match="garbage.pth"):
    inception.load_inception_params(garbage)
  npz = tmp_path / "partial.npz"
  np.savez(npz, **{"fc.weight": np.zeros((1008, 2048), np.float32)})
  with pytest.raises(inception.InceptionWeightsError, match="missing"):
    inception.load_inception_params(npz)


@pytest.mark.slow
def test_real_weights_reproduce_edm_reference():
  """Opt-in: FID(lossless CIFAR-10 train, EDM's cifar10-32x32.npz) ~ 0 with the real weights.

  Set UNI_INSTRUCT_INCEPTION (pt_inception-2015-12-05-6726825d.pth), UNI_INSTRUCT_FID_REF
  (cifar10-32x32.npz) and UNI_INSTRUCT_CIFAR_ZIP (EDM's lossless cifar10-32x32.zip of PNGs).
  """
  paths = [os.environ.get(k) for k in ("UNI_INSTRUCT_INCEPTION", "UNI_INSTRUCT_FID_REF",
                                        "UNI_INSTRUCT_CIFAR_ZIP")]
  if not all(p and os.path.isfile(p) for p in paths):
    pytest.skip("real Inception weights / EDM reference / lossless CIFAR-10 zip not configured")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  weights, ref_path, zip_path = paths

  def batches():
    with zipfile.ZipFile(zip_path) as z:
      names = sorted(n for n in z.namelist() if n.lower().endswith(".png"))
      for i in range(0, len(names), 500):
        yield np.stack([np.asarray(Image.open(z.open(n)).convert("RGB")) for n in names[i:i + 500]])

  ref = fid_lib.load_statistics(ref_path)
  fids = {}
  for mode in inception.RESIZE_MODES:
    detector = eval_lib.load_detector("inception", weights, mode)
    stats = eval_lib.compute_statistics(detector, batches)
    fids[mode] = fid_lib.frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
  print(f"FID(train, cifar10-32x32.npz): {fids}")
  assert fids["tf"] < 0.05
