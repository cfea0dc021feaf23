"""Datasets through tensorflow-datasets, without needing TensorFlow to read.

SPEC section 5: where a machine can download, the real datasets come from
tensorflow-datasets (tfds). We read them with :func:`tfds.data_source`, the
random-access API over ArrayRecord files that works without TensorFlow, so:

* reading a copy that is already prepared (in ArrayRecord format) under
  ``--data_dir`` (default ``~/tensorflow_datasets`` or ``$TFDS_DATA_DIR``)
  needs only ``tensorflow-datasets`` and ``array_record``;
* downloading and preparing a copy needs TensorFlow (tfds encodes the images
  with it) and ``etils[epath]`` (``importlib_resources``): install
  ``tensorflow-cpu`` where you want tfds to download. Without TensorFlow we
  do not even start a download (it would fail after fetching the files) and
  say so at once.

Where TensorFlow is installed and ``tfds.data_source`` fails (for instance on
an older copy prepared as TFRecord by ``tfds.load``), we fall back to
``tfds.load(..., batch_size=-1)``.

Reading is lazy: :class:`TfdsSplit` fetches only the examples asked for, so the
SVHN paper split reads 100,000 of the 604,388 train+extra examples, not all.
Any failure is reported as :class:`TfdsUnavailable` whose ``reason`` is a
short clause for the caller's one-sentence error.
"""

import importlib.util
import os

import numpy as np

from dssgd_jax.data._splits import ArraySplit
from dssgd_jax.errors import DataError

# Our dataset names -> tfds names.
TFDS_NAMES = {
    "mnist": "mnist",
    "fashion_mnist": "fashion_mnist",
    "svhn_cropped": "svhn_cropped",
    "cifar10": "cifar10",
}

# pip package that provides a module tfds reported missing.
_PIP_NAMES = {"tensorflow": "tensorflow-cpu",
              "importlib_resources": "importlib_resources"}


class TfdsUnavailable(DataError):
  """tensorflow-datasets could not provide the dataset; see ``reason``."""

  def __init__(self, reason: str):
    super().__init__(f"tensorflow-datasets failed: {reason}.")
    self.reason = reason


class TfdsSplit:
  """One split of a ``tfds.data_source``: a length and a lazy ``take``."""

  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def take(self, indices=None) -> tuple[np.ndarray, np.ndarray]:
    """Reads the given examples (all by default) as uint8 images, int32 labels.

    One record at a time: ``__getitems__`` would batch the reads, but
    ``tfds.testing.mock_data`` does not implement it, and we want the tested
    path to be the one users run.
    """
    if indices is None:
      indices = range(len(self._source))
    images, labels = [], []
    for i in indices:
      ex = self._source[int(i)]
      images.append(np.asarray(ex["image"], dtype=np.uint8))
      labels.append(int(ex["label"]))
    if not images:
      return (np.zeros((0, 0, 0, 0), np.uint8), np.zeros((0,), np.int32))
    return np.stack(images), np.asarray(labels, dtype=np.int32)


def _have_tensorflow() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def _describe_failure(exc: BaseException, tfds_name: str,
                      data_dir: str | None, have_tf: bool) -> str:
  """A short clause saying why tfds could not provide the dataset."""
  where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  lines = str(exc).strip().strip("\"'").splitlines()
  text = lines[0].rstrip(".") if lines else ""
  if len(text) > 200:
    text = text[:197] + "..."
  detail = f"{type(exc).__name__}{': ' + text if text else ''}"
  if not have_tf:
    # Without TensorFlow we never try to download: tfds needs it to prepare.
    why = "" if "not been generated" in text else f" ({detail})"
    return (f"it found no usable prepared copy of '{tfds_name}' in "
            f"{where}{why}, and downloading and preparing one needs "
            "TensorFlow, which is not installed (pip install tensorflow-cpu)")
  if isinstance(exc, ModuleNotFoundError) and exc.name:
    top = exc.name.split(".")[0]
    return (f"it found no prepared copy of '{tfds_name}' in {where} and "
            f"cannot download and prepare one without the Python module "
            f"{top} (pip install {_PIP_NAMES.get(top, top)})")
  return f"loading '{tfds_name}' into {where} raised {detail}"


def open_splits(dataset: str, splits, data_dir: str | None = None) -> dict:
  """Opens the named splits of ``dataset`` through tensorflow-datasets.

  Reads a copy prepared in ``data_dir``; where TensorFlow is installed,
  downloads and prepares one first if needed (and if there is internet).

  Args:
    dataset: one of :data:`TFDS_NAMES`.
    splits: split names, e.g. ``("train", "test")`` or with ``"extra"``.
    data_dir: tfds data directory (None: tfds's default).

  Returns:
    ``{split: object with len() and take(indices)}``.

  Raises:
    TfdsUnavailable: tfds is missing or could not provide the data.

  >>> import tensorflow_datasets as tfds
  >>> with tfds.testing.mock_data(num_examples=4):
  ...   split = open_splits("mnist", ("train",))["train"]
  >>> len(split), split.take([0, 1])[0].shape
  (4, (2, 28, 28, 1))
  """
  tfds_name = TFDS_NAMES[dataset]
  splits = list(splits)
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise TfdsUnavailable(f"the package is not importable ({e})") from None
  have_tf = _have_tensorflow()
  try:
    sources = tfds.data_source(
        tfds_name, split=splits, data_dir=data_dir, download=have_tf,
        builder_kwargs={"file_format": "array_record"})
    return {s: TfdsSplit(src) for s, src in zip(splits, sources)}
  except Exception as e:  # pylint: disable=broad-except
    error = e
  if have_tf:
    try:
      arrays = tfds.as_numpy(tfds.load(
          tfds_name, split=splits, data_dir=data_dir, batch_size=-1,
          as_supervised=True))
      return {s: ArraySplit(np.asarray(x, np.uint8), np.asarray(y, np.int32))
              for s, (x, y) in zip(splits, arrays)}
    except Exception as e:  # pylint: disable=broad-except
      error = e
  raise TfdsUnavailable(_describe_failure(error, tfds_name, data_dir, have_tf))
