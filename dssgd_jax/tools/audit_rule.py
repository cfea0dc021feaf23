r"""The mechanism audit of a run's upload rule: its claim beside a measured
lower bound (:mod:`dssgd_jax.mechanism_audit`).

Usage::

  python -m dssgd_jax.audit_rule --flagfile=configs/quickstart.cfg \
      --upload_fraction=0.01 --selection=random --clip_bound=0.01 \
      --noise=laplace --noise_scale=3.46 \
      --audit_trials=20000 --audit_pilot_trials=5000

takes the run flags of ``python -m dssgd_jax.main`` (no run is started and
no data is loaded), builds the upload rule a participant of that run applies
to its Δw (D = the model's parameter count), and runs it on worst-case pairs
of neighbouring inputs ``--audit_trials`` times each: the printed line gives
the claimed ε per upload (one epoch) and the measured one-sided lower bound
at ``--audit_confidence``. A bound above the claim means the rule's
declaration is wrong (exit status 1). That command takes about 3 minutes on
a 2-core CPU (D = 17,258; random selection draws an exact uniform subset
per run); docs/privacy.md says what it measures and where such a bound
stops being informative.
"""

import sys

from dssgd_jax.tools import cli

with cli.exit_on_interrupt(__name__ == "__main__"):  # Ctrl-C while starting
  from absl import app
  from absl import flags

  from dssgd_jax.run import config as config_lib

config_lib.define_flags()
config_lib.declare_key_flags()
flags.DEFINE_integer("audit_trials", 200_000, "Runs of the rule on each of "
                     "the two chosen inputs (the bound's sample).")
flags.DEFINE_integer("audit_pilot_trials", 20_000, "Runs of each input of "
                     "each pair to choose the pair, score and threshold.")
flags.DEFINE_float("audit_confidence", 0.95, "Confidence of the one-sided "
                   "lower bound.")
flags.DEFINE_integer("audit_seed", 0, "Seed of the runs' keys.")


def audit(cfg, trials: int, pilot_trials: int, confidence: float, seed: int):
  """The :class:`~dssgd_jax.mechanism_audit.RuleAudit` of ``cfg``'s rule
  (None when the run uploads nothing)."""
  from dssgd_jax import mechanism_audit  # pylint: disable=g-import-not-at-top
  from dssgd_jax.run import build  # pylint: disable=g-import-not-at-top
  d = build.num_params(cfg)
  rule = build.upload_rule(cfg, d)
  if rule is None:
    return None
  return mechanism_audit.audit_rule(rule, d, trials=trials,
                                    pilot_trials=pilot_trials,
                                    confidence=confidence, seed=seed)


def main(argv):
  cli.reject_positional(argv)
  f = flags.FLAGS
  with cli.user_errors():
    cfg = config_lib.from_flags()
    if not (f.audit_trials > 0 and f.audit_pilot_trials > 0):
      cli.fail("--audit_trials and --audit_pilot_trials must be positive.")
    if not 0.5 < f.audit_confidence < 1:
      cli.fail(f"--audit_confidence={f.audit_confidence} must be in "
               "(0.5, 1).")
    res = audit(cfg, f.audit_trials, f.audit_pilot_trials,
                f.audit_confidence, f.audit_seed)
  if res is None:
    print("This run uploads nothing: ε = 0, nothing to audit.")
    return 0
  print(res.summary())
  return 0 if res.consistent else 1


if __name__ == "__main__":
  sys.exit(app.run(main, flags_parser=cli.parse_flags))
