"""--num_seeds: S independent runs as one program (issue "Results a reviewer
accepts").

Run s of a seeded run is the run of ``--seed`` + s on the data split of the
data seed (``--data_seed``, default ``--seed``): the tests run S separate
single-seed runs with those flags and compare every per-seed metric and the
final parameters (float tolerance), in ``round_robin`` (seed axis mapped) and
``parallel`` (seed axis vmapped); the mean/std fields against numpy; and that
a seeded run killed after epoch 1 resumes to the same result.
"""

import json
import os

import numpy as np
import pytest

from dssgd_jax.errors import ConfigError
from dssgd_jax.run import build
from dssgd_jax.run import config as config_lib
from dssgd_jax.run import experiment

from cli_helpers import ForkedCli
from cli_helpers import jit_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SEED = 11
TINY = dict(dataset="digits", model="digits_mlp", num_participants=3,
            samples_per_participant=30, batch_size=10, learning_rate=0.1,
            epochs=2, eval_examples=60, progress=False, upload_fraction=0.1,
            seed=SEED)
PER_SEED = ("participant_accuracy_mean", "participant_accuracy_min",
            "participant_accuracy_max", "server_accuracy", "train_loss",
            "uploaded_entries", "downloaded_entries", "bytes_up",
            "bytes_down", "lost_uploads", "epsilon_spent")


def _metrics(workdir):
  with open(os.path.join(workdir, experiment.METRICS)) as f:
    return [json.loads(l) for l in f if l.strip()]


def _final(workdir, cfg):
  exp = experiment.setup(cfg)
  state, _ = experiment.load_checkpoint(
      os.path.join(workdir, experiment.CHECKPOINT), exp.init_state,
      exp.train_key)
  return np.asarray(state.protocol.local.params), np.asarray(state.protocol.server.params)


def _run(tmp_path, name, **flags):
  cfg = build.validate(config_lib.Config(
      **{**TINY, **flags, "workdir": str(tmp_path / name)}))
  summary = experiment.run(cfg)
  return cfg, summary


@pytest.mark.slow(seconds=18)
@pytest.mark.parametrize("protocol,seed_axis", [("round_robin", "map"),
                                                ("parallel", "vmap")])
def test_num_seeds_equals_separate_runs(tmp_path, protocol, seed_axis):
  cfg, summary = _run(tmp_path, "seeds", protocol=protocol, num_seeds=3,
                      seed_axis=seed_axis)
  rows = _metrics(cfg.workdir)
  local, server = _final(cfg.workdir, cfg)
  assert local.shape[:2] == (3, 3) and server.shape[0] == 3
  finals = []
  for s in range(3):
    one, _ = _run(tmp_path, f"seed{s}", protocol=protocol, seed=SEED + s,
                  data_seed=SEED)
    single = _metrics(one.workdir)
    assert len(single) == len(rows) == 2
    for multi_row, row in zip(rows, single):
      got = multi_row["per_seed"][s]
      assert got["seed"] == SEED + s
      for k in PER_SEED:
        if row[k] is None:
          assert got[k] is None, k
        else:
          assert got[k] == pytest.approx(row[k], rel=1e-5, abs=1e-6), (s, k)
    one_local, one_server = _final(one.workdir, one)
    np.testing.assert_allclose(local[s], one_local, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(server[s], one_server, rtol=1e-5, atol=1e-6)
    finals.append(single[-1]["participant_accuracy_mean"])
  # The seeds are different runs, and the row is their mean and std.
  assert len({tuple(np.ravel(local[s])[:5]) for s in range(3)}) == 3
  last = rows[-1]
  values = [p["participant_accuracy_mean"] for p in last["per_seed"]]
  assert last["participant_accuracy_mean"] == pytest.approx(np.mean(values))
  assert last["participant_accuracy_mean_std"] == pytest.approx(
      np.std(values, ddof=1))
  assert last["num_seeds"] == 3
  assert summary["final_participant_accuracy_mean"] == pytest.approx(
      np.mean(finals), abs=1e-6)
  assert summary["final_participant_accuracy_mean_std"] == pytest.approx(
      np.std(finals, ddof=1), abs=1e-6)
  assert [p["seed"] for p in summary["per_seed"]] == [SEED, SEED + 1,
                                                      SEED + 2]


def test_vary_partition_gives_each_seed_its_split(tmp_path):
  # Full test set: the evaluation subset does not depend on the data seed.
  cfg, _ = _run(tmp_path, "vary", protocol="parallel", num_seeds=2,
                vary_partition=True, eval_examples=0)
  exp = experiment.setup(cfg)
  assert exp.data.images.shape[0] == 2  # a data axis per seed
  assert not np.array_equal(np.asarray(exp.data.labels[0]),
                            np.asarray(exp.data.labels[1]))
  rows = _metrics(cfg.workdir)
  for s in range(2):
    one, _ = _run(tmp_path, f"vary{s}", protocol="parallel", seed=SEED + s,
                  data_seed=SEED + s, eval_examples=0)
    for multi_row, row in zip(rows, _metrics(one.workdir)):
      for k in ("participant_accuracy_mean", "train_loss", "server_accuracy"):
        assert multi_row["per_seed"][s][k] == pytest.approx(
            row[k], rel=1e-5, abs=1e-6)


@pytest.mark.slow(seconds=85)
def test_a_killed_seeded_run_resumes_to_the_same_result(tmp_path):
  flags = [f"--{k}={v}" for k, v in TINY.items()] + [
      "--protocol=round_robin", "--num_seeds=3"]
  env = jit_env()
  env.pop(experiment.KILL_AFTER_EPOCH_ENV, None)
  with ForkedCli("dssgd_jax.main", env) as cli:  # one process per command

    def main(workdir, extra_env=None):
      return cli([f"--workdir={workdir}", *flags], cwd=REPO, env=extra_env)

    killed = main(tmp_path / "killed",
                  {experiment.KILL_AFTER_EPOCH_ENV: "1"})
    assert killed.returncode == experiment.KILLED_EXIT, killed.stderr
    assert len(_metrics(tmp_path / "killed")) == 1
    resumed = main(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr
    whole = main(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
  a, b = _metrics(tmp_path / "killed"), _metrics(tmp_path / "whole")
  assert len(a) == len(b) == 2
  for ra, rb in zip(a, b):
    for k in experiment.TIMING_FIELDS:
      ra.pop(k), rb.pop(k)
    assert ra == rb


def test_seed_flags_are_checked():
  base = config_lib.Config(**TINY)
  for over, needle in [(dict(num_seeds=2, mesh_shape=2), "--num_seeds"),
                       (dict(vary_partition=True), "--vary_partition"),
                       (dict(data_seed=-1), "--data_seed")]:
    with pytest.raises(ConfigError, match=needle):
      build.validate(base.replace(**over))
