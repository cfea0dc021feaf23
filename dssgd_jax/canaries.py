r"""Canaries for the end-to-end audit of what the server sees.

The mechanism audit (:mod:`dssgd_jax.mechanism_audit`) checks one upload rule
in isolation. This module checks a whole run, as the server observes it, with
the one-run audit of Steinke, Nasr and Jagielski (*Privacy auditing with one
(1) training run*, NeurIPS 2023): m canaries are drawn before training, each
included independently with probability ½; after training each canary gets a
score computed only from what the server received; the more the included
canaries' scores stand out, the larger the ε lower bound
(``jax_privacy.auditing.CanaryScoreAuditor.epsilon_one_run``).

**The canaries are gradient-space (Dirac) canaries.** Canary k belongs to
participant ``owner[k]`` (canaries are dealt round-robin over the
participants), sits at its own parameter entry ``index[k]`` (distinct
entries, uniformly drawn) with a random ``sign[k]``, and, when included, adds
``sign[k] · a`` to that entry of its owner's update Δw in every epoch, as if
an example of the owner's data pushed that entry, before the upload rule sees
Δw (:func:`dssgd_jax.participant.make_update`). ``a`` is ``--canary_scale``,
by default the L∞ bound the upload rule declares (γ: the most one entry can
say), or, for a rule that bounds nothing, the largest |Δw| entry of the
owner's own update that epoch (so a canary is among the entries a ``largest``
selection would send). An excluded canary adds nothing.

**The score** of canary k is ``sign[k]`` times the sum, over epochs, of the
value its owner's upload carried at ``index[k]`` as the server received it
(0 when that entry was not sent, or the upload was lost): what an attacker at
the server can compute, knowing the canaries' design but not which were
included (:func:`observe`).

**Why the bound must stay below the claim.** The claim is participant-level:
it covers any change of one participant's data, and so any change of its
update Δw, which is all a canary is. Each canary's inclusion is such a change
(with the other canaries fixed), so the whole run is ε-DP with respect to
each canary, with ε the run's claimed total; Steinke et al.'s bound then
never exceeds it except with the stated probability. Canaries spend entries
of the model on the audit: they cost some accuracy (reported beside the
bound).

>>> c = draw(6, num_participants=3, num_params=10, seed=0)
>>> c.owner.tolist(), len(set(c.index.tolist()))
([0, 1, 2, 0, 1, 2], 6)
>>> vectors(c, 3, 10).shape
(3, 10)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dssgd_jax.selection import Upload

_SALT = 0xCA4A


class Canaries(NamedTuple):
  """The canaries of a run (host arrays of shape (m,)).

  Attributes:
    owner: the participant whose update each canary enters.
    index: its parameter entry (distinct over canaries).
    sign: +1 or -1.
    included: whether it is in the run (probability ½ each).
  """
  owner: np.ndarray
  index: np.ndarray
  sign: np.ndarray
  included: np.ndarray


def draw(num_canaries: int, num_participants: int, num_params: int,
         seed: int) -> Canaries:
  """The canaries of a run with ``seed`` (its own stream of numbers, so
  the run's other random draws do not change with ``num_canaries``)."""
  m, d = int(num_canaries), int(num_params)
  if m > d:
    raise ValueError(f"{m} canaries need {m} distinct entries; the model has "
                     f"{d}")
  rng = np.random.default_rng((int(seed), _SALT))
  return Canaries(
      owner=(np.arange(m) % int(num_participants)).astype(np.int32),
      index=rng.choice(d, m, replace=False).astype(np.int32),
      sign=rng.choice(np.array([-1.0, 1.0], np.float32), m),
      included=rng.random(m) < 0.5)


def vectors(canaries: Canaries, num_participants: int, num_params: int
            ) -> np.ndarray:
  """(P, D) float32: each participant's included canaries as ±1 entries
  (the direction each epoch's canary update takes)."""
  out = np.zeros((int(num_participants), int(num_params)), np.float32)
  inc = canaries.included
  out[canaries.owner[inc], canaries.index[inc]] = canaries.sign[inc]
  return out


def observe(received: Upload, owner: jax.Array, index: jax.Array,
            sign: jax.Array) -> jax.Array:
  """(m,) each canary's observation in one epoch: ``sign`` times the value
  its owner's received upload carries at its entry (0 if absent).

  Args:
    received: (P, c) the uploads as the server received them (lost ones
      masked).
    owner, index, sign: the canaries' design (m,).
  """
  idx = received.indices[owner]          # (m, c)
  vals = jnp.where(received.mask, received.values, 0.0)[owner]
  hit = (idx == index[:, None]) & received.mask[owner]
  return sign * jnp.sum(jnp.where(hit, vals, 0.0), axis=-1)


def audit(scores: np.ndarray, included: np.ndarray, *, delta: float = 1e-6,
          confidence: float = 0.95) -> dict:
  """The one-run audit of canary scores (``jax_privacy.auditing``).

  Args:
    scores: (m,) canary scores (higher: more likely included).
    included: (m,) which canaries were in the run.
    delta: δ of the tested (ε, δ) hypothesis (for a pure-ε claim any δ > 0
      gives a valid, slightly smaller bound).
    confidence: one minus the significance.

  Returns:
    ``epsilon_lower`` (Steinke–Nasr–Jagielski one-run bound, thresholds
    Bonferroni-corrected), ``tpr_at_1pct_fpr``, ``auc``, ``num_canaries``,
    ``num_included``, ``confidence``, ``delta``.
  """
  from jax_privacy import auditing  # pylint: disable=g-import-not-at-top
  scores = np.asarray(scores, np.float64)
  included = np.asarray(included, bool)
  out = {"num_canaries": int(scores.size),
         "num_included": int(included.sum()), "confidence": confidence,
         "delta": delta}
  if included.all() or not included.any():
    return dict(out, epsilon_lower=0.0, tpr_at_1pct_fpr=None, auc=None)
  auditor = auditing.CanaryScoreAuditor(scores[included], scores[~included])
  out.update(
      epsilon_lower=float(auditor.epsilon_one_run(1.0 - confidence, delta)),
      tpr_at_1pct_fpr=float(auditor.tpr_at_given_fpr(0.01)),
      auc=float(auditor.attack_auroc()))
  return out
