"""Embedded default: Uni-Instruct on a 2-D ring of 8 Gaussians (no downloads; ~1.5 min, 2 cores).

  python -m uni_instruct_jax.main --config=configs/toy2d.py --workdir=/tmp/toy2d

Teacher = the mixture's exact EDM denoiser; generator and fake score = small EDM-preconditioned
MLPs that both start from an MLP fitted to that teacher; the discriminator reads the fake MLP's last
hidden layer. Phases are the image recipe's scaled to the run (warm-up 5 %, SiD-only to 10 %).
"""

import pathlib
import runpy

import ml_collections

# Path-relative import of the defaults (works from any cwd when loaded by config_flags).
_default = runpy.run_path(str(pathlib.Path(__file__).with_name("default.py")))["get_config"]


def get_config():
  c = _default()
  c.data.source = "toy"
  c.data.num_modes = 8
  c.teacher.source = "toy"
  c.teacher.fit_steps = 3000      # Adam steps fitting the MLP denoiser to the exact teacher.
  c.teacher.fit_batch = 512
  c.teacher.fit_lr = 2e-3
  c.network.class_name = "MLPPrecond"
  c.network.kwargs = dict(hidden=(128, 128, 128), emb_channels=32, dropout=0.0)
  c.training.batch_size = 256
  c.training.total_kimg = 1536.0  # 6000 steps.
  c.training.tick_kimg = 76.8     # 300 steps per tick, 20 ticks.
  c.training.snapshot_ticks = 10
  c.ckpt.every_ticks = 2          # every 10 % of the run.
  c.ckpt.keep = 2
  c.loss.method = "uni_instruct"
  c.loss.mode = "exact"
  c.loss.divergence = "jeffreys"
  c.loss.warmup_kimg = 76.8       # 5 % of the run.
  c.loss.sid_kimg = 153.6         # 10 % of the run.
  # The uni_instruct preset as training uses it: exact mode divided by losses.sigma_normalizer
  # (docs/recipes.md), the discriminator trained at the 'mixture' sigma law (the default of exact
  # mode, pinned here). r is clipped to [1/4, 4], a toy choice (f-distill clips to [0.1, 20]):
  # unclipped, Jeffreys' H = 1 + r reaches ~600 on the few samples between modes and the generator
  # step blew up in an earlier version of this run. The fraction of clipped ratios is logged as
  # ratio_clip_fraction in metrics.jsonl.
  c.loss.disc_sigma_law = "mixture"
  c.loss.overrides = ml_collections.ConfigDict(dict(ratio_clip=(0.25, 4.0), normalizer="sigma"))
  # The fake score must track the moving generator: it learns 10x faster (lr 1e-3 vs 1e-4).
  c.optim.lr = 1e-3
  c.optim.gen_lr = 1e-4
  c.ema.halflife_kimg = 50.0
  c.ema.rampup_ratio = 0.05
  return c
