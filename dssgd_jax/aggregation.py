"""How the server turns the uploads it receives into its new global model.

Paper section 3 ("the parameter server ... adds the uploaded values to the
global vector"), and its variants. Like the upload and download rules, an
aggregation is built by a factory from explicit arguments and passed to every
protocol (:mod:`dssgd_jax.protocols`); a protocol never decides how the
server combines what it receives:

* :func:`sum_uploads` — the paper's: every received value is added at its
  index (duplicates from several participants add up);
* :func:`weighted_mean` — FedAvg's (McMahan et al. 2017): the mean of the
  received updates weighted by the participants' example counts;
* :func:`entry_mean` — each entry moves by the mean of the values received
  for it (over the participants that uploaded that entry), so an entry
  uploaded by many participants does not move many times further;
* :func:`with_server_optimizer` — any of them followed by an
  ``optax.GradientTransformation`` of the aggregate update, as FedOpt does
  (Reddi et al. 2021): the aggregate Δ is the negative pseudo-gradient, so
  ``optax.sgd(η)`` is a server learning rate and ``optax.sgd(η, momentum)``
  server momentum.

An :class:`Aggregation` is two pure functions::

    agg_state = aggregation.init(server_params)
    server, agg_state = aggregation.apply(server, agg_state, uploads,
                                          weights)

``uploads`` is an :class:`~dssgd_jax.selection.Upload` with a leading axis
over the uploads received at once (one in the round-robin protocol, every
participant's in the parallel ones), lost ones masked out; ``weights`` (same
leading axis) are the uploaders' example counts. Every aggregation counts the
received entries in the server's update counters (``stat``) as
:func:`dssgd_jax.server.apply_uploads` does.

>>> import jax.numpy as jnp
>>> from dssgd_jax import server
>>> from dssgd_jax.selection import Upload
>>> up = Upload(jnp.array([[0, 1], [1, 2]]), jnp.array([[1., 2.], [4., 8.]]),
...             jnp.array([[True, True], [True, True]]))
>>> w = jnp.array([1.0, 3.0])
>>> for agg in (sum_uploads(), entry_mean(), weighted_mean()):
...   s, _ = agg.apply(server.init(jnp.zeros(3)), agg.init(jnp.zeros(3)), up, w)
...   print(agg.name, s.params.tolist())
sum_uploads() [1.0, 6.0, 8.0]
entry_mean() [1.0, 3.0, 8.0]
weighted_mean() [0.25, 3.5, 6.0]
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dssgd_jax import server as server_lib

AGGREGATIONS = ("sum", "weighted_mean", "entry_mean")


class Aggregation(NamedTuple):
  """``init(server_params) -> state``; ``apply(server, state, uploads,
  weights) -> (server, state)``; both pure."""
  init: Callable[[jax.Array], Any]
  apply: Callable[..., tuple[server_lib.ServerState, Any]]
  name: str

  def __repr__(self) -> str:
    return self.name


def _no_state(params):
  del params
  return ()


def sum_uploads() -> Aggregation:
  """The paper's server: adds every received value at its index."""
  return Aggregation(
      _no_state,
      lambda server, state, uploads, weights: (
          server_lib.apply_uploads(server, uploads), state),
      "sum_uploads()")


def weighted_mean() -> Aggregation:
  """FedAvg's server: ``w_g + Σ_i n_i Δw_i / Σ_i n_i`` over the received
  uploads (``n_i`` the ``weights``; a participant whose upload is lost, all
  slots masked, weighs nothing)."""
  def apply(server, state, uploads, weights):
    received = jnp.any(uploads.mask, axis=-1)
    w = jnp.where(received, weights.astype(jnp.float32), 0.0)
    w = w / jnp.maximum(jnp.sum(w), 1e-30)
    scaled = uploads._replace(values=uploads.values * w[..., None])
    return server_lib.apply_uploads(server, scaled), state

  return Aggregation(_no_state, apply, "weighted_mean()")


def entry_mean() -> Aggregation:
  """Each entry moves by the mean of the values received for it."""
  def apply(server, state, uploads, weights):
    del weights
    idx = uploads.indices.reshape(-1)
    mask = uploads.mask.reshape(-1)
    vals = jnp.where(mask, uploads.values.reshape(-1), 0.0)
    total = jnp.zeros_like(server.params).at[idx].add(vals)
    count = jnp.zeros_like(server.params).at[idx].add(mask.astype(
        server.params.dtype))
    params = server.params + total / jnp.maximum(count, 1.0)
    return server.replace(params=params, stat=server.stat + count), state

  return Aggregation(_no_state, apply, "entry_mean()")


def with_server_optimizer(base: Aggregation,
                          optimizer: optax.GradientTransformation,
                          name: str = "optimizer") -> Aggregation:
  """``base``, then ``optimizer`` applied to the aggregate update.

  The aggregate update Δ = (base's new parameters) − (old parameters) is
  the negative pseudo-gradient: the server sets its parameters to
  ``old + optimizer.update(−Δ)``. The update counters are ``base``'s.

  Args:
    base: the aggregation whose update is transformed.
    optimizer: e.g. ``optax.sgd(η, momentum=β)`` (FedAvgM with β > 0).
    name: how the optimizer prints.
  """
  def init(params):
    return (base.init(params), optimizer.init(params))

  def apply(server, state, uploads, weights):
    base_state, opt_state = state
    new, base_state = base.apply(server, base_state, uploads, weights)
    grad = server.params - new.params
    updates, opt_state = optimizer.update(grad, opt_state, server.params)
    params = optax.apply_updates(server.params, updates)
    return new.replace(params=params), (base_state, opt_state)

  return Aggregation(init, apply, f"with_server_optimizer({base.name}, "
                     f"{name})")


def make_aggregation(name: str, learning_rate: float = 1.0,
                     momentum: float = 0.0) -> Aggregation:
  """The command line's aggregation (``--aggregation``, and FedOpt's
  ``--server_learning_rate``/``--server_momentum``: without them the
  aggregation is used as it is, exactly).

  >>> make_aggregation("sum")
  sum_uploads()
  >>> make_aggregation("weighted_mean", 0.5, 0.9)
  with_server_optimizer(weighted_mean(), sgd(0.5, momentum=0.9))
  """
  base = {"sum": sum_uploads, "weighted_mean": weighted_mean,
          "entry_mean": entry_mean}[name]()
  if learning_rate == 1.0 and momentum == 0.0:
    return base
  return with_server_optimizer(
      base, optax.sgd(learning_rate, momentum=momentum or None),
      f"sgd({learning_rate:g}" + (f", momentum={momentum:g})" if momentum
                                  else ")"))

