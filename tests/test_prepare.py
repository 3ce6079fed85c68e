"""--mode=prepare: EDM dataset zips from the shared JPEG zip and from mock tfds, read back by the
project's own edm_zip loader with the same images and labels."""

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from conftest import ROOT, shared_path
from uni_instruct_jax import data
from uni_instruct_jax import prepare


def _all(config, **fields):
  """(uint8 images [N, H, W, C], class ids [N] or None) of a data config, in dataset order."""
  config = data.get_data_config() if config is None else config.copy_and_resolve_references()
  config.update(shuffle=False, prefetch=0, num_threads=0, **fields)
  dataset = data.create_dataset(config, 1, 0, 0, 1)
  batches = [dataset.next() for _ in range(dataset.num_examples)]
  images = np.concatenate([np.rint((b['image'] + 1) * 127.5).astype(np.uint8) for b in batches])
  labels = np.concatenate([b['label'].argmax(1) for b in batches]) if dataset.label_dim else None
  return images, labels


def _check_layout(path, count, labelled):
  with zipfile.ZipFile(path) as archive:
    infos = archive.infolist()
    assert [i.filename for i in infos] == [f'00000/img{i:08d}.png' for i in range(count)] + [
        'dataset.json']
    assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
    labels = json.loads(archive.read('dataset.json'))['labels']
  if not labelled:
    assert labels is None
    return None
  assert [name for name, _ in labels] == [i.filename for i in infos[:-1]]
  return np.asarray([label for _, label in labels])


def test_shared_jpeg_zip_subset_round_trips(tmp_path):
  source = prepare.data_config_for(str(shared_path('data', 'cifar10-test-jpeg.zip')), max_size=24)
  progress = []
  summary = prepare.prepare_dataset(source, tmp_path / 'cifar.zip', batch_size=10,
                                    progress=lambda *a: progress.append(a))
  assert progress == [(10, 24), (20, 24), (24, 24)]
  assert (summary['num_images'], summary['resolution'], summary['channels']) == (24, 32, 3)
  labels = _check_layout(tmp_path / 'cifar.zip', 24, labelled=True)
  want_images, want_labels = _all(source)
  got_images, got_labels = _all(None, source='edm_zip', path=str(tmp_path / 'cifar.zip'),
                                use_labels=True)
  np.testing.assert_array_equal(got_images, want_images)
  np.testing.assert_array_equal(got_labels, want_labels)
  np.testing.assert_array_equal(labels, want_labels)
  assert len(set(want_labels)) > 3  # a real mix of classes, not one folder
  # Without labels, and refusing to overwrite.
  prepare.prepare_dataset(prepare.data_config_for(str(tmp_path / 'cifar.zip'), labels=False),
                          tmp_path / 'copy.zip')
  _check_layout(tmp_path / 'copy.zip', 24, labelled=False)
  with pytest.raises(prepare.PrepareError, match='already exists'):
    prepare.prepare_dataset(source, tmp_path / 'copy.zip')


def test_mock_tfds_cifar10_and_imagenet_centre_crop(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=12):
    cifar = prepare.data_config_for('tfds:cifar10')
    cifar.tfds_download = False
    prepare.prepare_dataset(cifar, tmp_path / 'cifar.zip', batch_size=5)
    want_images, want_labels = _all(cifar)
    assert want_images.shape == (12, 32, 32, 3)
    np.testing.assert_array_equal(_check_layout(tmp_path / 'cifar.zip', 12, True), want_labels)
    got_images, got_labels = _all(None, source='edm_zip', path=str(tmp_path / 'cifar.zip'),
                                  use_labels=True)
    np.testing.assert_array_equal(got_images, want_images)
    np.testing.assert_array_equal(got_labels, want_labels)

    imagenet = prepare.data_config_for('tfds:imagenet2012', resolution=16)
    imagenet.tfds_download = False
    assert imagenet.imagenet_preprocess  # EDM's centre crop, automatically
    prepare.prepare_dataset(imagenet, tmp_path / 'imagenet.zip')
    source = tfds.data_source('imagenet2012', split='train', download=False,
                              builder_kwargs={'file_format': 'array_record'})
    raw = [source[i] for i in range(12)]
    got_images, got_labels = _all(None, source='edm_zip', path=str(tmp_path / 'imagenet.zip'),
                                  use_labels=True)
    for got, example in zip(got_images, raw):
      np.testing.assert_array_equal(got, data.center_crop_lanczos(np.asarray(example['image']), 16))
    np.testing.assert_array_equal(got_labels, [int(e['label']) for e in raw])


def test_bad_input(tmp_path):
  jpeg_zip = str(shared_path('data', 'cifar10-test-jpeg.zip'))
  with pytest.raises(prepare.PrepareError, match='needs --resolution'):
    prepare.data_config_for('tfds:imagenet2012')
  with pytest.raises(prepare.PrepareError, match='.zip file'):
    prepare.prepare_dataset(prepare.data_config_for(jpeg_zip), tmp_path / 'out.tar')
  with pytest.raises(prepare.PrepareError, match='does not exist'):
    prepare.prepare_dataset(prepare.data_config_for(jpeg_zip), tmp_path / 'no' / 'out.zip')
  with pytest.raises(data.DataError, match='expected 16x16'):
    prepare.prepare_dataset(prepare.data_config_for(jpeg_zip, resolution=16, max_size=2),
                            tmp_path / 'out.zip')
  assert not list(tmp_path.iterdir())  # nothing half-written
  proc = subprocess.run([sys.executable, '-m', 'uni_instruct_jax.prepare',
                         f'--source={tmp_path / "missing"}', f'--out={tmp_path / "x.zip"}'],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and proc.stderr.startswith('error: ')
  assert proc.stderr.count('\n') == 1 and 'does not exist' in proc.stderr, proc.stderr
