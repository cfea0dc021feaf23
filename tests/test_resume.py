"""Checkpoints and resumption with real process kills (experiment.py).

A process running ``python -m dssgd_jax.main`` (forked from a server that has
done the imports, tests/cli_helpers.ForkedCli) is killed (``os._exit`` from
the test hooks in experiment.py, which skips every cleanup exactly like
SIGKILL) after an epoch's checkpoint, or in the middle of writing one; the same
command then resumes, and its metrics must equal those of an uninterrupted run
number for number (timing fields aside).
"""

import fcntl
import json
import os

import numpy as np
import pytest

from dssgd_jax.run import experiment

from cli_helpers import ForkedCli
from cli_helpers import jit_env as _jit_env
from cli_helpers import session_dir as _session_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = ["--dataset=digits", "--model=digits_mlp", "--num_participants=4",
         "--samples_per_participant=50", "--batch_size=10",
         "--learning_rate=0.1", "--upload_fraction=0.1", "--eval_examples=120",
         "--protocol=round_robin", "--epochs=4"]


@pytest.fixture(scope="module")
def cli():
  """``python -m dssgd_jax.main``, one process per command."""
  e = _jit_env()
  for k in (experiment.KILL_AFTER_EPOCH_ENV,
            experiment.KILL_IN_CHECKPOINT_ENV):
    e.pop(k, None)
  with ForkedCli("dssgd_jax.main", e) as server:
    yield server


def _main(workdir, cli, extra=(), **hooks):
  return cli([*FLAGS, f"--workdir={workdir}", *extra], cwd=REPO, env=hooks)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def _strip(rows):
  return [{k: v for k, v in r.items() if k not in experiment.TIMING_FIELDS}
          for r in rows]


def _checkpoint(workdir):
  with np.load(os.path.join(workdir, "checkpoint.npz")) as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cli):
  """An uninterrupted 4-epoch run (one per session, whatever the worker)."""
  root = _session_dir(tmp_path_factory, "resume_reference")
  workdir = root / "run"
  with open(root / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (workdir / "summary.json").exists():
      out = _main(workdir, cli)
      assert out.returncode == 0, out.stderr
  return workdir


@pytest.mark.slow(seconds=45)
def test_killed_after_epoch_2_resumes_identically(tmp_path, cli, reference):
  out = _main(tmp_path, cli, **{experiment.KILL_AFTER_EPOCH_ENV: "2"})
  assert out.returncode == experiment.KILLED_EXIT, out.stderr
  assert [r["epoch"] for r in _metrics(tmp_path)] == [1, 2]
  assert not os.path.exists(tmp_path / "summary.json")
  ckpt = _checkpoint(tmp_path)
  assert int(ckpt["epoch"]) == 2

  out = _main(tmp_path, cli)
  assert out.returncode == 0, out.stderr
  assert "Resuming" in out.stderr and "after epoch 2" in out.stderr
  assert _strip(_metrics(tmp_path)) == _strip(_metrics(reference))
  assert "Traceback" not in out.stderr

  # The checkpoint holds the server state, every participant's parameters,
  # the PRNG key the epoch keys are folded from, and the epoch.
  ckpt = _checkpoint(tmp_path)
  ref = _checkpoint(reference)
  d = _metrics(tmp_path)[0]["num_params"]
  shapes = sorted(v.shape for k, v in ckpt.items() if k.startswith("state"))
  assert (4, d) in shapes and shapes.count((d,)) == 2  # local; params, stat
  assert int(ckpt["epoch"]) == 4 and "train_key" in ckpt
  assert ckpt.keys() == ref.keys()
  for k in ckpt:
    np.testing.assert_array_equal(ckpt[k], ref[k], err_msg=k)

  # TensorBoard events: every epoch exactly once across both processes.
  assert _event_steps(tmp_path) == [1, 2, 3, 4]


def _event_steps(workdir):
  """Steps of one scalar as TensorBoard's own reader sees them."""
  ea = pytest.importorskip(
      "tensorboard.backend.event_processing.event_accumulator")
  acc = ea.EventAccumulator(os.path.join(str(workdir), "events"))
  acc.Reload()
  return [e.step for e in acc.Scalars("participant_accuracy_mean")]


@pytest.mark.slow(seconds=40)
def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(
    tmp_path, cli, reference):
  # Checkpoints every 2 epochs: epochs 3 and 4 run, epoch 4's checkpoint is
  # torn half-way, and the process dies before replacing epoch 2's.
  extra = ["--checkpoint_every=2"]
  out = _main(tmp_path, cli, extra, **{experiment.KILL_IN_CHECKPOINT_ENV: "4"})
  assert out.returncode == experiment.KILLED_EXIT, out.stderr
  assert [r["epoch"] for r in _metrics(tmp_path)] == [1, 2, 3, 4]
  assert int(_checkpoint(tmp_path)["epoch"]) == 2  # intact and loadable
  torn = tmp_path / "checkpoint.npz.tmp"
  assert torn.exists()
  with pytest.raises(Exception):
    np.load(torn)["epoch"]  # pylint: disable=expression-not-assigned

  out = _main(tmp_path, cli, extra)
  assert out.returncode == 0, out.stderr
  assert "after epoch 2" in out.stderr
  # Epochs 3 and 4 were recomputed from epoch 2's checkpoint, not appended.
  assert _strip(_metrics(tmp_path)) == _strip(_metrics(reference))
  assert int(_checkpoint(tmp_path)["epoch"]) == 4
  # The events of the first run's epochs 3 and 4 are purged: once each.
  assert _event_steps(tmp_path) == [1, 2, 3, 4]

