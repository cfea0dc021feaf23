"""Bounding, noise and the sparse vector technique (SVT) for uploads.

Paper section 3 (Shokri & Shmatikov, "Privacy-Preserving Deep Learning", CCS
2015): before uploading, a participant bounds the selected entries of its
parameter change Δw to [-γ, γ] and adds random noise; with the sparse vector
technique the whole upload (which entries *and* their values) is
ε-differentially private. SPEC section 3, "Bounding and noise" and "DP mode".

Everything here is a pure function of explicit arrays and PRNG keys, with
static output shapes, so it jits and vmaps over a leading participant axis:

* :func:`clip`, :func:`l2_clip`, :func:`add_noise` and :func:`bound_and_noise`
  act on an :class:`~dssgd_jax.selection.Upload` chosen by a selection rule;
* :func:`svt_select` is the DP mode: Dwork and Roth's NumericSparse
  (*The Algorithmic Foundations of Differential Privacy*, 2014, section 3.6)
  with the parameters of SPEC section 3. It replaces selection, bounding and
  noise in one step. :func:`svt_noise` and :func:`svt_apply` are its two
  halves (all randomness, then the deterministic mechanism), exposed for tests
  and audits;
* the ε of an upload rule built on these (and its composition over epochs)
  is :func:`dssgd_jax.rules.claim`, through :mod:`dssgd_jax.accounting`.

The SVT, step by step (per participant, per epoch, budget ε)::

    c = ceil(θu·D), Δf = 2γ, ε1 = 8ε/9, ε2 = 2ε/9
    ρ ~ Lap(2cΔf/ε1)
    for j in a uniformly random order of the D indices:
        ν ~ Lap(4cΔf/ε1)
        if |clip(Δw_j)| + ν >= τ + ρ:
            release clip(clip(Δw_j) + Lap(2cΔf/ε2)) at j
            ρ ~ Lap(2cΔf/ε1)            # redrawn after every release
            stop after c releases (or when the indices run out)

(The numeric answer is ``clip(Δw_j)``, whose sensitivity is Δf = 2γ; the
final clip of the noisy answer to [-γ, γ] is post-processing. Adding the noise
to the *unclipped* Δw_j would make the sensitivity unbounded.)

How it is vectorised, exactly: all randomness is drawn up front (one
permutation, one ν per visit position, one ρ per release, one value noise
per release), which is the same joint distribution because each draw of the
sequential algorithm is used once and is independent of everything before it.
Then the k-th release is at the first position after the (k-1)-th release
whose score ``|clip(Δw)| + ν`` reaches ``τ + ρ_k``. That chain is followed by
a ``lax.scan`` of fixed length ``ceil(min(c, D)/m) + ceil(D/W)``: each step
looks at a window of W positions and finds up to m consecutive releases in it
(m vectorised first-passage searches), then either moves past its m-th
release or, if the window ran out first, past the window. The permutation is
sorted with packed 32-bit keys (random high bits, position low bits) in
``ceil(3·log2(D)/(32 - ceil(log2 D)))`` rounds; like ``jax.random.permutation``
(whose criterion it uses) it is exactly uniform unless two of the concatenated
random keys collide, an event of probability below 1/D.

Measured (jit, ``DEFAULT_WINDOW``/``DEFAULT_PER_STEP``, on the 2-core build
machine while other jobs loaded it; CPU time of the process, close to an idle
machine's wall time): D = 313,546, c = 31,355 (the ``svhn_cnn`` at θu = 0.1)
takes 0.09 s for one participant and 3.2 s vmapped over 30 participants;
D = 105,506, c = 10,551 (``mnist_cnn``) 0.02 s and 0.74 s. About 80% of it is
the permutation's sorts. See the privacy section of README.md.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dssgd_jax._topk import permutation, permutation_rounds  # pylint: disable=unused-import
from dssgd_jax.selection import Upload

NOISES = ("none", "laplace", "gaussian")

# Scan window W and releases per scan step m of the SVT (speed only; any
# values give the same output). Chosen by measurement on a 2-core CPU: small
# scan bodies compile to a tight native loop.
DEFAULT_WINDOW = 32
DEFAULT_PER_STEP = 2


# ----------------------------------------------------------------------------
# Bounding and noise on a selected upload.


def clip(values: jax.Array, bound: float | jax.Array | None) -> jax.Array:
  """Elementwise clip of ``values`` to [-bound, bound] (γ); None: unchanged.

  Args:
    values: float array.
    bound: γ > 0, or None for no bounding.

  Returns:
    An array of the same shape and dtype.

  >>> clip(jnp.array([-2.0, 0.5, 3.0]), 1.0).tolist()
  [-1.0, 0.5, 1.0]
  >>> clip(jnp.array([-2.0, 3.0]), None).tolist()
  [-2.0, 3.0]
  """
  if bound is None:
    return values
  bound = jnp.asarray(bound, values.dtype)
  return jnp.clip(values, -bound, bound)


def l2_clip(upload: Upload, l2_bound: float | jax.Array) -> Upload:
  """Scales the valid values so that their L2 norm is at most ``l2_bound``.

  The Gaussian mechanism's bounding (``C``): the upload vector ``v`` (the
  valid values) becomes ``v · min(1, C/‖v‖₂)``. Invalid slots stay 0.

  Args:
    upload: an :class:`Upload` (valid slots per ``mask``).
    l2_bound: C > 0.

  Returns:
    The upload with rescaled values (same indices and mask).

  >>> up = Upload(jnp.array([0, 1, 2]), jnp.array([3.0, 4.0, 9.0]),
  ...             jnp.array([True, True, False]))
  >>> l2_clip(up, 1.0).values.tolist()
  [0.6000000238418579, 0.800000011920929, 0.0]
  >>> l2_clip(up, 10.0).values.tolist()
  [3.0, 4.0, 0.0]
  """
  values = jnp.where(upload.mask, upload.values, 0.0)
  norm = jnp.sqrt(jnp.sum(jnp.square(values), axis=-1, keepdims=True))
  bound = jnp.asarray(l2_bound, values.dtype)
  factor = jnp.where(norm > bound, bound / jnp.maximum(norm, 1e-30), 1.0)
  return upload._replace(values=(values * factor).astype(upload.values.dtype))


def add_noise(upload: Upload, kind: str, scale: float | jax.Array,
              key: jax.Array) -> Upload:
  """Adds i.i.d. noise to the valid values of an upload.

  Args:
    upload: an :class:`Upload`.
    kind: ``none``, ``laplace`` (``scale`` is the Laplace scale b: density
      ``exp(-|z|/b)/(2b)``) or ``gaussian`` (``scale`` is the standard
      deviation σ). Static.
    scale: b or σ (>= 0).
    key: PRNG key.

  Returns:
    The upload with noisy values; invalid slots stay exactly 0.

  >>> up = Upload(jnp.array([4, 0]), jnp.array([1.0, 0.0]),
  ...             jnp.array([True, False]))
  >>> noisy = add_noise(up, "laplace", 0.5, jax.random.key(0))
  >>> bool(noisy.values[0] != 1.0), float(noisy.values[1])
  (True, 0.0)
  """
  if kind == "none":
    return upload
  values = upload.values
  if kind == "laplace":
    z = jax.random.laplace(key, values.shape, values.dtype)
  elif kind == "gaussian":
    z = jax.random.normal(key, values.shape, values.dtype)
  else:
    raise ValueError(f"unknown noise kind {kind!r}; expected one of {NOISES} "
                     "(the SVT is svt_select, not a noise kind)")
  noisy = values + jnp.asarray(scale, values.dtype) * z
  return upload._replace(values=jnp.where(upload.mask, noisy, 0.0))


def bound_and_noise(upload: Upload, clip_bound: float | jax.Array | None,
                    noise: str, noise_scale: float | jax.Array,
                    key: jax.Array) -> Upload:
  """Clips the valid values to [-γ, γ], then adds noise (paper step 5).

  Args:
    upload: the selected entries.
    clip_bound: γ, or None for no bounding.
    noise: ``none`` | ``laplace`` | ``gaussian`` (static).
    noise_scale: Laplace scale b or Gaussian standard deviation σ.
    key: PRNG key for the noise.

  Returns:
    The bounded, noisy upload; invalid slots stay 0.

  >>> up = Upload(jnp.array([0, 3]), jnp.array([-0.5, 0.002]),
  ...             jnp.array([True, True]))
  >>> bound_and_noise(up, 0.01, "none", 0.0, jax.random.key(0)).values.tolist()
  [-0.009999999776482582, 0.0020000000949949026]
  """
  values = jnp.where(upload.mask, clip(upload.values, clip_bound), 0.0)
  return add_noise(upload._replace(values=values), noise, noise_scale, key)


# ----------------------------------------------------------------------------
# The sparse vector technique (NumericSparse).


class SVTScales(NamedTuple):
  """Parameters of the SVT for budget ε (SPEC section 3, "DP mode").

  Attributes:
    sensitivity: Δf = 2γ.
    epsilon1: ε1 = 8ε/9, spent on the comparisons.
    epsilon2: ε2 = 2ε/9, spent on the released values.
    threshold_scale: Laplace scale of ρ, 2cΔf/ε1.
    query_scale: Laplace scale of ν, 4cΔf/ε1.
    value_scale: Laplace scale of a released value's noise, 2cΔf/ε2.
  """
  sensitivity: jax.Array
  epsilon1: jax.Array
  epsilon2: jax.Array
  threshold_scale: jax.Array
  query_scale: jax.Array
  value_scale: jax.Array


def svt_scales(count: int, epsilon, clip_bound) -> SVTScales:
  """The SVT's sensitivity, budget split and Laplace scales.

  >>> s = svt_scales(10, 0.9, 0.5)
  >>> [round(float(v), 4) for v in s]
  [1.0, 0.8, 0.2, 25.0, 50.0, 100.0]
  """
  epsilon = jnp.asarray(epsilon, jnp.float32)
  sensitivity = 2.0 * jnp.asarray(clip_bound, jnp.float32)
  eps1 = 8.0 * epsilon / 9.0
  eps2 = 2.0 * epsilon / 9.0
  return SVTScales(sensitivity, eps1, eps2,
                   2.0 * count * sensitivity / eps1,
                   4.0 * count * sensitivity / eps1,
                   2.0 * count * sensitivity / eps2)


class SVTNoise(NamedTuple):
  """All the randomness of one run of :func:`svt_select`.

  Attributes:
    order: int32 (D,) the visiting order (a uniform permutation).
    query_noise: float32 (D,) ν for the visit at each position of ``order``.
    threshold_noise: float32 (c,) ρ_k, the threshold noise in force while
      looking for the k-th release (redrawn after every release).
    value_noise: float32 (c,) the Laplace noise of the k-th released value.
  """
  order: jax.Array
  query_noise: jax.Array
  threshold_noise: jax.Array
  value_noise: jax.Array


def svt_noise(key: jax.Array, num_params: int, count: int, epsilon,
              clip_bound) -> SVTNoise:
  """Draws the SVT's randomness for D = ``num_params`` and c = ``count``.

  Args:
    key: PRNG key.
    num_params: static D.
    count: static c.
    epsilon: ε > 0 (may be traced; ``inf`` gives zero noise).
    clip_bound: γ > 0.

  Returns:
    An :class:`SVTNoise` with Laplace draws of the scales of
    :func:`svt_scales` (a Laplace(b) draw is ``b`` times a standard one).
  """
  scales = svt_scales(count, epsilon, clip_bound)
  k_order, k_lap = jax.random.split(key)
  # One standard Laplace draw for ν, ρ and the value noise (one PRNG kernel).
  z = jax.random.laplace(k_lap, (num_params + 2 * count,), jnp.float32)
  return SVTNoise(
      order=permutation(k_order, num_params),
      query_noise=scales.query_scale * z[:num_params],
      threshold_noise=scales.threshold_scale * z[num_params:num_params + count],
      value_noise=scales.value_scale * z[num_params + count:])


def _first_passages(scores: jax.Array, thresholds: jax.Array, count: int,
                    window: int, per_step: int) -> tuple[jax.Array, jax.Array]:
  """Positions p_1 < p_2 < ... with p_k = min{t > p_{k-1}: scores_t >= thr_k}.

  Stops after ``count`` positions or when positions run out.

  Args:
    scores: float (D,) in visiting order.
    thresholds: float (count,) the k-th entry is used for the k-th search.
    count: static c.
    window: static W, positions examined per scan step.
    per_step: static m, searches (releases) per scan step.

  Returns:
    (positions int32 (count,), valid bool (count,)); valid is a prefix.
  """
  d = scores.shape[0]
  w = max(1, min(window, d))
  m = max(1, per_step)
  steps = -(-min(count, d) // m) + -(-d // w)
  s_pad = jnp.concatenate([scores, jnp.full((w,), -jnp.inf, scores.dtype)])
  t_pad = jnp.concatenate([thresholds,
                           jnp.full((m,), jnp.inf, thresholds.dtype)])
  t = jnp.arange(w, dtype=jnp.int32)

  def step(carry, _):
    pos, k = carry  # next position to visit; releases so far
    win = jax.lax.dynamic_slice(s_pad, (pos,), (w,))
    thr = jax.lax.dynamic_slice(t_pad, (jnp.minimum(k, count),), (m,))
    start = jnp.int32(0)
    found_all, where_all = [], []
    for j in range(m):  # the j-th search starts right after the (j-1)-th hit
      ok = (win >= thr[j]) & (t >= start)
      first = jnp.argmax(ok).astype(jnp.int32)
      found = ok[first]
      found_all.append(found)
      where_all.append(pos + first)
      start = jnp.where(found, first + 1, w)  # not found: window exhausted
    found = jnp.stack(found_all)
    new_pos = jnp.minimum(pos + start, d)
    return (new_pos, k + jnp.sum(found, dtype=jnp.int32)), (
        jnp.stack(where_all), found)

  (_, k), (where, found) = jax.lax.scan(
      step, (jnp.int32(0), jnp.int32(0)), None, length=steps)
  found = found.reshape(-1)
  (slot,) = jnp.nonzero(found, size=count, fill_value=0)
  valid = jnp.arange(count) < jnp.minimum(k, count)
  return jnp.where(valid, where.reshape(-1)[slot], 0), valid


def svt_apply(delta: jax.Array, noise: SVTNoise, *, count: int, clip_bound,
              threshold, window: int = DEFAULT_WINDOW,
              per_step: int = DEFAULT_PER_STEP) -> Upload:
  """The SVT given its randomness (deterministic; see :func:`svt_select`).

  Args:
    delta: float (D,) parameter change Δw.
    noise: an :class:`SVTNoise` for this D and c.
    count: static c.
    clip_bound: γ.
    threshold: τ.
    window: static scan window W (speed only; any W >= 1 is exact).
    per_step: static releases per scan step m (speed only).

  Returns:
    An :class:`Upload` of c slots; the released entries, in the order they
    were released, fill a prefix of the slots.
  """
  gamma = jnp.asarray(clip_bound, jnp.float32)
  clipped = clip(delta.astype(jnp.float32), gamma)
  scores = jnp.abs(clipped)[noise.order] + noise.query_noise
  # Finite thresholds: the -inf padding after the last position never passes.
  thresholds = jnp.maximum(
      jnp.asarray(threshold, jnp.float32) + noise.threshold_noise,
      jnp.finfo(jnp.float32).min)
  pos, valid = _first_passages(scores, thresholds, count, window, per_step)
  idx = jnp.where(valid, noise.order[pos], 0).astype(jnp.int32)
  values = clip(clipped[idx] + noise.value_noise, gamma)
  return Upload(idx, jnp.where(valid, values, 0.0).astype(delta.dtype), valid)


def svt_select(delta: jax.Array, key: jax.Array, *, count: int, epsilon,
               clip_bound, threshold, window: int = DEFAULT_WINDOW,
               per_step: int = DEFAULT_PER_STEP) -> Upload:
  """ε-DP upload by the sparse vector technique (NumericSparse), jittable.

  Chooses *and* noises at most c entries of Δw; the whole upload is
  ε-differentially private for one participant's data set replaced (values
  bounded to [-γ, γ], so every query has sensitivity Δf = 2γ). See the module
  docstring for the algorithm and how it is vectorised; it is exact in
  distribution, has no Python loop over D, and vmaps over participants
  (``jax.vmap(functools.partial(svt_select, count=c, epsilon=..., ...))``).

  Args:
    delta: float (D,) the participant's parameter change Δw.
    key: PRNG key.
    count: static c = ``upload_count(θu, D)`` (the budget is split over c).
    epsilon: ε per participant per epoch (> 0; may be traced).
    clip_bound: γ > 0.
    threshold: τ.
    window: static scan window (speed only).
    per_step: static releases per scan step (speed only).

  Returns:
    An :class:`Upload` of c slots: the released indices in release order,
    their noisy clipped values in [-γ, γ], and a mask that is True on a prefix
    of as many slots as were released (fewer than c when the indices ran out;
    the rest have index 0, value 0).

  >>> delta = jnp.array([0.5, -0.01, 0.0, 0.3, 0.0, -0.2])
  >>> up = svt_select(delta, jax.random.key(0), count=2, epsilon=1e9,
  ...                 clip_bound=0.1, threshold=0.05)
  >>> sorted(up.indices[up.mask].tolist()) in ([0, 3], [0, 5], [3, 5])
  True
  >>> [round(float(v), 6) for v in np.abs(up.values)]  # noisy, clipped to γ
  [0.1, 0.1]
  """
  if count == 0:
    return Upload(jnp.zeros((0,), jnp.int32), jnp.zeros((0,), delta.dtype),
                  jnp.zeros((0,), bool))
  for name, value in (("epsilon", epsilon), ("clip_bound", clip_bound)):
    if value is None:
      raise ValueError(f"svt_select needs {name}")
    if isinstance(value, (int, float, np.number)) and not value > 0:
      raise ValueError(f"svt_select needs {name} > 0, got {value}")
  return _svt_select(delta, key, epsilon, clip_bound, threshold, count=count,
                     window=window, per_step=per_step)


@functools.partial(jax.jit, static_argnames=("count", "window", "per_step"))
def _svt_select(delta, key, epsilon, clip_bound, threshold, *, count, window,
                per_step):
  noise = svt_noise(key, delta.shape[-1], count, epsilon, clip_bound)
  return svt_apply(delta, noise, count=count, clip_bound=clip_bound,
                   threshold=threshold, window=window, per_step=per_step)
