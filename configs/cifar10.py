"""CIFAR-10 unconditional (spec §3.3): EDM VP teacher, Jeffreys (JKL), the released recipe.

  python -m uni_instruct_jax.main --config=configs/cifar10.py --workdir=W \
      --config.teacher.path=edm-cifar10-32x32-uncond-vp.pkl --config.data.path=cifar10-32x32.zip

Defaults reproduce the released code (loss.mode 'official': the 0.4 FKL / 0.6 RKL SiD mix, alpha 1,
GAN on, augmentation p=0.12); `--config.loss.mode=exact` is the principled expanded-divergence
gradient. The ratio source is a switch: r = exp(discriminator logit) by default, or the released
code's BCE-derived value with `--config.loss.overrides.ratio_source=official_bce`.
"""

import pathlib
import runpy

_default = runpy.run_path(str(pathlib.Path(__file__).with_name("default.py")))["get_config"]


def get_config():
  c = _default()
  c.teacher.source = "pkl"
  c.data.source = "edm_zip"
  c.data.resolution = 32
  c.data.use_labels = False
  c.loss.method = "uni_instruct"
  c.loss.mode = "official"
  c.loss.divergence = "jeffreys"
  c.loss.overrides.ratio_source = "logit"
  c.fake_score.augment.enabled = True
  return c
