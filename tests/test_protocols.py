"""Protocols, aggregations and algorithms against plain reference loops.

Reductions to plain SGD and to standalone training; the parallel protocol
against a per-participant computation; every aggregation (the paper's sum,
FedAvg's weighted mean, the per-entry mean, a server optimizer) against
numpy; FedAvg and DSSGD with participants of unequal sizes against numpy and
against a per-participant loop.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dssgd_jax import aggregation
from dssgd_jax import algorithms
from dssgd_jax import models
from dssgd_jax import participant
from dssgd_jax import protocols
from dssgd_jax import rules
from dssgd_jax import server as server_lib
from dssgd_jax.participant import ParticipantData
from dssgd_jax.run import build
from dssgd_jax.run import config as config_lib
from dssgd_jax.selection import Upload


def _data(p, n, seed=0, count=None):
  kx, ky = jax.random.split(jax.random.key(seed))
  x = jax.random.uniform(kx, (p, n, 8, 8, 1))
  y = jax.random.randint(ky, (p, n), 0, 10)
  return ParticipantData(x, y, None if count is None else jnp.asarray(count))


def _model():
  model = models.get_model("digits_mlp")
  params = models.init_params(model, (8, 8, 1), jax.random.key(0))
  flat, unravel = participant.flatten_params(params)
  return model, flat, unravel


def _trainer(model, unravel, lr=0.1, batch=4, **kw):
  return participant.make_trainer(model.apply, unravel, batch,
                                  optax.sgd(lr), **kw)


def _protocol(kind, rule, model, unravel, download=None, lr=0.1, batch=4,
              **kw):
  trainer = _trainer(model, unravel, lr, batch)
  update = participant.make_update(trainer, rule)
  download = server_lib.download_all() if download is None else download
  return {"round_robin": protocols.round_robin,
          "parallel": protocols.parallel}[kind](update, download, **kw), (
              update, trainer)


def _init(proto, trainer, flat, p):
  local = jax.vmap(trainer.init)(jnp.tile(flat[None], (p, 1)))
  return proto.init(server_lib.init(flat), local)


def _run(proto, trainer, p, epochs, data, flat, seed=3):
  fn = jax.jit(proto.epoch)
  state = _init(proto, trainer, flat, p)
  for e in range(epochs):
    state, stats = fn(state, data, jax.random.fold_in(jax.random.key(seed), e))
  return state.server, state.local.params, stats


def _train_key(key, i, num):
  k = protocols.participant_keys(key, num)[i]
  return jax.random.split(jax.random.split(k)[1])[0]


def test_round_robin_one_participant_full_sharing_is_plain_sgd():
  model, flat, unravel = _model()
  data = _data(1, 20)
  proto, (_, trainer) = _protocol("round_robin", rules.chain(), model,
                                  unravel)
  state, local, stats = _run(proto, trainer, 1, 3, data, flat)
  # Plain SGD: the same epochs with the same shuffles, no server at all.
  w = trainer.init(flat)
  for e in range(3):
    key = jax.random.fold_in(jax.random.key(3), e)
    w, _ = trainer.epoch(w, data.images[0], data.labels[0],
                         _train_key(key, 0, 1))
  np.testing.assert_allclose(local[0], w.params, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.params, w.params, rtol=1e-5, atol=1e-6)
  assert int(stats.uploaded[0]) == flat.shape[0]


@pytest.mark.parametrize("protocol", ["round_robin", "parallel"])
def test_upload_fraction_zero_builds_standalone(protocol):
  base = build.validate(config_lib.Config(
      num_participants=3, samples_per_participant=16, batch_size=4,
      learning_rate=0.1, protocol=protocol, dataset="digits",
      model="digits_mlp"))
  zero = build.plan(base.replace(upload_fraction=0.0))
  alone = build.plan(build.for_algorithm(base, "standalone"))
  assert zero.upload_rule is None and zero.protocol == "standalone"
  want = alone.describe()
  got = zero.describe()
  for k in ("algorithm", "config"):
    want.pop(k, None)
    got.pop(k, None)
  assert got == want


def test_standalone_is_independent_training():
  model, flat, unravel = _model()
  data = _data(3, 16)
  trainer = _trainer(model, unravel)
  proto = algorithms.standalone(participant.make_update(trainer, None))
  _, local, stats = _run(proto, trainer, 3, 2, data, flat, seed=0)
  assert np.all(np.asarray(stats.uploaded) == 0)
  w = trainer.init(flat)
  for e in range(2):
    key = jax.random.fold_in(jax.random.key(0), e)
    w, _ = trainer.epoch(w, data.images[1], data.labels[1],
                         _train_key(key, 1, 3))
  np.testing.assert_allclose(local[1], w.params, rtol=1e-5, atol=1e-6)


def test_round_robin_participants_see_earlier_uploads():
  model, flat, unravel = _model()
  data = _data(2, 12)
  proto, (_, trainer) = _protocol("round_robin", rules.chain(), model,
                                  unravel)
  state, local, _ = _run(proto, trainer, 2, 1, data, flat)
  # Participant 1 started from participant 0's result (full sharing), so the
  # server ends at participant 1's model: sequential SGD over both datasets.
  np.testing.assert_allclose(state.params, local[1], rtol=1e-5, atol=1e-6)
  assert not np.allclose(local[0], local[1])


def test_parallel_equals_per_participant_computation():
  model, flat, unravel = _model()
  data = _data(3, 12)
  d = flat.shape[0]
  c = 50
  rule = rules.chain(rules.select_largest(c), rules.clip(0.01))
  proto, (update, trainer) = _protocol("parallel", rule, model, unravel)
  key = jax.random.key(9)
  state, local, stats = _run(proto, trainer, 3, 1, data, flat, seed=9)
  keys = protocols.participant_keys(jax.random.fold_in(key, 0), 3)
  want = np.asarray(flat).copy()
  for i in range(3):
    k_up = jax.random.split(keys[i])[1]
    new, up, _ = update(flat, jnp.ones(d, bool), trainer.init(flat),
                        jax.tree_util.tree_map(lambda a: a[i], data), k_up)
    np.testing.assert_allclose(local[i], new.params, rtol=1e-5, atol=1e-6)
    assert int(up.count) == c
    assert float(jnp.max(jnp.abs(up.values))) <= 0.01 + 1e-7
    np.add.at(want, np.asarray(up.indices), np.asarray(up.values))
  np.testing.assert_allclose(state.params, want, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(stats.uploaded) == c)


# ----------------------------------------------------------------------------
# Aggregations against numpy.


def _uploads(rng, p, c, d):
  idx = np.stack([rng.choice(d, c, replace=False) for _ in range(p)])
  vals = rng.normal(size=(p, c)).astype(np.float32)
  mask = rng.random((p, c)) < 0.8
  return Upload(jnp.asarray(idx, jnp.int32), jnp.asarray(vals),
                jnp.asarray(mask))


def test_aggregations_equal_numpy():
  rng = np.random.default_rng(0)
  d, p, c = 12, 4, 6
  up = _uploads(rng, p, c, d)
  w = jnp.asarray([1.0, 2.0, 5.0, 3.0])
  w0 = rng.normal(size=d).astype(np.float32)
  idx, vals, mask = (np.asarray(a) for a in up)
  total = np.zeros(d)
  count = np.zeros(d)
  weighted = np.zeros(d)
  for i in range(p):
    for k in range(c):
      if mask[i, k]:
        total[idx[i, k]] += vals[i, k]
        count[idx[i, k]] += 1
        weighted[idx[i, k]] += np.asarray(w)[i] * vals[i, k]
  got_w = mask.any(1)
  want = {
      "sum_uploads()": w0 + total,
      "entry_mean()": w0 + total / np.maximum(count, 1),
      "weighted_mean()": w0 + weighted / np.asarray(w)[got_w].sum(),
  }
  for agg in (aggregation.sum_uploads(), aggregation.entry_mean(),
              aggregation.weighted_mean()):
    s, _ = jax.jit(agg.apply)(server_lib.init(w0), agg.init(w0), up, w)
    np.testing.assert_allclose(s.params, want[agg.name], rtol=1e-5,
                               atol=1e-6, err_msg=agg.name)
    np.testing.assert_array_equal(s.stat, count)


def test_server_momentum_equals_a_numpy_reference():
  rng = np.random.default_rng(1)
  d, lr, beta = 10, 0.5, 0.9
  agg = aggregation.make_aggregation("sum", lr, beta)
  w0 = rng.normal(size=d).astype(np.float32)
  server, state = server_lib.init(w0), agg.init(jnp.asarray(w0))
  w, v = w0.astype(np.float64), np.zeros(d)
  for step in range(3):
    up = _uploads(rng, 2, 4, d)
    server, state = jax.jit(agg.apply)(server, state, up, jnp.ones(2))
    delta = np.zeros(d)
    np.add.at(delta, np.asarray(up.indices)[np.asarray(up.mask)],
              np.asarray(up.values)[np.asarray(up.mask)])
    v = beta * v - delta        # pseudo-gradient -Δ, heavy-ball trace
    w = w - lr * v
  np.testing.assert_allclose(server.params, w, rtol=1e-5, atol=1e-6)
  assert aggregation.make_aggregation("sum").name == "sum_uploads()"


# ----------------------------------------------------------------------------
# Unequal participants.

COUNTS = [12, 5, 9]


def test_fedavg_with_unequal_sizes_equals_numpy():
  model, flat, unravel = _model()
  data = _data(3, 12, count=COUNTS)
  trainer = _trainer(model, unravel, shuffle="per_example")
  update = participant.make_update(trainer, rules.chain())
  proto = algorithms.fedavg(update)
  state, local, _ = _run(proto, trainer, 3, 1, data, flat, seed=0)
  n = np.asarray(COUNTS, np.float64)
  want = flat + sum(n[i] * (np.asarray(local[i]) - flat)
                    for i in range(3)) / n.sum()
  np.testing.assert_allclose(state.params, want, rtol=1e-5, atol=1e-6)
  # Each participant trained on exactly its own examples.
  w = trainer.init(flat)
  key = jax.random.fold_in(jax.random.key(0), 0)
  w, _ = trainer.epoch(w, data.images[1, :5], data.labels[1, :5],
                       _train_key(key, 1, 3))
  np.testing.assert_allclose(local[1], w.params, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["round_robin", "parallel"])
def test_dssgd_with_unequal_sizes_equals_a_per_participant_loop(kind):
  model, flat, unravel = _model()
  data = _data(3, 12, count=COUNTS)
  trainer = _trainer(model, unravel, shuffle="per_example")
  rule = rules.chain(rules.select_largest(300), rules.clip(0.05))
  update = participant.make_update(trainer, rule)
  proto = {"round_robin": protocols.round_robin,
           "parallel": protocols.parallel}[kind](
               update, server_lib.download_all())
  state, local, stats = _run(proto, trainer, 3, 2, data, flat, seed=4)
  # The loop: each participant on its own unpadded data, in the protocol's
  # order, the server adding each upload.
  server = np.asarray(flat).copy()
  mine = [trainer.init(flat) for _ in range(3)]
  for e in range(2):
    key = jax.random.fold_in(jax.random.key(4), e)
    keys = protocols.participant_keys(key, 3)
    snapshot = server.copy()
    for i in range(3):
      start = server if kind == "round_robin" else snapshot
      own = ParticipantData(data.images[i, :COUNTS[i]],
                            data.labels[i, :COUNTS[i]])
      mine[i], up, _ = update(jnp.asarray(start), jnp.ones(flat.shape, bool),
                              mine[i], own, jax.random.split(keys[i])[1])
      np.add.at(server, np.asarray(up.indices)[np.asarray(up.mask)],
                np.asarray(up.values)[np.asarray(up.mask)])
  for i in range(3):
    np.testing.assert_allclose(local[i], mine[i].params, rtol=1e-5,
                               atol=1e-6)
  np.testing.assert_allclose(state.params, server, rtol=1e-5, atol=1e-6)
