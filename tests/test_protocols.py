"""Protocols and algorithms: reductions to plain SGD and to standalone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dssgd_jax import algorithms
from dssgd_jax import config as config_lib
from dssgd_jax import models
from dssgd_jax import participant
from dssgd_jax import protocols
from dssgd_jax import server as server_lib


def _data(p, n, seed=0):
  kx, ky = jax.random.split(jax.random.key(seed))
  x = jax.random.uniform(kx, (p, n, 8, 8, 1))
  y = jax.random.randint(ky, (p, n), 0, 10)
  return x, y


def _model():
  model = models.get_model("digits_mlp")
  params = models.init_params(model, (8, 8, 1), jax.random.key(0))
  flat, unravel = participant.flatten_params(params)
  return model, flat, unravel


def _run(spec, protocol, p, epochs, x, y, flat, model, unravel, seed=3):
  update = protocols.make_participant_update(model.apply, unravel, spec)
  fn = jax.jit(lambda s, l, k: protocols.get_epoch_fn(protocol)(
      update, spec, s, l, x, y, k))
  state = server_lib.init(flat)
  local = jnp.tile(flat[None], (p, 1))
  for e in range(epochs):
    state, local, stats = fn(state, local, jax.random.fold_in(
        jax.random.key(seed), e))
  return state, local, stats


def test_round_robin_one_participant_full_sharing_is_plain_sgd():
  model, flat, unravel = _model()
  x, y = _data(1, 20)
  spec = protocols.ExchangeSpec(learning_rate=0.1, batch_size=4,
                                upload_count=flat.shape[0],
                                download_count=flat.shape[0])
  state, local, stats = _run(spec, "round_robin", 1, 3, x, y, flat, model,
                             unravel)
  # Plain SGD: the same epochs with the same shuffles, no server at all.
  epoch = participant.make_local_epoch(model.apply, unravel, 4)
  w = flat
  for e in range(3):
    key = jax.random.fold_in(jax.random.key(3), e)
    k = protocols.participant_keys(key, 1)[0]
    k_train = jax.random.split(jax.random.split(k)[1])[0]
    w, _ = epoch(w, x[0], y[0], k_train, 0.1)
  np.testing.assert_allclose(local[0], w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.params, w, rtol=1e-5, atol=1e-6)
  assert int(stats.uploaded[0]) == flat.shape[0]


@pytest.mark.parametrize("protocol", ["round_robin", "parallel"])
def test_upload_fraction_zero_equals_standalone(protocol):
  model, flat, unravel = _model()
  x, y = _data(3, 16)
  base = config_lib.Config(num_participants=3, samples_per_participant=16,
                           batch_size=4, learning_rate=0.1, protocol=protocol)
  d = flat.shape[0]
  spec0 = algorithms.exchange_spec(base.replace(upload_fraction=0.0), d)
  spec_sa = algorithms.exchange_spec(base.replace(algorithm="standalone"), d)
  assert spec0 == spec_sa
  f0 = algorithms.epoch_function(base.replace(upload_fraction=0.0),
                                 model.apply, unravel, spec0)
  fs = algorithms.epoch_function(base.replace(algorithm="standalone"),
                                 model.apply, unravel, spec_sa)
  s = server_lib.init(flat)
  l0 = ls = jnp.tile(flat[None], (3, 1))
  for e in range(2):
    k = jax.random.key(e)
    _, l0, st0 = f0(s, l0, x, y, k)
    _, ls, sts = fs(s, ls, x, y, k)
  np.testing.assert_array_equal(l0, ls)
  assert np.all(np.asarray(st0.uploaded) == 0)
  # Standalone is really independent training: participant i alone.
  epoch = participant.make_local_epoch(model.apply, unravel, 4)
  w = flat
  for e in range(2):
    key = protocols.participant_keys(jax.random.key(e), 3)[1]
    k_train = jax.random.split(jax.random.split(key)[1])[0]
    w, _ = epoch(w, x[1], y[1], k_train, 0.1)
  np.testing.assert_allclose(ls[1], w, rtol=1e-5, atol=1e-6)


def test_round_robin_participants_see_earlier_uploads():
  model, flat, unravel = _model()
  x, y = _data(2, 12)
  d = flat.shape[0]
  spec = protocols.ExchangeSpec(learning_rate=0.1, batch_size=4,
                                upload_count=d, download_count=d)
  state, local, _ = _run(spec, "round_robin", 2, 1, x, y, flat, model,
                         unravel)
  # Participant 1 started from participant 0's result (full sharing), so the
  # server ends at participant 1's model: sequential SGD over both datasets.
  np.testing.assert_allclose(state.params, local[1], rtol=1e-5, atol=1e-6)
  assert not np.allclose(local[0], local[1])


def test_parallel_equals_per_participant_computation():
  model, flat, unravel = _model()
  x, y = _data(3, 12)
  d = flat.shape[0]
  c = 50
  spec = protocols.ExchangeSpec(learning_rate=0.1, batch_size=4,
                                upload_count=c, download_count=d,
                                clip_bound=0.01)
  key = jax.random.key(9)
  state, local, stats = _run(spec, "parallel", 3, 1, x, y, flat, model,
                             unravel, seed=9)
  update = protocols.make_participant_update(model.apply, unravel, spec)
  keys = protocols.participant_keys(jax.random.fold_in(key, 0), 3)
  want = np.asarray(flat).copy()
  for i in range(3):
    k_up = jax.random.split(keys[i])[1]
    new, up, _ = update(flat, jnp.ones(d, bool), flat, x[i], y[i], k_up)
    np.testing.assert_allclose(local[i], new, rtol=1e-5, atol=1e-6)
    assert int(up.count) == c
    assert float(jnp.max(jnp.abs(up.values))) <= 0.01 + 1e-7
    np.add.at(want, np.asarray(up.indices), np.asarray(up.values))
  np.testing.assert_allclose(state.params, want, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(stats.uploaded) == c)


def test_fedavg_server_is_mean_of_models():
  model, flat, unravel = _model()
  x, y = _data(3, 12)
  cfg = config_lib.Config(algorithm="fedavg", protocol="parallel",
                          batch_size=4, learning_rate=0.1)
  spec = algorithms.exchange_spec(cfg, flat.shape[0])
  fn = algorithms.epoch_function(cfg, model.apply, unravel, spec)
  state, local, _ = fn(server_lib.init(flat), jnp.tile(flat[None], (3, 1)),
                       x, y, jax.random.key(0))
  np.testing.assert_allclose(state.params, jnp.mean(local, 0), rtol=1e-5,
                             atol=1e-6)
