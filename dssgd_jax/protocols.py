"""Protocols: who talks to the parameter server when, over one epoch.

Paper section 3 (the participant's algorithm, steps 1-5), SPEC section 3
"Protocols". Data flows one way through :func:`make_participant_update`:

    download θd of w_g -> one local SGD epoch -> Δw -> select θu of Δw
    -> bound to [-γ, γ] and add noise (or the SVT mechanism) -> upload

and the protocols arrange that update over the participant axis:

* ``round_robin`` (:func:`round_robin_epoch`) — the paper's sequential
  protocol: participant 1 downloads, trains and uploads, then participant 2
  sees the result, and so on (a ``lax.scan`` over participants).
* ``parallel`` (:func:`parallel_epoch`) — all participants download the same
  snapshot, train at the same time (:func:`map_participants` over the
  leading participant axis: ``vmap``, or ``lax.map`` on CPU) and the server
  applies all uploads.
* ``async`` — see ``dssgd_jax.async_protocol``.

All epoch functions are pure: ``(server, local, images, labels, key) ->
(server, local, EpochStats)`` with ``local`` the (P, D) stack of participants'
flat parameter vectors and ``images``/``labels`` their private data with a
leading participant axis. Per-participant keys are ``fold_in(key, i)``, so a
participant draws the same numbers whatever the protocol or device layout.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from dssgd_jax import participant as participant_lib
from dssgd_jax import privacy
from dssgd_jax import selection as selection_lib
from dssgd_jax import server as server_lib
from dssgd_jax.selection import Upload


@dataclasses.dataclass(frozen=True)
class ExchangeSpec:
  """Static description of what a participant shares (hashable).

  Attributes:
    learning_rate: k.
    batch_size: M.
    upload: whether anything is uploaded (False for standalone/centralized).
    download: whether the participant downloads before training.
    upload_count: c = ceil(θu·D).
    selection: ``largest`` | ``threshold`` | ``random`` | ``largest_approx``.
    threshold: τ for ``threshold`` selection and the SVT.
    clip_bound: γ, or None for no bounding.
    noise: ``none`` | ``laplace`` | ``gaussian`` | ``svt``.
    noise_scale: Laplace scale b or Gaussian std σ.
    epsilon: ε per participant per epoch for ``svt``.
    l2_clip: L2 bound of each upload (Gaussian mechanism), or None.
    download_rule: ``all`` | ``most_updated`` | ``random``.
    download_count: ceil(θd·D).
    aggregate: ``sum`` (DSSGD: add uploads) or ``mean`` (FedAvg).
    stat_decay: β.
    decay_every: apply β every this many epochs.
    participant_axis: how the participant axis is computed (the lowering of
      :func:`map_participants`): ``vmap`` (one batched program; the choice on
      GPU and TPU) or ``map`` (``lax.map``, participants one after another
      inside one program; 1.1-1.4x faster for the 32x32 CNNs on CPU,
      BENCHMARKS.md). Both give the same numbers to float tolerance.
    mesh: with ``participant_axis="map"``, the device mesh whose
      ``participants`` axis splits the participants (``shard_map``; each
      device maps over its own); None on one device. ``vmap`` is partitioned
      by the caller's shardings instead.
  """
  learning_rate: float
  batch_size: int
  upload: bool = True
  download: bool = True
  upload_count: int = 0
  selection: str = "largest"
  threshold: float = 1e-4
  clip_bound: float | None = None
  noise: str = "none"
  noise_scale: float = 0.0
  epsilon: float | None = None
  l2_clip: float | None = None
  download_rule: str = "all"
  download_count: int = 0
  aggregate: str = "sum"
  stat_decay: float = 1.0
  decay_every: int = 1
  participant_axis: str = "vmap"
  mesh: Any = None


class EpochStats(NamedTuple):
  """Per-participant diagnostics of one epoch (arrays of shape (P,))."""
  loss: jax.Array
  uploaded: jax.Array
  downloaded: jax.Array


def make_upload(spec: ExchangeSpec, delta: jax.Array, key: jax.Array
                ) -> Upload:
  """Selection, bounding and noise of one participant's Δw (pure)."""
  k_sel, k_noise = jax.random.split(key)
  d = delta.shape[0]
  if spec.noise == "svt":
    return privacy.svt_select(delta, k_sel, count=spec.upload_count,
                              epsilon=spec.epsilon, clip_bound=spec.clip_bound,
                              threshold=spec.threshold)
  if spec.upload_count >= d and spec.selection in ("largest", "random",
                                                   "largest_approx"):
    upload = Upload(jnp.arange(d, dtype=jnp.int32), delta,
                    jnp.ones((d,), bool))
  else:
    upload = selection_lib.select(spec.selection, delta, spec.upload_count,
                                  k_sel, spec.threshold)
  if spec.l2_clip is not None:
    upload = privacy.l2_clip(upload, spec.l2_clip)
  return privacy.bound_and_noise(upload, spec.clip_bound, spec.noise,
                                 spec.noise_scale, k_noise)


def make_participant_update(apply_fn: Callable, unravel: Callable,
                            spec: ExchangeSpec) -> Callable:
  """Builds one participant's epoch of DSSGD (pure, vmappable).

  Returns:
    ``update(server_params, download_mask, local, images, labels, key) ->
    (new_local, upload, loss)`` where ``download_mask`` is the (D,) boolean
    mask of entries overwritten from ``server_params`` (ignored when
    ``spec.download`` is False) and ``upload`` the participant's sparse upload
    (empty when ``spec.upload`` is False).
  """
  local_epoch = participant_lib.make_local_epoch(apply_fn, unravel,
                                                 spec.batch_size)

  def update(server_params, download_mask, local, images, labels, key):
    k_train, k_up = jax.random.split(key)
    if spec.download:
      local = jnp.where(download_mask, server_params, local)
    new_local, loss = local_epoch(local, images, labels, k_train,
                                  spec.learning_rate)
    if spec.upload:
      upload = make_upload(spec, new_local - local, k_up)
    else:
      upload = Upload(jnp.zeros((0,), jnp.int32), jnp.zeros((0,)),
                      jnp.zeros((0,), bool))
    return new_local, upload, loss

  return update


PARTICIPANT_AXES = ("vmap", "map")


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
    mesh: with ``map``, a mesh whose ``participants`` axis splits the
      participants (``jax.shard_map``; each device maps over its share).

  Returns:
    The outputs stacked along a leading participant axis, as ``vmap``.

  >>> import jax.numpy as jnp
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


def _download_masks(spec, server, dl_keys):
  num = dl_keys.shape[0]
  if not spec.download:
    return jnp.zeros((num, server.params.shape[0]), bool)
  if spec.download_rule in ("all", "most_updated"):
    mask = server_lib.download_mask(spec.download_rule, server,
                                    spec.download_count, dl_keys[0])
    return jnp.broadcast_to(mask, (num,) + mask.shape)
  return jax.vmap(lambda k: server_lib.download_mask(
      spec.download_rule, server, spec.download_count, k))(dl_keys)


def _apply(spec, server, uploads, deltas_mean=None):
  if not spec.upload:
    return server
  if spec.aggregate == "mean":
    return server.replace(params=server.params + deltas_mean)
  return server_lib.apply_uploads(server, uploads)


def parallel_epoch(update: Callable, spec: ExchangeSpec,
                   server: server_lib.ServerState, local: jax.Array,
                   images: jax.Array, labels: jax.Array, key: jax.Array
                   ) -> tuple[server_lib.ServerState, jax.Array, EpochStats]:
  """All participants train on the same server snapshot (vmapped).

  Args:
    update: from :func:`make_participant_update`.
    spec: the same spec ``update`` was built with.
    server: server state at the start of the epoch.
    local: (P, D) participants' flat parameters.
    images: (P, n, ...) each participant's private images.
    labels: (P, n) labels.
    key: the epoch's PRNG key.
  """
  num = local.shape[0]
  dl_keys, up_keys = _split_keys(participant_keys(key, num))
  masks = _download_masks(spec, server, dl_keys)
  new_local, uploads, losses = map_participants(
      update, (None, 0, 0, 0, 0, 0),
      (server.params, masks, local, images, labels, up_keys),
      spec.participant_axis, spec.mesh)
  deltas_mean = None
  if spec.aggregate == "mean":
    before = jnp.where(masks, server.params, local) if spec.download else local
    deltas_mean = jnp.mean(new_local - before, axis=0)
  server = _apply(spec, server, uploads, deltas_mean)
  server = server_lib.end_epoch(server, spec.stat_decay, spec.decay_every)
  downloaded = jnp.sum(masks, axis=-1) if spec.download else jnp.zeros((num,))
  return server, new_local, EpochStats(losses, uploads.count, downloaded)


def round_robin_epoch(update: Callable, spec: ExchangeSpec,
                      server: server_lib.ServerState, local: jax.Array,
                      images: jax.Array, labels: jax.Array, key: jax.Array
                      ) -> tuple[server_lib.ServerState, jax.Array, EpochStats]:
  """The paper's sequential protocol (a scan over participants).

  Participant i downloads from the server state left by participants 0..i-1
  in the same epoch, trains, and uploads before participant i+1 starts.
  Arguments as in :func:`parallel_epoch`.
  """
  if spec.aggregate == "mean":
    raise ValueError("round_robin does not support aggregate='mean'")
  num = local.shape[0]
  dl_keys, up_keys = _split_keys(participant_keys(key, num))

  def body(srv, xs):
    loc, imgs, labs, k_dl, k_up = xs
    mask = _download_masks(spec, srv, k_dl[None])[0]
    new_loc, upload, loss = update(srv.params, mask, loc, imgs, labs, k_up)
    srv = _apply(spec, srv, upload)
    down = jnp.sum(mask) if spec.download else jnp.zeros(())
    return srv, (new_loc, loss, upload.count, down)

  server, (new_local, losses, up, down) = jax.lax.scan(
      body, server, (local, images, labels, dl_keys, up_keys))
  server = server_lib.end_epoch(server, spec.stat_decay, spec.decay_every)
  return server, new_local, EpochStats(losses, up, down)


PROTOCOLS = ("round_robin", "parallel", "async")


def get_epoch_fn(protocol: str) -> Callable[..., Any]:
  """The epoch function of a protocol name (``async`` lives elsewhere)."""
  if protocol == "parallel":
    return parallel_epoch
  if protocol == "round_robin":
    return round_robin_epoch
  raise ValueError(f"unknown protocol {protocol!r}")
