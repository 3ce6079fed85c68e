"""A Gaussian mixture whose means are real CIFAR-10 images: an image teacher with an exact score.

The data law is p_0 = (1/K) sum_k N(mu_k, s^2 I) on flattened R x R x 3 images (d = 3 R^2, data
units [-1, 1]), where mu_k are K CIFAR-10 training images. It is a `toy.GaussianMixture`, so its
EDM denoiser, score and log-density at every sigma and its exact sampler are toy.py's closed forms;
this module only chooses and prepares the means and converts between images and flat vectors.

Choice of means (deterministic): the classes are the sorted folder names of the zip
(`train/<class>/<NNNN>.jpg`, i.e. the standard CIFAR-10 order airplane ... truck); mean k is the
(k // C)-th image in sorted file-name order of class k % C (C = 10 classes), so the classes take
turns and K = 32 uses 4 images of classes 0-1 and 3 of the others.
Downsampling: `data.resize_square`, i.e. a box filter (the mean of each f x f block, f = 32 / R,
rounded half up to uint8 — exactly what `data.resolution=R, data.resize=True` gives for the same
image); then x / 127.5 - 1. R must divide the native side 32.
Flat layout: row-major over (H, W, C), so `to_images` / `to_flat` are plain reshapes of NHWC.
"""

import dataclasses
import io
import os
import posixpath
import zipfile
from typing import Any, Tuple

import numpy as np
import PIL.Image

from uni_instruct_jax import data as data_lib
from uni_instruct_jax import toy

NATIVE_RESOLUTION = 32
CHANNELS = 3
DEFAULT_NUM_MODES = 32
DEFAULT_RESOLUTION = 8
# Per-pixel std s of every component (data units; 6.4 uint8 levels). At R = 8 a sample lies
# s sqrt(192) = 0.69 from its mean, while the closest two of the first 64 means are 2.70 apart.
DEFAULT_STD = 0.05


class ImageMixtureError(toy.ToyDataError):
  """Bad image-mixture input: missing or unreadable zip, bad K, R or shapes."""


@dataclasses.dataclass(frozen=True)
class ImageMixture(toy.GaussianMixture):
  """A `toy.GaussianMixture` over flattened [resolution, resolution, 3] images.

  Attributes (besides means [K, d], std, weights):
    resolution: image side R (d = 3 R^2).
    sources: zip member name of each mean's image [K].
  """
  resolution: int = 0
  sources: Tuple[str, ...] = ()

  def __post_init__(self):
    super().__post_init__()
    if self.dim != CHANNELS * self.resolution**2:
      raise ImageMixtureError(f"means have {self.dim} coordinates, not 3 x {self.resolution}^2")
    if len(self.sources) != self.num_modes:
      raise ImageMixtureError(f"{len(self.sources)} source names for {self.num_modes} means")

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    return (self.resolution, self.resolution, CHANNELS)

  def to_images(self, x: Any) -> Any:
    """Flat samples [N, d] -> NHWC images [N, R, R, 3]: a reshape (numpy or jax, traceable)."""
    if len(np.shape(x)) != 2 or np.shape(x)[1] != self.dim:
      raise ImageMixtureError(f"flat samples must have shape [N, {self.dim}], got {np.shape(x)}")
    return x.reshape((-1,) + self.image_shape)

  def to_flat(self, images: Any) -> Any:
    """NHWC images [N, R, R, 3] -> flat samples [N, d]: a reshape (numpy or jax, traceable)."""
    if len(np.shape(images)) != 4 or tuple(np.shape(images)[1:]) != self.image_shape:
      raise ImageMixtureError(f"images must have shape [N, {', '.join(map(str, self.image_shape))}"
                              f"], got {np.shape(images)}")
    return images.reshape(-1, self.dim)


def _class_members(zf: zipfile.ZipFile, path: str) -> Tuple[Tuple[str, ...], ...]:
  """Per class (sorted folder names), its .jpg/.png member names in sorted order."""
  by_class = {}
  for name in sorted(zf.namelist()):
    if os.path.splitext(name)[1].lower() in (".jpg", ".jpeg", ".png"):
      by_class.setdefault(posixpath.basename(posixpath.dirname(name)), []).append(name)
  if not by_class:
    raise ImageMixtureError(f"{path} holds no class folders of images")
  return tuple(tuple(by_class[c]) for c in sorted(by_class))


def _load_mean(zf: zipfile.ZipFile, path: str, name: str, resolution: int) -> np.ndarray:
  """One mean: the member `name` box-downsampled to [R, R, 3], in data units, float64."""
  try:
    with PIL.Image.open(io.BytesIO(zf.read(name))) as image:
      pixels = np.asarray(image.convert("RGB"))
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
    raise ImageMixtureError(f"cannot read {path}:{name}: {e}") from e
  if pixels.shape != (NATIVE_RESOLUTION, NATIVE_RESOLUTION, CHANNELS):
    raise ImageMixtureError(f"{path}:{name} is {pixels.shape}, expected 32x32x3")
  return data_lib.resize_square(pixels, resolution).astype(np.float64) / 127.5 - 1.0


def cifar10_mixture(path: str, num_modes: int = DEFAULT_NUM_MODES,
                    resolution: int = DEFAULT_RESOLUTION, std: float = DEFAULT_STD) -> ImageMixture:
  """The equal-weight mixture of `num_modes` CIFAR-10 images of the zip at `path` (see module doc).

  Args:
    path: a zip of class folders of 32x32 RGB images (../shared/data/cifar10-train-jpeg.zip).
    num_modes: K >= 1 (the issue's grid uses 16-64), at most the number of images.
    resolution: R, a divisor of 32 (8 -> d = 192).
    std: per-pixel component std s (data units, > 0).
  """
  if isinstance(num_modes, bool) or not isinstance(num_modes, (int, np.integer)) or num_modes < 1:
    raise ImageMixtureError(f"num_modes must be an integer >= 1, got {num_modes!r}")
  if (isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer))
      or resolution < 1 or NATIVE_RESOLUTION % resolution):
    raise ImageMixtureError(f"resolution must divide {NATIVE_RESOLUTION} (box downsampling), "
                            f"got {resolution!r}")
  if not os.path.isfile(path):
    raise ImageMixtureError(f"image zip {path!r} does not exist")
  try:
    zf = zipfile.ZipFile(path)
  except (OSError, zipfile.BadZipFile) as e:
    raise ImageMixtureError(f"{path} is not a readable zip file: {e}") from e
  with zf:
    classes = _class_members(zf, path)
    count = len(classes)
    if any(len(classes[k % count]) <= k // count for k in range(num_modes)):
      raise ImageMixtureError(f"num_modes {num_modes} exceeds the images of {path} taken in turn "
                              f"from its {count} classes")
    sources = tuple(classes[k % count][k // count] for k in range(num_modes))
    means = np.stack([_load_mean(zf, path, name, resolution).reshape(-1) for name in sources])
  return ImageMixture(means=means, std=std, resolution=int(resolution), sources=sources)


def mixture_from_config(data_config) -> ImageMixture:
  """`cifar10_mixture` of a config's data section (path, num_modes, resolution, mixture_std)."""
  return cifar10_mixture(data_config.path, num_modes=data_config.num_modes,
                         resolution=data_config.resolution, std=data_config.mixture_std)
