"""Tiny smoke/test run: a random-init 2-level SongUNet on 8x8 images, a few steps on CPU.

  python -m uni_instruct_jax.main --config=configs/tiny.py --workdir=/tmp/tiny \
      --config.data.path=../shared/data/cifar10-test-jpeg.zip

Images are resized to 8x8; every phase (warm-up, SiD-only, divergence + GAN) happens within the run.
"""

import pathlib
import runpy

_default = runpy.run_path(str(pathlib.Path(__file__).with_name("default.py")))["get_config"]


def get_config():
  c = _default()
  c.teacher.source = "random"
  c.data.source = "folder"
  c.data.resolution = 8
  c.data.resize = True
  c.data.use_labels = True
  c.data.prefetch = 0
  c.data.num_threads = 1
  c.network.kwargs = dict(
      img_resolution=8, img_channels=3, label_dim=10, model_type="SongUNet", model_channels=16,
      channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.13, augment_dim=0,
      embedding_type="positional", encoder_type="standard", decoder_type="standard",
      channel_mult_noise=1, resample_filter=(1, 1))
  c.training.batch_size = 8
  c.training.total_kimg = 0.032   # 4 steps.
  c.training.tick_kimg = 0.016
  c.training.snapshot_ticks = 1
  c.ckpt.every_ticks = 1
  c.loss.divergence = "jeffreys"
  c.loss.mode = "official"
  c.loss.warmup_kimg = 0.008
  c.loss.sid_kimg = 0.016
  c.sample.grid = 2
  c.sample.num_samples = 4
  return c
