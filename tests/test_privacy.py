"""Tests of dssgd_jax.privacy: bounding, noise, permutation and the SVT.

The SVT is checked three ways: (1) its randomness (``svt_noise``) has the
stated Laplace scales (Kolmogorov-Smirnov); (2) given the same randomness, the
vectorised mechanism (``svt_apply``) returns exactly what a plain Python loop
of the sequential algorithm returns; (3) end to end, its output distribution
matches an independent numpy implementation of the sequential algorithm (and
differs from the known-buggy variant that never redraws the threshold noise).
All statistical tests use fixed seeds and reject only at p < 1e-3.
"""

import doctest
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dssgd_jax import _topk
from dssgd_jax import privacy
from dssgd_jax.selection import Upload

P_MIN = 1e-3


# ----------------------------------------------------------------------------
# Numpy references.


def svt_reference(delta, rng, count, epsilon, gamma, tau, redraw=True):
  """The sequential NumericSparse of SPEC section 3, one visit at a time."""
  delta = np.asarray(delta, np.float64)
  df = 2.0 * gamma
  eps1, eps2 = 8.0 * epsilon / 9.0, 2.0 * epsilon / 9.0
  rho = rng.laplace(0.0, 2 * count * df / eps1)
  idx, vals = [], []
  for j in rng.permutation(len(delta)):
    x = np.clip(delta[j], -gamma, gamma)
    nu = rng.laplace(0.0, 4 * count * df / eps1)
    if abs(x) + nu >= tau + rho:
      idx.append(int(j))
      vals.append(float(np.clip(x + rng.laplace(0.0, 2 * count * df / eps2),
                                -gamma, gamma)))
      if redraw:
        rho = rng.laplace(0.0, 2 * count * df / eps1)
      if len(idx) == count:
        break
  return idx, vals


def svt_loop_given_noise(delta, noise, count, gamma, tau):
  """The sequential algorithm consuming the draws of an ``SVTNoise``."""
  f32 = np.float32
  delta = np.asarray(delta, f32)
  order = np.asarray(noise.order)
  nu = np.asarray(noise.query_noise)
  rho = np.asarray(noise.threshold_noise)
  value_noise = np.asarray(noise.value_noise)
  clipped = np.clip(delta, -f32(gamma), f32(gamma))
  idx, vals = [], []
  for t, j in enumerate(order):
    k = len(idx)
    if k == count:
      break
    if f32(abs(clipped[j]) + nu[t]) >= f32(f32(tau) + rho[k]):
      idx.append(int(j))
      vals.append(np.clip(f32(clipped[j] + value_noise[k]), -f32(gamma),
                          f32(gamma)))
  return idx, np.asarray(vals, f32)


def _keys(seed, n):
  return jax.random.split(jax.random.key(seed), n)


# Most end-to-end tests share one compiled function: D = 40 entries, c = 20
# slots, 2000 runs vmapped over keys, ε, γ and τ traced.
D_SMALL, C_SMALL, RUNS = 40, 20, 2000


@functools.lru_cache(maxsize=None)
def _svt_batch(count, window, per_step):
  def one(delta, key, epsilon, clip_bound, threshold):
    return privacy.svt_select(delta, key, count=count, epsilon=epsilon,
                              clip_bound=clip_bound, threshold=threshold,
                              window=window, per_step=per_step)
  return jax.jit(jax.vmap(one))


def _svt_many(delta, seed, *, epsilon, clip_bound, threshold,
              count=C_SMALL, window=privacy.DEFAULT_WINDOW,
              per_step=privacy.DEFAULT_PER_STEP):
  """RUNS independent runs of svt_select (numpy outputs).

  ``delta`` is one Δw (D_SMALL,) or one per run (RUNS, D_SMALL); ``epsilon``,
  ``clip_bound`` and ``threshold`` are scalars or one per run.
  """
  f32 = np.float32
  per_run = lambda v: np.broadcast_to(np.asarray(v, f32), (RUNS,))
  up = _svt_batch(count, window, per_step)(
      jnp.asarray(np.broadcast_to(np.asarray(delta, f32), (RUNS, D_SMALL))),
      _keys(seed, RUNS), per_run(epsilon), per_run(clip_bound),
      per_run(threshold))
  return (np.asarray(up.indices), np.asarray(up.values), np.asarray(up.mask))


# ----------------------------------------------------------------------------
# Bounding and noise.


def test_clip_matches_numpy_under_jit_and_vmap():
  x = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32)
  np.testing.assert_array_equal(privacy.clip(jnp.asarray(x), 0.5),
                                np.clip(x, -0.5, 0.5))
  np.testing.assert_array_equal(
      jax.jit(privacy.clip)(jnp.asarray(x), 0.3), np.clip(x, -0.3, 0.3))
  per_row = jax.vmap(privacy.clip)(jnp.asarray(x), jnp.array([0.1, 1.0, 2.0]))
  for row, b in zip(range(3), (0.1, 1.0, 2.0)):
    np.testing.assert_allclose(per_row[row], np.clip(x[row], -b, b))
  np.testing.assert_array_equal(privacy.clip(jnp.asarray(x), None), x)


def test_l2_clip():
  rng = np.random.default_rng(1)
  vals = rng.normal(size=(4, 30)).astype(np.float32)
  mask = rng.random((4, 30)) < 0.7
  up = Upload(jnp.zeros((4, 30), jnp.int32), jnp.asarray(vals),
              jnp.asarray(mask))
  out = jax.jit(jax.vmap(privacy.l2_clip, in_axes=(0, None)))(up, 2.0)
  for r in range(4):
    v = np.where(mask[r], vals[r], 0.0)
    norm = np.linalg.norm(v)
    expect = v * min(1.0, 2.0 / norm)
    np.testing.assert_allclose(out.values[r], expect, rtol=1e-5, atol=1e-7)
    assert np.linalg.norm(out.values[r]) <= 2.0 * (1 + 1e-6)
  # Below the bound: unchanged.
  small = privacy.l2_clip(up, 1e6)
  np.testing.assert_array_equal(small.values, np.where(mask, vals, 0.0))
  np.testing.assert_array_equal(small.indices, up.indices)


def test_add_noise_none_is_identity():
  up = Upload(jnp.arange(3), jnp.array([1.0, -2.0, 0.0]),
              jnp.array([True, True, False]))
  out = privacy.add_noise(up, "none", 5.0, jax.random.key(0))
  np.testing.assert_array_equal(out.values, up.values)


@pytest.mark.parametrize("kind,dist", [
    ("laplace", stats.laplace), ("gaussian", stats.norm)])
def test_add_noise_distribution_and_invalid_slots(kind, dist):
  n = 20000
  mask = np.arange(n) % 4 != 0
  up = Upload(jnp.zeros((n,), jnp.int32), jnp.full((n,), 0.25, jnp.float32),
              jnp.asarray(mask))
  scale = 0.7
  out = jax.jit(privacy.add_noise, static_argnums=1)(
      up, kind, scale, jax.random.key(3))
  vals = np.asarray(out.values)
  assert (vals[~mask] == 0).all()
  noise = vals[mask] - 0.25
  assert stats.kstest(noise, dist(scale=scale).cdf).pvalue > P_MIN
  # The scale is the scale, not the mean: a draw centred at `scale` fails.
  assert stats.kstest(noise, dist(loc=scale, scale=1.0).cdf).pvalue < P_MIN


def test_add_noise_vmap_matches_single_and_rejects_svt():
  up = Upload(jnp.zeros((2, 5), jnp.int32), jnp.zeros((2, 5)),
              jnp.ones((2, 5), bool))
  keys = _keys(0, 2)
  batched = jax.vmap(lambda u, k: privacy.add_noise(u, "gaussian", 1.0, k))(
      up, keys)
  single = jax.jit(lambda u, k: privacy.add_noise(u, "gaussian", 1.0, k))
  for i in range(2):
    one = single(jax.tree.map(lambda a: a[i], up), keys[i])
    np.testing.assert_array_equal(batched.values[i], one.values)
  assert not np.array_equal(batched.values[0], batched.values[1])
  with pytest.raises(ValueError):
    privacy.add_noise(up, "svt", 1.0, keys[0])


def test_bound_and_noise_clips_then_noises():
  n = 10000
  rng = np.random.default_rng(2)
  x = rng.normal(size=n).astype(np.float32)
  mask = rng.random(n) < 0.8
  up = Upload(jnp.arange(n, dtype=jnp.int32), jnp.asarray(np.where(mask, x, 0)),
              jnp.asarray(mask))
  plain = privacy.bound_and_noise(up, 0.5, "none", 0.0, jax.random.key(0))
  np.testing.assert_array_equal(plain.values,
                                np.where(mask, np.clip(x, -0.5, 0.5), 0))
  noisy = jax.jit(privacy.bound_and_noise, static_argnums=2)(
      up, 0.5, "laplace", 0.1, jax.random.key(1))
  vals = np.asarray(noisy.values)
  assert (vals[~mask] == 0).all()
  noise = vals[mask] - np.clip(x, -0.5, 0.5)[mask]
  assert stats.kstest(noise, stats.laplace(scale=0.1).cdf).pvalue > P_MIN
  unbounded = privacy.bound_and_noise(up, None, "none", 0.0, jax.random.key(0))
  np.testing.assert_array_equal(unbounded.values, up.values)




# ----------------------------------------------------------------------------
# The permutation.


def test_permutation_is_a_permutation():
  perm = jax.jit(privacy.permutation, static_argnums=1)
  for n in (1, 3, 4099, 70000):  # 0, 1, 2 and 4 rounds
    p = np.asarray(perm(jax.random.key(n), n))
    assert p.dtype == np.int32
    np.testing.assert_array_equal(np.sort(p), np.arange(n))
  assert privacy.permutation_rounds(313546) == 5
  assert privacy.permutation_rounds(105506) == 4


def _perm_counts(perms):
  codes = {q: i for i, q in enumerate(itertools.permutations(range(4)))}
  return np.bincount([codes[tuple(p)] for p in perms], minlength=24)


def test_permutation_uniform():
  perms = jax.jit(jax.vmap(lambda k: privacy.permutation(k, 4)))(
      _keys(0, 12000))
  assert stats.chisquare(_perm_counts(np.asarray(perms))).pvalue > P_MIN


def test_permutation_rounds_compose_least_significant_first():
  # Many 3-bit rounds: ties within a round are frequent, so the result is
  # uniform only if each round breaks ties by the previous round's order.
  many = jax.jit(jax.vmap(
      lambda k: _topk._sort_rounds(k, 4, 2, [3] * 6)))(_keys(1, 12000))
  assert stats.chisquare(_perm_counts(np.asarray(many))).pvalue > P_MIN
  # One 1-bit round leaves ties in index order: clearly not uniform.
  few = jax.jit(jax.vmap(
      lambda k: _topk._sort_rounds(k, 4, 2, [1])))(_keys(2, 12000))
  assert stats.chisquare(_perm_counts(np.asarray(few))).pvalue < P_MIN


def test_permutation_equals_numpy_emulation():
  # n = 70000: 17 index bits, four 15-bit rounds; the third straddles the two
  # random 32-bit words. Emulate the rounds with a stable numpy argsort.
  n, key = 70000, jax.random.key(12)
  index_bits, per_round = _topk._permutation_plan(n)
  assert (index_bits, per_round) == (17, [15, 15, 15, 15])
  words = np.asarray(jax.random.bits(key, (2, n), jnp.uint32), np.uint64)
  stream = words[0] | (words[1] << np.uint64(32))  # 64 random bits per slot
  perm, offset = np.arange(n), 0
  for bits in per_round:
    chunk = (stream >> np.uint64(offset)) & np.uint64((1 << bits) - 1)
    perm = perm[np.argsort(chunk, kind="stable")]
    offset += bits
  np.testing.assert_array_equal(
      jax.jit(privacy.permutation, static_argnums=1)(key, n), perm)


# ----------------------------------------------------------------------------
# SVT: scales and noise.


def test_svt_scales():
  c, eps, gamma = 7, 1.5, 0.25
  s = privacy.svt_scales(c, eps, gamma)
  df = 2 * gamma  # not 1
  np.testing.assert_allclose(
      [float(v) for v in s],
      [df, 8 * eps / 9, 2 * eps / 9, 2 * c * df / (8 * eps / 9),
       4 * c * df / (8 * eps / 9), 2 * c * df / (2 * eps / 9)], rtol=1e-6)


def test_svt_noise_has_the_stated_laplace_scales():
  d = c = 20000
  eps, gamma = 3.0, 0.25
  s = privacy.svt_scales(c, eps, gamma)
  noise = jax.jit(privacy.svt_noise, static_argnums=(1, 2))(
      jax.random.key(7), d, c, eps, gamma)
  np.testing.assert_array_equal(np.sort(noise.order), np.arange(d))
  for draws, scale in ((noise.query_noise, s.query_scale),
                       (noise.threshold_noise, s.threshold_scale),
                       (noise.value_noise, s.value_scale)):
    draws = np.asarray(draws, np.float64)
    assert stats.kstest(draws, stats.laplace(scale=float(scale)).cdf
                        ).pvalue > P_MIN
    # Neither a different scale (sensitivity 1) nor the scale as the mean.
    assert stats.kstest(draws, stats.laplace(scale=float(scale) / (2 * gamma))
                        .cdf).pvalue < P_MIN
    assert stats.kstest(draws, stats.laplace(loc=float(scale)).cdf
                        ).pvalue < P_MIN


# ----------------------------------------------------------------------------
# SVT: the vectorised mechanism equals the sequential loop on the same draws.


@pytest.mark.parametrize("d,c,eps,window,per_step", [
    (37, 40, 5.0, 16, 1),       # c > D
    (3000, 300, 1e4, privacy.DEFAULT_WINDOW, privacy.DEFAULT_PER_STEP),
    (2000, 400, 30.0, 256, 8),  # wide windows, many releases per step
    (50, 50, 1e9, 4, 3),        # every index passes: a release per position
])
def test_svt_apply_equals_sequential_loop(d, c, eps, window, per_step):
  rng = np.random.default_rng(d + c)
  delta = (rng.normal(size=d) * 0.1).astype(np.float32)
  gamma, tau = 0.05, 0.02
  if eps == 1e9:
    tau = -1.0
  s = privacy.svt_scales(c, eps, gamma)
  lap = lambda scale, n: (float(scale) * rng.laplace(size=n)).astype(
      np.float32)
  noise = privacy.SVTNoise(
      order=jnp.asarray(rng.permutation(d), jnp.int32),
      query_noise=jnp.asarray(lap(s.query_scale, d)),
      threshold_noise=jnp.asarray(lap(s.threshold_scale, c)),
      value_noise=jnp.asarray(lap(s.value_scale, c)))
  up = jax.jit(functools.partial(
      privacy.svt_apply, count=c, clip_bound=gamma, threshold=tau,
      window=window, per_step=per_step))(jnp.asarray(delta), noise)
  idx, vals = svt_loop_given_noise(delta, noise, c, gamma, tau)
  n = int(np.sum(up.mask))
  assert n == len(idx) and n > 0
  np.testing.assert_array_equal(up.mask, np.arange(c) < n)
  np.testing.assert_array_equal(up.indices[:n], idx)
  np.testing.assert_array_equal(up.values[:n], vals)
  assert (np.asarray(up.indices[n:]) == 0).all()
  assert (np.asarray(up.values[n:]) == 0).all()


# ----------------------------------------------------------------------------
# SVT: properties and end-to-end distribution (D = 40, c = 20).


def test_svt_output_properties():
  gamma = 0.05
  delta = np.random.default_rng(3).normal(size=D_SMALL).astype(np.float32) / 10
  idx, vals, mask = _svt_many(delta, 3, epsilon=2.0, clip_bound=gamma,
                              threshold=0.01)
  counts = mask.sum(1)
  assert (counts <= C_SMALL).all() and counts.min() < counts.max()
  np.testing.assert_array_equal(mask, np.arange(C_SMALL) < counts[:, None])
  assert (vals[~mask] == 0).all() and (idx[~mask] == 0).all()
  assert (np.abs(vals) <= gamma).all()                       # bounded
  for i in range(RUNS):                                      # no index twice
    assert len(set(idx[i, :counts[i]].tolist())) == counts[i]
  # Released values are noised, not the clipped Δw itself.
  clipped = np.clip(delta[idx], -gamma, gamma)
  assert np.mean(vals[mask] == clipped[mask]) < 0.5


def test_svt_fewer_than_c_pass_values_still_noised_and_clipped():
  # Only 3 entries can pass; the other slots are invalid, not raw values.
  delta = np.array([5.0, -5.0, 5.0] + [0.0] * (D_SMALL - 3), np.float32)
  idx, vals, mask = _svt_many(delta, 4, epsilon=2e4, clip_bound=1.0,
                              threshold=0.5)
  assert (mask.sum(1) == 3).all()
  assert np.isin(idx[mask], [0, 1, 2]).all()
  released = vals[mask]
  assert (np.abs(released) <= 1.0).all()
  assert 0.3 < np.mean(np.abs(released) < 1.0) < 0.7  # noised, then clipped
  assert (vals[~mask] == 0).all()


def test_svt_epsilon_infinity_selects_eligible_in_random_order():
  gamma, tau, eps = 1.0, 0.3, 1e9
  sign = np.where(np.arange(D_SMALL) % 3 == 0, -1.0, 1.0)
  # c >= #eligible (12): exactly the eligible entries, with clipped values.
  delta = (sign * np.where(np.arange(D_SMALL) % 10 < 3, 2.0, 0.1)
           ).astype(np.float32)
  eligible = np.flatnonzero(np.abs(delta) >= tau)
  assert len(eligible) == 12
  idx, vals, mask = _svt_many(delta, 5, epsilon=eps, clip_bound=gamma,
                              threshold=tau)
  assert (mask.sum(1) == 12).all()
  np.testing.assert_array_equal(np.sort(idx[:, :12], axis=1),
                                np.broadcast_to(eligible, (RUNS, 12)))
  np.testing.assert_allclose(vals[mask], np.clip(delta[idx[mask]], -1, 1),
                             atol=1e-5)
  # c < #eligible (25): the first c eligible entries of a random order.
  delta = (sign * np.where(np.arange(D_SMALL) % 8 < 5, 0.6, 0.1)
           ).astype(np.float32)
  eligible = np.flatnonzero(np.abs(delta) >= tau)
  assert len(eligible) == 25
  idx, _, mask = _svt_many(delta, 6, epsilon=eps, clip_bound=gamma,
                           threshold=tau)
  assert mask.all() and np.isin(idx, eligible).all()
  first = np.bincount(idx[:, 0], minlength=D_SMALL)[eligible]
  assert stats.chisquare(first).pvalue > P_MIN          # uniform first pick
  included = np.bincount(idx.ravel(), minlength=D_SMALL)[eligible]
  # Each eligible entry is in a uniform 20-of-25 subset: w.p. 0.8.
  z = (included - RUNS * 0.8) / np.sqrt(RUNS * 0.8 * 0.2)
  assert stats.norm.sf(np.abs(z).max()) * 2 * 25 > P_MIN
  # The upload lists entries in the random visiting order, not index order.
  assert np.mean(np.all(np.diff(idx, axis=1) > 0, axis=1)) < 0.01


def test_svt_released_noise_has_laplace_scale_end_to_end():
  # τ very low: every visited entry passes for sure, so the released values of
  # x = 0 are exactly the value noise, Lap(2cΔf/ε2) with b = 0.05, clipped to
  # ±γ = ±1 (the clip is negligible).
  gamma, b = 1.0, 0.05
  eps = 2 * C_SMALL * (2 * gamma) / (2.0 / 9.0) / b
  _, vals, mask = _svt_many(np.zeros(D_SMALL, np.float32), 8, epsilon=eps,
                            clip_bound=gamma, threshold=-1e7)
  assert mask.all()
  sample = vals[:250].ravel()
  assert stats.kstest(sample, stats.laplace(scale=b).cdf).pvalue > P_MIN
  assert stats.kstest(sample, stats.laplace(scale=b / 2).cdf).pvalue < P_MIN


def _two_sample_counts(a, b, bins):
  """Chi-square homogeneity test of two samples of small integers."""
  table = np.stack([np.bincount(a, minlength=bins),
                    np.bincount(b, minlength=bins)])
  table = table[:, table.sum(0) > 0]
  return stats.chi2_contingency(table).pvalue


def test_svt_matches_independent_reference_in_distribution():
  # b_ρ = 0.3, b_ν = 0.6, b_val = 1.2: acceptance depends on |x| but is noisy.
  gamma, tau, eps = 1.0, 0.5, 300.0
  delta = np.linspace(-1.2, 1.2, D_SMALL).astype(np.float32)
  idx, vals, mask = _svt_many(delta, 9, epsilon=eps, clip_bound=gamma,
                              threshold=tau)
  runs = len(idx)
  rng = np.random.default_rng(9)
  ref = [svt_reference(delta, rng, C_SMALL, eps, gamma, tau)
         for _ in range(runs)]
  # Number released.
  assert _two_sample_counts(mask.sum(1), [len(r[0]) for r in ref],
                            C_SMALL + 1) > P_MIN
  # Per-index inclusion frequencies (2x2 tests, Bonferroni over indices).
  ours = np.bincount(idx[mask], minlength=D_SMALL)
  theirs = np.bincount([j for r in ref for j in r[0]], minlength=D_SMALL)
  pvals = [stats.chi2_contingency([[ours[j], runs - ours[j]],
                                   [theirs[j], runs - theirs[j]]]).pvalue
           for j in range(D_SMALL)]
  assert min(pvals) * D_SMALL > P_MIN, (ours, theirs)
  assert ours.max() - ours.min() > runs / 4  # the test is informative
  # First released index.
  assert _two_sample_counts(idx[mask[:, 0], 0], [r[0][0] for r in ref if r[0]],
                            D_SMALL) > P_MIN
  # Released values of the largest entry (noisy, clipped).
  ours_v = vals[mask & (idx == D_SMALL - 1)]
  theirs_v = [v for r in ref for j, v in zip(*r) if j == D_SMALL - 1]
  assert stats.ks_2samp(ours_v, theirs_v).pvalue > P_MIN


def test_svt_redraws_threshold_noise():
  # x = 0 everywhere, τ = 0, b_ρ = 1: the number released is much more spread
  # out when ρ is drawn once (a known bug) than when it is redrawn.
  gamma = 1.0
  eps = 2 * C_SMALL * 2 * gamma / (8.0 / 9.0)
  delta = np.zeros(D_SMALL, np.float32)
  _, _, mask = _svt_many(delta, 10, epsilon=eps, clip_bound=gamma,
                         threshold=0.0)
  ours = mask.sum(1)
  rng = np.random.default_rng(10)
  redraw = [len(svt_reference(delta, rng, C_SMALL, eps, gamma, 0.0)[0])
            for _ in range(RUNS)]
  once = [len(svt_reference(delta, rng, C_SMALL, eps, gamma, 0.0,
                            redraw=False)[0]) for _ in range(RUNS)]
  assert stats.ks_2samp(ours, redraw).pvalue > P_MIN
  assert stats.ks_2samp(ours, once).pvalue < 1e-10
  assert stats.ks_2samp(redraw, once).pvalue < 1e-10  # the test has power


def test_svt_vmap_over_participants_jit_and_traced_epsilon():
  # Participants with their own Δw and ε, batched, equal one-by-one calls.
  rng = np.random.default_rng(11)
  deltas = rng.normal(size=(RUNS, D_SMALL)).astype(np.float32) / 10
  eps = np.resize(np.float32([0.5, 5.0, 50.0]), RUNS)
  idx, vals, mask = _svt_many(deltas, 11, epsilon=eps, clip_bound=0.1,
                              threshold=0.02)
  keys = _keys(11, RUNS)
  single = jax.jit(lambda x, k, e: privacy.svt_select(
      x, k, count=C_SMALL, epsilon=e, clip_bound=0.1, threshold=0.02))
  for i in range(3):
    one = single(deltas[i], keys[i], eps[i])
    np.testing.assert_array_equal(idx[i], one.indices)
    np.testing.assert_array_equal(mask[i], one.mask)
    np.testing.assert_allclose(vals[i], one.values, rtol=1e-5, atol=1e-7)
  assert len({tuple(r) for r in idx[:50]}) == 50  # independent participants


def test_svt_edge_cases():
  delta = jnp.ones((5,))
  empty = privacy.svt_select(delta, jax.random.key(0), count=0, epsilon=1.0,
                             clip_bound=1.0, threshold=0.0)
  assert empty.indices.shape == empty.values.shape == (0,)
  with pytest.raises(ValueError):
    privacy.svt_select(delta, jax.random.key(0), count=2, epsilon=0.0,
                       clip_bound=1.0, threshold=0.0)
  with pytest.raises(ValueError):
    privacy.svt_select(delta, jax.random.key(0), count=2, epsilon=1.0,
                       clip_bound=None, threshold=0.0)


# ----------------------------------------------------------------------------
# Composition and the docstring examples.


def test_docstring_examples():
  result = doctest.testmod(privacy)
  assert result.attempted > 10 and result.failed == 0
