"""The data a plan names, loaded and laid out on the participant axis.

:func:`load` reads the dataset (:func:`dssgd_jax.data.load_dataset`), draws
the partition (:func:`dssgd_jax.data.make_partition`, equal or unequal sizes)
and applies the model's preprocessing (padding, YUV) — but not the
standardization, which is each participant's own: :func:`layout` gives every
participant its examples, standardized per channel with the statistics of its
*own* training examples (what a deployed participant, who sees only its own
data, computes: :func:`standardize_own`), padded to one array shape with
the number of real examples each. ``centralized`` is one participant holding
the union, so its statistics are the pooled ones. The server, which holds no
training data, standardizes the public test split with the test split's own
statistics (:func:`server_test_split`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dssgd_jax.data import base as data_base
from dssgd_jax.data import partition as partition_lib
from dssgd_jax.data import transforms
from dssgd_jax.participant import ParticipantData
from dssgd_jax.run.plan import DataSpec


def standardizes(spec: DataSpec) -> bool:
  """Whether the participants standardize their images (the dataset's
  default unless the spec says)."""
  if spec.standardize is not None:
    return bool(spec.standardize)
  return spec.dataset in transforms.STANDARDIZE_DATASETS


def load(spec: DataSpec, model: str
         ) -> tuple[data_base.Dataset, np.ndarray]:
  """``(dataset, parts)``: the preprocessed (not standardized) dataset and
  the partition, (N, n) indices into its training set (rows padded with
  :data:`dssgd_jax.data.partition.PAD` for unequal sizes).

  Raises:
    DataError: one sentence naming the flag or file that is wrong.
  """
  from dssgd_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  ds = data_lib.load_dataset(
      spec.dataset, source=spec.data_source, data_dir=spec.data_dir,
      svhn_paper_split=bool(spec.svhn_paper_split),
      svhn_test_examples=spec.svhn_test_examples or
      data_lib.SVHN_PAPER_TEST_EXAMPLES)
  parts = partition(spec, ds.train_labels, spec.seed)
  ds = transforms.preprocess(ds, model=model, standardize=False)
  return ds, parts


def partition(spec: DataSpec, labels: np.ndarray, seed: int) -> np.ndarray:
  """The partition of ``spec`` drawn with ``seed``."""
  return partition_lib.make_partition(
      spec.partition, labels, spec.num_participants,
      list(spec.sizes) if spec.sizes else spec.samples_per_participant,
      seed, dirichlet_alpha=spec.dirichlet_alpha)


def seed_partitions(spec: DataSpec, labels: np.ndarray, parts: np.ndarray,
                    num_seeds: int) -> list[np.ndarray]:
  """The partition of each of ``num_seeds`` runs: ``parts`` for every run,
  or with ``vary_partition`` run s's own split drawn from the data seed + s
  (run 0's is ``parts``)."""
  if not spec.vary_partition:
    return [parts] * num_seeds
  return [parts] + [partition(spec, labels, spec.seed + s)
                    for s in range(1, num_seeds)]


class Stats(NamedTuple):
  """Per-model per-channel standardization: ``(x - shift) * scale``.

  Attributes:
    shift: float32 (P, C) channel means.
    scale: float32 (P, C) inverse channel standard deviations.
  """
  shift: np.ndarray
  scale: np.ndarray


def own_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(shift, scale) of one participant's own training images (a constant
  channel is only centred)."""
  mean, std = transforms.channel_stats(np.asarray(images, np.float32))
  std = np.where(std < 1e-8, 1.0, std)
  return mean.astype(np.float32), (1.0 / std).astype(np.float32)


def standardize_own(train_images: np.ndarray, *others: np.ndarray):
  """A participant's images standardized with its own training statistics:
  ``(train, *others)`` and the :class:`Stats` row used."""
  shift, scale = own_stats(train_images)
  out = [(np.asarray(x, np.float32) - shift) * scale
         for x in (train_images,) + others]
  return out, (shift, scale)


class Layout(NamedTuple):
  """The participants' private data on the participant axis.

  Attributes:
    data: :class:`~dssgd_jax.participant.ParticipantData`, (P, n, ...)
      images and labels (standardized per participant where the run
      standardizes), ``count`` (P,) when the participants hold unequal
      numbers of examples.
    stats: each model's standardization (:class:`Stats`), or None.
  """
  data: ParticipantData
  stats: Stats | None


def layout(spec: DataSpec, dataset: data_base.Dataset, parts: np.ndarray
           ) -> Layout:
  """Each model's private data: (N, n, ...), or (1, N·n, ...) — the union —
  for ``centralized``."""
  parts = np.asarray(parts)
  if spec.centralized:
    parts = parts[parts != partition_lib.PAD].reshape(1, -1)
  counts = partition_lib.counts(parts)
  images = np.asarray(dataset.train_images)[parts]
  labels = np.asarray(dataset.train_labels)[parts]
  stats = None
  if standardizes(spec):
    shifts, scales = [], []
    for i, n in enumerate(counts):
      (own,), (shift, scale) = standardize_own(images[i, :n])
      images[i, :n] = own
      images[i, n:] = 0.0
      shifts.append(shift)
      scales.append(scale)
    stats = Stats(np.stack(shifts), np.stack(scales))
  uneven = bool(np.any(counts != parts.shape[1]))
  return Layout(ParticipantData(images, labels.astype(np.int32),
                                counts if uneven else None), stats)


def evaluation_split(spec: DataSpec, dataset: data_base.Dataset
                     ) -> tuple[np.ndarray, np.ndarray]:
  """The test images and labels a run evaluates on: all of them, or the
  fixed ``eval_examples`` subset drawn from the data seed (not
  standardized)."""
  test_x, test_y = dataset.test_images, dataset.test_labels
  if spec.eval_examples and spec.eval_examples < len(test_y):
    pick = np.random.default_rng(spec.seed + 1).choice(
        len(test_y), spec.eval_examples, replace=False)
    pick.sort()
    test_x, test_y = test_x[pick], test_y[pick]
  return test_x, test_y


def server_test_split(spec: DataSpec, dataset: data_base.Dataset
                      ) -> tuple[np.ndarray, np.ndarray]:
  """The test split the server evaluates its model on, standardized (where
  the run standardizes) with the test split's own statistics: the server
  holds no training data."""
  x, y = evaluation_split(spec, dataset)
  if standardizes(spec):
    (x,), _ = standardize_own(x)
  return x, y
