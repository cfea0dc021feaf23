"""Protocols and algorithms: reductions to plain SGD and to standalone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dssgd_jax import algorithms
from dssgd_jax.run import config as config_lib
from dssgd_jax import models
from dssgd_jax import participant
from dssgd_jax import protocols
from dssgd_jax import rules
from dssgd_jax import server as server_lib
from dssgd_jax.run import build


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


def _protocol(kind, rule, model, unravel, download=None, lr=0.1, batch=4,
              **kw):
  update = participant.make_update(
      participant.make_local_epoch(model.apply, unravel, batch), rule, lr)
  download = server_lib.download_all() if download is None else download
  return {"round_robin": protocols.round_robin,
          "parallel": protocols.parallel}[kind](update, download, **kw), update


def _run(proto, p, epochs, x, y, flat, seed=3):
  fn = jax.jit(proto.epoch)
  state = proto.init(server_lib.init(flat), jnp.tile(flat[None], (p, 1)))
  for e in range(epochs):
    state, stats = fn(state, x, y, jax.random.fold_in(jax.random.key(seed), e))
  return state["server"], state["local"], stats


def test_round_robin_one_participant_full_sharing_is_plain_sgd():
  model, flat, unravel = _model()
  x, y = _data(1, 20)
  proto, _ = _protocol("round_robin", rules.chain(), model, unravel)
  state, local, stats = _run(proto, 1, 3, x, y, flat)
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
  base = config_lib.validate(config_lib.Config(
      num_participants=3, samples_per_participant=16, batch_size=4,
      learning_rate=0.1, protocol=protocol, dataset="digits",
      model="digits_mlp"))
  d = flat.shape[0]
  local_epoch = participant.make_local_epoch(model.apply, unravel, 4)
  axis = protocols.ParticipantAxis()
  p0 = build.protocol(base.replace(upload_fraction=0.0), local_epoch, d, axis)
  ps = build.protocol(config_lib.for_algorithm(base, "standalone"),
                      local_epoch, d, axis)
  assert build.upload_rule(base.replace(upload_fraction=0.0), d) is None
  f0, fs = jax.jit(p0.epoch), jax.jit(ps.epoch)
  s = server_lib.init(flat)
  st0 = st_s = p0.init(s, jnp.tile(flat[None], (3, 1)))
  for e in range(2):
    k = jax.random.key(e)
    st0, stats0 = f0(st0, x, y, k)
    st_s, _ = fs(st_s, x, y, k)
  l0, ls = st0["local"], st_s["local"]
  np.testing.assert_array_equal(l0, ls)
  assert np.all(np.asarray(stats0.uploaded) == 0)
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
  proto, _ = _protocol("round_robin", rules.chain(), model, unravel)
  state, local, _ = _run(proto, 2, 1, x, y, flat)
  # Participant 1 started from participant 0's result (full sharing), so the
  # server ends at participant 1's model: sequential SGD over both datasets.
  np.testing.assert_allclose(state.params, local[1], rtol=1e-5, atol=1e-6)
  assert not np.allclose(local[0], local[1])


def test_parallel_equals_per_participant_computation():
  model, flat, unravel = _model()
  x, y = _data(3, 12)
  d = flat.shape[0]
  c = 50
  rule = rules.chain(rules.select_largest(c), rules.clip(0.01))
  proto, update = _protocol("parallel", rule, model, unravel)
  key = jax.random.key(9)
  state, local, stats = _run(proto, 3, 1, x, y, flat, seed=9)
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
  update = participant.make_update(
      participant.make_local_epoch(model.apply, unravel, 4), rules.chain(),
      0.1)
  proto = algorithms.fedavg(update, jnp.array([12, 12, 12]))
  state, local, _ = _run(proto, 3, 1, x, y, flat, seed=0)
  np.testing.assert_allclose(state.params, jnp.mean(local, 0), rtol=1e-5,
                             atol=1e-6)
