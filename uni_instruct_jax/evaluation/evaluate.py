"""High-level evaluation API used by the CLI (`--mode=eval|ref`) and the trainer.

    detector = load_detector("inception", "pt_inception-2015-12-05-6726825d.pth", "tf")
    result = evaluate(detector, sample_batches, 50_000, "cifar10-32x32.npz")
    write_eval_json(workdir, kimg, result)

Batches are this process's uint8 NHWC arrays [n, H, W, 1|3] (grayscale is repeated to RGB); on
multi-host runs every process feeds batches of equal size and all hosts get the same result.

Result keys (`evaluate`): fid, is_mean, is_std, kid, precision, recall, num_samples, detector,
resize_mode, ref, and `metric` (the key of the headline number; best-snapshot selection minimises
it). With the ResNet56 proxy the headline is `proxy_fd_resnet56` (NOT FID) and fid, is_mean,
is_std, kid, precision, recall are None. kid/precision/recall need reference features, which EDM's
fid-refs lack (mu, sigma only): they are None then; `make_reference` stores a subset.
"""

import dataclasses
import functools
import json
import time
from typing import Any, Callable, Iterable, Optional, Union

import jax
import numpy as np
from absl import logging
from etils import epath

from uni_instruct_jax import parallel
from uni_instruct_jax import paths
from uni_instruct_jax.evaluation import fid as fid_lib
from uni_instruct_jax.evaluation import inception
from uni_instruct_jax.evaluation import proxy

INCEPTION_NAME = "inception-2015-12-05"
PROXY_NAME = "proxy_resnet56"
Batches = Union[Iterable[np.ndarray], Callable[[], Iterable[np.ndarray]]]


class InceptionWeightsMissing(FileNotFoundError):
  """The FID Inception weights were not given or not found."""


def _missing_weights_message(path) -> str:
  where = "no path was given" if not path else f"{path} does not exist"
  return (f"FID Inception weights needed but {where}. Download pytorch-fid's "
          f"{inception.PYTORCH_FID_WEIGHTS_URL} (the TF 2015-12-05 graph's weights; read without "
          "torch) and pass its path with --config.eval.detector_path=PATH. Accepted: that .pth (either "
          "torch.save format) or an .npz of the same state dict. Not accepted: StyleGAN/EDM's "
          "inception-2015-12-05.pkl / .pt (TorchScript code, different parameter names); use "
          "resize_mode='tf' with the .pth to reproduce that detector. For local demos only: "
          "detector 'proxy' with ../shared/weights/resnet56-cifar10-*.th (not FID).")


@dataclasses.dataclass(frozen=True)
class Detector:
  """A feature network: local uint8 batch -> (features [N, D], logits without bias [N, C] | None).

  name: 'inception-2015-12-05' or 'proxy_resnet56'; metric: the headline result key ('fid' or
  'proxy_fd_resnet56'); resize_mode: Inception preprocessing ('tf' | 'pytorch-fid'), None for the
  proxy. Calling it returns numpy arrays gathered over all processes (process-major).
  """
  kind: str
  name: str
  metric: str
  feature_dim: int
  resize_mode: Optional[str]
  apply: Callable[[np.ndarray], tuple]

  def __call__(self, images) -> tuple:
    return self.apply(inception.check_images(images))


def load_detector(kind: str, path=None, resize_mode: Optional[str] = "tf", mesh=None) -> Detector:
  """Builds the 'inception' (FID) or 'proxy' (CIFAR-10 ResNet56, not FID) detector.

  path: weights file (pytorch-fid .pth / .npz, or the ResNet56 .th); resize_mode: 'tf' reproduces
  EDM/StyleGAN/Uni-Instruct numbers, 'pytorch-fid' pytorch-fid's; ignored for the proxy.
  mesh: default `parallel.make_mesh()`.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  if kind == "inception":
    if resize_mode not in inception.RESIZE_MODES:
      raise ValueError(f"resize_mode must be one of {inception.RESIZE_MODES}, got {resize_mode!r}")
    if not path or not paths.workdir_path(path).is_file():
      raise InceptionWeightsMissing(_missing_weights_message(path))
    variables = jax.device_put(inception.load_inception_params(path), parallel.replicated(mesh))
    fc_bias = np.asarray(variables["params"]["fc"]["bias"])

    fn = functools.partial(inception.forward, resize_mode=resize_mode)

    def apply(images):
      pool3, logits = inception.sharded_apply(fn, variables, images, mesh)
      return pool3, logits - fc_bias

    return Detector("inception", INCEPTION_NAME, "fid", inception.FEATURE_DIM, resize_mode, apply)
  if kind == "proxy":
    if not path:
      raise FileNotFoundError("the proxy detector needs the ResNet56 weights path "
                              "(../shared/weights/resnet56-cifar10-4bfd9763.th)")
    if resize_mode is not None:
      logging.info("proxy detector: resize_mode=%r ignored (the ResNet56 takes 32x32 inputs)",
                   resize_mode)
    variables = jax.device_put(proxy.load_proxy_params(path), parallel.replicated(mesh))

    def apply_proxy(images):
      feats, _ = inception.sharded_apply(proxy.forward, variables, images, mesh)
      return feats, None

    return Detector("proxy", PROXY_NAME, proxy.METRIC_NAME, proxy.FEATURE_DIM, None, apply_proxy)
  raise ValueError(f"detector kind must be 'inception' or 'proxy', got {kind!r}")


class _Reservoir:
  """Uniform random subset of at most `size` rows of a stream (Algorithm R, seeded)."""

  def __init__(self, size: int, seed: int):
    self.size = size
    self.seen = 0
    self.rows = []
    self._rng = np.random.default_rng(seed)

  def add(self, batch: np.ndarray) -> None:
    for row in batch:
      if len(self.rows) < self.size:
        self.rows.append(row)
      else:
        j = self._rng.integers(0, self.seen + 1)
        if j < self.size:
          self.rows[j] = row
      self.seen += 1

  def result(self) -> Optional[np.ndarray]:
    return np.stack(self.rows) if self.rows else None


def compute_statistics(detector: Detector, batches: Batches, num_samples: Optional[int] = None,
                       *, keep_features: int = 10_000, allow_rank_deficient: bool = False,
                       seed: int = 0, progress: Optional[Callable[[int, Optional[int]], Any]] = None
                       ) -> fid_lib.FeatureStatistics:
  """Runs `detector` over uint8 NHWC batches; float64 mu/sigma (unbiased) on the host.

  batches: an iterable of this process's [n, H, W, C] uint8 arrays, or a no-argument callable
    returning one. Stops after `num_samples` images in total over all processes (the last batch is
    truncated); None: until the iterable ends. Raises StatisticsError if it ends earlier.
  keep_features: size of the uniform random feature subset kept for KID / precision-recall.
  Returns FeatureStatistics with `logits` (no fc bias, all samples; Inception only), `features`
  (the subset) and metadata (detector, resize_mode, resolution).
  progress: called as progress(images done, num_samples) after every batch (progress.Progress).
  """
  running = fid_lib.RunningStatistics(detector.feature_dim)
  reservoir = _Reservoir(keep_features, seed)
  logits, resolution = [], None
  start = time.time()
  for batch in (batches() if callable(batches) else batches):
    if num_samples is not None and running.count >= num_samples:
      break
    batch = np.asarray(batch)
    if resolution is None:
      resolution = tuple(batch.shape[1:3])
    elif tuple(batch.shape[1:3]) != resolution:
      raise ValueError(f"image resolution changed from {resolution} to {batch.shape[1:3]}")
    feats, lg = detector(batch)
    if num_samples is not None:
      feats = feats[:num_samples - running.count]
      lg = None if lg is None else lg[:len(feats)]
    running.update(feats)
    reservoir.add(feats)
    if lg is not None:
      logits.append(lg)
    if progress is not None:
      progress(running.count, num_samples)
  if num_samples is not None and running.count < num_samples:
    raise fid_lib.StatisticsError(
        f"the batches yielded only {running.count} of the {num_samples} requested images")
  elapsed = time.time() - start
  logging.info("%s: %d images in %.1f s (%.1f images/s)", detector.metric, running.count, elapsed,
               running.count / max(elapsed, 1e-9))
  stats = running.finalize(allow_rank_deficient)
  stats.features = reservoir.result()
  stats.logits = np.concatenate(logits) if logits else None
  stats.metadata = {"detector": detector.name, "resize_mode": detector.resize_mode or "none",
                    "resolution": resolution[0] if resolution[0] == resolution[1] else
                    f"{resolution[0]}x{resolution[1]}"}
  return stats


def check_reference(detector: Detector, ref: fid_lib.FeatureStatistics, ref_path,
                    resolution=None) -> None:
  """Raises StatisticsError when `ref` was not made with this detector / preprocessing /
  resolution (metadata written by `make_reference`; EDM's fid-refs carry none: dim check only)."""
  if ref.mu.shape[0] != detector.feature_dim:
    raise fid_lib.StatisticsError(
        f"reference {ref_path} has {ref.mu.shape[0]}-d features but detector {detector.name} "
        f"gives {detector.feature_dim}-d ones")
  meta = ref.metadata
  for key, ours in (("detector", detector.name), ("resize_mode", detector.resize_mode or "none"),
                    ("resolution", resolution)):
    if key in meta and ours is not None and str(meta[key]) != str(ours):
      raise fid_lib.StatisticsError(
          f"reference {ref_path} was made with {key}={meta[key]!r}, but this evaluation uses "
          f"{key}={ours!r}: the numbers would not be comparable")
  if not meta and detector.kind == "inception" and detector.resize_mode != "tf":
    logging.warning("reference %s carries no metadata (EDM fid-refs are made with the TF-graph "
                    "detector, i.e. resize_mode='tf'); evaluating with %r", ref_path,
                    detector.resize_mode)


def evaluate(detector: Detector, sample_batches: Batches, num_samples: int, ref_path, *,
             allow_rank_deficient: bool = False, keep_features: int = 10_000,
             kid_subsets: int = 100, seed: int = 0, progress=None) -> dict:
  """Statistics of `num_samples` generated images vs the reference `.npz` -> result dict.

  See the module docstring for the keys. Raises StatisticsError for a mismatched reference
  (feature dimension, detector, resize mode, resolution) or too few samples (N <= D unless
  `allow_rank_deficient`). KID uses `kid_subsets` subsets of min(1000, N) samples (StyleGAN: 100).
  progress: as in `compute_statistics`.
  """
  ref = fid_lib.load_statistics(ref_path)
  check_reference(detector, ref, ref_path)
  gen = compute_statistics(detector, sample_batches, num_samples, keep_features=keep_features,
                           allow_rank_deficient=allow_rank_deficient, seed=seed,
                           progress=progress)
  check_reference(detector, ref, ref_path, gen.metadata["resolution"])
  distance = fid_lib.frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma)
  result = {"fid": None, "is_mean": None, "is_std": None, "kid": None, "precision": None,
            "recall": None, "num_samples": int(gen.num_samples), "detector": detector.name,
            "resize_mode": detector.resize_mode, "ref": str(ref_path), "metric": detector.metric}
  if detector.kind == "proxy":
    result[proxy.METRIC_NAME] = distance
    return result
  result["fid"] = distance
  result["is_mean"], result["is_std"] = fid_lib.inception_score(gen.logits)
  if ref.features is None:
    logging.info("reference %s holds no features: kid/precision/recall not computed", ref_path)
  else:
    result["kid"] = fid_lib.kernel_inception_distance(gen.features, ref.features, kid_subsets,
                                                       seed=seed)
    result["precision"], result["recall"] = fid_lib.precision_recall(gen.features, ref.features)
  return result


def make_reference(detector: Detector, batches: Batches, out_path, num_samples=None, *,
                   keep_features: int = 10_000, allow_rank_deficient: bool = False,
                   seed: int = 0, progress=None) -> fid_lib.FeatureStatistics:
  """`--mode=ref`: statistics of a dataset's images -> `.npz` (mu, sigma, metadata, features).
  progress: as in `compute_statistics`.

  Proxy references may not carry 'fid' in their file name (they are not FID statistics).
  """
  out_path = paths.workdir_path(out_path)
  if detector.kind == "proxy" and "fid" in out_path.name.lower():
    raise ValueError(f"{out_path.name}: proxy ({proxy.METRIC_NAME}) statistics are not FID "
                     "statistics; choose a file name without 'fid' (e.g. cifar10-proxy_resnet56.npz)")
  stats = compute_statistics(detector, batches, num_samples, keep_features=keep_features,
                             allow_rank_deficient=allow_rank_deficient, seed=seed,
                             progress=progress)
  if jax.process_index() == 0:
    paths.makedirs(out_path.parent)
    fid_lib.save_statistics(out_path, stats)
  return stats


def eval_json_name(kimg: int, result: dict) -> str:
  """'eval-<kimg:06d>.json', or 'eval-proxy_fd_resnet56-<kimg:06d>.json' for the proxy."""
  kimg = int(kimg)
  if kimg < 0:
    raise ValueError(f"kimg must be >= 0, got {kimg}")
  tag = "" if result.get("metric", "fid") == "fid" else f"{result['metric']}-"
  return f"eval-{tag}{kimg:06d}.json"


def write_eval_json(workdir, kimg: int, result: dict) -> epath.Path:
  """Writes W/eval-<kimg>.json and appends {'kimg': kimg, **result} to W/metrics.jsonl.

  Only process 0 writes; returns the JSON path.
  """
  workdir = paths.workdir_path(workdir)
  path = workdir / eval_json_name(kimg, result)
  record: dict[str, Any] = {"kimg": int(kimg), **result}
  if jax.process_index() == 0:
    paths.makedirs(workdir)
    paths.write_text(path, json.dumps(result, indent=2, allow_nan=False) + "\n")
    paths.append_text(workdir / "metrics.jsonl", json.dumps(record, allow_nan=False) + "\n")
  return path
