"""Default configuration: every section of a Uni-Instruct distillation run.

Experiment configs load this file by path (see `load_default` below) and override fields; every
field is overridable on the command line with --config.section.key=value.
Recipe defaults follow the official code (spec §3.3): batch 256, Adam beta=(0, 0.999), eps 1e-8,
lr 1e-5 for both networks, sigma_init 2.5, tmax 800, EMA half-life 0.5 Mimg with ramp 0.05,
fake-score/discriminator warm-up 100 kimg, SiD-only until 200 kimg, then the divergence + GAN.
"""

import ml_collections

from uni_instruct_jax import augment
from uni_instruct_jax import data


def get_config() -> ml_collections.ConfigDict:
  """All sections with the CIFAR-10 recipe's values; the data and teacher paths are empty."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Device mesh: batch on 'data'; parameters sharded over 'model' when model_parallelism > 1.
  c.mesh = ml_collections.ConfigDict(dict(model_parallelism=1))

  c.training = ml_collections.ConfigDict(dict(
      total_kimg=300_000.0,   # run length in thousands of real images seen (global).
      batch_size=256,         # global batch per update.
      micro_batch_size=0,     # per-update micro-batch for gradient accumulation (0: no accumulation).
      tick_kimg=10.0,         # status line, metrics and TensorBoard every tick.
      snapshot_ticks=50,      # EMA sample grid (and FID when eval.every_ticks) every N ticks.
      sigma_init=2.5,         # generator input noise level: x_g = G(sigma_init * z, sigma_init).
  ))

  c.data = data.get_data_config()

  # Teacher: 'pkl' (EDM .pkl), 'converted' (dir from `python -m uni_instruct_jax.convert`),
  # 'random' (random init of `network`; smoke runs and benchmarks) or 'toy' (closed form).
  c.teacher = ml_collections.ConfigDict(dict(source="pkl", path=""))

  # Architecture for 'random' teachers (EDM constructor kwargs) and the compute dtype of all nets.
  c.network = ml_collections.ConfigDict(dict(
      class_name="EDMPrecond",
      dtype="float32",        # compute dtype: 'float32' or 'bfloat16' (params stay float32).
      attn_implementation="",  # jax.nn.dot_product_attention: '' (XLA) or 'cudnn' (GPU).
      kwargs=ml_collections.ConfigDict(dict(
          img_resolution=32, img_channels=3, label_dim=0, model_type="SongUNet", model_channels=128, channel_mult=(2, 2, 2), num_blocks=4,
          attn_resolutions=(16,), dropout=0.13, augment_dim=9, embedding_type="positional",
          encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
          resample_filter=(1, 1))),
  ))

  # Generator init: 'teacher' (F.S.) or 'sid' (SiD-init from a distilled EDM-format checkpoint).
  c.generator = ml_collections.ConfigDict(dict(init="teacher", sid_path=""))

  # Fake score network (+ discriminator = its encoder). Augmentation applies to its inputs.
  c.fake_score = ml_collections.ConfigDict(dict(augment=augment.get_augment_config()))

  c.loss = ml_collections.ConfigDict(dict(
      method="uni_instruct",   # uni_instruct | sid | sida | diff_instruct | dmd | f_distill.
      divergence="jeffreys",   # see uni_instruct_jax.divergences.names().
      # Divergence schedule by images seen, 'KIMG:NAME,KIMG:NAME' (overrides `divergence` from
      # each KIMG on; e.g. '0:reverse_kl,20000:forward_kl'); empty = `divergence` throughout.
      schedule="",
      mode="official",         # 'official' (released code's loss) or 'exact' (spec §1.4).
      # Extra losses.method_options(...) overrides, e.g. ratio_source='official_bce' (the released
      # code's BCE-derived ratio) instead of the default 'logit' (r = exp(discriminator logit)).
      overrides=ml_collections.ConfigDict(),
      warmup_kimg=100.0,       # generator frozen (fake score + discriminator only) until here.
      sid_kimg=200.0,          # SiD-only generator loss (no GAN) until here.
      tmax=800,                # generator noise t ~ U[0, tmax/1000] on EDM's Karras schedule.
      scale=100.0,             # generator loss scaling (the recipe's lsg) of the batch mean.
  ))

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-5, gen_lr=1e-5, b1=0.0, b2=0.999, eps=1e-8,
      fake_grad_clip=1.0,      # value clip of fake-score gradients when the GAN is on (0: off).
  ))

  c.ema = ml_collections.ConfigDict(dict(halflife_kimg=500.0, rampup_ratio=0.05))

  c.ckpt = ml_collections.ConfigDict(dict(every_ticks=5, keep=3))

  c.eval = ml_collections.ConfigDict(dict(
      every_ticks=0,           # FID of the EMA generator every N ticks (0: never during training);
                               # the best-FID state is kept in W/checkpoints-best besides the last.
      num_samples=50_000,      # generated images per evaluation (FID-50k).
      seed=0,                  # evaluation batch i draws its latents/labels from fold_in(seed, i).
      batch_size=250,
      ref="",                  # reference .npz (mu, sigma): EDM's fid-refs or one from --mode=ref.
      detector="inception",    # 'inception' (FID) or 'proxy' (CIFAR-10 ResNet56 features; NOT FID).
      detector_path="",        # pt_inception-2015-12-05-6726825d.pth, or the ResNet56 .th.
      resize_mode="tf",        # 'tf' (EDM/StyleGAN numbers) or 'pytorch-fid'; see docs/evaluation.md.
      teacher_steps=0,         # --mode=eval on the teacher's Heun sampler with this many steps.
      images="",               # --mode=eval / ref on an image folder or zip instead.
  ))

  c.sample = ml_collections.ConfigDict(dict(grid=8, num_samples=64, seed=0, batch_size=256))
  return c
