"""Shared command-line plumbing: flag parsing and one-sentence errors.

Every entry point turns a :class:`~dssgd_jax.errors.UserError` (or an absl
flag-parsing error) into one line on stderr and exit status 2, with no
traceback.
"""

import contextlib
import sys

from absl import flags
from absl import logging

from dssgd_jax.errors import UserError


def fail(message: str, status: int = 2):
  """Prints ``message`` as one line to stderr and exits with ``status``."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def parse_flags(argv):
  """absl flag parsing that reports a bad flag in one line (exit 2).

  Also quiets absl's INFO logging (e.g. JAX probing for absent TPU/GPU
  backends); pass ``--verbosity=0`` to see it again.
  """
  try:
    rest = flags.FLAGS(argv)
  except flags.CantOpenFlagFileError as e:
    reason = str(e).split("Unable to open flagfile:", 1)[-1].strip()
    fail(f"--flagfile cannot be read: {reason}")
  except flags.Error as e:
    fail(" ".join(str(e).split()))
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  return rest


@contextlib.contextmanager
def user_errors():
  """Turns UserError into one line on stderr and exit status 2."""
  try:
    yield
  except UserError as e:
    fail(str(e))


def setup_devices(cfg) -> None:
  """Initializes multi-host JAX when --coordinator_address is given."""
  if cfg.coordinator_address:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize(coordinator_address=cfg.coordinator_address,
                               num_processes=cfg.num_processes,
                               process_id=cfg.process_id)


def summary_text(summary: dict) -> str:
  """A short human summary of a finished run."""
  def f(x):
    return "n/a" if x is None else f"{x:.4f}"
  eps = summary.get("epsilon_spent")
  return (f"{summary['algorithm']}: {summary['epochs']} epochs, participant "
          f"accuracy {f(summary['final_participant_accuracy_mean'])} (min "
          f"{f(summary['final_participant_accuracy_min'])}, max "
          f"{f(summary['final_participant_accuracy_max'])}), server "
          f"{f(summary['final_server_accuracy'])}, best mean "
          f"{f(summary['best_participant_accuracy_mean'])}, epsilon "
          f"{'n/a' if eps is None else f'{eps:.4g}'}, "
          f"{summary['elapsed_s']:.1f}s")
