"""DSSGD and its baselines, each a :class:`~dssgd_jax.protocols.Protocol`.

SPEC section 3, "Baselines". All take explicit arguments (no run
configuration):

* DSSGD is a protocol (:func:`dssgd_jax.protocols.round_robin`, ``parallel``
  or ``asynchronous``) over a participant update with an upload rule
  (:mod:`dssgd_jax.rules`) and a download rule (:mod:`dssgd_jax.server`).
* :func:`fedavg` — federated averaging (McMahan et al. 2017): every round each
  participant downloads w_g, trains one local epoch and uploads its whole
  update (optionally through an upload rule such as ``chain(l2_clip(C),
  gaussian(σ))``: DP-FedAvg with local noise); the server adds the mean of
  the received updates weighted by the participants' example counts.
* :func:`standalone` — every participant trains alone: nothing is uploaded
  or downloaded. ``centralized`` is :func:`standalone` with one participant
  holding the union of everyone's data (the layout is the caller's).

>>> import jax.numpy as jnp
>>> from dssgd_jax import participant, rules
>>> epoch = lambda w, x, y, k, lr, n=None: (w + 1.0, jnp.zeros(()))
>>> proto = fedavg(participant.make_update(epoch, rules.chain(), 0.1),
...                example_counts=jnp.array([1.0, 3.0]))
>>> from dssgd_jax import server
>>> st = proto.init(server.init(jnp.zeros(2)), jnp.zeros((2, 2)))
>>> st, stats = proto.epoch(st, jnp.zeros((2, 1)), jnp.zeros((2, 1)),
...                         jax.random.key(0))
>>> st["server"].params.tolist()
[1.0, 1.0]
"""

from typing import Callable

import jax
import jax.numpy as jnp

from dssgd_jax import protocols
from dssgd_jax import server as server_lib

ALGORITHMS = ("dssgd", "fedavg", "standalone", "centralized")


def fedavg(update: Callable, example_counts: jax.Array, *,
           upload_loss: float = 0.0, download_loss: float = 0.0,
           axis: protocols.ParticipantAxis = protocols.ParticipantAxis(),
           uneven: bool = False) -> protocols.Protocol:
  """Federated averaging on the participant axis.

  Args:
    update: a participant update whose upload rule keeps every entry (e.g.
      ``chain()``, or ``chain(l2_clip(C), gaussian(σ))``).
    example_counts: (P,) examples held by each participant, the weights of
      the mean.
    upload_loss, download_loss: loss probabilities; the mean is taken over
      the received updates.
    axis: how the participant axis is computed.
    uneven: the participants hold ``example_counts`` real examples each in
      example slots padded to one size (passes the counts to the local
      epoch).

  Returns:
    The protocol; after a round with full downloads the server holds
    ``w_g + Σ_i n_i Δw_i / Σ_i n_i`` over the received updates.
  """
  counts = jnp.asarray(example_counts)
  return protocols.parallel(
      update, server_lib.download_all(), upload_loss=upload_loss,
      download_loss=download_loss, weights=counts.astype(jnp.float32),
      axis=axis, counts=counts.astype(jnp.int32) if uneven else None
  )._replace(name="fedavg")


def standalone(update: Callable, *,
               axis: protocols.ParticipantAxis = protocols.ParticipantAxis()
               ) -> protocols.Protocol:
  """Every participant trains alone (``update`` built with no upload rule)."""
  return protocols.parallel(update, server_lib.download_none(),
                            axis=axis)._replace(name="standalone")
