"""The async protocol: reductions to parallel and standalone, determinism."""

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dssgd_jax import protocols
from dssgd_jax.run import build
from dssgd_jax.run import config as config_lib
from dssgd_jax.run import experiment

_BASE = dict(dataset="digits", model="digits_mlp", num_participants=4,
             samples_per_participant=24, batch_size=8, learning_rate=0.1,
             upload_fraction=0.3, epochs=2, eval_examples=100, progress=False,
             seed=5)


@functools.lru_cache(maxsize=None)
def _cached(epochs, items):
  return _run_uncached(epochs, **dict(items))


def _run(epochs=2, **kw):
  """(state, stats, accuracies) after ``epochs`` epochs of a tiny run."""
  return _cached(epochs, tuple(sorted(kw.items())))


def _run_uncached(epochs, **kw):
  alg = kw.pop("algorithm", "dssgd")
  # The flags reject these reductions (async without staleness is parallel,
  # every upload lost is standalone): build them by hand.
  by_hand = {}
  if kw.get("protocol") == "async" and kw.get("max_staleness") == 0:
    by_hand["max_staleness"], kw["max_staleness"] = 0, 1
  if kw.get("upload_loss") == 1.0:
    by_hand["upload_loss"], kw["upload_loss"] = 1.0, 0.5
  if kw.get("download_loss") == 1.0:
    by_hand["download_loss"], kw["download_loss"] = 1.0, 0.5
  cfg = build.validate(build.for_algorithm(config_lib.Config(**_BASE), alg,
                                           **kw))
  plan = build.plan(cfg).replace(**by_hand)
  exp = experiment.setup(plan)
  state = exp.init_state
  stats = None
  for e in range(1, epochs + 1):
    state, stats = exp.epoch_fn(state, exp.data,
                                jax.random.fold_in(exp.train_key, e))
  acc, _ = exp.evaluate(state)
  return state, stats, acc


def test_async_without_staleness_or_loss_is_parallel():
  a_state, a_stats, a_acc = _run(protocol="async", max_staleness=0,
                                 upload_loss=0.0)
  p_state, p_stats, p_acc = _run(protocol="parallel")
  np.testing.assert_allclose(a_state.protocol.local.params, p_state.protocol.local.params, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(a_state.protocol.server.params,
                             p_state.protocol.server.params, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(a_stats.uploaded, p_stats.uploaded)
  np.testing.assert_array_equal(a_stats.downloaded, p_stats.downloaded)
  np.testing.assert_allclose(a_acc, p_acc)


def test_async_with_every_exchange_lost_is_standalone():
  a_state, a_stats, a_acc = _run(protocol="async", max_staleness=2,
                                 staleness="uniform", upload_loss=1.0,
                                 download_loss=1.0)
  s_state, _, s_acc = _run(algorithm="standalone", protocol="parallel")
  np.testing.assert_allclose(a_state.protocol.local.params, s_state.protocol.local.params, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(a_acc, s_acc)
  # Nothing reached the server, nothing was downloaded.
  np.testing.assert_array_equal(a_state.protocol.server.params,
                                s_state.protocol.server.params)
  assert bool(jnp.all(a_stats.upload_lost))
  assert int(jnp.sum(a_stats.downloaded)) == 0


def test_lost_uploads_still_download():
  # --upload_loss loses the upload only: the participant still downloads.
  state, stats, _ = _run(protocol="async", max_staleness=1, upload_loss=1.0)
  assert bool(jnp.all(stats.upload_lost))
  assert int(jnp.min(stats.downloaded)) > 0
  init = experiment.setup(build.validate(config_lib.Config(
      **_BASE, protocol="async", max_staleness=1))).init_state
  np.testing.assert_array_equal(state.protocol.server.params,
                                init.protocol.server.params)


def test_async_stale_run_differs_from_parallel():
  a, stats_a, _ = _run(protocol="async", max_staleness=2,
                       staleness="geometric", upload_loss=0.3)
  assert a.protocol.ring.params.shape[0] == 3  # ring of max_staleness + 1
  np.testing.assert_array_equal(a.protocol.ring.params[0], a.protocol.server.params)
  p, _, _ = _run(protocol="parallel")
  assert not np.allclose(a.protocol.local.params, p.protocol.local.params)
  assert np.all(np.isfinite(np.asarray(stats_a.loss)))


def test_constant_staleness_trains_on_old_snapshots():
  # With constant staleness 1 the first two epochs both start from the
  # initial server, so epoch 2's downloads ignore epoch 1's uploads.
  state, _, _ = _run(epochs=2, protocol="async", max_staleness=1,
                     staleness="constant")
  ring = np.asarray(state.protocol.ring.params)
  assert ring.shape[0] == 2
  assert not np.allclose(ring[0], ring[1])


@pytest.mark.parametrize("dist", ["constant", "uniform", "geometric"])
def test_staleness_draws_stay_in_range(dist):
  s = protocols.draw_staleness(jax.random.key(0), 1000, dist, 3)
  assert int(s.min()) >= 0 and int(s.max()) <= 3
  if dist == "constant":
    assert set(np.asarray(s).tolist()) == {3}
  else:
    assert len(set(np.asarray(s).tolist())) > 1
  if dist == "geometric":
    assert np.mean(np.asarray(s) == 0) > 0.4  # P(0) = 1/2


def test_resumed_async_run_is_deterministic(tmp_path):
  # A run stopped after epoch 1 and resumed (ring buffer from the checkpoint)
  # ends where an uninterrupted in-process run of the same seed ends.
  kw = dict(protocol="async", max_staleness=1, staleness="uniform",
            upload_loss=0.2)
  _, _, acc = _run(**kw)
  cfg = build.validate(config_lib.Config(
      **{**_BASE, **kw, "workdir": str(tmp_path), "epochs": 1}))
  experiment.run(cfg, log=lambda m: None)
  resumed = experiment.run(cfg.replace(epochs=2), log=lambda m: None)
  assert resumed["epochs"] == 2
  assert resumed["final_participant_accuracy_mean"] == pytest.approx(
      float(np.mean(acc)), abs=1e-6)
