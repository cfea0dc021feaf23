"""The parameter server: its state, its functional update, and downloads.

Paper section 3 ("The parameter server initializes the parameter vector W and
handles upload and download requests"), SPEC section 3 "Server state" and
"Download selection".

The state is a pytree (:class:`ServerState`): the global flat parameters
``params`` (w_g, length D), per-entry update counters ``stat`` and an epoch
counter. :func:`apply_uploads` adds every valid uploaded value at its index
(duplicates from several participants add up) and increments ``stat`` there;
:func:`end_epoch` multiplies ``stat`` by β every ``decay_every`` epochs so that
recently updated entries weigh more in ``most_updated`` downloads.

>>> import jax.numpy as jnp
>>> from dssgd_jax.selection import Upload
>>> state = init(jnp.zeros(4))
>>> up = Upload(jnp.array([[1, 3], [1, 0]]), jnp.array([[1., 2.], [5., 9.]]),
...             jnp.array([[True, True], [True, False]]))
>>> state = apply_uploads(state, up)
>>> state.params.tolist(), state.stat.tolist()
([0.0, 6.0, 0.0, 2.0], [0.0, 2.0, 0.0, 1.0])
"""

import math

import flax.struct
import jax
import jax.numpy as jnp

from dssgd_jax.selection import Upload, top_k_mask


@flax.struct.dataclass
class ServerState:
  """The parameter server's state (a pytree).

  Attributes:
    params: float32 (D,) global parameter vector w_g.
    stat: float32 (D,) how often (decayed) each entry was updated.
    epoch: int32 scalar, number of completed epochs.
  """
  params: jax.Array
  stat: jax.Array
  epoch: jax.Array


def init(params: jax.Array) -> ServerState:
  """A fresh server holding ``params`` with zero update counters."""
  params = jnp.asarray(params, jnp.float32)
  return ServerState(params, jnp.zeros_like(params), jnp.zeros((), jnp.int32))


def apply_uploads(state: ServerState, uploads: Upload) -> ServerState:
  """Adds sparse uploads to the global vector (any number of leading axes).

  Invalid slots (``mask`` False) are ignored. Values at the same index from
  several uploads add up. ``stat`` counts valid updates per entry.
  """
  idx = uploads.indices.reshape(-1)
  vals = jnp.where(uploads.mask, uploads.values, 0.0).reshape(-1)
  counts = uploads.mask.astype(jnp.float32).reshape(-1)
  params = state.params.at[idx].add(vals.astype(state.params.dtype))
  stat = state.stat.at[idx].add(counts)
  return state.replace(params=params, stat=stat)


def end_epoch(state: ServerState, stat_decay: float = 1.0,
              decay_every: int = 1) -> ServerState:
  """Advances the epoch counter; every ``decay_every`` epochs ``stat *= β``."""
  epoch = state.epoch + 1
  decay = jnp.where(epoch % decay_every == 0, stat_decay, 1.0)
  return state.replace(stat=state.stat * decay, epoch=epoch)


def download_count(fraction: float, num_params: int) -> int:
  """``ceil(θd·D)``, the number of entries a participant downloads."""
  if fraction <= 0:
    return 0
  return min(num_params, int(math.ceil(fraction * num_params - 1e-9)))


DOWNLOAD_RULES = ("all", "most_updated", "random")


def download_mask(rule: str, state: ServerState, count: int,
                  key: jax.Array) -> jax.Array:
  """Boolean (D,) mask of the entries a participant downloads.

  Args:
    rule: ``all`` (every entry; θd = 1), ``most_updated`` (the ``count``
      entries with the largest ``stat``, ties to the lower index) or
      ``random`` (a uniformly random subset of ``count`` entries).
    state: the server state.
    count: static number of entries ``ceil(θd·D)``.
    key: PRNG key (used by ``random``).
  """
  d = state.params.shape[0]
  if count == 0:
    return jnp.zeros((d,), bool)
  if rule == "all" or count >= d:
    return jnp.ones((d,), bool)
  if rule == "most_updated":
    return top_k_mask(state.stat, count)
  if rule == "random":
    return top_k_mask(jax.random.uniform(key, (d,)), count)
  raise ValueError(f"unknown download rule {rule!r}")


def download(local: jax.Array, state: ServerState, mask: jax.Array
             ) -> jax.Array:
  """The participant overwrites exactly the downloaded entries of ``local``."""
  return jnp.where(mask, state.params, local)
