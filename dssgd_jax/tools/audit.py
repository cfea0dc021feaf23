r"""Measured privacy of a finished run: the end-to-end canary audit and
membership-inference audits, each saying which model it is about.

Shokri & Shmatikov (CCS 2015) argue that DSSGD protects each participant's
training data because only a small fraction θu of each parameter update leaves
the participant, optionally bounded and noised with the sparse vector
technique (SPEC section 3, "DP mode"). A differential-privacy ε bounds what any
attacker can learn, but the bound is often vacuous (ε = 10 per epoch over 20
epochs is ε = 200 by basic composition), and a claim is only as good as the
code behind it. This module *measures*, and says of every figure which model
or release it is about and whether the run's claim covers it:

* **What the server received** (covered by the claim). A run started with
  ``--canaries=M`` inserted M gradient-space canaries into the participants'
  updates, each with probability ½ (:mod:`dssgd_jax.canaries`), and scored
  them from the uploads the server received. The one-run audit of Steinke,
  Nasr and Jagielski (NeurIPS 2023; ``jax_privacy.auditing``) turns the
  scores into a one-sided ε lower bound at 95% confidence, printed beside the
  claimed ε with TPR at 1% FPR and the AUC. The bound must never exceed the
  claim.
* **The server's global model** (covered by the claim: it is computed from
  the uploads): membership inference with all participants' training
  examples as members.
* **Each participant's own model** (covered by no claim: it never leaves its
  participant): membership inference, members = its own training examples,
  non-members = held-out test examples.

Usage::

  python -m dssgd_jax.audit WORKDIR            # prints the figures and
                                                # writes WORKDIR/audit.json

If ``audit.json`` cannot be written (e.g. a read-only directory) the figures
are still printed, then one ``error:`` line naming the file and the reason,
and the exit status is 2.

Attacks (the score is higher for "more likely a member"):

* ``loss`` — the loss-threshold attack of Yeom et al., "Privacy Risk in Machine
  Learning: Analyzing the Connection to Overfitting" (CSF 2018):
  score = −loss(target model, example). Needs nothing but the target model.
* ``margin`` — the confidence margin z_y − max_{k≠y} z_k of the target model's
  logits (no reference models).
* ``calibrated`` — per-example difficulty calibration with reference models
  (Watson et al., ICLR 2022; the offline, global-variance form of LiRA, Carlini
  et al., IEEE S&P 2022): score = (φ_target − mean_ref φ_ref) / σ, where
  φ = log p_y − log(1 − p_y) is the logit-scaled confidence and σ the standard
  deviation of φ over the reference models, pooled over examples. In DSSGD the
  references come for free: participant j's local model never trained on
  participant i's examples, so the other participants' final models are
  reference ("out") models for participant i's members and for the held-out
  non-members alike. With sharing (θu > 0, θd > 0) the references do contain
  i's *shared* contribution through the server; calibration then cancels that
  common part and isolates what i's own last local epochs add. Not available
  for ``centralized`` (one model, no references).

Members and non-members: participant i's members are its n private training
examples (the run's partition, rebuilt deterministically from its config);
its non-members are n examples of the test split drawn with a fixed seed
(``numpy.random.default_rng((seed, i))``), never trained on by anyone. For
``centralized`` the one model's members are all N·n training examples. When
the test split has fewer examples than there are members, members are
subsampled (same seed) to the size of the test split, so both sets always
have the same size.

Figures per attack: the exact ROC AUC (Mann–Whitney U with average ranks for
ties) and the membership advantage of Yeom et al., max over thresholds of
TPR − FPR. Both are computed on the audit examples themselves, so the
advantage uses the best threshold in hindsight (an upper bound on what an
attacker who must pick the threshold in advance achieves). With m members and
m non-members an AUC measured on a model that leaks nothing has standard error
about sqrt((2m + 1) / (12 m²)) (Hanley & McNeil 1982), reported as
``chance_auc_se``; its hindsight advantage is not 0 but roughly 0.85/sqrt(m)
(0.08 for m = 100), reported as ``chance_advantage``.

The core is importable and pure: :func:`per_example_stats`,
:func:`membership_scores`, :func:`attack_metrics` and :func:`audit_models`
work on arrays; :func:`audit_run` reads a work directory.
"""

import dataclasses
import json
import math
import os
import sys
from typing import Callable, Sequence

from dssgd_jax.tools import cli

with cli.exit_on_interrupt(__name__ == "__main__"):  # Ctrl-C while starting
  import jax
  import jax.numpy as jnp
  import numpy as np

  from dssgd_jax import _io
  from dssgd_jax.errors import UserError
  from dssgd_jax.run import build

AUDIT_FILE = "audit.json"
ATTACKS = ("loss", "margin", "calibrated")
# Attacks that need reference models that did not train on the example.
REFERENCE_ATTACKS = ("calibrated",)

# Examples in flight per jitted call, summed over models (bounds memory).
_EXAMPLES_PER_CALL = 4096


class AuditError(UserError):
  """The work directory cannot be audited (missing, unfinished, unreadable)."""


# ----------------------------------------------------------------------------
# Per-example statistics of a model.


def per_example_stats(logits: jax.Array, labels: jax.Array
                      ) -> dict[str, jax.Array]:
  """Per-example loss, logit-scaled confidence and margin from logits.

  Args:
    logits: (..., K) model outputs.
    labels: (...) integer labels.

  Returns:
    dict of arrays shaped like ``labels``:
      ``logit_conf`` φ = log p_y − log(1 − p_y) = z_y − logsumexp_{k≠y} z_k;
      ``loss`` the cross-entropy −log p_y, computed as softplus(−φ) so that
      it does not round to 0 for well-fit examples (it is exact, and keeps the
      ranking of very small losses);
      ``margin`` z_y − max_{k≠y} z_k.

  >>> s = per_example_stats(jnp.array([[2., 0., 0.]]), jnp.array([0]))
  >>> round(float(s["loss"][0]), 4), float(s["margin"][0])
  (0.2395, 2.0)
  """
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  onehot = jax.nn.one_hot(labels, num_classes, dtype=bool)
  z_y = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
  others = jnp.where(onehot, -jnp.inf, logits)
  logit_conf = z_y - jax.nn.logsumexp(others, axis=-1)
  return {
      "logit_conf": logit_conf,
      "loss": jax.nn.softplus(-logit_conf),
      "margin": z_y - jnp.max(others, axis=-1),
  }


def make_stats_fn(apply_fn: Callable, unravel: Callable) -> Callable:
  """Builds ``stats(flat_stack (P, D), images, labels, own=None) -> dict of
  (P, T)``.

  Every model of the stack is applied to every example (``vmap`` over the
  model axis, fixed-size chunks over examples, one compilation per chunk
  shape). With ``own = (shift, scale)``, each (P, C), model p sees the
  images standardized with its own statistics (as the run evaluates it).
  """

  @jax.jit
  def chunk_stats(flat_stack, images, labels, shift, scale):
    def one(f, sh, sc):
      x = images if sh is None else (images - sh) * sc
      return apply_fn(unravel(f), x)
    logits = jax.vmap(one)(flat_stack, shift, scale)
    return per_example_stats(logits, labels[None])

  def stats(flat_stack, images, labels, own=None):
    shift, scale = (None, None) if own is None else (
        jnp.asarray(own[0]), jnp.asarray(own[1]))
    flat_stack = jnp.asarray(flat_stack)
    num_models, num = flat_stack.shape[0], int(images.shape[0])
    chunk = min(num, max(16, _EXAMPLES_PER_CALL // max(num_models, 1)))
    out = {k: [] for k in ("logit_conf", "loss", "margin")}
    for start in range(0, num, chunk):
      x = np.asarray(images[start:start + chunk])
      y = np.asarray(labels[start:start + chunk])
      valid = x.shape[0]
      if valid < chunk:  # pad to the one compiled shape
        x = np.concatenate([x, np.zeros((chunk - valid,) + x.shape[1:],
                                        x.dtype)])
        y = np.concatenate([y, np.zeros((chunk - valid,), y.dtype)])
      res = chunk_stats(flat_stack, jnp.asarray(x), jnp.asarray(y), shift,
                        scale)
      for k in out:
        out[k].append(np.asarray(res[k])[:, :valid])
    return {k: np.concatenate(v, axis=1).astype(np.float64)
            for k, v in out.items()}

  return stats


# ----------------------------------------------------------------------------
# Attacks and their figures.


def membership_scores(attack: str, target: dict[str, np.ndarray],
                      references: dict[str, np.ndarray] | None = None,
                      reference_std: float | None = None) -> np.ndarray:
  """Membership scores (higher = more likely a member) of one target model.

  Args:
    attack: one of :data:`ATTACKS`.
    target: :func:`per_example_stats` of the target model, arrays (T,).
    references: for ``calibrated``: stats of R ≥ 1 reference models that did
      not train on any of the T examples, arrays (R, T).
    reference_std: for ``calibrated``: σ, the spread of φ over reference
      models (default: pooled from ``references``; needs R ≥ 2, else 1).

  Returns:
    float64 (T,) scores.

  >>> t = {"loss": np.array([0.1, 2.0]), "margin": np.array([3., -1.])}
  >>> membership_scores("loss", t).tolist()
  [-0.1, -2.0]
  """
  if attack == "loss":
    return -np.asarray(target["loss"], np.float64)
  if attack == "margin":
    return np.asarray(target["margin"], np.float64)
  if attack == "calibrated":
    if references is None or np.asarray(references["logit_conf"]).shape[0] < 1:
      raise ValueError("the calibrated attack needs reference models")
    ref = np.asarray(references["logit_conf"], np.float64)
    if reference_std is None:
      reference_std = pooled_reference_std(ref)
    return (np.asarray(target["logit_conf"], np.float64) - ref.mean(0)) / (
        reference_std)
  raise ValueError(f"unknown attack {attack!r}; one of {ATTACKS}")


def pooled_reference_std(ref_logit_conf: np.ndarray) -> float:
  """σ of φ over reference models, pooled over examples (LiRA's global σ).

  Args:
    ref_logit_conf: (R, T) φ of R reference models on T examples.

  Returns:
    sqrt(mean over examples of the per-example variance), or 1.0 with fewer
    than two references or zero spread (the score is then a plain difference).
  """
  ref = np.asarray(ref_logit_conf, np.float64)
  if ref.shape[0] < 2:
    return 1.0
  std = float(np.sqrt(np.mean(np.var(ref, axis=0, ddof=1))))
  return std if std > 0 and math.isfinite(std) else 1.0


def _pooled_scores(member_scores, nonmember_scores, what: str):
  """(m, n, members' then non-members' scores as one float64 vector);
  ValueError when either side is empty or a score is NaN."""
  pos = np.asarray(member_scores, np.float64).ravel()
  neg = np.asarray(nonmember_scores, np.float64).ravel()
  if pos.size == 0 or neg.size == 0:
    raise ValueError(f"{what} needs at least one member and one non-member")
  scores = np.concatenate([pos, neg])
  if np.isnan(scores).any():
    raise ValueError("membership scores contain NaN")
  return pos.size, neg.size, scores


def exact_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray
              ) -> float:
  """ROC AUC = P(member score > non-member score) + ½ P(tie), exactly.

  Mann–Whitney U with average ranks over tied scores; O((m + n) log(m + n)).

  >>> exact_auc(np.array([1., 2.]), np.array([0., 2.]))
  0.625
  """
  m, n, scores = _pooled_scores(member_scores, nonmember_scores, "AUC")
  _, inverse, counts = np.unique(scores, return_inverse=True,
                                 return_counts=True)
  ends = np.cumsum(counts)                      # 1-based rank of group's last
  average_rank = ends - (counts - 1) / 2.0
  rank_sum = float(np.sum(average_rank[inverse[:m]]))
  return (rank_sum - m * (m + 1) / 2.0) / (m * n)


def max_advantage(member_scores: np.ndarray, nonmember_scores: np.ndarray
                  ) -> float:
  """Yeom et al.'s membership advantage max_t TPR(t) − FPR(t) (≥ 0).

  The attack says "member" when score ≥ t; t ranges over every distinct
  score (and +∞, advantage 0), so tied scores are never split.

  >>> max_advantage(np.array([3., 2.]), np.array([1., 2.5]))
  0.5
  """
  m, n, scores = _pooled_scores(member_scores, nonmember_scores, "advantage")
  is_member = np.concatenate([np.ones(m), np.zeros(n)])
  order = np.argsort(-scores, kind="stable")
  scores, is_member = scores[order], is_member[order]
  tpr = np.cumsum(is_member) / m
  fpr = np.cumsum(1.0 - is_member) / n
  # Only thresholds between distinct scores: the last index of each group.
  last = np.r_[scores[1:] != scores[:-1], True]
  return float(max(0.0, np.max(tpr[last] - fpr[last])))


def attack_metrics(member_scores: np.ndarray, nonmember_scores: np.ndarray
                   ) -> dict[str, float]:
  """AUC and advantage of an attack from its scores on members/non-members.

  Args:
    member_scores: (m,) scores of training examples of the target model.
    nonmember_scores: (n,) scores of examples it never trained on.

  Returns:
    ``{"auc": exact ROC AUC, "advantage": max_t TPR − FPR}``.
  """
  return {"auc": exact_auc(member_scores, nonmember_scores),
          "advantage": max_advantage(member_scores, nonmember_scores)}


def chance_auc_se(num_members: int, num_nonmembers: int) -> float:
  """Standard error of the AUC of a non-leaking attack (Hanley–McNeil)."""
  m, n = num_members, num_nonmembers
  return math.sqrt((m + n + 1) / (12.0 * m * n))


def chance_advantage(num_members: int, num_nonmembers: int,
                     trials: int = 200, seed: int = 0) -> float:
  """Expected hindsight advantage of an attack that learns nothing.

  With scores independent of membership the advantage is still above 0,
  because the threshold is picked with knowledge of the answers.

  For continuous scores the distribution of :func:`max_advantage` under the
  null does not depend on the scores' distribution (it is the one-sided
  two-sample Kolmogorov–Smirnov statistic), so this Monte Carlo estimate with
  uniform scores applies to every attack. About 0.08 for 100 vs 100.
  """
  rng = np.random.default_rng(seed)
  return float(np.mean([
      max_advantage(rng.random(num_members), rng.random(num_nonmembers))
      for _ in range(trials)]))


# ----------------------------------------------------------------------------
# Auditing a stack of models.


def _summarize(values: Sequence[float]) -> dict[str, float]:
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "min": float(v.min()),
          "max": float(v.max())}


def audit_models(stats: dict[str, np.ndarray], members: np.ndarray,
                 nonmembers: np.ndarray, references: Sequence[Sequence[int]]
                 | None = None, attacks: Sequence[str] = ATTACKS) -> dict:
  """Runs the attacks on P models from precomputed per-example statistics.

  Args:
    stats: :func:`per_example_stats` of every model on a pool of T examples,
      arrays (P, T).
    members: (P, m) pool positions of each model's training examples.
    nonmembers: (P, m') pool positions of each model's held-out examples.
    references: for each model, the models (rows of ``stats``) that trained
      on none of its members or non-members; None or empty lists skip the
      reference attacks.
    attacks: which of :data:`ATTACKS` to run.

  Returns:
    ``{attack: {"auc": {mean, min, max}, "advantage": {mean, min, max},
    "per_model": {"auc": [...], "advantage": [...]}}}`` plus
    ``"member_accuracy"`` / ``"nonmember_accuracy"`` ({mean, min, max} of the
    models' accuracy on their audit members and non-members).
  """
  num_models = stats["loss"].shape[0]
  members = np.asarray(members)
  nonmembers = np.asarray(nonmembers)
  out = {}
  for attack in attacks:
    if attack not in ATTACKS:
      raise ValueError(f"unknown attack {attack!r}; one of {ATTACKS}")
    if attack in REFERENCE_ATTACKS and not (
        references and all(len(r) > 0 for r in references)):
      out[attack] = None  # no reference models (e.g. centralized)
      continue
    aucs, advs = [], []
    for i in range(num_models):
      both = np.concatenate([members[i], nonmembers[i]])
      target = {k: v[i, both] for k, v in stats.items()}
      refs = None
      if attack in REFERENCE_ATTACKS:
        refs = {k: v[np.asarray(references[i])][:, both]
                for k, v in stats.items()}
      scores = membership_scores(attack, target, refs)
      m = len(members[i])
      res = attack_metrics(scores[:m], scores[m:])
      aucs.append(res["auc"])
      advs.append(res["advantage"])
    out[attack] = {"auc": _summarize(aucs), "advantage": _summarize(advs),
                   "per_model": {"auc": aucs, "advantage": advs}}
  margin = stats["margin"]
  out["member_accuracy"] = _summarize(
      [np.mean(margin[i, members[i]] > 0) for i in range(num_models)])
  out["nonmember_accuracy"] = _summarize(
      [np.mean(margin[i, nonmembers[i]] > 0) for i in range(num_models)])
  return out


# ----------------------------------------------------------------------------
# Auditing a finished run.


def _read_json(path: str, what: str):
  try:
    with open(path) as f:
      return json.load(f)
  except OSError as e:
    raise AuditError(f"Cannot read {what} {path}: {e.strerror}.") from None
  except json.JSONDecodeError:
    raise AuditError(f"{what.capitalize()} {path} is not valid JSON.") from None


def _last_metrics(workdir: str) -> dict:
  path = os.path.join(workdir, "metrics.jsonl")
  last = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        line = line.strip()
        if line:
          try:
            last = json.loads(line)
          except json.JSONDecodeError:
            break
  return last


def load_run(workdir: str, dataset=None, parts=None, allow_unfinished=False,
             plan=None):
  """(plan, experiment, final state, epoch) of a finished run in ``workdir``.

  Args:
    workdir: the run's work directory.
    dataset, parts: optional preloaded data (see ``experiment.setup``).
    allow_unfinished: accept a checkpoint before the run's last epoch.
    plan: the run's plan, for a plan built by hand (default: built from the
      run's ``config.json``).

  Raises:
    AuditError: no such directory, no config or checkpoint, or the run has
      not reached its last epoch (unless ``allow_unfinished``).
  """
  from dssgd_jax.run import experiment  # pylint: disable=g-import-not-at-top
  if plan is None:
    plan = build.plan(_peek_config(workdir).replace(workdir=workdir))
  else:
    _check_run_dir(workdir)
  ckpt = os.path.join(workdir, experiment.CHECKPOINT)
  exp = experiment.setup(plan, dataset, parts)
  # An unreadable checkpoint raises ConfigError (a UserError) itself.
  state, epoch = experiment.load_checkpoint(ckpt, exp.init_state,
                                            exp.train_key)
  if epoch < plan.epochs and not allow_unfinished:
    raise AuditError(f"The run in {workdir} is unfinished (checkpoint after "
                     f"epoch {epoch} of {plan.epochs}); rerun its command to "
                     "finish it, or pass --allow_unfinished.")
  return plan, exp, state, epoch


def choose_examples(plan_or_cfg, parts: np.ndarray, num_test: int,
                    seed: int = 0, max_examples: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Members (training indices) and non-members (test indices) per model.

  Args:
    plan_or_cfg: the run's plan (or config): ``centralized`` decides the
      model layout.
    parts: (N, n) partition of the training set (rows padded with -1 for
      unequal participants).
    num_test: size of the test split.
    seed: the audit seed.
    max_examples: optional cap on the members (and non-members) per model.

  Returns:
    (members (P, m) training-set indices, nonmembers (P, m) test indices);
    P = 1 and the union of all partitions for ``centralized``, else P = N;
    m is the smallest participant's size (at most the test split's).
  """
  parts = np.asarray(parts)
  centralized = getattr(plan_or_cfg, "algorithm", None) == "centralized"
  rows = [r[r >= 0] for r in parts]
  owned = [np.concatenate(rows)] if centralized else rows
  size = min(min(len(r) for r in owned), num_test)
  if max_examples:
    size = min(size, int(max_examples))
  members, nonmembers = [], []
  for i, mem in enumerate(owned):
    rng = np.random.default_rng((seed, i))
    if size < len(mem):
      mem = np.sort(rng.choice(mem, size, replace=False))
    members.append(mem)
    nonmembers.append(np.sort(rng.choice(num_test, size, replace=False)))
  return np.stack(members), np.stack(nonmembers)


def _example_pool(dataset, members: np.ndarray, nonmembers: np.ndarray):
  """One pool of examples to score: the training examples in use, then the
  test ones, each once.

  Returns:
    (images, labels, positions of ``members`` in the pool, positions of
    ``nonmembers`` in the pool), the positions shaped like the inputs.
  """
  train_pool = np.unique(members)
  test_pool = np.unique(nonmembers)
  images = np.concatenate([np.asarray(dataset.train_images)[train_pool],
                           np.asarray(dataset.test_images)[test_pool]])
  labels = np.concatenate([np.asarray(dataset.train_labels)[train_pool],
                           np.asarray(dataset.test_labels)[test_pool]])
  return (images, labels, np.searchsorted(train_pool, members),
          len(train_pool) + np.searchsorted(test_pool, nonmembers))


CANARY_CONFIDENCE = 0.95


def canary_audit(plan, exp, state, epoch: int,
                 confidence: float = CANARY_CONFIDENCE) -> dict | None:
  """The end-to-end audit of what the server received
  (:mod:`dssgd_jax.canaries`): the one-run ε lower bound beside the claim.

  None when the run had no canaries.
  """
  from dssgd_jax import canaries as canaries_lib  # pylint: disable=g-import-not-at-top
  if exp.canaries is None or state.canary_scores is None:
    return None
  claim = plan.claim(epoch)
  delta = claim.delta if claim.epsilon is not None and claim.delta else 1e-6
  scores = np.asarray(state.canary_scores, np.float64).reshape(
      exp.num_seeds, -1)
  per_seed = [canaries_lib.audit(s, exp.canaries.included, delta=delta,
                                 confidence=confidence) for s in scores]
  out = dict(per_seed[0])
  if exp.num_seeds > 1:
    out["per_seed"] = per_seed
    out["epsilon_lower"] = float(np.mean([p["epsilon_lower"]
                                          for p in per_seed]))
  out.update(
      about="what the server received: every participant's uploads, "
      "scored at the canaries' entries",
      covered_by_claim=True, claim_epsilon=claim.epsilon,
      claim_delta=claim.delta if claim.epsilon is not None else None,
      no_guarantee=claim.reason,
      canary_scale=float(plan.canary_scale) or None,
      consistent=(claim.epsilon is None
                  or out["epsilon_lower"] <= claim.epsilon))
  return out


def audit_run(workdir: str, attacks: Sequence[str] = ATTACKS, seed: int = 0,
              max_examples: int | None = None, allow_unfinished: bool = False,
              write: bool = True, dataset=None, parts=None,
              plan=None) -> dict:
  """The audits of the run in ``workdir``, each saying what it is about.

  * ``canary``: the end-to-end audit of what the server received, when the
    run had canaries (``--canaries``): the one-run ε lower bound, TPR at 1%
    FPR and AUC, beside the run's claimed ε (:func:`canary_audit`). The
    claim covers it: the bound must not exceed the claim.
  * ``attacks``: membership inference against every participant's own
    final model (members: its training examples; non-members: test
    examples). No claim covers these models: they never leave the
    participant.
  * ``server``: the same attacks against the server's global model, which
    the claim covers (it is computed from the uploads), with all
    participants' training examples as members.

  Args:
    workdir: the run's work directory.
    attacks: which of :data:`ATTACKS` to run.
    seed: seed of the non-member (and member subsample) draws.
    max_examples: optional cap on members (= non-members) per model.
    allow_unfinished: audit the last checkpoint of an unfinished run.
    write: write the result to ``workdir/audit.json``.
    dataset, parts: optional preloaded data (as ``experiment.load_data``
      returns them).
    plan: the run's plan, for a plan built by hand.

  Returns:
    A JSON-serializable dict (see :func:`format_report`).

  Raises:
    AuditError: the work directory holds no finished run.
  """
  from dssgd_jax.run import data as data_lib  # pylint: disable=g-import-not-at-top
  from dssgd_jax.run import experiment  # pylint: disable=g-import-not-at-top
  if plan is None:
    plan = build.plan(_peek_config(workdir).replace(workdir=workdir))
  else:
    _check_run_dir(workdir)
  if dataset is None:
    dataset, parts = experiment.load_data(plan)
  plan, exp, state, epoch = load_run(workdir, dataset, parts,
                                     allow_unfinished, plan)
  num_seeds = exp.num_seeds
  num_test = len(dataset.test_labels)
  # With --num_seeds the S runs' models are audited together (S x P models,
  # in seed order); a model's references are the other participants of its
  # own run, which trained on none of its members or non-members.
  seed_parts = data_lib.seed_partitions(plan.data, dataset.train_labels,
                                        np.asarray(parts), num_seeds)
  chosen = [choose_examples(plan, p, num_test, seed, max_examples)
            for p in seed_parts]
  members = np.concatenate([m for m, _ in chosen])
  nonmembers = np.concatenate([n for _, n in chosen])
  per_run = chosen[0][0].shape[0]
  num_models = members.shape[0]

  pool_images, pool_labels, mem_pos, non_pos = _example_pool(
      dataset, members, nonmembers)

  stats_fn = make_stats_fn(exp.model.apply, exp.unravel)
  own = None
  if data_lib.standardizes(plan.data):  # each model's own statistics
    layouts = [data_lib.layout(plan.data, dataset, p) for p in seed_parts]
    own = tuple(np.concatenate([getattr(l.stats, f) for l in layouts])
                for f in ("shift", "scale"))
  local = np.asarray(state.protocol.local.params)
  local = local.reshape((-1,) + local.shape[-1:])
  stats = stats_fn(local, pool_images, pool_labels, own)
  references = [[j for j in range(i - i % per_run, i - i % per_run + per_run)
                 if j != i] for i in range(num_models)]
  result_attacks = audit_models(stats, mem_pos, non_pos, references, attacks)

  server = None
  if exp.shares and plan.algorithm != "centralized":
    # The global model trained (through uploads) on every participant's data.
    s_chosen = [choose_examples(dataclasses.replace(
        plan, algorithm="centralized"), p, num_test, seed, max_examples)
                for p in seed_parts]
    s_members = np.concatenate([m for m, _ in s_chosen])
    s_nonmembers = np.concatenate([n for _, n in s_chosen])
    s_images, s_labels, s_mem_pos, s_non_pos = _example_pool(
        dataset, s_members, s_nonmembers)
    server_params = np.asarray(state.protocol.server.params).reshape(
        num_seeds, -1)
    server_own = None
    if own is not None:  # the server standardizes with the test split's
      (_,), (shift, scale) = data_lib.standardize_own(
          data_lib.evaluation_split(plan.data, dataset)[0])
      server_own = (np.tile(shift, (num_seeds, 1)),
                    np.tile(scale, (num_seeds, 1)))
    s_stats = stats_fn(server_params, s_images, s_labels, server_own)
    server = audit_models(
        s_stats, s_mem_pos, s_non_pos, None,
        [a for a in attacks if a not in REFERENCE_ATTACKS])
    server["num_members"] = int(s_members.shape[1])
    server.update(about="the server's global model (what every participant "
                  "downloads)", covered_by_claim=True)

  last = _last_metrics(workdir)
  m = int(members.shape[1])
  cfg = plan.config
  claim = plan.claim(epoch)
  result = {
      "workdir": workdir,
      "algorithm": plan.algorithm,
      "name": plan.name or None,
      "dataset": plan.data.dataset,
      "model": plan.model,
      "num_participants": plan.data.num_participants,
      "samples_per_participant": plan.data.samples_per_participant,
      "upload_rule": repr(plan.upload_rule),
      "upload_fraction": None if cfg is None else cfg.upload_fraction,
      "noise": None if cfg is None else cfg.noise,
      "epsilon_per_epoch": None if cfg is None else cfg.epsilon,
      "clip_bound": None if cfg is None else cfg.clip_bound,
      "threshold": None if cfg is None else cfg.threshold,
      "download_fraction": None if cfg is None else cfg.download_fraction,
      "num_params": exp.num_params,
      "epoch": epoch,
      "epochs": plan.epochs,
      "participant_accuracy_mean": last.get("participant_accuracy_mean"),
      "server_accuracy": last.get("server_accuracy"),
      "epsilon_spent": claim.epsilon,
      "delta_spent": claim.delta if claim.epsilon is not None else None,
      "no_guarantee": claim.reason,
      "audit_seed": seed,
      "num_models": num_models,
      "num_seeds": num_seeds,
      "num_members": m,
      "num_nonmembers": int(nonmembers.shape[1]),
      "chance_auc_se": chance_auc_se(m, int(nonmembers.shape[1])),
      "chance_advantage": chance_advantage(m, int(nonmembers.shape[1])),
      "reference_models": ("other participants' final models"
                           if num_models > 1 else None),
      "canary": canary_audit(plan, exp, state, epoch),
      "participant_models": {
          "about": "each participant's own final model" if
                   plan.algorithm != "centralized" else
                   "the one centralized model",
          "covered_by_claim": False},
      "attacks": result_attacks,
      "server": server,
  }
  if write:
    write_result(workdir, result)
  return result


def write_result(workdir: str, result: dict) -> str:
  """Writes an :func:`audit_run` result to ``workdir/audit.json``.

  The JSON goes to ``audit.json.tmp`` first and replaces ``audit.json`` only
  once complete, so a failed write leaves a previous ``audit.json`` as it was.

  Returns:
    The path written.

  Raises:
    AuditError: the file cannot be written (its path and the reason).
  """
  return _io.write_text(os.path.join(workdir, AUDIT_FILE),
                        json.dumps(result, indent=2), AuditError)


def _check_run_dir(workdir: str) -> None:
  """Raises AuditError unless ``workdir`` holds a run's config and
  checkpoint."""
  from dssgd_jax.run import experiment  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(workdir):
    raise AuditError(f"{workdir} is not a directory; pass the --workdir of a "
                     "finished run.")
  cfg_path = os.path.join(workdir, experiment.CONFIG)
  if not os.path.exists(cfg_path):
    raise AuditError(f"{workdir} holds no {experiment.CONFIG}; pass the "
                     "--workdir of a finished run.")
  if not os.path.exists(os.path.join(workdir, experiment.CHECKPOINT)):
    raise AuditError(f"{workdir} holds no {experiment.CHECKPOINT}: the run "
                     "has not finished an epoch; run it to the end first.")


def _peek_config(workdir: str):
  """The validated config of ``workdir``, checking the run is auditable."""
  from dssgd_jax.run import config as config_lib  # pylint: disable=g-import-not-at-top
  from dssgd_jax.run import experiment  # pylint: disable=g-import-not-at-top
  _check_run_dir(workdir)
  cfg_path = os.path.join(workdir, experiment.CONFIG)
  data = _read_json(cfg_path, "config")
  if "dataset" not in data or ("plan" in data and "upload_fraction" not in
                               data):
    raise AuditError(f"{workdir} holds the run of a plan built by hand; "
                     "audit it from Python with audit_run(workdir, "
                     "plan=plan).")
  return build.validate(config_lib.Config.from_dict(data))


# ----------------------------------------------------------------------------
# Report.


def _claim_text(result: dict) -> str:
  eps = result.get("epsilon_spent")
  if eps is None:
    return ("none: " + (result.get("no_guarantee") or "no guarantee")
            ).rstrip(".")
  delta = result.get("delta_spent")
  return f"ε = {eps:.4g}" + (f", δ = {delta:g}" if delta else "")


def format_report(result: dict) -> str:
  """A plain-text report of an :func:`audit_run` result: each block says
  which model or release it is about and whether the run's claim covers
  it."""
  def f(x, fmt="{:.4f}"):
    return "n/a" if x is None else fmt.format(x)

  lines = [
      f"Audit of {result['workdir']} ({result['algorithm']}, "
      f"{result['dataset']}/{result['model']}, epoch {result['epoch']}/"
      f"{result['epochs']}); participant accuracy "
      f"{f(result['participant_accuracy_mean'])}",
      f"  The run's privacy claim per participant: {_claim_text(result)}.",
  ]
  can = result.get("canary")
  if can is not None:
    lines.append(
        f"  What the server received ({can['num_canaries']} canaries, "
        f"{can['num_included']} included; covered by the claim): measured "
        f"ε ≥ {can['epsilon_lower']:.3f} at {can['confidence']:.0%} "
        f"confidence (one-run audit, δ = {can['delta']:g}), TPR at 1% FPR "
        f"{f(can['tpr_at_1pct_fpr'])}, AUC {f(can['auc'])}"
        + ("" if can.get("consistent", True) else
           "  EXCEEDS THE CLAIM"))
  else:
    lines.append("  What the server received: not audited (run with "
                 "--canaries=M for the end-to-end audit).")
  lines.append(
      f"  Membership inference, {result['num_members']} members and "
      f"{result['num_nonmembers']} non-members per model (audit seed "
      f"{result['audit_seed']}; at chance a model's AUC is 0.5 ± "
      f"{result['chance_auc_se']:.3f} and its advantage about "
      f"{result['chance_advantage']:.3f}):")
  att = result["attacks"]
  about = (result.get("participant_models") or {}).get(
      "about", "each participant's own final model")
  lines.append(
      f"  {about} ({result['num_models']} model(s)"
      + (f", {result['num_seeds']} seeds" if result.get("num_seeds", 1) > 1
         else "")
      + "; no claim covers it: it never leaves its participant): accuracy on "
      f"audit members {att['member_accuracy']['mean']:.4f}, non-members "
      f"{att['nonmember_accuracy']['mean']:.4f}")
  lines.append(f"  {'attack':<11} {'AUC mean':>9} {'min':>7} {'max':>7}   "
               f"{'adv. mean':>9} {'min':>7} {'max':>7}")

  def rows(block, prefix=""):
    for name in ATTACKS:
      if name not in block:
        continue
      r = block[name]
      if r is None:
        lines.append(f"  {prefix + name:<11} n/a (no reference models)")
        continue
      a, v = r["auc"], r["advantage"]
      lines.append(f"  {prefix + name:<11} {a['mean']:>9.4f} {a['min']:>7.4f} "
                   f"{a['max']:>7.4f}   {v['mean']:>9.4f} {v['min']:>7.4f} "
                   f"{v['max']:>7.4f}")

  rows(att)
  if result.get("server"):
    lines.append(f"  the server's global model (members: "
                 f"{result['server']['num_members']} training examples of all "
                 "participants; covered by the claim):")
    rows(result["server"], prefix="")
  return "\n".join(lines)


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  if "audit_seed" in flags.FLAGS:
    return
  flags.DEFINE_integer("audit_seed", 0, "Seed of the non-member draws.")
  flags.DEFINE_integer("max_examples", 0, "Cap on members (= non-members) "
                       "per model (0 = all of the participant's examples).")
  flags.DEFINE_list("attacks", list(ATTACKS), "Attacks to run: "
                    f"{', '.join(ATTACKS)}.")
  flags.DEFINE_boolean("allow_unfinished", False, "Audit the last "
                       "checkpoint of a run that has not reached its last "
                       "epoch.")


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) != 2:
    cli.fail("Usage: python -m dssgd_jax.audit WORKDIR (the work directory of "
             "a finished run).")
  fv = flags.FLAGS
  bad = [a for a in fv.attacks if a not in ATTACKS]
  if bad:
    cli.fail(f"--attacks={','.join(bad)} is not one of: {', '.join(ATTACKS)}.")
  with cli.user_errors():
    result = audit_run(argv[1], attacks=fv.attacks, seed=fv.audit_seed,
                       max_examples=fv.max_examples or None,
                       allow_unfinished=fv.allow_unfinished, write=False)
  # The report first: when audit.json cannot be written (a read-only
  # directory) what was computed is still shown, then the one-line error.
  print(format_report(result), flush=True)
  with cli.user_errors():
    path = write_result(argv[1], result)
  print(f"Wrote {path}")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  sys.exit(app.run(main, flags_parser=cli.parse_flags))
