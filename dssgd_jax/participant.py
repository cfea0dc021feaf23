"""Local training of one participant: an SGD step and one local epoch (pure).

Paper section 3, step 2 of the participant's algorithm: "Perform SGD on the
local dataset". A participant's parameters travel as one flat float32 vector
(length D, the layout the server and the selection rules use); ``unravel``
turns it back into the model's pytree inside the jitted epoch.

Everything here is a pure function of explicit arguments. The participant axis
is added by the caller with ``jax.vmap`` (see ``dssgd_jax.protocols``).

Example (one participant, plain SGD on random data):

>>> import jax, jax.numpy as jnp
>>> from dssgd_jax import models
>>> model = models.get_model("digits_mlp")
>>> flat, unravel = flatten_params(
...     models.init_params(model, (8, 8, 1), jax.random.key(0)))
>>> epoch = make_local_epoch(model.apply, unravel, batch_size=4)
>>> x, y = jnp.zeros((10, 8, 8, 1)), jnp.zeros((10,), jnp.int32)
>>> new_flat, loss = epoch(flat, x, y, jax.random.key(1), 0.01)
>>> new_flat.shape == flat.shape
True
"""

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from dssgd_jax import rules


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


def epoch_batches(num_examples: int, batch_size: int, key: jax.Array,
                  count: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """Shuffled minibatch indices for one epoch, padded to a static shape.

  Args:
    num_examples: n, the (static) number of example slots.
    batch_size: M.
    key: PRNG key of the shuffle.
    count: optional (traced) number of real examples, the first ``count``
      slots; the rest are padding that is never used (participants holding
      different amounts of data share one array shape).

  Returns:
    (indices, mask), both (ceil(n / M), M); the last batch is completed with
    masked padding so every example is used exactly once per epoch. With
    ``count`` the real examples come first in a uniformly random order and
    the batches after them are fully masked.
  """
  num_steps = math.ceil(num_examples / batch_size)
  perm = jax.random.permutation(key, num_examples)
  valid = num_examples
  if count is not None:
    perm = perm[jnp.argsort(perm >= count, stable=True)]
    valid = count
  pad = num_steps * batch_size - num_examples
  idx = jnp.concatenate([perm, jnp.zeros((pad,), perm.dtype)])
  mask = jnp.arange(num_steps * batch_size) < valid
  return (idx.reshape(num_steps, batch_size),
          mask.reshape(num_steps, batch_size))


def make_local_epoch(apply_fn: Callable, unravel: Callable, batch_size: int
                     ) -> Callable:
  """Builds ``epoch(flat, images, labels, key, lr, count=None) -> (flat,
  mean_loss)``.

  One local epoch is a ``lax.scan`` of :func:`sgd_step` over the participant's
  shuffled minibatches (batch size M, every example once, last batch partial).
  ``count`` (optional, traced) says how many of the example slots are real
  (:func:`epoch_batches`); fully padded batches change nothing and do not
  count in the mean loss. The returned function is pure and un-jitted; jit or
  vmap it at the call site.

  Args:
    apply_fn: the model's ``apply``.
    unravel: maps the flat vector back to the parameter pytree.
    batch_size: M (static).
  """
  def epoch(flat, images, labels, key, learning_rate, count=None):
    idx, mask = epoch_batches(images.shape[0], batch_size, key, count)
    params = unravel(flat)

    def body(p, batch):
      b_idx, b_mask = batch
      p, loss = sgd_step(apply_fn, p, images[b_idx], labels[b_idx], b_mask,
                         learning_rate)
      return p, loss

    params, losses = jax.lax.scan(body, params, (idx, mask))
    new_flat, _ = ravel_pytree(params)
    if count is None:
      mean_loss = jnp.mean(losses)
    else:
      used = jnp.any(mask, axis=1).astype(losses.dtype)
      mean_loss = jnp.sum(losses * used) / jnp.maximum(jnp.sum(used), 1.0)
    return new_flat.astype(flat.dtype), mean_loss

  return epoch


def make_update(local_epoch: Callable, upload_rule: Any, learning_rate: float
                ) -> Callable:
  """One participant's epoch of the exchange (paper section 3, steps 1-5).

  Args:
    local_epoch: from :func:`make_local_epoch`.
    upload_rule: a :class:`dssgd_jax.rules.UploadRule` applied to Δw, or
      None to upload nothing.
    learning_rate: k.

  Returns:
    ``update(server_params, download_mask, local, images, labels, key,
    count=None) -> (new_local, upload, loss)``: overwrite the downloaded
    entries of ``local`` from ``server_params``, train one local epoch, and
    upload ``upload_rule(Δw)`` (an empty upload when the rule is None). Pure
    and vmappable.
  """
  def update(server_params, download_mask, local, images, labels, key,
             count=None):
    k_train, k_up = jax.random.split(key)
    local = jnp.where(download_mask, server_params, local)
    new_local, loss = local_epoch(local, images, labels, k_train,
                                  learning_rate, count)
    if upload_rule is None:
      upload = rules.empty(new_local.dtype)
    else:
      upload = upload_rule.apply(rules.dense(new_local - local), k_up)
    return new_local, upload, loss

  return update


def make_accuracy_fn(apply_fn: Callable, unravel: Callable) -> Callable:
  """Builds ``correct(flat, images, labels, mask) -> number correct`` (pure)."""
  def correct(flat, images, labels, mask):
    logits = apply_fn(unravel(flat), images)
    hits = (jnp.argmax(logits, -1) == labels) & mask
    return jnp.sum(hits)

  return correct
