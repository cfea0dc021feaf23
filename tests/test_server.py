"""Server state, its functional update, and downloads vs numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dssgd_jax import server
from dssgd_jax.selection import Upload


def _random_uploads(rng, p, c, d):
  idx = rng.integers(0, d, size=(p, c)).astype(np.int32)  # duplicates likely
  vals = rng.normal(size=(p, c)).astype(np.float32)
  mask = rng.random((p, c)) < 0.7
  return idx, vals, mask


def ref_apply(params, stat, idx, vals, mask):
  params, stat = params.copy(), stat.copy()
  for i, v, m in zip(idx.ravel(), vals.ravel(), mask.ravel()):
    if m:
      params[i] += v
      stat[i] += 1
  return params, stat


@pytest.mark.parametrize("seed", range(3))
def test_apply_uploads_matches_reference(seed):
  rng = np.random.default_rng(seed)
  d = 50
  w0 = rng.normal(size=d).astype(np.float32)
  idx, vals, mask = _random_uploads(rng, 6, 20, d)
  state = server.init(jnp.asarray(w0))
  new = jax.jit(server.apply_uploads)(state, Upload(idx, vals, mask))
  ref_p, ref_s = ref_apply(w0, np.zeros(d, np.float32), idx, vals, mask)
  np.testing.assert_allclose(new.params, ref_p, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(new.stat, ref_s)


def test_apply_uploads_under_vmap_over_servers():
  rng = np.random.default_rng(7)
  d = 30
  w0 = rng.normal(size=(4, d)).astype(np.float32)
  idx, vals, mask = _random_uploads(rng, 4, 10, d)
  states = jax.vmap(server.init)(jnp.asarray(w0))
  new = jax.vmap(server.apply_uploads)(states, Upload(idx, vals, mask))
  for s in range(4):
    ref_p, ref_s = ref_apply(w0[s], np.zeros(d, np.float32), idx[s:s + 1],
                             vals[s:s + 1], mask[s:s + 1])
    np.testing.assert_allclose(new.params[s], ref_p, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(new.stat[s], ref_s)


def test_stat_decay_every_k_epochs():
  state = server.init(jnp.zeros(3)).replace(stat=jnp.array([4.0, 2.0, 0.0]))
  stats = []
  for _ in range(4):
    state = server.end_epoch(state, stat_decay=0.5, decay_every=2)
    stats.append(state.stat.tolist())
  assert stats == [[4, 2, 0], [2, 1, 0], [2, 1, 0], [1, 0.5, 0]]
  assert int(state.epoch) == 4


def ref_most_updated(stat, count):
  order = sorted(range(len(stat)), key=lambda i: (-stat[i], i))
  mask = np.zeros(len(stat), bool)
  mask[order[:count]] = True
  return mask


@pytest.mark.parametrize("count", [1, 5, 17, 40])
def test_most_updated_download_matches_reference(count):
  rng = np.random.default_rng(count)
  stat = rng.integers(0, 5, size=40).astype(np.float32)  # many ties
  state = server.init(jnp.zeros(40)).replace(stat=jnp.asarray(stat))
  mask = jax.jit(server.download_most_updated(count).mask)(
      state, jax.random.key(0))
  np.testing.assert_array_equal(mask, ref_most_updated(stat, count))


def test_random_download_count_and_overwrite():
  d = 100
  state = server.init(jnp.arange(d, dtype=jnp.float32))
  keys = jax.random.split(jax.random.key(0), 8)
  masks = jax.vmap(lambda k: server.download_random(30).mask(state, k))(keys)
  assert np.all(np.asarray(masks).sum(1) == 30)
  assert len({tuple(np.flatnonzero(m)) for m in np.asarray(masks)}) > 1
  local = -jnp.ones((d,))
  new = server.download(local, state, masks[0])
  m = np.asarray(masks[0])
  np.testing.assert_array_equal(np.asarray(new)[m], np.arange(d)[m])
  np.testing.assert_array_equal(np.asarray(new)[~m], -1)


def test_download_all_and_none():
  state = server.init(jnp.ones(5))
  key = jax.random.key(0)
  assert bool(server.download_all().mask(state, key).all())
  assert not bool(server.download_none().mask(state, key).any())
  assert not bool(server.download_random(0).mask(state, key).any())
  assert server.wire_bytes([5], 5) == 20.0  # every entry: dense 4·D
  assert server.wire_bytes([2], 5) == 16.0  # else 8 per (index, value) pair
  assert server.download_count(1.0, 5) == 5
  assert server.download_count(0.5, 5) == 3
