"""Tests of dssgd_jax.data.partition: iid, shards and dirichlet partitions."""

import numpy as np
import pytest

from dssgd_jax.data import partition
from dssgd_jax.data.partition import make_partition
from dssgd_jax.errors import DataError

# 10 balanced classes of 1,000 examples, in a shuffled order.
LABELS = np.random.default_rng(42).permutation(np.repeat(np.arange(10), 1000))


def _histograms(labels, parts):
  return np.stack([np.bincount(labels[row], minlength=10) for row in parts])


@pytest.mark.parametrize("kind", partition.PARTITIONS)
def test_shape_dtype_disjoint_and_in_range(kind):
  parts = make_partition(kind, LABELS, 30, 200, seed=0)
  assert parts.shape == (30, 200)
  assert parts.dtype == np.int32
  assert len(np.unique(parts)) == parts.size
  assert parts.min() >= 0 and parts.max() < len(LABELS)


@pytest.mark.parametrize("kind", partition.PARTITIONS)
def test_deterministic_for_a_seed(kind):
  a = make_partition(kind, LABELS, 10, 100, seed=3)
  b = make_partition(kind, LABELS, 10, 100, seed=3)
  c = make_partition(kind, LABELS, 10, 100, seed=4)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("kind", partition.PARTITIONS)
def test_uses_the_whole_set_when_it_exactly_fits(kind):
  parts = make_partition(kind, LABELS, 20, 500, seed=0)
  np.testing.assert_array_equal(np.sort(parts.ravel()), np.arange(10_000))


@pytest.mark.parametrize("kind", partition.PARTITIONS)
def test_too_small_dataset_names_both_flags(kind):
  with pytest.raises(DataError) as e:
    make_partition(kind, LABELS, 30, 600, seed=0)
  msg = str(e.value)
  assert "--num_participants=30" in msg
  assert "--samples_per_participant=600" in msg
  assert "18000" in msg and "10000" in msg
  assert "\n" not in msg


@pytest.mark.parametrize("kind", partition.PARTITIONS)
def test_non_positive_sizes(kind):
  with pytest.raises(DataError, match="--samples_per_participant=0 must be"):
    make_partition(kind, LABELS, 3, 0, seed=0)
  with pytest.raises(DataError, match="--num_participants=0 must be"):
    make_partition(kind, LABELS, 0, 5, seed=0)


def test_iid_is_unchanged():
  # The original implementation's output, relied on by earlier results.
  expected = np.random.default_rng(0).permutation(10)[:6].reshape(2, 3)
  np.testing.assert_array_equal(
      partition.iid(np.arange(10) % 2, 2, 3, seed=0), expected)


def test_iid_histograms_are_near_uniform():
  hist = _histograms(LABELS, partition.iid(LABELS, 10, 500, seed=0))
  assert hist.max() < 90 and hist.min() > 15  # expected 50 each


def test_shards_give_each_participant_about_two_classes():
  parts = partition.shards(LABELS, 30, 200, seed=0)
  classes = (_histograms(LABELS, parts) > 0).sum(axis=1)
  # Two shards of 100 from a label-sorted pool of ~600 per class: each shard
  # spans at most 2 classes, most exactly 1.
  assert classes.max() <= 4
  assert classes.mean() <= 2.7


def test_shards_one_per_participant_and_uneven_sizes():
  parts = partition.shards(LABELS, 10, 101, seed=1, shards_per_participant=3)
  assert parts.shape == (10, 101)
  assert len(np.unique(parts)) == parts.size
  one = partition.shards(LABELS, 20, 300, seed=0, shards_per_participant=1)
  classes = (_histograms(LABELS, one) > 0).sum(axis=1)
  assert classes.max() <= 2


def test_shards_bad_shard_count():
  with pytest.raises(DataError, match="shards_per_participant=0"):
    partition.shards(LABELS, 2, 10, seed=0, shards_per_participant=0)


def test_dirichlet_small_alpha_is_skewed_large_alpha_near_uniform():
  skewed = _histograms(LABELS, partition.dirichlet(LABELS, 10, 200, 0,
                                                   alpha=0.05))
  flat = _histograms(LABELS, partition.dirichlet(LABELS, 10, 200, 0,
                                                 alpha=1000.0))
  assert (skewed.max(axis=1) / 200).mean() > 0.6
  assert ((skewed > 0).sum(axis=1)).mean() < 4
  assert (flat.max(axis=1) / 200).max() < 0.2   # uniform would be 0.1
  assert (flat > 0).all()


def test_dirichlet_falls_back_when_a_class_runs_out():
  # Class 0 has only 10 examples; participants that want more of it get
  # other classes instead, and everyone still gets exactly n.
  labels = np.concatenate([np.zeros(10, int), np.repeat(np.arange(1, 4), 30)])
  parts = partition.dirichlet(labels, 10, 10, seed=0, alpha=0.1)
  assert parts.shape == (10, 10)
  np.testing.assert_array_equal(np.sort(parts.ravel()), np.arange(100))


def test_dirichlet_bad_alpha_names_flag():
  for alpha in (0.0, -1.0, float("nan")):
    with pytest.raises(DataError, match="--dirichlet_alpha="):
      partition.dirichlet(LABELS, 2, 10, seed=0, alpha=alpha)


def test_unknown_partition_names_flag():
  with pytest.raises(DataError, match="--partition='bogus' is not one of"):
    make_partition("bogus", LABELS, 2, 10, seed=0)
