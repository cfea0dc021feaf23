"""Local training of one participant: optax steps, one local epoch (pure).

Paper section 3, step 2 of the participant's algorithm: "Perform SGD on the
local dataset". A participant's parameters travel as one flat float32 vector
(length D, the layout the server and the selection rules use); ``unravel``
turns it back into the model's pytree inside the jitted epoch.

Local training is an ``optax.GradientTransformation``: the paper's plain SGD
is ``optax.sgd(k)`` (the default, bit for bit the step ``w - k·∇L``), and
momentum, weight decay, Adam or a learning-rate schedule are other
transformations (:func:`make_optimizer` builds the command line's choices).
A participant's optimizer state is part of its local state
(:class:`LocalState`), carried across epochs or reset when it downloads
(``reset_on_download``). A participant's private data is a
:class:`ParticipantData`; participants holding different amounts of data
share one array shape with ``count`` real examples each (the rest padding),
and each one's epoch visits exactly its own examples.

Everything here is a pure function of explicit arguments. The participant
axis is added by the caller (``dssgd_jax.protocols``).

Example (one participant, plain SGD on random data):

>>> import jax, jax.numpy as jnp, optax
>>> from dssgd_jax import models
>>> model = models.get_model("digits_mlp")
>>> flat, unravel = flatten_params(
...     models.init_params(model, (8, 8, 1), jax.random.key(0)))
>>> trainer = make_trainer(model.apply, unravel, batch_size=4,
...                        optimizer=optax.sgd(0.01))
>>> x, y = jnp.zeros((10, 8, 8, 1)), jnp.zeros((10,), jnp.int32)
>>> local = trainer.init(flat)
>>> new, loss = trainer.epoch(local, x, y, jax.random.key(1))
>>> new.params.shape == flat.shape
True
"""

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from dssgd_jax import rules

SHUFFLES = ("permutation", "per_example")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine")


class ParticipantData(NamedTuple):
  """A participant's private data (a leading participant axis when stacked).

  Attributes:
    images: (n, ...) example slots.
    labels: (n,) int labels.
    count: None when all n slots are real examples; else the (traced) number
      of real examples, the first ``count`` slots (the rest is padding).
    canary: None, or a (D,) vector added to the participant's update every
      epoch (gradient-space canaries of the end-to-end audit,
      :mod:`dssgd_jax.canaries`).
  """
  images: jax.Array
  labels: jax.Array
  count: jax.Array | None = None
  canary: jax.Array | None = None


class LocalState(NamedTuple):
  """A participant's local training state.

  Attributes:
    params: float32 (D,) its flat parameters.
    opt_state: its optimizer's state (``()`` for plain SGD).
  """
  params: jax.Array
  opt_state: Any = ()


def make_optimizer(learning_rate: float, *, optimizer: str = "sgd",
                   momentum: float = 0.0, nesterov: bool = False,
                   weight_decay: float = 0.0, schedule: str = "constant",
                   total_steps: int = 1) -> optax.GradientTransformation:
  """The local optimizer of the command line's choices.

  Args:
    learning_rate: k.
    optimizer: ``sgd`` (with optional heavy-ball or Nesterov ``momentum``)
      or ``adam``.
    momentum, nesterov: SGD momentum (0: the paper's plain SGD).
    weight_decay: decoupled weight decay λ (``optax.add_decayed_weights``
      before the learning rate: w <- w - k(g + λw)).
    schedule: ``constant`` or ``cosine`` (``optax.cosine_decay_schedule`` of
      the learning rate to 0 over ``total_steps`` local steps).
    total_steps: local steps of the whole run (for the schedule).

  Returns:
    An ``optax.GradientTransformation``; with the defaults exactly
    ``optax.sgd(learning_rate)``.

  >>> make_optimizer(0.1, momentum=0.9)  # doctest: +ELLIPSIS
  GradientTransformationExtraArgs(init=<function chain...
  """
  lr = (learning_rate if schedule == "constant" else
        optax.cosine_decay_schedule(learning_rate, max(int(total_steps), 1)))
  if optimizer == "adam":
    opt = optax.adam(lr)
  elif optimizer == "sgd":
    opt = optax.sgd(lr, momentum=momentum or None, nesterov=nesterov)
  else:
    raise ValueError(f"optimizer={optimizer!r} is not one of {OPTIMIZERS}")
  if weight_decay:
    opt = optax.chain(optax.add_decayed_weights(weight_decay), opt)
  return opt


def flatten_params(params: Any) -> tuple[jax.Array, Callable[[jax.Array], Any]]:
  """(flat float32 vector, unravel function) for a parameter pytree."""
  flat, unravel = ravel_pytree(params)
  return flat.astype(jnp.float32), unravel


def masked_cross_entropy(logits: jax.Array, labels: jax.Array,
                         mask: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the examples where ``mask`` is True."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  mask = mask.astype(losses.dtype)
  return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def sgd_step(apply_fn: Callable, params: Any, images: jax.Array,
             labels: jax.Array, mask: jax.Array, learning_rate
             ) -> tuple[Any, jax.Array]:
  """One minibatch SGD step ``w <- w - k·∇L(w)`` (paper eq. 1).

  The reference the optax step is tested against (:func:`optax_step` with
  ``optax.sgd(k)`` gives the same bits).

  Args:
    apply_fn: ``apply_fn(params, images) -> logits``.
    params: parameter pytree.
    images: (M, ...) minibatch.
    labels: (M,) int labels.
    mask: (M,) bool, False for padding examples (they contribute nothing).
    learning_rate: k.

  Returns:
    (new params, minibatch loss before the step).
  """
  def loss_fn(p):
    return masked_cross_entropy(apply_fn(p, images), labels, mask)

  loss, grads = jax.value_and_grad(loss_fn)(params)
  params = jax.tree_util.tree_map(lambda p, g: p - learning_rate * g,
                                  params, grads)
  return params, loss


def optax_step(apply_fn: Callable, optimizer: optax.GradientTransformation,
               params: Any, opt_state: Any, images: jax.Array,
               labels: jax.Array, mask: jax.Array
               ) -> tuple[Any, Any, jax.Array]:
  """One minibatch step of ``optimizer``; a batch with no real example
  (``mask`` all False) changes neither the parameters nor the optimizer's
  state (a padded participant's epoch equals its unpadded one).

  Returns:
    (new params, new optimizer state, minibatch loss before the step).
  """
  def loss_fn(p):
    return masked_cross_entropy(apply_fn(p, images), labels, mask)

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, new_state = optimizer.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  active = jnp.any(mask)
  keep = lambda new, old: jnp.where(active, new, old)
  return (jax.tree_util.tree_map(keep, new_params, params),
          jax.tree_util.tree_map(keep, new_state, opt_state), loss)


def epoch_batches(num_examples: int, batch_size: int, key: jax.Array,
                  count: jax.Array | None = None,
                  shuffle: str = "permutation"
                  ) -> tuple[jax.Array, jax.Array]:
  """Shuffled minibatch indices for one epoch, padded to a static shape.

  Args:
    num_examples: n, the (static) number of example slots.
    batch_size: M.
    key: PRNG key of the shuffle.
    count: optional (traced) number of real examples, the first ``count``
      slots; the rest are padding that is never used (participants holding
      different amounts of data share one array shape).
    shuffle: ``permutation`` (``jax.random.permutation`` of the n slots) or
      ``per_example`` (slot j's place is decided by its own random bits,
      ``fold_in(key, j)``: the order of the real examples does not depend on
      how much padding follows them, so a padded participant shuffles as an
      unpadded one does; the runs with unequal participants use it).

  Returns:
    (indices, mask), both (ceil(n / M), M); the last batch is completed with
    masked padding so every example is used exactly once per epoch. With
    ``count`` the real examples come first in a uniformly random order and
    the batches after them are fully masked.
  """
  num_steps = math.ceil(num_examples / batch_size)
  if shuffle == "per_example":
    bits = jax.vmap(lambda j: jax.random.bits(jax.random.fold_in(key, j),
                                              dtype=jnp.uint32))(
        jnp.arange(num_examples))
    if count is not None:  # padding after every real example
      bits = jnp.where(jnp.arange(num_examples) < count, bits,
                       jnp.uint32(0xFFFFFFFF))
    perm = jnp.argsort(bits, stable=True).astype(jnp.int32)
  elif shuffle == "permutation":
    perm = jax.random.permutation(key, num_examples)
    if count is not None:
      perm = perm[jnp.argsort(perm >= count, stable=True)]
  else:
    raise ValueError(f"shuffle={shuffle!r} is not one of {SHUFFLES}")
  valid = num_examples if count is None else count
  pad = num_steps * batch_size - num_examples
  idx = jnp.concatenate([perm, jnp.zeros((pad,), perm.dtype)])
  mask = jnp.arange(num_steps * batch_size) < valid
  return (idx.reshape(num_steps, batch_size),
          mask.reshape(num_steps, batch_size))


class Trainer(NamedTuple):
  """A participant's local training (:func:`make_trainer`).

  Attributes:
    init: ``flat -> LocalState`` (the optimizer's initial state).
    epoch: ``(LocalState, images, labels, key, count=None) -> (LocalState,
      mean loss)``: one local epoch; pure, un-jitted.
    reset_on_download: whether the optimizer's state starts afresh in every
      epoch in which the participant downloads (otherwise it is carried).
    optimizer: the ``optax.GradientTransformation``.
  """
  init: Callable
  epoch: Callable
  reset_on_download: bool
  optimizer: optax.GradientTransformation


def make_trainer(apply_fn: Callable, unravel: Callable, batch_size: int,
                 optimizer: optax.GradientTransformation, *,
                 reset_on_download: bool = False,
                 shuffle: str = "permutation") -> Trainer:
  """Builds a participant's local training with ``optimizer``.

  One local epoch is a ``lax.scan`` of :func:`optax_step` over the
  participant's shuffled minibatches (batch size M, every real example once,
  last batch partial; :func:`epoch_batches`). Fully padded batches change
  nothing and do not count in the mean loss.

  Args:
    apply_fn: the model's ``apply``.
    unravel: maps the flat vector back to the parameter pytree.
    batch_size: M (static).
    optimizer: e.g. ``optax.sgd(k)``, the paper's SGD.
    reset_on_download: see :class:`Trainer`.
    shuffle: the order of the examples (:func:`epoch_batches`).
  """
  def init(flat):
    return LocalState(flat, optimizer.init(unravel(flat)))

  def epoch(local, images, labels, key, count=None):
    idx, mask = epoch_batches(images.shape[0], batch_size, key, count,
                              shuffle)
    params = unravel(local.params)

    def body(carry, batch):
      p, s = carry
      b_idx, b_mask = batch
      p, s, loss = optax_step(apply_fn, optimizer, p, s, images[b_idx],
                              labels[b_idx], b_mask)
      return (p, s), loss

    (params, opt_state), losses = jax.lax.scan(
        body, (params, local.opt_state), (idx, mask))
    new_flat, _ = ravel_pytree(params)
    if count is None:
      mean_loss = jnp.mean(losses)
    else:
      used = jnp.any(mask, axis=1).astype(losses.dtype)
      mean_loss = jnp.sum(losses * used) / jnp.maximum(jnp.sum(used), 1.0)
    return LocalState(new_flat.astype(local.params.dtype), opt_state), (
        mean_loss)

  return Trainer(init, epoch, bool(reset_on_download), optimizer)


def make_update(trainer: Trainer, upload_rule: Any,
                canary_scale: float = 0.0) -> Callable:
  """One participant's epoch of the exchange (paper section 3, steps 1-5).

  Args:
    trainer: from :func:`make_trainer`.
    upload_rule: a :class:`dssgd_jax.rules.UploadRule` applied to Δw, or
      None to upload nothing.
    canary_scale: the size a of a canary entry (``data.canary`` holds ±1
      directions); 0: the largest |Δw| entry of the participant's own
      update that epoch.

  Returns:
    ``update(server_params, download_mask, local, data, key) -> (local,
    upload, loss)`` with ``local`` a :class:`LocalState` and ``data`` a
    :class:`ParticipantData`: overwrite the downloaded entries of the local
    parameters from ``server_params``, train one local epoch, and upload
    ``upload_rule(Δw)`` (an empty upload when the rule is None). With
    ``data.canary`` the canary vector times a is added to the update before
    the rule sees it (as if the participant's data had made it;
    :mod:`dssgd_jax.canaries`). Pure and vmappable.
  """
  def update(server_params, download_mask, local, data, key):
    k_train, k_up = jax.random.split(key)
    params = jnp.where(download_mask, server_params, local.params)
    opt_state = local.opt_state
    if trainer.reset_on_download:
      fresh = trainer.init(params).opt_state
      got = jnp.any(download_mask)
      opt_state = jax.tree_util.tree_map(
          lambda f, o: jnp.where(got, f, o), fresh, opt_state)
    new, loss = trainer.epoch(LocalState(params, opt_state), data.images,
                              data.labels, k_train, data.count)
    if data.canary is not None:
      scale = (jnp.asarray(canary_scale, new.params.dtype) if canary_scale
               else jnp.max(jnp.abs(new.params - params)))
      new = new._replace(params=new.params + scale * data.canary.astype(
          new.params.dtype))
    if upload_rule is None:
      upload = rules.empty(new.params.dtype)
    else:
      upload = upload_rule.apply(rules.dense(new.params - params), k_up)
    return new, upload, loss

  return update


def make_accuracy_fn(apply_fn: Callable, unravel: Callable) -> Callable:
  """Builds ``correct(flat, images, labels, mask) -> number correct`` (pure)."""
  def correct(flat, images, labels, mask):
    logits = apply_fn(unravel(flat), images)
    hits = (jnp.argmax(logits, -1) == labels) & mask
    return jnp.sum(hits)

  return correct
