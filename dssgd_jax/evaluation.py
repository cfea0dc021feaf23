"""Batched test accuracy of many models at once (vectorised over participants).

Evaluating 30 participants' models on a 10,000-image test split costs more than
a local epoch if done model by model, so :func:`make_evaluator` builds one
jitted function that scores every participant's model on a chunk of the test
set in one call (``vmap`` over the participant axis) and accumulates over
fixed-size chunks. Test data are padded once to a multiple of the chunk size,
so there is exactly one compilation.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dssgd_jax import participant as participant_lib

# Examples in flight per call, summed over models; bounds im2col memory.
_EXAMPLES_PER_CALL = 4096


def make_evaluator(apply_fn: Callable, unravel: Callable, images: np.ndarray,
                   labels: np.ndarray, num_models: int,
                   chunk: int | None = None) -> Callable:
  """Builds ``evaluate(flat_stack (P, D)) -> accuracies (P,)``.

  Args:
    apply_fn: model apply.
    unravel: flat vector -> parameter pytree.
    images: (T, ...) test images (host arrays).
    labels: (T,) test labels.
    num_models: P, the number of models scored per call.
    chunk: test examples per call (default: about 4096 / P).
  """
  num = images.shape[0]
  if chunk is None:
    chunk = max(16, _EXAMPLES_PER_CALL // max(num_models, 1))
  chunk = min(chunk, num)
  steps = -(-num // chunk)
  pad = steps * chunk - num
  x = np.concatenate([images, np.zeros((pad,) + images.shape[1:],
                                       images.dtype)])
  y = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
  m = np.arange(steps * chunk) < num
  x = jnp.asarray(x.reshape((steps, chunk) + images.shape[1:]))
  y = jnp.asarray(y.reshape(steps, chunk))
  m = jnp.asarray(m.reshape(steps, chunk))
  correct = participant_lib.make_accuracy_fn(apply_fn, unravel)

  @jax.jit
  def _evaluate(flat_stack, x, y, m):
    def body(total, batch):
      bx, by, bm = batch
      hits = jax.vmap(correct, in_axes=(0, None, None, None))(
          flat_stack, bx, by, bm)
      return total + hits, None

    total, _ = jax.lax.scan(body, jnp.zeros(flat_stack.shape[:1], jnp.int32),
                            (x, y, m))
    return total / num

  # The test set is an argument, not a closed-over constant, so XLA does not
  # fold it into the compiled program.
  def evaluate(flat_stack):
    return _evaluate(flat_stack, x, y, m)

  return evaluate
