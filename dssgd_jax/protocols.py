"""Protocols: who talks to the parameter server when, over one epoch.

Paper section 3, SPEC section 3 "Protocols". Every protocol is a
:class:`Protocol`, two pure functions::

    state = protocol.init(server, local)        # a State
    state, stats = protocol.epoch(state, data, key)

so the run loop, checkpoints and device placement have no special case for
any of them. ``local`` is the participants' :class:`~dssgd_jax.participant.
LocalState` (the (P, D) stack of flat parameters and their optimizers'
states) and ``data`` their private :class:`~dssgd_jax.participant.
ParticipantData`, each with a leading participant axis. A protocol is built
from a participant ``update`` (:func:`dssgd_jax.participant.make_update`:
download, local epoch, upload rule), a :class:`~dssgd_jax.server.
DownloadRule` and an :class:`~dssgd_jax.aggregation.Aggregation` (how the
server combines what it receives; the paper's sum by default):

* :func:`round_robin` — the paper's sequential protocol: participant 1
  downloads, trains and uploads, then participant 2 sees the result, and so
  on (a ``lax.scan`` over participants);
* :func:`parallel` — every participant downloads the same snapshot, they
  train at the same time (:func:`map_participants` over the participant
  axis) and the server aggregates all uploads;
* :func:`asynchronous` — ``async``: stale downloads from a ring of past
  server snapshots, uploads applied to the current server.

The state is a typed pytree (:class:`State`: ``server``, ``local``, the
async ``ring``, the aggregation's own state), so checkpoints store every
array under a name such as ``state.local.params``.

Every protocol takes ``upload_loss`` and ``download_loss``: each epoch each
participant's upload (download) is lost with that probability; a lost upload
never reaches the server, a lost download leaves the participant training
from its own parameters. Per-participant keys are ``fold_in(key, i)``, so a
participant draws the same numbers whatever the protocol or device layout.
"""

from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from dssgd_jax import aggregation as aggregation_lib
from dssgd_jax import server as server_lib
from dssgd_jax.participant import LocalState, ParticipantData
from dssgd_jax.selection import Upload

PROTOCOLS = ("round_robin", "parallel", "async")
PARTICIPANT_AXES = ("vmap", "map")
STALENESS = ("constant", "uniform", "geometric")
_LOSS_SALT = 0x1055
_ASYNC_SALT = 0x5A1E


class EpochStats(NamedTuple):
  """Per-participant diagnostics of one epoch (arrays of shape (P,)).

  A transfer lost on the way counts for nothing, in both directions: the
  entries (and bytes) are those that arrived.

  Attributes:
    loss: mean local training loss.
    uploaded: entries of its upload that reached the server (0 when lost).
    downloaded: entries it received (0 when its download was lost).
    upload_lost: True where its upload did not reach the server.
    download_lost: True where its download did not reach it.
    received: the uploads as the server received them, (P, c) (a lost one
      all masked): what an observer at the server sees (the canary audit
      scores it).
    staleness: for the arrival-order protocol, each upload's staleness (the
      uploads of others the server applied between its download and its
      arrival); None otherwise.
  """
  loss: jax.Array
  uploaded: jax.Array
  downloaded: jax.Array
  upload_lost: jax.Array
  download_lost: jax.Array | None = None
  received: Upload | None = None
  staleness: jax.Array | None = None


@flax.struct.dataclass
class Ring:
  """The async protocol's last ``max_staleness + 1`` server snapshots,
  newest first: parameters and update counters, (S + 1, D) each."""
  params: jax.Array
  stat: jax.Array


@flax.struct.dataclass
class State:
  """A protocol's state (a pytree).

  Attributes:
    server: the parameter server's :class:`~dssgd_jax.server.ServerState`.
    local: every participant's :class:`~dssgd_jax.participant.LocalState`
      (leading participant axis).
    ring: the async protocol's :class:`Ring` (None otherwise).
    aggregation: the aggregation's own state (e.g. server momentum; ``()``
      for the paper's sum).
  """
  server: server_lib.ServerState
  local: LocalState
  ring: Ring | None = None
  aggregation: Any = ()


class Protocol(NamedTuple):
  """``init(server, local) -> State``; ``epoch(state, data, key) ->
  (State, EpochStats)``. Both pure; ``epoch`` is jitted by the caller."""
  init: Callable[[server_lib.ServerState, LocalState], State]
  epoch: Callable[..., tuple[State, EpochStats]]
  name: str


# Models for which ``lax.map`` beats ``vmap`` on XLA:CPU (docs/benchmarks.md):
# the 5x5 convolutions on 32x32 images, where one participant's step is big
# enough to use the cores; on the small models ``vmap``'s batching wins.
CPU_MAP_MODELS = ("mnist_cnn", "svhn_cnn")


def auto_lowering(model: str) -> str:
  """The participant-axis lowering ``auto`` picks for ``model`` here.

  CPU: ``map`` (``lax.map``) for the 32x32 CNNs of :data:`CPU_MAP_MODELS`
  (1.1-1.4x the speed of ``vmap``), ``vmap`` for the MLPs and the digits CNN
  (1.2-3.5x the speed of ``map``). GPU and TPU: ``vmap`` (one batched
  program keeps the accelerator busy at batch 1). Numbers in
  docs/benchmarks.md.

  >>> auto_lowering("mnist_mlp")
  'vmap'
  """
  if jax.default_backend() == "cpu" and model in CPU_MAP_MODELS:
    return "map"
  return "vmap"


class ParticipantAxis(NamedTuple):
  """How the participant axis of the parallel protocols is computed.

  Attributes:
    lowering: ``vmap`` (one batched program; the choice on GPU and TPU) or
      ``map`` (``lax.map``: participants one after another inside one
      program; faster for the 32x32 CNNs on CPU, docs/benchmarks.md). Both
      give the same numbers to float tolerance.
    mesh: with ``map``, the device mesh whose first axis splits the
      participants (``shard_map``); None on one device.
  """
  lowering: str = "vmap"
  mesh: Any = None


def map_participants(fn: Callable, in_axes: tuple, args: tuple,
                     lowering: str = "vmap", mesh: Any = None) -> Any:
  """``jax.vmap(fn, in_axes)(*args)``, computed with the chosen lowering.

  Args:
    fn: the per-participant function.
    in_axes: 0 (mapped over the leading participant axis) or None
      (broadcast) for each argument.
    args: the arguments.
    lowering: ``vmap`` (batched) or ``map`` (``lax.map``: one participant at
      a time inside the same program, so every matrix product is a plain
      single-participant one; the faster lowering on CPU).
    mesh: with ``map``, a mesh whose first axis splits the participants
      (``jax.shard_map``; each device maps over its share).

  Returns:
    The outputs stacked along a leading participant axis, as ``vmap``.

  >>> f = lambda w, x: w * x
  >>> map_participants(f, (None, 0), (2.0, jnp.arange(3.0)), "map")
  Array([0., 2., 4.], dtype=float32)
  """
  if lowering == "vmap":
    return jax.vmap(fn, in_axes=in_axes)(*args)
  if lowering != "map":
    raise ValueError(f"participant_axis={lowering!r} is not one of "
                     f"{PARTICIPANT_AXES}")
  if any(ax not in (0, None) for ax in in_axes):
    raise ValueError(f"map_participants takes in_axes 0 or None: {in_axes}")
  bcast = tuple(a for a, ax in zip(args, in_axes) if ax is None)
  mapped = tuple(a for a, ax in zip(args, in_axes) if ax is not None)

  def run(bcast, mapped):
    def one(xs):
      b, m = iter(bcast), iter(xs)
      return fn(*[next(b) if ax is None else next(m) for ax in in_axes])
    return jax.lax.map(one, mapped)

  if mesh is None:
    return run(bcast, mapped)
  from jax.sharding import PartitionSpec  # pylint: disable=g-import-not-at-top
  axis = mesh.axis_names[0]
  return jax.shard_map(run, mesh=mesh,
                       in_specs=(PartitionSpec(), PartitionSpec(axis)),
                       out_specs=PartitionSpec(axis),
                       check_vma=False)(bcast, mapped)


def participant_keys(key: jax.Array, num_participants: int) -> jax.Array:
  """Per-participant keys ``fold_in(key, i)``, independent of the protocol."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(
      jnp.arange(num_participants))


def _split_keys(keys):
  both = jax.vmap(jax.random.split)(keys)
  return both[:, 0], both[:, 1]


def draw_losses(key: jax.Array, num: int, upload_loss: float,
                download_loss: float) -> tuple[jax.Array, jax.Array]:
  """(upload lost, download lost), each (num,) bool, for one epoch.

  >>> up, down = draw_losses(jax.random.key(0), 3, 1.0, 0.0)
  >>> up.tolist(), down.tolist()
  ([True, True, True], [False, False, False])
  """
  k_up, k_down = jax.random.split(jax.random.fold_in(key, _LOSS_SALT))

  def draw(k, p):
    if p <= 0:
      return jnp.zeros((num,), bool)
    if p >= 1:
      return jnp.ones((num,), bool)
    return jax.random.bernoulli(k, p, (num,))

  return draw(k_up, upload_loss), draw(k_down, download_loss)


def _masks(download: server_lib.DownloadRule, server, dl_keys, lost):
  """(P, D) download masks from one server state; lost downloads are empty."""
  if not download.uses_key:
    mask = download.mask(server, dl_keys[0])  # the same for everyone
    masks = jnp.broadcast_to(mask, (dl_keys.shape[0],) + mask.shape)
  else:
    masks = jax.vmap(lambda k: download.mask(server, k))(dl_keys)
  return masks & ~lost[:, None]


def _drop(uploads: Upload, lost: jax.Array) -> Upload:
  return uploads._replace(mask=uploads.mask & ~lost[..., None])


def example_weights(data: ParticipantData) -> jax.Array:
  """(P,) each participant's number of real examples (the aggregation's
  weights)."""
  if data.count is not None:
    return data.count.astype(jnp.float32)
  return jnp.full(data.labels.shape[:1], data.labels.shape[1], jnp.float32)


def _stats(losses, uploads, masks, up_lost, dl_lost):
  """Delivered entries only (a lost transfer counts 0): ``masks`` already
  exclude lost downloads."""
  received = _drop(uploads, up_lost)
  return EpochStats(losses, jnp.where(up_lost, 0, uploads.count),
                    jnp.sum(masks, axis=-1), up_lost, dl_lost, received)


def _end(server, stat_decay, decay_every):
  return server_lib.end_epoch(server, stat_decay, decay_every)


def _aggregation(aggregation):
  return aggregation_lib.sum_uploads() if aggregation is None else aggregation


def _plain_init(aggregation):
  def init(server, local):
    return State(server, local, None, aggregation.init(server.params))
  return init


def parallel(update: Callable, download: server_lib.DownloadRule, *,
             aggregation: aggregation_lib.Aggregation | None = None,
             stat_decay: float = 1.0, decay_every: int = 1,
             upload_loss: float = 0.0, download_loss: float = 0.0,
             axis: ParticipantAxis = ParticipantAxis()) -> Protocol:
  """All participants train on the same server snapshot.

  Args:
    update: from :func:`dssgd_jax.participant.make_update`.
    download: the download rule.
    aggregation: how the server combines the uploads (default: the paper's
      :func:`~dssgd_jax.aggregation.sum_uploads`).
    stat_decay: β, applied to the server's update counters ...
    decay_every: ... every this many epochs.
    upload_loss, download_loss: loss probabilities per participant per epoch.
    axis: how the participant axis is computed.
  """
  aggregation = _aggregation(aggregation)

  def epoch(state, data, key):
    server, local = state.server, state.local
    num = local.params.shape[0]
    dl_keys, up_keys = _split_keys(participant_keys(key, num))
    up_lost, dl_lost = draw_losses(key, num, upload_loss, download_loss)
    masks = _masks(download, server, dl_keys, dl_lost)
    new_local, uploads, losses = map_participants(
        update, (None, 0, 0, 0, 0),
        (server.params, masks, local, data, up_keys), axis.lowering,
        axis.mesh)
    stats = _stats(losses, uploads, masks, up_lost, dl_lost)
    server, agg = aggregation.apply(server, state.aggregation, stats.received,
                                    example_weights(data))
    server = _end(server, stat_decay, decay_every)
    return State(server, new_local, None, agg), stats

  return Protocol(_plain_init(aggregation), epoch, "parallel")


def round_robin(update: Callable, download: server_lib.DownloadRule, *,
                aggregation: aggregation_lib.Aggregation | None = None,
                stat_decay: float = 1.0, decay_every: int = 1,
                upload_loss: float = 0.0, download_loss: float = 0.0
                ) -> Protocol:
  """The paper's sequential protocol (a scan over participants).

  Participant i downloads from the server state left by participants 0..i-1
  in the same epoch, trains, and uploads before participant i+1 starts (the
  aggregation applies each upload as it arrives). Arguments as in
  :func:`parallel`.
  """
  aggregation = _aggregation(aggregation)

  def epoch(state, data, key):
    server, local = state.server, state.local
    num = local.params.shape[0]
    dl_keys, up_keys = _split_keys(participant_keys(key, num))
    up_lost, dl_lost = draw_losses(key, num, upload_loss, download_loss)
    weights = example_weights(data)

    def body(carry, xs):
      srv, agg = carry
      loc, dat, k_dl, k_up, u_lost, d_lost, w = xs
      mask = _masks(download, srv, k_dl[None], d_lost[None])[0]
      new_loc, upload, loss = update(srv.params, mask, loc, dat, k_up)
      got = _drop(upload, u_lost)
      srv, agg = aggregation.apply(
          srv, agg, jax.tree_util.tree_map(lambda x: x[None], got), w[None])
      return (srv, agg), (new_loc, loss, upload.count, jnp.sum(mask), got)

    (server, agg), (new_local, losses, up, down, received) = jax.lax.scan(
        body, (server, state.aggregation),
        (local, data, dl_keys, up_keys, up_lost, dl_lost, weights))
    server = _end(server, stat_decay, decay_every)
    return State(server, new_local, None, agg), EpochStats(
        losses, jnp.where(up_lost, 0, up), down, up_lost, dl_lost, received)

  return Protocol(_plain_init(aggregation), epoch, "round_robin")


def draw_staleness(key: jax.Array, num: int, dist: str, max_staleness: int
                   ) -> jax.Array:
  """(num,) int32 staleness in [0, max_staleness] from distribution ``dist``:
  ``constant`` (s = max_staleness), ``uniform`` on {0..max_staleness} or
  ``geometric`` (P(s) = 2^-(s+1), the tail mass on max_staleness)."""
  if max_staleness == 0:
    return jnp.zeros((num,), jnp.int32)
  if dist == "constant":
    return jnp.full((num,), max_staleness, jnp.int32)
  if dist == "uniform":
    return jax.random.randint(key, (num,), 0, max_staleness + 1, jnp.int32)
  if dist == "geometric":
    s = jax.random.geometric(key, 0.5, (num,)) - 1
    return jnp.minimum(s, max_staleness).astype(jnp.int32)
  raise ValueError(f"unknown staleness distribution {dist!r}; expected one of "
                   f"{STALENESS}")


def asynchronous(update: Callable, download: server_lib.DownloadRule, *,
                 aggregation: aggregation_lib.Aggregation | None = None,
                 staleness: str = "constant", max_staleness: int = 0,
                 stat_decay: float = 1.0, decay_every: int = 1,
                 upload_loss: float = 0.0, download_loss: float = 0.0,
                 axis: ParticipantAxis = ParticipantAxis()) -> Protocol:
  """``async``: participants run at different speeds (SPEC section 3).

  Each epoch participant i draws a staleness s_i in [0, max_staleness]
  (:func:`draw_staleness`) and downloads from the server snapshot taken s_i
  epochs ago; the last ``max_staleness + 1`` snapshots (parameters and
  update counters) are kept in a :class:`Ring`, part of the protocol state
  (newest first; before the first epoch every slot holds the initial
  server). All participants train at the same time, and their uploads are
  aggregated into the *current* server. ``max_staleness=0`` is
  :func:`parallel` (same keys, same numbers); ``upload_loss=1`` and
  ``download_loss=1`` is standalone training. Everything is drawn from the
  epoch key, so a run is deterministic for a seed and resumes exactly.
  """
  if staleness not in STALENESS:
    raise ValueError(f"staleness={staleness!r} is not one of {STALENESS}")
  max_s = int(max_staleness)
  aggregation = _aggregation(aggregation)

  def init(server, local):
    ring = Ring(jnp.tile(server.params[None], (max_s + 1, 1)),
                jnp.tile(server.stat[None], (max_s + 1, 1)))
    return State(server, local, ring, aggregation.init(server.params))

  def epoch(state, data, key):
    server, local, ring = state.server, state.local, state.ring
    num = local.params.shape[0]
    dl_keys, up_keys = _split_keys(participant_keys(key, num))
    up_lost, dl_lost = draw_losses(key, num, upload_loss, download_loss)
    stale = draw_staleness(jax.random.fold_in(key, _ASYNC_SALT), num,
                           staleness, max_s)
    # Slot 0 is the current server.
    ring_params = ring.params.at[0].set(server.params)
    ring_stat = ring.stat.at[0].set(server.stat)

    def snapshot(s):
      return server_lib.ServerState(ring_params[s], ring_stat[s],
                                    jnp.zeros((), jnp.int32))

    if max_s == 0:
      masks = _masks(download, server, dl_keys, dl_lost)
      new_local, uploads, losses = map_participants(
          update, (None, 0, 0, 0, 0),
          (server.params, masks, local, data, up_keys), axis.lowering,
          axis.mesh)
    else:
      if download.uses_key:  # each participant draws its own mask
        masks = jax.vmap(lambda s, k: download.mask(snapshot(s), k))(
            stale, dl_keys)
      else:  # one mask per snapshot (at most max_staleness + 1), gathered
        masks = jax.vmap(lambda s: download.mask(snapshot(s), dl_keys[0]))(
            jnp.arange(max_s + 1))[stale]
      masks = masks & ~dl_lost[:, None]
      new_local, uploads, losses = map_participants(
          update, (0,) * 5,
          (ring_params[stale], masks, local, data, up_keys),
          axis.lowering, axis.mesh)
    stats = _stats(losses, uploads, masks, up_lost, dl_lost)
    server, agg = aggregation.apply(server, state.aggregation, stats.received,
                                    example_weights(data))
    server = _end(server, stat_decay, decay_every)
    ring = Ring(jnp.concatenate([server.params[None], ring_params[:-1]]),
                jnp.concatenate([server.stat[None], ring_stat[:-1]]))
    return State(server, new_local, ring, agg), stats

  return Protocol(init, epoch, "async")


@flax.struct.dataclass
class Arrivals:
  """The arrival-order protocol's per-participant bookkeeping.

  Attributes:
    params, stat: (P, D) the server's parameters and update counters when
      each participant's outstanding download was taken.
    visits: (P,) int32 how many times each participant has trained.
    sent_at: (P,) int32 how many uploads the server had applied when it
      sent each participant its download.
    applied: int32 scalar, uploads applied so far.
  """
  params: jax.Array
  stat: jax.Array
  visits: jax.Array
  sent_at: jax.Array
  applied: jax.Array


def visit_key(train_key: jax.Array, visit: jax.Array, index) -> jax.Array:
  """The key of participant ``index``'s ``visit``-th training (1-based):
  the key the synchronous protocols give it in epoch ``visit``
  (``fold_in(fold_in(train_key, visit), index)``, as
  :func:`participant_keys`), so a deployed participant numbers its visits
  as epochs."""
  return jax.random.fold_in(jax.random.fold_in(train_key, visit), index)


def arrivals(update: Callable, download: server_lib.DownloadRule,
             order: Any, train_key: jax.Array, *,
             aggregation: aggregation_lib.Aggregation | None = None,
             stat_decay: float = 1.0, decay_every: int = 1) -> Protocol:
  """Asynchronous DSSGD with the uploads applied in a given arrival order:
  what a deployed asynchronous run computes (:mod:`dssgd_jax.flower.
  server_app`), replayed from its recorded order.

  Every participant trains from the server state it was last sent: at the
  start, the initial server; then the server right after its own previous
  upload was applied (the server answers each upload with the next
  download). Its upload is applied to the *current* server on arrival, so
  it is stale by the uploads of others applied since its download.
  Epoch e is the e-th block of P arrivals, ``order[e - 1]`` (participant
  indices; a fast participant may appear twice in a block, a slow one not
  at all). Participant i's r-th training uses :func:`visit_key`
  ``(train_key, r, i)``, as a deployed participant does.

  Args:
    update, download: as :func:`parallel`.
    order: (E, P) int the arrivals, epoch by epoch.
    train_key: the run's train key (the visits' keys derive from it).
    aggregation, stat_decay, decay_every: as :func:`parallel`.

  Returns:
    The protocol (name ``arrivals``); its ``EpochStats`` are per arrival (P
    entries, in arrival order, ``staleness`` included), and the state's
    ``ring`` field holds the :class:`Arrivals` bookkeeping.
  """
  order = jnp.asarray(order, jnp.int32)
  aggregation = _aggregation(aggregation)

  def init(server, local):
    num = local.params.shape[0]
    book = Arrivals(jnp.tile(server.params[None], (num, 1)),
                    jnp.tile(server.stat[None], (num, 1)),
                    jnp.zeros((num,), jnp.int32), jnp.zeros((num,), jnp.int32),
                    jnp.zeros((), jnp.int32))
    return State(server, local, book, aggregation.init(server.params))

  def epoch(state, data, key):
    del key  # each visit's key comes from the train key and its number
    events = order[state.server.epoch]

    def body(carry, i):
      srv, agg, local, book = carry
      visit = book.visits[i] + 1
      k = jax.random.split(visit_key(train_key, visit, i))
      k_dl, k_up = k[0], k[1]
      snap = server_lib.ServerState(book.params[i], book.stat[i],
                                    jnp.zeros((), jnp.int32))
      mask = download.mask(snap, k_dl)
      mine = jax.tree_util.tree_map(lambda x: x[i], local)
      dat = jax.tree_util.tree_map(lambda x: x[i], data)
      new, upload, loss = update(book.params[i], mask, mine, dat, k_up)
      srv, agg = aggregation.apply(
          srv, agg, jax.tree_util.tree_map(lambda x: x[None], upload),
          example_weights(data)[i][None])
      stale = book.applied - book.sent_at[i]
      applied = book.applied + 1
      local = jax.tree_util.tree_map(lambda a, b: a.at[i].set(b), local, new)
      book = Arrivals(book.params.at[i].set(srv.params),
                      book.stat.at[i].set(srv.stat),
                      book.visits.at[i].set(visit),
                      book.sent_at.at[i].set(applied), applied)
      return (srv, agg, local, book), (loss, upload.count, jnp.sum(mask),
                                       stale)

    (server, agg, local, book), (losses, up, down, stale) = jax.lax.scan(
        body, (state.server, state.aggregation, state.local, state.ring),
        events)
    server = _end(server, stat_decay, decay_every)
    lost = jnp.zeros(losses.shape, bool)
    return State(server, local, book, agg), EpochStats(
        losses, up, down, lost, lost, None, stale)

  return Protocol(init, epoch, "arrivals")


def over_seeds(epoch_fn: Callable, lowering: str,
               shared_data: bool = True) -> Callable:
  """``epoch_fn(state, data, key)`` over a leading seed axis.

  Args:
    epoch_fn: one run's epoch (a :class:`~dssgd_jax.protocols.Protocol`'s).
    lowering: ``vmap`` (batched) or ``map`` (``lax.map``: one seed after
      another inside one program).
    shared_data: every seed trains on the same ``data`` (otherwise it has a
      leading seed axis too).

  Returns:
    ``(states (S, ...), data, keys (S,)) -> (states, stats (S, ...))``; seed
    s's slice equals ``epoch_fn`` on seed s's slices.

  >>> import jax.numpy as jnp
  >>> def epoch(state, data, key):  # a stand-in protocol epoch
  ...   return state + data.sum() + key, key
  >>> new, stats = over_seeds(epoch, "map")(jnp.zeros(3), jnp.ones(2),
  ...                                       jnp.arange(3.0))
  >>> new.tolist(), stats.tolist()
  ([2.0, 3.0, 4.0], [0.0, 1.0, 2.0])
  """
  if lowering not in ("vmap", "map"):
    raise ValueError(f"lowering={lowering!r} is not vmap or map")

  def epoch(state, data, keys):
    if lowering == "vmap":
      return jax.vmap(epoch_fn, in_axes=(0, None if shared_data else 0, 0))(
          state, data, keys)
    if shared_data:
      return jax.lax.map(lambda a: epoch_fn(a[0], data, a[1]), (state, keys))
    return jax.lax.map(lambda a: epoch_fn(*a), (state, data, keys))

  return epoch
