"""End-to-end runs through experiment.run and the CLI on the bundled digits."""

import json
import os
import subprocess
import sys

import pytest

from dssgd_jax.run import build

from dssgd_jax.run import config as config_lib
from dssgd_jax.run import experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(dataset="digits", model="digits_mlp", num_participants=4,
            samples_per_participant=50, epochs=3, batch_size=10,
            learning_rate=0.1, eval_examples=120, progress=False)

REQUIRED = ("epoch", "participant_accuracy_mean", "participant_accuracy_min",
            "participant_accuracy_max", "server_accuracy", "train_loss",
            "uploaded_entries", "wall_time_s", "bytes_up", "bytes_down",
            "epsilon_spent")


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def _strip(rows):
  return [{k: v for k, v in r.items() if k not in experiment.TIMING_FIELDS}
          for r in rows]


def test_run_writes_config_and_metrics(tmp_path):
  cfg = build.validate(config_lib.Config(workdir=str(tmp_path), **TINY))
  summary = experiment.run(cfg)
  rows = _metrics(tmp_path)
  assert [r["epoch"] for r in rows] == [1, 2, 3]
  for r in rows:
    for k in REQUIRED:
      assert k in r, k
    assert r["participant_accuracy_min"] <= r["participant_accuracy_mean"]
    assert r["participant_accuracy_mean"] <= r["participant_accuracy_max"]
  # c = ceil(0.1 * 4,810) = 481 (int32 index + float32 value each).
  assert rows[0]["uploaded_entries"] == 481
  assert rows[0]["bytes_up"] == 481 * 8
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["num_participants"] == 4
  assert summary["epochs"] == 3


def test_same_seed_same_metrics(tmp_path):
  a = build.validate(config_lib.Config(workdir=str(tmp_path / "a"),
                                            **TINY))
  b = a.replace(workdir=str(tmp_path / "b"))
  experiment.run(a)
  experiment.run(b)
  assert _strip(_metrics(a.workdir)) == _strip(_metrics(b.workdir))
  c = a.replace(workdir=str(tmp_path / "c"), seed=1)
  experiment.run(c)
  assert _strip(_metrics(a.workdir)) != _strip(_metrics(c.workdir))


def test_centralized_reports_the_one_model(tmp_path):
  cfg = build.validate(config_lib.Config(
      workdir=str(tmp_path), algorithm="centralized", **TINY))
  experiment.run(cfg)
  for r in _metrics(tmp_path):
    assert r["participant_accuracy_min"] == r["participant_accuracy_max"]
    assert r["server_accuracy"] == r["participant_accuracy_mean"]
    assert r["uploaded_entries"] == 0 and r["bytes_up"] == 0


@pytest.mark.slow(seconds=22)
def test_cli_flagfile_and_override(tmp_path):
  flagfile = tmp_path / "tiny.cfg"
  flagfile.write_text("\n".join(f"--{k}={v}" for k, v in TINY.items()
                                if k != "progress") + "\n")
  out = subprocess.run(
      [sys.executable, "-m", "dssgd_jax.main", f"--flagfile={flagfile}",
       f"--workdir={tmp_path / 'run'}", "--epochs=2", "--noprogress"],
      capture_output=True, text=True, cwd=REPO, timeout=300)
  assert out.returncode == 0, out.stderr
  rows = _metrics(tmp_path / "run")
  assert len(rows) == 2  # --epochs after the flagfile overrides it
  assert "participant accuracy" in out.stdout


def test_ctrl_c_while_writing_events_waits_for_the_epochs_writes(
    tmp_path, monkeypatch):
  # SIGINT arriving inside tensorboardX's writer (its constructor has just
  # started the thread that drains its queue) is held until the epoch's
  # metrics line, events and checkpoint are written: the run stops with our
  # Interrupted error at that checkpoint, and no writer thread is left
  # running, to die with a traceback when the interpreter closes its queue.
  import signal  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  tensorboardx = pytest.importorskip("tensorboardX")
  from tensorboardX import event_file_writer  # pylint: disable=g-import-not-at-top
  from dssgd_jax.errors import Interrupted  # pylint: disable=g-import-not-at-top

  opened = []

  class InterruptedWriter(tensorboardx.SummaryWriter):

    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      opened.append(self)
      if len(opened) == 3:  # the session start, epoch 1, then epoch 2
        os.kill(os.getpid(), signal.SIGINT)

  monkeypatch.setattr(tensorboardx, "SummaryWriter", InterruptedWriter)
  cfg = build.validate(config_lib.Config(
      workdir=str(tmp_path), **{**TINY, "epochs": 5}))
  with pytest.raises(Interrupted) as e:
    experiment.run(cfg)
  assert "during epoch 2" in str(e.value), e.value
  assert "is epoch 2" in str(e.value), e.value
  assert [r["epoch"] for r in _metrics(tmp_path)] == [1, 2]
  assert len(opened) == 3
  assert not [t for t in threading.enumerate()
              if isinstance(t, event_file_writer._EventLoggerThread)]  # pylint: disable=protected-access
  import numpy as np  # pylint: disable=g-import-not-at-top
  with np.load(tmp_path / "checkpoint.npz") as z:
    assert int(z["epoch"]) == 2
