"""Partitions of a training set over participants (SPEC section 5).

Every partition returns an int32 array of shape (num_participants, n) of
indices into the training set. Rows are disjoint and the result is a
deterministic function of the seed. ``samples_per_participant`` is one n for
everyone, or each participant's own size (unequal participants,
:func:`skewed_sizes`); then rows are padded to the largest size with
:data:`PAD` (-1) after each participant's own examples, and
:func:`counts` gives each row's number of examples. With equal sizes the
partitions are what they always were.

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
PAD = -1  # the index of a padding slot


def skewed_sizes(num_participants: int, mean_size: int, sigma: float,
                 seed: int) -> list[int]:
  """Unequal sizes with a fixed total: ``N·n`` examples split in proportion
  to ``exp(σ z_i)``, z_i ~ N(0, 1) (log-normal, as LEAF-style federated
  benchmarks), rounded by largest remainder, each at least 1.

  >>> s = skewed_sizes(5, 100, 1.0, seed=0)
  >>> sum(s), min(s) >= 1, len(set(s)) > 1
  (500, True, True)
  >>> skewed_sizes(3, 10, 0.0, seed=0)
  [10, 10, 10]
  """
  n, total = int(num_participants), int(num_participants) * int(mean_size)
  z = np.random.default_rng((int(seed), 0x5153)).standard_normal(n)
  raw = total * np.exp(float(sigma) * z) / np.exp(float(sigma) * z).sum()
  sizes = np.floor(raw).astype(np.int64)
  for i in np.argsort(-(raw - sizes), kind="stable")[:total - sizes.sum()]:
    sizes[i] += 1
  while sizes.min() < 1:  # take from the largest
    sizes[np.argmin(sizes)] += 1
    sizes[np.argmax(sizes)] -= 1
  return [int(x) for x in sizes]


def counts(parts: np.ndarray) -> np.ndarray:
  """(N,) each participant's number of examples in a partition."""
  return np.sum(np.asarray(parts) != PAD, axis=1).astype(np.int32)


def _sizes(num_participants, samples_per_participant) -> np.ndarray:
  if np.ndim(samples_per_participant) == 0:
    return np.full(num_participants, int(samples_per_participant), np.int64)
  sizes = np.asarray(samples_per_participant, np.int64)
  if sizes.shape != (num_participants,):
    raise DataError(f"{len(sizes)} sizes for --num_participants="
                    f"{num_participants}.")
  return sizes


def _padded(rows: list[np.ndarray]) -> np.ndarray:
  out = np.full((len(rows), max(len(r) for r in rows)), PAD, np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


def _check_sizes(num_examples: int, num_participants: int,
                 samples_per_participant) -> None:
  if num_participants < 1:
    raise DataError(f"--num_participants={num_participants} must be at "
                    "least 1.")
  sizes = _sizes(num_participants, samples_per_participant)
  if sizes.min() < 1:
    raise DataError(f"--samples_per_participant={samples_per_participant} "
                    "must be at least 1.")
  need = int(sizes.sum())
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
  sizes = _sizes(num_participants, samples_per_participant)
  need = int(sizes.sum())
  perm = np.random.default_rng(seed).permutation(len(labels))[:need]
  if np.all(sizes == sizes[0]):
    return perm.reshape(num_participants, int(sizes[0])).astype(np.int32)
  return _padded(np.split(perm, np.cumsum(sizes)[:-1]))


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
  own = _sizes(num_participants, samples_per_participant)
  s = int(shards_per_participant)
  if not 1 <= s <= own.min():
    raise DataError(f"shards_per_participant={s} must be between 1 and "
                    f"--samples_per_participant={own.min()}.")
  rng = np.random.default_rng(seed)
  pool = rng.permutation(len(labels))[:int(own.sum())]
  # Stable sort of a random subset by label: within a class the order is
  # random, so a shard is a random sample of its class(es).
  pool = pool[np.argsort(labels[pool], kind="stable")]
  # Shard k (in label order) becomes shard slot[k] % s of participant
  # slot[k] // s; slot j of participant p holds n_p // s (+1 for
  # j < n_p % s).
  slot = rng.permutation(num_participants * s)
  owner = slot // s
  sizes = own[owner] // s + (slot % s < own[owner] % s)
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  out = np.full((num_participants, own.max()), PAD, dtype=np.int32)
  filled = np.zeros(num_participants, dtype=np.int64)
  for k in range(len(slot)):
    p, size = owner[k], sizes[k]
    out[p, filled[p]:filled[p] + size] = pool[starts[k]:starts[k] + size]
    filled[p] += size
  if np.all(own == own[0]):
    return rng.permuted(out, axis=1).astype(np.int32)
  return _padded([rng.permutation(out[p, :own[p]])
                  for p in range(num_participants)])


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
  own = _sizes(num_participants, samples_per_participant)
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
  used = np.zeros(len(classes), dtype=np.int64)
  left = np.array([len(p) for p in pools], dtype=np.int64)
  rows = []
  for i in range(num_participants):
    n = int(own[i])
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
    rows.append(rng.permutation(np.concatenate(row)).astype(np.int32))
  return _padded(rows)


def make_partition(kind: str, labels: np.ndarray, num_participants: int,
                   samples_per_participant, seed: int, *,
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
