r"""The mechanism audit of the upload chains the command line builds: each
chain's claimed ε per upload beside its measured lower bound, and the wall
time of each audit (docs/privacy.md, "Checking a claim by attack").

  python benchmarks/audit_rules.py                 # D = 10 and D = 1,000
  python benchmarks/audit_rules.py --trials=200000 --pilot_trials=20000

Every chain is audited on its worst-case neighbouring inputs
(:func:`dssgd_jax.mechanism_audit.audit_rule`); the noise scales are set for
a claim of ε = 1 per upload where the chain has one. The last rows are a
false declaration (values x100 after the clip, declared as the identity) and
chains without a guarantee: the audit must find them.
"""

import argparse
import time

from dssgd_jax import accounting
from dssgd_jax import mechanism_audit
from dssgd_jax import rules

GAMMA = 0.01


def _times_100():
  return rules.UploadRule(
      lambda up, key: up._replace(values=100.0 * up.values), lambda p: p,
      "times_100")


def chains(d: int):
  """(label, rule) for D = d, with c = ceil(0.1·d) slots."""
  c = -(-d // 10)
  lap = 2 * GAMMA * c            # Laplace scale b: ε = 2γc/b = 1
  z = accounting.gaussian_noise_multiplier(1.0, 1, 1e-5)
  l2 = GAMMA * c ** 0.5          # L2 bound of c values in [-γ, γ]
  return [
      ("random + clip + Laplace", rules.chain(
          rules.select_random(c), rules.clip(GAMMA), rules.laplace(lap))),
      ("random + clip + Gaussian (δ = 1e-5)", rules.chain(
          rules.select_random(c), rules.clip(GAMMA), rules.gaussian(z * l2))),
      ("random + L2 clip + Gaussian (δ = 1e-5)", rules.chain(
          rules.select_random(c), rules.l2_clip(GAMMA),
          rules.gaussian(z * GAMMA))),
      ("SVT (ε = 1, τ = γ/2)", rules.svt(c, 1.0, GAMMA, GAMMA / 2)),
      ("random + clip + x100 declared as identity + Laplace", rules.chain(
          rules.select_random(c), rules.clip(GAMMA), _times_100(),
          rules.laplace(lap))),
      ("largest + clip + Laplace (no guarantee)", rules.chain(
          rules.select_largest(c), rules.clip(GAMMA), rules.laplace(lap))),
      ("random + clip, no noise (no guarantee)", rules.chain(
          rules.select_random(c), rules.clip(GAMMA))),
  ]


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--num_params", default="10,1000")
  p.add_argument("--trials", type=int, default=200_000)
  p.add_argument("--pilot_trials", type=int, default=20_000)
  p.add_argument("--confidence", type=float, default=0.95)
  a = p.parse_args()
  print(f"| D | chain | claimed ε per upload | measured ε ≥ "
        f"({a.confidence:.0%}) | inputs, score | TPR at 1% FPR | AUC | "
        "time |")
  print("|---:|---|---:|---:|---|---:|---:|---:|")
  for d in (int(x) for x in a.num_params.split(",")):
    for label, rule in chains(d):
      t0 = time.time()
      res = mechanism_audit.audit_rule(rule, d, trials=a.trials,
                                       pilot_trials=a.pilot_trials,
                                       confidence=a.confidence)
      took = time.time() - t0
      claim = ("none" if res.claim_epsilon is None else
               f"{res.claim_epsilon:.3g}")
      flag = "" if res.consistent else " **exceeds**"
      print(f"| {d:,} | {label} | {claim} | {res.epsilon_lower:.2f}{flag} | "
            f"{res.pair}, {res.score} | {res.tpr_at_1pct_fpr:.3f} | "
            f"{res.auc:.3f} | {took:.0f} s |", flush=True)
  print(f"\n{a.trials:,} fresh runs per input, {a.pilot_trials:,} pilot runs "
        "per input per pair.")


if __name__ == "__main__":
  main()
