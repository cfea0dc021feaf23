"""A deployed participant and server compute what the simulation computes.

:class:`dssgd_jax.flower.node.Participant` (one participant's machine) and
:class:`dssgd_jax.flower.coordinator.Coordinator` (the parameter server),
driven by hand in the protocol's order without any network, against the
simulated run with the same flags and seed: the server's parameters and
every participant's model after each epoch are equal, in round robin (θd =
1) and parallel (θd = 0.5, most-updated downloads). The Flower apps that move
their messages are tested in tests/test_flower_deploy.py.
"""

import json
import os

import numpy as np
import pytest

pytest.importorskip("flwr")

from dssgd_jax import rules  # pylint: disable=g-import-not-at-top
from dssgd_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
from dssgd_jax.flower import coordinator  # pylint: disable=g-import-not-at-top
from dssgd_jax.flower import node  # pylint: disable=g-import-not-at-top
from dssgd_jax.run import build  # pylint: disable=g-import-not-at-top
from dssgd_jax.run import config as config_lib  # pylint: disable=g-import-not-at-top
from dssgd_jax.run import experiment  # pylint: disable=g-import-not-at-top

TINY = dict(dataset="digits", model="digits_mlp", num_participants=3,
            samples_per_participant=40, batch_size=10, learning_rate=0.1,
            epochs=2, progress=False, upload_fraction=0.1, seed=3)


def _drive(co, parts, cfg, epochs):
  for e in range(1, epochs + 1):
    keys = co.download_keys(e)
    snapshot = co.state
    uploads = []
    for i, p in enumerate(parts):
      state = co.state if cfg.protocol == "round_robin" else snapshot
      idx, val = co.download_for(i, keys[i], state)
      r = p.train(e, idx, val, init=co.initial if e == 1 else None)
      if cfg.protocol == "round_robin":
        co.receive([(r["indices"], r["values"])])
      else:
        uploads.append((r["indices"], r["values"]))
    if uploads:
      co.receive(uploads)
    co.end_epoch()


@pytest.mark.parametrize("protocol,theta_d", [("round_robin", 1.0),
                                              ("parallel", 0.5)])
def test_deployed_pieces_equal_the_simulation(tmp_path, protocol, theta_d):
  cfg = build.validate(config_lib.Config(
      **TINY, protocol=protocol, download_fraction=theta_d,
      workdir=str(tmp_path / "sim")))
  experiment.run(cfg)
  exp = experiment.setup(cfg)
  state, _ = experiment.load_checkpoint(
      os.path.join(cfg.workdir, experiment.CHECKPOINT), exp.init_state,
      exp.train_key)
  co = coordinator.Coordinator(cfg)
  np.testing.assert_array_equal(co.initial, exp.init_state.protocol.server.params)
  parts = [_participant(cfg, i, tmp_path / f"p{i}", seed=cfg.seed)
           for i in range(3)]
  _drive(co, parts, cfg, 2)
  np.testing.assert_allclose(co.state.params, state.protocol.server.params,
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(co.state.stat, state.protocol.server.stat)
  for i, p in enumerate(parts):
    np.testing.assert_allclose(p.load_model(2), state.protocol.local.params[i],
                               rtol=1e-6, atol=1e-7)
  with open(os.path.join(cfg.workdir, experiment.METRICS)) as f:
    last = [json.loads(l) for l in f][-1]
  assert np.mean([p.evaluate(2) for p in parts]) == pytest.approx(
      last["participant_accuracy_mean"])
  # Only epochs e-1 and e are kept on the participant's disk.
  assert sorted(n for n in os.listdir(tmp_path / "p0")
                if n.startswith("local_")) == ["local_1.npz", "local_2.npz"]


OPEN = node.Policy(require_guarantee=False, report_metrics=True,
                   epsilon_budget=1e9, delta_budget=1.0)


def _participant(cfg, i, path, policy=OPEN, **kw):
  return node.Participant(cfg, i, str(path), policy=policy, **kw)


def test_ledger_charges_every_run_of_the_mechanism(tmp_path):
  cfg = build.validate(config_lib.Config(
      **TINY, noise="laplace", noise_scale=0.5, clip_bound=0.01,
      selection="random", workdir=str(tmp_path / "w")))
  co = coordinator.Coordinator(cfg)
  d = co.num_params
  p = _participant(cfg, 1, tmp_path / "p1",
                   policy=node.Policy(epsilon_budget=1e9, delta_budget=1))
  seed = json.loads((tmp_path / "p1" / node.SEED_FILE).read_text())["seed"]
  assert _participant(cfg, 1, tmp_path / "p1").seed == seed  # kept secret
  idx, val = co.download_for(1, co.download_keys(1)[1])
  first = p.train(1, idx, val, init=co.initial)
  again = p.train(1, idx, val, init=co.initial)  # retried, same download
  np.testing.assert_array_equal(first["values"], again["values"])
  assert [l["charged"] for l in p.ledger()] == [True, False]
  # A retry with another download is a new release: fresh noise, charged.
  other = p.train(1, idx, val + 1.0, init=co.initial)
  assert not np.array_equal(other["values"], first["values"])
  second = p.train(2, idx, val)
  ledger = p.ledger()
  assert [(l["epoch"], l["attempt"], l["charged"]) for l in ledger] == [
      (1, 0, True), (1, 0, False), (1, 1, True), (2, 0, True)]
  for line in ledger:
    assert line["run_epsilon"] == pytest.approx(build.claim(
        cfg, d, line["run_mechanism_runs"]).epsilon)
  assert second["epsilon"] == pytest.approx(build.claim(cfg, d, 3).epsilon)
  # The Laplace noise is the participant's own: another seed, other values.
  other = _participant(cfg, 1, tmp_path / "p1b", seed=seed + 1)
  assert not np.array_equal(
      other.train(1, idx, val, init=co.initial)["values"], first["values"])
  with pytest.raises(ConfigError, match="holds no model"):
    _participant(cfg, 2, tmp_path / "p2").train(3, idx, val)
  # A participant that missed epoch 3 resumes at epoch 4 from its model
  # after epoch 2 (the server sends every participant's download anyway).
  resumed = p.train(4, idx, val)
  assert p.latest_model(5) == 4 and p.latest_model(4) == 2
  assert resumed["values"].shape == first["values"].shape


def test_an_svt_epoch_that_releases_nothing_is_charged(tmp_path):
  # τ far above any |Δw|: the SVT releases nothing, yet it looked at the
  # data every epoch. The ledger equals rules.claim for the epochs that ran.
  cfg = build.validate(config_lib.Config(
      **TINY, noise="svt", epsilon=1000.0, clip_bound=0.01, threshold=1e6,
      workdir=str(tmp_path / "w")))
  co = coordinator.Coordinator(cfg)
  p = _participant(cfg, 0, tmp_path / "p0",
                   policy=node.Policy(epsilon_budget=1e4))
  rule = build.upload_rule(cfg, co.num_params)
  for e in (1, 2, 3):
    idx, val = co.download_for(0, co.download_keys(e)[0])
    out = p.visit(e, idx, val, init=co.initial)
    assert out.indices.size == 0 and out.charged
    assert out.epsilon == pytest.approx(1000.0 * e)
    assert out.epsilon == rules.claim(rule, co.num_params, e).epsilon
  assert [l["run_epsilon"] for l in p.ledger()] == [1000.0, 2000.0, 3000.0]
  assert p.spent()[0] == 3000.0


def test_policy_refusals(tmp_path):
  base = dict(TINY, workdir=str(tmp_path / "w"))
  noiseless = build.validate(config_lib.Config(**base))
  co = coordinator.Coordinator(noiseless)
  idx, val = co.download_for(0, co.download_keys(1)[0])
  p = node.Participant(noiseless, 0, str(tmp_path / "a"))  # default policy
  lines = []
  out = p.visit(1, idx, val, init=co.initial, log=lines.append)
  assert out.refused and "gives no differential-privacy guarantee" in (
      out.refused) and out.indices is None
  assert lines == [out.refused]
  assert not os.path.exists(tmp_path / "a" / "local_1.npz")  # never trained
  assert p.ledger()[0]["refused"] == out.refused
  assert not p.ledger()[0]["charged"]
  # A budget: ε = 4 per epoch (SVT), budget 10: epochs 1-2 run, 3 refused.
  svt = build.validate(config_lib.Config(
      **base, noise="svt", epsilon=4.0, clip_bound=0.01, threshold=0.001))
  q = node.Participant(svt, 0, str(tmp_path / "b"))
  got = [q.visit(e, idx, val, init=co.initial) for e in (1, 2, 3)]
  assert [v.refused is None for v in got] == [True, True, False]
  assert "over its budget of ε = 10" in got[2].refused
  assert q.spent()[0] == 8.0
  # The budget is the machine's: another run on the same ledger has 2 left.
  other = build.validate(svt.replace(seed=9))
  r = node.Participant(other, 0, str(tmp_path / "c"),
                       ledger_path=q.ledger_path, run_id="other")
  assert r.visit(1, idx, val, init=co.initial).refused
  small = build.validate(svt.replace(seed=9, epsilon=2.0))
  s = node.Participant(small, 0, str(tmp_path / "d"),
                       ledger_path=q.ledger_path, run_id="small")
  assert s.visit(1, idx, val, init=co.initial).refused is None
  assert s.spent()[0] == 10.0


def _first_train_message(cfg, evaluate):
  """The server's epoch-1 message to participant 1 (download and initial
  model)."""
  from flwr.app import Message, RecordDict  # pylint: disable=g-import-not-at-top
  from dssgd_jax.flower import wire  # pylint: disable=g-import-not-at-top
  co = coordinator.Coordinator(cfg)
  idx, val = co.download_for(1, co.download_keys(1)[1])
  return Message(RecordDict({
      wire.CONFIG: wire.config(epoch=1, run=cfg.to_json(), evaluate=evaluate),
      wire.DOWNLOAD: wire.arrays(indices=idx, values=val),
      wire.INIT: wire.arrays(values=co.initial)}), 2, wire.TRAIN)


def test_default_reply_carries_only_upload_and_protocol_fields(tmp_path):
  from flwr.app import Context, RecordDict  # pylint: disable=g-import-not-at-top
  from flwr.supercore.task_identity import TaskIdentity  # pylint: disable=g-import-not-at-top
  from dssgd_jax.flower import client_app, wire  # pylint: disable=g-import-not-at-top
  TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 2, 3
  state = tmp_path / "node"
  context = Context(run_id=1, node_id=2, node_config={
      "partition-id": 1, "state-dir": str(state)}, state=RecordDict(),
                    run_config={})
  for over, want in [
      (dict(noise="svt", epsilon=1.0, clip_bound=0.01, threshold=0.001),
       {wire.METRICS: {"partition_id", "epoch"},
        wire.UPLOAD: {"indices", "values"}}),
      (dict(), {wire.METRICS: {"partition_id", "epoch"},
                wire.CONFIG: {"refused"}}),  # no guarantee: refused
  ]:
    cfg = build.validate(config_lib.Config(
        **TINY, workdir=str(tmp_path / "w"), **over))
    reply = client_app.train(_first_train_message(cfg, evaluate=1),
                             context).content
    got = {name: set(record.keys()) for name, record in reply.items()}
    assert got == want, got
  # The machine's ledger holds both visits.
  ledger = [json.loads(l) for l in (state / node.LEDGER).read_text()
            .splitlines()]
  assert [bool(l.get("refused")) for l in ledger] == [False, True]


def test_a_bad_data_file_is_named_at_home_not_to_the_server(tmp_path, capsys):
  """The sentence saying what is wrong with a participant's data file can
  hold values computed from the data (their range): it goes to the
  participant's own log; the server is told only that the file does not
  fit."""
  from flwr.app import Context, RecordDict  # pylint: disable=g-import-not-at-top
  from flwr.supercore.task_identity import TaskIdentity  # pylint: disable=g-import-not-at-top
  from dssgd_jax.flower import client_app, wire  # pylint: disable=g-import-not-at-top
  TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 2, 3
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "data.npz",
           train_images=(255 * rng.random((10, 8, 8, 1))).astype(np.float32),
           train_labels=rng.integers(0, 10, 10),
           test_images=rng.random((5, 8, 8, 1)).astype(np.float32),
           test_labels=rng.integers(0, 10, 5))
  context = Context(run_id=1, node_id=2, node_config={
      "partition-id": 1, "state-dir": str(tmp_path / "node"),
      "data-dir": str(tmp_path)}, state=RecordDict(), run_config={})
  cfg = build.validate(config_lib.Config(
      **TINY, workdir=str(tmp_path / "w"), noise="svt", epsilon=1.0,
      clip_bound=0.01, threshold=0.001))
  reply = client_app.train(_first_train_message(cfg, evaluate=0),
                           context).content
  assert dict(reply[wire.CONFIG]) == {"error": node.DATA_FILE_REFUSAL}
  assert set(reply[wire.METRICS].keys()) == {"epoch"}
  assert wire.UPLOAD not in reply.array_records
  logged = capsys.readouterr().err  # its own log: the file and the range
  assert "values run from" in logged and str(tmp_path) in logged


def test_own_data_dir(tmp_path):
  cfg = build.validate(config_lib.Config(**TINY,
                                              workdir=str(tmp_path / "w")))
  from dssgd_jax.data import load_dataset  # pylint: disable=g-import-not-at-top
  raw = load_dataset("digits")
  from dssgd_jax.data import make_partition  # pylint: disable=g-import-not-at-top
  parts = make_partition("iid", raw.train_labels, 3, 40, cfg.seed)
  np.savez(tmp_path / "data.npz", train_images=raw.train_images[parts[2]],
           train_labels=raw.train_labels[parts[2]],
           test_images=raw.test_images, test_labels=raw.test_labels)
  own = _participant(cfg, 2, tmp_path / "a", data_dir=str(tmp_path), seed=5)
  bundled = _participant(cfg, 2, tmp_path / "b", seed=5)
  np.testing.assert_array_equal(own.labels, bundled.labels)
  co = coordinator.Coordinator(cfg)
  idx, val = co.download_for(2, co.download_keys(1)[2])
  a = own.train(1, idx, val, init=co.initial)
  b = bundled.train(1, idx, val, init=co.initial)
  np.testing.assert_allclose(a["values"], b["values"], rtol=1e-6)
  os.remove(tmp_path / "data.npz")
  with pytest.raises(ConfigError, match="data.npz"):
    _participant(cfg, 2, tmp_path / "c", data_dir=str(tmp_path))


def test_deployed_and_simulated_participants_standardize_identically(
    tmp_path):
  # Each participant standardizes with its own training data's statistics:
  # the simulation (run/data.layout) and a deployed participant reading its
  # own data.npz give the same images, and evaluate on the same test split.
  from dssgd_jax.data import load_dataset  # pylint: disable=g-import-not-at-top
  from dssgd_jax.run import data as run_data  # pylint: disable=g-import-not-at-top
  cfg = build.validate(config_lib.Config(**TINY, standardize=True,
                                         workdir=str(tmp_path / "w")))
  plan = build.plan(cfg)
  dataset, parts = experiment.load_data(plan)
  layout = run_data.layout(plan.data, dataset, parts)
  raw = load_dataset("digits")
  for i in (0, 2):
    np.savez(tmp_path / "data.npz", train_images=raw.train_images[parts[i]],
             train_labels=raw.train_labels[parts[i]],
             test_images=raw.test_images, test_labels=raw.test_labels)
    p = _participant(cfg, i, tmp_path / f"d{i}", data_dir=str(tmp_path),
                     seed=5)
    np.testing.assert_allclose(p.images, layout.data.images[i], rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(p.stats[0], layout.stats.shift[i], rtol=1e-6)
    np.testing.assert_allclose(p.stats[1], layout.stats.scale[i], rtol=1e-6)
  # The pooled statistics would differ: per-participant is not a no-op.
  pooled = run_data.own_stats(dataset.train_images[parts.reshape(-1)])
  assert not np.allclose(pooled[0], layout.stats.shift[0])


def test_a_mismatched_data_file_is_one_sentence(tmp_path):
  cfg = build.validate(config_lib.Config(**TINY, workdir=str(tmp_path / "w")))
  rng = np.random.default_rng(0)
  good = dict(train_images=rng.random((10, 8, 8, 1), np.float32),
              train_labels=rng.integers(0, 10, 10),
              test_images=rng.random((5, 8, 8, 1), np.float32),
              test_labels=rng.integers(0, 10, 5))
  cases = [
      (dict(train_images=rng.random((10, 28, 28, 1), np.float32)),
       r"train_images has shape \(10, 28, 28, 1\), but --dataset=digits "
       r"images are \(n, 8, 8, 1\)"),
      (dict(train_images=(255 * good["train_images"]).astype(np.float32)),
       "not within \\[0, 1\\]"),
      (dict(train_images=np.zeros((10, 8, 8, 1), np.uint8)), "not float32"),
      (dict(test_labels=np.full(5, 10)), "integers 0 to 9"),
      (dict(train_images=np.zeros((0, 8, 8, 1), np.float32),
            train_labels=np.zeros(0, int)), "holds no example"),
      (dict(train_labels=np.zeros(7, int)), "one label per image"),
  ]
  for change, message in cases:
    np.savez(tmp_path / "data.npz", **dict(good, **change))
    with pytest.raises(ConfigError, match=message) as e:
      _participant(cfg, 0, tmp_path / "s", data_dir=str(tmp_path))
    assert str(tmp_path / "data.npz") in str(e.value)
    assert "\n" not in str(e.value)
