"""Image folders in the layout of EDM's generate.py, which EDM's fid.py reads.

  OUT/000000/000000.png ... OUT/000000/000999.png, OUT/001000/001000.png, ...   (one PNG per seed,
  subfolder seed - seed % 1000, as generate.py --subdirs), and
  OUT/dataset.json  {"labels": [["000000/000000.png", class], ...]} (EDM's dataset.json format;
                    {"labels": null} for unconditional images).

`python fid.py calc --images=OUT --ref=REF.npz --num=N` (NVlabs/edm) then computes FID with EDM's
code; `data.source='folder'` of this project reads the same folder with its labels. The seed of a
file determines its latent and class (`seed_inputs`), as in generate.py, so any subset of seeds can
be regenerated alone.
"""

import concurrent.futures
import functools
import io
import json
import os
import pathlib
from typing import Any, Callable, Iterable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image


class ImageFolderError(ValueError):
  """Images, seeds or labels that cannot be written as an EDM image folder."""


def seed_path(seed: int, subdirs: bool = True) -> str:
  """Relative path of a seed's PNG: '001000/001234.png' (or '001234.png' without subdirs)."""
  return f'{seed - seed % 1000:06d}/{seed:06d}.png' if subdirs else f'{seed:06d}.png'


def png_bytes(image: np.ndarray, compress_level: int = 6) -> bytes:
  """PNG file bytes of a uint8 [H, W, 1|3] image (mode 'L' or 'RGB', as EDM writes them)."""
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
    raise ImageFolderError(f'expected a uint8 [H, W, 1|3] image, got {image.dtype} {image.shape}')
  pil = PIL.Image.fromarray(image[:, :, 0], 'L') if image.shape[2] == 1 else (
      PIL.Image.fromarray(image, 'RGB'))
  buffer = io.BytesIO()
  pil.save(buffer, format='png', compress_level=compress_level)
  return buffer.getvalue()


def seed_inputs(seeds: Sequence[int], shape: Tuple[int, ...], label_dim: int,
                class_idx: Optional[int] = None):
  """Per-seed generator inputs, as EDM's StackedRandomGenerator draws them in generate.py.

  Returns (z float32 [len(seeds), *shape] ~ N(0, I), class ids int32 [len(seeds)] or None when
  label_dim == 0): seed s uses jax.random.key(s), split into a latent key and a class key, so a
  seed's inputs do not depend on the other seeds of its batch. `class_idx` fixes every class.
  """
  if class_idx is not None and not 0 <= class_idx < label_dim:
    raise ImageFolderError(f'class_idx {class_idx} is outside [0, {label_dim})')
  seeds = (np.asarray(seeds, np.int64) % (1 << 32)).astype(np.uint32)
  z, classes = _seed_inputs(seeds, tuple(shape), label_dim)
  if label_dim == 0:
    return z, None
  return z, classes if class_idx is None else np.full(len(z), class_idx, np.int32)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _seed_inputs(seeds: jax.Array, shape: Tuple[int, ...], label_dim: int):
  """(z [n, *shape], class ids [n]) from uint32 seeds [n]; see `seed_inputs`."""
  keys = jax.vmap(jax.random.key)(seeds)
  key_z, key_c = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
  z = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(key_z)
  classes = jax.vmap(lambda k: jax.random.randint(k, (), 0, max(label_dim, 1), jnp.int32))(key_c)
  return z, classes


def _check_seeds_and_labels(seeds: Sequence[int], labels) -> Tuple[list, Optional[list]]:
  seeds = [int(s) for s in seeds]
  if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
    raise ImageFolderError('seeds must be distinct non-negative integers (at least one)')
  if labels is None:
    return seeds, None
  labels = np.asarray(labels)
  if labels.ndim == 2:  # one-hot rows
    if not np.array_equal(labels, np.eye(labels.shape[1])[labels.argmax(1)]):
      raise ImageFolderError('2-D labels must be one-hot rows')
    labels = labels.argmax(1)
  if labels.shape != (len(seeds),) or not np.issubdtype(labels.dtype, np.integer) or (
      labels.min() < 0):
    raise ImageFolderError(f'labels must be {len(seeds)} non-negative class ids or one-hot rows, '
                           f'got {labels.dtype} {labels.shape}')
  return seeds, [int(c) for c in labels]


def write_edm_folder(images: Iterable[np.ndarray], seeds: Sequence[int], labels,
                     out_dir: str | os.PathLike, subdirs: bool = True,
                     progress: Optional[Callable[[int, int], None]] = None,
                     num_threads: int = 4) -> pathlib.Path:
  """Writes images as OUT/<seed_path(seed)> PNGs plus OUT/dataset.json; returns OUT.

  Args:
    images: uint8 batches [b, H, W, 1|3] (b >= 1), len(seeds) images in all, in seed order.
    seeds: one distinct non-negative seed per image (its file name).
    labels: None (unconditional), or per image a class id or a one-hot row.
    out_dir: created if needed; must be empty (fid.py would count any other image in it).
    subdirs: one subfolder per 1000 seeds (generate.py --subdirs; fid.py walks subfolders).
    progress: called as progress(images_done, total) after every batch.
    num_threads: PNG encoder threads.
  dataset.json is written last (atomically), so a folder that has it is complete.
  """
  seeds, labels = _check_seeds_and_labels(seeds, labels)
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
    raise ImageFolderError(f'{out_dir} exists and is not an empty directory; choose a new one '
                           '(fid.py would count every image in it)')
  out_dir.mkdir(parents=True, exist_ok=True)
  names = [seed_path(s, subdirs) for s in seeds]
  for folder in sorted({os.path.dirname(n) for n in names} - {''}):
    (out_dir / folder).mkdir(exist_ok=True)

  def write(item):
    name, image = item
    (out_dir / name).write_bytes(png_bytes(image))

  done, shape = 0, None
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    for index, batch in enumerate(images):
      batch = np.asarray(batch)
      if batch.ndim != 4 or batch.shape[0] == 0 or (shape or batch.shape[1:]) != batch.shape[1:]:
        raise ImageFolderError(f'image batch {index} has shape {batch.shape}; expected [b, H, W, '
                               'C] batches of one image shape')
      shape = batch.shape[1:]
      if done + len(batch) > len(seeds):
        raise ImageFolderError(f'more images than the {len(seeds)} seeds')
      list(pool.map(write, zip(names[done:done + len(batch)], batch)))
      done += len(batch)
      if progress is not None:
        progress(done, len(seeds))
  if done != len(seeds):
    raise ImageFolderError(f'{done} images for {len(seeds)} seeds')
  entries = None if labels is None else [[n, c] for n, c in zip(names, labels)]
  tmp = out_dir / 'dataset.json.tmp'
  tmp.write_text(json.dumps({'labels': entries}))
  tmp.replace(out_dir / 'dataset.json')
  return out_dir


def write_generated_folder(generate: Callable[..., Any], seeds: Sequence[int],
                           shape: Tuple[int, ...], label_dim: int, out_dir: str | os.PathLike,
                           batch_size: int = 256, class_idx: Optional[int] = None,
                           **kwargs) -> pathlib.Path:
  """Runs `generate` on every seed's inputs and writes the EDM image folder; returns OUT.

  Args:
    generate: generate(z float32 [batch_size, *shape], one-hot labels [batch_size, label_dim] or
      None) -> uint8 images [batch_size, H, W, C]; called with a fixed batch size (the last batch
      is padded with repeated seeds, their images dropped), so a jitted function compiles once.
    seeds, class_idx: as in `seed_inputs`; shape: one latent's shape; label_dim: classes (0: none).
    out_dir, **kwargs: as in `write_edm_folder` (subdirs, progress, num_threads).
  """
  seeds = [int(s) for s in seeds]
  if batch_size <= 0:
    raise ImageFolderError(f'batch_size must be positive, got {batch_size}')
  _, classes = seed_inputs(seeds, (), label_dim, class_idx)

  def batches():
    for start in range(0, len(seeds), batch_size):
      chunk = seeds[start:start + batch_size]
      padded = chunk + chunk[-1:] * (batch_size - len(chunk))
      z, ids = seed_inputs(padded, shape, label_dim, class_idx)
      labels = None if ids is None else jax.nn.one_hot(ids, label_dim)
      yield np.asarray(generate(z, labels))[:len(chunk)]

  return write_edm_folder(batches(), seeds, None if classes is None else np.asarray(classes),
                          out_dir, **kwargs)
