r"""Runs one DSSGD experiment: flags -> config -> ``experiment.run(config)``.

Usage::

  python -m dssgd_jax.main --flagfile=configs/quickstart.cfg --workdir=/tmp/qs
  python -m dssgd_jax.main --flagfile=configs/quickstart.cfg \
      --workdir=/tmp/qs_standalone --algorithm=standalone

A flag given after ``--flagfile`` overrides the file. Rerunning the same
command resumes from the last checkpoint in ``--workdir``. Bad flags or files
print one sentence and exit with status 2.
"""

import sys

from dssgd_jax.tools import cli

with cli.exit_on_interrupt(__name__ == "__main__"):
  from absl import app
  from absl import flags

  from dssgd_jax.run import config as config_lib

config_lib.define_flags()
config_lib.declare_key_flags()  # list them, by group, in --help


def main(argv):
  cli.reject_positional(argv)
  with cli.user_errors():
    cfg = config_lib.from_flags()
    cli.setup_devices(cfg)
    with cli.exit_on_interrupt():
      from dssgd_jax.run import experiment  # pylint: disable=g-import-not-at-top
    summary = experiment.run(cfg)
  print(cli.summary_text(summary, cfg.workdir))


def run():
  """The command line: flags from ``sys.argv``; exits with the status."""
  sys.exit(app.run(main, flags_parser=cli.parse_flags))


if __name__ == "__main__":
  run()
