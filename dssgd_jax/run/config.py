"""The run configuration, defined once: fields, help, choices, value checks.

Each :class:`Config` field carries its help text, its group in ``--help`` and
its choices (the choice tuples are owned by the modules that implement them);
:func:`define_flags` generates the absl flags from the fields, and
:func:`check_values` checks each value (range, type, choice, what the data
allows) before any work starts, raising one
:class:`~dssgd_jax.errors.ConfigError` sentence that names the flag.

**Every flag changes the run or is rejected** — but not here: whether a flag
is read is decided by the code that reads it. :func:`dssgd_jax.run.build.
validate` builds the run's :class:`~dssgd_jax.run.plan.Plan` from the config
while recording which fields the builder read, and rejects every other field
that differs from its default (:mod:`dssgd_jax.run.build`).

>>> cfg = Config(dataset="digits", num_participants=10,
...              samples_per_participant=100)
>>> check_values(cfg).model
'digits_cnn'
>>> check_values(cfg.replace(upload_fraction=1.5))
Traceback (most recent call last):
...
dssgd_jax.errors.ConfigError: --upload_fraction=1.5 must be at most 1.
"""

import dataclasses
import json
import math
from typing import Any

from dssgd_jax import aggregation
from dssgd_jax import algorithms
from dssgd_jax import models
from dssgd_jax import participant
from dssgd_jax import protocols
from dssgd_jax import rules
from dssgd_jax import server
from dssgd_jax.data import datasets as datasets_lib
from dssgd_jax.data import partition as partition_lib
from dssgd_jax.errors import ConfigError

SELECTIONS = rules.SELECTIONS
NOISES = rules.NOISES
DOWNLOAD_RULES = ("auto",) + server.DOWNLOAD_RULES
AGGREGATIONS = ("auto",) + aggregation.AGGREGATIONS
CONV_IMPLS = ("auto",) + models.CONV_IMPLS
PARTICIPANT_AXES = ("auto",) + protocols.PARTICIPANT_AXES
SEED_AXES = ("auto", "vmap", "map")

# Training and test examples of each dataset (SVHN: train split; with
# --svhn_paper_split the paper's 100,000-example pool), checked before any
# data is loaded so that impossible requests fail at once.
TRAIN_EXAMPLES = {"digits": 1437, "mnist": 60_000, "fashion_mnist": 60_000,
                  "svhn_cropped": 73_257, "cifar10": 50_000}
TEST_EXAMPLES = {"digits": 360, "mnist": 10_000, "fashion_mnist": 10_000,
                 "svhn_cropped": 26_032, "cifar10": 10_000}
SVHN_PAPER_TRAIN_EXAMPLES = 100_000

DEFAULT_MODEL = {"digits": "digits_cnn", "mnist": "mnist_cnn",
                 "fashion_mnist": "mnist_cnn", "svhn_cropped": "svhn_cnn",
                 "cifar10": "svhn_cnn"}

GROUPS = ("data", "model and training", "seeds", "sharing", "privacy", "protocol",
          "evaluation and checkpoints", "devices")


def _field(default, help_text: str, group: str, choices=None, kind=None):
  assert group in GROUPS, group
  return dataclasses.field(default=default, metadata=dict(
      help=help_text, group=group, choices=choices, kind=kind))


@dataclasses.dataclass(frozen=True)
class Config:
  """A complete run configuration (SPEC section 2 names in the help)."""
  workdir: str | None = _field(
      None, "Directory for config.json, metrics.jsonl, checkpoints, events "
      "and plots. Required.", "evaluation and checkpoints", kind=str)
  # Data (SPEC section 5).
  dataset: str = _field("digits", "Dataset.", "data", datasets_lib.DATASETS)
  data_source: str = _field(
      "auto", "auto (local files in --data_dir, then tensorflow-datasets), "
      "tfds or files.", "data", datasets_lib.SOURCES)
  data_dir: str | None = _field(
      None, "Directory with the original dataset files (idx, .mat, CIFAR "
      "batches) or tfds data.", "data", kind=str)
  partition: str = _field("iid", "How training data is split over "
                          "participants.", "data", partition_lib.PARTITIONS)
  dirichlet_alpha: float = _field(0.5, "α of the Dirichlet label proportions "
                                  "for --partition=dirichlet.", "data")
  standardize: bool | None = _field(
      None, "Standardize each channel with training-set statistics "
      "(default: per dataset).", "data", kind=bool)
  svhn_paper_split: bool = _field(
      False, "SVHN as the paper: training pool from train+extra, a fixed "
      "test subset.", "data")
  svhn_test_examples: int = _field(10_000, "Test subset size with "
                                   "--svhn_paper_split.", "data")
  # Model and training.
  model: str | None = _field(None, "Model (default: the dataset's model).",
                             "model and training", models.MODELS, kind=str)
  conv_impl: str = _field("auto", "Convolution lowering: im2col (fast with a "
                          "participant axis), xla, or auto.",
                          "model and training", CONV_IMPLS)
  algorithm: str = _field("dssgd", "dssgd, or a baseline: fedavg, "
                          "standalone (no sharing), centralized (pooled "
                          "data).", "model and training",
                          algorithms.ALGORITHMS)
  num_participants: int = _field(30, "N, participants.", "model and training")
  samples_per_participant: int = _field(
      600, "n, training examples held by each participant (the mean with "
      "--size_skew).", "model and training")
  size_skew: float = _field(
      0.0, "Unequal participants: sizes ∝ exp(σ·z), z ~ N(0, 1), σ = this, "
      "rounded to a fixed total of N·n examples (each at least 1); 0 = "
      "equal.", "model and training")
  participant_sizes: str | None = _field(
      None, "Unequal participants: each one's number of examples, comma-"
      "separated (N numbers).", "model and training", kind=str)
  epochs: int = _field(30, "Epochs (one local epoch each).",
                       "model and training")
  batch_size: int = _field(32, "M, local minibatch size.",
                           "model and training")
  learning_rate: float = _field(0.01, "k, local SGD rate.",
                                "model and training")
  optimizer: str = _field("sgd", "Local optimizer (optax): sgd (the "
                          "paper's, with --momentum) or adam.",
                          "model and training", participant.OPTIMIZERS)
  momentum: float = _field(0.0, "SGD momentum (0 = the paper's plain SGD).",
                           "model and training")
  nesterov: bool = _field(False, "Nesterov momentum (with --momentum).",
                          "model and training")
  weight_decay: float = _field(0.0, "Decoupled weight decay λ of the local "
                               "optimizer.", "model and training")
  lr_schedule: str = _field("constant", "Local learning rate: constant, or "
                            "cosine decay to 0 over the run's local steps.",
                            "model and training", participant.SCHEDULES)
  reset_optimizer: bool = _field(
      False, "Start the local optimizer's state afresh in every epoch a "
      "participant downloads (default: carried, as the paper's participant "
      "keeps training its own model).", "model and training")
  seed: int = _field(0, "Random seed (data split, init, training), 0 to "
                     "2**32-1.", "model and training")
  # Seeds (independent runs as one program).
  num_seeds: int = _field(
      1, "S independent runs with seeds --seed ... --seed+S-1 (initialization, "
      "shuffling order and noise), computed as one program; metrics.jsonl "
      "holds their mean, a <field>_std companion and per_seed values.",
      "seeds")
  data_seed: int | None = _field(
      None, "Seed of the data split (which examples each participant holds, "
      "the --eval_examples subset); default: --seed.", "seeds", kind=int)
  vary_partition: bool = _field(
      False, "With --num_seeds > 1: run s draws its own split from the data "
      "seed + s (default: every run holds the same split).", "seeds")
  seed_axis: str = _field(
      "auto", "How the --num_seeds runs are computed: vmap (batched), map "
      "(lax.map, one after another inside one program) or auto (vmap on "
      "GPU/TPU, map on CPU).", "seeds", SEED_AXES)
  # Sharing (SPEC section 3).
  upload_fraction: float = _field(
      0.1, "θu, fraction of the parameters uploaded per epoch (0 = share "
      "nothing).", "sharing")
  download_fraction: float = _field(1.0, "θd, fraction of the parameters "
                                    "downloaded per epoch.", "sharing")
  download_rule: str = _field(
      "auto", "Which entries to download: auto (all when θd = 1, else the "
      "paper's most_updated), all, most_updated, random.", "sharing",
      DOWNLOAD_RULES)
  selection: str = _field("largest", "Upload selection rule.", "sharing",
                          SELECTIONS)
  threshold: float = _field(1e-4, "τ for --selection=threshold and the SVT.",
                            "sharing")
  aggregation: str = _field(
      "auto", "How the server combines uploads: sum (the paper's), "
      "weighted_mean (FedAvg's, by example counts), entry_mean (per entry, "
      "over the participants that uploaded it); auto: sum for dssgd, "
      "weighted_mean for fedavg.", "sharing", AGGREGATIONS)
  server_learning_rate: float = _field(
      1.0, "η of a server optimizer on the aggregate update (FedOpt; 1 = "
      "none).", "sharing")
  server_momentum: float = _field(0.0, "Server momentum on the aggregate "
                                  "update (FedAvgM).", "sharing")
  stat_decay: float = _field(
      1.0, "β: the server multiplies its update counters by β every "
      "--decay_every epochs (most_updated downloads).", "sharing")
  decay_every: int = _field(1, "Epochs between decays.", "sharing")
  # Privacy.
  clip_bound: float | None = _field(
      None, "γ: uploaded values are bounded to [-γ, γ] (default: no bound).",
      "privacy", kind=float)
  l2_clip: float | None = _field(
      None, "C: each upload is scaled to L2 norm at most C.", "privacy",
      kind=float)
  noise: str = _field("none", "Upload noise: none, laplace (scale b), "
                      "gaussian (std σ), or svt (the sparse vector "
                      "technique).", "privacy", NOISES)
  noise_scale: float = _field(0.0, "Laplace scale b or Gaussian standard "
                              "deviation σ.", "privacy")
  epsilon: float | None = _field(None, "ε per participant per epoch for "
                                 "--noise=svt.", "privacy", kind=float)
  delta: float = _field(1e-5, "δ at which the Gaussian mechanism's ε is "
                        "reported.", "privacy")
  canaries: int = _field(
      0, "Gradient-space canaries for the end-to-end audit (python -m "
      "dssgd_jax.audit): each included with probability 1/2 in one "
      "participant's update every epoch, scored from what the server "
      "receives.", "privacy")
  canary_scale: float = _field(
      0.0, "Size of a canary's entry (0: the rule's clip bound γ, else the "
      "participant's largest |Δw| entry of the epoch).", "privacy")
  checked: bool = _field(
      False, "Check at run time that every upload rule's output holds what "
      "its privacy declaration says (bounds, slots); slower.", "privacy")
  # Protocol.
  protocol: str = _field("round_robin", "Who talks to the server when.",
                         "protocol", protocols.PROTOCOLS)
  participant_axis: str = _field(
      "auto", "How the participants of the parallel protocols are computed: "
      "vmap (batched; GPU/TPU), map (lax.map; faster on CPU) or auto.",
      "protocol", PARTICIPANT_AXES)
  staleness: str = _field("constant", "Async staleness distribution.",
                          "protocol", protocols.STALENESS)
  max_staleness: int = _field(0, "Largest staleness (epochs) for "
                              "--protocol=async.", "protocol")
  upload_loss: float = _field(0.0, "Probability that a participant's upload "
                              "is lost in an epoch.", "protocol")
  download_loss: float = _field(0.0, "Probability that a participant's "
                                "download is lost in an epoch.", "protocol")
  # Evaluation, logging, checkpoints.
  eval_every: int = _field(1, "Evaluate every this many epochs (and after "
                           "the last).", "evaluation and checkpoints")
  eval_examples: int = _field(0, "Evaluate on this fixed subset of the test "
                              "split (0 = all).", "evaluation and checkpoints")
  checkpoint_every: int = _field(1, "Checkpoint every this many epochs (and "
                                 "after the last).",
                                 "evaluation and checkpoints")
  progress: bool = _field(True, "Print a line per epoch.",
                          "evaluation and checkpoints")
  # Devices.
  mesh_shape: int = _field(0, "Devices to shard the participant axis over "
                           "(0 = all local devices that divide it).",
                           "devices")
  cpu_devices: int = _field(0, "Split the host CPU into this many XLA "
                            "devices (0 = JAX's default of one).", "devices")
  coordinator_address: str | None = _field(
      None, "host:port of process 0 for multi-host runs (jax.distributed).",
      "devices", kind=str)
  num_processes: int = _field(1, "Processes in a multi-host run.", "devices")
  process_id: int = _field(0, "This process's index.", "devices")

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Config":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  def replace(self, **kw) -> "Config":
    return dataclasses.replace(self, **kw)


DEFAULTS = Config()
FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def resolved_download_rule(cfg: Config) -> str:
  """``--download_rule=auto``: all at θd = 1, else the paper's most_updated."""
  if cfg.download_rule != "auto":
    return cfg.download_rule
  return "all" if cfg.download_fraction >= 1 else "most_updated"


def participant_sizes(cfg: Config) -> list[int] | None:
  """``--participant_sizes`` as N integers (None when not given).

  Raises:
    ConfigError: not N positive integers.
  """
  if cfg.participant_sizes is None:
    return None
  text = str(cfg.participant_sizes)
  try:
    sizes = [int(x) for x in text.replace(" ", "").split(",") if x]
  except ValueError:
    raise ConfigError(f"--participant_sizes={text} must be comma-separated "
                      "integers.") from None
  if len(sizes) != cfg.num_participants or min(sizes) < 1:
    raise ConfigError(f"--participant_sizes={text} must give "
                      f"--num_participants={cfg.num_participants} sizes, "
                      "each at least 1.")
  return sizes


# ----------------------------------------------------------------------------
# Validation.


def _choice(cfg, name):
  allowed = FIELDS[name].metadata["choices"]
  value = getattr(cfg, name)
  if value not in allowed:
    raise ConfigError(f"--{name}={value!r} is not one of: "
                      f"{', '.join(allowed)}.")


def _number(cfg, name, low=None, integer=False, allow_low=False,
            high=None):
  value = getattr(cfg, name)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ConfigError(f"--{name}={value!r} must be a number.")
  if not math.isfinite(value):
    raise ConfigError(f"--{name}={value} must be finite.")
  if integer and int(value) != value:
    raise ConfigError(f"--{name}={value} must be an integer.")
  if low is not None and (value < low or (value == low and not allow_low)):
    what = ("non-negative" if low == 0 and allow_low else "positive"
            if low == 0 else f"{'at least' if allow_low else 'above'} {low}")
    raise ConfigError(f"--{name}={value} must be {what}.")
  if high is not None and value > high:
    raise ConfigError(f"--{name}={value} must be at most {high}.")


def check_values(cfg: Config) -> Config:
  """Checks every flag's value; returns the config with the model filled in.

  Whether each flag is read by the run is checked by
  :func:`dssgd_jax.run.build.validate`, which calls this first.

  Raises:
    ConfigError: one sentence naming the first bad flag.
  """
  for name, f in FIELDS.items():
    if f.metadata["choices"] is not None and name != "model":
      _choice(cfg, name)
  if cfg.model is None:
    cfg = cfg.replace(model=DEFAULT_MODEL[cfg.dataset])
  _choice(cfg, "model")
  for name in ("upload_fraction", "download_fraction", "upload_loss",
               "download_loss"):
    _number(cfg, name, 0, allow_low=True, high=1)
  for name in ("batch_size", "num_participants", "samples_per_participant",
               "epochs", "eval_every", "checkpoint_every", "decay_every",
               "svhn_test_examples", "num_processes"):
    _number(cfg, name, 0, integer=True)
  for name in ("eval_examples", "max_staleness", "mesh_shape", "process_id",
               "cpu_devices", "canaries"):
    _number(cfg, name, 0, integer=True, allow_low=True)
  _number(cfg, "seed", 0, integer=True, allow_low=True, high=2**32 - 1)
  _number(cfg, "num_seeds", 0, integer=True)
  if cfg.seed + cfg.num_seeds - 1 > 2**32 - 1:
    raise ConfigError(f"--seed={cfg.seed} + --num_seeds={cfg.num_seeds} - 1 "
                      "must be at most 2**32-1.")
  if cfg.data_seed is not None:
    _number(cfg, "data_seed", 0, integer=True, allow_low=True,
            high=2**32 - cfg.num_seeds)
  if cfg.num_seeds > 1 and cfg.mesh_shape > 1:
    raise ConfigError(f"--num_seeds={cfg.num_seeds} runs on one device, not "
                      f"--mesh_shape={cfg.mesh_shape}; leave --mesh_shape at "
                      "0 (or run the seeds one at a time).")
  if cfg.num_seeds > 1 and cfg.coordinator_address:
    raise ConfigError(f"--num_seeds={cfg.num_seeds} runs on one process; "
                      "drop --coordinator_address (or run the seeds one at "
                      "a time).")
  for name in ("learning_rate", "dirichlet_alpha", "delta"):
    _number(cfg, name, 0)
  for name in ("threshold", "noise_scale", "weight_decay", "size_skew",
               "canary_scale"):
    _number(cfg, name, 0, allow_low=True)
  if cfg.download_loss == 1:
    raise ConfigError("--download_loss=1 loses every download: no participant "
                      "ever receives the server's model; use "
                      "--download_fraction=0 (or a --download_loss below 1).")
  if cfg.upload_loss == 1:
    raise ConfigError("--upload_loss=1 loses every upload: nothing ever "
                      "reaches the server; use --algorithm=standalone (or an "
                      "--upload_loss below 1).")
  _number(cfg, "server_learning_rate", 0)
  for name in ("momentum", "server_momentum"):
    _number(cfg, name, 0, allow_low=True)
    if getattr(cfg, name) >= 1:
      raise ConfigError(f"--{name}={getattr(cfg, name)} must be below 1.")
  if cfg.size_skew and cfg.participant_sizes is not None:
    raise ConfigError(f"--size_skew={cfg.size_skew} and "
                      "--participant_sizes both set the participants' "
                      "sizes; give one.")
  for name in ("clip_bound", "l2_clip", "epsilon"):
    if getattr(cfg, name) is not None:
      _number(cfg, name, 0)
  if not 0.0 < cfg.stat_decay <= 1.0:
    raise ConfigError(f"--stat_decay={cfg.stat_decay} must be in (0, 1].")
  if cfg.delta >= 1:
    raise ConfigError(f"--delta={cfg.delta} must be below 1.")
  _check_data(cfg)
  _check_exchange(cfg)
  if cfg.process_id >= cfg.num_processes:
    raise ConfigError(f"--process_id={cfg.process_id} must be below "
                      f"--num_processes={cfg.num_processes}.")
  return cfg


def _check_data(cfg: Config) -> None:
  available = (SVHN_PAPER_TRAIN_EXAMPLES if cfg.dataset == "svhn_cropped"
               and cfg.svhn_paper_split else TRAIN_EXAMPLES[cfg.dataset])
  sizes = participant_sizes(cfg)
  need = cfg.num_participants * cfg.samples_per_participant
  if sizes is not None and sum(sizes) > available:
    raise ConfigError(
        f"--participant_sizes add up to {sum(sizes):,} training examples but "
        f"--dataset={cfg.dataset} has only {available:,}.")
  if sizes is not None:
    need = sum(sizes)
  elif need > available:
    raise ConfigError(
        f"--num_participants={cfg.num_participants} x "
        f"--samples_per_participant={cfg.samples_per_participant} needs "
        f"{need:,} training examples but --dataset={cfg.dataset} has only "
        f"{available:,}.")
  test = (cfg.svhn_test_examples if cfg.dataset == "svhn_cropped" and
          cfg.svhn_paper_split else TEST_EXAMPLES[cfg.dataset])
  if cfg.eval_examples > test:
    raise ConfigError(f"--eval_examples={cfg.eval_examples} is more than the "
                      f"{test:,} test examples of --dataset={cfg.dataset}.")
  if not models.fits(cfg.model, datasets_lib.IMAGE_SHAPES[cfg.dataset]):
    raise ConfigError(
        f"--model={cfg.model} does not fit --dataset={cfg.dataset} "
        f"({'x'.join(map(str, datasets_lib.IMAGE_SHAPES[cfg.dataset]))} "
        f"images); use --model={DEFAULT_MODEL[cfg.dataset]}.")
  if cfg.algorithm == "centralized":  # one model on the union of the data
    if cfg.batch_size > need:
      raise ConfigError(
          f"--batch_size={cfg.batch_size} is larger than the {need:,} "
          "examples of --algorithm=centralized (--num_participants x "
          "--samples_per_participant).")
  elif cfg.batch_size > cfg.samples_per_participant and sizes is None:
    raise ConfigError(
        f"--batch_size={cfg.batch_size} is larger than "
        f"--samples_per_participant={cfg.samples_per_participant}.")


def _check_exchange(cfg: Config) -> None:
  alg = cfg.algorithm
  if alg == "dssgd" and cfg.upload_fraction > 0:
    if cfg.download_rule == "all" and cfg.download_fraction < 1:
      raise ConfigError(
          f"--download_rule=all downloads every entry, which contradicts "
          f"--download_fraction={cfg.download_fraction}; use most_updated "
          "or random (or leave --download_rule at auto).")
    if cfg.download_rule in ("most_updated", "random") and not (
        0 < cfg.download_fraction < 1):
      raise ConfigError(
          f"--download_rule={cfg.download_rule} chooses which entries to "
          f"download, but --download_fraction={cfg.download_fraction} "
          f"{'downloads nothing' if cfg.download_fraction == 0 else 'takes every entry'}"
          "; set --download_fraction between 0 and 1.")
  if alg == "fedavg" and cfg.noise not in ("none", "gaussian"):
    raise ConfigError(
        f"--noise={cfg.noise} is not available with --algorithm=fedavg, "
        "which uploads its whole update: use --noise=gaussian with "
        "--l2_clip (DP-FedAvg with local noise) or --noise=none.")
  if alg == "dssgd" and cfg.protocol == "async" and cfg.max_staleness == 0:
    raise ConfigError("--protocol=async with --max_staleness=0 runs exactly "
                      "--protocol=parallel; set --max_staleness to 1 or more "
                      "(or use --protocol=parallel).")
  if alg not in ("dssgd", "fedavg"):
    return
  if alg == "dssgd" and cfg.upload_fraction == 0:
    return
  if cfg.noise in ("laplace", "gaussian") and cfg.noise_scale <= 0:
    raise ConfigError(f"--noise={cfg.noise} needs a positive --noise_scale.")
  if cfg.noise == "svt":
    if cfg.epsilon is None:
      raise ConfigError("--noise=svt needs a positive --epsilon.")
    if cfg.clip_bound is None:
      raise ConfigError("--noise=svt needs --clip_bound (γ): the SVT "
                        "sensitivity is 2γ.")


# ----------------------------------------------------------------------------
# Flags.


def define_flags(flag_values=None) -> None:
  """Defines one absl flag per :class:`Config` field (idempotent).

  The flags are registered under their ``--help`` group (absl lists flags by
  module; each group is a pseudo-module).
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS if flag_values is None else flag_values
  if "upload_fraction" in fv:
    return
  for name, f in FIELDS.items():
    meta = f.metadata
    default = f.default
    kind = meta["kind"] or type(default)
    text = meta["help"]
    module = f"dssgd_jax ({meta['group']})"
    if meta["choices"] is not None:
      flags.DEFINE_enum(name, default, list(meta["choices"]), text,
                        flag_values=fv, module_name=module)
    elif kind is bool:
      flags.DEFINE_boolean(name, default, text, flag_values=fv,
                           module_name=module)
    elif kind is int:
      flags.DEFINE_integer(name, default, text, flag_values=fv,
                           module_name=module)
    elif kind is float:
      flags.DEFINE_float(name, default, text, flag_values=fv,
                         module_name=module)
    else:
      flags.DEFINE_string(name, default, text, flag_values=fv,
                          module_name=module)


def declare_key_flags(flag_values=None) -> None:
  """Lists every run flag, by group, in the calling program's ``--help``."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS if flag_values is None else flag_values
  for name in FIELDS:
    flags.declare_key_flag(name, flag_values=fv)


def from_flags(flag_values=None) -> Config:
  """A Config from parsed absl flags, its values checked
  (:func:`check_values`; :func:`dssgd_jax.run.build.validate` checks which
  flags the run reads)."""
  if flag_values is None:
    from absl import flags  # pylint: disable=g-import-not-at-top
    flag_values = flags.FLAGS
  cfg = Config(**{n: flag_values[n].value for n in FIELDS
                  if n in flag_values})
  return check_values(cfg)
