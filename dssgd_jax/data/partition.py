"""Partitions of a training set over participants (SPEC section 5).

Every partition returns an int32 array of shape (num_participants,
samples_per_participant) of indices into the training set. Rows are disjoint,
every participant gets exactly ``samples_per_participant`` examples (the engine
stacks them into one rectangular array), and the result is a deterministic
function of the seed.

* :func:`iid`: a uniformly random subset, cut into equal shards.
* :func:`shards`: pathological non-IID (McMahan et al. 2017). A random subset
  of num_participants x n examples is sorted by label and cut into
  ``shards_per_participant`` x num_participants contiguous shards of about
  n / shards_per_participant examples; each participant gets
  ``shards_per_participant`` random shards, so it sees about that many
  classes.
* :func:`dirichlet`: each participant draws label proportions p ~ Dir(α 1)
  and n labels ~ Multinomial(n, p), then takes that many examples of each
  class from what is left of the class. Where a class has run out, the
  shortfall is taken from the classes with the largest p that still have
  examples. Small α gives each participant few classes; large α gives nearly
  the global label distribution.

Only participant ``i``'s row of indices ever selects participant ``i``'s data.
"""

import numpy as np

from dssgd_jax.errors import DataError

PARTITIONS = ("iid", "shards", "dirichlet")


def _check_sizes(num_examples: int, num_participants: int,
                 samples_per_participant: int) -> None:
  if num_participants < 1:
    raise DataError(f"--num_participants={num_participants} must be at "
                    "least 1.")
  if samples_per_participant < 1:
    raise DataError(f"--samples_per_participant={samples_per_participant} "
                    "must be at least 1.")
  need = num_participants * samples_per_participant
  if need > num_examples:
    raise DataError(
        f"--num_participants={num_participants} x --samples_per_participant="
        f"{samples_per_participant} needs {need} training examples but the "
        f"dataset has only {num_examples}.")


def iid(labels: np.ndarray, num_participants: int, samples_per_participant: int,
        seed: int) -> np.ndarray:
  """Equal, disjoint, uniformly random shards.

  >>> iid(np.arange(10) % 2, 2, 3, seed=0).shape
  (2, 3)
  """
  _check_sizes(len(labels), num_participants, samples_per_participant)
  need = num_participants * samples_per_participant
  perm = np.random.default_rng(seed).permutation(len(labels))[:need]
  return perm.reshape(num_participants,
                      samples_per_participant).astype(np.int32)


def shards(labels: np.ndarray, num_participants: int,
           samples_per_participant: int, seed: int,
           shards_per_participant: int = 2) -> np.ndarray:
  """Label-sorted shards: each participant sees about 2 classes.

  Args:
    labels: (num_examples,) integer labels of the training set.
    num_participants: N.
    samples_per_participant: n; shard sizes are n // s or n // s + 1 so that
      every participant gets exactly n.
    seed: random seed.
    shards_per_participant: s, shards (so, roughly, classes) per participant.

  Returns:
    int32 (N, n) disjoint indices; each row is shuffled.

  >>> parts = shards(np.repeat(np.arange(10), 100), 10, 100, seed=0)
  >>> sorted(len(set(np.repeat(np.arange(10), 100)[p])) for p in parts)[-1] <= 4
  True
  """
  labels = np.asarray(labels)
  _check_sizes(len(labels), num_participants, samples_per_participant)
  s, n = int(shards_per_participant), samples_per_participant
  if not 1 <= s <= n:
    raise DataError(f"shards_per_participant={s} must be between 1 and "
                    f"--samples_per_participant={n}.")
  rng = np.random.default_rng(seed)
  pool = rng.permutation(len(labels))[:num_participants * n]
  # Stable sort of a random subset by label: within a class the order is
  # random, so a shard is a random sample of its class(es).
  pool = pool[np.argsort(labels[pool], kind="stable")]
  # Shard k (in label order) becomes shard slot[k] % s of participant
  # slot[k] // s; slot j of a participant holds n // s (+1 for j < n % s).
  slot = rng.permutation(num_participants * s)
  sizes = n // s + (slot % s < n % s)
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  owner = slot // s
  out = np.empty((num_participants, n), dtype=np.int32)
  filled = np.zeros(num_participants, dtype=np.int64)
  for k in range(len(slot)):
    p, size = owner[k], sizes[k]
    out[p, filled[p]:filled[p] + size] = pool[starts[k]:starts[k] + size]
    filled[p] += size
  return rng.permuted(out, axis=1).astype(np.int32)


def dirichlet(labels: np.ndarray, num_participants: int,
              samples_per_participant: int, seed: int,
              alpha: float = 0.5) -> np.ndarray:
  """Label proportions ~ Dir(α) per participant, n examples each.

  Args:
    labels: (num_examples,) integer labels of the training set.
    num_participants: N.
    samples_per_participant: n.
    seed: random seed.
    alpha: concentration α > 0 (``--dirichlet_alpha``).

  Returns:
    int32 (N, n) disjoint indices; each row is shuffled.

  >>> y = np.repeat(np.arange(10), 100)
  >>> parts = dirichlet(y, 10, 50, seed=0, alpha=100.0)
  >>> parts.shape, len(np.unique(parts)) == parts.size
  ((10, 50), True)
  """
  labels = np.asarray(labels)
  _check_sizes(len(labels), num_participants, samples_per_participant)
  if not (np.isfinite(alpha) and alpha > 0):
    raise DataError(f"--dirichlet_alpha={alpha} must be a positive number.")
  n = samples_per_participant
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
  used = np.zeros(len(classes), dtype=np.int64)
  left = np.array([len(p) for p in pools], dtype=np.int64)
  out = np.empty((num_participants, n), dtype=np.int32)
  for i in range(num_participants):
    props = rng.dirichlet(np.full(len(classes), float(alpha)))
    want = rng.multinomial(n, props)
    take = np.minimum(want, left)
    short = n - int(take.sum())
    # Shortfall: from the participant's most-wanted classes that have data
    # left. _check_sizes guarantees enough examples remain overall.
    for c in np.argsort(-props, kind="stable"):
      if short == 0:
        break
      extra = min(short, int(left[c] - take[c]))
      take[c] += extra
      short -= extra
    row = []
    for c in np.flatnonzero(take):
      row.append(pools[c][used[c]:used[c] + take[c]])
      used[c] += take[c]
      left[c] -= take[c]
    out[i] = rng.permutation(np.concatenate(row))
  return out


def make_partition(kind: str, labels: np.ndarray, num_participants: int,
                   samples_per_participant: int, seed: int, *,
                   dirichlet_alpha: float = 0.5,
                   shards_per_participant: int = 2) -> np.ndarray:
  """Dispatches on ``kind`` (``--partition``), one of :data:`PARTITIONS`.

  >>> make_partition("iid", np.arange(100) % 10, 4, 25, seed=0).shape
  (4, 25)
  """
  if kind == "iid":
    return iid(labels, num_participants, samples_per_participant, seed)
  if kind == "shards":
    return shards(labels, num_participants, samples_per_participant, seed,
                  shards_per_participant=shards_per_participant)
  if kind == "dirichlet":
    return dirichlet(labels, num_participants, samples_per_participant, seed,
                     alpha=dirichlet_alpha)
  raise DataError(f"--partition={kind!r} is not one of: "
                  f"{', '.join(PARTITIONS)}.")
