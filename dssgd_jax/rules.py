"""Upload rules: what a participant shares, as small composable transforms.

Paper section 3, steps 4-5 of the participant's algorithm (select θu of Δw,
bound it to [-γ, γ], add noise), SPEC section 3. In the style of optax, each
rule is built by a factory from explicit arguments and is a pure, jittable,
vmappable function with a static output shape; :func:`chain` composes them::

    rule = chain(select_largest(count), clip(gamma), laplace(scale))
    upload = rule.apply(dense(delta), key)          # an Upload of `count` slots

A rule maps an :class:`~dssgd_jax.selection.Upload` to an ``Upload``. The
chain starts from :func:`dense` (every entry of Δw, indices ``0..D-1``), so a
rule sees only what the rules before it let through and nothing else: a rule
placed after a noise rule is post-processing of a noisy release.

Each rule also declares its privacy property, :meth:`UploadRule.privacy`: a
function from the :class:`Privacy` of its input (are the indices still chosen
independently of the data? what bounds the values? which differential-privacy
event already covers the release?) to that of its output. :func:`claim` folds
a chain's properties over the D parameters and composes the per-epoch event
over the epochs with ``dp_accounting`` (:mod:`dssgd_jax.accounting`), so the ε
a run reports is derived from the mechanism that runs, and a chain that gives
no guarantee says why in one sentence:

>>> import jax, jax.numpy as jnp
>>> rule = chain(select_random(3), clip(0.01), laplace(0.06))
>>> up = rule.apply(dense(jnp.arange(10.0)), jax.random.key(0))
>>> up.indices.shape
(3,)
>>> claim(rule, num_params=10, epochs=5).epsilon   # 5 epochs x 2γc/b = 5 x 1
5.0
>>> print(claim(chain(select_largest(3), clip(0.01), laplace(0.06)), 10, 5).reason)
select_largest(3) chooses the uploaded indices from the data and sends them without noise: the noise on the values does not hide them.

Adjacency: one participant's whole data set replaced by another (the unit of
privacy of SPEC section 3 and of the SVT), so a value bounded to [-γ, γ] has
sensitivity 2γ and an L2-bounded vector 2C. A new rule is a factory that
returns ``UploadRule(apply, privacy, name)``; see the custom-experiment
notebook for one written in a few lines.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Callable, NamedTuple

import jax
import jax.numpy as jnp

from dssgd_jax import accounting
from dssgd_jax import privacy as privacy_lib
from dssgd_jax import selection as selection_lib
from dssgd_jax.selection import Upload

if TYPE_CHECKING:
  import dp_accounting  # imported where used (dssgd_jax.accounting says why)


@dataclasses.dataclass(frozen=True)
class Privacy:
  """What is known about an upload after a prefix of a chain (one epoch).

  Attributes:
    slots: static number of slots of the upload.
    dependent: None while which slots are valid and their indices do not
      depend on the participant's data; otherwise the sentence saying which
      rule made them depend on it.
    linf: every valid value lies in [-linf, linf] (None: unbounded).
    l2: the valid values have L2 norm at most l2 (None: unbounded).
    event: the ``dp_accounting`` event that covers the whole release so far
      (indices and values); every later rule is post-processing.
    reason: why no event could be formed (the first failure), or None.
  """
  slots: int
  dependent: str | None = None
  linf: float | None = None
  l2: float | None = None
  event: dp_accounting.DpEvent | None = None
  reason: str | None = None

  def l2_bound(self) -> float | None:
    """The tightest L2 bound of the values (from ``l2`` or ``linf``)."""
    bounds = [b for b in (self.l2, None if self.linf is None else
                          self.linf * math.sqrt(self.slots)) if b is not None]
    return min(bounds) if bounds else None

  def l1_bound(self) -> float | None:
    """The tightest L1 bound of the values (from ``linf`` or ``l2``)."""
    bounds = [b for b in (None if self.linf is None else self.linf * self.slots,
                          None if self.l2 is None else
                          self.l2 * math.sqrt(self.slots)) if b is not None]
    return min(bounds) if bounds else None


class UploadRule(NamedTuple):
  """An upload rule: a pure transform of uploads and its privacy property.

  Attributes:
    apply: ``(upload, key) -> upload``; pure, jittable, vmappable, with a
      static output shape.
    privacy: ``Privacy -> Privacy`` (pure Python, static), or None when the
      rule declares nothing: then nothing is claimed for a chain that holds
      it (declarations fail closed, :data:`UNDECLARED`).
    name: how the rule prints, e.g. ``clip(0.01)``.
    parts: the rules a :func:`chain` applies in order (empty for a single
      rule); :func:`checked` checks each part's declaration.
  """
  apply: Callable[[Upload, jax.Array], Upload]
  privacy: Callable[[Privacy], Privacy] | None = None
  name: str = "rule"
  parts: tuple = ()

  def __repr__(self) -> str:
    return self.name


def dense(delta: jax.Array) -> Upload:
  """Every entry of ``delta`` as an upload (indices 0..D-1), a chain's input."""
  d = delta.shape[-1]
  return Upload(jnp.arange(d, dtype=jnp.int32), delta, jnp.ones((d,), bool))


def empty(dtype=jnp.float32) -> Upload:
  """An upload with no slots (what a participant that shares nothing sends)."""
  return Upload(jnp.zeros((0,), jnp.int32), jnp.zeros((0,), dtype),
                jnp.zeros((0,), bool))


def _post_processing(p: Privacy, **changes) -> Privacy:
  """After a DP event, a rule only changes the shape facts, never the event."""
  return dataclasses.replace(p, **changes)


UNDECLARED = ("{name} declares no privacy property (its UploadRule has no "
              "privacy function), so nothing is claimed for what it sends.")


def declared_privacy(rule: UploadRule, p: Privacy) -> Privacy:
  """``rule.privacy(p)``; for a rule that declares none, the fail-closed
  answer: no event, no known bound, and the reason naming the rule."""
  if rule.privacy is not None:
    return rule.privacy(p)
  if p.reason is not None:
    return dataclasses.replace(p, event=None, linf=None, l2=None)
  return dataclasses.replace(
      p, event=None, linf=None, l2=None,
      dependent=p.dependent or f"{rule.name} may choose its output from the data",
      reason=UNDECLARED.format(name=rule.name))


def _compose_privacy(rules):
  def privacy(p: Privacy) -> Privacy:
    for rule in rules:
      p = declared_privacy(rule, p)
    return p
  return privacy


def chain(*rules: UploadRule) -> UploadRule:
  """Applies ``rules`` in order; rule k gets ``fold_in(key, k)``.

  >>> chain(select_largest(10), clip(0.1))
  chain(select_largest(10), clip(0.1))
  """
  rules = tuple(rules)

  def apply(upload, key):
    for k, rule in enumerate(rules):
      upload = rule.apply(upload, jax.random.fold_in(key, k))
    return upload

  return UploadRule(apply, _compose_privacy(rules),
                    f"chain({', '.join(r.name for r in rules)})", rules)


# ----------------------------------------------------------------------------
# Selection: which entries are uploaded (paper: "select θu of Δw").

# The selection rules and noise rules by the names the command line uses
# (``--selection``, ``--noise``; ``svt`` is the sparse vector technique).
SELECTIONS = ("largest", "threshold", "random", "largest_approx")
NOISES = ("none", "laplace", "gaussian", "svt")


def _select(upload: Upload, scores: jax.Array, count: int,
            keep_all_checks: bool = False) -> Upload:
  """The ``count`` valid slots with the largest non-negative ``scores``.

  Slots with a negative score, or invalid on input, are never chosen; when
  fewer than ``count`` remain the rest of the output slots are invalid. When
  ``count`` covers every slot the upload is returned as it is, unless
  ``keep_all_checks`` (the scores can still drop slots).
  """
  count = min(int(count), upload.values.shape[-1])
  if count == 0:
    return empty(upload.values.dtype)
  if count == upload.values.shape[-1] and not keep_all_checks:
    return upload  # every slot is kept
  scores = jnp.where(upload.mask, scores, -1.0)
  picked = selection_lib.select_by_score(upload.values, scores, count)
  return Upload(upload.indices[picked.indices], picked.values,
                picked.mask & upload.mask[picked.indices])


def _selection(name: str, count: int, fn, depends: str | None,
               always_depends: bool = False):
  """A selection rule; ``depends`` says how its choice uses the data (it
  does not when it keeps every slot, unless ``always_depends``)."""
  count = int(count)
  if count < 0:
    raise ValueError(f"{name}: count must be >= 0, got {count}")

  def privacy(p: Privacy) -> Privacy:
    slots = min(count, p.slots)
    if p.event is not None:
      return _post_processing(p, slots=slots)
    chooses = depends is not None and (count < p.slots or always_depends)
    dependent = p.dependent or (depends if chooses else None)
    return dataclasses.replace(p, slots=slots, dependent=dependent)

  return UploadRule(fn, privacy, name)


def select_largest(count: int) -> UploadRule:
  """The ``count`` entries of largest |value| (ties to the lower index).

  The paper's rule ("largest values"); exact, via
  :func:`dssgd_jax.selection.select_by_score`. Which indices are chosen
  depends on the data.
  """
  name = f"select_largest({count})"
  return _selection(
      name, count, lambda up, key: _select(up, jnp.abs(up.values), count),
      f"{name} chooses the uploaded indices from the data")


def select_largest_approx(count: int, recall_target: float = 0.95
                          ) -> UploadRule:
  """``select_largest`` with ``lax.approx_max_k`` (fast on TPU; exact on CPU
  and GPU). Data-dependent, like :func:`select_largest`."""
  name = f"select_largest_approx({count})"

  def apply(up, key):
    n = min(count, up.values.shape[-1])
    if n == 0:
      return empty(up.values.dtype)
    scores = jnp.where(up.mask, jnp.abs(up.values), -1.0)
    _, idx = jax.lax.approx_max_k(scores, n, recall_target=recall_target)
    idx = jnp.sort(idx).astype(jnp.int32)
    return Upload(up.indices[idx], up.values[idx], up.mask[idx])

  return _selection(name, count, apply,
                    f"{name} chooses the uploaded indices from the data")


def select_threshold(count: int, threshold: float) -> UploadRule:
  """A uniformly random subset of at most ``count`` entries with |value| >= τ.

  Exactly uniform (random ranks from the exact permutation). Which entries
  pass τ depends on the data, so no noise on the values makes it private.
  """
  name = f"select_threshold({count}, {threshold:g})"

  def apply(up, key):
    ranks = selection_lib.random_ranks(key, up.values.shape[-1])
    return _select(up, jnp.where(jnp.abs(up.values) >= threshold, ranks, -1.0),
                   count, keep_all_checks=True)

  return _selection(name, count, apply,
                    f"{name} keeps the entries whose |Δw| passes τ",
                    always_depends=True)


def select_random(count: int) -> UploadRule:
  """A uniformly random subset of exactly ``count`` entries.

  Exactly uniform, and independent of the data: noise on the values then
  covers the whole upload.
  """
  name = f"select_random({count})"
  return _selection(
      name, count,
      lambda up, key: _select(up, selection_lib.random_ranks(key, up.values.shape[-1]),
                              count), None)


# ----------------------------------------------------------------------------
# Bounding (paper: "bound to [-γ, γ]") and noise.


def clip(bound: float) -> UploadRule:
  """Clips every value to [-γ, γ] (γ = ``bound``)."""
  if not bound > 0:
    raise ValueError(f"clip: bound must be > 0, got {bound}")

  def apply(up, key):
    return up._replace(values=jnp.where(
        up.mask, privacy_lib.clip(up.values, bound), 0.0))

  def privacy(p):  # after a DP event, a bound is a fact, not a new event
    return dataclasses.replace(
        p, linf=bound if p.linf is None else min(p.linf, bound))

  return UploadRule(apply, privacy, f"clip({bound:g})")


def l2_clip(bound: float) -> UploadRule:
  """Scales the values so that their L2 norm is at most C (= ``bound``)."""
  if not bound > 0:
    raise ValueError(f"l2_clip: bound must be > 0, got {bound}")

  def privacy(p):
    return dataclasses.replace(p, l2=bound if p.l2 is None else
                               min(p.l2, bound))

  return UploadRule(lambda up, key: privacy_lib.l2_clip(up, bound), privacy,
                    f"l2_clip({bound:g})")


def _noise_rule(kind: str, scale: float, bound_of, make_event, needs: str):
  name = f"{kind}({scale:g})"
  if not scale >= 0:
    raise ValueError(f"{name}: scale must be >= 0, got {scale}")

  def apply(up, key):
    return privacy_lib.add_noise(up, kind, scale, key)

  def privacy(p):
    before = p
    if scale > 0:  # the noisy values are no longer bounded
      p = dataclasses.replace(p, linf=None, l2=None)
    if p.event is not None or p.reason is not None:
      return p
    if p.slots == 0:
      return p
    if p.dependent is not None:
      return dataclasses.replace(p, reason=(
          f"{p.dependent} and sends them without noise: the noise on the "
          "values does not hide them."))
    bound = bound_of(before)
    if bound is None:
      return dataclasses.replace(p, reason=(
          f"{name} adds noise to unbounded values: put {needs} before it."))
    if scale == 0:
      return dataclasses.replace(p, reason=f"{name} adds no noise.")
    return dataclasses.replace(p, event=make_event(scale / (2.0 * bound)))

  return UploadRule(apply, privacy, name)


def laplace(scale: float) -> UploadRule:
  """Adds Laplace(b) noise (``scale`` = b) to every valid value.

  With data-independent indices and values bounded by γ on c slots, one
  upload is ε = 2γc/b differentially private (L1 sensitivity 2γc).
  """
  import dp_accounting  # pylint: disable=g-import-not-at-top,redefined-outer-name
  return _noise_rule("laplace", scale, Privacy.l1_bound,
                     dp_accounting.LaplaceDpEvent, "clip(γ)")


def gaussian(stddev: float) -> UploadRule:
  """Adds N(0, σ²) noise (``stddev`` = σ) to every valid value.

  With data-independent indices and values of L2 norm at most C (``l2_clip``,
  or ``clip(γ)`` on c slots: C = γ·√c), one upload is the Gaussian mechanism
  with noise multiplier σ/(2C).
  """
  import dp_accounting  # pylint: disable=g-import-not-at-top,redefined-outer-name
  return _noise_rule("gaussian", stddev, Privacy.l2_bound,
                     dp_accounting.GaussianDpEvent, "l2_clip(C) or clip(γ)")


def svt(count: int, epsilon: float, clip_bound: float, threshold: float
        ) -> UploadRule:
  """The sparse vector technique: chooses and noises at most ``count``
  entries, ε-DP as a whole (:func:`dssgd_jax.privacy.svt_select`).

  Its event is pure ε per epoch (E·ε after E epochs). It must see indices that
  do not depend on the data (first in the chain, or after ``select_random``).
  """
  count = int(count)
  if not (epsilon > 0 and clip_bound > 0 and count >= 0):
    raise ValueError(f"svt needs count >= 0, epsilon > 0 and clip_bound > 0; "
                     f"got {count}, {epsilon}, {clip_bound}")
  name = f"svt({count}, ε={epsilon:g}, γ={clip_bound:g}, τ={threshold:g})"

  def apply(up, key):
    n = min(count, up.values.shape[-1])
    if n == 0:
      return empty(up.values.dtype)
    released = privacy_lib.svt_select(
        jnp.where(up.mask, up.values, 0.0), key, count=n, epsilon=epsilon,
        clip_bound=clip_bound, threshold=threshold)
    return Upload(up.indices[released.indices], released.values,
                  released.mask & up.mask[released.indices])

  def privacy(p):
    slots = min(count, p.slots)
    if p.event is not None or p.reason is not None:
      return _post_processing(p, slots=slots)
    if p.dependent is not None:
      return dataclasses.replace(p, slots=slots, reason=(
          f"{p.dependent} before {name}, which can only protect a "
          "data-independent set of candidates."))
    return dataclasses.replace(
        p, slots=slots, linf=clip_bound,
        event=accounting.PureDpEvent(epsilon))

  return UploadRule(apply, privacy, name)


# ----------------------------------------------------------------------------
# The claim.


@dataclasses.dataclass(frozen=True)
class Claim:
  """The privacy guarantee of a rule over a run, per participant.

  Attributes:
    epsilon: ε after the given epochs (0.0 when nothing is uploaded), or None
      when the rule gives no guarantee.
    delta: δ of the claim (0.0 for pure ε-DP).
    reason: one sentence saying why there is no guarantee (None otherwise).
    event: the per-epoch ``dp_accounting`` event (None without one).
  """
  epsilon: float | None
  delta: float
  reason: str | None
  event: dp_accounting.DpEvent | None = None


NO_NOISE = ("no rule adds noise, so the uploaded values are the participant's "
            "update itself.")


def privacy_of(rule: UploadRule | None, num_params: int) -> Privacy:
  """The :class:`Privacy` of one upload by ``rule`` of D = ``num_params``."""
  start = Privacy(slots=int(num_params))
  if rule is None:
    return dataclasses.replace(start, slots=0)
  return rule.privacy(start)


def claim(rule: UploadRule | None, num_params: int, epochs: int,
          delta: float = 1e-5) -> Claim:
  """ε per participant after ``epochs`` uploads by ``rule`` (one per epoch).

  Args:
    rule: the upload rule (None: nothing is uploaded; ε = 0).
    num_params: D.
    epochs: E (the uploads compose adaptively).
    delta: δ used where the event is not pure ε-DP (the Gaussian mechanism).

  Returns:
    A :class:`Claim`; pure events (Laplace, the SVT) compose to E·ε with
    δ = 0, others through ``dp_accounting``'s RDP accountant.
  """
  p = privacy_of(rule, num_params)
  if p.slots == 0 or epochs == 0:
    return Claim(0.0, 0.0, None, p.event)
  if p.event is None:
    return Claim(None, 0.0, p.reason or NO_NOISE)
  eps, used_delta = accounting.compose(p.event, int(epochs), delta)
  return Claim(eps, used_delta, None, p.event)


# ----------------------------------------------------------------------------
# Checked mode: each rule's declaration verified on its actual outputs.


class DeclarationError(ValueError):
  """A rule's output breaks what its ``privacy`` declares (checked mode)."""


def _check_declared(up: Upload, p: Privacy, name: str, tolerance: float):
  """Checks, at run time, that ``up`` (the output of rule ``name``) holds
  what ``p`` (its declared :class:`Privacy`) says."""
  from jax.experimental import checkify  # pylint: disable=g-import-not-at-top
  slots = up.values.shape[-1]
  if slots != p.slots:  # shapes are static: a declaration error at trace time
    raise DeclarationError(f"{name} declares {p.slots} slots but its output "
                           f"has {slots}.")
  values = jnp.where(up.mask, up.values, 0.0)
  if p.linf is not None and slots:
    worst = jnp.max(jnp.abs(values))
    checkify.check(worst <= p.linf * (1 + tolerance),
                   f"{name} declares every value in [-{p.linf:g}, {p.linf:g}]"
                   " but sent one of magnitude {worst}", worst=worst)
  if p.l2 is not None and slots:
    norm = jnp.sqrt(jnp.sum(jnp.square(values)))
    checkify.check(norm <= p.l2 * (1 + tolerance),
                   f"{name} declares an L2 norm of at most {p.l2:g} but sent "
                   "values of norm {norm}", norm=norm)


def _apply_checked(rule: UploadRule, up: Upload, key, p: Privacy,
                   tolerance: float):
  if rule.parts:  # a chain: part k gets fold_in(key, k), as chain() does
    for k, part in enumerate(rule.parts):
      up, p = _apply_checked(part, up, jax.random.fold_in(key, k), p,
                             tolerance)
    return up, p
  up = rule.apply(up, key)
  p = declared_privacy(rule, p)
  _check_declared(up, p, rule.name, tolerance)
  return up, p


def checked(rule: UploadRule, tolerance: float = 1e-5) -> UploadRule:
  """``rule`` that verifies each part's declaration on its actual output.

  After every rule of a chain (recursively), the output's slot count must
  equal the declared ``slots`` (checked when the function is traced), and
  its valid values must lie within the declared L∞ bound and L2 norm (up to
  a relative ``tolerance`` for float rounding), checked at run time with
  ``jax.experimental.checkify``. The checked rule computes exactly what
  ``rule`` computes. Run it under :func:`with_checks` (or
  ``checkify.checkify``) so that a failed check raises; for tests and
  notebooks (it costs a reduction per rule).

  >>> import jax.numpy as jnp
  >>> times_100 = UploadRule(
  ...     lambda up, key: up._replace(values=100 * up.values),
  ...     lambda p: p, "times_100")  # declares: changes nothing (wrong)
  >>> rule = checked(chain(select_random(2), clip(0.1), times_100))
  >>> with_checks(rule.apply)(dense(jnp.ones(4)), jax.random.key(0))
  Traceback (most recent call last):
  ...
  dssgd_jax.rules.DeclarationError: times_100 declares every value in [-0.1, 0.1] but sent one of magnitude 10.0.
  """
  def apply(up, key):
    out, _ = _apply_checked(rule, up, key, Privacy(slots=up.values.shape[-1]),
                            tolerance)
    return out

  return UploadRule(apply, rule.privacy, rule.name, rule.parts)


def with_checks(fn: Callable, jit: bool = True) -> Callable:
  """``fn`` run under ``checkify``: a failed check of a :func:`checked`
  rule anywhere inside it (also under ``vmap``, ``scan``, ``lax.map``)
  raises :class:`DeclarationError` naming the rule."""
  from jax.experimental import checkify  # pylint: disable=g-import-not-at-top
  fn_checked = checkify.checkify(fn)
  if jit:
    fn_checked = jax.jit(fn_checked)

  def run(*args, **kwargs):
    err, out = fn_checked(*args, **kwargs)
    message = err.get()
    if message is not None:
      raise DeclarationError(message.split(" (`check` failed")[0] + ".")
    return out

  return run
