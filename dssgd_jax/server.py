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
from typing import Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dssgd_jax.selection import Upload, random_ranks, top_k_mask


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
  """``ceil(θd·D)``, the number of entries a participant downloads.

  >>> download_count(0.1, 105506)
  10551
  """
  if fraction <= 0:
    return 0
  return min(num_params, int(math.ceil(fraction * num_params - 1e-9)))


# The download rules by the names the command line uses (``--download_rule``;
# ``auto`` there means all at θd = 1, else most_updated).
DOWNLOAD_RULES = ("all", "most_updated", "random")


class DownloadRule(NamedTuple):
  """Which entries of w_g a participant downloads (SPEC section 3).

  Attributes:
    mask: ``(server_state, key) -> bool (D,)``, pure and vmappable.
    name: how it prints.
    uses_key: whether the mask is random (each participant draws its own);
      otherwise every participant that sees the same server state gets the
      same mask, computed once.
  """
  mask: Callable[[ServerState, jax.Array], jax.Array]
  name: str
  uses_key: bool = False

  def __repr__(self) -> str:
    return self.name


def wire_bytes(entries, num_params: int) -> float:
  """Mean bytes per participant of sending ``entries`` (P,) entries each: a
  dense float32 vector (4·D) when every entry goes, else 8 per (int32 index,
  float32 value) pair. The cost of uploads and downloads alike.

  >>> wire_bytes([5, 2, 0], 5)   # (20 + 16 + 0) / 3
  12.0
  """
  entries = np.asarray(entries, np.float64)
  per = np.where(entries >= num_params, 4.0 * num_params, 8.0 * entries)
  return float(per.mean())


def download_none() -> DownloadRule:
  """Nothing (a participant that trains alone)."""
  return DownloadRule(lambda state, key: jnp.zeros(state.params.shape, bool),
                      "download_none()")


def download_all() -> DownloadRule:
  """Every entry (θd = 1), sent as a dense vector."""
  return DownloadRule(lambda state, key: jnp.ones(state.params.shape, bool),
                      "download_all()")


def download_most_updated(count: int) -> DownloadRule:
  """The paper's rule: the ``count`` entries updated most often (the largest
  decayed ``stat``; ties to the lower index).

  >>> state = ServerState(jnp.zeros(4), jnp.array([0., 3., 1., 3.]),
  ...                     jnp.zeros((), jnp.int32))
  >>> download_most_updated(2).mask(state, None).tolist()
  [False, True, False, True]
  """
  return DownloadRule(lambda state, key: top_k_mask(state.stat, count),
                      f"download_most_updated({count})")


def download_random(count: int) -> DownloadRule:
  """A uniformly random subset of exactly ``count`` entries (exact ranks)."""
  return DownloadRule(
      lambda state, key: top_k_mask(
          random_ranks(key, state.params.shape[-1]), count),
      f"download_random({count})", uses_key=True)


def download(local: jax.Array, state: ServerState, mask: jax.Array
             ) -> jax.Array:
  """The participant overwrites exactly the downloaded entries of ``local``."""
  return jnp.where(mask, state.params, local)
