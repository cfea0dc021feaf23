"""The Flower server and client apps together, in one process.

``tests/local_grid.LocalGrid`` answers the server app's messages with the
client app's own handlers (real Flower messages and contexts, no processes),
so the whole deployed epoch loop runs in seconds: each participant's policy
is enforced against the server's flags (a run without a guarantee, a run over
a participant's ε budget), the refusal is recorded in ``metrics.jsonl`` and
the other participants go on. The same loop over real SuperLink and
SuperNode processes is tests/test_flower_deploy.py.
"""

import json
import os

import pytest

pytest.importorskip("flwr")

from dssgd_jax.flower import server_app  # pylint: disable=g-import-not-at-top
from local_grid import LocalGrid  # pylint: disable=g-import-not-at-top

FLAGS = ("--dataset=digits --model=digits_mlp --num_participants=3 "
         "--samples_per_participant=40 --batch_size=10 --learning_rate=0.1 "
         "--upload_fraction=0.1 --seed=3 --progress=false")


def _nodes(tmp_path, policies):
  return {100 + i: {"partition-id": i, "state-dir": str(tmp_path / f"p{i}"),
                    **policy}
          for i, policy in enumerate(policies)}


def _run(tmp_path, grid, extra):
  cfg = server_app.parse_flags(f"{FLAGS} --workdir={tmp_path / 'server'} "
                               f"{extra}")
  server_app.run(grid, cfg, reply_timeout=30, connect_timeout=5,
                 server_eval=False)
  with open(tmp_path / "server" / "metrics.jsonl") as f:
    return [json.loads(l) for l in f]


OPEN = {"require-guarantee": False, "report-metrics": True}


def test_a_run_without_a_guarantee_is_refused_by_default(tmp_path):
  grid = LocalGrid(_nodes(tmp_path, [{}, OPEN, OPEN]))
  rows = _run(tmp_path, grid, "--protocol=round_robin --epochs=2")
  for r in rows:
    assert list(r["refused"]) == ["0"]
    assert "gives no differential-privacy guarantee" in r["refused"]["0"]
    assert r["lost_uploads"] == 1 and r["num_models"] == 2
    assert r["missing"] == []
    assert r["train_loss"] is not None  # 1 and 2 report theirs
  # Participant 0 never trained: no model on its machine, a refusal per
  # epoch on its ledger.
  assert not [n for n in os.listdir(tmp_path / "p0" / "runs" /
                                     os.listdir(tmp_path / "p0" / "runs")[0])
              if n.startswith("local_")]
  ledger = [json.loads(l) for l in open(tmp_path / "p0" / "ledger.jsonl")]
  assert [bool(l.get("refused")) for l in ledger] == [True, True]


def test_a_run_over_a_participants_budget_is_refused_then(tmp_path):
  # SVT at ε = 4 per epoch: participant 0 (budget 10) takes epochs 1-2 and
  # refuses 3; the others (budget 100) go on. Nobody reports metrics.
  rich = {"epsilon-budget": 100.0}
  grid = LocalGrid(_nodes(tmp_path, [{}, rich, rich]))
  rows = _run(tmp_path, grid, "--protocol=parallel --epochs=3 --noise=svt "
              "--epsilon=4 --clip_bound=0.01 --threshold=0.001")
  assert [list(r["refused"]) for r in rows] == [[], [], ["0"]]
  assert "over its budget of ε = 10" in rows[2]["refused"]["0"]
  assert [r["num_models"] for r in rows] == [3, 3, 2]
  assert [r["epsilon_spent"] for r in rows] == [4.0, 8.0, 12.0]
  assert [r["delta_spent"] for r in rows] == [0.0, 0.0, 0.0]
  # The default policy sends neither loss nor accuracy.
  assert all(r["train_loss"] is None for r in rows)
  assert all(r["participant_accuracy_mean"] is None for r in rows)
  for i, want in ((0, 8.0), (1, 12.0)):
    ledger = [json.loads(l) for l in open(tmp_path / f"p{i}" /
                                          "ledger.jsonl")]
    assert max(l["run_epsilon"] for l in ledger) == want


def test_async_deployment_equals_the_simulation_of_its_arrival_order(
    tmp_path):
  """Asynchronous DSSGD over Flower: participants of random speeds (one
  reply answered per poll, chosen at random), each upload applied on
  arrival. Replaying the recorded arrival order in simulation
  (protocols.arrivals, a protocol passed to a plan by hand) gives the
  deployed server's parameters; every upload's staleness is recorded."""
  import random  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dssgd_jax import protocols  # pylint: disable=g-import-not-at-top
  from dssgd_jax.run import experiment  # pylint: disable=g-import-not-at-top
  opened = dict(OPEN, seed=3)
  grid = LocalGrid(_nodes(tmp_path, [opened] * 3),
                   one_at_a_time=random.Random(7))
  rows = _run(tmp_path, grid, "--protocol=async --epochs=3 "
              "--download_fraction=0.5 --eval_every=3")
  order = [r["arrivals"] for r in rows]
  assert all(len(o) == 3 for o in order)
  assert any(len(set(o)) < 3 for o in order), order  # a fast participant
  assert all(len(r["staleness"]) == 3 for r in rows)
  assert max(max(r["staleness"]) for r in rows) > 0
  assert rows[0]["staleness"][0] == 0  # the first arrival is not stale

  cfg = server_app.parse_flags(f"{FLAGS} --workdir={tmp_path / 'sim'} "
                               "--protocol=parallel --epochs=3 "
                               "--download_fraction=0.5 --eval_every=3")
  from dssgd_jax.run import build  # pylint: disable=g-import-not-at-top
  train_key = jax.random.split(jax.random.key(cfg.seed))[1]
  replay = lambda update, download, agg, axis, plan: protocols.arrivals(
      update, download, np.asarray(order), train_key, aggregation=agg,
      stat_decay=plan.stat_decay, decay_every=plan.decay_every)
  plan = build.plan(cfg).replace(protocol=replay)
  experiment.run(plan, log=lambda m: None)
  with np.load(tmp_path / "sim" / "checkpoint.npz") as sim, np.load(
      tmp_path / "server" / "checkpoint.npz") as dep:
    np.testing.assert_allclose(dep["state['server'].params"],
                               sim["state.protocol.server.params"],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(dep["state['visits']"],
                                  sim["state.protocol.ring.visits"])
  with open(tmp_path / "sim" / "metrics.jsonl") as f:
    sim_rows = [json.loads(l) for l in f]
  assert [r["staleness"] for r in sim_rows] == [r["staleness"] for r in rows]
