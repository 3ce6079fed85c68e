"""Benchmark-only config: a 1.3 M-parameter DDPM++ SongUNet on 16x16 images (random teacher).

  python -m uni_instruct_jax.bench --config=configs/bench16.py --batch=64 --steps=5

Big enough that the networks dominate an iteration on CPU, small enough to time there
(docs/performance.md); the loss is configs/cifar10.py's (Jeffreys, official mode, GAN, augment).
"""

import pathlib
import runpy

_cifar10 = runpy.run_path(str(pathlib.Path(__file__).with_name("cifar10.py")))["get_config"]


def get_config():
  c = _cifar10()
  c.teacher.source = "random"
  c.data.resolution = 16
  c.network.kwargs.update(img_resolution=16, model_channels=28, channel_mult=(1, 2, 2),
                          num_blocks=2, attn_resolutions=(8,))
  c.training.batch_size = 64
  return c
