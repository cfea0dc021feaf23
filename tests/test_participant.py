"""Local SGD: one step and one epoch against a plain reference loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dssgd_jax import models
from dssgd_jax import participant


def _setup(name="digits_mlp", n=23):
  model = models.get_model(name)
  params = models.init_params(model, (8, 8, 1), jax.random.key(0))
  flat, unravel = participant.flatten_params(params)
  kx, ky = jax.random.split(jax.random.key(1))
  x = jax.random.uniform(kx, (n, 8, 8, 1))
  y = jax.random.randint(ky, (n,), 0, 10)
  return model, flat, unravel, x, y


def test_sgd_step_is_w_minus_lr_grad():
  model, flat, unravel, x, y = _setup()
  mask = jnp.ones((x.shape[0],), bool)
  new, loss = participant.sgd_step(model.apply, unravel(flat), x, y, mask, 0.1)

  def loss_fn(f):
    logits = model.apply(unravel(f), x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  g = jax.grad(loss_fn)(flat)
  new_flat, _ = participant.flatten_params(new)
  np.testing.assert_allclose(new_flat, flat - 0.1 * g, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss, loss_fn(flat), rtol=1e-6)


def test_masked_examples_do_not_count():
  model, flat, unravel, x, y = _setup()
  m = jnp.arange(x.shape[0]) < 5
  a, _ = participant.sgd_step(model.apply, unravel(flat), x, y, m, 0.1)
  b, _ = participant.sgd_step(model.apply, unravel(flat), x[:5], y[:5],
                              jnp.ones(5, bool), 0.1)
  np.testing.assert_allclose(participant.flatten_params(a)[0],
                             participant.flatten_params(b)[0], atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 4, 23, 30])
def test_local_epoch_equals_python_loop(batch_size):
  n = 23
  model, flat, unravel, x, y = _setup(n=n)
  key = jax.random.key(5)
  epoch = jax.jit(participant.make_local_epoch(model.apply, unravel,
                                               min(batch_size, n)))
  got, loss = epoch(flat, x, y, key, 0.05)
  # Reference: the same permutation, each minibatch in turn, last one short.
  perm = np.asarray(jax.random.permutation(key, n))
  bs = min(batch_size, n)
  params = unravel(flat)
  losses = []
  for s in range(0, n, bs):
    b = perm[s:s + bs]
    params, l = participant.sgd_step(model.apply, params, x[b], y[b],
                                     jnp.ones(len(b), bool), 0.05)
    losses.append(l)
  want, _ = participant.flatten_params(params)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-5)


def test_epoch_batches_cover_every_example_once():
  idx, mask = participant.epoch_batches(10, 4, jax.random.key(0))
  assert idx.shape == (3, 4)
  assert sorted(np.asarray(idx)[np.asarray(mask)].tolist()) == list(range(10))
