"""Privacy accounting for the Gaussian mechanism on uploads (``--noise=gaussian``).

SPEC section 3, "Bounding and noise", Gaussian(σ). A participant's upload in
one epoch is treated as one release of the Gaussian mechanism: the vector of
its selected values, L2-clipped to norm C (:func:`dssgd_jax.privacy.l2_clip`,
then optionally bounded elementwise to [-γ, γ], which cannot increase the
norm), plus N(0, σ²) on every entry (:func:`dssgd_jax.privacy.add_noise`).
Over E epochs the participant makes E such releases, each adaptively chosen
(its Δw depends on what it downloaded, which depends on earlier uploads), so
the privacy loss is the E-fold adaptive composition of Gaussian mechanisms,
with sampling probability 1 (every participant uploads every epoch). This
module computes it with Google's ``dp_accounting`` package (Rényi DP, or
privacy loss distributions for a tighter ε).

Unit of privacy (adjacency). Guarantees are *participant-level* (user-level):
two training sets are neighbours if they differ in one participant's whole
data set. Two conventions are supported, and the input is always the noise
multiplier ``z = σ / C``:

* ``adjacency="replace"`` (the default): one participant's data set is
  replaced by an arbitrary other one. Its clipped upload can move from ``v``
  to ``v'`` with ``‖v - v'‖₂ <= 2C``, so the L2 sensitivity is 2C and the
  mechanism is a Gaussian mechanism with noise multiplier ``z / 2``. This is
  the same adjacency as the sparse vector technique of
  :mod:`dssgd_jax.privacy` (Δf = 2γ: a bounded value can move across its whole
  range), so ε from both modes means the same thing.
* ``adjacency="add_remove"``: one participant is added or removed, an absent
  participant counting as one that uploads the zero vector. The sensitivity is
  C and the noise multiplier is ``z`` (the convention of DP-FedAvg, McMahan et
  al. 2018). Its ε is smaller for the same σ; it is *not* comparable with the
  SVT's ε.

Both are passed to ``dp_accounting`` as a ``GaussianDpEvent`` with the
effective noise multiplier (sensitivity 1) under its default add/remove
relation. (``dp_accounting`` itself is inconsistent here: its PLD accountant
doubles the sensitivity under ``REPLACE_ONE`` while its RDP accountant ignores
the relation for Gaussian events, so we never rely on it.) Participant-level
DP implies example-level DP with the same ε and δ (changing one example
changes at most one participant's data set); there is no amplification by
sampling because nothing is subsampled at the participant level.

What is covered and what is not:

* Covered: the values of each upload when the *indices* are chosen
  independently of the data, i.e. ``--selection=random``
  (:func:`dssgd_jax.selection.select_random`, with ``--l2_clip`` set and
  ``--noise=gaussian``), and with θu = 1 (all indices).
* Not covered: ``--selection=largest`` or ``threshold``. Which indices are
  uploaded depends on Δw, hence on the data, and is released without noise;
  the Gaussian noise on the values does not protect it, and no finite ε holds
  for the upload as a whole. Use the sparse vector technique
  (``--noise=svt``, :func:`dssgd_jax.privacy.svt_select`), whose ε covers the
  choice of indices as well as the values.
* Not covered by either mode: anything outside the uploads (the participant's
  final model, evaluation results it publishes, timing).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Sequence

import attr

if TYPE_CHECKING:
  import dp_accounting

# ``dp_accounting`` is imported where it is used, not here: it imports
# scipy.signal, .stats and .optimize (1.4-2 s), which a run without noise
# never needs, and every command imports this module.


@functools.cache
def _pure_dp_event_class() -> type:
  import dp_accounting  # pylint: disable=g-import-not-at-top,redefined-outer-name

  @attr.s(frozen=True)
  class PureDpEvent(dp_accounting.DpEvent):
    """A mechanism that is ε-DP (δ = 0) as a whole, e.g. the sparse vector
    technique's upload. ``dp_accounting`` has no event for a generic pure-ε
    mechanism (its accountants model noise distributions), so this one is
    composed by :func:`compose` with basic composition.

    Attributes:
      epsilon: ε of one release.
    """
    epsilon = attr.ib()

  PureDpEvent.__module__ = __name__
  return PureDpEvent


def __getattr__(name: str):
  """``PureDpEvent`` (a ``dp_accounting.DpEvent``) is made on first use."""
  if name == "PureDpEvent":
    return _pure_dp_event_class()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

ACCOUNTANTS = ("rdp", "pld")
ADJACENCIES = ("replace", "add_remove")


def _check(noise_multiplier: float, epochs: int, delta: float,
           accountant: str, adjacency: str) -> None:
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got "
                     f"{accountant!r}")
  if adjacency not in ADJACENCIES:
    raise ValueError(f"adjacency must be one of {ADJACENCIES}, got "
                     f"{adjacency!r}")
  if not noise_multiplier >= 0:
    raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
  if epochs < 0 or int(epochs) != epochs:
    raise ValueError(f"epochs must be a non-negative integer, got {epochs}")
  if not 0 < delta < 1:
    raise ValueError(f"delta must be in (0, 1), got {delta}")


def sensitivity_factor(adjacency: str = "replace") -> float:
  """L2 sensitivity of one clipped upload in units of the clip bound C.

  >>> sensitivity_factor("replace"), sensitivity_factor("add_remove")
  (2.0, 1.0)
  """
  if adjacency not in ADJACENCIES:
    raise ValueError(f"adjacency must be one of {ADJACENCIES}, got "
                     f"{adjacency!r}")
  return 2.0 if adjacency == "replace" else 1.0


def gaussian_event(noise_multiplier: float, epochs: int,
                   adjacency: str = "replace") -> dp_accounting.DpEvent:
  """The ``dp_accounting`` event of ``epochs`` uploads of one participant.

  Args:
    noise_multiplier: σ / C, the Gaussian noise standard deviation over the
      L2 clip bound of the upload.
    epochs: E, one release per epoch (sampling probability 1).
    adjacency: ``replace`` (sensitivity 2C) or ``add_remove`` (sensitivity C).

  Returns:
    ``SelfComposedDpEvent(GaussianDpEvent(z / factor), E)`` with the effective
    (sensitivity-1) noise multiplier.

  >>> gaussian_event(2.0, 3)
  SelfComposedDpEvent(event=GaussianDpEvent(noise_multiplier=1.0), count=3)
  """
  import dp_accounting  # pylint: disable=g-import-not-at-top,redefined-outer-name
  effective = noise_multiplier / sensitivity_factor(adjacency)
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(effective), int(epochs))


def _pld_interval(effective: float, epochs: int) -> float:
  """PLD discretisation: 1e-4, coarser for weak noise (bounded cost).

  The composed mechanism is Gaussian with std ``effective/sqrt(epochs)``;
  below 0.5 its privacy loss range grows like ``1/std²`` and so would the
  PLD's size. Coarsening keeps the (pessimistic, hence still valid) estimate
  to well under a second; the relative error in ε stays below 1e-4.
  """
  std = effective / math.sqrt(epochs)
  return 1e-4 * max(1.0, (0.5 / std) ** 2)


def _epsilon(noise_multiplier, epochs, delta, accountant, adjacency):
  import dp_accounting  # pylint: disable=g-import-not-at-top,redefined-outer-name
  if epochs == 0:
    return 0.0
  if noise_multiplier == 0:
    return math.inf
  event = gaussian_event(noise_multiplier, epochs, adjacency)
  if accountant == "rdp":
    acc = dp_accounting.rdp.RdpAccountant()
  else:
    acc = dp_accounting.pld.PLDAccountant(
        value_discretization_interval=_pld_interval(
            event.event.noise_multiplier, epochs))
  acc.compose(event)
  return float(acc.get_epsilon(delta))


def gaussian_epsilon(noise_multiplier: float, epochs: int, delta: float,
                     accountant: str = "rdp",
                     adjacency: str = "replace") -> float:
  """(ε, δ)-DP ε per participant after ``epochs`` Gaussian uploads.

  Args:
    noise_multiplier: z = σ / C (σ the noise std, C the upload's L2 bound).
    epochs: number of epochs E (one upload each); 0 gives ε = 0.
    delta: δ in (0, 1).
    accountant: ``rdp`` (Rényi DP, ``dp_accounting.rdp.RdpAccountant``) or
      ``pld`` (privacy loss distributions, ``dp_accounting.pld.PLDAccountant``:
      tighter, slower; discretised at 1e-4, coarser for very weak noise).
    adjacency: ``replace`` (default; the SVT's adjacency) or ``add_remove``;
      see the module docstring.

  Returns:
    ε (``inf`` when the noise multiplier is 0).

  >>> round(gaussian_epsilon(2.0, 10, 1e-5), 2)
  19.05
  >>> round(gaussian_epsilon(2.0, 10, 1e-5, adjacency="add_remove"), 2)
  8.08
  >>> round(gaussian_epsilon(2.0, 10, 1e-5, accountant="pld"), 2)
  17.86
  """
  _check(noise_multiplier, epochs, delta, accountant, adjacency)
  return _epsilon(noise_multiplier, epochs, delta, accountant, adjacency)


def gaussian_epsilons(noise_multiplier: float, num_epochs: int, delta: float,
                      accountant: str = "rdp",
                      adjacency: str = "replace") -> list[float]:
  """ε after each of epochs 1..``num_epochs`` (see :func:`gaussian_epsilon`).

  >>> [round(e, 2) for e in gaussian_epsilons(4.0, 3, 1e-5)]
  [2.17, 3.19, 4.01]
  """
  _check(noise_multiplier, num_epochs, delta, accountant, adjacency)
  return [_epsilon(noise_multiplier, e, delta, accountant, adjacency)
          for e in range(1, int(num_epochs) + 1)]


def gaussian_noise_multiplier(target_epsilon: float, epochs: int,
                              delta: float, accountant: str = "rdp",
                              adjacency: str = "replace",
                              rtol: float = 1e-3) -> float:
  """About the smallest z = σ / C whose ε after ``epochs`` is <= the target.

  Bisection on z to a relative tolerance ``rtol``; the returned z always
  meets the target. For ``pld`` the bracket starts from the RDP answer (RDP
  is looser, so its z is enough).

  >>> z = gaussian_noise_multiplier(8.0, 10, 1e-5)
  >>> gaussian_epsilon(z, 10, 1e-5) <= 8.0
  True
  """
  _check(1.0, epochs, delta, accountant, adjacency)
  if not target_epsilon > 0:
    raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
  if epochs == 0:
    return 0.0
  eps = lambda z, acc: _epsilon(z, epochs, delta, acc, adjacency)
  hi = 1.0
  while eps(hi, "rdp") > target_epsilon:
    hi *= 2.0
  lo = hi / 2.0
  if accountant == "pld":
    while eps(lo, "pld") <= target_epsilon and lo > 1e-6:
      hi, lo = lo, lo / 2.0
  else:
    while eps(lo, "rdp") <= target_epsilon and lo > 1e-6:
      hi, lo = lo, lo / 2.0
  while hi - lo > rtol * hi:
    mid = 0.5 * (lo + hi)
    if eps(mid, accountant) <= target_epsilon:
      hi = mid
    else:
      lo = mid
  return hi


def epsilon_table(noise_multipliers: Sequence[float], epochs: int,
                  delta: float, adjacency: str = "replace") -> list[dict]:
  """ε by both accountants for several noise multipliers (for reports).

  >>> rows = epsilon_table([1.0, 4.0], 5, 1e-5)
  >>> [sorted(r) for r in rows][0]
  ['epochs', 'noise_multiplier', 'pld', 'rdp']
  """
  return [{"noise_multiplier": float(z), "epochs": int(epochs),
           "rdp": gaussian_epsilon(z, epochs, delta, "rdp", adjacency),
           "pld": gaussian_epsilon(z, epochs, delta, "pld", adjacency)}
          for z in noise_multipliers]


def compose(event: dp_accounting.DpEvent, epochs: int, delta: float
            ) -> tuple[float, float]:
  """(ε, δ) per participant after ``epochs`` adaptive releases of ``event``.

  Pure events (``LaplaceDpEvent``; :class:`PureDpEvent`, the SVT's) compose to ``epochs·ε`` with δ = 0 (basic composition, exact for
  pure DP). Any other event is composed by ``dp_accounting``'s RDP
  accountant and reported at ``delta``.

  >>> import dp_accounting
  >>> compose(dp_accounting.LaplaceDpEvent(0.5), 3, 1e-5)
  (6.0, 0.0)
  >>> round(compose(dp_accounting.GaussianDpEvent(1.0), 10, 1e-5)[0], 2)
  19.05
  """
  import dp_accounting  # pylint: disable=g-import-not-at-top,redefined-outer-name
  if epochs == 0:
    return 0.0, 0.0
  if isinstance(event, dp_accounting.LaplaceDpEvent):
    if event.noise_multiplier == 0:
      return math.inf, 0.0
    return epochs / event.noise_multiplier, 0.0
  if isinstance(event, _pure_dp_event_class()):
    return epochs * float(event.epsilon), 0.0
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.SelfComposedDpEvent(event, int(epochs)))
  return float(acc.get_epsilon(delta)), float(delta)
