"""Atomic file writes that fail in one sentence (shared by the tools).

A file is written to ``path.tmp``, flushed and fsynced, then renamed over
``path`` (``os.replace``), so a kill or a failed write at any moment leaves the
previous file whole; a failure removes the temporary file and raises the
caller's :class:`~dssgd_jax.errors.UserError` naming the path and the reason.
"""

import os
from typing import Callable

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
