"""Atomic file writes that fail in one sentence (shared by the tools).

A file is written to ``path.tmp``, flushed and fsynced, then renamed over
``path`` (``os.replace``), so a kill or a failed write at any moment leaves the
previous file whole; a failure removes the temporary file and raises the
caller's :class:`~dssgd_jax.errors.UserError` naming the path and the reason.

:func:`interrupts_deferred` holds a Ctrl-C until a block of writes is done;
:func:`sigint_handler` swaps the Ctrl-C handler for a block.
"""

import contextlib
import os
import signal
import threading
from typing import Any, Callable, Iterator

from dssgd_jax.errors import UserError


def atomic_write(path: str, write: Callable[[str], None],
                 error: type[UserError] = UserError) -> str:
  """Calls ``write(tmp_path)``, then moves the result to ``path``.

  Args:
    path: the file to (re)place.
    write: writes the whole file at the path it is given.
    error: the UserError subclass raised when writing fails.

  Returns:
    ``path``.

  >>> import tempfile
  >>> p = os.path.join(tempfile.mkdtemp(), "x.txt")
  >>> atomic_write(p, lambda t: open(t, "w").write("hi")) == p, open(p).read()
  (True, 'hi')
  """
  tmp = path + ".tmp"
  try:
    write(tmp)
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise error(f"Cannot write {path}: {e.strerror or e}.") from None
  return path


def write_text(path: str, text: str,
               error: type[UserError] = UserError) -> str:
  """:func:`atomic_write` of a text file."""
  def write(tmp):
    with open(tmp, "w", newline="") as f:
      f.write(text)
  return atomic_write(path, write, error)


@contextlib.contextmanager
def sigint_handler(handler: Callable) -> Iterator[Any]:
  """Makes ``handler`` the SIGINT (Ctrl-C) handler during the block.

  Yields the handler it replaced, put back when the block ends; yields None
  and changes nothing off the main thread (only it may set handlers) or when
  the handler in place was not set from Python (it could not be put back).
  """
  if threading.current_thread() is not threading.main_thread():
    yield None
    return
  previous = signal.getsignal(signal.SIGINT)
  if previous is None:
    yield None
    return
  signal.signal(signal.SIGINT, handler)
  try:
    yield previous
  finally:
    signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
  """Holds SIGINT (Ctrl-C) until the block ends, then acts on it.

  A run writes an epoch's metrics line, TensorBoard events and checkpoint in
  such a block, so a Ctrl-C lands between epochs' writes, never inside one.
  Without it, a KeyboardInterrupt raised inside tensorboardX's writer (whose
  constructor starts a thread reading a queue) can leave that thread running
  until the interpreter closes the queue under it, and its traceback reaches
  the terminal after our one-line message.

  The handler in place before the block runs once at its end if SIGINT
  arrived during it (Python's default one raises ``KeyboardInterrupt``). Off
  the main thread, or when the handler was not set from Python, this is a
  plain block.

  >>> import os, signal
  >>> done = []
  >>> try:
  ...   with interrupts_deferred():
  ...     os.kill(os.getpid(), signal.SIGINT)
  ...     done.append("the block finished")
  ... except KeyboardInterrupt:
  ...   done.append("then the interrupt")
  >>> done
  ['the block finished', 'then the interrupt']
  """
  received = []
  with sigint_handler(lambda signum, frame: received.append(frame)) as previous:
    yield
  if received:
    if callable(previous):
      previous(signal.SIGINT, received[0])
    elif previous == signal.SIG_DFL:
      os.kill(os.getpid(), signal.SIGINT)
