"""The CIFAR-10 image mixture with image networks: a small NHWC SongUNet instead of the MLPs.

  python -m uni_instruct_jax.main --config=configs/cifar10_mixture_unet.py --workdir=/tmp/mixture_unet

configs/cifar10_mixture.py (the exact image-mixture teacher, the toy recipe) with the generator and
the fake score a DDPM++ SongUNet behind EDMPrecond, as for CIFAR-10 proper (same modules, same
trainer path), at the mixture's 8x8x3 and with sigma_data the mixture's pixel std. The SongUNet is
the one of configs/tiny.py without labels, augment conditioning or dropout (0.19 M parameters).
It is fitted to the exact teacher like the MLP (cached). A SongUNet step costs far more CPU time
than the MLP's (not timed at batch 256), so this config runs the MLP config's 2000 generator steps
at batch 64 with a 2000-step fit (the MLP: batch 256, 10,000 fit steps); docs/results.md lists both
per row.
"""

import pathlib
import runpy

_here = pathlib.Path(__file__).resolve()
_mixture = runpy.run_path(str(_here.with_name("cifar10_mixture.py")))["get_config"]
_tiny = runpy.run_path(str(_here.with_name("tiny.py")))["get_config"]


def get_config():
  c = _mixture()
  c.network.class_name = "EDMPrecond"
  c.network.kwargs = dict(_tiny().network.kwargs.to_dict(), label_dim=0, dropout=0.0)
  c.teacher.fit_steps = 2000
  c.teacher.fit_batch = 64
  # Batch 64 instead of 256 (the MLP's), the same 2000 generator steps: every kimg knob / 4.
  c.training.batch_size = 64
  for section, key in (("training", "total_kimg"), ("training", "tick_kimg"),
                       ("loss", "warmup_kimg"), ("loss", "sid_kimg"), ("ema", "halflife_kimg")):
    c[section][key] /= 4
  return c
