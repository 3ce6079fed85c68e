"""uni_instruct_jax.data: real loaders (shared CIFAR-10 JPEG zip, fabricated EDM zips, image
folders, mock tfds), deterministic order, per-process sharding, exact resume, clear errors."""

import io
import json
import zipfile

import numpy as np
import PIL.Image
import pytest

from conftest import shared_path
from uni_instruct_jax import data

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]


def make_config(**fields):
  config = data.get_data_config()
  config.update(prefetch=0, num_threads=0)
  config.update(**fields)
  return config


def open_dataset(batch=8, seed=0, process=(0, 1), state=None, **fields):
  return data.create_dataset(make_config(**fields), batch, seed, process[0], process[1], state=state)


@pytest.fixture(scope="module")
def cifar_zip():
  return str(shared_path("data", "cifar10-test-jpeg.zip"))


def _png(image):
  buf = io.BytesIO()
  PIL.Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def _images(n, size=8, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def edm_zip(path, images, labels):
  """An archive in EDM dataset_tool.py's layout: 00000/img00000000.png + dataset.json."""
  names = [f"{i // 1000:05d}/img{i:08d}.png" for i in range(len(images))]
  with zipfile.ZipFile(path, "w") as z:
    for name, image in zip(names, images):
      z.writestr(name, _png(image))
    z.writestr("dataset.json", json.dumps(
        {"labels": None if labels is None else [[n, l] for n, l in zip(names, labels)]}))
  return str(path)


# ------------------------------------------------------------------------------------------------
# The shared CIFAR-10 JPEG zip


def test_cifar10_jpeg_zip_images_and_labels(cifar_zip):
  ds = open_dataset(batch=16, path=cifar_zip, use_labels=True, shuffle=False)
  assert (ds.num_examples, ds.resolution, ds.num_channels, ds.label_dim) == (10_000, 32, 3, 10)
  batch = ds.next()
  assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.float32
  assert -1.0 <= batch["image"].min() < batch["image"].max() <= 1.0
  np.testing.assert_array_equal(batch["label"].sum(axis=1), 1.0)
  # Sorted names: test/airplane/... first; labels follow the standard CIFAR-10 class order.
  source = ds._source
  for cls in (0, 3, 9):
    index = next(i for i, n in enumerate(source.names) if f"/{CIFAR_CLASSES[cls]}/" in n)
    image, name, label = source[index]
    assert label == cls and CIFAR_CLASSES[cls] in name and image.shape == (32, 32, 3)
  labels = np.concatenate([ds.next()["label"] for _ in range(2)])
  assert (labels.argmax(1) == 0).all()  # still airplanes (1,000 of them, unshuffled)


def test_resizing_needs_the_flag_and_box_filters_integer_factors(cifar_zip):
  with pytest.raises(data.DataError, match="data.resize=True"):
    open_dataset(path=cifar_zip, resolution=8)
  ds = open_dataset(batch=4, path=cifar_zip, resolution=8, resize=True, shuffle=False)
  native = open_dataset(batch=4, path=cifar_zip, shuffle=False)
  small = ds.next()["image"]
  big = (native.next()["image"] + 1) * 127.5
  box = np.floor(big.reshape(4, 8, 4, 8, 4, 3).mean(axis=(2, 4)) + 0.5) / 127.5 - 1
  np.testing.assert_allclose(small, box, atol=1e-6)


def test_order_is_deterministic_and_covers_each_epoch(tmp_path):
  path = edm_zip(tmp_path / "d.zip", _images(10), list(range(10)))
  a = open_dataset(batch=5, seed=3, path=path, source="edm_zip", use_labels=True)
  b = open_dataset(batch=5, seed=3, path=path, source="edm_zip", use_labels=True)
  c = open_dataset(batch=5, seed=4, path=path, source="edm_zip", use_labels=True)
  first = [a.next() for _ in range(4)]
  for x, y in zip(first, [b.next() for _ in range(4)]):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert any((x["image"] != y["image"]).any() for x, y in zip(first, [c.next() for _ in range(4)]))
  for epoch in (0, 1):  # every example exactly once per epoch, in a new order each epoch
    labels = np.concatenate([first[2 * epoch]["label"], first[2 * epoch + 1]["label"]]).argmax(1)
    assert sorted(labels) == list(range(10))
  assert not np.array_equal(np.concatenate([first[0]["label"], first[1]["label"]]),
                            np.concatenate([first[2]["label"], first[3]["label"]]))


def test_resume_continues_exactly(cifar_zip):
  ds = open_dataset(batch=8, seed=1, path=cifar_zip, use_labels=True, prefetch=2, num_threads=2)
  ds.next()
  state = json.loads(json.dumps(ds.state()))
  expected = [ds.next() for _ in range(3)]
  ds.close()
  resumed = open_dataset(batch=8, seed=1, path=cifar_zip, use_labels=True, state=state)
  for want in expected:
    got = resumed.next()
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])
  with pytest.raises(data.DataError, match="does not belong"):
    open_dataset(batch=8, seed=2, path=cifar_zip, state=state)
  with pytest.raises(data.DataError, match="malformed data state"):
    open_dataset(batch=8, seed=1, path=cifar_zip, state={"pos": 3})


def test_processes_share_the_global_batch(cifar_zip):
  whole = open_dataset(batch=12, seed=5, path=cifar_zip, use_labels=True)
  parts = [open_dataset(batch=12, seed=5, process=(p, 3), path=cifar_zip, use_labels=True)
           for p in range(3)]
  for _ in range(2):
    local = [p.next() for p in parts]
    assert all(b["image"].shape[0] == 4 for b in local)
    want = whole.next()
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in local]), want["image"])
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in local]), want["label"])
  with pytest.raises(data.DataError, match="not divisible"):
    open_dataset(batch=10, process=(0, 3), path=cifar_zip)


def test_resume_on_another_number_of_processes(cifar_zip):
  one = open_dataset(batch=12, seed=6, path=cifar_zip)
  one.next()
  state = one.state()
  want = one.next()["image"]
  for count in (2, 4):
    parts = [open_dataset(batch=12, seed=6, process=(p, count), path=cifar_zip, state=state)
             for p in range(count)]
    np.testing.assert_array_equal(np.concatenate([p.next()["image"] for p in parts]), want)
  assert parts[0].state() == one.state()  # the position is global


def test_prefetch_does_not_change_the_stream(cifar_zip):
  plain = open_dataset(batch=8, seed=2, path=cifar_zip)
  threaded = open_dataset(batch=8, seed=2, path=cifar_zip, prefetch=3, num_threads=3)
  for _ in range(3):
    np.testing.assert_array_equal(plain.next()["image"], threaded.next()["image"])
  threaded.close()


@pytest.mark.slow  # spawns 4 grain worker processes (each imports jax): ~10 s idle, ~40 s loaded
def test_grain_worker_processes_keep_the_stream_resume_and_report_bad_images(cifar_zip, tmp_path):
  plain = open_dataset(batch=6, seed=4, path=cifar_zip, use_labels=True)
  workers = open_dataset(batch=6, seed=4, path=cifar_zip, use_labels=True, worker_count=2,
                         num_threads=1)
  for _ in range(3):  # batches alternate between the two workers
    want, got = plain.next(), workers.next()
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])
    assert type(got["image"]) is np.ndarray  # not a view of grain's shared memory
  state = workers.state()
  workers.close()
  resumed = open_dataset(batch=6, seed=4, path=cifar_zip, use_labels=True, worker_count=1,
                         state=state)
  np.testing.assert_array_equal(resumed.next()["image"], plain.next()["image"])
  resumed.close()
  corrupt = tmp_path / "corrupt.zip"
  with zipfile.ZipFile(corrupt, "w") as z:
    for i, image in enumerate(_images(3)):
      z.writestr(f"a/{i}.png", _png(image))
    z.writestr("a/3.png", b"\x89PNG garbage")
  bad = open_dataset(batch=2, path=str(corrupt), shuffle=False, worker_count=2, num_threads=1)
  bad.next()  # worker 0: a/0.png, a/1.png
  with pytest.raises(data.DataError, match="cannot decode image .*3.png"):
    bad.next()  # worker 1 fails; the error crosses the process boundary unchanged
  bad.close()


# ------------------------------------------------------------------------------------------------
# EDM zips and image folders


def test_edm_zip_labels_and_max_size(tmp_path):
  images = _images(12)
  labels = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]
  path = edm_zip(tmp_path / "d.zip", images, labels)
  ds = open_dataset(batch=12, path=path, source="edm_zip", use_labels=True, shuffle=False)
  assert ds.label_dim == 10
  batch = ds.next()
  np.testing.assert_array_equal(batch["label"].argmax(1), labels)
  np.testing.assert_allclose((batch["image"] + 1) * 127.5, images, atol=1e-4)
  # EDM's max_size subset: RandomState(0) shuffle of the indices, first max_size, sorted.
  keep = np.arange(12)
  np.random.RandomState(0).shuffle(keep)
  sub = open_dataset(batch=5, path=path, source="edm_zip", use_labels=True, shuffle=False,
                     max_size=5)
  np.testing.assert_array_equal(sub.next()["label"].argmax(1), np.asarray(labels)[np.sort(keep[:5])])
  # Unlabelled EDM zip: use_labels is an error, label_dim 0 otherwise.
  plain = edm_zip(tmp_path / "u.zip", images, None)
  assert open_dataset(path=plain, source="edm_zip").label_dim == 0
  with pytest.raises(data.DataError, match="no labels"):
    open_dataset(path=plain, source="edm_zip", use_labels=True)


def test_image_folder_with_class_directories(tmp_path):
  images = _images(6)
  for i, image in enumerate(images):
    folder = tmp_path / "root" / ("cats" if i % 2 else "dogs")
    folder.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(image).save(folder / f"{i}.png")
  ds = open_dataset(batch=6, path=str(tmp_path / "root"), use_labels=True, shuffle=False)
  assert ds.label_dim == 2
  batch = ds.next()
  np.testing.assert_array_equal(batch["label"].argmax(1), [0, 0, 0, 1, 1, 1])  # cats, dogs
  np.testing.assert_allclose((batch["image"][0] + 1) * 127.5, images[1], atol=1e-4)
  with pytest.raises(data.DataError, match="not an EDM dataset"):
    open_dataset(path=str(tmp_path / "root"), source="edm_zip")


def test_imagenet_preprocessing_is_centre_crop_and_lanczos():
  image = np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8)
  out = data.center_crop_lanczos(image, 16)
  want = np.asarray(PIL.Image.fromarray(image[:, 15:65]).resize((16, 16), PIL.Image.LANCZOS))
  np.testing.assert_array_equal(out, want)
  grey = data.center_crop_lanczos(image[:, :, :1], 16)
  assert grey.shape == (16, 16, 3) and (grey[..., 0] == grey[..., 2]).all()


# ------------------------------------------------------------------------------------------------
# tfds (optional extra; mock data, never a download)


def test_tfds_source_with_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=20):
    ds = open_dataset(batch=4, source="tfds", tfds_name="cifar10", use_labels=True,
                      tfds_download=False, resolution=8, resize=True)
    assert (ds.num_examples, ds.label_dim, ds.resolution) == (20, 10, 8)
    batch = ds.next()
    assert batch["image"].shape == (4, 8, 8, 3) and batch["label"].shape == (4, 10)
    with pytest.warns(UserWarning, match="statistics differ"):
      try:
        open_dataset(source="tfds", tfds_name="imagenet_resized/64x64", tfds_download=False)
      except data.DataError:
        pass
  with pytest.raises(data.DataError, match="imagenet_preprocess"):
    open_dataset(source="tfds", tfds_name="imagenet2012")


# ------------------------------------------------------------------------------------------------
# Bad input


def test_bad_paths_and_files_give_clear_errors(tmp_path):
  with pytest.raises(data.DataError, match="does not exist"):
    open_dataset(path=str(tmp_path / "missing.zip"))
  with pytest.raises(data.DataError, match="data.path is empty"):
    open_dataset(path="")
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(data.DataError, match="neither a directory nor a .zip"):
    open_dataset(path=str(tmp_path / "notes.txt"))
  (tmp_path / "bad.zip").write_bytes(b"not a zip")
  with pytest.raises(data.DataError, match="not a readable zip"):
    open_dataset(path=str(tmp_path / "bad.zip"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(data.DataError, match="no image files"):
    open_dataset(path=str(tmp_path / "empty"))
  with pytest.raises(data.DataError, match="unknown data.source"):
    open_dataset(source="webdataset", path=str(tmp_path))
  corrupt = tmp_path / "corrupt.zip"
  with zipfile.ZipFile(corrupt, "w") as z:
    z.writestr("a/0.png", _png(_images(1)[0]))
    z.writestr("a/1.png", b"\x89PNG garbage")
  ds = open_dataset(batch=2, path=str(corrupt), shuffle=False)
  with pytest.raises(data.DataError, match="cannot decode image .*1.png"):
    ds.next()
  with zipfile.ZipFile(tmp_path / "badjson.zip", "w") as z:
    z.writestr("0.png", _png(_images(1)[0]))
    z.writestr("dataset.json", "{labels: oops")
  with pytest.raises(data.DataError, match="malformed .*dataset.json"):
    open_dataset(path=str(tmp_path / "badjson.zip"), source="edm_zip")
