"""Shared command-line plumbing: flag parsing and one-sentence errors.

Every entry point turns a :class:`~dssgd_jax.errors.UserError` (or an absl
flag-parsing error) into one line on stderr and exit status 2, with no
traceback.
"""

import contextlib
import os
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


def reject_positional(argv) -> None:
  """Exits with one line if an entry point got arguments that are not flags
  (``argv`` as absl's ``app.run`` passes it, program name first)."""
  if len(argv) > 1:
    fail(f"Unexpected arguments: {' '.join(argv[1:])} (flags are "
         "--name=value).")


def force_cpu_devices(n: int) -> None:
  """Makes XLA:CPU expose ``n`` devices (before JAX's backends start).

  Appends ``--xla_force_host_platform_device_count=n`` to ``XLA_FLAGS``
  unless that flag is already there; a no-op for ``n <= 1``.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if n > 1 and "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (
        f"{flags} --xla_force_host_platform_device_count={n}").strip()


def setup_devices(cfg) -> None:
  """Applies --cpu_devices and initializes multi-host JAX when
  --coordinator_address is given."""
  if getattr(cfg, "cpu_devices", 0):
    force_cpu_devices(int(cfg.cpu_devices))
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
