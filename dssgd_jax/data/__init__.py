"""Datasets, preprocessing and participant partitions (SPEC section 5).

The engine needs one call, :func:`prepare`, which loads a dataset by name,
partitions its training set over the participants and applies the model's
preprocessing::

    dataset, parts = dssgd_jax.data.prepare(
        "digits", num_participants=10, samples_per_participant=100,
        model="digits_cnn")
    # dataset.train_images[parts[i]] is participant i's private data.

The pieces are also public for users and notebooks:

* :func:`load_dataset` (:mod:`.datasets`): a dataset by name from the original
  files in a local directory (:mod:`.files`) or tensorflow-datasets
  (:mod:`.tfds_source`); :func:`load_digits` for the bundled 8x8 digits;
* :func:`preprocess` (:mod:`.transforms`): padding, RGB -> YUV,
  standardization;
* :func:`make_partition` (:mod:`.partition`): ``iid``, ``shards`` and
  ``dirichlet`` partitions.

:data:`DATASETS`, :data:`SOURCES` and :data:`PARTITIONS` are the allowed
values of ``--dataset``, ``--data_source`` and ``--partition``.
"""

import numpy as np

from dssgd_jax.data import partition
from dssgd_jax.data.base import Dataset
from dssgd_jax.data.datasets import DATASETS
from dssgd_jax.data.datasets import FASHION_MNIST_DEBIAN_DIR
from dssgd_jax.data.datasets import load_dataset
from dssgd_jax.data.datasets import SOURCES
from dssgd_jax.data.datasets import SVHN_PAPER_TEST_EXAMPLES
from dssgd_jax.data.datasets import SVHN_PAPER_TRAIN_EXAMPLES
from dssgd_jax.data.digits import load_digits
from dssgd_jax.data.partition import make_partition
from dssgd_jax.data.partition import PARTITIONS
from dssgd_jax.data.transforms import preprocess

DATA_SOURCES = SOURCES

__all__ = [
    "DATASETS", "DATA_SOURCES", "Dataset", "FASHION_MNIST_DEBIAN_DIR",
    "PARTITIONS", "SOURCES", "load_dataset", "load_digits", "make_partition",
    "partition", "prepare", "preprocess",
]


def prepare(dataset: str, *, num_participants: int,
            samples_per_participant: int, model: str | None = None,
            seed: int = 0, data_source: str = "auto",
            data_dir: str | None = None, partition: str = "iid",
            dirichlet_alpha: float = 0.5, standardize: bool | None = None,
            svhn_paper_split: bool = False,
            svhn_train_examples: int = SVHN_PAPER_TRAIN_EXAMPLES,
            svhn_test_examples: int = SVHN_PAPER_TEST_EXAMPLES,
            shards_per_participant: int = 2) -> tuple[Dataset, np.ndarray]:
  """Loads, partitions and preprocesses the data a run needs.

  Args:
    dataset: a name of :data:`DATASETS`.
    num_participants, samples_per_participant: N and n.
    model: the model name (its preprocessing, e.g. 32x32 padding).
    seed: the partition's seed.
    data_source, data_dir: where the data comes from (:func:`load_dataset`).
    partition, dirichlet_alpha, shards_per_participant: the partition
      (:func:`make_partition`).
    standardize: bool, or None for the dataset's default.
    svhn_paper_split, svhn_train_examples, svhn_test_examples: SVHN as the
      paper.

  Returns:
    ``(dataset, parts)``: the preprocessed :class:`Dataset` and int32 indices
    of shape (num_participants, samples_per_participant) into its training
    set, disjoint across participants.

  Raises:
    DataError: one sentence naming the flag or file that is wrong.

  >>> ds, parts = prepare("digits", num_participants=10,
  ...                     samples_per_participant=100, model="digits_cnn")
  >>> ds.train_images.shape, parts.shape
  ((1437, 8, 8, 1), (10, 100))
  """
  ds = load_dataset(
      dataset, source=data_source, data_dir=data_dir,
      svhn_paper_split=bool(svhn_paper_split),
      svhn_train_examples=svhn_train_examples,
      svhn_test_examples=svhn_test_examples or SVHN_PAPER_TEST_EXAMPLES)
  # Partition before the (slower) preprocessing so size errors come at once;
  # preprocessing keeps the order of the examples.
  parts = make_partition(
      partition, ds.train_labels, num_participants, samples_per_participant,
      seed, dirichlet_alpha=dirichlet_alpha,
      shards_per_participant=shards_per_participant)
  ds = preprocess(ds, model=model, standardize=standardize)
  return ds, parts
