"""The ``async`` protocol: stale downloads and lost exchanges (SPEC section 3).

Participants run at different speeds, so an upload is applied to a newer
server state than the one the participant trained on, and the network loses
some exchanges. One epoch of :func:`make_async_epoch`:

1. Every participant i draws a staleness ``s_i`` in ``[0, max_staleness]``
   (``--staleness``: ``constant`` s = max_staleness; ``uniform`` on
   {0..max_staleness}; ``geometric`` P(s) = 2^-(s+1), the tail mass put on
   max_staleness) and a loss flag ``lost_i ~ Bernoulli(--upload_loss)``.
2. Participant i downloads (θd, as in ``parallel``) from the server snapshot
   taken ``s_i`` epochs ago. The last ``max_staleness + 1`` snapshots (the
   global parameters and their update counters) are kept in a ring buffer,
   which is the epoch function's extra, checkpointed state; before the first
   epoch every slot holds the initial server.
3. All participants train at the same time (over the participant axis,
   exactly as :func:`dssgd_jax.protocols.parallel_epoch`) and select,
   bound and noise their uploads.
4. The uploads are added to the *current* server state. A participant whose
   exchange is lost in this epoch neither downloads (it keeps training from
   its own parameters) nor gets its upload through; its upload is masked out.

So ``max_staleness=0, upload_loss=0`` is the ``parallel`` protocol (same keys,
same numbers), and ``upload_loss=1`` is ``standalone`` (nothing is exchanged).
Everything is drawn from the epoch key (``fold_in(key, 0x5A1E)`` for the
staleness and loss draws; the participants' own keys are the ones
``parallel`` uses), so a run is deterministic for a seed and resumes exactly.
There is no Python loop over participants or steps: the epoch is one jitted
program whatever the staleness.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

from dssgd_jax import protocols
from dssgd_jax import server as server_lib
from dssgd_jax.selection import Upload

STALENESS = ("constant", "uniform", "geometric")
_ASYNC_SALT = 0x5A1E


def draw_staleness(key: jax.Array, num: int, dist: str, max_staleness: int
                   ) -> jax.Array:
  """(num,) int32 staleness in [0, max_staleness] from distribution ``dist``."""
  if max_staleness == 0:
    return jnp.zeros((num,), jnp.int32)
  if dist == "constant":
    return jnp.full((num,), max_staleness, jnp.int32)
  if dist == "uniform":
    return jax.random.randint(key, (num,), 0, max_staleness + 1, jnp.int32)
  if dist == "geometric":
    s = jax.random.geometric(key, 0.5, (num,)) - 1  # P(s) = 2^-(s+1)
    return jnp.minimum(s, max_staleness).astype(jnp.int32)
  raise ValueError(f"unknown staleness distribution {dist!r}; expected one of "
                   f"{STALENESS}")


def draw_loss(key: jax.Array, num: int, probability: float) -> jax.Array:
  """(num,) bool, True where a participant's exchange is lost this epoch."""
  if probability <= 0:
    return jnp.zeros((num,), bool)
  if probability >= 1:
    return jnp.ones((num,), bool)
  return jax.random.bernoulli(key, probability, (num,))


def _snapshot_masks(spec, ring_params, ring_stat, staleness, dl_keys):
  """(P, D) download masks, each from the participant's stale snapshot."""
  num = dl_keys.shape[0]
  d = ring_params.shape[-1]
  if not spec.download:
    return jnp.zeros((num, d), bool)
  if spec.download_rule == "most_updated" and spec.download_count < d:
    # One mask per snapshot (at most max_staleness + 1), then a gather.
    per_snapshot = jax.vmap(lambda p, s: server_lib.download_mask(
        "most_updated", server_lib.ServerState(p, s, jnp.zeros((), jnp.int32)),
        spec.download_count, dl_keys[0]))(ring_params, ring_stat)
    return per_snapshot[staleness]
  return jax.vmap(lambda s, k: server_lib.download_mask(
      spec.download_rule,
      server_lib.ServerState(ring_params[s], ring_stat[s],
                             jnp.zeros((), jnp.int32)),
      spec.download_count, k))(staleness, dl_keys)


def make_async_epoch(update: Callable, spec: protocols.ExchangeSpec, cfg: Any
                     ) -> Callable:
  """Builds the ``async`` epoch.

  Args:
    update: from :func:`dssgd_jax.protocols.make_participant_update`.
    spec: the exchange spec ``update`` was built with (``aggregate='sum'``).
    cfg: the run config (``staleness``, ``max_staleness``, ``upload_loss``).

  Returns:
    ``epoch(server, local, images, labels, key, extra) -> (server, local,
    EpochStats, extra)`` with an ``init_extra(state) -> extra`` attribute;
    ``extra`` is ``{"params": (S+1, D), "stat": (S+1, D)}``, the ring of the
    last S+1 server snapshots, newest first.
  """
  if spec.aggregate != "sum":
    raise ValueError("--protocol=async needs additive uploads (DSSGD), not "
                     f"aggregate={spec.aggregate!r}")
  max_s = int(cfg.max_staleness)
  dist = str(cfg.staleness)
  loss_p = float(cfg.upload_loss)
  if dist not in STALENESS:
    raise ValueError(f"--staleness={dist!r} is not one of {STALENESS}")

  def init_extra(state) -> dict:
    server = state["server"]
    return {"params": jnp.tile(server.params[None], (max_s + 1, 1)),
            "stat": jnp.tile(server.stat[None], (max_s + 1, 1))}

  def epoch(server, local, images, labels, key, extra):
    num = local.shape[0]
    dl_keys, up_keys = protocols._split_keys(  # pylint: disable=protected-access
        protocols.participant_keys(key, num))
    k_stale, k_loss = jax.random.split(jax.random.fold_in(key, _ASYNC_SALT))
    staleness = draw_staleness(k_stale, num, dist, max_s)
    lost = draw_loss(k_loss, num, loss_p)
    # The ring holds the snapshots taken at the start of the last S+1 epochs;
    # slot 0 is the current server (kept in sync with ``server``).
    ring_params = extra["params"].at[0].set(server.params)
    ring_stat = extra["stat"].at[0].set(server.stat)
    masks = _snapshot_masks(spec, ring_params, ring_stat, staleness, dl_keys)
    masks = masks & ~lost[:, None]
    if max_s == 0:
      new_local, uploads, losses = protocols.map_participants(
          update, (None, 0, 0, 0, 0, 0),
          (server.params, masks, local, images, labels, up_keys),
          spec.participant_axis, spec.mesh)
    else:
      new_local, uploads, losses = protocols.map_participants(
          update, (0,) * 6,
          (ring_params[staleness], masks, local, images, labels, up_keys),
          spec.participant_axis, spec.mesh)
    uploads = Upload(uploads.indices, uploads.values,
                     uploads.mask & ~lost[:, None])
    server = server_lib.apply_uploads(server, uploads)
    server = server_lib.end_epoch(server, spec.stat_decay, spec.decay_every)
    # Push the new state; the oldest snapshot falls off the end.
    extra = {"params": jnp.concatenate([server.params[None],
                                        ring_params[:-1]]),
             "stat": jnp.concatenate([server.stat[None], ring_stat[:-1]])}
    downloaded = (jnp.sum(masks, axis=-1) if spec.download
                  else jnp.zeros((num,)))
    stats = protocols.EpochStats(losses, uploads.count, downloaded)
    return server, new_local, stats, extra

  epoch.init_extra = init_extra
  return epoch
