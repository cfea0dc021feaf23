"""TensorBoard event files of a run's per-epoch metrics (SPEC section 6).

:func:`open_writer` returns an :class:`EventWriter` whose
``write(epoch, row)`` records every numeric field of a metrics row (all but
``epoch``; None, bools, strings, lists and dicts are skipped; NaN and inf are
kept) as a scalar of the same tag at ``step=epoch``, in event files under
``WORKDIR/events/``; ``tensorboard --logdir=WORKDIR`` (or a sweep's root) shows
the curves.

The files are written by tensorboardX, a maintained writer of TensorBoard's
format (TFRecord framing, CRC-32C, the ``Event``/``Summary`` protocol buffers)
that needs no TensorFlow; TensorBoard itself is only needed to look at them
(``pip install 'dssgd_jax[tensorboard]'``).

Every epoch is written by its own short-lived ``SummaryWriter`` and closed
before ``write`` returns, so one event file per epoch: ``SummaryWriter.flush``
alone does not write events still queued for its background thread, and a
process killed right after ``flush`` can lose them, whereas ``close`` drains
the queue. A kill therefore never loses an epoch already reported.

Opening a writer records a session start at step ``resume_epoch + 1``
(tensorboardX's ``purge_step``: a ``SessionLog.START`` event). When a run
resumes from its checkpoint at ``resume_epoch``, TensorBoard then discards
what the killed process wrote for later epochs — as ``metrics.jsonl`` is
truncated to that epoch — and each epoch's scalars appear exactly once,
however many resumes there were. TensorBoard's Python loaders honour the
purge (the server's one from the second start of a run on, hence a start on a
fresh run too); its Rust data server (``--load_fast``) reaches the same result
by dropping a tag's points at and after a step that is written again.
"""

import numbers
import os
import time
from typing import Any

EVENTS_DIR = "events"

_last_suffix_ns = 0


def _unique_suffix() -> str:
  """An event-file name suffix that sorts after every earlier one.

  tensorboardX names a file ``events.out.tfevents.<seconds>.<host><suffix>``
  and opens it with ``"wb"``: two writers opened in the same second would
  share (and truncate) one file, and TensorBoard reads a directory's files in
  name order. A nanosecond stamp, strictly increasing within this process,
  keeps the names distinct and in order of creation.
  """
  global _last_suffix_ns
  _last_suffix_ns = max(time.time_ns(), _last_suffix_ns + 1)
  return f".{_last_suffix_ns:020d}.{os.getpid()}"


def scalars(row: dict[str, Any]) -> dict[str, float]:
  """The fields of ``row`` written as scalars: numbers but ``epoch``/bools.

  >>> scalars({"epoch": 2, "train_loss": 0.5, "server_accuracy": None,
  ...          "flag": True, "name": "x", "bytes_up": 3848, "nan": float("nan"),
  ...          "curve": [1.0]})
  {'train_loss': 0.5, 'bytes_up': 3848.0, 'nan': nan}
  """
  out = {}
  for tag, value in row.items():
    if tag == "per_seed" and isinstance(value, list):
      for run in value:  # --num_seeds: each run's values as seed_<s>/<field>
        for t, v in scalars(run).items():
          if t != "seed":
            out[f"seed_{run.get('seed')}/{t}"] = v
      continue
    if tag == "epoch" or isinstance(value, bool):
      continue
    # numbers.Real covers int, float and numpy's scalar numbers (but not
    # numpy.bool_); None, strings, lists and dicts are not numbers.
    if isinstance(value, numbers.Real):
      out[tag] = float(value)
  return out


class EventWriter:
  """Writes a run's per-epoch scalars into ``logdir`` (see module doc)."""

  def __init__(self, logdir: str, summary_writer_cls: type,
               resume_epoch: int = 0):
    self.logdir = logdir
    self._summary_writer_cls = summary_writer_cls
    self._closed = False
    # A file holding only the session start, written now (a resume killed
    # again before its first epoch still hides the steps metrics.jsonl
    # dropped), and on a fresh run too: TensorBoard's Python loader takes a
    # run's first start for the initial one and purges only at later ones.
    self._open(purge_step=resume_epoch + 1).close()

  def _open(self, purge_step: int | None = None):
    os.makedirs(self.logdir, exist_ok=True)
    return self._summary_writer_cls(
        self.logdir, purge_step=purge_step, filename_suffix=_unique_suffix())

  def write(self, epoch: int, row: dict[str, Any]) -> None:
    """Writes ``row``'s numeric fields (but ``epoch``) at ``step=epoch``.

    On disk when this returns (the writer is closed, its queue drained).
    """
    if self._closed:
      raise ValueError(f"EventWriter for {self.logdir} is closed")
    values = scalars(row)
    if not values:
      return
    writer = self._open()
    try:
      wall_time = time.time()
      for tag, value in values.items():
        writer.add_scalar(tag, value, global_step=int(epoch),
                          walltime=wall_time)
    finally:
      writer.close()

  def close(self) -> None:
    """Nothing is left to write (every ``write`` closed its file); later
    writes raise ``ValueError``."""
    self._closed = True

  def __enter__(self) -> "EventWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def open_writer(workdir: str, resume_epoch: int = 0) -> EventWriter | None:
  """An :class:`EventWriter` into ``workdir/events/``, or None without
  tensorboardX.

  Args:
    workdir: the run's directory.
    resume_epoch: the epoch of the checkpoint the run resumes from (0 for a
      fresh run); events an earlier process wrote for later epochs are
      purged.
  """
  if int(resume_epoch) < 0:
    raise ValueError(f"resume_epoch must be >= 0, got {resume_epoch}")
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return EventWriter(os.path.join(workdir, EVENTS_DIR), SummaryWriter,
                     resume_epoch=int(resume_epoch))
