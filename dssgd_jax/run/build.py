"""From a :class:`~dssgd_jax.run.config.Config` to a :class:`~dssgd_jax.run.
plan.Plan`, recording which flags the run reads.

The only place that knows both the flags and the library: :func:`plan` turns
a config into the upload rule (:mod:`dssgd_jax.rules`), the download rule
(:mod:`dssgd_jax.server`), the aggregation (:mod:`dssgd_jax.aggregation`),
the local optimizer (optax), the protocol or algorithm and the data the
participants hold. Everything below it takes explicit arguments.

**Every flag changes the run or is rejected, decided from what the builder
read.** The builder reads the config through a recorder: a field it never
reads for this run (``--stat_decay`` when nothing is downloaded, ``--epsilon``
without the SVT, ...) cannot change the run. :func:`validate` builds the plan,
then rejects, one sentence each:

* every non-default field the builder did not read (with the reason the
  builder noted where it took the branch that skips it); and
* every non-default field whose run is the default's: the plan built with
  the field at its default is the same plan (``--selection=largest_approx``
  on CPU, where it is exact; ``--selection=random`` when every entry is
  uploaded) — unless the value is what the builder resolved anyway
  (``--model=digits_cnn`` on digits, ``--protocol=parallel`` for FedAvg,
  whose rounds are parallel).

There is no second list of which choice reads which flag.

>>> from dssgd_jax.run.config import Config
>>> cfg = validate(Config(num_participants=10, samples_per_participant=100,
...                       upload_fraction=0.1, clip_bound=0.01,
...                       noise="laplace", noise_scale=1.0,
...                       selection="random"))
>>> plan(cfg).upload_rule
chain(select_random(1726), clip(0.01), laplace(1))
>>> validate(cfg.replace(stat_decay=0.5))
Traceback (most recent call last):
...
dssgd_jax.errors.ConfigError: --stat_decay=0.5 has no effect on this run: every entry is downloaded (θd = 1), so the update counters choose nothing; leave it at its default (1.0).
"""

from __future__ import annotations

import dataclasses
import functools

from dssgd_jax import aggregation as aggregation_lib
from dssgd_jax import models
from dssgd_jax import participant
from dssgd_jax import rules
from dssgd_jax import selection as selection_lib
from dssgd_jax import server as server_lib
from dssgd_jax.errors import ConfigError
from dssgd_jax.run import config as config_lib
from dssgd_jax.run.config import Config
from dssgd_jax.run.plan import DataSpec, Plan

# Flags that say how or where a run computes, or what it writes, read by the
# run layer outside the plan (they never change what is computed).
RUN_FLAGS = ("workdir", "cpu_devices", "coordinator_address")
# Read by multi-host runs only, to place the same computation (never in the
# plan): rejected when unread, never compared.
DEVICE_FLAGS = ("num_processes", "process_id")

_SELECTIONS = {
    "largest": lambda c, r: rules.select_largest(c),
    "largest_approx": lambda c, r: rules.select_largest_approx(c),
    "random": lambda c, r: rules.select_random(c),
    "threshold": lambda c, r: rules.select_threshold(c, r.threshold),
}


class Recorder:
  """The config as the builder sees it: every field read is recorded.

  Attributes:
    read: the names of the fields read.
    why: for fields a branch of the builder skips, the clause saying why.
    resolved: for fields whose value the builder decided itself (``auto``,
      or implied by another choice), the value it used.
  """

  def __init__(self, cfg: Config):
    object.__setattr__(self, "_cfg", cfg)
    object.__setattr__(self, "read", set())
    object.__setattr__(self, "why", {})
    object.__setattr__(self, "resolved", {})
    object.__setattr__(self, "same", {})

  def __getattr__(self, name):
    cfg = object.__getattribute__(self, "_cfg")
    if name in config_lib.FIELDS:
      self.read.add(name)
    return getattr(cfg, name)

  def skip(self, names, because: str) -> None:
    """The builder takes a branch that reads none of ``names``."""
    for n in names:
      self.why.setdefault(n, because)

  def resolve(self, name: str, value) -> None:
    """The builder decided what ``name`` means in this run."""
    self.resolved[name] = value

  def equivalent(self, name: str, because: str) -> None:
    """The builder turned ``name``'s value into an equivalent choice (why a
    non-default value can build the default's run)."""
    self.same.setdefault(name, because)


@functools.lru_cache(maxsize=64)
def _num_params(model: str, dataset: str) -> int:
  from dssgd_jax.data import datasets as datasets_lib  # pylint: disable=g-import-not-at-top
  return models.abstract_num_params(model, datasets_lib.IMAGE_SHAPES[dataset])


def num_params(cfg: Config) -> int:
  """D of the run's model, computed abstractly (no data, no backend)."""
  return _num_params(cfg.model, cfg.dataset)


def data_seed(cfg: Config) -> int:
  """The seed of the data split: ``--data_seed``, by default ``--seed``."""
  return cfg.seed if cfg.data_seed is None else int(cfg.data_seed)


# ----------------------------------------------------------------------------
# The pieces, read through a Recorder.


def _exchange_skip(r: Recorder, because: str) -> None:
  r.skip(["protocol", "upload_fraction", "download_fraction", "download_rule",
          "selection", "threshold", "stat_decay", "decay_every", "clip_bound",
          "l2_clip", "noise", "noise_scale", "epsilon", "delta", "staleness",
          "max_staleness", "upload_loss", "download_loss", "aggregation",
          "server_learning_rate", "server_momentum", "canaries",
          "canary_scale", "checked"], because)


def _upload_rule(r: Recorder, d: int) -> rules.UploadRule | None:
  """DSSGD: ``chain(select, [l2_clip(C)], [clip(γ)], [noise])``, or
  ``chain(svt(c, ε, γ, τ))``; FedAvg: ``chain([l2_clip(C)], [gaussian(σ)])``
  on the whole update. None: nothing is uploaded."""
  parts = []
  if r.algorithm == "dssgd":
    count = selection_lib.upload_count(r.upload_fraction, d)
    if count == 0:
      return None
    if r.noise == "svt":
      r.skip(["selection", "l2_clip", "noise_scale"],
             "the sparse vector technique (--noise=svt) chooses and noises "
             "the entries itself")
      return rules.chain(rules.svt(count, r.epsilon, r.clip_bound,
                                   r.threshold))
    r.skip(["epsilon"], f"only --noise=svt reads it (this run: "
           f"--noise={r.noise})")
    if count >= d and r.selection != "threshold":
      # Every entry is uploaded: largest, largest_approx and random all keep
      # them all.
      r.resolve("selection", "all")
    else:
      selection = r.selection
      if selection == "largest_approx" and not models.approx_is_approximate():
        selection = "largest"  # lax.approx_max_k is exact on CPU and GPU
      r.resolve("selection", selection)
      if selection != "threshold":
        r.skip(["threshold"], f"only --selection=threshold and --noise=svt "
               f"read it (this run: --selection={r.selection})")
      parts.append(_SELECTIONS[selection](count, r))
  else:
    r.skip(["selection", "threshold", "upload_fraction"],
           f"--algorithm={r.algorithm} uploads every entry of its update")
  if r.l2_clip is not None:
    parts.append(rules.l2_clip(r.l2_clip))
  if r.clip_bound is not None:
    parts.append(rules.clip(r.clip_bound))
  noise = r.noise
  if noise == "laplace":
    parts.append(rules.laplace(r.noise_scale))
  elif noise == "gaussian":
    parts.append(rules.gaussian(r.noise_scale))
  else:
    r.skip(["noise_scale"], "--noise=none adds no noise")
  return rules.chain(*parts)


def _download_rule(r: Recorder, d: int) -> server_lib.DownloadRule:
  if r.algorithm == "fedavg":
    r.skip(["download_fraction", "download_rule", "stat_decay",
            "decay_every"], "--algorithm=fedavg downloads every entry of w_g")
    return server_lib.download_all()
  rule = r.download_rule
  auto = "all" if r.download_fraction >= 1 else "most_updated"
  r.resolve("download_rule", auto)
  if rule == "auto":
    rule = auto
  count = server_lib.download_count(r.download_fraction, d)
  if count == 0:
    r.skip(["download_rule", "stat_decay", "decay_every", "download_loss"],
           "--download_fraction=0 downloads nothing")
    return server_lib.download_none()
  if rule == "all" or count >= d:
    r.skip(["stat_decay", "decay_every"], "every entry is downloaded "
           "(θd = 1), so the update counters choose nothing")
    return server_lib.download_all()
  if rule == "random":
    r.skip(["stat_decay", "decay_every"], "--download_rule=random ignores "
           "the update counters")
    return server_lib.download_random(count)
  if r.stat_decay == 1:
    r.skip(["decay_every"], "--stat_decay=1 decays nothing")
  return server_lib.download_most_updated(count)


def _aggregation(r: Recorder, one_at_a_time: bool = False
                 ) -> aggregation_lib.Aggregation:
  name = r.aggregation
  auto = "weighted_mean" if r.algorithm == "fedavg" else "sum"
  r.resolve("aggregation", auto)
  if name == "auto":
    name = auto
  if one_at_a_time and name in ("weighted_mean", "entry_mean"):
    r.equivalent("aggregation", "--protocol=round_robin aggregates one "
                 "upload at a time, and the mean of one upload is the upload")
    name = "sum"
  return aggregation_lib.make_aggregation(name, r.server_learning_rate,
                                          r.server_momentum)


def _optimizer(r: Recorder, steps_per_epoch: int):
  name = r.optimizer
  kw = {}
  if name == "sgd":
    kw["momentum"] = r.momentum
    if r.momentum:
      kw["nesterov"] = r.nesterov
    else:
      r.skip(["nesterov"], "--momentum=0 has no momentum to make Nesterov")
  else:
    r.skip(["momentum", "nesterov"], f"--optimizer={name} has its own "
           "moments")
  schedule = r.lr_schedule
  total = steps_per_epoch * r.epochs if schedule != "constant" else 1
  opt = participant.make_optimizer(
      r.learning_rate, optimizer=name, weight_decay=r.weight_decay,
      schedule=schedule, total_steps=total, **kw)
  text = [f"{r.learning_rate:g}"]
  if kw.get("momentum"):
    text.append(f"momentum={kw['momentum']:g}" +
                (", nesterov" if kw.get("nesterov") else ""))
  if r.weight_decay:
    text.append(f"weight_decay={r.weight_decay:g}")
  if schedule != "constant":
    text.append(f"{schedule} over {total} steps")
  stateless = name == "sgd" and not kw.get("momentum") and (
      schedule == "constant")
  if stateless:
    r.skip(["reset_optimizer"], "plain SGD keeps no optimizer state")
  reset = False if stateless else bool(r.reset_optimizer)
  return opt, f"{name}({', '.join(text)})", reset


def _data_spec(r: Recorder) -> DataSpec:
  r.resolve("data_seed", r.seed)
  sizes = config_lib.participant_sizes(r)
  if sizes is None and r.size_skew:
    from dssgd_jax.data import partition as partition_lib  # pylint: disable=g-import-not-at-top
    sizes = partition_lib.skewed_sizes(
        r.num_participants, r.samples_per_participant, r.size_skew,
        data_seed(r))
  if r.partition != "dirichlet":
    r.skip(["dirichlet_alpha"], "only --partition=dirichlet reads it")
  svhn = r.dataset == "svhn_cropped"
  if not svhn:
    r.skip(["svhn_paper_split"], "only --dataset=svhn_cropped reads it")
  if not (svhn and r.svhn_paper_split):
    r.skip(["svhn_test_examples"], "only --svhn_paper_split reads it")
  if r.num_seeds == 1:
    r.skip(["vary_partition", "seed_axis"], "only --num_seeds > 1 reads it")
  return DataSpec(
      dataset=r.dataset, num_participants=int(r.num_participants),
      samples_per_participant=int(r.samples_per_participant),
      sizes=None if sizes is None else tuple(int(s) for s in sizes),
      partition=r.partition,
      dirichlet_alpha=(float(r.dirichlet_alpha)
                       if r.partition == "dirichlet" else 0.5),
      seed=data_seed(r),
      vary_partition=bool(r.vary_partition) if r.num_seeds > 1 else False,
      data_source=r.data_source, data_dir=r.data_dir,
      standardize=r.standardize,
      svhn_paper_split=bool(r.svhn_paper_split) if svhn else False,
      svhn_test_examples=(int(r.svhn_test_examples)
                          if svhn and r.svhn_paper_split else 10_000),
      eval_examples=int(r.eval_examples),
      centralized=r.algorithm == "centralized")


def _build(r: Recorder, d: int | None = None) -> Plan:
  import math  # pylint: disable=g-import-not-at-top
  r.resolve("model", config_lib.DEFAULT_MODEL[r.dataset])
  if d is None:
    d = num_params(r)
  alg = r.algorithm
  data = _data_spec(r)
  examples = (max(data.sizes) if data.sizes else data.samples_per_participant)
  if alg == "centralized":
    examples = sum(data.sizes) if data.sizes else (
        data.num_participants * data.samples_per_participant)
  optimizer, optimizer_name, reset = _optimizer(
      r, math.ceil(examples / r.batch_size))
  common = dict(
      model=r.model, data=data, optimizer=optimizer,
      optimizer_name=optimizer_name, batch_size=int(r.batch_size),
      epochs=int(r.epochs), algorithm=alg, reset_optimizer=reset,
      shuffle="per_example" if data.sizes else "permutation",
      conv_impl=resolve_conv_impl(r), seed=int(r.seed),
      num_seeds=int(r.num_seeds),
      seed_axis=resolve_seed_axis(r) if r.num_seeds > 1 else "map",
      eval_every=int(r.eval_every), checkpoint_every=int(r.checkpoint_every),
      progress=bool(r.progress), mesh_shape=int(r.mesh_shape),
      config=object.__getattribute__(r, "_cfg"))
  if not r.coordinator_address:
    r.skip(["num_processes", "process_id"], "only multi-host runs "
           "(--coordinator_address) read it")
  else:
    _ = (r.num_processes, r.process_id)
  if alg in ("standalone", "centralized"):
    _exchange_skip(r, f"--algorithm={alg} shares nothing")
    r.resolve("protocol", "parallel")
    if alg == "standalone":
      r.resolve("upload_fraction", 0.0)
    axis = ("vmap" if alg == "centralized" else
            resolve_participant_axis(r))
    if alg == "centralized":
      r.skip(["participant_axis"], "--algorithm=centralized trains one "
             "model")
    return Plan(upload_rule=None, download_rule=server_lib.download_none(),
                aggregation=aggregation_lib.sum_uploads(),
                protocol="standalone", participant_axis=axis, **common)
  upload = _upload_rule(r, d)
  if upload is None:  # θu = 0: every participant trains alone
    _exchange_skip(r, "--upload_fraction=0 shares nothing, so every "
                   "participant trains alone")
    return Plan(upload_rule=None, download_rule=server_lib.download_none(),
                aggregation=aggregation_lib.sum_uploads(),
                protocol="standalone",
                participant_axis=resolve_participant_axis(r), **common)
  if r.checked:
    upload = rules.checked(upload)
  download = _download_rule(r, d)
  if download.name == "download_none()":
    r.skip(["download_loss"], "--download_fraction=0 downloads nothing")
  aggregation = _aggregation(
      r, one_at_a_time=alg == "dssgd" and r.protocol == "round_robin")
  options = dict(upload_loss=float(r.upload_loss),
                 canaries=int(r.canaries), checked=bool(r.checked))
  if download.name != "download_none()":
    options["download_loss"] = float(r.download_loss)
  if r.canaries:
    options["canary_scale"] = float(r.canary_scale)
  else:
    r.skip(["canary_scale"], "only --canaries > 0 reads it")
  if _reads_delta(upload, d):
    options["delta"] = float(r.delta)
  else:
    claim = rules.claim(upload, d, 1)
    r.skip(["delta"], f"this run's upload rule {upload!r} " + (
        f"gives no guarantee: {claim.reason.rstrip('.')}" if claim.reason
        else "gives pure ε-DP (δ = 0)"))
  if download.name.startswith("download_most_updated"):
    options.update(stat_decay=float(r.stat_decay))
    if r.stat_decay != 1:
      options.update(decay_every=int(r.decay_every))
  if alg == "fedavg":
    r.skip(["protocol", "staleness", "max_staleness"], "--algorithm=fedavg "
           "runs in synchronous parallel rounds")
    r.resolve("protocol", "parallel")
    return Plan(upload_rule=upload, download_rule=download,
                aggregation=aggregation, protocol="fedavg",
                participant_axis=resolve_participant_axis(r),
                **options, **common)
  if download.name == "download_none()" and aggregation.name == (
      "sum_uploads()"):
    # Nobody downloads and the server adds every upload: the order of the
    # additions changes nothing, so every protocol is the parallel one.
    r.skip(["protocol", "staleness", "max_staleness"],
           "--download_fraction=0: nobody downloads, so the order in which "
           "the server adds the uploads changes nothing")
    r.resolve("protocol", "parallel")
    return Plan(upload_rule=upload, download_rule=download,
                aggregation=aggregation, protocol="parallel",
                participant_axis=resolve_participant_axis(r), **options,
                **common)
  protocol = r.protocol
  if protocol == "round_robin":
    r.skip(["participant_axis"], "--protocol=round_robin visits the "
           "participants one at a time")
    axis = "vmap"
  else:
    axis = resolve_participant_axis(r)
  if protocol == "async":
    options.update(staleness=r.staleness, max_staleness=int(r.max_staleness))
  else:
    r.skip(["staleness", "max_staleness"], "only --protocol=async reads it")
  return Plan(upload_rule=upload, download_rule=download,
              aggregation=aggregation, protocol=protocol,
              participant_axis=axis, **options, **common)


def _reads_delta(upload: rules.UploadRule, d: int) -> bool:
  """Whether the rule's claim is an (ε, δ) one (only then is δ read)."""
  c = rules.claim(upload, d, 1, 1e-5)
  return c.epsilon is not None and c.delta > 0


def plan(cfg: Config, num_params: int | None = None) -> Plan:
  """The :class:`~dssgd_jax.run.plan.Plan` of a checked config.

  Args:
    cfg: a config (:func:`validate` it first to reject unread flags).
    num_params: D to build the rules for (default: the model's); tests
      build a config's exchange over a stand-in model of another size.
  """
  return _build(Recorder(config_lib.check_values(cfg)), num_params)


def record(cfg: Config) -> Recorder:
  """The recorder of building ``cfg``'s plan: what it read and resolved."""
  r = Recorder(config_lib.check_values(cfg))
  _build(r)
  return r


def validate(cfg: Config) -> Config:
  """Checks every flag: its value, then whether the run reads it.

  Returns:
    The config with derived defaults filled in (the model).

  Raises:
    ConfigError: one sentence naming the first bad flag.
  """
  cfg = config_lib.check_values(cfg)
  r = record(cfg)
  built = None
  defaults = config_lib.DEFAULTS
  for name in config_lib.FIELDS:
    value, default = getattr(cfg, name), getattr(defaults, name)
    if value == default or name in RUN_FLAGS:
      continue
    if name in r.resolved and r.resolved[name] == value:
      continue  # says what runs anyway
    if name not in r.read:
      because = r.why.get(name, "nothing in this run reads it")
      raise ConfigError(f"--{name}={value} has no effect on this run: "
                        f"{because}; leave it at its default ({default}).")
    if name in DEVICE_FLAGS:
      continue
    if built is None:
      built = _build(Recorder(cfg)).describe()
    try:
      other = _build(Recorder(config_lib.check_values(
          cfg.replace(**{name: default})))).describe()
    except ConfigError:
      continue  # the default is not even valid here: the flag matters
    if other == built:
      raise ConfigError(
          f"--{name}={value} has no effect on this run: it builds the same "
          f"run as --{name}={default} ({_same_as(name, r)}); leave it at its "
          "default.")
  return cfg


def _same_as(name: str, r: Recorder) -> str:
  if name in r.same:
    return r.same[name]
  if name == "selection" and r.resolved.get("selection") == "all":
    return "every entry is uploaded (θu = 1)"
  if name == "selection":
    return ("lax.approx_max_k is exact on this backend"
            if r.resolved.get("selection") == "largest" else "same rule")
  return "the same plan"


def for_algorithm(cfg: Config, algorithm: str, **changes) -> Config:
  """``cfg`` for another algorithm, with every flag that it does not read
  reset to its default (how a sweep runs baselines from a DSSGD preset).

  >>> base = Config(num_participants=10, samples_per_participant=100,
  ...               upload_fraction=0.01, noise="svt", epsilon=1.0,
  ...               clip_bound=0.1)
  >>> c = for_algorithm(base, "standalone")
  >>> c.noise, c.upload_fraction, c.epsilon
  ('none', 0.1, None)
  """
  new = cfg.replace(algorithm=algorithm, **changes)
  defaults = config_lib.DEFAULTS
  for _ in range(4):  # resetting one flag can make another unread
    r = record(new)
    reset = {n: getattr(defaults, n) for n in config_lib.FIELDS
             if n not in r.read and n not in changes and n not in RUN_FLAGS
             and getattr(new, n) != getattr(defaults, n)
             and r.resolved.get(n, object()) != getattr(new, n)}
    if not reset:
      break
    new = new.replace(**reset)
  return new


def resolve_seed_axis(cfg) -> str:
  """``--seed_axis``, with ``auto``: ``map`` on CPU, ``vmap`` elsewhere."""
  import jax  # pylint: disable=g-import-not-at-top
  auto = _resolved(cfg, "seed_axis",
                   "map" if jax.default_backend() == "cpu" else "vmap")
  return auto if cfg.seed_axis == "auto" else cfg.seed_axis


def resolve_conv_impl(cfg) -> str:
  """``--conv_impl``, with ``auto`` resolved per backend
  (:func:`dssgd_jax.models.auto_conv_impl`)."""
  auto = _resolved(cfg, "conv_impl", models.auto_conv_impl())
  return auto if cfg.conv_impl == "auto" else cfg.conv_impl


def resolve_participant_axis(cfg) -> str:
  """``--participant_axis``, with ``auto`` resolved per backend and model
  (:func:`dssgd_jax.protocols.auto_lowering`)."""
  from dssgd_jax import protocols  # pylint: disable=g-import-not-at-top
  auto = _resolved(cfg, "participant_axis",
                   protocols.auto_lowering(cfg.model))
  return auto if cfg.participant_axis == "auto" else cfg.participant_axis


def _resolved(cfg, name: str, value):
  """``value``, recorded as what ``auto`` meant when ``cfg`` is a
  :class:`Recorder`."""
  if isinstance(cfg, Recorder):
    cfg.resolve(name, value)
  return value


# ----------------------------------------------------------------------------
# Shortcuts of the plan's pieces (tests, notebooks, tools).


def upload_rule(cfg: Config, num_params: int) -> rules.UploadRule | None:
  """The chain a participant of ``cfg`` applies to Δw (None: nothing)."""
  return plan(cfg, num_params).upload_rule


def download_rule(cfg: Config, num_params: int) -> server_lib.DownloadRule:
  """What each participant of ``cfg`` downloads per epoch."""
  return plan(cfg, num_params).download_rule


def claim(cfg: Config, num_params: int, epochs: int) -> rules.Claim:
  """The privacy claim of ``cfg``'s run after ``epochs`` epochs."""
  return plan(cfg, num_params).claim(epochs)


def data(cfg: Config):
  """``(dataset, parts)`` of a run (:func:`dssgd_jax.run.data.load`)."""
  from dssgd_jax.run import data as data_lib  # pylint: disable=g-import-not-at-top
  p = plan(cfg)
  return data_lib.load(p.data, p.model)
