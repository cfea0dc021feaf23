"""Shared command-line plumbing: flag parsing and one-sentence errors.

Every entry point turns a :class:`~dssgd_jax.errors.UserError` (or an absl
flag-parsing error) into one line on stderr and exit status 2, with no
traceback, and Ctrl-C into one line and status 130 (:func:`user_errors`,
:func:`exit_on_interrupt`).
"""

import contextlib
import os
import re
import signal
import sys
import threading

from absl import flags
from absl import logging

from dssgd_jax import _io
from dssgd_jax.errors import Interrupted, UserError


def fail(message: str, status: int = 2):
  """Prints ``message`` as one line to stderr and exits with ``status``."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def _interrupted(message: str):
  """Prints ``message`` as one line and ends the process at once (status 130).

  JAX compiles on a thread pool while the main thread waits, and Ctrl-C
  interrupts the wait, not the compilation. A normal exit then tears the
  runtime down under the compilation still running, which crashed the
  process (SIGSEGV, "Fatal Python error") when Ctrl-C came during epoch 1's
  compilation. ``os._exit`` skips that teardown. Nothing is lost: a run's
  metrics lines are fsynced as written, its checkpoint and summaries are
  replaced atomically, and its event files are closed after every epoch.
  """
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(Interrupted.exit_status)  # pylint: disable=protected-access


HELP_ARGS = ("--help", "-help", "-h", "--helpshort", "-?", "--helpfull")


def help_text(doc: str | None = None) -> str:
  """``--help``: the program's docstring, then its flags by concern (the run
  flags in their groups: data, model and training, sharing, privacy,
  protocol, evaluation and checkpoints, devices; then the tool's own)."""
  from dssgd_jax.run import config as config_lib  # pylint: disable=g-import-not-at-top
  by_module = flags.FLAGS.flags_by_module_dict()
  sections = [(f"dssgd_jax ({g})", g) for g in config_lib.GROUPS]
  sections += [(m, "options of this command") for m in by_module
               if not m.startswith(("absl", "dssgd_jax ("))]
  lines = [(doc or "").strip(), ""]
  for module, title in sections:
    fl = sorted(by_module.get(module, []), key=lambda f: f.name)
    if not fl:
      continue
    lines.append(f"{title}:")
    for f in fl:
      default = "" if f.default is None else f"={f.default_as_str.strip(chr(39))}"
      lines.append(f"  --{f.name}{default}")
      lines.append(f"      {' '.join(f.help.split())}")
    lines.append("")
  lines.append("--flagfile=FILE reads flags from a file (one per line); a flag "
               "given after it overrides the file.")
  return "\n".join(lines)


def _bad_value(e: Exception) -> str:
  """absl's "flag --x=v: <parser message>" as one plain sentence."""
  text = " ".join(str(e).split())
  m = re.match(r"flag --(\w+)=(.*?): ", text)
  if not m or m.group(1) not in flags.FLAGS:
    return text
  name, value = m.groups()
  fl = flags.FLAGS[name]
  kind = fl.flag_type()
  if kind == "int":
    return f"--{name}={value} is not an integer."
  if kind == "float":
    return f"--{name}={value} is not a number."
  if kind == "bool":
    return f"--{name}={value} is not true or false."
  if getattr(fl.parser, "enum_values", None):
    return (f"--{name}={value!r} is not one of: "
            f"{', '.join(fl.parser.enum_values)}.")
  return text


def parse_flags(argv):
  """absl flag parsing that reports a bad flag in one line (exit 2).

  ``--help`` prints :func:`help_text` and exits 0. Also quiets absl's INFO
  logging (e.g. JAX probing for absent TPU/GPU backends); pass
  ``--verbosity=0`` to see it again.
  """
  if any(a in HELP_ARGS for a in argv[1:]):
    print(help_text(getattr(sys.modules.get("__main__"), "__doc__", None)))
    sys.exit(0)
  try:
    rest = flags.FLAGS(argv)
  except flags.CantOpenFlagFileError as e:
    reason = str(e).split("Unable to open flagfile:", 1)[-1].strip()
    fail(f"--flagfile cannot be read: {reason}")
  except flags.IllegalFlagValueError as e:
    fail(_bad_value(e))
  except flags.Error as e:
    fail(" ".join(str(e).split()))
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  return rest


@contextlib.contextmanager
def interrupts_not_lost():
  """Within the block, a Ctrl-C that Python would drop is delivered again.

  A ``KeyboardInterrupt`` raised inside a callback that the interpreter calls
  on its own (a garbage-collector callback, a weakref callback, ``__del__``)
  cannot propagate: Python prints it ("Exception ignored in ...") through
  ``sys.unraisablehook`` and goes on. JAX runs such a callback at every
  collection, and a Ctrl-C landing in one was lost while the run went on.
  Here the hook sends SIGINT again 50 ms later instead, so that it is raised
  where the main thread runs ordinary code.
  """
  previous = sys.unraisablehook

  def hook(unraisable):
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
      threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
      return
    previous(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  finally:
    sys.unraisablehook = previous


@contextlib.contextmanager
def user_errors():
  """Turns UserError into one line on stderr and its exit status (2; 130 for
  an interrupt), and Ctrl-C anywhere else into one line and status 130."""
  try:
    with interrupts_not_lost():
      yield
  except Interrupted as e:
    _interrupted(str(e))
  except UserError as e:
    fail(str(e), e.exit_status)
  except KeyboardInterrupt:
    _interrupted("Interrupted before the first epoch finished; rerun the "
                 "same command to start again.")


@contextlib.contextmanager
def exit_on_interrupt(enabled: bool = True):
  """Ctrl-C during the block ends the process at once: one line, status 130.

  For an entry point's imports (``with cli.exit_on_interrupt(__name__ ==
  "__main__"):`` around them): a ``KeyboardInterrupt`` raised inside another
  library's import would print its traceback, and some imports catch it and
  go on. Off the main thread, when the SIGINT handler was not set from
  Python, or with ``enabled=False`` (the module imported as a library, e.g.
  in a notebook), a plain block. The previous handler is back after it.
  """
  if not enabled:
    yield
    return
  with _io.sigint_handler(lambda signum, frame: _interrupted(
      "Interrupted while starting; rerun the same command.")):
    yield


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


def summary_text(summary: dict, workdir: str | None = None) -> str:
  """A short human summary of a finished run (and where its files are)."""
  def f(x):
    return "n/a" if x is None else f"{x:.4f}"
  eps = summary.get("epsilon_spent")
  delta = summary.get("delta_spent")
  eps_text = "n/a" if eps is None else f"{eps:.4g}" + (
      f" (delta {delta:.3g})" if delta else "")
  return (f"{summary['algorithm']}: {summary['epochs']} epochs, participant "
          f"accuracy {f(summary['final_participant_accuracy_mean'])} (min "
          f"{f(summary['final_participant_accuracy_min'])}, max "
          f"{f(summary['final_participant_accuracy_max'])}), server "
          f"{f(summary['final_server_accuracy'])}, best mean "
          f"{f(summary['best_participant_accuracy_mean'])}, epsilon "
          f"{eps_text}, "
          f"{summary['elapsed_s']:.1f}s" + ("" if workdir is None else (
              f"\nFiles in {workdir}: metrics.jsonl (one line per epoch), "
              "summary.json, accuracy.png, accuracy_vs_bytes.png, "
              f"checkpoint.npz; TensorBoard: tensorboard --logdir {workdir}")))
