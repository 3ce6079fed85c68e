"""Workdir paths, local or on cloud storage (gs://bucket/run), through `etils.epath`.

epath is the path library orbax uses, so checkpoints and every other workdir file (metrics,
TensorBoard, images, config, summaries) resolve a `gs://` URL the same way. On a Cloud TPU VM
epath reads gs:// with tf.io.gfile when TensorFlow is installed, otherwise with fsspec + gcsfs
(pip install -e '.[gcs]'). Object stores have no append and no rename, so `append_text` rewrites
the object and `write_text` is atomic by construction there (a temporary file + rename locally).
"""

import io
import os
from typing import IO, Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_url(path: PathLike) -> bool:
  """Whether `path` names cloud storage (scheme://...) rather than a local file."""
  return "://" in os.fspath(path)


def workdir_path(path: PathLike) -> epath.Path:
  """epath.Path of a local path (absolute, '~' expanded) or a URL kept intact (gs://bucket/run)."""
  text = os.fspath(path)
  if not text:
    raise ValueError("empty path")
  return epath.Path(text if is_url(text) else os.path.abspath(os.path.expanduser(text)))


def makedirs(path: PathLike) -> epath.Path:
  """Creates the directory and its parents if missing; returns its epath.Path."""
  path = workdir_path(path)
  path.mkdir(parents=True, exist_ok=True)
  return path


def read_text(path: PathLike) -> str:
  return workdir_path(path).read_text()


def write_text(path: PathLike, text: str) -> None:
  """Replaces the file's content at once: readers see the old or the new text, never a part."""
  path = workdir_path(path)
  if is_url(path):  # an object upload is atomic
    path.write_text(text)
    return
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, path)


def append_text(path: PathLike, text: str) -> None:
  """Appends to the file (creating it); on object stores by rewriting the object."""
  path = workdir_path(path)
  if is_url(path):
    write_text(path, (path.read_text() if path.exists() else "") + text)
    return
  with open(path, "a") as f:
    f.write(text)


def open_file(path: PathLike, mode: str = "r") -> IO:
  """epath's open (modes r, w, rb, wb; append through `append_text`)."""
  if "a" in mode or "+" in mode:
    raise ValueError(f"open_file mode {mode!r}: use append_text (object stores cannot append)")
  return workdir_path(path).open(mode)


class _EventFile:
  """A TensorBoard event file on an object store: buffered, the object rewritten on flush."""

  def __init__(self, path: str):
    self.path = path
    self.buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    with open_file(self.path, "wb") as f:
      f.write(self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _EventFileFactory:
  """tensorboardX writer factory for URLs: event files through epath (no google-cloud-storage)."""

  def open(self, path: str) -> _EventFile:
    return _EventFile(path)

  def directory_check(self, path: str) -> None:
    del path  # object stores have no directories


def tensorboard_dir(path: PathLike) -> str:
  """The logdir string for tensorboardX.SummaryWriter; URLs are written through epath."""
  path = workdir_path(path)
  if is_url(path):
    from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
    record_writer.register_writer_factory(os.fspath(path).split("://")[0], _EventFileFactory())
  return os.fspath(path)
