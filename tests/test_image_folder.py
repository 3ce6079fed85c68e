"""EDM generate.py image folders: file layout, PNG content, dataset.json labels, per-seed inputs."""

import json
import os

import numpy as np
import PIL.Image
import pytest

from uni_instruct_jax import data
from uni_instruct_jax import image_folder


def _images(n, channels=3, size=8, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def test_layout_content_and_labels_read_back(tmp_path):
  seeds = [0, 1, 999, 1000, 2500]
  images = _images(len(seeds))
  labels = [3, 0, 9, 3, 1]
  progress = []
  out = image_folder.write_edm_folder(iter([images[:3], images[3:]]), seeds, labels,
                                      tmp_path / 'fakes', progress=lambda *a: progress.append(a))
  assert progress == [(3, 5), (5, 5)]
  files = sorted(os.path.relpath(os.path.join(root, f), out).replace(os.sep, '/')
                 for root, _, names in os.walk(out) for f in names)
  expected = ['000000/000000.png', '000000/000001.png', '000000/000999.png',
              '001000/001000.png', '002000/002500.png']
  assert files == sorted(expected + ['dataset.json'])
  for name, image in zip(expected, images):
    with PIL.Image.open(out / name) as png:
      assert png.format == 'PNG' and png.mode == 'RGB'
      np.testing.assert_array_equal(np.asarray(png), image)
  assert json.loads((out / 'dataset.json').read_text()) == {
      'labels': [[n, c] for n, c in zip(expected, labels)]}
  # This project's folder reader sees the same images and labels (EDM's dataset.json rules).
  config = data.get_data_config()
  config.update(path=str(out), use_labels=True, shuffle=False, prefetch=0, num_threads=0)
  dataset = data.create_dataset(config, len(seeds), 0, 0, 1)
  batch = dataset.next()
  np.testing.assert_array_equal(np.rint((batch['image'] + 1) * 127.5).astype(np.uint8), images)
  np.testing.assert_array_equal(batch['label'].argmax(1), labels)
  assert dataset.label_dim == 10


def test_grey_unconditional_and_flat(tmp_path):
  images = _images(2, channels=1)
  out = image_folder.write_edm_folder([images], [7, 3], None, tmp_path / 'grey', subdirs=False)
  assert sorted(p.name for p in out.iterdir()) == ['000003.png', '000007.png', 'dataset.json']
  with PIL.Image.open(out / '000003.png') as png:
    assert png.mode == 'L'
    np.testing.assert_array_equal(np.asarray(png), images[1, :, :, 0])
  assert json.loads((out / 'dataset.json').read_text()) == {'labels': None}
  one_hot = np.eye(4)[[2, 1]]
  out = image_folder.write_edm_folder([images], [0, 1], one_hot, tmp_path / 'onehot')
  assert [c for _, c in json.loads((out / 'dataset.json').read_text())['labels']] == [2, 1]


@pytest.mark.parametrize('batches, seeds, labels, message', [
    ([_images(2)], [0, 0], None, 'distinct'),
    ([_images(2)], [0, -1], None, 'distinct'),
    ([_images(2)], [0, 1, 2], None, '2 images for 3 seeds'),
    ([_images(3)], [0, 1], None, 'more images'),
    ([_images(2).astype(np.float32)], [0, 1], None, 'uint8'),
    ([_images(1), _images(1, size=4)], [0, 1], None, 'one image shape'),
    ([_images(2)], [0, 1], [0.5, 1.0], 'class ids'),
    ([_images(2)], [0, 1], [[0.5, 0.5], [1, 0]], 'one-hot'),
])
def test_bad_input(tmp_path, batches, seeds, labels, message):
  with pytest.raises(image_folder.ImageFolderError, match=message):
    image_folder.write_edm_folder(batches, seeds, labels, tmp_path / 'out')
  assert not (tmp_path / 'out' / 'dataset.json').exists()


def test_refuses_a_non_empty_folder(tmp_path):
  (tmp_path / 'old.png').write_bytes(b'')
  with pytest.raises(image_folder.ImageFolderError, match='not an empty directory'):
    image_folder.write_edm_folder([_images(1)], [0], None, tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['old.png']


def test_seed_inputs_depend_only_on_the_seed():
  z, classes = image_folder.seed_inputs(range(200), (4, 4, 3), label_dim=10)
  z_alone, classes_alone = image_folder.seed_inputs([6], (4, 4, 3), label_dim=10)
  np.testing.assert_array_equal(z[6], z_alone[0])
  assert int(classes[6]) == int(classes_alone[0])
  assert z.shape == (200, 4, 4, 3) and z.dtype == np.float32 and not np.array_equal(z[0], z[1])
  assert abs(float(np.mean(z))) < 0.05 and abs(float(np.std(z)) - 1) < 0.05
  assert int(np.min(classes)) == 0 and int(np.max(classes)) == 9
  _, fixed = image_folder.seed_inputs([6], (4, 4, 3), label_dim=10, class_idx=4)
  assert list(np.asarray(fixed)) == [4]
  z_uncond, none = image_folder.seed_inputs([6], (4, 4, 3), label_dim=0)
  assert none is None
  np.testing.assert_array_equal(z_uncond, z_alone)
  with pytest.raises(image_folder.ImageFolderError, match='class_idx'):
    image_folder.seed_inputs([1], (2,), label_dim=10, class_idx=10)


def test_generated_folder_matches_each_seed_alone(tmp_path):
  """Files depend only on their seed (batching and padding of the last batch do not matter) and
  dataset.json records the class each image was generated with."""
  calls = []

  def generate(z, labels):  # image = a function of the latent, label colour in channel 0
    calls.append(z.shape[0])
    images = np.clip(np.asarray(z) * 40 + 128, 0, 255).astype(np.uint8)
    images[..., 0] = np.asarray(labels).argmax(1)[:, None, None] * 20
    return images

  seeds = list(range(995, 1005))
  out = image_folder.write_generated_folder(generate, seeds, (4, 4, 3), 10, tmp_path / 'gen',
                                            batch_size=4)
  assert calls == [4, 4, 4]
  labels = dict(json.loads((out / 'dataset.json').read_text())['labels'])
  for seed in (995, 1000, 1004):
    z, ids = image_folder.seed_inputs([seed], (4, 4, 3), 10)
    alone = generate(z, np.eye(10)[np.asarray(ids)])[0]
    name = image_folder.seed_path(seed)
    with PIL.Image.open(out / name) as png:
      np.testing.assert_array_equal(np.asarray(png), alone)
    assert labels[name] == int(ids[0])
  assert len(labels) == 10 and len(set(labels.values())) > 1
