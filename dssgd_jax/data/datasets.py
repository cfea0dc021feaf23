"""Loading a dataset by name from local files or tensorflow-datasets (SPEC 5).

:func:`load_dataset` returns a :class:`~dssgd_jax.data.base.Dataset` with
float32 NHWC images scaled to [0, 1] and int32 labels, from one of:

* ``--data_source=files``: the original distribution files in ``--data_dir``
  (see :mod:`dssgd_jax.data.files`). For ``fashion_mnist`` without
  ``--data_dir``, the Debian package ``dataset-fashion-mnist`` directory
  ``/usr/share/datasets/fashion-mnist`` is used when it exists.
* ``--data_source=tfds``: tensorflow-datasets, with ``--data_dir`` as its data
  directory (see :mod:`dssgd_jax.data.tfds_source`).
* ``--data_source=auto`` (default): local files if there is a directory to
  look in, then tensorflow-datasets. If both fail, one
  :class:`~dssgd_jax.errors.DataError` sentence says which files were looked
  for where and why tfds failed. A local file that exists but is corrupt is
  reported at once, never papered over by a download.

``digits`` (scikit-learn's bundled 8x8 digits) needs no files and ignores the
source.

SVHN as the paper (``svhn_paper_split=True``): the training pool is a
fixed-seed draw of 100,000 examples from train+extra (``extra_32x32.mat`` or
the tfds ``extra`` split; when the extra part is not available, all 73,257
train examples), and the test split is a fixed-seed draw of
``svhn_test_examples`` (10,000) of the 26,032 test examples. The seed is the
constant :data:`SVHN_SPLIT_SEED`, not ``--seed``, so every run evaluates on
the same examples.
"""

import os
import time

from absl import logging
import numpy as np

from dssgd_jax.data import files
from dssgd_jax.data import tfds_source
from dssgd_jax.data._splits import ArraySplit
from dssgd_jax.data.base import Dataset
from dssgd_jax.data.digits import load_digits
from dssgd_jax.errors import DataError

DATASETS = ("digits", "mnist", "fashion_mnist", "svhn_cropped", "cifar10")
SOURCES = ("auto", "tfds", "files")
# Image shape (height, width, channels) of each dataset as loaded.
IMAGE_SHAPES = {"digits": (8, 8, 1), "mnist": (28, 28, 1),
                "fashion_mnist": (28, 28, 1), "svhn_cropped": (32, 32, 3),
                "cifar10": (32, 32, 3)}
NUM_CLASSES = 10
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
SVHN_SPLIT_SEED = 2015
SVHN_PAPER_TRAIN_EXAMPLES = 100_000
SVHN_PAPER_TEST_EXAMPLES = 10_000

# What --data_dir must hold for each dataset, for help texts and errors.
LOCAL_FILES = {
    "mnist": "the MNIST idx files (train-images-idx3-ubyte, "
             "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
             "t10k-labels-idx1-ubyte, each optionally .gz)",
    "fashion_mnist": "the Fashion-MNIST idx files (train-images-idx3-ubyte, "
                     "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                     "t10k-labels-idx1-ubyte, each optionally .gz)",
    "svhn_cropped": "the SVHN files train_32x32.mat and test_32x32.mat "
                    "(and optionally extra_32x32.mat)",
    "cifar10": "the CIFAR-10 python batches (cifar-10-batches-py/"
               "data_batch_1..5 and test_batch, or cifar-10-python.tar.gz)",
}


def _read_files(name: str, data_dir: str, want_extra: bool) -> dict:
  if name in ("mnist", "fashion_mnist"):
    arrays = files.read_mnist_dir(data_dir, name)
  elif name == "svhn_cropped":
    arrays = files.read_svhn_dir(data_dir, extra=want_extra)
  elif name == "cifar10":
    arrays = files.read_cifar10_dir(data_dir)
  else:
    raise AssertionError(name)
  return {split: ArraySplit(x, y) for split, (x, y) in arrays.items()}


def _local_dir(name: str, data_dir: str | None) -> str | None:
  if data_dir:
    return data_dir
  if name == "fashion_mnist" and os.path.isdir(FASHION_MNIST_DEBIAN_DIR):
    return FASHION_MNIST_DEBIAN_DIR
  return None


def _strip(sentence: str) -> str:
  return sentence.rstrip(".")


def _open(name: str, source: str, data_dir: str | None,
          want_extra: bool) -> tuple[dict, str]:
  """The dataset's splits (objects with len/take) and where they came from."""
  splits = ("train", "test", "extra") if want_extra else ("train", "test")
  local = _local_dir(name, data_dir)
  if source == "files":
    if local is None:
      extra = ""
      if name == "fashion_mnist":
        extra = (f" (the Debian package dataset-fashion-mnist would provide "
                 f"{FASHION_MNIST_DEBIAN_DIR}, but it is not installed)")
      raise DataError(f"--data_source=files needs --data_dir, a directory "
                      f"with {LOCAL_FILES[name]}{extra}.")
    return _read_files(name, local, want_extra), local
  if source == "tfds":
    try:
      return tfds_source.open_splits(name, splits, data_dir), "tfds"
    except tfds_source.TfdsUnavailable as e:
      raise DataError(f"--data_source=tfds could not load --dataset={name}: "
                      f"{e.reason}.") from None
  # auto
  if local is not None:
    try:
      return _read_files(name, local, want_extra), local
    except files.FilesNotFound as e:
      local_failure = _strip(str(e))
  else:
    local_failure = (f"no --data_dir was given to hold "
                     f"{LOCAL_FILES[name]}")
  try:
    return tfds_source.open_splits(name, splits, data_dir), "tfds"
  except tfds_source.TfdsUnavailable as e:
    raise DataError(f"Could not load --dataset={name}: {local_failure}, and "
                    f"tensorflow-datasets failed: {e.reason}.") from None


def _to_float(images: np.ndarray) -> np.ndarray:
  out = images.astype(np.float32)
  np.divide(out, 255.0, out=out)
  return out


def _svhn_paper_indices(splits: dict, train_examples: int, test_examples: int
                        ) -> tuple[dict, np.ndarray]:
  """Fixed-seed choice of the training pool (train+extra) and test subset."""
  if train_examples < 1:
    raise DataError(f"svhn_train_examples={train_examples} must be "
                    "positive.")
  if test_examples < 1:
    raise DataError(f"--svhn_test_examples={test_examples} must be "
                    "positive.")
  n_test = len(splits["test"])
  if test_examples > n_test:
    raise DataError(f"--svhn_test_examples={test_examples} is more than the "
                    f"{n_test} examples of the SVHN test split.")
  rng = np.random.default_rng(SVHN_SPLIT_SEED)
  names = [s for s in ("train", "extra") if s in splits]
  sizes = [len(splits[s]) for s in names]
  total = sum(sizes)
  pick = np.sort(rng.choice(total, min(train_examples, total), replace=False))
  offsets = np.cumsum([0] + sizes)
  train_pick = {}
  for s, lo, hi in zip(names, offsets[:-1], offsets[1:]):
    part = pick[(pick >= lo) & (pick < hi)] - lo
    if part.size:
      train_pick[s] = part
  test_pick = np.sort(rng.choice(n_test, test_examples, replace=False))
  return train_pick, test_pick


def load_dataset(name: str, *, source: str = "auto",
                 data_dir: str | None = None,
                 svhn_paper_split: bool = False,
                 svhn_train_examples: int = SVHN_PAPER_TRAIN_EXAMPLES,
                 svhn_test_examples: int = SVHN_PAPER_TEST_EXAMPLES
                 ) -> Dataset:
  """Loads a dataset as float32 NHWC images in [0, 1] and int32 labels.

  Args:
    name: one of :data:`DATASETS` (``--dataset``).
    source: one of :data:`SOURCES` (``--data_source``); ignored by digits.
    data_dir: directory with the original files, also used as the
      tensorflow-datasets data directory (``--data_dir``).
    svhn_paper_split: SVHN only (ignored otherwise): training pool of
      ``svhn_train_examples`` drawn from train+extra and a test subset of
      ``svhn_test_examples``, both with the fixed seed
      :data:`SVHN_SPLIT_SEED`.
    svhn_train_examples: size of that training pool (all of train+extra if
      fewer).
    svhn_test_examples: size of that test subset.

  Returns:
    The :class:`Dataset` (not yet preprocessed for a model; see
    :func:`dssgd_jax.data.preprocess`).

  Raises:
    DataError: unknown name or source, files missing or corrupt, tfds failed.

  >>> ds = load_dataset("digits")
  >>> ds.train_images.shape, float(ds.train_images.max()) <= 1.0
  ((1437, 8, 8, 1), True)
  """
  if name not in DATASETS:
    raise DataError(f"--dataset={name!r} is not one of: "
                    f"{', '.join(DATASETS)}.")
  if source not in SOURCES:
    raise DataError(f"--data_source={source!r} is not one of: "
                    f"{', '.join(SOURCES)}.")
  if name == "digits":
    return load_digits()
  paper = bool(svhn_paper_split) and name == "svhn_cropped"
  if svhn_paper_split and not paper:
    logging.warning("--svhn_paper_split only applies to svhn_cropped; "
                    "ignored for --dataset=%s.", name)
  start = time.perf_counter()
  splits, origin = _open(name, source, data_dir, want_extra=paper)
  if paper:
    train_pick, test_pick = _svhn_paper_indices(
        splits, svhn_train_examples, svhn_test_examples)
    parts = [splits[s].take(idx) for s, idx in train_pick.items()]
    train_x = np.concatenate([_to_float(x) for x, _ in parts])
    train_y = np.concatenate([y for _, y in parts])
    test_x, test_y = splits["test"].take(test_pick)
    if "extra" not in splits:
      logging.info("SVHN paper split without the extra part: training pool "
                   "is the %d train examples.", len(train_y))
  else:
    train_x, train_y = splits["train"].take()
    train_x = _to_float(train_x)
    test_x, test_y = splits["test"].take()
  ds = Dataset(train_x, np.asarray(train_y, np.int32), _to_float(test_x),
               np.asarray(test_y, np.int32), NUM_CLASSES, name)
  logging.info("Loaded %s from %s in %.1f s: %d train, %d test, images %s.",
               name, origin, time.perf_counter() - start,
               len(ds.train_labels), len(ds.test_labels), ds.image_shape)
  return ds
