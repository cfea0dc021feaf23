"""Partitions of a training set over participants (SPEC section 5).

Every partition returns an int array of shape (num_participants,
samples_per_participant) of indices into the training set; rows are disjoint.
"""

import numpy as np

from dssgd_jax.errors import DataError


def iid(labels: np.ndarray, num_participants: int, samples_per_participant: int,
        seed: int) -> np.ndarray:
  """Equal, disjoint, uniformly random shards.

  >>> iid(np.arange(10) % 2, 2, 3, seed=0).shape
  (2, 3)
  """
  need = num_participants * samples_per_participant
  if need > len(labels):
    raise DataError(
        f"--num_participants={num_participants} x --samples_per_participant="
        f"{samples_per_participant} needs {need} training examples but the "
        f"dataset has only {len(labels)}.")
  perm = np.random.default_rng(seed).permutation(len(labels))[:need]
  return perm.reshape(num_participants, samples_per_participant).astype(np.int32)
