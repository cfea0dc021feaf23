"""Datasets, preprocessing and participant partitions (SPEC section 5).

The engine needs one call, :func:`prepare`, which loads the dataset named by
the config, partitions its training set over the participants and applies the
model's preprocessing::

    dataset, parts = dssgd_jax.data.prepare(cfg)
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

DATA_SOURCES = SOURCES  # the name dssgd_jax.config uses

__all__ = [
    "DATASETS", "DATA_SOURCES", "Dataset", "FASHION_MNIST_DEBIAN_DIR",
    "PARTITIONS", "SOURCES", "load_dataset", "load_digits", "make_partition",
    "partition", "prepare", "preprocess",
]


def prepare(cfg) -> tuple[Dataset, np.ndarray]:
  """Loads, partitions and preprocesses the data a run needs.

  Args:
    cfg: any object with the attributes ``dataset``, ``data_source``,
      ``data_dir``, ``model``, ``partition``, ``dirichlet_alpha``,
      ``num_participants``, ``samples_per_participant``, ``seed``,
      ``standardize`` (bool or None: the dataset's default),
      ``svhn_paper_split`` and ``svhn_test_examples``; optionally
      ``svhn_train_examples`` (default 100,000) and ``shards_per_participant``
      (default 2).

  Returns:
    ``(dataset, parts)``: the preprocessed :class:`Dataset` and int32 indices
    of shape (num_participants, samples_per_participant) into its training
    set, disjoint across participants.

  Raises:
    DataError: one sentence naming the flag or file that is wrong.

  >>> import types
  >>> cfg = types.SimpleNamespace(
  ...     dataset="digits", data_source="auto", data_dir=None,
  ...     model="digits_cnn", partition="iid", dirichlet_alpha=0.5,
  ...     num_participants=10, samples_per_participant=100, seed=0,
  ...     standardize=None, svhn_paper_split=False, svhn_test_examples=10000)
  >>> ds, parts = prepare(cfg)
  >>> ds.train_images.shape, parts.shape
  ((1437, 8, 8, 1), (10, 100))
  """
  ds = load_dataset(
      cfg.dataset, source=cfg.data_source, data_dir=cfg.data_dir,
      svhn_paper_split=bool(cfg.svhn_paper_split),
      svhn_train_examples=getattr(cfg, "svhn_train_examples",
                                  SVHN_PAPER_TRAIN_EXAMPLES),
      svhn_test_examples=getattr(cfg, "svhn_test_examples", None)
      or SVHN_PAPER_TEST_EXAMPLES)
  # Partition before the (slower) preprocessing so size errors come at once;
  # preprocessing keeps the order of the examples.
  parts = make_partition(
      cfg.partition, ds.train_labels, cfg.num_participants,
      cfg.samples_per_participant, cfg.seed,
      dirichlet_alpha=cfg.dirichlet_alpha,
      shards_per_participant=getattr(cfg, "shards_per_participant", 2))
  ds = preprocess(ds, model=cfg.model, standardize=cfg.standardize)
  return ds, parts
