"""Upload selection: which entries of a participant's update Δw are shared.

Paper section 3 (Shokri & Shmatikov, CCS 2015, "Distributed selective SGD"),
SPEC section 3 "Upload selection". From the flat parameter change ``delta``
(length D) a participant shares at most ``c = ceil(θu·D)`` entries:

* ``largest``: the c entries of largest magnitude ``|Δw|`` (the sign does not
  matter; ties go to the lower index);
* ``threshold``: a uniformly random subset of at most c entries among those with
  ``|Δw| >= τ`` (fewer when fewer pass).

Every selector returns an :class:`Upload` of static shape (c indices, c values,
c-entry validity mask), so it jits and vmaps over participants. Invalid slots
carry index 0 and value 0 and must be ignored (the server does).

* ``random``: a uniformly random subset of exactly c entries (independent of
  the data).

Exact ``largest`` selection does not call ``lax.top_k`` (a sort, slow on
CPU): :func:`select_by_score` uses the bit-level exact top-k of the private
module ``dssgd_jax._topk``, whose index set equals ``lax.top_k``'s (ties to
the lower index) and which is several times faster on a 2-core CPU at
30 x 313,546 values (``python -m dssgd_jax.bench``; docs/benchmarks.md). The
random rules rank by an exactly uniform permutation, so they have no tie
bias. The composable upload rules built on these are in
:mod:`dssgd_jax.rules`.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dssgd_jax import _topk


class Upload(NamedTuple):
  """A sparse upload of static size c.

  Attributes:
    indices: int32 (..., c) positions in the flat parameter vector.
    values: float32 (..., c) values to add at those positions.
    mask: bool (..., c), True for slots that carry a real entry.
  """
  indices: jax.Array
  values: jax.Array
  mask: jax.Array

  @property
  def count(self) -> jax.Array:
    """Number of valid entries (per participant if batched)."""
    return jnp.sum(self.mask, axis=-1)


def upload_count(fraction: float, num_params: int) -> int:
  """``c = ceil(θu·D)``, the static number of upload slots.

  >>> upload_count(0.1, 105506)
  10551
  >>> upload_count(0.0, 10)
  0
  """
  if fraction <= 0:
    return 0
  return min(num_params, int(math.ceil(fraction * num_params - 1e-9)))


def select_by_score(delta: jax.Array, scores: jax.Array, count: int
                    ) -> Upload:
  """The ``count`` entries of ``delta`` with the largest non-negative ``scores``.

  Exact (the index set of ``lax.top_k``, ties to the lower index), in
  increasing index order; entries with a negative score are never chosen, and
  when fewer than ``count`` are eligible the remaining slots are invalid.
  vmaps over a leading participant axis (folded into rows of one program).

  >>> up = select_by_score(jnp.array([5., 6., 7.]), jnp.array([1., -1., 3.]), 2)
  >>> up.indices.tolist(), up.mask.tolist()
  ([0, 2], [True, True])
  """
  idx, vals, valid = _topk.select_top_fn(int(count))(
      delta.reshape(1, -1), scores.astype(jnp.float32).reshape(1, -1))
  return Upload(idx[0], vals[0].astype(delta.dtype), valid[0])


def random_ranks(key: jax.Array, n: int) -> jax.Array:
  """float32 (n,) the numbers 1..n in a uniformly random order.

  From the exact packed-word permutation (:func:`dssgd_jax._topk.
  permutation`), so the c largest ranks are a uniformly random c-subset with
  no ties. (float32 uniform priorities tie about 6,000 times on 313,546
  entries, and the ties went to the lower indices.)

  >>> sorted(random_ranks(jax.random.key(0), 4).tolist())
  [1.0, 2.0, 3.0, 4.0]
  """
  order = _topk.permutation(key, n)
  rank = jnp.zeros((n,), jnp.int32).at[order].set(
      jnp.arange(n, 0, -1, dtype=jnp.int32))
  return rank.astype(jnp.float32)  # exact below 2**24


def top_k_mask(scores: jax.Array, k: int) -> jax.Array:
  """Boolean mask of the k largest non-negative ``scores``; ties to lower index.

  Entries with negative (or NaN) score are never selected, so fewer than k
  may be set. ``scores`` is (D,); vmap for more rows.

  >>> top_k_mask(jnp.array([0.5, 2.0, -1.0, 2.0]), 2).tolist()
  [False, True, False, True]
  """
  return _topk.top_k_mask(scores, k)


def select_largest(delta: jax.Array, count: int) -> Upload:
  """The ``count`` entries of ``delta`` with largest absolute value.

  Args:
    delta: float (D,) parameter change.
    count: static number of entries c (``upload_count(θu, D)``).

  Returns:
    An :class:`Upload` with indices in increasing order.

  >>> up = select_largest(jnp.array([0.1, -3.0, 2.0, 0.0]), 2)
  >>> up.indices.tolist(), up.values.tolist()
  ([1, 2], [-3.0, 2.0])
  """
  if count == 0:
    return _empty(delta)
  return select_by_score(delta, jnp.abs(delta), count)


def select_largest_top_k(delta: jax.Array, count: int) -> Upload:
  """Reference implementation of ``largest`` with ``lax.top_k`` (slower)."""
  if count == 0:
    return _empty(delta)
  _, idx = jax.lax.top_k(jnp.abs(delta), count)
  idx = jnp.sort(idx).astype(jnp.int32)
  return Upload(idx, delta[idx], jnp.ones((count,), bool))


def select_largest_approx(delta: jax.Array, count: int,
                          recall_target: float = 0.95) -> Upload:
  """Approximate ``largest`` with ``lax.approx_max_k`` (fast on TPU).

  The index set may miss some of the true top entries; its expected recall is
  ``recall_target`` on TPU (on CPU/GPU the op is exact).
  """
  if count == 0:
    return _empty(delta)
  _, idx = jax.lax.approx_max_k(jnp.abs(delta), count,
                                recall_target=recall_target)
  idx = jnp.sort(idx).astype(jnp.int32)
  return Upload(idx, delta[idx], jnp.ones((count,), bool))


def select_threshold(delta: jax.Array, count: int, threshold: float,
                     key: jax.Array) -> Upload:
  """A uniformly random subset of at most ``count`` entries with |Δw| >= τ.

  Args:
    delta: float (D,) parameter change.
    count: static maximum number of entries c.
    threshold: τ; entries with ``|delta| >= threshold`` are eligible.
    key: PRNG key for the random subset.

  Returns:
    An :class:`Upload`; ``mask`` marks min(c, #eligible) valid slots.

  >>> up = select_threshold(jnp.array([0.5, 0.0, -0.7]), 2, 0.1,
  ...                       jax.random.key(0))
  >>> sorted(up.indices[up.mask].tolist())
  [0, 2]
  """
  if count == 0:
    return _empty(delta)
  eligible = jnp.abs(delta) >= threshold
  # Distinct random ranks: the top-c eligible ranks are a uniformly random
  # c-subset of the eligible entries.
  scores = jnp.where(eligible, random_ranks(key, delta.shape[-1]), -1.0)
  return select_by_score(delta, scores, count)


def select_random(delta: jax.Array, count: int, key: jax.Array) -> Upload:
  """A uniformly random subset of exactly ``count`` entries (data-independent).

  The choice of indices does not depend on the data, so a noise mechanism on
  the values covers the whole release (see ``dssgd_jax.privacy``).
  """
  if count == 0:
    return _empty(delta)
  return select_by_score(delta, random_ranks(key, delta.shape[-1]), count)


def _empty(delta: jax.Array) -> Upload:
  return Upload(jnp.zeros((0,), jnp.int32), jnp.zeros((0,), delta.dtype),
                jnp.zeros((0,), bool))
