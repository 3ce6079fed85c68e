"""The evaluation API: ResNet56 proxy port, detectors, statistics, evaluate, references, JSON."""

import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from conftest import shared_path
from uni_instruct_jax.evaluation import evaluate as eval_lib
from uni_instruct_jax.evaluation import fid as fid_lib
from uni_instruct_jax.evaluation import proxy

BATCH = 100
PROXY_WEIGHTS = ("weights", "resnet56-cifar10-4bfd9763.th")


@pytest.fixture(scope="module")
def cifar_test():
  """500 random CIFAR-10 test JPEGs: uint8 [500, 32, 32, 3] and labels [500]."""
  with zipfile.ZipFile(shared_path("data", "cifar10-test-jpeg.zip")) as z:
    names = sorted(n for n in z.namelist() if n.endswith(".jpg"))
    picks = [names[i] for i in np.random.default_rng(0).choice(len(names), 500, replace=False)]
    images = np.stack([np.asarray(Image.open(io.BytesIO(z.read(n))).convert("RGB")) for n in picks])
  labels = np.array([proxy.CLASSES.index(n.split("/")[1]) for n in picks])
  return images, labels


@pytest.fixture(scope="module")
def proxy_detector():
  return eval_lib.load_detector("proxy", shared_path(*PROXY_WEIGHTS), resize_mode=None)


def batched(images):
  return [images[i:i + BATCH] for i in range(0, len(images), BATCH)]


def test_proxy_port_classifies_cifar10(cifar_test, proxy_detector):
  """Accuracy of the converted ResNet56 on 500 test JPEGs (about 81 % expected on these files)."""
  images, labels = cifar_test
  variables = proxy.load_proxy_params(shared_path(*PROXY_WEIGHTS))
  logits = np.concatenate([np.asarray(proxy.forward(variables, b)[1]) for b in batched(images)])
  accuracy = float(np.mean(logits.argmax(1) == labels))
  print(f"ResNet56 proxy accuracy on {len(images)} CIFAR-10 test JPEGs: {accuracy:.3f}")
  assert accuracy > 0.70
  feats, no_logits = proxy_detector(images[:BATCH])
  assert feats.shape == (BATCH, 64) and no_logits is None


def test_proxy_state_dict_errors():
  sd = {f"module.{k}": np.zeros(v, np.float32) for k, v in proxy.expected_state_dict_shapes().items()}
  proxy.params_from_torch_state_dict(sd)
  del sd["module.layer2.0.conv1.weight"]
  sd["module.linear.weight"] = np.zeros((100, 64), np.float32)
  with pytest.raises(ValueError, match=r"layer2\.0\.conv1\.weight.*linear\.weight"):
    proxy.params_from_torch_state_dict(sd)


def test_missing_inception_weights_say_where_to_get_them(tmp_path):
  for path in (None, tmp_path / "absent.pth"):
    with pytest.raises(eval_lib.InceptionWeightsMissing) as err:
      eval_lib.load_detector("inception", path)
    message = str(err.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in message and "--config.eval.detector" in message
  with pytest.raises(ValueError, match="detector kind"):
    eval_lib.load_detector("vgg16", None)
  with pytest.raises(ValueError, match="resize_mode"):
    eval_lib.load_detector("inception", None, resize_mode="area")


def test_proxy_reference_and_evaluation(tmp_path, cifar_test, proxy_detector):
  """Reference on 250 test images; another 250 score far lower than noise. Never called FID."""
  images, _ = cifar_test
  ref_path = tmp_path / "cifar10-test-proxy_resnet56.npz"
  with pytest.raises(ValueError, match="not FID"):
    eval_lib.make_reference(proxy_detector, batched(images[:250]), tmp_path / "fid-ref.npz")
  ref = eval_lib.make_reference(proxy_detector, batched(images[:250]), ref_path)
  assert ref.metadata == {"detector": "proxy_resnet56", "resize_mode": "none", "resolution": 32}
  real = eval_lib.evaluate(proxy_detector, lambda: iter(batched(images[250:])), 250, ref_path)
  noise = np.random.default_rng(0).integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8)
  fake = eval_lib.evaluate(proxy_detector, batched(noise), BATCH, ref_path)
  print(f"proxy_fd_resnet56: held-out real {real['proxy_fd_resnet56']:.3f}, "
        f"noise {fake['proxy_fd_resnet56']:.3f}")
  assert real["fid"] is None and real["metric"] == "proxy_fd_resnet56"
  assert 0 < 5 * real["proxy_fd_resnet56"] < fake["proxy_fd_resnet56"]
  path = eval_lib.write_eval_json(tmp_path / "w", 1200, real)
  assert path.name == "eval-proxy_fd_resnet56-001200.json"
  assert "fid" not in json.dumps({k: v for k, v in real.items() if v is not None and k != "ref"})
  with pytest.raises(fid_lib.StatisticsError, match="resolution"):
    eval_lib.evaluate(proxy_detector, batched(images[:BATCH, ::2, ::2]), BATCH, ref_path)


def fake_inception(dim=16, classes=10):
  """An 'inception'-kind Detector with cheap features: a fixed projection of pixel means."""
  proj = np.random.default_rng(0).standard_normal((3 * 4, dim))

  def apply(images):
    x = images.astype(np.float64) / 255
    h, w = x.shape[1] // 2, x.shape[2] // 2
    quads = [x[:, :h, :w], x[:, :h, w:], x[:, h:, :w], x[:, h:, w:]]
    feats = np.concatenate([q.mean((1, 2)) for q in quads], axis=1) @ proj
    return feats.astype(np.float32), feats[:, :classes].astype(np.float32)

  return eval_lib.Detector("inception", eval_lib.INCEPTION_NAME, "fid", dim, "tf", apply)


def test_evaluate_contract_keys_and_json(tmp_path):
  detector = fake_inception()
  rng = np.random.default_rng(1)
  draw = lambda high: rng.integers(0, high, (400, 8, 8, 3), dtype=np.uint8)
  ref_path = tmp_path / "ref.npz"
  eval_lib.make_reference(detector, batched(draw(256)), ref_path)
  result = eval_lib.evaluate(detector, batched(draw(256)), 250, ref_path, kid_subsets=10)
  darker = eval_lib.evaluate(detector, batched(draw(200)), 250, ref_path, kid_subsets=10)
  assert set(result) == {"fid", "is_mean", "is_std", "kid", "precision", "recall", "num_samples",
                         "detector", "resize_mode", "ref", "metric"}
  assert result["num_samples"] == 250 and result["detector"] == "inception-2015-12-05"
  assert result["resize_mode"] == "tf" and result["ref"] == str(ref_path)
  assert 0 <= 10 * result["fid"] < darker["fid"] and abs(10 * result["kid"]) < darker["kid"]
  assert result["precision"] > 0.5 > darker["precision"] and result["recall"] > 0.5
  assert result["is_mean"] >= 1 and result["is_std"] >= 0
  for kimg in (0, 500):
    path = eval_lib.write_eval_json(tmp_path / "w", kimg, result)
  assert path.name == "eval-000500.json" and json.loads(path.read_text()) == result
  lines = (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["kimg"] for line in lines] == [0, 500]


def test_edm_style_reference_without_features(tmp_path):
  """EDM fid-refs hold only mu and sigma: FID and IS, but kid/precision/recall are None."""
  detector = fake_inception()
  data = np.random.default_rng(2).integers(0, 256, (100, 8, 8, 1), dtype=np.uint8)  # grayscale
  stats = eval_lib.compute_statistics(detector, batched(data))
  np.savez(tmp_path / "edm.npz", mu=stats.mu, sigma=stats.sigma)
  result = eval_lib.evaluate(detector, batched(data), 100, tmp_path / "edm.npz")
  assert result["fid"] == pytest.approx(0, abs=1e-6)
  assert result["kid"] is None and result["precision"] is None and result["is_mean"] > 1


def test_bad_inputs(tmp_path):
  detector = fake_inception()
  rng = np.random.default_rng(3)
  data = rng.integers(0, 256, (200, 8, 8, 3), dtype=np.uint8)
  with pytest.raises(ValueError, match="uint8"):
    eval_lib.compute_statistics(detector, [data.astype(np.float32) / 255])
  with pytest.raises(fid_lib.StatisticsError, match="only 200 of the 300"):
    eval_lib.compute_statistics(detector, batched(data), 300)
  with pytest.raises(fid_lib.StatisticsError, match="full-rank"):
    eval_lib.compute_statistics(detector, batched(data[:16]))
  np.savez(tmp_path / "wide.npz", mu=np.zeros(2048), sigma=np.eye(2048))
  with pytest.raises(fid_lib.StatisticsError, match="2048-d features"):
    eval_lib.evaluate(detector, batched(data), 200, tmp_path / "wide.npz")
  ref = eval_lib.make_reference(detector, batched(data), tmp_path / "ref.npz")
  ref.metadata["resize_mode"] = "pytorch-fid"
  fid_lib.save_statistics(tmp_path / "other-resize.npz", ref)
  with pytest.raises(fid_lib.StatisticsError, match="resize_mode='pytorch-fid'"):
    eval_lib.evaluate(detector, batched(data), 200, tmp_path / "other-resize.npz")
  with pytest.raises(ValueError, match="kimg"):
    eval_lib.eval_json_name(-1, {"metric": "fid"})
