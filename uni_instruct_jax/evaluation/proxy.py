"""CIFAR-10 ResNet56 (akamaster/pytorch_resnet_cifar10) in Linen, NHWC: a proxy feature network.

A Fréchet distance on its 64-d pooled features (metric `proxy_fd_resnet56`) is a local, relative
comparison for demos where the Inception weights are absent. It is NOT FID and is never reported
or stored under that name.

Architecture: conv3x3(3->16)+BN+ReLU; stages `layer1..3` of 9 BasicBlocks (16/32/64 channels,
stride 2 at the first block of stages 2 and 3); BasicBlock = conv-BN-ReLU-conv-BN + shortcut, ReLU;
"option A" shortcut: identity, or x[:, ::2, ::2] zero-padded with planes // 4 channels per side.
Global average pool -> 64-d features -> `linear` (64 -> 10).
Params: BatchNorm (eps 1e-5) folded into each conv: `params/conv1`, `params/layer{s}_{b}/conv{1,2}`
({'kernel': HWIO, 'bias'}) and `params/linear` ({'kernel': [64, 10], 'bias'}).
"""

import pathlib
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from uni_instruct_jax.convert import safe_unpickle
from uni_instruct_jax.evaluation import inception

METRIC_NAME = "proxy_fd_resnet56"
FEATURE_DIM = 64
NUM_CLASSES = 10
BLOCKS_PER_STAGE = 9
STAGE_WIDTHS = (16, 32, 64)
BN_EPS = 1e-5
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_HIGHEST = lax.Precision.HIGHEST


def _conv(name, features, strides=1):
  return nn.Conv(features, (3, 3), strides=strides, padding=((1, 1), (1, 1)), precision=_HIGHEST,
                 name=name)


class BasicBlock(nn.Module):
  """conv-BN-ReLU-conv-BN (+ option-A shortcut), ReLU; [N, H, W, C] -> [N, H/s, W/s, planes]."""
  planes: int
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    y = nn.relu(_conv("conv1", self.planes, self.strides)(x))
    y = _conv("conv2", self.planes)(y)
    if self.strides != 1 or x.shape[-1] != self.planes:
      pad = self.planes // 4
      x = jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (pad, pad)))
    return nn.relu(y + x)


class ResNet56(nn.Module):
  """Normalised [N, H, W, 3] -> (features [N, 64], logits [N, 10])."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(_conv("conv1", STAGE_WIDTHS[0])(x))
    for s, width in enumerate(STAGE_WIDTHS):
      for b in range(BLOCKS_PER_STAGE):
        strides = 2 if (s > 0 and b == 0) else 1
        x = BasicBlock(width, strides, name=f"layer{s + 1}_{b}")(x)
    feats = jnp.mean(x, axis=(1, 2))
    return feats, nn.Dense(NUM_CLASSES, precision=_HIGHEST, name="linear")(feats)


def expected_state_dict_shapes() -> dict:
  """{state-dict name (without 'module.'): shape} of the akamaster ResNet56."""
  out = {}

  def conv_bn(conv, bn, cin, cout):
    out[f"{conv}.weight"] = (cout, cin, 3, 3)
    for stat in ("weight", "bias", "running_mean", "running_var"):
      out[f"{bn}.{stat}"] = (cout,)

  conv_bn("conv1", "bn1", 3, STAGE_WIDTHS[0])
  cin = STAGE_WIDTHS[0]
  for s, width in enumerate(STAGE_WIDTHS):
    for b in range(BLOCKS_PER_STAGE):
      conv_bn(f"layer{s + 1}.{b}.conv1", f"layer{s + 1}.{b}.bn1", cin, width)
      conv_bn(f"layer{s + 1}.{b}.conv2", f"layer{s + 1}.{b}.bn2", width, width)
      cin = width
  out["linear.weight"] = (NUM_CLASSES, FEATURE_DIM)
  out["linear.bias"] = (NUM_CLASSES,)
  return out


def params_from_torch_state_dict(sd: Mapping[str, np.ndarray]) -> dict:
  """State dict (numpy, 'module.' prefix optional; num_batches_tracked ignored) -> variables."""
  sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()
        if not k.endswith("num_batches_tracked")}
  inception.check_state_dict(sd, expected_state_dict_shapes(), "CIFAR-10 ResNet56")
  params = {"conv1": inception.fold_batchnorm(sd, "conv1.weight", "bn1", BN_EPS),
            "linear": {"kernel": np.asarray(sd["linear.weight"], np.float32).T,
                       "bias": np.asarray(sd["linear.bias"], np.float32)}}
  for s in range(1, len(STAGE_WIDTHS) + 1):
    for b in range(BLOCKS_PER_STAGE):
      prefix = f"layer{s}.{b}"
      params[f"layer{s}_{b}"] = {
          conv: inception.fold_batchnorm(sd, f"{prefix}.{conv}.weight", f"{prefix}.{bn}", BN_EPS)
          for conv, bn in (("conv1", "bn1"), ("conv2", "bn2"))}
  return {"params": params}


def load_proxy_params(path) -> dict:
  """Reads `resnet56-cifar10-*.th` (torch.save, legacy or zip; no torch) -> Linen variables."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"ResNet56 proxy weights not found at {path} (see "
                            "../shared/weights/README.md: resnet56-cifar10-4bfd9763.th)")
  try:
    return params_from_torch_state_dict(safe_unpickle.load_torch_state_dict(path))
  except inception.InceptionWeightsError as e:
    raise inception.InceptionWeightsError(f"{path}: {e}") from None


@jax.jit
def forward(variables, images):
  """uint8 [N, H, W, 3] -> (features [N, 64], logits [N, 10]) float32 (ImageNet-normalised input)."""
  x = (images.astype(jnp.float32) / 255.0 - MEAN) / STD
  return ResNet56().apply(variables, x)
