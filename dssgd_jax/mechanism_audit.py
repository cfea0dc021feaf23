r"""A measured lower bound on an upload rule's ε: the mechanism audit.

:func:`dssgd_jax.rules.claim` derives a rule's ε from what each rule
*declares* (:meth:`~dssgd_jax.rules.UploadRule.privacy`). A declaration can be
wrong: a rule that multiplies the values by 100 but declares that it changes
nothing keeps a claim of ε = 1 whose truth is 100. This module checks a claim
the only way a claim can be checked from outside: it runs the mechanism many
times on two neighbouring inputs and measures how well an attacker tells them
apart. The result is a one-sided lower bound ε_lb on the rule's ε per upload
(one epoch), at a stated confidence: if the rule were ε-DP with ε < ε_lb,
results this extreme would happen with probability below 1 − confidence. A
correct claim is never below the bound (up to that probability); a wrong one
is caught when the bound exceeds it.

How (:func:`audit_rule`):

1. **Neighbouring inputs.** The unit of privacy is one participant's data set
   replaced by any other (:mod:`dssgd_jax.rules`), so any two updates Δw are
   neighbours; the worst case is the pair the rule tells apart best. The
   audit tries three pairs, each with a magnitude M that saturates every bound
   the rule declares (M = 4 × the largest declared L∞ or L2 bound, 1 when the
   rule declares none), so that a clipped rule sees values at its clip bound
   and a rule that fails to clip sees values far beyond it:

   * ``sign``: Δw = +M·1 against −M·1 — every value moves across its whole
     range (the sensitivity 2γ of ``clip``, 2C of ``l2_clip``);
   * ``magnitude``: M·1 against 0 — what passes a threshold changes (the
     count and choice of a ``select_threshold`` or the SVT);
   * ``support``: M on the first half of the entries and M/2 on the second,
     against the reverse — after clipping to γ ≤ M/2 both give the same
     values, so only *which* entries a data-dependent selection (``largest``)
     picks can tell them apart.

2. **Scores.** An output (indices, values, validity) is read as a dense
   vector r and a presence vector (which entries were sent). From
   ``pilot_trials`` runs of each input the audit estimates, per entry j, how
   often it is sent and its mean value m0_j, m1_j in each world, and forms
   three likelihood-ratio-style scores: ``presence`` (the log-likelihood
   ratio of which entries are sent, entries taken as independent),
   ``laplace`` (Σ 2·clip(r_j, lo_j, hi_j) − lo_j − hi_j over sent entries,
   lo/hi the two means, signed toward the first world: the Laplace
   mechanism's log-likelihood ratio up to scale) and ``gaussian``
   (Σ r_j (m1_j − m0_j): the Gaussian mechanism's). Each score is tried in
   both directions. Every score is a monotone function of each released
   value: it tests the mechanism's distribution, not the bit patterns of its
   float32 samples. (A score that thresholded exact float values found
   ε ≥ 1.29 for a Laplace rule claiming 1: the floating-point attack of
   Mironov 2012, outside the claim as docs/privacy.md says.)

3. **Threshold and bound.** On the pilot runs, the pair, score, direction and
   threshold with the largest Clopper–Pearson bound are chosen. Then
   ``trials`` fresh runs of each input (independent keys) are scored, and
   the bound is ``jax_privacy.auditing.CanaryScoreAuditor``'s
   ``epsilon_clopper_pearson`` at that one threshold (Kairouz et al. 2015,
   Jagielski et al. 2020): ε_lb = ln((TPR_lb − δ) / FPR_ub) with
   Clopper–Pearson bounds at significance (1 − confidence)/2 each. Because
   everything chosen was chosen on the pilot runs, a single hypothesis is
   tested on the fresh runs: no multiple-comparison correction is needed.

TPR at 1% FPR and the AUC of the chosen score on the fresh runs are reported
beside the bound (the same auditor).

>>> import jax
>>> from dssgd_jax import rules
>>> rule = rules.chain(rules.select_random(1), rules.clip(0.01),
...                    rules.laplace(0.02))        # claim: ε = 1 per upload
>>> res = audit_rule(rule, num_params=4, trials=100_000, pilot_trials=20_000)
>>> res.claim_epsilon, 0.7 < res.epsilon_lower <= 1.0
(1.0, True)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dssgd_jax import rules as rules_lib

PAIRS = ("sign", "magnitude", "support")
SCORES = ("presence", "laplace", "gaussian")
# Elements (runs x parameters) per jitted chunk: bounds memory.
_CHUNK_ELEMENTS = 1 << 22


@dataclasses.dataclass(frozen=True)
class RuleAudit:
  """The result of :func:`audit_rule`.

  Attributes:
    rule: the rule's name.
    num_params: D.
    claim_epsilon: the claimed ε of one upload (None: no guarantee).
    claim_delta: its δ (0 for pure ε-DP).
    reason: why there is no guarantee (None when there is one).
    epsilon_lower: the measured one-sided lower bound on ε per upload.
    delta: the δ the bound was computed at (the claim's; 0 without one).
    confidence: the bound holds with this probability.
    pair: the neighbouring inputs chosen (one of :data:`PAIRS`).
    score: the score chosen (one of :data:`SCORES`, ``-`` prefixed when the
      second input is the one guessed).
    threshold: the score threshold (guess "first input" at or above it).
    tpr, fpr: true and false positive rates at the threshold (fresh runs).
    tpr_at_1pct_fpr: the best TPR at FPR 1% over thresholds (fresh runs).
    auc: the score's ROC AUC (fresh runs).
    trials: fresh runs of each input.
    pilot_trials: pilot runs of each input of each pair.
    magnitude: M of the pairs.
  """
  rule: str
  num_params: int
  claim_epsilon: float | None
  claim_delta: float
  reason: str | None
  epsilon_lower: float
  delta: float
  confidence: float
  pair: str
  score: str
  threshold: float
  tpr: float
  fpr: float
  tpr_at_1pct_fpr: float
  auc: float
  trials: int
  pilot_trials: int
  magnitude: float

  @property
  def consistent(self) -> bool:
    """Whether the bound does not exceed the claim (True without a claim:
    no guarantee is consistent with any leakage)."""
    return self.claim_epsilon is None or (
        self.epsilon_lower <= self.claim_epsilon)

  def summary(self) -> str:
    """One line: the claim, the bound and how it was measured."""
    claim = ("no guarantee" if self.claim_epsilon is None else
             f"ε = {self.claim_epsilon:.4g}" + (
                 f", δ = {self.claim_delta:g}" if self.claim_delta else ""))
    verdict = ("" if self.consistent else
               "  EXCEEDS THE CLAIM: the rule's declaration is wrong")
    return (f"{self.rule}: claim per upload {claim}; measured ε ≥ "
            f"{self.epsilon_lower:.3f} at {self.confidence:.0%} confidence "
            f"({self.pair} inputs, {self.score} score, TPR {self.tpr:.4f} at "
            f"FPR {self.fpr:.4f}, TPR at 1% FPR {self.tpr_at_1pct_fpr:.4f}, "
            f"AUC {self.auc:.4f}, {self.trials:,} runs per input){verdict}")


def declared_bounds(rule: rules_lib.UploadRule, num_params: int) -> list[float]:
  """Every L∞ and L2 bound that the parts of ``rule`` declare on the way."""
  bounds = []
  p = rules_lib.Privacy(slots=int(num_params))

  def walk(r, p):
    if r.parts:
      for part in r.parts:
        p = walk(part, p)
      return p
    p = rules_lib.declared_privacy(r, p)
    bounds.extend(b for b in (p.linf, p.l2) if b is not None)
    return p

  walk(rule, p)
  return bounds


def neighbouring_inputs(num_params: int, magnitude: float
                        ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The pairs of :data:`PAIRS` as (first input, second input), float32 (D,).

  >>> {k: (a.tolist(), b.tolist()) for k, (a, b)
  ...  in neighbouring_inputs(2, 1.0).items()}
  {'sign': ([1.0, 1.0], [-1.0, -1.0]), 'magnitude': ([1.0, 1.0], [0.0, 0.0]), 'support': ([1.0, 0.5], [0.5, 1.0])}
  """
  d, m = int(num_params), float(magnitude)
  half = np.arange(d) < max(1, d // 2)
  ones = np.ones(d, np.float32)
  return {
      "sign": (m * ones, -m * ones),
      "magnitude": (m * ones, np.zeros(d, np.float32)),
      "support": (np.where(half, m, m / 2).astype(np.float32),
                  np.where(half, m / 2, m).astype(np.float32)),
  }


def _runner(rule: rules_lib.UploadRule, num_params: int):
  """A jitted ``(delta, keys) -> (values (n, D), present (n, D))``: one run
  of the rule per key, its output as a dense vector and a presence mask."""
  d = int(num_params)

  def one(delta, key):
    up = rule.apply(rules_lib.dense(delta), key)
    vals = jnp.where(up.mask, up.values, 0.0)
    dense = jnp.zeros((d,), jnp.float32).at[up.indices].add(vals)
    present = jnp.zeros((d,), bool).at[up.indices].max(up.mask)
    return dense, present

  return jax.jit(jax.vmap(one, in_axes=(None, 0)))


def _keys(seed_key, n):
  return jax.random.split(seed_key, n)


def _chunk_size(n: int, d: int) -> int:
  return max(16, min(n, 1 << 16, _CHUNK_ELEMENTS // max(d, 1)))


def _batches(run, delta, key, n, d, chunk):
  """The rule's outputs over n runs, ``chunk`` runs per call (one compiled
  shape: the last call is padded and its extra runs dropped)."""
  delta = jnp.asarray(delta)
  for start in range(0, n, chunk):
    vals, present = run(delta, _keys(jax.random.fold_in(key, start), chunk))
    keep = min(chunk, n - start)
    yield vals[:keep], present[:keep]


def _moments(run, delta, key, n, d, chunk):
  """Per entry over n runs: how often it is sent, and the sum of its value."""
  sent = np.zeros(d, np.float64)
  total = np.zeros(d, np.float64)
  for vals, present in _batches(run, delta, key, n, d, chunk):
    sent += np.asarray(jnp.sum(present, axis=0), np.float64)
    total += np.asarray(jnp.sum(vals, axis=0), np.float64)
  return sent, total


@jax.jit
def _score_chunk(vals, present, w_present, w_absent, lo, hi, direction):
  """(n, 3) scores: presence LLR, Laplace-style and Gaussian-style.

  Each is a monotone function of every released value (the Laplace score
  clips each value to the interval between the two worlds' means first), so
  a threshold on it selects values, never bit patterns of float32 samples.
  """
  presence = jnp.sum(jnp.where(present, w_present, w_absent), axis=-1)
  laplace = jnp.sum(jnp.where(
      present, direction * (2.0 * jnp.clip(vals, lo, hi) - lo - hi), 0.0),
      axis=-1)
  gaussian = jnp.sum(jnp.where(present, vals * direction * (hi - lo), 0.0),
                     axis=-1)
  return jnp.stack([presence, laplace, gaussian], axis=-1)


def _scores(run, delta, key, n, d, chunk, weights):
  return np.concatenate([
      np.asarray(_score_chunk(vals, present, *weights), np.float64)
      for vals, present in _batches(run, delta, key, n, d, chunk)])


def _weights(stats1, stats0, n):
  """Score weights from pilot moments (first input = world 1)."""
  (sent1, total1), (sent0, total0) = stats1, stats0
  smooth = 1.0 / (n + 2)
  p1 = (sent1 + smooth) / (n + 2 * smooth)
  p0 = (sent0 + smooth) / (n + 2 * smooth)
  m1 = np.where(sent1 > 0, total1 / np.maximum(sent1, 1), 0.0)
  m0 = np.where(sent0 > 0, total0 / np.maximum(sent0, 1), 0.0)
  w_present = np.log(p1) - np.log(p0)
  w_absent = np.log1p(-p1) - np.log1p(-p0)
  direction = np.where(m1 >= m0, 1.0, -1.0)
  return tuple(jnp.asarray(x, jnp.float32) for x in (
      w_present, w_absent, np.minimum(m0, m1), np.maximum(m0, m1),
      direction))


def _auditing():
  from jax_privacy import auditing  # pylint: disable=g-import-not-at-top
  return auditing


def epsilon_at(in_scores, out_scores, threshold: float, significance: float,
               delta: float) -> float:
  """The Clopper–Pearson ε lower bound of the test "score ≥ threshold"
  (``jax_privacy.auditing``), at one threshold fixed in advance."""
  auditing = _auditing()
  auditor = auditing.CanaryScoreAuditor(in_scores, out_scores)
  return float(auditor.epsilon_clopper_pearson(
      significance, delta, one_sided=True,
      threshold_strategy=auditing.Explicit(float(threshold))))


def _pilot_best(in_scores, out_scores, significance, delta,
                max_thresholds=4096):
  """(ε estimate, threshold) of the best threshold on pilot scores: the
  same Clopper–Pearson bound as :func:`epsilon_at`, for every candidate
  threshold at once (a choice only; the bound is computed on fresh runs)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  ins, outs = np.sort(in_scores), np.sort(out_scores)
  cands = np.unique(np.concatenate([ins, outs]))
  if cands.size > max_thresholds:
    cands = np.unique(np.quantile(cands, np.linspace(0, 1, max_thresholds)))
  tp = ins.size - np.searchsorted(ins, cands, side="left")
  fp = outs.size - np.searchsorted(outs, cands, side="left")
  a = significance / 2
  tpr_lb = np.where(tp > 0, stats.beta.ppf(a, np.maximum(tp, 1),
                                           ins.size - tp + 1), 0.0)
  fpr_ub = np.where(fp < outs.size, stats.beta.ppf(
      1 - a, fp + 1, np.maximum(outs.size - fp, 1)), 1.0)
  with np.errstate(divide="ignore", invalid="ignore"):
    eps = np.where(tpr_lb > delta, np.log(np.maximum(tpr_lb - delta, 1e-300))
                   - np.log(fpr_ub), 0.0)
  i = int(np.argmax(eps))
  return max(0.0, float(eps[i])), float(cands[i])


def audit_rule(rule: rules_lib.UploadRule, num_params: int, *,
               trials: int = 500_000, pilot_trials: int = 100_000,
               confidence: float = 0.95, delta: float | None = None,
               seed: int = 0, magnitude: float | None = None,
               pairs=PAIRS) -> RuleAudit:
  """Measures a lower bound on the ε of one upload of ``rule``.

  Args:
    rule: the upload rule (applied to ``rules.dense(Δw)``, as a participant
      applies it).
    num_params: D.
    trials: fresh runs of each of the two chosen inputs (the bound's sample).
    pilot_trials: runs of each input of each pair to choose the pair, score
      and threshold.
    confidence: the bound holds with this probability (one-sided).
    delta: δ of the test (default: the claim's δ for an (ε, δ) claim, else 0).
    seed: seed of the runs' keys.
    magnitude: M of the inputs (default: 4 × the largest declared bound).
    pairs: which of :data:`PAIRS` to try.

  Returns:
    A :class:`RuleAudit`.
  """
  d = int(num_params)
  claim = rules_lib.claim(rule, d, 1)
  if delta is None:
    delta = claim.delta if claim.epsilon is not None else 0.0
  if magnitude is None:
    bounds = declared_bounds(rule, d)
    magnitude = 4.0 * max(bounds) if bounds else 1.0
  significance = 1.0 - confidence
  run = _runner(rule, d)
  chunk = _chunk_size(min(pilot_trials, trials), d)
  key = jax.random.key(seed)
  inputs = neighbouring_inputs(d, magnitude)
  best = None
  for p, name in enumerate(pairs):
    first, second = inputs[name]
    k1, k0 = (jax.random.fold_in(key, 2 * p), jax.random.fold_in(key, 2 * p + 1))
    stats1 = _moments(run, first, k1, pilot_trials, d, chunk)
    stats0 = _moments(run, second, k0, pilot_trials, d, chunk)
    weights = _weights(stats1, stats0, pilot_trials)
    # Scores on separate pilot runs (fold_in 1), not those the weights saw.
    s1 = _scores(run, first, jax.random.fold_in(k1, 1), pilot_trials, d,
                 chunk, weights)
    s0 = _scores(run, second, jax.random.fold_in(k0, 1), pilot_trials, d,
                 chunk, weights)
    for j, score in enumerate(SCORES):
      for sign, label in ((1.0, score), (-1.0, "-" + score)):
        a, b = (s1[:, j], s0[:, j]) if sign > 0 else (-s0[:, j], -s1[:, j])
        eps, t = _pilot_best(a, b, significance, delta)
        if best is None or eps > best[0]:
          best = (eps, name, j, sign, label, t, weights)
  _, name, j, sign, label, threshold, weights = best
  first, second = inputs[name]
  eval_key = jax.random.fold_in(key, 1_000_003)
  s1 = _scores(run, first, jax.random.fold_in(eval_key, 1), trials, d, chunk,
               weights)[:, j]
  s0 = _scores(run, second, jax.random.fold_in(eval_key, 0), trials, d,
               chunk, weights)[:, j]
  in_scores, out_scores = (s1, s0) if sign > 0 else (-s0, -s1)
  auditing = _auditing()
  auditor = auditing.CanaryScoreAuditor(in_scores, out_scores)
  eps = epsilon_at(in_scores, out_scores, threshold, significance, delta)
  return RuleAudit(
      rule=rule.name, num_params=d, claim_epsilon=claim.epsilon,
      claim_delta=claim.delta, reason=claim.reason, epsilon_lower=eps,
      delta=float(delta), confidence=confidence, pair=name, score=label,
      threshold=float(threshold),
      tpr=float(np.mean(in_scores >= threshold)),
      fpr=float(np.mean(out_scores >= threshold)),
      tpr_at_1pct_fpr=float(auditor.tpr_at_given_fpr(0.01)),
      auc=float(auditor.attack_auroc()), trials=int(trials),
      pilot_trials=int(pilot_trials), magnitude=float(magnitude))
