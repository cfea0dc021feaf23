"""The fast participant axis computes what a per-participant loop computes.

The fast path is what ``protocols.parallel_epoch`` runs:
``protocols.map_participants`` over participants of the local epoch, in both
lowerings (``vmap``; ``map``, the CPU default), with the models' fast layers
(im2col convolutions, reshape max-pooling). The straightforward reference trains each
participant alone in a Python loop with ``lax.conv_general_dilated`` and
``flax.linen.max_pool``.
"""

from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dssgd_jax import models
from dssgd_jax import participant
from dssgd_jax import protocols
from dssgd_jax import rules
from dssgd_jax import server as server_lib
from dssgd_jax.participant import ParticipantData

P, N, BATCH, LR = 3, 4, 2, 0.1


def _flax_pool(x, size, stride):
  return nn.max_pool(x, (size, size), strides=(stride, stride),
                     padding="VALID")


def _data(shape, seed=0):
  kx, ky = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (P, N) + tuple(shape))
  y = jax.random.randint(ky, (P, N), 0, 10)
  return x, y


@pytest.mark.parametrize("lowering", protocols.PARTICIPANT_AXES)
@pytest.mark.parametrize("name", models.MODELS)
def test_participant_axis_matches_a_per_participant_loop(name, lowering):
  with jax.default_matmul_precision("highest"):  # no TF32 on GPUs
    _check_participant_axis(name, lowering)


def _check_participant_axis(name, lowering):
  shape = models.INPUT_SHAPES[name]
  fast = models.get_model(name, conv_impl="im2col")
  params = models.init_params(fast, shape, jax.random.key(1))
  flat, unravel = participant.flatten_params(params)
  # Different starting points per participant, as after a few epochs.
  local = flat[None] + 0.01 * jax.random.normal(jax.random.key(2),
                                                (P,) + flat.shape)
  x, y = _data(shape)
  keys = jax.random.split(jax.random.key(3), P)

  trainer = participant.make_trainer(fast.apply, unravel, BATCH,
                                     optax.sgd(LR))
  got, got_loss = jax.jit(lambda *a: protocols.map_participants(
      trainer.epoch, (0, 0, 0, 0), a, lowering))(
          jax.vmap(trainer.init)(local), x, y, keys)
  got = got.params

  plain = models.get_model(name, conv_impl="xla")
  with mock.patch.object(models, "_pool", _flax_pool):
    ref = participant.make_trainer(plain.apply, unravel, BATCH,
                                   optax.sgd(LR))
    ref_epoch = jax.jit(ref.epoch)
    want = [ref_epoch(ref.init(local[i]), x[i], y[i], keys[i])
            for i in range(P)]
  want_flat = np.stack([np.asarray(w[0].params) for w in want])
  assert not np.allclose(want_flat, np.asarray(local))  # it did train
  np.testing.assert_allclose(got, want_flat, rtol=1e-4, atol=2e-6)
  np.testing.assert_allclose(got_loss, [float(w[1]) for w in want],
                             rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lowering", protocols.PARTICIPANT_AXES)
def test_parallel_epoch_matches_participants_one_by_one(lowering):
  # The whole exchange (download, train, select, upload, server update).
  shape = models.INPUT_SHAPES["digits_cnn"]
  model = models.get_model("digits_cnn")
  flat, unravel = participant.flatten_params(
      models.init_params(model, shape, jax.random.key(1)))
  d = flat.shape[0]
  trainer = participant.make_trainer(model.apply, unravel, BATCH,
                                     optax.sgd(LR))
  update = participant.make_update(trainer,
                                   rules.chain(rules.select_largest(d // 10)))
  proto = protocols.parallel(update, server_lib.download_all(),
                             axis=protocols.ParticipantAxis(lowering))
  x, y = _data(shape)
  local = jnp.tile(flat[None], (P, 1))
  srv = server_lib.init(flat)
  key = jax.random.key(4)
  fast, stats = jax.jit(proto.epoch)(
      proto.init(srv, jax.vmap(trainer.init)(local)), ParticipantData(x, y),
      key)
  fast_srv, fast_local = fast.server, fast.local.params

  single = jax.jit(update)
  keys = protocols.participant_keys(key, P)
  ref_local, ups = [], []
  for i in range(P):
    k_up = jax.random.split(keys[i])[1]
    new, up, _ = single(srv.params, jnp.ones((d,), bool),
                        trainer.init(local[i]), ParticipantData(x[i], y[i]),
                        k_up)
    ref_local.append(new.params)
    ups.append(up)
  ref_srv = srv
  for up in ups:
    ref_srv = server_lib.apply_uploads(ref_srv, up)
  np.testing.assert_allclose(fast_local, np.stack(ref_local), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(fast_srv.params, ref_srv.params, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(stats.uploaded, [d // 10] * P)


def test_map_participants_rejects_unknown_lowering():
  with pytest.raises(ValueError, match="participant_axis"):
    protocols.map_participants(lambda x: x, (0,), (jnp.ones(2),), "pmap")
