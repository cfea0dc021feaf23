"""Readers for the original distribution files of each dataset (SPEC section 5).

Real users run on clusters and hospital machines with no internet, so every
real dataset can be read from the files its authors publish, placed in a local
directory (``--data_dir``):

* MNIST and Fashion-MNIST: the four idx files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
  ``t10k-labels-idx1-ubyte``, each gzipped (``.gz``) or not. The header is
  checked: magic number 2051 (images) or 2049 (labels), 28x28 images, the
  exact number of bytes the header announces, labels in 0..9.
* SVHN (cropped digits): ``train_32x32.mat``, ``test_32x32.mat`` and optionally
  ``extra_32x32.mat``, read with :func:`scipy.io.loadmat`; ``X`` is
  (32, 32, 3, N) uint8 and ``y`` is (N, 1) with label 10 meaning the digit 0.
* CIFAR-10: the python batches ``data_batch_1`` .. ``data_batch_5`` and
  ``test_batch`` (pickled dicts with ``b'data'``, (N, 3072) uint8 as R, G, B
  planes of 32x32, and ``b'labels'``), in ``cifar-10-batches-py/`` or directly
  in the directory, or still packed in ``cifar-10-python.tar.gz``. These are
  pickles: only read files from a source you trust.

Each dataset's files may lie in ``--data_dir`` itself or in its usual
sub-folder (e.g. ``mnist/``, ``FashionMNIST/raw/``, ``svhn/``,
``cifar-10-batches-py/``). Readers return raw uint8 NHWC images and int32
labels; scaling to [0, 1] happens in :mod:`dssgd_jax.data.datasets`.

Every problem is a :class:`~dssgd_jax.errors.DataError` whose message is one
sentence naming the file and what is wrong with it. A dataset whose files are
simply absent raises the subclass :class:`FilesNotFound`, which ``--data_source=
auto`` catches to try tensorflow-datasets next; a file that is present but
corrupt is always reported.
"""

import gzip
import io
import os
import pickle
import tarfile
import zlib

import numpy as np

from dssgd_jax.errors import DataError

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat",
              "extra": "extra_32x32.mat"}
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TARBALL = "cifar-10-python.tar.gz"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"

# The usual sub-folders of --data_dir in which each dataset's files may lie
# (tried after --data_dir itself). "MNIST/raw" and "FashionMNIST/raw" are
# torchvision's layout.
SUBDIRS = {
    "mnist": ("mnist", "MNIST/raw", "MNIST"),
    "fashion_mnist": ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw",
                      "FashionMNIST"),
    "svhn_cropped": ("svhn_cropped", "svhn", "SVHN"),
    "cifar10": (CIFAR10_DIR,),
}


class FilesNotFound(DataError):
  """The dataset's files are not in the directory (as opposed to corrupt)."""


def _first_line(exc: BaseException, limit: int = 160) -> str:
  text = str(exc).strip().splitlines()
  text = text[0] if text else type(exc).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


def candidate_dirs(data_dir: str, dataset: str) -> list[str]:
  """``data_dir`` and its usual sub-folders for ``dataset`` that exist.

  >>> candidate_dirs("/nonexistent", "mnist")
  []
  """
  dirs = [data_dir] + [os.path.join(data_dir, s) for s in SUBDIRS.get(dataset,
                                                                      ())]
  return [d for d in dirs if os.path.isdir(d)]


def _describe_dirs(data_dir: str, dataset: str) -> str:
  subs = SUBDIRS.get(dataset, ())
  if not subs:
    return data_dir
  plural = "s" if len(subs) > 1 else ""
  return (f"{data_dir} (or its {', '.join(s + '/' for s in subs)} "
          f"sub-folder{plural})")


def _check_data_dir(data_dir: str):
  if not os.path.exists(data_dir):
    raise FilesNotFound(f"--data_dir={data_dir} does not exist.")
  if not os.path.isdir(data_dir):
    raise FilesNotFound(f"--data_dir={data_dir} is not a directory.")


# ----------------------------------------------------------------------------
# MNIST and Fashion-MNIST: idx files.


def _idx_variants(name: str) -> list[str]:
  # Some mirrors unpack "train-images-idx3-ubyte" as "train-images.idx3-ubyte".
  dotted = name.replace("-idx", ".idx")
  return [name, name + ".gz", dotted, dotted + ".gz"]


def find_idx_files(data_dir: str, dataset: str = "mnist") -> dict[str, str]:
  """Finds the four MNIST-family idx files in ``data_dir`` or a sub-folder.

  Args:
    data_dir: directory given by ``--data_dir``.
    dataset: ``"mnist"`` or ``"fashion_mnist"`` (selects the sub-folders).

  Returns:
    Paths keyed by ``train_images``, ``train_labels``, ``test_images``,
    ``test_labels``, all from the same directory.

  Raises:
    FilesNotFound: no directory holds all four files.
  """
  _check_data_dir(data_dir)
  best, best_dir = {}, data_dir
  for d in candidate_dirs(data_dir, dataset):
    found = {}
    for key, name in MNIST_FILES.items():
      for variant in _idx_variants(name):
        path = os.path.join(d, variant)
        if os.path.isfile(path):
          found[key] = path
          break
    if len(found) == len(MNIST_FILES):
      return found
    if len(found) > len(best):
      best, best_dir = found, d
  if best:
    missing = [MNIST_FILES[k] for k in MNIST_FILES if k not in best]
    raise FilesNotFound(
        f"{best_dir} has only some of the idx files: "
        f"{', '.join(n + '[.gz]' for n in missing)} is missing.")
  raise FilesNotFound(
      f"found none of the idx files {', '.join(MNIST_FILES.values())} "
      f"(each optionally .gz) in {_describe_dirs(data_dir, dataset)}.")


def _read_bytes(path: str) -> bytes:
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        return f.read()
    with open(path, "rb") as f:
      return f.read()
  except (OSError, EOFError, zlib.error) as e:
    if path.endswith(".gz"):
      raise DataError(f"{path} is not a valid gzip file or is truncated "
                      f"({_first_line(e)}).") from None
    raise DataError(f"{path} cannot be read ({_first_line(e)}).") from None


def read_idx(path: str, magic: int, shape: tuple[int, ...] | None = None
             ) -> np.ndarray:
  """Reads one idx file (gzipped if its name ends in ``.gz``) as uint8.

  Args:
    path: the file.
    magic: the expected magic number: 2051 (``IDX_IMAGES_MAGIC``, unsigned
      bytes, 3 dimensions) or 2049 (``IDX_LABELS_MAGIC``, 1 dimension).
    shape: expected trailing dimensions, e.g. ``(28, 28)`` for images.

  Returns:
    A uint8 array of the dimensions the header gives.

  Raises:
    DataError: wrong magic number or dimensions, truncated or overlong file.

  >>> import os, tempfile
  >>> p = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte")
  >>> _ = open(p, "wb").write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 0, 9]))
  >>> read_idx(p, IDX_LABELS_MAGIC)
  array([7, 0, 9], dtype=uint8)
  """
  buf = _read_bytes(path)
  if len(buf) < 4:
    raise DataError(f"{path} is truncated: it has {len(buf)} bytes, fewer "
                    "than the 4-byte idx magic number.")
  found = int.from_bytes(buf[:4], "big")
  if found != magic:
    kind = "image" if magic == IDX_IMAGES_MAGIC else "label"
    raise DataError(f"{path} has magic number {found}, not {magic}, so it is "
                    f"not an idx {kind} file (wrong or corrupt file?).")
  ndim = magic & 0xFF
  header = 4 + 4 * ndim
  if len(buf) < header:
    raise DataError(f"{path} is truncated: it has {len(buf)} bytes, fewer "
                    f"than its {header}-byte idx header.")
  dims = tuple(int.from_bytes(buf[4 + 4 * i:8 + 4 * i], "big")
               for i in range(ndim))
  if shape is not None and dims[1:] != tuple(shape):
    raise DataError(f"{path} holds items of shape {dims[1:]}, not the "
                    f"expected {tuple(shape)}.")
  need = int(np.prod(dims, dtype=np.int64))
  have = len(buf) - header
  if have < need:
    raise DataError(f"{path} is truncated: its header announces {dims[0]} "
                    f"items ({need} bytes) but only {have} bytes follow.")
  if have > need:
    raise DataError(f"{path} has {have - need} bytes more than its header "
                    f"announces ({dims[0]} items of {need // max(dims[0], 1)}"
                    " bytes), so it is corrupt.")
  return np.frombuffer(buf, dtype=np.uint8, offset=header).reshape(dims)


def _check_labels(labels: np.ndarray, path: str, low: int = 0,
                  high: int = 9) -> None:
  bad = np.flatnonzero((labels < low) | (labels > high))
  if bad.size:
    i = int(bad[0])
    raise DataError(f"{path} has label {int(labels[i])} at index {i}, "
                    f"outside {low}..{high} ({bad.size} such labels).")


def read_mnist_split(images_path: str, labels_path: str
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Reads one split: (N, 28, 28, 1) uint8 images and (N,) int32 labels."""
  images = read_idx(images_path, IDX_IMAGES_MAGIC, (28, 28))
  labels = read_idx(labels_path, IDX_LABELS_MAGIC)
  _check_labels(labels, labels_path)
  if len(images) != len(labels):
    raise DataError(f"{images_path} has {len(images)} images but "
                    f"{labels_path} has {len(labels)} labels.")
  return images[..., None], labels.astype(np.int32)


def read_mnist_dir(data_dir: str, dataset: str = "mnist") -> dict:
  """Reads MNIST or Fashion-MNIST from its idx files.

  Returns:
    ``{"train": (images, labels), "test": (images, labels)}`` with uint8
    (N, 28, 28, 1) images and int32 labels.
  """
  p = find_idx_files(data_dir, dataset)
  return {"train": read_mnist_split(p["train_images"], p["train_labels"]),
          "test": read_mnist_split(p["test_images"], p["test_labels"])}


# ----------------------------------------------------------------------------
# SVHN: MATLAB files.


def find_svhn_files(data_dir: str) -> dict[str, str]:
  """Paths of ``train_32x32.mat``, ``test_32x32.mat`` and, if present, extra.

  Raises:
    FilesNotFound: no directory holds both the train and the test file.
  """
  _check_data_dir(data_dir)
  partial = None
  for d in candidate_dirs(data_dir, "svhn_cropped"):
    found = {k: os.path.join(d, n) for k, n in SVHN_FILES.items()
             if os.path.isfile(os.path.join(d, n))}
    if "train" in found and "test" in found:
      return found
    if ("train" in found or "test" in found) and partial is None:
      partial = (d, found)
  if partial:
    d, found = partial
    missing = SVHN_FILES["test" if "train" in found else "train"]
    raise FilesNotFound(f"{d} has only some of the SVHN files: {missing} is "
                        "missing.")
  raise FilesNotFound(
      f"found neither {SVHN_FILES['train']} nor {SVHN_FILES['test']} in "
      f"{_describe_dirs(data_dir, 'svhn_cropped')}.")


def read_svhn_mat(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads one SVHN cropped-digits ``.mat`` file.

  Returns:
    (N, 32, 32, 3) uint8 images (a transposed view of ``X``: index it to get
    a contiguous copy of just the examples you need) and (N,) int32 labels in
    0..9 (the file's label 10 is the digit 0).

  Raises:
    DataError: unreadable file, missing ``X``/``y``, wrong shapes or labels.
  """
  import scipy.io  # pylint: disable=g-import-not-at-top
  try:
    mat = scipy.io.loadmat(path, variable_names=["X", "y"])
  except Exception as e:  # pylint: disable=broad-except
    # scipy raises ValueError, MatReadError, NotImplementedError (v7.3/HDF5),
    # OSError, zlib.error, ... depending on how the file is damaged.
    raise DataError(f"{path} is not a readable MATLAB .mat file "
                    f"({_first_line(e)}).") from None
  for var in ("X", "y"):
    if var not in mat:
      raise DataError(f"{path} has no variable '{var}', so it is not an SVHN "
                      "cropped-digits file.")
  x, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
  if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
    raise DataError(f"{path} has X of shape {x.shape}, not (32, 32, 3, N).")
  if len(y) != x.shape[3]:
    raise DataError(f"{path} has {x.shape[3]} images in X but {len(y)} "
                    "labels in y.")
  if x.dtype != np.uint8:
    if x.size and (x.min() < 0 or x.max() > 255):
      raise DataError(f"{path} has pixel values outside 0..255.")
    x = x.astype(np.uint8)
  if y.size and not np.issubdtype(y.dtype, np.number):
    raise DataError(f"{path} has non-numeric labels.")
  y = y.astype(np.int64)
  _check_labels(y, path, low=0, high=10)
  y = np.where(y == 10, 0, y).astype(np.int32)
  return np.transpose(x, (3, 0, 1, 2)), y


# ----------------------------------------------------------------------------
# CIFAR-10: pickled python batches.


def _parse_cifar_batch(obj, where: str) -> tuple[np.ndarray, np.ndarray]:
  if not isinstance(obj, dict):
    raise DataError(f"{where} holds a {type(obj).__name__}, not a CIFAR-10 "
                    "batch dict.")
  data = obj.get(b"data", obj.get("data"))
  labels = obj.get(b"labels", obj.get("labels"))
  if data is None or labels is None:
    raise DataError(f"{where} has no 'data' or no 'labels' entry, so it is "
                    "not a CIFAR-10 batch.")
  data = np.asarray(data)
  labels = np.asarray(labels)
  if data.ndim != 2 or data.shape[1] != 3072:
    raise DataError(f"{where} has data of shape {data.shape}, not (N, 3072).")
  if data.dtype != np.uint8:
    raise DataError(f"{where} has data of type {data.dtype}, not uint8.")
  if labels.ndim != 1 or len(labels) != len(data):
    raise DataError(f"{where} has {len(data)} images but {labels.size} "
                    "labels.")
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f"{where} has non-integer labels.")
  _check_labels(labels, where)
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels.astype(np.int32)


def read_cifar_batch(path_or_file, name: str | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Reads one CIFAR-10 python batch (a pickled dict).

  Args:
    path_or_file: a path, or an open binary file (then ``name`` names it in
      errors).
    name: how to call the file in error messages.

  Returns:
    (N, 32, 32, 3) uint8 images and (N,) int32 labels.
  """
  where = name or str(path_or_file)
  try:
    if isinstance(path_or_file, (str, os.PathLike)):
      with open(path_or_file, "rb") as f:
        obj = pickle.load(f, encoding="bytes")
    else:
      obj = pickle.load(path_or_file, encoding="bytes")
  except Exception as e:  # pylint: disable=broad-except
    # UnpicklingError, EOFError (truncated), ValueError, ... .
    raise DataError(f"{where} is not a readable CIFAR-10 python batch "
                    f"(truncated or corrupt: {_first_line(e)}).") from None
  return _parse_cifar_batch(obj, where)


def _concat(parts):
  images, labels = zip(*parts)
  return np.concatenate(images), np.concatenate(labels)


def read_cifar10_dir(data_dir: str) -> dict:
  """Reads CIFAR-10 from its python batches (a folder or the tarball).

  Returns:
    ``{"train": (images, labels), "test": (images, labels)}``.

  Raises:
    FilesNotFound: neither the batches nor ``cifar-10-python.tar.gz`` found.
  """
  _check_data_dir(data_dir)
  names = CIFAR10_TRAIN_BATCHES + (CIFAR10_TEST_BATCH,)
  partial = None
  for d in candidate_dirs(data_dir, "cifar10"):
    present = [n for n in names if os.path.isfile(os.path.join(d, n))]
    if len(present) == len(names):
      train = _concat([read_cifar_batch(os.path.join(d, n))
                       for n in CIFAR10_TRAIN_BATCHES])
      test = read_cifar_batch(os.path.join(d, CIFAR10_TEST_BATCH))
      return {"train": train, "test": test}
    if present and partial is None:
      partial = (d, [n for n in names if n not in present])
  tarball = os.path.join(data_dir, CIFAR10_TARBALL)
  if os.path.isfile(tarball):
    return _read_cifar10_tarball(tarball)
  if partial:
    d, missing = partial
    raise FilesNotFound(f"{d} has only some of the CIFAR-10 batches: "
                        f"{', '.join(missing)} missing.")
  raise FilesNotFound(
      f"found neither the CIFAR-10 python batches ({', '.join(names)}) nor "
      f"{CIFAR10_TARBALL} in {_describe_dirs(data_dir, 'cifar10')}.")


def _read_cifar10_tarball(path: str) -> dict:
  try:
    with tarfile.open(path, "r:gz") as tar:
      members = {os.path.basename(m.name): m for m in tar.getmembers()
                 if m.isfile()}
      batches = {}
      for n in CIFAR10_TRAIN_BATCHES + (CIFAR10_TEST_BATCH,):
        if n not in members:
          raise DataError(f"{path} has no member {CIFAR10_DIR}/{n}.")
        data = tar.extractfile(members[n]).read()
        batches[n] = read_cifar_batch(io.BytesIO(data), f"{path}:{n}")
  except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
    raise DataError(f"{path} is not a readable .tar.gz archive "
                    f"({_first_line(e)}).") from None
  return {"train": _concat([batches[n] for n in CIFAR10_TRAIN_BATCHES]),
          "test": batches[CIFAR10_TEST_BATCH]}


def read_svhn_dir(data_dir: str, extra: bool = False) -> dict:
  """Reads SVHN from its ``.mat`` files.

  Args:
    data_dir: directory given by ``--data_dir``.
    extra: also read ``extra_32x32.mat`` (531,131 examples, 1.3 GB) when it is
      there; its absence is not an error.

  Returns:
    ``{"train": (images, labels), "test": (images, labels)}`` plus
    ``"extra"`` when requested and present.
  """
  paths = find_svhn_files(data_dir)
  out = {"train": read_svhn_mat(paths["train"]),
         "test": read_svhn_mat(paths["test"])}
  if extra and "extra" in paths:
    out["extra"] = read_svhn_mat(paths["extra"])
  return out
