"""W/metrics.jsonl (one JSON record per tick) and TensorBoard, written by process 0.

A user's records are never dropped: a fresh run finding an old metrics.jsonl renames it to
metrics.jsonl.<n>; a resumed run moves the records written after its checkpoint to
metrics.jsonl.after-<step>; lines that are not JSON (a kill mid-write truncates the last one) are
moved to metrics.jsonl.bad. Each move is announced on one line.
"""

import json
import pathlib
from typing import Any, Dict, List, Tuple

import jax
import numpy as np

from uni_instruct_jax import paths


def _free_name(path: pathlib.Path, stem: str, numbered: bool = False) -> pathlib.Path:
  """path's sibling `stem` (unless `numbered`), else `stem.<n>` with the first free n >= 1."""
  n = 1 if numbered else 0
  while path.with_name(f"{stem}.{n}" if n else stem).exists():
    n += 1
  return path.with_name(f"{stem}.{n}" if n else stem)


def split_records(text: str, resume_step: int) -> Tuple[List[str], List[str], List[str]]:
  """(kept, after, bad) lines of a metrics.jsonl: records with step <= resume_step (records
  without a step, e.g. evaluations, are kept), records past it, and lines that are not JSON
  objects."""
  kept, after, bad = [], [], []
  for line in text.splitlines():
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      step = record.get("step", 0) if isinstance(record, dict) else None
    except ValueError:
      step = None
    if not isinstance(step, (int, float)):
      bad.append(line)
    else:
      (kept if step <= resume_step else after).append(line)
  return kept, after, bad


def _lines(lines: List[str]) -> str:
  return "".join(line + "\n" for line in lines)


def prepare(path: pathlib.Path, resume_step: int, fresh: bool) -> None:
  """Makes `path` ready to append to for a run starting at `resume_step` (see module doc)."""
  if not path.exists():
    return
  if fresh:
    if paths.read_text(path).strip():
      target = _free_name(path, path.name, numbered=True)
      paths.workdir_path(path).rename(target)
      print(f"note: a fresh run found an old {path.name}; moved it to {target.name}", flush=True)
    return
  kept, after, bad = split_records(paths.read_text(path), resume_step)
  if not after and not bad:
    return
  if after:
    target = _free_name(path, f"{path.name}.after-{resume_step}")
    paths.write_text(target, _lines(after))
    print(f"note: {len(after)} record(s) of {path.name} past the checkpoint at step "
          f"{resume_step} moved to {target.name}", flush=True)
  if bad:
    target = path.with_name(f"{path.name}.bad")
    paths.append_text(target, _lines(bad))
    print(f"warning: {len(bad)} unreadable line(s) of {path.name} (a kill mid-write) moved to "
          f"{target.name}", flush=True)
  paths.write_text(path, _lines(kept))


class MetricsLog:
  """Appends tick records to W/metrics.jsonl and TensorBoard (process 0 only)."""

  def __init__(self, workdir: pathlib.Path, resume_step: int, fresh: bool):
    self.path = paths.workdir_path(workdir) / "metrics.jsonl"
    self.enabled = jax.process_index() == 0
    self.writer = None
    if not self.enabled:
      return
    prepare(self.path, resume_step, fresh)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.writer = SummaryWriter(paths.tensorboard_dir(paths.workdir_path(workdir) / "tensorboard"))

  def write(self, record: Dict[str, Any]) -> None:
    if not self.enabled:
      return
    paths.append_text(self.path, json.dumps(record, sort_keys=True) + "\n")
    for k, v in record.items():
      if isinstance(v, (int, float)) and k not in ("step", "tick"):
        self.writer.add_scalar(k, v, int(record["kimg"]))  # EDM's habit: steps are kimg
    self.writer.flush()

  def image(self, tag: str, png: pathlib.Path, kimg: float) -> None:
    """Logs a snapshot PNG to TensorBoard at step int(kimg)."""
    if not self.enabled:
      return
    import PIL.Image  # pylint: disable=g-import-not-at-top
    with paths.open_file(png, "rb") as f, PIL.Image.open(f) as image:
      pixels = np.asarray(image.convert("RGB"))
    self.writer.add_image(tag, pixels, int(kimg), dataformats="HWC")
    self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
