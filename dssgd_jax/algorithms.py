"""DSSGD and its baselines on one code path (SPEC section 3, "Baselines").

Every algorithm is the same epoch function (``dssgd_jax.protocols``) with a
different :class:`~dssgd_jax.protocols.ExchangeSpec` and participant layout:

* ``dssgd`` — distributed selective SGD: download θd, train, upload θu.
  ``upload_fraction=0`` shares nothing in either direction, which is exactly
  ``standalone`` (with nothing uploaded, the server never changes, and
  downloading its initial vector would only reset the participants).
* ``standalone`` — every participant trains alone; no upload, no download.
* ``centralized`` — one model trained by SGD on the union of all participants'
  data (the privacy-violating reference): a single "participant" holding
  everything.
* ``fedavg`` — federated averaging (McMahan et al. 2017): each round every
  participant downloads w_g, trains one local epoch, and the server sets w_g
  to the data-weighted mean of the participants' models (equal shards: the
  plain mean).
"""

from typing import Callable

import numpy as np

from dssgd_jax import protocols
from dssgd_jax import selection as selection_lib
from dssgd_jax import server as server_lib
from dssgd_jax.config import Config


def exchange_spec(cfg: Config, num_params: int) -> protocols.ExchangeSpec:
  """The static exchange description of ``cfg.algorithm`` for D parameters."""
  common = dict(learning_rate=float(cfg.learning_rate),
                batch_size=int(cfg.batch_size))
  if cfg.algorithm in ("standalone", "centralized") or (
      cfg.algorithm == "dssgd" and cfg.upload_fraction == 0):
    return protocols.ExchangeSpec(upload=False, download=False, **common)
  if cfg.algorithm == "fedavg":
    return protocols.ExchangeSpec(
        upload=True, download=True, upload_count=num_params,
        selection="largest", download_rule="all", download_count=num_params,
        aggregate="mean", **common)
  if cfg.algorithm != "dssgd":
    raise ValueError(f"unknown algorithm {cfg.algorithm!r}")
  return protocols.ExchangeSpec(
      upload=True,
      download=cfg.download_fraction > 0,
      upload_count=selection_lib.upload_count(cfg.upload_fraction, num_params),
      selection=cfg.selection,
      threshold=float(cfg.threshold),
      clip_bound=cfg.clip_bound,
      noise=cfg.noise,
      noise_scale=float(cfg.noise_scale),
      epsilon=cfg.epsilon,
      l2_clip=cfg.l2_clip,
      download_rule=cfg.download_rule,
      download_count=server_lib.download_count(cfg.download_fraction,
                                               num_params),
      stat_decay=float(cfg.stat_decay),
      decay_every=int(cfg.decay_every),
      **common)


def participant_layout(cfg: Config, images: np.ndarray, labels: np.ndarray,
                       parts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Each model's private data with a leading model axis.

  Args:
    cfg: the run config.
    images, labels: the whole training set.
    parts: (N, n) partition indices.

  Returns:
    (images (P, n', ...), labels (P, n')): P = N, n' = n for the collaborative
    algorithms; P = 1, n' = N·n (the union) for ``centralized``.
  """
  if cfg.algorithm == "centralized":
    union = parts.reshape(1, -1)
    return images[union], labels[union]
  return images[parts], labels[parts]


def epoch_function(cfg: Config, apply_fn: Callable, unravel: Callable,
                   spec: protocols.ExchangeSpec) -> Callable:
  """The pure, un-jitted epoch ``(server, local, images, labels, key) -> ...``."""
  update = protocols.make_participant_update(apply_fn, unravel, spec)
  if cfg.protocol == "async" and cfg.algorithm == "dssgd" and spec.upload:
    from dssgd_jax import async_protocol  # pylint: disable=g-import-not-at-top
    return async_protocol.make_async_epoch(update, spec, cfg)
  protocol = cfg.protocol
  if cfg.algorithm in ("standalone", "centralized", "fedavg") or not (
      spec.upload):
    protocol = "parallel"  # nothing is exchanged, or rounds are synchronous
  epoch = protocols.get_epoch_fn(protocol)

  def run_epoch(server, local, images, labels, key):
    return epoch(update, spec, server, local, images, labels, key)

  return run_epoch


def uploaded_bytes(spec: protocols.ExchangeSpec, entries: float,
                   num_params: int) -> float:
  """Bytes one participant sends: dense 4·D, or 8 per (int32, float32) pair."""
  if not spec.upload:
    return 0.0
  if spec.upload_count >= num_params and spec.selection != "threshold":
    return 4.0 * num_params
  return 8.0 * float(entries)


def downloaded_bytes(spec: protocols.ExchangeSpec, entries: float,
                     num_params: int) -> float:
  """Bytes one participant receives: dense 4·D, or 8 per index/value pair."""
  if not spec.download:
    return 0.0
  if spec.download_count >= num_params:
    return 4.0 * num_params
  return 8.0 * float(entries)
