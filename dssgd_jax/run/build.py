"""From a :class:`~dssgd_jax.run.config.Config` to the library's objects.

The only place that knows both the flags and the library: it turns a config
into the upload rule (:mod:`dssgd_jax.rules`), the download rule
(:mod:`dssgd_jax.server`), the protocol or algorithm
(:mod:`dssgd_jax.protocols`, :mod:`dssgd_jax.algorithms`) and the privacy
claim. Everything below it takes explicit arguments.

>>> from dssgd_jax.run.config import Config, validate
>>> cfg = validate(Config(num_participants=10, samples_per_participant=100,
...                       upload_fraction=0.1, clip_bound=0.01,
...                       noise="laplace", noise_scale=1.0, selection="random"))
>>> upload_rule(cfg, num_params=1000)
chain(select_random(100), clip(0.01), laplace(1))
>>> download_rule(cfg.replace(download_fraction=0.1), 1000)
download_most_updated(100)
"""

import jax.numpy as jnp

from dssgd_jax import algorithms
from dssgd_jax import models
from dssgd_jax import protocols
from dssgd_jax import rules
from dssgd_jax import selection as selection_lib
from dssgd_jax import server as server_lib
from dssgd_jax.run.config import Config, resolved_download_rule

_SELECTIONS = {
    "largest": lambda c, cfg: rules.select_largest(c),
    "largest_approx": lambda c, cfg: rules.select_largest_approx(c),
    "random": lambda c, cfg: rules.select_random(c),
    "threshold": lambda c, cfg: rules.select_threshold(c, cfg.threshold),
}


def data(cfg: Config):
  """``(dataset, parts)`` of a run (:func:`dssgd_jax.data.prepare`)."""
  from dssgd_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  return data_lib.prepare(
      cfg.dataset, num_participants=cfg.num_participants,
      samples_per_participant=cfg.samples_per_participant, model=cfg.model,
      seed=data_seed(cfg), data_source=cfg.data_source, data_dir=cfg.data_dir,
      partition=cfg.partition, dirichlet_alpha=cfg.dirichlet_alpha,
      standardize=cfg.standardize, svhn_paper_split=cfg.svhn_paper_split,
      svhn_test_examples=cfg.svhn_test_examples)


def num_params(cfg: Config) -> int:
  """D of the run's model, computed abstractly (no data, no backend)."""
  from dssgd_jax.data import datasets as datasets_lib  # pylint: disable=g-import-not-at-top
  return models.abstract_num_params(cfg.model,
                                    datasets_lib.IMAGE_SHAPES[cfg.dataset])


def data_seed(cfg: Config) -> int:
  """The seed of the data split: ``--data_seed``, by default ``--seed``."""
  return cfg.seed if cfg.data_seed is None else int(cfg.data_seed)


def seed_partitions(cfg: Config, dataset, parts) -> list:
  """The partition of each of the ``--num_seeds`` runs.

  ``parts`` (from :func:`data`) for every run, or with ``--vary_partition``
  run s's own split drawn from the data seed + s (run 0's is ``parts``).
  """
  if not cfg.vary_partition:
    return [parts] * cfg.num_seeds
  from dssgd_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  return [parts] + [
      data_lib.make_partition(
          cfg.partition, dataset.train_labels, cfg.num_participants,
          cfg.samples_per_participant, data_seed(cfg) + s,
          dirichlet_alpha=cfg.dirichlet_alpha)
      for s in range(1, cfg.num_seeds)]


def resolve_seed_axis(cfg: Config) -> str:
  """``--seed_axis``, with ``auto``: ``map`` on CPU, ``vmap`` elsewhere."""
  if cfg.seed_axis != "auto":
    return cfg.seed_axis
  import jax  # pylint: disable=g-import-not-at-top
  return "map" if jax.default_backend() == "cpu" else "vmap"


def upload_rule(cfg: Config, num_params: int) -> rules.UploadRule | None:
  """The chain a participant applies to Δw (None: it uploads nothing).

  DSSGD: ``chain(select, [l2_clip(C)], [clip(γ)], [noise])``, or
  ``chain(svt(c, ε, γ, τ))``; FedAvg: ``chain([l2_clip(C)], [gaussian(σ)])``
  on the whole update.
  """
  if cfg.algorithm in ("standalone", "centralized"):
    return None
  parts = []
  if cfg.algorithm == "dssgd":
    count = selection_lib.upload_count(cfg.upload_fraction, num_params)
    if count == 0:
      return None
    if cfg.noise == "svt":
      return rules.chain(rules.svt(count, cfg.epsilon, cfg.clip_bound,
                                   cfg.threshold))
    parts.append(_SELECTIONS[cfg.selection](count, cfg))
  if cfg.l2_clip is not None:
    parts.append(rules.l2_clip(cfg.l2_clip))
  if cfg.clip_bound is not None:
    parts.append(rules.clip(cfg.clip_bound))
  if cfg.noise == "laplace":
    parts.append(rules.laplace(cfg.noise_scale))
  elif cfg.noise == "gaussian":
    parts.append(rules.gaussian(cfg.noise_scale))
  return rules.chain(*parts)


def download_rule(cfg: Config, num_params: int) -> server_lib.DownloadRule:
  """What each participant downloads per epoch."""
  if cfg.algorithm in ("standalone", "centralized") or (
      cfg.algorithm == "dssgd" and cfg.upload_fraction == 0):
    return server_lib.download_none()
  if cfg.algorithm == "fedavg":
    return server_lib.download_all()
  rule = resolved_download_rule(cfg)
  count = server_lib.download_count(cfg.download_fraction, num_params)
  if count == 0:
    return server_lib.download_none()
  if rule == "all":
    return server_lib.download_all()
  if rule == "most_updated":
    return server_lib.download_most_updated(count)
  return server_lib.download_random(count)


def claim(cfg: Config, num_params: int, epochs: int) -> rules.Claim:
  """The privacy claim of a run after ``epochs`` epochs."""
  if cfg.algorithm == "centralized":
    return rules.Claim(None, 0.0, "--algorithm=centralized pools every "
                       "participant's data in one place.")
  return rules.claim(upload_rule(cfg, num_params), num_params, epochs,
                     cfg.delta)


def protocol(cfg: Config, local_epoch, num_params: int,
             axis: protocols.ParticipantAxis, example_counts=None
             ) -> protocols.Protocol:
  """The epoch protocol of ``cfg`` (an algorithm is a protocol)."""
  update = _update(cfg, local_epoch, num_params)
  if cfg.algorithm in ("standalone", "centralized"):
    return algorithms.standalone(update, axis=axis)
  losses = dict(upload_loss=cfg.upload_loss, download_loss=cfg.download_loss)
  if cfg.algorithm == "fedavg":
    if example_counts is None:
      example_counts = jnp.full((cfg.num_participants,),
                                cfg.samples_per_participant)
    return algorithms.fedavg(update, example_counts, axis=axis, **losses)
  download = download_rule(cfg, num_params)
  common = dict(stat_decay=cfg.stat_decay, decay_every=cfg.decay_every,
                **losses)
  if upload_rule(cfg, num_params) is None:  # θu = 0: standalone
    return protocols.parallel(update, download, axis=axis, **common)
  if cfg.protocol == "round_robin":
    return protocols.round_robin(update, download, **common)
  if cfg.protocol == "parallel":
    return protocols.parallel(update, download, axis=axis, **common)
  return protocols.asynchronous(update, download, staleness=cfg.staleness,
                                max_staleness=cfg.max_staleness, axis=axis,
                                **common)


def _update(cfg: Config, local_epoch, num_params: int):
  from dssgd_jax import participant  # pylint: disable=g-import-not-at-top
  return participant.make_update(local_epoch, upload_rule(cfg, num_params),
                                 float(cfg.learning_rate))


def resolve_conv_impl(cfg: Config) -> str:
  """``--conv_impl``, with ``auto`` resolved per backend
  (:func:`dssgd_jax.models.auto_conv_impl`)."""
  return models.auto_conv_impl() if cfg.conv_impl == "auto" else cfg.conv_impl


def resolve_participant_axis(cfg: Config) -> str:
  """``--participant_axis``, with ``auto`` resolved per backend and model
  (:func:`dssgd_jax.protocols.auto_lowering`)."""
  if cfg.participant_axis != "auto":
    return cfg.participant_axis
  return protocols.auto_lowering(cfg.model)
