"""Real-image data on grain: EDM dataset zips, image folders, tfds; global order, resumable.

Sources (`data.source`), each a grain random-access source (len, [i]):
  'folder'   a directory or .zip of images. Labels come from an EDM `dataset.json`
             (`{"labels": [[fname, label], ...]}`) when present, otherwise from class folders:
             the first path component below the images' common folder, classes in sorted order
             (e.g. `test/<class>/<NNNN>.jpg` in ../shared/data/cifar10-test-jpeg.zip gives the
             standard CIFAR-10 order airplane ... truck).
  'edm_zip'  the output of EDM's dataset_tool.py: like 'folder', but `dataset.json` is required and
             is the only source of labels (EDM's training/dataset.py rules).
  'tfds'     `tfds.data_source(data.tfds_name, split=data.split)` (random access; the dataset is
             prepared in array_record format, downloading if `tfds_download`). Needs the optional
             extra: pip install -e '.[tfds]'.
Images are listed in sorted file-name order; `max_size` keeps EDM's subset (a RandomState(0)
shuffle of the indices, first max_size, sorted). Labels are one-hot float32 (int labels; label_dim
= number of classes) or the float vectors of dataset.json; x-flips are the augment pipe's job.

Resolution: `data.resolution` (0 = the native one). `imagenet_preprocess` applies EDM's
dataset_tool.py 'center-crop' transform to every image (centre crop to a square, grey to RGB, PIL
Lanczos to `resolution`; needed for tfds imagenet2012). Otherwise a source whose resolution differs
is an error unless `resize` is set: square images whose side is an integer multiple of the target
are box-filtered (mean over f x f blocks, rounded), all others resized with PIL Lanczos.

Order and sharding: the global example order is a concatenation of per-epoch permutations,
`np.random.default_rng([seed, epoch]).permutation(num_examples)` (identity when not shuffling);
global batch i is positions [i B, (i + 1) B) of that stream (batches run across epoch ends), and
process p of P takes the contiguous rows [p B / P, (p + 1) B / P) of it, so the union over processes
is the same global batch for any P (this is not grain's per-process record sharding, which would
change the batches with P).

Pipeline (grain): `MapDataset.source` of this process's batches of the global order (element j
= the source indices of its rows of global batch j; a random-access source of batches, so grain's
per-element bookkeeping is paid once per batch) -> decode + transform -> `to_iter_dataset`, where
`num_threads` threads decode whole batches, up to max(`prefetch`, `num_threads`) ahead ->
`mp_prefetch` with `worker_count` grain worker processes (0 = none), which take the batches
round-robin and return them in order. Neither knob changes the stream.

State: `state()` = {"position": images drawn (global), "seed": seed}, saved in the training
checkpoint's metadata. It is grain's iterator state reduced to what defines the stream: grain's own
state of an `mp_prefetch` iterator holds one `next_index` per worker slice and so depends on the
worker count and, through the rows, on the process count; since every source is random access the
pipeline restarts at the position for any worker or process count, bitwise equal.
"""

import dataclasses
import functools
import io
import json
import os
import sys
import threading
import time
import warnings
import zipfile
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import ml_collections
import numpy as np
import PIL.Image

# File extension -> PIL format (naming the format skips PIL's slow probing of every plugin).
_IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".webp": "WEBP",
                  ".ppm": "PPM", ".tif": "TIFF", ".tiff": "TIFF"}
_SOURCES = ("folder", "edm_zip", "tfds")


class DataError(ValueError):
  """A data source that cannot be used: missing path, unreadable file, wrong shape or labels."""


def get_data_config() -> ml_collections.ConfigDict:
  """Default `data` config section (see the module docstring for the meaning of each field)."""
  return ml_collections.ConfigDict(dict(
      source="folder",  # 'folder' | 'edm_zip' | 'tfds'.
      path="",  # Directory or .zip for 'folder' / 'edm_zip'.
      tfds_name="cifar10",  # tfds dataset name for 'tfds' (e.g. 'imagenet2012').
      split="train",  # tfds split.
      tfds_data_dir="",  # tfds data_dir ('' = tfds default).
      tfds_download=True,  # Whether tfds may download and prepare the dataset.
      resolution=0,  # Target side in pixels; 0 = native.
      resize=False,  # Allow resampling a source of another resolution to `resolution`.
      imagenet_preprocess=False,  # EDM's centre crop + Lanczos to `resolution`.
      use_labels=False,  # One-hot class labels (label_dim 0 when False).
      max_size=0,  # Use an EDM-style random subset of this many images; 0 = all.
      shuffle=True,  # Shuffle every epoch (a pure function of seed and epoch).
      prefetch=2,  # Batches decoded ahead per process (0 = decode in next()).
      num_threads=4,  # Threads per process decoding batches (0 = decode in next()).
      worker_count=0,  # grain worker processes decoding batches (0 = this process only).
  ))


# ---------------------------------------------------------------------------------------------
# Image transforms (uint8 HWC in, uint8 HWC out).

def _to_pil(image: np.ndarray) -> PIL.Image.Image:
  return PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)


def _from_pil(image: PIL.Image.Image) -> np.ndarray:
  array = np.asarray(image)
  return array[:, :, None] if array.ndim == 2 else array


def center_crop_lanczos(image: np.ndarray, resolution: int) -> np.ndarray:
  """EDM dataset_tool.py 'center-crop': [h, w, c] uint8 -> [resolution, resolution, 3] uint8.

  Crops the centred min(h, w) square, turns grey into RGB and resizes with PIL Lanczos.
  """
  height, width = image.shape[:2]
  crop = min(height, width)
  image = image[(height - crop) // 2:(height + crop) // 2, (width - crop) // 2:(width + crop) // 2]
  if image.shape[2] == 1:
    image = np.repeat(image, 3, axis=2)
  resized = PIL.Image.fromarray(np.ascontiguousarray(image), "RGB").resize(
      (resolution, resolution), PIL.Image.Resampling.LANCZOS)
  return np.asarray(resized)


def resize_square(image: np.ndarray, resolution: int) -> np.ndarray:
  """Resizes a square [s, s, c] uint8 image to [resolution, resolution, c] uint8.

  Integer downsampling factors use a box filter (the mean of each f x f block, rounded half up),
  every other ratio PIL Lanczos.
  """
  side = image.shape[0]
  if image.shape[1] != side:
    raise DataError(f"cannot resize a non-square {image.shape[1]}x{side} image; set "
                    f"imagenet_preprocess=True to centre-crop")
  if side == resolution:
    return image
  if side % resolution == 0:
    f = side // resolution
    blocks = image.reshape(resolution, f, resolution, f, image.shape[2]).astype(np.float64)
    return np.floor(blocks.mean(axis=(1, 3)) + 0.5).astype(np.uint8)
  return _from_pil(_to_pil(image).resize((resolution, resolution),
                                         PIL.Image.Resampling.LANCZOS))


def _decode(data: bytes, name: str) -> np.ndarray:
  """Decodes an image file to uint8 [h, w, c] with c in {1, 3} (other modes become RGB)."""
  try:
    fmt = _IMAGE_FORMATS[os.path.splitext(name)[1].lower()]
    with PIL.Image.open(io.BytesIO(data), formats=[fmt]) as image:
      if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
      array = np.asarray(image)
  except (OSError, ValueError, SyntaxError) as e:
    raise DataError(f"cannot decode image {name}: {e}") from e
  if array.dtype != np.uint8:
    raise DataError(f"image {name} is {array.dtype}, expected 8-bit")
  return array[:, :, None] if array.ndim == 2 else array


# ---------------------------------------------------------------------------------------------
# Random-access sources (grain's RandomAccessDataSource protocol): len(), [i] -> (uint8 [h, w, c],
# name, raw label or None); has_labels, label_dim, path. Picklable for grain's worker processes.

class _ArchiveSource:
  """Images in a directory or zip (EDM's ImageFolderDataset conventions)."""

  def __init__(self, path: str, edm_labels_only: bool):
    self.path = path
    self._local = threading.local()
    if os.path.isdir(path):
      self._zip = False
      names = [os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/")
               for root, _, files in os.walk(path) for f in files]
    elif os.path.isfile(path) and path.lower().endswith(".zip"):
      self._zip = True
      try:
        names = [n for n in self._zipfile().namelist() if not n.endswith("/")]
      except zipfile.BadZipFile as e:
        raise DataError(f"{path} is not a readable zip file: {e}") from e
    elif os.path.exists(path):
      raise DataError(f"data path {path} is neither a directory nor a .zip file")
    else:
      raise DataError(f"data path {path} does not exist")
    self.names = sorted(n for n in names if os.path.splitext(n)[1].lower() in _IMAGE_FORMATS)
    if not self.names:
      raise DataError(f"no image files found in {path}")
    self.labels, self.label_dim = self._load_labels(set(names), edm_labels_only)

  def __getstate__(self):  # open zip handles stay in their process and thread
    return {k: v for k, v in self.__dict__.items() if k != "_local"}

  def __setstate__(self, state):
    self.__dict__.update(state, _local=threading.local())

  def _zipfile(self) -> zipfile.ZipFile:
    if getattr(self._local, "zip", None) is None:
      self._local.zip = zipfile.ZipFile(self.path)
    return self._local.zip

  def _read(self, name: str) -> bytes:
    try:
      if self._zip:
        return self._zipfile().read(name)
      with open(os.path.join(self.path, name), "rb") as f:
        return f.read()
    except (OSError, KeyError, zipfile.BadZipFile) as e:
      raise DataError(f"cannot read {self.path}:{name}: {e}") from e

  def __len__(self) -> int:
    return len(self.names)

  @property
  def has_labels(self) -> bool:
    return self.labels is not None

  def __getitem__(self, index: int) -> Tuple[np.ndarray, str, Any]:
    name = f"{self.path}:{self.names[index]}"
    label = None if self.labels is None else self.labels[index]
    return _decode(self._read(self.names[index]), name), name, label

  def _load_labels(self, all_names, edm_labels_only):
    """(labels: int64 [N] or float32 [N, D] or None, label_dim)."""
    where = f"{self.path}:dataset.json"
    if "dataset.json" in all_names:
      try:
        entries = json.loads(self._read("dataset.json"))["labels"]
        table = None if entries is None else {str(k): v for k, v in entries}
      except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"malformed {where} (expected {{\"labels\": [[fname, label], ...]}} or "
                        f"null): {e}") from e
      if table is None:
        return None, 0
      missing = [n for n in self.names if n not in table]
      if missing:
        raise DataError(f"{where} has no label for {missing[0]} ({len(missing)} images unlabelled)")
      try:
        labels = np.asarray([table[n] for n in self.names])
      except ValueError as e:
        raise DataError(f"{where}: labels of unequal length: {e}") from e
      if labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer) and labels.min() >= 0:
        return labels.astype(np.int64), int(labels.max()) + 1
      if labels.ndim == 2 and np.issubdtype(labels.dtype, np.number):
        return labels.astype(np.float32), labels.shape[1]
      raise DataError(f"{where}: labels must be non-negative ints or equal-length float vectors")
    if edm_labels_only:
      raise DataError(f"{self.path} is not an EDM dataset (no dataset.json); use source='folder'")
    # Class folders: the first path component below the images' common folder.
    parts = [n.split("/") for n in self.names]
    depth = 0
    while all(len(p) > depth + 1 for p in parts) and len({p[depth] for p in parts}) == 1:
      depth += 1
    if not all(len(p) > depth + 1 for p in parts):
      return None, 0
    classes = sorted({p[depth] for p in parts})
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index[p[depth]] for p in parts], np.int64), len(classes)


class _TfdsSource:
  """A tfds split read through `tfds.data_source` (array_record, random access)."""

  def __init__(self, name: str, split: str, data_dir: str, download: bool):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise DataError("data.source='tfds' needs tensorflow-datasets: pip install -e '.[tfds]'"
                      ) from e
    if name.startswith("imagenet_resized"):
      warnings.warn(f"tfds {name} is downsampled differently from EDM's ImageNet-64 (centre crop +"
                    " Lanczos); its statistics differ from EDM's reference, so FIDs against EDM's "
                    "imagenet-64x64.npz are not comparable", UserWarning, stacklevel=3)
    self.path = f"tfds:{name}[{split}]"
    try:
      self._source = tfds.data_source(
          name, split=split, data_dir=data_dir or None, download=download,
          builder_kwargs={"file_format": "array_record"})
    except Exception as e:  # tfds raises many types (DatasetNotFoundError, AssertionError, ...).
      raise DataError(f"cannot open {self.path} with tfds.data_source (prepared as array_record; "
                      f"download={download}): {type(e).__name__}: {e}") from e
    features = self._source.dataset_info.features
    if "image" not in features:
      raise DataError(f"{self.path} has no 'image' feature")
    self.has_labels = "label" in features
    self.label_dim = features["label"].num_classes if self.has_labels else 0

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Tuple[np.ndarray, str, Any]:
    name = f"{self.path}#{index}"
    example = self._source[int(index)]
    image = np.asarray(example["image"])
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
      raise DataError(f"{name}: expected a uint8 image, got {image.dtype} {image.shape}")
    label = np.int64(example["label"]) if self.has_labels else None
    return (image[:, :, None] if image.ndim == 2 else image), name, label


# ---------------------------------------------------------------------------------------------
# The grain pipeline: picklable maps (they travel to grain's worker processes).

class _Example:
  """Source index -> (uint8 [R, R, C], float32 [label_dim]); checks size, channels and label."""

  def __init__(self, source, first_index: int, *, resolution: int, resize: bool,
               imagenet_preprocess: bool, label_dim: int):
    self.source = source
    self.resize = resize
    self.imagenet_preprocess = imagenet_preprocess
    self.label_dim = label_dim
    image, name, _ = source[first_index]
    self.resolution = resolution or image.shape[0]
    self.num_channels = None
    self.num_channels = self.transform(image, name).shape[2]

  def transform(self, image: np.ndarray, name: str) -> np.ndarray:
    """Brings a decoded [h, w, c] uint8 image to [resolution, resolution, C] or raises."""
    res = self.resolution
    if self.imagenet_preprocess:
      image = center_crop_lanczos(image, res)
    elif image.shape[:2] != (res, res):
      if not self.resize:
        raise DataError(f"{name} is {image.shape[1]}x{image.shape[0]}, expected {res}x{res} "
                        f"(set data.resize=True to resample, or data.resolution=0 for native)")
      if image.shape[0] != image.shape[1]:
        raise DataError(f"{name} is not square ({image.shape[1]}x{image.shape[0]}); set "
                        f"data.imagenet_preprocess=True to centre-crop")
      image = resize_square(image, res)
    if self.num_channels is not None and image.shape[2] != self.num_channels:
      raise DataError(f"{name} has {image.shape[2]} channels, expected {self.num_channels}")
    return image

  def __call__(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
    image, name, raw = self.source[int(index)]
    image = self.transform(image, name)
    if self.label_dim == 0:
      return image, np.zeros((0,), np.float32)
    if np.ndim(raw) == 1:  # a float label vector from dataset.json
      return image, np.asarray(raw, np.float32)
    if not 0 <= raw < self.label_dim:
      raise DataError(f"{name}: label {raw} outside [0, {self.label_dim})")
    return image, np.eye(self.label_dim, dtype=np.float32)[raw]

  def batch(self, indices: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """(uint8 [n, R, R, C], float32 [n, label_dim]) of n source indices."""
    pairs = [self(i) for i in indices]
    return (np.stack([p[0] for p in pairs]),
            np.stack([p[1] for p in pairs]).reshape(len(pairs), self.label_dim))


@functools.lru_cache(maxsize=2)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


@dataclasses.dataclass(frozen=True, eq=False)
class _GlobalOrder:
  """The global stream as a random-access source of batches: element j -> the source indices
  (int64 [b]) of this process's rows of global batch start / B + j, i.e. of global stream
  positions start + j B + row0 + [0, b) (b = local, B = global batch size).
  """
  indices: np.ndarray  # int64 [num_examples]: source indices of the (max_size) example list
  seed: int
  shuffle: bool
  global_batch_size: int
  local_batch_size: int
  row0: int
  start: int = 0

  def __len__(self) -> int:
    return sys.maxsize  # endless: batches run across epoch ends

  def __getitem__(self, j: int) -> np.ndarray:
    return self.stream_indices(self.start + int(j) * self.global_batch_size + self.row0,
                               self.local_batch_size)

  def stream_indices(self, start: int, count: int) -> np.ndarray:
    """Source indices at global stream positions [start, start + count)."""
    num = len(self.indices)
    epochs, offsets = np.divmod(np.arange(start, start + count, dtype=np.int64), num)
    if not self.shuffle:
      return self.indices[offsets]
    out = np.empty(count, np.int64)
    for epoch in np.unique(epochs):
      mask = epochs == epoch
      out[mask] = self.indices[_epoch_permutation(self.seed, int(epoch), num)[offsets[mask]]]
    return out


def _train_batch(batch: Tuple[np.ndarray, np.ndarray]) -> Dict[str, np.ndarray]:
  """dict(image=float32 [b, H, W, C] in [-1, 1], label=float32 [b, label_dim])."""
  return dict(image=batch[0].astype(np.float32) / 127.5 - 1, label=batch[1])


def _uint8_images(batch: Tuple[np.ndarray, np.ndarray]) -> np.ndarray:
  """uint8 [b, H, W, C]."""
  return batch[0]


def _owned(array: np.ndarray) -> np.ndarray:
  """A plain copy of an array grain's workers handed over in shared memory (which grain unlinks
  once it drops its view; the trainer may keep host buffers alive longer)."""
  return np.array(array)


def _allow_grain_workers() -> None:
  """grain's worker start reads its absl flags; outside an absl app (tests, the bench) nothing
  parsed them, so mark them parsed (their defaults)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# ---------------------------------------------------------------------------------------------

class Dataset:
  """Deterministic, per-process sharded, resumable stream of local batches.

  Iteration yields dict(image=float32 [b, H, W, C] in [-1, 1], label=float32 [b, label_dim]),
  b = global_batch_size / process_count.
  """

  def __init__(self, source, *, global_batch_size: int, seed: int, process_index: int,
               process_count: int, resolution: int = 0, resize: bool = False,
               imagenet_preprocess: bool = False, use_labels: bool = False, max_size: int = 0,
               shuffle: bool = True, prefetch: int = 2, num_threads: int = 4,
               worker_count: int = 0, state: Optional[Dict[str, Any]] = None):
    if global_batch_size <= 0 or process_count <= 0 or not 0 <= process_index < process_count:
      raise DataError(f"invalid batch/process setup: global_batch_size={global_batch_size}, "
                      f"process {process_index} of {process_count}")
    if global_batch_size % process_count:
      raise DataError(f"global_batch_size {global_batch_size} is not divisible by the "
                      f"{process_count} processes")
    if min(seed, resolution, max_size, prefetch, num_threads, worker_count) < 0:
      raise DataError("seed, resolution, max_size, prefetch, num_threads and worker_count must "
                      "be >= 0")
    if imagenet_preprocess and resolution == 0:
      raise DataError("imagenet_preprocess needs data.resolution > 0")
    self._source = source
    self._seed = int(seed)
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count

    indices = np.arange(len(source), dtype=np.int64)
    if max_size and len(source) > max_size:  # EDM's subset rule.
      np.random.RandomState(0).shuffle(indices)
      indices = np.sort(indices[:max_size])
    self._indices = indices
    self.num_examples = len(indices)

    if use_labels and not source.has_labels:
      raise DataError(f"data.use_labels=True but {source.path} has no labels")
    self.label_dim = source.label_dim if use_labels else 0
    self._example = _Example(source, int(indices[0]), resolution=resolution, resize=resize,
                             imagenet_preprocess=imagenet_preprocess, label_dim=self.label_dim)
    self.resolution, self.num_channels = self._example.resolution, self._example.num_channels
    self._order = _GlobalOrder(indices, self._seed, shuffle, global_batch_size,
                               self.local_batch_size, process_index * self.local_batch_size)
    self._loader = dict(prefetch=prefetch, num_threads=num_threads, worker_count=worker_count)
    self._position = 0
    self._iterator = None
    if state is not None:
      self.restore(state)

  def _batches(self, batches: Sequence[np.ndarray], output_fn):
    """A grain iterator over output_fn(decoded batch) of `batches` (int64 [n] source indices;
    a batch is grain's element: its per-element bookkeeping would cost as much as a decode)."""
    import grain  # pylint: disable=import-outside-toplevel  # heavy (imports jax); workers only
    prefetch, threads, workers = (self._loader[k] for k in ("prefetch", "num_threads",
                                                            "worker_count"))
    threaded = prefetch > 0 and threads > 0
    dataset = (grain.MapDataset.source(batches).map(self._example.batch).map(output_fn)
               .to_iter_dataset(grain.ReadOptions(
                   num_threads=threads if threaded else 0,
                   prefetch_buffer_size=max(prefetch, threads) if threaded else 0)))
    if workers:
      _allow_grain_workers()
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=workers, per_worker_buffer_size=max(prefetch, 1)))
    return iter(dataset)

  def stream_indices(self, start: int, count: int) -> np.ndarray:
    """Source indices at global stream positions [start, start + count)."""
    return self._order.stream_indices(start, count)

  # -- iteration, state -----------------------------------------------------------------------

  def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    if self._iterator is None:
      order = dataclasses.replace(self._order, start=self._position)
      self._iterator = self._batches(order, _train_batch)
    try:
      batch = next(self._iterator)
    except Exception:
      self.close()
      raise
    self._position += self.global_batch_size
    if self._loader["worker_count"]:
      batch = {k: _owned(v) for k, v in batch.items()}
    return batch

  next = __next__

  def state(self) -> Dict[str, int]:
    """JSON-able position: {"position": global images drawn so far, "seed": seed}."""
    return {"position": int(self._position), "seed": self._seed}

  def restore(self, state: Dict[str, Any]) -> None:
    """Continues from a `state()`; the next batch is the one that followed it."""
    try:
      position, seed = int(state["position"]), int(state["seed"])
    except (KeyError, TypeError, ValueError) as e:
      raise DataError(f"malformed data state {state!r}: expected {{'position': int, 'seed': "
                      f"int}}") from e
    if seed != self._seed or position < 0:
      raise DataError(f"data state {state!r} does not belong to this dataset (seed {self._seed})")
    self.close()
    self._position = position

  def uint8_batches(self, batch_size: int) -> Iterator[np.ndarray]:
    """Every example once, in dataset order: uint8 [<=batch_size, H, W, C] (reference stats)."""
    if batch_size <= 0:
      raise DataError(f"batch_size must be positive, got {batch_size}")
    iterator = self._batches([self._indices[i:i + batch_size]
                              for i in range(0, self.num_examples, batch_size)], _uint8_images)
    try:
      for images in iterator:
        yield _owned(images) if self._loader["worker_count"] else images
    finally:
      iterator.close()

  def close(self) -> None:
    """Stops grain's threads and worker processes (iteration restarts at the position)."""
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None


def create_dataset(data_config: ml_collections.ConfigDict, global_batch_size: int, seed: int,
                   process_index: Optional[int] = None, process_count: Optional[int] = None,
                   state: Optional[Dict[str, Any]] = None) -> Dataset:
  """Builds the Dataset of a `data` config section (see `get_data_config`).

  process_index / process_count default to jax.process_index() / jax.process_count().
  """
  cfg = data_config
  if cfg.source not in _SOURCES:
    raise DataError(f"unknown data.source {cfg.source!r}; expected one of {_SOURCES}")
  if cfg.source == "tfds":
    if cfg.tfds_name.startswith("imagenet2012") and not cfg.imagenet_preprocess:
      raise DataError(f"tfds {cfg.tfds_name} images vary in size: set data.imagenet_preprocess="
                      f"True and data.resolution (EDM's centre crop + Lanczos)")
    source = _TfdsSource(cfg.tfds_name, cfg.split, cfg.tfds_data_dir, cfg.tfds_download)
  else:
    if not cfg.path:
      raise DataError(f"data.path is empty (needed for data.source={cfg.source!r})")
    source = _ArchiveSource(os.path.expanduser(cfg.path), edm_labels_only=cfg.source == "edm_zip")
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index, process_count = jax.process_index(), jax.process_count()
  return Dataset(source, global_batch_size=global_batch_size, seed=seed,
                 process_index=process_index, process_count=process_count,
                 resolution=cfg.resolution, resize=cfg.resize,
                 imagenet_preprocess=cfg.imagenet_preprocess, use_labels=cfg.use_labels,
                 max_size=cfg.max_size, shuffle=cfg.shuffle, prefetch=cfg.prefetch,
                 num_threads=cfg.num_threads, worker_count=cfg.worker_count,
                 state=state)


# ---------------------------------------------------------------------------------------------
# Decode throughput: python -m uni_instruct_jax.data --bench=PATH [--workers=0,1,2] [--threads=1]

def bench(path: str, workers: Sequence[int] = (1, 2), num_threads: int = 1,
          batch_size: int = 256, num_batches: int = 40, warmup: int = 2) -> List[Dict[str, Any]]:
  """Decode throughput of `path` (a 'folder' source): one record per grain worker count with
  images_per_sec over `num_batches` shuffled batches after `warmup` untimed ones (worker start-up
  excluded)."""
  records = []
  for count in workers:
    config = get_data_config()
    config.update(path=path, worker_count=count, num_threads=num_threads)
    dataset = create_dataset(config, batch_size, seed=0, process_index=0, process_count=1)
    for _ in range(warmup):
      dataset.next()
    start = time.perf_counter()
    for _ in range(num_batches):
      dataset.next()
    seconds = time.perf_counter() - start
    dataset.close()
    records.append({"workers": count, "threads": num_threads, "batch_size": batch_size,
                    "num_batches": num_batches,
                    "images_per_sec": round(batch_size * num_batches / seconds, 1)})
  return records


if __name__ == "__main__":
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description="Decode throughput of an image zip/folder.")
  parser.add_argument("--bench", required=True, help="directory or .zip of images")
  parser.add_argument("--workers", default="1,2", help="comma-separated grain worker counts")
  parser.add_argument("--threads", type=int, default=1, help="decoding threads per process")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--batches", type=int, default=40)
  args = parser.parse_args()
  for record in bench(args.bench, [int(w) for w in args.workers.split(",")], args.threads,
                      args.batch, args.batches):
    print(json.dumps(record), flush=True)
