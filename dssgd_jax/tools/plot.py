r"""Figures of a finished or running experiment (SPEC section 6).

Usage::

  python -m dssgd_jax.plot WORKDIR

``WORKDIR`` is either

* a single run's work directory (``python -m dssgd_jax.main``): writes
  ``accuracy.png`` (mean test accuracy of the participants' own models against
  epochs, with the min/max band over participants and the server model's
  accuracy) and ``accuracy_vs_bytes.png`` (the same against the cumulative
  bytes each participant uploaded); or
* a sweep directory (``python -m dssgd_jax.reproduce``, or any directory whose
  subdirectories hold runs): writes ``figure.png`` (accuracy against epochs, one
  line per table row, one panel per batch size / learning rate column) and
  ``figure_bytes.png`` (accuracy against cumulative bytes uploaded per
  participant, log scale; rows that upload nothing are horizontal reference
  lines).

It only reads ``metrics.jsonl`` (a torn last line of a running experiment is
ignored), ``config.json`` and ``reproduce.json``, so it can be run at any time
while the experiment is still going (:mod:`dssgd_jax.run.figures`). A file
that cannot be written (e.g. a read-only directory) ends the command with one
``error:`` line naming it and the reason, exit status 2, and leaves the files
already there as they were.
"""

import sys

from dssgd_jax.tools import cli

with cli.exit_on_interrupt(__name__ == "__main__"):  # Ctrl-C while starting
  from absl import app
  from absl import flags

  from dssgd_jax.run import figures


def define_flags() -> None:
  """The command's own flags (defined only when run as a command)."""
  if "dpi" not in flags.FLAGS:
    flags.DEFINE_integer("dpi", 120, "Resolution of the PNG files.")


def main(argv):
  if len(argv) != 2:
    cli.fail("give exactly one work directory: python -m dssgd_jax.plot "
             "WORKDIR (a run's or a reproduce sweep's --workdir).")
  with cli.user_errors():
    paths = figures.plot(argv[1], flags.FLAGS.dpi)
  for p in paths:
    print(p)


if __name__ == "__main__":
  define_flags()
  sys.exit(app.run(main, flags_parser=cli.parse_flags))
