"""Writes a dataset as an EDM dataset zip (the layout of EDM's dataset_tool.py).

  python -m uni_instruct_jax.prepare --source=tfds:cifar10 --out=cifar10-32x32.zip
  python -m uni_instruct_jax.prepare --source=tfds:imagenet2012 --resolution=64 \
      --out=imagenet-64x64.zip
  python -m uni_instruct_jax.prepare --source=path/to/folder_or.zip --resolution=32 --resize \
      --out=mine-32x32.zip

The zip holds `{i // 1000:05d}/img{i:08d}.png` (uncompressed PNGs, as dataset_tool.py writes them)
and `dataset.json` = {"labels": [[name, class], ...]} (or null without labels); it is what
`data.source='edm_zip'` and EDM's training/dataset.py read. Images come through this project's
data pipeline (`data.create_dataset`), so the transforms are data.py's: `--center_crop` (automatic
for tfds imagenet2012) is EDM's `--transform=center-crop` (centre square, PIL Lanczos to
`--resolution`), `--resize` box-filters integer downsampling of square images. tfds
`imagenet_resized/64x64` is box-downsampled without EDM's crop: its FIDs against EDM's ImageNet
reference statistics are not comparable (data.py warns). Bad input prints one `error: ...` line on
stderr and exits with status 2.
"""

import concurrent.futures
import json
import os
import pathlib
import zipfile
from typing import Any, Callable, Dict, Optional

from absl import app
from absl import flags
import ml_collections
import numpy as np

from uni_instruct_jax import cli
from uni_instruct_jax import data
from uni_instruct_jax import image_folder
from uni_instruct_jax import progress as progress_lib


class PrepareError(ValueError):
  """An output path or option that cannot be used."""


def edm_zip_name(index: int) -> str:
  """Archive name of image `index` in dataset_tool.py's layout: '00001/img00001234.png'."""
  return f'{index // 1000:05d}/img{index:08d}.png'


def _label_entry(row: np.ndarray) -> Any:
  """A one-hot row -> its class id; any other label vector -> its values (EDM allows both)."""
  if np.count_nonzero(row) == 1 and row.max() == 1:
    return int(row.argmax())
  return [float(v) for v in row]


def prepare_dataset(data_config: ml_collections.ConfigDict, out: str | os.PathLike, *,
                    batch_size: int = 256, overwrite: bool = False,
                    progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, Any]:
  """Writes every image of `data_config` (a config.data section) to the EDM zip `out`.

  Images are taken unshuffled, after data.py's transforms (resolution, resize,
  imagenet_preprocess) and its max_size subset; labels when `data_config.use_labels`. The zip is
  written under a temporary name and renamed, so `out` is complete whenever it exists.

  Returns:
    {'path', 'num_images', 'resolution', 'channels', 'label_dim', 'source'}.
  Raises:
    data.DataError for an unusable source, PrepareError for an unusable `out`.
  """
  out = pathlib.Path(out)
  if out.suffix.lower() != '.zip':
    raise PrepareError(f'the output {out} must be a .zip file')
  if out.exists() and not overwrite:
    raise PrepareError(f'{out} already exists (overwrite=True / --overwrite replaces it)')
  if not out.parent.is_dir():
    raise PrepareError(f'the output directory {out.parent} does not exist')
  config = ml_collections.ConfigDict(data_config.to_dict())
  config.update(shuffle=False)
  dataset = data.create_dataset(config, batch_size, 0, 0, 1)
  total = dataset.num_examples
  labels = []
  tmp = out.with_name(out.name + '.tmp')
  try:
    with zipfile.ZipFile(tmp, 'w', zipfile.ZIP_STORED) as archive, \
        concurrent.futures.ThreadPoolExecutor(max(1, config.num_threads)) as pool:
      for start in range(0, total, batch_size):
        batch = dataset.next()
        count = min(batch_size, total - start)  # the last batch runs into the next epoch
        images = np.rint((batch['image'][:count] + 1) * 127.5).astype(np.uint8)
        encoded = pool.map(lambda image: image_folder.png_bytes(image, compress_level=0), images)
        for index, png in enumerate(encoded, start):
          archive.writestr(zipfile.ZipInfo(edm_zip_name(index), (1980, 1, 1, 0, 0, 0)), png)
        if dataset.label_dim:
          labels += [_label_entry(row) for row in batch['label'][:count]]
        if progress is not None:
          progress(start + count, total)
      entries = ([[edm_zip_name(i), label] for i, label in enumerate(labels)]
                 if dataset.label_dim else None)
      archive.writestr(zipfile.ZipInfo('dataset.json', (1980, 1, 1, 0, 0, 0)),
                       json.dumps({'labels': entries}))
    tmp.replace(out)
  finally:
    dataset.close()
    tmp.unlink(missing_ok=True)
  return {'path': str(out), 'num_images': total, 'resolution': dataset.resolution,
          'channels': dataset.num_channels, 'label_dim': dataset.label_dim,
          'source': config.path if config.source != 'tfds' else
                    f'tfds:{config.tfds_name}:{config.split}'}


def data_config_for(source: str, resolution: int = 0, center_crop: bool = False,
                    resize: bool = False, labels: bool = True, max_size: int = 0,
                    tfds_data_dir: str = '') -> ml_collections.ConfigDict:
  """The data config of a CLI `--source`: 'tfds:NAME[:SPLIT]' or a folder / .zip path."""
  config = data.get_data_config()
  if source.startswith('tfds:'):
    name, _, split = source[len('tfds:'):].partition(':')
    config.update(source='tfds', tfds_name=name, split=split or 'train',
                  tfds_data_dir=tfds_data_dir)
    center_crop = center_crop or name.startswith('imagenet2012')
  else:
    config.update(source='folder', path=source)
  if center_crop and not resolution:
    raise PrepareError('--center_crop (EDM\'s --transform=center-crop; automatic for tfds '
                       'imagenet2012) needs --resolution, e.g. --resolution=64')
  config.update(resolution=resolution, imagenet_preprocess=center_crop, resize=resize,
                use_labels=labels, max_size=max_size)
  return config


if __name__ == '__main__':
  # Flags are defined here, not at import, so that importing this module adds no global flags.
  _SOURCE = flags.DEFINE_string('source', None, "'tfds:NAME[:SPLIT]' (e.g. tfds:cifar10, "
                                "tfds:imagenet2012:train) or an image folder / .zip.")
  _OUT = flags.DEFINE_string('out', None, 'Output EDM dataset zip, e.g. cifar10-32x32.zip.')
  _RESOLUTION = flags.DEFINE_integer('resolution', 0, 'Output side in pixels (0 = native).')
  _CENTER_CROP = flags.DEFINE_bool('center_crop', False, "EDM's --transform=center-crop "
                                   '(automatic for tfds imagenet2012).')
  _RESIZE = flags.DEFINE_bool('resize', False, 'Resample square images of another resolution.')
  _LABELS = flags.DEFINE_bool('labels', True, 'Write class labels (--nolabels for none).')
  _MAX_SIZE = flags.DEFINE_integer('max_size', 0, "Keep EDM's random subset of this many images "
                                   '(data.max_size); 0 = all.')
  _TFDS_DATA_DIR = flags.DEFINE_string('tfds_data_dir', '', 'tfds data_dir (default: tfds\').')
  _OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing --out.')

  def _main(argv):
    try:
      if len(argv) > 1:
        raise PrepareError(f'unexpected arguments {argv[1:]}')
      if not _SOURCE.value or not _OUT.value:
        raise PrepareError('both --source and --out are required')
      config = data_config_for(_SOURCE.value, _RESOLUTION.value, _CENTER_CROP.value,
                               _RESIZE.value, _LABELS.value, _MAX_SIZE.value, _TFDS_DATA_DIR.value)
      summary = prepare_dataset(config, _OUT.value, overwrite=_OVERWRITE.value,
                                progress=progress_lib.Progress('prepare'))
    except (PrepareError, data.DataError) as e:
      hint = ' (--nolabels writes none)' if 'use_labels' in str(e) else ''
      cli.fail(f'{e}{hint}')
    print(json.dumps(summary))

  app.run(_main, flags_parser=cli.parse_flags)
