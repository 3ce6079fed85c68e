"""Uni-Instruct on a CIFAR-10 image mixture: an image teacher with an exact score (no downloads).

  python -m uni_instruct_jax.main --config=configs/cifar10_mixture.py --workdir=/tmp/mixture

The data law is uni_instruct_jax/image_mixture.py's equal-weight Gaussian mixture whose
`data.num_modes` means are CIFAR-10 training images of `data.path`, box-downsampled to
`data.resolution`^2 x 3 pixels (8x8: d = 192), each with per-pixel std `data.mixture_std`. Everything
else is configs/toy2d.py's recipe (teacher = the mixture's exact EDM denoiser; generator and fake
score = EDM-preconditioned MLPs on the flattened pixels, both fitted to that teacher first); the
data law, the MLP width, the fit length and the run length differ.
"""

import pathlib
import runpy

_here = pathlib.Path(__file__).resolve()
# Path-relative import of the toy recipe (works from any cwd when loaded by config_flags).
_toy2d = runpy.run_path(str(_here.with_name("toy2d.py")))["get_config"]


def get_config():
  c = _toy2d()
  c.data.source = "image_mixture"
  c.data.path = str(_here.parents[1].parent / "shared" / "data" / "cifar10-train-jpeg.zip")
  c.data.num_modes = 32
  c.data.resolution = 8
  c.data.mixture_std = 0.05       # image_mixture.DEFAULT_STD: 6.4 uint8 levels per pixel.
  c.teacher.source = "image_mixture"
  # toy2d's 128-wide MLP is capacity-bound at d = 192 (more fit steps do not help; its fitted
  # denoiser's Heun samples stay far from every mode); 512 wide fits it several times better.
  c.network.kwargs.hidden = (512, 512, 512)
  c.teacher.fit_steps = 10_000    # a pure function of (seed, network, fit settings): cache it.
  c.training.total_kimg = 512.0   # 2000 steps of batch 256 (the grid's CPU budget).
  c.training.tick_kimg = 25.6     # 100 steps per tick, 20 ticks.
  c.loss.warmup_kimg = 25.6       # 5 % of the run, as toy2d.
  c.loss.sid_kimg = 51.2          # 10 % of the run, as toy2d.
  c.ema.halflife_kimg = 16.7      # toy2d's 50 kimg scaled by the run length (512 / 1536).
  return c
