"""CIFAR-10 class-conditional (spec §3.3): EDM VP cond teacher, forward KL, the released recipe.

  python -m uni_instruct_jax.main --config=configs/cifar10_cond.py --workdir=W \
      --config.teacher.path=edm-cifar10-32x32-cond-vp.pkl --config.data.path=cifar10-32x32.zip
"""

import pathlib
import runpy

_cifar10 = runpy.run_path(str(pathlib.Path(__file__).with_name("cifar10.py")))["get_config"]


def get_config():
  c = _cifar10()
  c.data.use_labels = True
  c.network.kwargs.label_dim = 10
  c.loss.divergence = "forward_kl"
  return c
