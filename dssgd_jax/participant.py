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


def epoch_batches(num_examples: int, batch_size: int, key: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """Shuffled minibatch indices for one epoch, padded to a static shape.

  Returns:
    (indices, mask), both (ceil(n / M), M); the last batch is completed with
    masked padding so every example is used exactly once per epoch.
  """
  num_steps = math.ceil(num_examples / batch_size)
  perm = jax.random.permutation(key, num_examples)
  pad = num_steps * batch_size - num_examples
  idx = jnp.concatenate([perm, jnp.zeros((pad,), perm.dtype)])
  mask = jnp.arange(num_steps * batch_size) < num_examples
  return (idx.reshape(num_steps, batch_size),
          mask.reshape(num_steps, batch_size))


def make_local_epoch(apply_fn: Callable, unravel: Callable, batch_size: int
                     ) -> Callable:
  """Builds ``epoch(flat, images, labels, key, lr) -> (flat, mean_loss)``.

  One local epoch is a ``lax.scan`` of :func:`sgd_step` over the participant's
  shuffled minibatches (batch size M, every example once, last batch partial).
  The returned function is pure and un-jitted; jit or vmap it at the call site.

  Args:
    apply_fn: the model's ``apply``.
    unravel: maps the flat vector back to the parameter pytree.
    batch_size: M (static).
  """
  def epoch(flat, images, labels, key, learning_rate):
    idx, mask = epoch_batches(images.shape[0], batch_size, key)
    params = unravel(flat)

    def body(p, batch):
      b_idx, b_mask = batch
      p, loss = sgd_step(apply_fn, p, images[b_idx], labels[b_idx], b_mask,
                         learning_rate)
      return p, loss

    params, losses = jax.lax.scan(body, params, (idx, mask))
    new_flat, _ = ravel_pytree(params)
    return new_flat.astype(flat.dtype), jnp.mean(losses)

  return epoch


def make_accuracy_fn(apply_fn: Callable, unravel: Callable) -> Callable:
  """Builds ``correct(flat, images, labels, mask) -> number correct`` (pure)."""
  def correct(flat, images, labels, mask):
    logits = apply_fn(unravel(flat), images)
    hits = (jnp.argmax(logits, -1) == labels) & mask
    return jnp.sum(hits)

  return correct
