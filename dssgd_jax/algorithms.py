"""DSSGD and its baselines, each a :class:`~dssgd_jax.protocols.Protocol`
built from parts.

SPEC section 3, "Baselines". All take explicit arguments (no run
configuration):

* DSSGD is a protocol (:func:`dssgd_jax.protocols.round_robin`, ``parallel``
  or ``asynchronous``) over a participant update with an upload rule
  (:mod:`dssgd_jax.rules`), a download rule (:mod:`dssgd_jax.server`) and the
  paper's aggregation (:func:`dssgd_jax.aggregation.sum_uploads`).
* :func:`fedavg` — federated averaging (McMahan et al. 2017) is the parallel
  protocol with a dense upload (every entry of the update, optionally
  through ``chain(l2_clip(C), gaussian(σ))``: DP-FedAvg with local noise),
  full downloads and the example-weighted mean
  (:func:`dssgd_jax.aggregation.weighted_mean`, the participants' real
  example counts as weights).
* :func:`standalone` — every participant trains alone: nothing is uploaded
  or downloaded. ``centralized`` is :func:`standalone` with one participant
  holding the union of everyone's data (the layout is the caller's).

>>> import jax, jax.numpy as jnp, optax
>>> from dssgd_jax import participant, rules, server
>>> from dssgd_jax.participant import LocalState, ParticipantData
>>> step = lambda loc, x, y, k, n=None: (loc._replace(params=loc.params + 1.0),
...                                      jnp.zeros(()))
>>> trainer = participant.Trainer(lambda w: LocalState(w, ()), step, False,
...                               optax.sgd(0.1))
>>> proto = fedavg(participant.make_update(trainer, rules.chain()))
>>> st = proto.init(server.init(jnp.zeros(2)),
...                 LocalState(jnp.zeros((2, 2)), ()))
>>> data = ParticipantData(jnp.zeros((2, 4, 1)), jnp.zeros((2, 4)),
...                        count=jnp.array([1, 3]))
>>> st, stats = proto.epoch(st, data, jax.random.key(0))
>>> st.server.params.tolist()
[1.0, 1.0]
"""

from typing import Callable

from dssgd_jax import aggregation as aggregation_lib
from dssgd_jax import protocols
from dssgd_jax import server as server_lib

ALGORITHMS = ("dssgd", "fedavg", "standalone", "centralized")


def fedavg(update: Callable, *,
           aggregation: aggregation_lib.Aggregation | None = None,
           upload_loss: float = 0.0, download_loss: float = 0.0,
           axis: protocols.ParticipantAxis = protocols.ParticipantAxis()
           ) -> protocols.Protocol:
  """Federated averaging on the participant axis.

  Args:
    update: a participant update whose upload rule keeps every entry (e.g.
      ``chain()``, or ``chain(l2_clip(C), gaussian(σ))``).
    aggregation: default :func:`~dssgd_jax.aggregation.weighted_mean`
      (weights: the participants' example counts); e.g. with a server
      optimizer for FedOpt.
    upload_loss, download_loss: loss probabilities; the mean is taken over
      the received updates.
    axis: how the participant axis is computed.

  Returns:
    The protocol; after a round with full downloads the server holds
    ``w_g + Σ_i n_i Δw_i / Σ_i n_i`` over the received updates.
  """
  return protocols.parallel(
      update, server_lib.download_all(),
      aggregation=aggregation or aggregation_lib.weighted_mean(),
      upload_loss=upload_loss, download_loss=download_loss,
      axis=axis)._replace(name="fedavg")


def standalone(update: Callable, *,
               axis: protocols.ParticipantAxis = protocols.ParticipantAxis()
               ) -> protocols.Protocol:
  """Every participant trains alone (``update`` built with no upload rule)."""
  return protocols.parallel(update, server_lib.download_none(),
                            axis=axis)._replace(name="standalone")
