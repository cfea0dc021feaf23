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
  cfg = config_lib.validate(config_lib.Config(
      **TINY, protocol=protocol, download_fraction=theta_d,
      workdir=str(tmp_path / "sim")))
  experiment.run(cfg)
  exp = experiment.setup(cfg)
  state, _ = experiment.load_checkpoint(
      os.path.join(cfg.workdir, experiment.CHECKPOINT), exp.init_state,
      exp.train_key)
  co = coordinator.Coordinator(cfg)
  np.testing.assert_array_equal(co.initial, exp.init_state["server"].params)
  parts = [node.Participant(cfg, i, str(tmp_path / f"p{i}"), seed=cfg.seed)
           for i in range(3)]
  _drive(co, parts, cfg, 2)
  np.testing.assert_allclose(co.state.params, state["server"].params,
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(co.state.stat, state["server"].stat)
  for i, p in enumerate(parts):
    np.testing.assert_allclose(p.load_model(2), state["local"][i],
                               rtol=1e-6, atol=1e-7)
  with open(os.path.join(cfg.workdir, experiment.METRICS)) as f:
    last = [json.loads(l) for l in f][-1]
  assert np.mean([p.evaluate(2) for p in parts]) == pytest.approx(
      last["participant_accuracy_mean"])
  # Only epochs e-1 and e are kept on the participant's disk.
  assert sorted(n for n in os.listdir(tmp_path / "p0")
                if n.endswith(".npy")) == ["local_1.npy", "local_2.npy"]


def test_ledger_and_retry(tmp_path):
  cfg = config_lib.validate(config_lib.Config(
      **TINY, noise="laplace", noise_scale=0.5, clip_bound=0.01,
      workdir=str(tmp_path / "w")))
  co = coordinator.Coordinator(cfg)
  p = node.Participant(cfg, 1, str(tmp_path / "p1"))  # its own secret seed
  seed = json.loads((tmp_path / "p1" / node.SEED_FILE).read_text())["seed"]
  assert node.Participant(cfg, 1, str(tmp_path / "p1")).seed == seed
  idx, val = co.download_for(1, co.download_keys(1)[1])
  first = p.train(1, idx, val, init=co.initial)
  again = p.train(1, idx, val, init=co.initial)  # a retried epoch
  np.testing.assert_array_equal(first["values"], again["values"])
  second = p.train(2, idx, val)
  ledger = p.ledger()
  assert [l["epoch"] for l in ledger] == [1, 2]
  d = co.num_params
  assert second["epsilon"] == pytest.approx(
      build.claim(cfg, d, 2).epsilon)
  assert ledger[0]["epsilon"] == pytest.approx(build.claim(cfg, d, 1).epsilon)
  # The Laplace noise is the participant's own: another seed, other values.
  other = node.Participant(cfg, 1, str(tmp_path / "p1b"), seed=seed + 1)
  assert not np.array_equal(
      other.train(1, idx, val, init=co.initial)["values"], first["values"])
  with pytest.raises(ConfigError, match="holds no model"):
    node.Participant(cfg, 2, str(tmp_path / "p2")).train(3, idx, val)
  # A participant that missed epoch 3 resumes at epoch 4 from its model
  # after epoch 2 (the server sends every participant's download anyway).
  resumed = p.train(4, idx, val)
  assert p.latest_model(5) == 4 and p.latest_model(4) == 2
  assert resumed["values"].shape == first["values"].shape


def test_own_data_dir(tmp_path):
  cfg = config_lib.validate(config_lib.Config(**TINY,
                                              workdir=str(tmp_path / "w")))
  from dssgd_jax.data import load_dataset  # pylint: disable=g-import-not-at-top
  raw = load_dataset("digits")
  from dssgd_jax.data import make_partition  # pylint: disable=g-import-not-at-top
  parts = make_partition("iid", raw.train_labels, 3, 40, cfg.seed)
  np.savez(tmp_path / "data.npz", train_images=raw.train_images[parts[2]],
           train_labels=raw.train_labels[parts[2]],
           test_images=raw.test_images, test_labels=raw.test_labels)
  own = node.Participant(cfg, 2, str(tmp_path / "a"), data_dir=str(tmp_path),
                         seed=5)
  bundled = node.Participant(cfg, 2, str(tmp_path / "b"), seed=5)
  np.testing.assert_array_equal(own.labels, bundled.labels)
  co = coordinator.Coordinator(cfg)
  idx, val = co.download_for(2, co.download_keys(1)[2])
  a = own.train(1, idx, val, init=co.initial)
  b = bundled.train(1, idx, val, init=co.initial)
  np.testing.assert_allclose(a["values"], b["values"], rtol=1e-6)
  os.remove(tmp_path / "data.npz")
  with pytest.raises(ConfigError, match="data.npz"):
    node.Participant(cfg, 2, str(tmp_path / "c"), data_dir=str(tmp_path))
