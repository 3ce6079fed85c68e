"""Feedback of the CLI: --mode=prepare, Ctrl-C during training (one line naming the checkpoint,
exit 130, the same command resumes), 'compiling' lines, and the summary printed at the end."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import PIL.Image
import pytest

from conftest import shared_path

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def _main(*args):
  return [sys.executable, "-m", "uni_instruct_jax.main", *args]


def test_mode_prepare_writes_an_edm_zip_and_bad_input_is_one_line(tmp_path):
  source = shared_path("data", "cifar10-test-jpeg.zip")
  out = tmp_path / "subset.zip"
  args = ["--config=configs/tiny.py", "--mode=prepare", f"--config.data.path={source}",
          "--config.data.max_size=12"]
  proc = subprocess.run(_main(*args, f"--out={out}"), cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["num_images"] == 12 and summary["resolution"] == 8 and summary["label_dim"] == 10
  assert "prepare: 12/12 images" in proc.stderr
  with zipfile.ZipFile(out) as archive:
    names = sorted(archive.namelist())
    assert names == ["00000/img%08d.png" % i for i in range(12)] + ["dataset.json"]
    labels = json.loads(archive.read("dataset.json"))["labels"]
    assert [name for name, _ in labels] == names[:-1]
    assert all(0 <= c < 10 for _, c in labels)
    with archive.open(names[0]) as f:
      assert np.asarray(PIL.Image.open(f)).shape == (8, 8, 3)
  for bad, expect in ((f"--out={out}", "already exists"), (None, "--out")):
    proc = subprocess.run(_main(*args, *([bad] if bad else [])), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr[-3000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and expect in proc.stderr


# toy2d shortened: 1200 steps, 12 ticks of 100, a checkpoint every tick.
_TOY = ["--config=configs/toy2d.py", "--config.training.total_kimg=307.2",
        "--config.training.tick_kimg=25.6", "--config.loss.warmup_kimg=15.36",
        "--config.loss.sid_kimg=30.72", "--config.teacher.fit_steps=300",
        "--config.ckpt.every_ticks=1"]


@pytest.mark.slow
def test_ctrl_c_names_the_checkpoint_and_the_same_command_resumes(tmp_path):
  command = _main(*_TOY, f"--workdir={tmp_path}")
  # SIGINT at its default in the child even when pytest runs as a background job of a
  # non-interactive shell (which starts it with SIGINT ignored, inherited by its children).
  proc = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  lines = []
  try:
    for line in proc.stdout:  # the first status line (tick 1) is followed by its checkpoint
      lines.append(line)
      if line.startswith("["):
        break
    deadline = time.time() + 120
    while not (tmp_path / "checkpoints" / "100").is_dir() and time.time() < deadline:
      time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  lines += out.splitlines(keepends=True)
  assert proc.returncode == 130, "".join(lines)[-2000:] + err[-3000:]
  assert "Traceback" not in err
  last = err.strip().splitlines()[-1]
  step = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert step >= 100
  assert last.startswith("interrupted: the last checkpoint is ")
  assert f"{tmp_path / 'checkpoints' / str(step)} (step {step}," in last
  assert "rerun the same command to resume" in last
  # Phase 0 (warm-up) and 1 (SiD-only) compile during tick 1, and the line says so.
  assert any(l.startswith("kimg 0.0 | compiling the train step of phase 0") for l in lines)
  assert any(l.startswith("kimg 15.4 | compiling the train step of phase 1") for l in lines)
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert records[0]["compile_s"] > 0 and "compile" in next(l for l in lines if l.startswith("["))

  resumed = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["resumed_from_step"] == step and summary["steps"] == 1200
  # The summary is printed too: its values and where the files are.
  text = resumed.stdout[resumed.stdout.index("finished 1200 steps"):]
  assert f"student_metric: {summary['student_metric']}" in text
  assert f"resumed_from_step: {step}" in text and f"files in {tmp_path}: summary.json" in text
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  # Resumed in phase 2: one compilation, in the first resumed tick only.
  assert [r["compile_s"] > 0 for r in records if r["step"] > step] == (
      [True] + [False] * ((1200 - step) // 100 - 1))


class _Recorder:
  """Stands in for tensorboardX's SummaryWriter."""

  def __init__(self):
    self.calls = []

  def add_scalar(self, tag, value, step):
    self.calls.append(("scalar", tag, step))

  def add_image(self, tag, image, step, dataformats):
    self.calls.append(("image", tag, step, image.shape, dataformats))

  def flush(self):
    pass


def test_tensorboard_steps_are_integer_kimg_and_grids_are_images(tmp_path):
  from uni_instruct_jax import metrics_log  # pylint: disable=g-import-not-at-top
  log = metrics_log.MetricsLog(tmp_path, 0, fresh=True)
  log.writer.close()
  log.writer = _Recorder()
  log.write({"step": 300, "tick": 1, "kimg": 76.8, "loss_gen": 0.5})
  png = tmp_path / "grid.png"
  PIL.Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(png)
  log.image("fakes", png, 76.8)
  assert log.writer.calls == [("scalar", "kimg", 76), ("scalar", "loss_gen", 76),
                              ("image", "fakes", 76, (16, 24, 3), "HWC")]
