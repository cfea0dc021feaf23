"""Upload selection against slow numpy references, under jit and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dssgd_jax import selection


def ref_largest(x, c):
  """Indices of the c largest |x|, ties to the lower index, sorted."""
  order = sorted(range(len(x)), key=lambda i: (-abs(float(x[i])), i))
  return sorted(order[:c])


def _random_delta(rng, d, ties=False):
  x = rng.normal(size=d).astype(np.float32)
  if ties:  # many exact ties, of both signs
    x = np.round(x * 2) / 2
  return x


@pytest.mark.parametrize("d,c", [(1, 1), (10, 3), (257, 26), (1000, 1),
                                 (1000, 1000), (5000, 50)])
@pytest.mark.parametrize("ties", [False, True])
def test_largest_matches_reference(d, c, ties):
  rng = np.random.default_rng(d * 7 + c)
  x = _random_delta(rng, d, ties)
  up = jax.jit(selection.select_largest, static_argnums=1)(jnp.asarray(x), c)
  assert up.indices.shape == (c,)
  assert bool(up.mask.all())
  assert up.indices.tolist() == ref_largest(x, c)
  np.testing.assert_array_equal(up.values, x[np.asarray(up.indices)])


def test_largest_ranks_by_absolute_value():
  x = jnp.array([-5.0, 1.0, 2.0, -0.5])
  assert selection.select_largest(x, 2).indices.tolist() == [0, 2]


def test_largest_equals_top_k_reference():
  x = jax.random.normal(jax.random.key(0), (4, 3000))
  a = jax.vmap(lambda v: selection.select_largest(v, 300))(x)
  b = jax.vmap(lambda v: selection.select_largest_top_k(v, 300))(x)
  np.testing.assert_array_equal(a.indices, b.indices)


def test_largest_under_vmap():
  rng = np.random.default_rng(3)
  xs = np.stack([_random_delta(rng, 400, ties=True) for _ in range(5)])
  ups = jax.jit(jax.vmap(lambda v: selection.select_largest(v, 40)))(xs)
  for p in range(5):
    assert ups.indices[p].tolist() == ref_largest(xs[p], 40)


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.5, 10.0])
def test_threshold_subset_rules(tau):
  rng = np.random.default_rng(1)
  x = _random_delta(rng, 2000)
  c = 100
  up = jax.jit(selection.select_threshold, static_argnums=1)(
      jnp.asarray(x), c, tau, jax.random.key(4))
  eligible = set(np.flatnonzero(np.abs(x) >= tau).tolist())
  chosen = np.asarray(up.indices)[np.asarray(up.mask)].tolist()
  assert len(chosen) == min(c, len(eligible))
  assert len(set(chosen)) == len(chosen)
  assert set(chosen) <= eligible
  np.testing.assert_array_equal(np.asarray(up.values)[np.asarray(up.mask)],
                                x[chosen])
  # Invalid slots carry zeros.
  assert np.all(np.asarray(up.values)[~np.asarray(up.mask)] == 0)


def test_threshold_is_uniform_over_eligible():
  # 20 eligible entries, choose 5: each should be picked with prob 1/4.
  x = np.zeros(60, np.float32)
  x[::3] = np.linspace(1, 2, 20)  # eligible, different magnitudes
  keys = jax.random.split(jax.random.key(0), 4000)
  ups = jax.jit(jax.vmap(
      lambda k: selection.select_threshold(jnp.asarray(x), 5, 0.5, k)))(keys)
  counts = np.zeros(60)
  np.add.at(counts, np.asarray(ups.indices)[np.asarray(ups.mask)], 1)
  freq = counts[::3] / 4000
  assert np.all(counts[1::3] == 0) and np.all(counts[2::3] == 0)
  # Binomial(4000, 0.25): sd = 0.0068; 5 sd tolerance. Larger values are not
  # preferred (that would be the 'largest' rule).
  assert np.all(np.abs(freq - 0.25) < 0.035), freq


def test_random_selection_exact_count_and_uniform():
  keys = jax.random.split(jax.random.key(1), 2000)
  x = jnp.arange(40, dtype=jnp.float32)
  ups = jax.vmap(lambda k: selection.select_random(x, 10, k))(keys)
  assert bool(ups.mask.all())
  counts = np.bincount(np.asarray(ups.indices).ravel(), minlength=40) / 2000
  assert np.all(np.abs(counts - 0.25) < 0.05)


def test_upload_count():
  assert selection.upload_count(0.1, 105506) == 10551
  assert selection.upload_count(1.0, 7) == 7
  assert selection.upload_count(0.001, 10) == 1
  assert selection.upload_count(0.0, 10) == 0


def test_top_k_mask_ignores_negative_scores():
  m = selection.top_k_mask(jnp.array([-1.0, 0.5, -2.0, 0.0]), 3)
  assert m.tolist() == [False, True, False, True]
