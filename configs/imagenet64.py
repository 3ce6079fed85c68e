"""ImageNet-64 class-conditional (spec §3.3): EDM ADM teacher, forward KL, global batch 8192.

  python -m uni_instruct_jax.main --config=configs/imagenet64.py --workdir=W \
      --config.teacher.path=edm-imagenet-64x64-cond-adm.pkl --config.data.path=imagenet-64x64.zip

8192 images per update through gradient accumulation (micro-batches of
training.micro_batch_size, split evenly over the 'data' devices); lr 4e-6; bf16 network compute
with float32 params, losses and Adam (eps 1e-8); EMA half-life 2 Mimg; no augmentation.
The paper's best run is two-stage (reverse KL to convergence, then forward KL):
  --config.loss.schedule='0:reverse_kl,20000:forward_kl'   (switch point in kimg is yours).
"""

import pathlib
import runpy

_default = runpy.run_path(str(pathlib.Path(__file__).with_name("default.py")))["get_config"]


def get_config():
  c = _default()
  c.teacher.source = "pkl"
  c.data.source = "edm_zip"
  c.data.resolution = 64
  c.data.use_labels = True
  c.network.dtype = "bfloat16"
  c.network.kwargs = dict(
      img_resolution=64, img_channels=3, label_dim=1000, model_type="DhariwalUNet",
      model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(32, 16, 8),
      dropout=0.1, augment_dim=0)
  c.training.batch_size = 8192
  c.training.micro_batch_size = 256
  c.training.tick_kimg = 100.0
  c.optim.lr = 4e-6
  c.optim.gen_lr = 4e-6
  c.ema.halflife_kimg = 2000.0
  c.loss.method = "uni_instruct"
  c.loss.mode = "official"
  c.loss.divergence = "forward_kl"
  c.fake_score.augment.enabled = False
  return c
