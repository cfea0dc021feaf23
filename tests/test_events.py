"""run/events.py: TensorBoard event files written with tensorboardX.

Everything is read back with TensorBoard's own loaders, both the classic
EventAccumulator and the plugin EventAccumulator that `tensorboard --logdir
--load_fast=false` serves from (they purge after a restart by different
rules), with their default purge of orphaned data. What is asserted is thus
what TensorBoard shows: after kills and resumes, each epoch's scalars exactly
once, with the values of the process that wrote the epoch last.
"""

import doctest
import math
import os
import subprocess
import sys
import textwrap

import pytest

from dssgd_jax.run import events

ea = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator")
pea = pytest.importorskip(
    "tensorboard.backend.event_processing.plugin_event_accumulator")
tensor_util = pytest.importorskip("tensorboard.util.tensor_util")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAGS = ("participant_accuracy_mean", "train_loss", "bytes_up")


def _row(epoch, run):
  """A metrics row whose values tell which run (1, 2, 3) wrote the epoch."""
  return {"epoch": epoch, "participant_accuracy_mean": run + epoch / 100,
          "train_loss": 1.0 / (run * 10 + epoch), "bytes_up": 1000.0 * run,
          "server_accuracy": None, "epsilon_spent": None}


def _read(workdir):
  """{tag: [(step, value), ...]} as TensorBoard's loaders see the run
  (asserting that both loaders see the same)."""
  logdir = os.path.join(str(workdir), events.EVENTS_DIR)
  classic = ea.EventAccumulator(logdir, size_guidance={ea.SCALARS: 0})
  classic.Reload()
  got = {tag: [(e.step, e.value) for e in classic.Scalars(tag)]
         for tag in classic.Tags()["scalars"]}
  plugin = pea.EventAccumulator(logdir, size_guidance={pea.TENSORS: 0})
  plugin.Reload()
  served = {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
                  for e in plugin.Tensors(tag)]
            for tag in plugin.Tags()["tensors"]}
  assert [(k, [s for s, _ in v]) for k, v in sorted(served.items())] == [
      (k, [s for s, _ in v]) for k, v in sorted(got.items())]
  assert ({k: [round(x, 6) for _, x in v if not math.isnan(x)]
           for k, v in served.items()} ==
          {k: [round(x, 6) for _, x in v if not math.isnan(x)]
           for k, v in got.items()})
  return got


def _expected(runs_by_epoch):
  """{tag: [(step, value)]} for ``{epoch: run that wrote it last}``."""
  return {tag: [(e, pytest.approx(_row(e, r)[tag], rel=1e-6))
                for e, r in sorted(runs_by_epoch.items())]
          for tag in TAGS}


def _write(workdir, epochs, run, resume_epoch=0):
  writer = events.open_writer(str(workdir), resume_epoch=resume_epoch)
  assert writer is not None
  for epoch in epochs:
    writer.write(epoch, _row(epoch, run))
  return writer


def test_fresh_run(tmp_path):
  with _write(tmp_path, range(1, 4), run=1):
    pass
  got = _read(tmp_path)
  assert sorted(got) == sorted(TAGS)  # None fields are not written
  assert got == _expected({1: 1, 2: 1, 3: 1})


def test_resume_purges_epochs_after_the_checkpoint(tmp_path):
  # The first process reports epochs 1..5 and is "killed" (the writer is
  # dropped, never closed) after its last checkpoint, at epoch 3.
  first = _write(tmp_path, range(1, 6), run=1)
  del first
  _write(tmp_path, range(4, 7), run=2, resume_epoch=3).close()
  got = _read(tmp_path)
  assert {tag: [s for s, _ in pts] for tag, pts in got.items()} == {
      tag: [1, 2, 3, 4, 5, 6] for tag in TAGS}
  assert got == _expected({1: 1, 2: 1, 3: 1, 4: 2, 5: 2, 6: 2})


def test_two_resumes_in_a_row(tmp_path):
  _write(tmp_path, range(1, 6), run=1)                  # killed, ckpt 3
  _write(tmp_path, range(4, 7), run=2, resume_epoch=3)  # killed, ckpt 4
  _write(tmp_path, range(5, 8), run=3, resume_epoch=4).close()
  assert _read(tmp_path) == _expected(
      {1: 1, 2: 1, 3: 1, 4: 2, 5: 3, 6: 3, 7: 3})


def test_resume_killed_before_its_first_epoch_still_purges(tmp_path):
  # The purge is on disk as soon as the writer is opened.
  _write(tmp_path, range(1, 6), run=1)
  _write(tmp_path, [], run=2, resume_epoch=2)
  assert _read(tmp_path) == _expected({1: 1, 2: 1})
  _write(tmp_path, range(3, 5), run=3, resume_epoch=2).close()
  assert _read(tmp_path) == _expected({1: 1, 2: 1, 3: 3, 4: 3})


def test_resume_at_the_last_epoch_keeps_everything(tmp_path):
  _write(tmp_path, range(1, 4), run=1)
  _write(tmp_path, [], run=2, resume_epoch=3).close()
  assert _read(tmp_path) == _expected({1: 1, 2: 1, 3: 1})


def test_restart_from_scratch_hides_the_old_events(tmp_path):
  # No checkpoint to resume from: the run starts over at epoch 1 in the same
  # workdir (metrics.jsonl keeps no row), so nothing earlier may show.
  _write(tmp_path, range(1, 4), run=1)
  _write(tmp_path, range(1, 3), run=2).close()
  assert _read(tmp_path) == _expected({1: 2, 2: 2})


def test_os_exit_loses_no_reported_epoch(tmp_path):
  """A real kill (os._exit skips every cleanup) right after ``write``."""
  script = textwrap.dedent(f"""
      import os, sys
      sys.path.insert(0, {REPO!r})
      from dssgd_jax.run import events
      w = events.open_writer(sys.argv[1])
      for epoch in range(1, 6):
        w.write(epoch, {{"epoch": epoch, "train_loss": epoch / 10}})
      os._exit(3)
      """)
  out = subprocess.run([sys.executable, "-c", script, str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 3, out.stderr
  with events.open_writer(str(tmp_path), resume_epoch=5) as w:
    w.write(6, {"epoch": 6, "train_loss": 0.6})
  got = _read(tmp_path)["train_loss"]
  assert [(s, round(v, 6)) for s, v in got] == [
      (e, round(e / 10, 6)) for e in range(1, 7)]


def test_only_numeric_fields_are_written(tmp_path):
  np = pytest.importorskip("numpy")
  with events.open_writer(str(tmp_path)) as w:
    w.write(2, {"epoch": 2, "train_loss": 0.25, "bytes_up": 3848,
                "server_accuracy": None, "epsilon_spent": None,
                "converged": True, "protocol": "round_robin",
                "per_participant": [0.5, 0.6], "extra": {"a": 1.0},
                "np_float": np.float32(0.5), "np_int": np.int64(7),
                "np_bool": np.bool_(True), "diverged": float("nan"),
                "inf_loss": float("inf")})
  got = _read(tmp_path)
  assert sorted(got) == sorted(["train_loss", "bytes_up", "np_float",
                                "np_int", "diverged", "inf_loss"])
  assert got["train_loss"] == [(2, 0.25)]
  assert got["bytes_up"] == [(2, 3848.0)]
  assert got["np_float"] == [(2, 0.5)]
  assert got["np_int"] == [(2, 7.0)]
  assert got["inf_loss"] == [(2, math.inf)]
  [(step, value)] = got["diverged"]
  assert step == 2 and math.isnan(value)


def test_a_row_without_numbers_writes_no_scalar(tmp_path):
  with events.open_writer(str(tmp_path)) as w:
    w.write(1, {"epoch": 1, "server_accuracy": None, "note": "x"})
  assert _read(tmp_path) == {}
  assert len(os.listdir(tmp_path / events.EVENTS_DIR)) == 1  # the start


def test_write_after_close_raises(tmp_path):
  w = events.open_writer(str(tmp_path))
  w.close()
  with pytest.raises(ValueError, match="closed"):
    w.write(1, {"epoch": 1, "train_loss": 1.0})


def test_negative_resume_epoch_is_rejected(tmp_path):
  with pytest.raises(ValueError, match="resume_epoch"):
    events.open_writer(str(tmp_path), resume_epoch=-1)


def test_event_files_are_distinct_and_in_order(tmp_path):
  # Several writers within one second: one file each (none overwritten),
  # and the names sort in the order the files were created.
  logdir = tmp_path / events.EVENTS_DIR
  created = []
  for epoch in (1, 2, 3):
    w = events.open_writer(str(tmp_path), resume_epoch=epoch - 1)
    created += sorted(set(os.listdir(logdir)) - set(created))
    w.write(epoch, _row(epoch, 1))
    created += sorted(set(os.listdir(logdir)) - set(created))
  assert len(created) == 6  # a start and an epoch each time
  assert sorted(created) == created
  assert all(".tfevents." in name for name in created)


def test_open_writer_without_tensorboardx(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
  assert events.open_writer(str(tmp_path)) is None
  assert events.open_writer(str(tmp_path), resume_epoch=3) is None
  assert not os.path.exists(tmp_path / events.EVENTS_DIR)


def test_doctests():
  result = doctest.testmod(events)
  assert result.attempted and not result.failed
