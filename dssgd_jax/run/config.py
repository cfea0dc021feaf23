"""The run configuration, defined once: fields, help, choices, validation.

Each :class:`Config` field carries its help text, its group in ``--help`` and
its choices (the choice tuples are owned by the modules that implement them);
:func:`define_flags` generates the absl flags from the fields, and
:func:`validate` checks a config before any work starts, raising one
:class:`~dssgd_jax.errors.ConfigError` sentence that names the flag.

**Every flag changes the run or is rejected.** :func:`consumed_flags` says
which flags the chosen algorithm, protocol, noise mode and selection read;
:func:`validate` rejects any other flag that differs from its default, with
the reason. :func:`for_algorithm` resets what another algorithm would not
read (the sweeps use it to run baselines from a DSSGD preset).

>>> cfg = Config(dataset="digits", num_participants=10,
...              samples_per_participant=100)
>>> validate(cfg).model
'digits_cnn'
>>> validate(cfg.replace(algorithm="fedavg", upload_fraction=0.5))
Traceback (most recent call last):
...
dssgd_jax.errors.ConfigError: --upload_fraction=0.5 has no effect with --algorithm=fedavg, which uploads every entry of its update; leave it at its default (0.1).
"""

import dataclasses
import json
import math
from typing import Any

from dssgd_jax import algorithms
from dssgd_jax import models
from dssgd_jax import protocols
from dssgd_jax import rules
from dssgd_jax import server
from dssgd_jax.data import datasets as datasets_lib
from dssgd_jax.data import partition as partition_lib
from dssgd_jax.errors import ConfigError

SELECTIONS = rules.SELECTIONS
NOISES = rules.NOISES
DOWNLOAD_RULES = ("auto",) + server.DOWNLOAD_RULES
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
      600, "n, training examples held by each participant.",
      "model and training")
  epochs: int = _field(30, "Epochs (one local epoch each).",
                       "model and training")
  batch_size: int = _field(32, "M, local minibatch size.",
                           "model and training")
  learning_rate: float = _field(0.01, "k, local SGD rate.",
                                "model and training")
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


# ----------------------------------------------------------------------------
# Which flags each choice reads.

# Read by every run.
_ALWAYS = {
    "workdir", "dataset", "data_source", "data_dir", "partition",
    "standardize", "model", "conv_impl", "algorithm", "num_participants",
    "samples_per_participant", "epochs", "batch_size", "learning_rate",
    "seed", "num_seeds", "data_seed", "eval_every", "eval_examples", "checkpoint_every", "progress",
    "mesh_shape", "cpu_devices", "coordinator_address"}


def consumed_flags(cfg: Config) -> dict[str, str]:
  """Flags that ``cfg`` does not read, each with the reason (one clause).

  Every field not returned here changes the run when it changes.
  """
  why: dict[str, str] = {}
  alg = cfg.algorithm

  def unused(names, reason):
    for n in names:
      why.setdefault(n, reason)

  if cfg.num_seeds == 1:
    unused(["vary_partition", "seed_axis"],
           "which only --num_seeds > 1 reads")
  if cfg.partition != "dirichlet":
    unused(["dirichlet_alpha"], f"which only --partition=dirichlet reads")
  if cfg.dataset != "svhn_cropped":
    unused(["svhn_paper_split"], "which only --dataset=svhn_cropped reads")
  if not (cfg.dataset == "svhn_cropped" and cfg.svhn_paper_split):
    unused(["svhn_test_examples"], "which only --svhn_paper_split reads")
  if not cfg.coordinator_address:
    unused(["num_processes", "process_id"],
           "which only multi-host runs (--coordinator_address) read")
  exchange = ["protocol", "upload_fraction", "download_fraction",
              "download_rule", "selection", "threshold", "stat_decay",
              "decay_every", "clip_bound", "l2_clip", "noise", "noise_scale",
              "epsilon", "delta", "staleness", "max_staleness", "upload_loss",
              "download_loss"]
  if alg in ("standalone", "centralized"):
    unused(exchange, "which shares nothing")
    if alg == "centralized":
      unused(["participant_axis"], "which trains one model")
    return why
  if alg == "fedavg":
    unused(["upload_fraction", "selection", "threshold", "clip_bound"],
           "which uploads every entry of its update")
    unused(["download_fraction", "download_rule", "stat_decay",
            "decay_every"], "which downloads every entry of w_g")
    unused(["protocol", "staleness", "max_staleness"],
           "which runs in synchronous parallel rounds")
    unused(["epsilon"], "which has no sparse vector technique (--noise=svt)")
    if cfg.noise != "gaussian":
      unused(["noise_scale", "delta"], f"and --noise={cfg.noise}")
    return why
  # DSSGD.
  if cfg.upload_fraction == 0:
    unused(exchange[3:], "and --upload_fraction=0, which shares nothing")
    unused(["download_fraction"], "and --upload_fraction=0, which shares "
           "nothing (there is nothing to download)")
  if cfg.protocol == "round_robin":
    unused(["participant_axis"], "and --protocol=round_robin, which visits "
           "participants one at a time")
  if cfg.protocol != "async":
    unused(["staleness", "max_staleness"],
           f"and --protocol={cfg.protocol}; only --protocol=async reads it")
  if cfg.noise == "svt":
    unused(["selection"], "and --noise=svt, which selects the entries itself")
    unused(["l2_clip"], "and --noise=svt, which bounds each value by "
           "--clip_bound")
    unused(["noise_scale"], "and --noise=svt, whose noise follows from "
           "--epsilon")
  else:
    unused(["epsilon"], f"and --noise={cfg.noise}; only --noise=svt reads it")
    if cfg.selection != "threshold":
      unused(["threshold"], f"and --selection={cfg.selection}")
    if cfg.noise == "none":
      unused(["noise_scale"], "and --noise=none")
  if cfg.noise != "gaussian":
    unused(["delta"], f"and --noise={cfg.noise}; δ is only used for the "
           "Gaussian mechanism's ε")
  if resolved_download_rule(cfg) != "most_updated":
    unused(["stat_decay", "decay_every"], "and downloads that are not "
           "most_updated (the update counters choose nothing)")
  elif cfg.stat_decay == 1:
    unused(["decay_every"], "and --stat_decay=1 (nothing decays)")
  return why


def resolved_download_rule(cfg: Config) -> str:
  """``--download_rule=auto``: all at θd = 1, else the paper's most_updated."""
  if cfg.download_rule != "auto":
    return cfg.download_rule
  return "all" if cfg.download_fraction >= 1 else "most_updated"


# Values a flag may take for a choice that does not read it, because they
# say what runs anyway (e.g. FedAvg rounds are parallel).
_IMPLIED = {("fedavg", "protocol"): "parallel",
            ("standalone", "protocol"): "parallel",
            ("centralized", "protocol"): "parallel",
            ("standalone", "upload_fraction"): 0.0}


def _reject_unconsumed(cfg: Config) -> None:
  for name, reason in consumed_flags(cfg).items():
    value = getattr(cfg, name)
    if value == getattr(DEFAULTS, name):
      continue
    if _IMPLIED.get((cfg.algorithm, name)) == value:
      continue
    raise ConfigError(
        f"--{name}={value} has no effect with --algorithm={cfg.algorithm}, "
        f"{reason}; leave it at its default ({getattr(DEFAULTS, name)}).")


def for_algorithm(cfg: Config, algorithm: str, **changes) -> Config:
  """``cfg`` for another algorithm, with every flag that it does not read
  reset to its default (how a sweep runs baselines from a DSSGD preset).

  >>> base = Config(upload_fraction=0.01, noise="svt", epsilon=1.0,
  ...               clip_bound=0.1)
  >>> c = for_algorithm(base, "standalone")
  >>> c.noise, c.upload_fraction, c.epsilon
  ('none', 0.1, None)
  """
  new = cfg.replace(algorithm=algorithm, **changes)
  for _ in range(3):  # resetting one flag can make another unread
    reset = {n: getattr(DEFAULTS, n) for n in consumed_flags(new)
             if n not in changes}
    new = new.replace(**reset)
  return new


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


def validate(cfg: Config) -> Config:
  """Checks every flag; returns the config with derived defaults filled in.

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
               "cpu_devices"):
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
  for name in ("threshold", "noise_scale"):
    _number(cfg, name, 0, allow_low=True)
  for name in ("clip_bound", "l2_clip", "epsilon"):
    if getattr(cfg, name) is not None:
      _number(cfg, name, 0)
  if not 0.0 < cfg.stat_decay <= 1.0:
    raise ConfigError(f"--stat_decay={cfg.stat_decay} must be in (0, 1].")
  if cfg.delta >= 1:
    raise ConfigError(f"--delta={cfg.delta} must be below 1.")
  _check_data(cfg)
  _check_exchange(cfg)
  _reject_unconsumed(cfg)
  _check_delta(cfg)
  if cfg.process_id >= cfg.num_processes:
    raise ConfigError(f"--process_id={cfg.process_id} must be below "
                      f"--num_processes={cfg.num_processes}.")
  return cfg


def _check_data(cfg: Config) -> None:
  available = (SVHN_PAPER_TRAIN_EXAMPLES if cfg.dataset == "svhn_cropped"
               and cfg.svhn_paper_split else TRAIN_EXAMPLES[cfg.dataset])
  need = cfg.num_participants * cfg.samples_per_participant
  if need > available:
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
  elif cfg.batch_size > cfg.samples_per_participant:
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
  if alg == "fedavg" and cfg.protocol not in ("round_robin", "parallel"):
    raise ConfigError(f"--algorithm=fedavg runs parallel rounds, not "
                      f"--protocol={cfg.protocol}.")
  if alg == "dssgd" and cfg.protocol == "async" and cfg.max_staleness == 0:
    raise ConfigError("--protocol=async with --max_staleness=0 runs exactly "
                      "--protocol=parallel; set --max_staleness to 1 or more "
                      "(or use --protocol=parallel).")
  if alg in ("standalone", "centralized") and cfg.protocol == "async":
    raise ConfigError(f"--protocol=async has no effect with --algorithm="
                      f"{alg}, which shares nothing.")
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


def _check_delta(cfg: Config) -> None:
  """--delta is read only where the claim is an (ε, δ) one (Gaussian)."""
  if cfg.delta == DEFAULTS.delta:
    return
  from dssgd_jax.run import build  # pylint: disable=g-import-not-at-top
  d = models.abstract_num_params(cfg.model,
                                 datasets_lib.IMAGE_SHAPES[cfg.dataset])
  claim = build.claim(cfg, d, 1)
  if claim.event is None or claim.delta == 0:
    why = (f"which gives no guarantee: {claim.reason}" if claim.reason
           else "whose guarantee is pure ε-DP")
    raise ConfigError(f"--delta={cfg.delta} has no effect: this run's "
                      f"upload rule is {build.upload_rule(cfg, d)!r}, {why}")


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
  """Builds and validates a Config from parsed absl flags."""
  if flag_values is None:
    from absl import flags  # pylint: disable=g-import-not-at-top
    flag_values = flags.FLAGS
  cfg = Config(**{n: flag_values[n].value for n in FIELDS
                  if n in flag_values})
  return validate(cfg)
