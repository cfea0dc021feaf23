"""Tests of dssgd_jax.data: file readers, tfds, preprocessing, prepare(cfg).

Every reader is tested on small files written here in the exact original
format (idx with magic numbers and dimensions, MATLAB .mat, CIFAR-10 pickled
batches); tensorflow-datasets through ``tfds.testing.mock_data``; and the real
Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package when installed.
"""

import gzip
import importlib.util
import io
import os
import pickle
import re
import tarfile
import tempfile
import types

import numpy as np
import pytest

from dssgd_jax import data
from dssgd_jax.data import files
from dssgd_jax.data import tfds_source
from dssgd_jax.data import transforms
from dssgd_jax.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_sentence(msg: str) -> str:
  assert "\n" not in msg and msg.endswith("."), msg
  return msg


def load_error(*args, **kwargs) -> str:
  with pytest.raises(DataError) as e:
    data.load_dataset(*args, **kwargs)
  return one_sentence(str(e.value))


# ----------------------------------------------------------------------------
# Writers of the original formats.


def write_idx(path, array, magic, gz=False, cut=0, extra=b""):
  array = np.asarray(array, np.uint8)
  header = magic.to_bytes(4, "big") + b"".join(
      d.to_bytes(4, "big") for d in array.shape)
  payload = header + array.tobytes() + extra
  if cut:
    payload = payload[:-cut]
  if gz:
    path += ".gz"
    with gzip.open(path, "wb") as f:
      f.write(payload)
  else:
    with open(path, "wb") as f:
      f.write(payload)
  return path


def make_mnist_arrays(n, seed):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
  labels = (np.arange(n) % 10).astype(np.uint8)
  return images, labels


def write_mnist_dir(d, gz=False, n_train=50, n_test=20):
  os.makedirs(d, exist_ok=True)
  out = {}
  for split, prefix, n in (("train", "train", n_train),
                           ("test", "t10k", n_test)):
    x, y = make_mnist_arrays(n, seed=n)
    write_idx(os.path.join(d, f"{prefix}-images-idx3-ubyte"), x, 2051, gz=gz)
    write_idx(os.path.join(d, f"{prefix}-labels-idx1-ubyte"), y, 2049, gz=gz)
    out[split] = (x, y)
  return out


def svhn_arrays(n, seed, marker=0):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
  x[0, 0, 0, :] = marker  # tells train and extra examples apart
  y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)  # 10 = digit 0
  return x, y


def write_svhn_dir(d, n_train=30, n_test=25, n_extra=None):
  import scipy.io  # pylint: disable=g-import-not-at-top
  os.makedirs(d, exist_ok=True)
  out = {}
  sizes = {"train": n_train, "test": n_test, "extra": n_extra}
  for split, n in sizes.items():
    if n is None:
      continue
    x, y = svhn_arrays(n, seed=n, marker=255 if split == "extra" else 0)
    scipy.io.savemat(os.path.join(d, f"{split}_32x32.mat"), {"X": x, "y": y})
    out[split] = (x, y)
  return out


def cifar_batch(n, seed):
  rng = np.random.default_rng(seed)
  return {b"batch_label": b"testing batch",
          b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
          b"labels": [int(v) for v in np.arange(n) % 10],
          b"filenames": [b"x.png"] * n}


def cifar_batches(n=8):
  names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
  return {name: cifar_batch(n, seed) for seed, name in enumerate(names)}


def write_cifar_dir(d, n=8):
  batches = cifar_batches(n)
  os.makedirs(d, exist_ok=True)
  for name, batch in batches.items():
    with open(os.path.join(d, name), "wb") as f:
      pickle.dump(batch, f)
  return batches


# ----------------------------------------------------------------------------
# MNIST family: idx files.


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_roundtrip(tmp_path, gz):
  arrays = write_mnist_dir(str(tmp_path), gz=gz)
  ds = data.load_dataset("mnist", source="files", data_dir=str(tmp_path))
  assert ds.name == "mnist" and ds.num_classes == 10
  assert ds.train_images.shape == (50, 28, 28, 1)
  assert ds.test_images.shape == (20, 28, 28, 1)
  assert ds.train_images.dtype == np.float32
  assert ds.train_labels.dtype == np.int32
  x, y = arrays["train"]
  np.testing.assert_allclose(ds.train_images[..., 0], x / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(ds.train_labels, y)
  np.testing.assert_array_equal(ds.test_labels, arrays["test"][1])


def test_idx_in_standard_subfolder_and_dotted_names(tmp_path):
  write_mnist_dir(str(tmp_path / "FashionMNIST" / "raw"), gz=True)
  ds = data.load_dataset("fashion_mnist", source="files",
                         data_dir=str(tmp_path))
  assert ds.train_images.shape == (50, 28, 28, 1)
  d = tmp_path / "dotted"
  write_mnist_dir(str(d))
  for f in os.listdir(d):
    os.rename(d / f, d / f.replace("-idx", ".idx"))
  assert len(data.load_dataset("mnist", source="files",
                               data_dir=str(d)).test_labels) == 20


def test_read_idx_doc_example_and_magic_numbers(tmp_path):
  x, y = make_mnist_arrays(3, 0)
  p = write_idx(str(tmp_path / "l"), y, 2049)
  np.testing.assert_array_equal(files.read_idx(p, 2049), y)
  p = write_idx(str(tmp_path / "i"), x, 2051)
  np.testing.assert_array_equal(files.read_idx(p, 2051, (28, 28)), x)


def test_wrong_magic_number(tmp_path):
  write_mnist_dir(str(tmp_path))
  # A label file where an image file belongs.
  _, y = make_mnist_arrays(50, 50)
  path = write_idx(str(tmp_path / "train-images-idx3-ubyte"), y, 2049)
  msg = load_error("mnist", source="files", data_dir=str(tmp_path))
  assert path in msg
  assert "magic number 2049, not 2051" in msg


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx(tmp_path, gz):
  write_mnist_dir(str(tmp_path), gz=gz)
  x, _ = make_mnist_arrays(20, 20)
  name = "t10k-images-idx3-ubyte"
  if gz:
    # Write a complete gzip stream and then cut it short: the gzip layer
    # reports the truncation.
    path = write_idx(str(tmp_path / name), x, 2051, gz=True)
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
      f.write(raw[:len(raw) // 2])
    msg = load_error("mnist", source="files", data_dir=str(tmp_path))
    assert path in msg and "not a valid gzip file or is truncated" in msg
  else:
    path = write_idx(str(tmp_path / name), x, 2051, cut=100)
    msg = load_error("mnist", source="files", data_dir=str(tmp_path))
    assert path in msg
    assert "is truncated" in msg and "announces 20 items" in msg


def test_idx_header_only_partly_there_and_overlong(tmp_path):
  p = tmp_path / "x"
  p.write_bytes(b"\x00\x00")
  with pytest.raises(DataError, match="fewer than the 4-byte"):
    files.read_idx(str(p), 2051)
  p.write_bytes((2051).to_bytes(4, "big") + b"\x00\x00\x00\x01")
  with pytest.raises(DataError, match="fewer than its 16-byte idx header"):
    files.read_idx(str(p), 2051)
  x, _ = make_mnist_arrays(2, 0)
  path = write_idx(str(tmp_path / "y"), x, 2051, extra=b"junk")
  with pytest.raises(DataError, match="4 bytes more than its header"):
    files.read_idx(path, 2051, (28, 28))


def test_not_gzip_at_all(tmp_path):
  write_mnist_dir(str(tmp_path))
  os.remove(tmp_path / "train-labels-idx1-ubyte")
  (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"plain text")
  msg = load_error("mnist", source="files", data_dir=str(tmp_path))
  assert "train-labels-idx1-ubyte.gz is not a valid gzip file" in msg


def test_idx_wrong_image_dims(tmp_path):
  write_mnist_dir(str(tmp_path))
  bad = np.zeros((50, 27, 28), np.uint8)
  write_idx(str(tmp_path / "train-images-idx3-ubyte"), bad, 2051)
  msg = load_error("mnist", source="files", data_dir=str(tmp_path))
  assert "train-images-idx3-ubyte holds items of shape (27, 28)" in msg


def test_idx_label_out_of_range(tmp_path):
  write_mnist_dir(str(tmp_path))
  _, y = make_mnist_arrays(50, 50)
  y[3] = 12
  path = write_idx(str(tmp_path / "train-labels-idx1-ubyte"), y, 2049)
  msg = load_error("mnist", source="files", data_dir=str(tmp_path))
  assert f"{path} has label 12 at index 3, outside 0..9" in msg


def test_idx_count_mismatch(tmp_path):
  write_mnist_dir(str(tmp_path))
  _, y = make_mnist_arrays(49, 49)
  write_idx(str(tmp_path / "train-labels-idx1-ubyte"), y, 2049)
  msg = load_error("mnist", source="files", data_dir=str(tmp_path))
  assert "has 50 images but" in msg and "has 49 labels" in msg


def test_missing_idx_file_and_missing_data_dir(tmp_path):
  write_mnist_dir(str(tmp_path))
  os.remove(tmp_path / "t10k-labels-idx1-ubyte")
  msg = load_error("mnist", source="files", data_dir=str(tmp_path))
  assert str(tmp_path) in msg
  assert "t10k-labels-idx1-ubyte[.gz] is missing" in msg
  missing = str(tmp_path / "nope")
  msg = load_error("mnist", source="files", data_dir=missing)
  assert msg == f"--data_dir={missing} does not exist."
  msg = load_error("mnist", source="files", data_dir=None)
  assert msg.startswith("--data_source=files needs --data_dir")
  assert "train-images-idx3-ubyte" in msg


def test_empty_dir_lists_what_was_looked_for(tmp_path):
  msg = load_error("mnist", source="files", data_dir=str(tmp_path))
  for name in files.MNIST_FILES.values():
    assert name in msg
  assert str(tmp_path) in msg and "mnist/" in msg


def test_unknown_dataset_and_source():
  assert "--dataset='imagenet' is not one of" in load_error("imagenet")
  assert "--data_source='web' is not one of" in load_error("mnist",
                                                           source="web")


# ----------------------------------------------------------------------------
# SVHN: .mat files.


def test_svhn_mat_roundtrip(tmp_path):
  arrays = write_svhn_dir(str(tmp_path / "svhn"))
  ds = data.load_dataset("svhn_cropped", source="files",
                         data_dir=str(tmp_path))
  assert ds.train_images.shape == (30, 32, 32, 3)
  assert ds.test_images.shape == (25, 32, 32, 3)
  x, y = arrays["train"]
  # X is (32, 32, 3, N): example i is X[..., i].
  np.testing.assert_allclose(ds.train_images[7], x[..., 7] / 255.0, rtol=1e-6)
  expected = y.ravel() % 10  # label 10 is the digit 0
  np.testing.assert_array_equal(ds.train_labels, expected)
  assert set(ds.train_labels.tolist()) == set(range(10))


def test_svhn_corrupt_files(tmp_path):
  import scipy.io  # pylint: disable=g-import-not-at-top
  write_svhn_dir(str(tmp_path))
  path = str(tmp_path / "test_32x32.mat")
  raw = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(raw[:len(raw) // 3])
  msg = load_error("svhn_cropped", source="files", data_dir=str(tmp_path))
  assert msg.startswith(f"{path} is not a readable MATLAB .mat file")
  with open(path, "wb") as f:
    f.write(b"this is not a MATLAB file at all" * 10)
  msg = load_error("svhn_cropped", source="files", data_dir=str(tmp_path))
  assert msg.startswith(f"{path} is not a readable MATLAB .mat file")
  x, y = svhn_arrays(5, 0)
  scipy.io.savemat(path, {"images": x, "y": y})
  msg = load_error("svhn_cropped", source="files", data_dir=str(tmp_path))
  assert msg == (f"{path} has no variable 'X', so it is not an SVHN "
                 "cropped-digits file.")
  y[2] = 11
  scipy.io.savemat(path, {"X": x, "y": y})
  msg = load_error("svhn_cropped", source="files", data_dir=str(tmp_path))
  assert f"{path} has label 11 at index 2, outside 0..10" in msg
  scipy.io.savemat(path, {"X": x[:, :, :1], "y": y})
  msg = load_error("svhn_cropped", source="files", data_dir=str(tmp_path))
  assert "has X of shape (32, 32, 1, 5), not (32, 32, 3, N)" in msg


def test_svhn_missing_test_file(tmp_path):
  write_svhn_dir(str(tmp_path))
  os.remove(tmp_path / "test_32x32.mat")
  msg = load_error("svhn_cropped", source="files", data_dir=str(tmp_path))
  assert msg == f"{tmp_path} has only some of the SVHN files: test_32x32.mat " \
                "is missing."


def test_svhn_paper_split_from_train_and_extra(tmp_path):
  write_svhn_dir(str(tmp_path), n_train=30, n_test=25, n_extra=40)
  kw = dict(source="files", data_dir=str(tmp_path), svhn_paper_split=True,
            svhn_train_examples=50, svhn_test_examples=10)
  ds = data.load_dataset("svhn_cropped", **kw)
  assert ds.train_images.shape == (50, 32, 32, 3)
  assert ds.test_images.shape == (10, 32, 32, 3)
  from_extra = ds.train_images[:, 0, 0, 0] == 1.0
  assert 0 < from_extra.sum() < 50  # both train and extra contribute
  again = data.load_dataset("svhn_cropped", **kw)
  np.testing.assert_array_equal(ds.train_images, again.train_images)
  np.testing.assert_array_equal(ds.test_labels, again.test_labels)
  # Without extra_32x32.mat the pool is all of train.
  os.remove(tmp_path / "extra_32x32.mat")
  ds = data.load_dataset("svhn_cropped", **kw)
  assert ds.train_images.shape == (30, 32, 32, 3)
  kw["svhn_test_examples"] = 26
  msg = load_error("svhn_cropped", **kw)
  assert msg.startswith("--svhn_test_examples=26 is more than the 25")


def test_paper_split_ignored_for_other_datasets(tmp_path):
  write_mnist_dir(str(tmp_path))
  ds = data.load_dataset("mnist", source="files", data_dir=str(tmp_path),
                         svhn_paper_split=True, svhn_test_examples=5)
  assert len(ds.test_labels) == 20


# ----------------------------------------------------------------------------
# CIFAR-10: python batches.


def test_cifar_batches_in_standard_subfolder(tmp_path):
  batches = write_cifar_dir(str(tmp_path / "cifar-10-batches-py"))
  ds = data.load_dataset("cifar10", source="files", data_dir=str(tmp_path))
  assert ds.train_images.shape == (40, 32, 32, 3)
  assert ds.test_images.shape == (8, 32, 32, 3)
  raw = batches["data_batch_2"][b"data"][3]  # R plane, G plane, B plane
  img = ds.train_images[8 + 3]
  for c in range(3):
    np.testing.assert_allclose(img[..., c],
                               raw[c * 1024:(c + 1) * 1024].reshape(32, 32)
                               / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(ds.test_labels, np.arange(8) % 10)


def test_cifar_from_tarball(tmp_path):
  batches = cifar_batches()
  with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
    for name, batch in batches.items():
      blob = pickle.dumps(batch)
      info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
  ds = data.load_dataset("cifar10", source="files", data_dir=str(tmp_path))
  assert ds.train_images.shape == (40, 32, 32, 3)


def test_cifar_corrupt_batches(tmp_path):
  write_cifar_dir(str(tmp_path))  # batches directly in data_dir
  path = str(tmp_path / "data_batch_3")
  raw = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(raw[:len(raw) // 2])
  msg = load_error("cifar10", source="files", data_dir=str(tmp_path))
  assert msg.startswith(f"{path} is not a readable CIFAR-10 python batch "
                        "(truncated or corrupt")
  bad = cifar_batch(8, 0)
  bad[b"labels"][5] = 10
  with open(path, "wb") as f:
    pickle.dump(bad, f)
  msg = load_error("cifar10", source="files", data_dir=str(tmp_path))
  assert f"{path} has label 10 at index 5, outside 0..9" in msg
  bad = cifar_batch(8, 0)
  bad[b"data"] = bad[b"data"][:, :100]
  with open(path, "wb") as f:
    pickle.dump(bad, f)
  msg = load_error("cifar10", source="files", data_dir=str(tmp_path))
  assert f"{path} has data of shape (8, 100), not (N, 3072)" in msg
  os.remove(path)
  msg = load_error("cifar10", source="files", data_dir=str(tmp_path))
  assert "data_batch_3 missing" in msg


# ----------------------------------------------------------------------------
# tensorflow-datasets (mocked) and --data_source=auto.


@pytest.fixture
def tfds_mock(tmp_path, monkeypatch):
  """tfds.testing.mock_data, with tfds's temporary folders under tmp_path."""
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  with tfds.testing.mock_data(num_examples=24):
    yield


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)),
                                        ("fashion_mnist", (28, 28, 1)),
                                        ("cifar10", (32, 32, 3)),
                                        ("svhn_cropped", (32, 32, 3))])
def test_tfds_source(tfds_mock, name, shape):
  ds = data.load_dataset(name, source="tfds")
  assert ds.train_images.shape == (24,) + shape
  assert ds.test_images.shape == (24,) + shape
  assert ds.train_images.dtype == np.float32
  assert 0.0 <= ds.train_images.min() and ds.train_images.max() <= 1.0
  assert ds.train_labels.dtype == np.int32
  assert set(ds.train_labels.tolist()) <= set(range(10))


def test_tfds_svhn_paper_split(tfds_mock):
  ds = data.load_dataset("svhn_cropped", source="tfds", svhn_paper_split=True,
                         svhn_train_examples=30, svhn_test_examples=10)
  # The pool is drawn from train (24) + extra (24).
  assert ds.train_images.shape == (30, 32, 32, 3)
  assert ds.test_images.shape == (10, 32, 32, 3)


def test_auto_without_data_dir_uses_tfds(tfds_mock):
  assert data.load_dataset("cifar10").train_images.shape == (24, 32, 32, 3)


def test_auto_prefers_local_files(tmp_path, monkeypatch):
  write_mnist_dir(str(tmp_path))

  def fail(*args, **kwargs):
    raise AssertionError("tfds must not be tried")

  monkeypatch.setattr(tfds_source, "open_splits", fail)
  ds = data.load_dataset("mnist", data_dir=str(tmp_path))
  assert ds.train_images.shape == (50, 28, 28, 1)
  # A corrupt local file is reported, not replaced by a download.
  write_idx(str(tmp_path / "train-labels-idx1-ubyte"), np.zeros(3), 2051)
  msg = load_error("mnist", data_dir=str(tmp_path))
  assert "magic number 2051, not 2049" in msg


def test_auto_both_fail(tmp_path, monkeypatch):

  def unavailable(*args, **kwargs):
    raise tfds_source.TfdsUnavailable("it found no prepared copy of 'mnist'")

  monkeypatch.setattr(tfds_source, "open_splits", unavailable)
  msg = load_error("mnist", data_dir=str(tmp_path))
  assert msg.startswith("Could not load --dataset=mnist: found none of the "
                        "idx files train-images-idx3-ubyte")
  assert str(tmp_path) in msg
  assert msg.endswith("and tensorflow-datasets failed: it found no prepared "
                      "copy of 'mnist'.")
  msg = load_error("svhn_cropped")
  assert "no --data_dir was given" in msg and "train_32x32.mat" in msg
  msg = load_error("mnist", source="tfds")
  assert msg == ("--data_source=tfds could not load --dataset=mnist: it found "
                 "no prepared copy of 'mnist'.")


def test_tfds_failure_is_one_sentence(tmp_path, monkeypatch):
  """Unmocked tfds without TensorFlow: a clear reason, at once, offline."""
  pytest.importorskip("tensorflow_datasets")
  if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("TensorFlow is installed, so tfds would try to download")
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  with pytest.raises(tfds_source.TfdsUnavailable) as e:
    tfds_source.open_splits("mnist", ("train", "test"), str(tmp_path / "t"))
  reason = e.value.reason
  assert "\n" not in reason
  assert reason == (f"it found no usable prepared copy of 'mnist' in "
                    f"{tmp_path / 't'}, and downloading and preparing one "
                    "needs TensorFlow, which is not installed (pip install "
                    "tensorflow-cpu)")


def test_digits_ignores_source():
  ds = data.load_dataset("digits", source="files", data_dir="/nonexistent")
  assert ds.train_images.shape == (1437, 8, 8, 1)


# ----------------------------------------------------------------------------
# Preprocessing.


def small_ds(name, shape, n=40, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.random((n,) + shape, dtype=np.float32)
  y = (np.arange(n) % 10).astype(np.int32)
  return data.Dataset(x, y, x[: n // 2] * 0.5, y[: n // 2], 10, name)


def test_mnist_cnn_pads_to_32_with_background():
  ds = small_ds("mnist", (28, 28, 1))
  out = data.preprocess(ds, model="mnist_cnn")
  assert out.train_images.shape == (40, 32, 32, 1)
  assert out.test_images.shape == (20, 32, 32, 1)
  np.testing.assert_array_equal(out.train_images[:, 2:30, 2:30],
                                ds.train_images)
  assert not out.train_images[:, :2].any()
  assert not out.train_images[:, 30:].any()
  assert not out.train_images[:, :, :2].any()
  # The MLP keeps 28x28; nothing else changes without standardize.
  same = data.preprocess(ds, model="mnist_mlp")
  np.testing.assert_array_equal(same.train_images, ds.train_images)


def test_padding_happens_before_standardization():
  ds = small_ds("fashion_mnist", (28, 28, 1))
  out = data.preprocess(ds, model="mnist_cnn", standardize=True)
  x = out.train_images
  assert abs(x.mean()) < 1e-5 and abs(x.std() - 1) < 1e-4
  # The padded border holds the standardized background value.
  border = x[:, 0, 0, 0]
  np.testing.assert_allclose(border, border[0])
  assert border[0] < 0


def test_rgb_to_yuv_bt601():
  rgb = np.eye(3, dtype=np.float32).reshape(3, 1, 1, 3)  # red, green, blue
  yuv = transforms.rgb_to_yuv(rgb).reshape(3, 3)
  np.testing.assert_allclose(yuv[0], [0.299, -0.14713, 0.615], atol=1e-6)
  np.testing.assert_allclose(yuv[1], [0.587, -0.28886, -0.51499], atol=1e-6)
  np.testing.assert_allclose(yuv[2], [0.114, 0.436, -0.10001], atol=1e-6)


def test_svhn_default_is_yuv_and_standardized_with_train_stats():
  ds = small_ds("svhn_cropped", (32, 32, 3))
  out = data.preprocess(ds, model="svhn_cnn")
  x = out.train_images
  np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(x.std(axis=(0, 1, 2)), 1, atol=1e-4)
  yuv_tr = transforms.rgb_to_yuv(ds.train_images).astype(np.float64)
  yuv_te = transforms.rgb_to_yuv(ds.test_images).astype(np.float64)
  mean, std = yuv_tr.mean(axis=(0, 1, 2)), yuv_tr.std(axis=(0, 1, 2))
  np.testing.assert_allclose(out.test_images, (yuv_te - mean) / std,
                             atol=1e-4)
  # Opt out of standardization: YUV only.
  yuv_only = data.preprocess(ds, model="svhn_cnn", standardize=False)
  np.testing.assert_allclose(yuv_only.train_images, yuv_tr, atol=1e-6)
  # The input is not modified.
  assert ds.train_images.min() >= 0


def test_other_datasets_scale_only_unless_asked():
  ds = small_ds("cifar10", (32, 32, 3))
  out = data.preprocess(ds, model="svhn_cnn")
  np.testing.assert_array_equal(out.train_images, ds.train_images)
  std = data.preprocess(ds, model="svhn_cnn", standardize=True)
  np.testing.assert_allclose(std.train_images.mean(axis=(0, 1, 2)), 0,
                             atol=1e-5)


# ----------------------------------------------------------------------------
# prepare(cfg) and the config files.


def make_cfg(**kw):
  base = dict(dataset="digits", data_source="auto", data_dir=None,
              model="digits_cnn", partition="iid", dirichlet_alpha=0.5,
              num_participants=10, samples_per_participant=100, seed=0,
              standardize=None, svhn_paper_split=False,
              svhn_test_examples=10_000)
  base.update(kw)
  return types.SimpleNamespace(**base)


def _prepare(cfg):
  kw = dict(vars(cfg))
  return data.prepare(kw.pop("dataset"), **kw)


@pytest.mark.parametrize("kind", data.PARTITIONS)
def test_prepare_digits(kind):
  ds, parts = _prepare(make_cfg(partition=kind))
  assert ds.train_images.shape == (1437, 8, 8, 1)
  assert parts.shape == (10, 100) and parts.dtype == np.int32
  assert len(np.unique(parts)) == parts.size


def test_prepare_mnist_files_for_mnist_cnn(tmp_path):
  write_mnist_dir(str(tmp_path), gz=True, n_train=60)
  ds, parts = _prepare(make_cfg(
      dataset="fashion_mnist", data_source="files", data_dir=str(tmp_path),
      model="mnist_cnn", num_participants=3, samples_per_participant=20))
  assert ds.train_images.shape == (60, 32, 32, 1)
  assert ds.test_images.shape == (20, 32, 32, 1)
  assert parts.shape == (3, 20)
  with pytest.raises(DataError, match="--samples_per_participant=21"):
    _prepare(make_cfg(dataset="mnist", data_source="files",
                          data_dir=str(tmp_path), model="mnist_cnn",
                          num_participants=3, samples_per_participant=21))


def test_constants_match_the_flag_values():
  assert data.DATASETS == ("digits", "mnist", "fashion_mnist", "svhn_cropped",
                           "cifar10")
  assert data.SOURCES == data.DATA_SOURCES == ("auto", "tfds", "files")
  assert data.PARTITIONS == ("iid", "shards", "dirichlet")


KNOWN_FLAGS = set(
    "dataset data_source data_dir model algorithm protocol num_participants "
    "samples_per_participant epochs batch_size learning_rate upload_fraction "
    "download_fraction download_rule selection threshold clip_bound noise "
    "noise_scale stat_decay eval_every eval_examples seed partition "
    "dirichlet_alpha standardize svhn_paper_split svhn_test_examples".split())


@pytest.mark.parametrize("name,dataset,model,n", [
    ("mnist_cnn", "mnist", "mnist_cnn", 600),
    ("fashion_mnist_cnn", "fashion_mnist", "mnist_cnn", 600),
    ("svhn_cnn", "svhn_cropped", "svhn_cnn", 1000),
    ("cifar10_cnn", "cifar10", "svhn_cnn", 1000),
])
def test_cfg_files(name, dataset, model, n):
  path = os.path.join(REPO, "configs", f"{name}.cfg")
  values = {}
  for line in open(path):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    m = re.fullmatch(r"--(\w+)=(\S+)", line)
    assert m, f"{path}: not --name=value: {line!r}"
    assert m.group(1) in KNOWN_FLAGS, m.group(1)
    values[m.group(1)] = m.group(2)
  assert values["dataset"] == dataset and values["model"] == model
  assert int(values["samples_per_participant"]) == n
  assert values["num_participants"] == "30"
  assert "workdir" not in values


# ----------------------------------------------------------------------------
# The real Fashion-MNIST, offline (Debian package dataset-fashion-mnist).


@pytest.mark.skipif(
    not os.path.isdir(data.FASHION_MNIST_DEBIAN_DIR),
    reason=f"{data.FASHION_MNIST_DEBIAN_DIR} is absent (install the Debian "
           "package dataset-fashion-mnist to run this test)")
def test_real_fashion_mnist_offline():
  ds = data.load_dataset("fashion_mnist")  # auto, no --data_dir: Debian dir
  assert ds.train_images.shape == (60_000, 28, 28, 1)
  assert ds.test_images.shape == (10_000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(ds.test_labels), [1000] * 10)
  assert 0.0 == ds.train_images.min() and ds.train_images.max() == 1.0
  assert abs(float(ds.train_images.mean()) - 0.2860) < 0.001
  assert abs(float(ds.train_images.std()) - 0.3530) < 0.001
  assert abs(float(ds.test_images.mean()) - 0.2868) < 0.001
  parts = data.make_partition("iid", ds.train_labels, 30, 600, seed=0)
  assert parts.shape == (30, 600)
