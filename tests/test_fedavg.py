"""FedAvg (McMahan et al. 2017) on DSSGD's code path (algorithms.py).

Reference that needs no re-implementation: with one full-batch local step
(batch size = n) every round, FedAvg's new global model is

    mean_p (w - k ∇L_p(w)) = w - k ∇ mean_p L_p(w) = w - k ∇L_union(w),

one step of full-batch gradient descent on the union of the (equal) shards —
exactly what ``--algorithm=centralized`` with batch size N·n computes. Both run
through ``experiment.run``.
"""

import json
import os

import numpy as np
import pytest

from dssgd_jax.run import build

from dssgd_jax.run import config as config_lib
from dssgd_jax.run import experiment
from dssgd_jax.errors import ConfigError

TINY = dict(dataset="digits", model="digits_mlp", num_participants=4,
            samples_per_participant=40, epochs=3, learning_rate=0.5,
            eval_examples=120, progress=False)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def _state(cfg):
  exp = experiment.setup(cfg)
  state, epoch = experiment.load_checkpoint(
      os.path.join(cfg.workdir, experiment.CHECKPOINT), exp.init_state)
  assert epoch == cfg.epochs
  return state


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory):
  cfg = build.validate(config_lib.Config(
      workdir=str(tmp_path_factory.mktemp("fedavg")), algorithm="fedavg",
      protocol="parallel", batch_size=40, **TINY))
  experiment.run(cfg)
  return cfg


def test_full_batch_fedavg_is_centralized_gradient_descent(fedavg_run,
                                                           tmp_path):
  central = build.validate(config_lib.Config(
      workdir=str(tmp_path), algorithm="centralized", batch_size=4 * 40,
      **TINY))
  experiment.run(central)
  w_fedavg = np.asarray(_state(fedavg_run).protocol.server.params)
  w_central = np.asarray(_state(central).protocol.local.params[0])
  np.testing.assert_allclose(w_fedavg, w_central, rtol=2e-4, atol=2e-6)
  # The models did move (not a trivial equality of initial vectors).
  init = np.asarray(experiment.setup(central).init_state.protocol.local.params[0])
  assert np.abs(w_central - init).max() > 1e-3
  fed = [r["server_accuracy"] for r in _metrics(fedavg_run.workdir)]
  cen = [r["participant_accuracy_mean"] for r in _metrics(tmp_path)]
  np.testing.assert_allclose(fed, cen, atol=1.5 / 120)


def test_fedavg_server_is_mean_of_participants_and_costs_dense(fedavg_run):
  state = _state(fedavg_run)
  np.testing.assert_allclose(np.asarray(state.protocol.server.params),
                             np.asarray(state.protocol.local.params).mean(0), rtol=1e-5,
                             atol=1e-6)
  rows = _metrics(fedavg_run.workdir)
  d = rows[0]["num_params"]
  for r in rows:
    # Every round each participant sends and receives the dense vector.
    assert r["uploaded_entries"] == d and r["downloaded_entries"] == d
    assert r["bytes_up"] == 4 * d and r["bytes_down"] == 4 * d
    assert r["server_accuracy"] is not None
    assert (r["participant_accuracy_min"] <= r["participant_accuracy_mean"]
            <= r["participant_accuracy_max"])
    assert r["epsilon_spent"] is None  # no privacy guarantee
  # Accuracy improves over the rounds on this easy problem.
  assert rows[-1]["server_accuracy"] > rows[0]["server_accuracy"]


def test_fedavg_flags():
  with pytest.raises(ConfigError, match="--protocol=async"):
    build.validate(config_lib.Config(algorithm="fedavg",
                                          protocol="async", **TINY))
  with pytest.raises(ConfigError, match="--noise"):
    build.validate(config_lib.Config(
        algorithm="fedavg", protocol="parallel", noise="laplace",
        noise_scale=1.0, **TINY))
