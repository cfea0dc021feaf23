"""Local training: one step and one epoch against plain reference loops.

The local step is an optax transformation: with ``optax.sgd(k)`` a whole
local epoch equals the hand-written ``w - k·g`` step bit for bit; with
momentum (and weight decay) it equals a numpy loop of the textbook update; a
participant padded to a larger array (unequal participants) trains exactly as
it would unpadded.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dssgd_jax import models
from dssgd_jax import participant
from dssgd_jax import rules
from dssgd_jax.participant import LocalState, ParticipantData


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


def _reference_epoch(model, unravel, flat, x, y, key, batch_size, lr):
  """The hand-written SGD loop (the step before optax): the same order."""
  n = x.shape[0]
  perm = np.asarray(jax.random.permutation(key, n))
  params = unravel(flat)
  losses = []
  for s in range(0, n, batch_size):
    b = perm[s:s + batch_size]
    params, l = participant.sgd_step(model.apply, params, x[b], y[b],
                                     jnp.ones(len(b), bool), lr)
    losses.append(l)
  return participant.flatten_params(params)[0], np.mean(losses)


@pytest.mark.parametrize("batch_size", [1, 4, 23])
def test_optax_sgd_epoch_equals_the_hand_written_step_bit_for_bit(batch_size):
  n = 23
  model, flat, unravel, x, y = _setup(n=n)
  key = jax.random.key(5)
  trainer = participant.make_trainer(model.apply, unravel, batch_size,
                                     optax.sgd(0.05))
  got, loss = jax.jit(trainer.epoch)(trainer.init(flat), x, y, key)

  def hand_written(flat):  # the pre-optax local epoch, jitted the same way
    idx, mask = participant.epoch_batches(n, batch_size, key)
    def body(p, batch):
      b_idx, b_mask = batch
      return participant.sgd_step(model.apply, p, x[b_idx], y[b_idx], b_mask,
                                  0.05)
    params, losses = jax.lax.scan(body, unravel(flat), (idx, mask))
    return participant.flatten_params(params)[0], jnp.mean(losses)

  want, want_loss = jax.jit(hand_written)(flat)
  np.testing.assert_array_equal(np.asarray(got.params), np.asarray(want))
  assert float(loss) == float(want_loss)
  # And it is the plain Python loop, to float tolerance.
  ref, ref_loss = _reference_epoch(model, unravel, flat, x, y, key,
                                   batch_size, 0.05)
  np.testing.assert_allclose(got.params, ref, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)


def test_momentum_and_weight_decay_equal_a_numpy_reference():
  n, bs, lr, beta, wd = 20, 5, 0.05, 0.9, 0.01
  model, flat, unravel, x, y = _setup(n=n)
  key = jax.random.key(2)
  opt = participant.make_optimizer(lr, momentum=beta, weight_decay=wd)
  trainer = participant.make_trainer(model.apply, unravel, bs, opt)
  local = trainer.init(flat)
  for e in range(2):  # the momentum carries across epochs
    local, _ = jax.jit(trainer.epoch)(local, x, y, jax.random.fold_in(key, e))

  def grad(w, b):  # float64 numpy reference with the gradient from JAX
    def loss_fn(f):
      logits = model.apply(unravel(f), x[b])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, y[b]).mean()
    return np.asarray(jax.grad(loss_fn)(jnp.asarray(w, jnp.float32)),
                      np.float64)

  w = np.asarray(flat, np.float64)
  v = np.zeros_like(w)
  for e in range(2):
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, e), n))
    for s in range(0, n, bs):
      g = grad(w, perm[s:s + bs]) + wd * w
      v = beta * v + g            # optax.trace (heavy ball)
      w = w - lr * v
  np.testing.assert_allclose(local.params, w, rtol=2e-4, atol=2e-5)


def test_a_padded_participant_trains_as_it_would_unpadded():
  """Unequal participants share one array shape: a participant with 13 real
  examples padded to 23 slots trains exactly as with its 13 alone (the
  per-example shuffle, fully padded batches skipped, momentum included)."""
  model, flat, unravel, x, y = _setup(n=23)
  opt = participant.make_optimizer(0.05, momentum=0.9)
  key = jax.random.key(3)
  kw = dict(shuffle="per_example")
  padded = participant.make_trainer(model.apply, unravel, 4, opt, **kw)
  got, loss = jax.jit(padded.epoch)(padded.init(flat), x, y, key,
                                    jnp.int32(13))
  want, want_loss = jax.jit(padded.epoch)(padded.init(flat), x[:13], y[:13],
                                          key)
  np.testing.assert_allclose(got.params, want.params, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)


def test_epoch_batches_cover_every_example_once():
  for shuffle in participant.SHUFFLES:
    idx, mask = participant.epoch_batches(10, 4, jax.random.key(0),
                                          shuffle=shuffle)
    assert idx.shape == (3, 4)
    assert sorted(np.asarray(idx)[np.asarray(mask)].tolist()) == list(
        range(10))
    idx, mask = participant.epoch_batches(10, 4, jax.random.key(0),
                                          jnp.int32(6), shuffle=shuffle)
    assert sorted(np.asarray(idx)[np.asarray(mask)].tolist()) == list(
        range(6))


def test_update_resets_the_optimizer_on_download_when_asked():
  model, flat, unravel, x, y = _setup(n=8)
  opt = participant.make_optimizer(0.05, momentum=0.9)
  data = ParticipantData(x, y)
  key = jax.random.key(0)
  outs = {}
  for reset in (False, True):
    trainer = participant.make_trainer(model.apply, unravel, 4, opt,
                                       reset_on_download=reset)
    update = jax.jit(participant.make_update(trainer, None))
    local = trainer.init(flat)
    local, _, _ = update(flat, jnp.zeros(flat.shape, bool), local, data, key)
    trace = local.opt_state[0].trace
    assert float(jnp.max(jnp.abs(jax.tree_util.tree_leaves(trace)[0]))) > 0
    # A second epoch that downloads everything: reset starts from zero
    # momentum, carried does not.
    local, _, _ = update(flat, jnp.ones(flat.shape, bool), local, data, key)
    outs[reset] = np.asarray(local.params)
    fresh = trainer.init(flat)
    want, _, _ = update(flat, jnp.ones(flat.shape, bool), fresh, data, key)
    assert np.array_equal(outs[reset], np.asarray(want.params)) == reset
  assert not np.array_equal(outs[False], outs[True])


def test_canary_enters_the_update_before_the_rule():
  model, flat, unravel, x, y = _setup(n=8)
  trainer = participant.make_trainer(model.apply, unravel, 4, optax.sgd(0.05))
  canary = jnp.zeros_like(flat).at[7].set(-1.0)
  update = jax.jit(participant.make_update(trainer, rules.chain(),
                                           canary_scale=0.5))
  plain, up0, _ = update(flat, jnp.zeros(flat.shape, bool),
                         trainer.init(flat), ParticipantData(x, y),
                         jax.random.key(0))
  with_c, up1, _ = update(flat, jnp.zeros(flat.shape, bool),
                          trainer.init(flat),
                          ParticipantData(x, y, canary=canary),
                          jax.random.key(0))
  np.testing.assert_allclose(with_c.params - plain.params,
                             -0.5 * np.eye(flat.shape[0])[7], atol=1e-6)
  np.testing.assert_allclose(up1.values - up0.values,
                             -0.5 * np.eye(flat.shape[0])[7], atol=1e-6)
  assert isinstance(with_c, LocalState)
