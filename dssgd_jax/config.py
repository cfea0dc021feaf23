"""One frozen run configuration, built from absl flags and validated in one place.

SPEC section 2 gives the notation and defaults. Every entry point
(``dssgd_jax.main``, ``dssgd_jax.reproduce``) defines the same flags with
:func:`define_flags`, builds a :class:`Config` with :func:`from_flags`, and
gets every bad value reported by :func:`validate` as one
:class:`~dssgd_jax.errors.ConfigError` sentence naming the flag, before any
work starts.

>>> cfg = Config(dataset="digits", num_participants=10,
...              samples_per_participant=100)
>>> validate(cfg).model
'digits_cnn'
"""

import dataclasses
import json
import math
from typing import Any

from dssgd_jax.errors import ConfigError

DATASETS = ("digits", "mnist", "fashion_mnist", "svhn_cropped", "cifar10")
DATA_SOURCES = ("auto", "tfds", "files")
PARTITIONS = ("iid", "shards", "dirichlet")
MODELS = ("mnist_mlp", "mnist_cnn", "svhn_cnn", "digits_cnn", "digits_mlp")
ALGORITHMS = ("dssgd", "centralized", "standalone", "fedavg")
PROTOCOLS = ("round_robin", "parallel", "async")
SELECTIONS = ("largest", "threshold", "random", "largest_approx")
NOISES = ("none", "laplace", "gaussian", "svt")
DOWNLOAD_RULES = ("all", "most_updated", "random")
CONV_IMPLS = ("auto", "im2col", "xla")
PARTICIPANT_AXES = ("auto", "vmap", "map")
STALENESS = ("constant", "uniform", "geometric")

# Training examples of each dataset (SVHN: train split; with
# --svhn_paper_split the paper's 100,000-example pool), checked before any data
# is loaded so that too many participants fail at once.
TRAIN_EXAMPLES = {
    "digits": 1437,
    "mnist": 60_000,
    "fashion_mnist": 60_000,
    "svhn_cropped": 73_257,
    "cifar10": 50_000,
}
SVHN_PAPER_TRAIN_EXAMPLES = 100_000

DEFAULT_MODEL = {
    "digits": "digits_cnn",
    "mnist": "mnist_cnn",
    "fashion_mnist": "mnist_cnn",
    "svhn_cropped": "svhn_cnn",
    "cifar10": "svhn_cnn",
}


@dataclasses.dataclass(frozen=True)
class Config:
  """A complete, resolved run configuration (SPEC section 2 names in comments).

  Attributes are the flags of the same name; see ``--help`` for each one.
  """
  workdir: str | None = None
  # Data (SPEC section 5).
  dataset: str = "digits"
  data_source: str = "auto"
  data_dir: str | None = None
  partition: str = "iid"
  dirichlet_alpha: float = 0.5
  standardize: bool | None = None
  svhn_paper_split: bool = False
  svhn_test_examples: int = 10_000
  # Model and training.
  model: str | None = None
  conv_impl: str = "auto"
  participant_axis: str = "auto"
  algorithm: str = "dssgd"
  protocol: str = "round_robin"
  num_participants: int = 30          # N
  samples_per_participant: int = 600  # n
  epochs: int = 30
  batch_size: int = 32                # M
  learning_rate: float = 0.01         # k
  # Sharing (SPEC section 3).
  upload_fraction: float = 0.1        # θu
  download_fraction: float = 1.0      # θd
  download_rule: str = "all"
  selection: str = "largest"
  threshold: float = 1e-4             # τ
  clip_bound: float | None = None     # γ
  noise: str = "none"
  noise_scale: float = 0.0
  epsilon: float | None = None        # ε per participant per epoch (svt)
  l2_clip: float | None = None        # Gaussian mechanism's L2 bound
  delta: float = 1e-5                 # δ for the Gaussian accountant
  stat_decay: float = 1.0             # β
  decay_every: int = 1
  # Asynchronous protocol.
  staleness: str = "constant"
  max_staleness: int = 0
  upload_loss: float = 0.0
  # Evaluation, logging, checkpoints.
  eval_every: int = 1
  eval_examples: int = 0
  checkpoint_every: int = 1
  seed: int = 0
  progress: bool = True
  # Devices.
  mesh_shape: int = 0
  cpu_devices: int = 0
  coordinator_address: str | None = None
  num_processes: int = 1
  process_id: int = 0

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Config":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  def replace(self, **kw) -> "Config":
    return dataclasses.replace(self, **kw)


def _choice(cfg, name, allowed):
  value = getattr(cfg, name)
  if value not in allowed:
    raise ConfigError(f"--{name}={value!r} is not one of: "
                      f"{', '.join(allowed)}.")


def _fraction(cfg, name):
  value = getattr(cfg, name)
  if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0
          and math.isfinite(value)):
    raise ConfigError(f"--{name}={value} must be a fraction in [0, 1].")


def _positive(cfg, name, allow_zero=False):
  value = getattr(cfg, name)
  ok = value is not None and math.isfinite(value) and (
      value >= 0 if allow_zero else value > 0)
  if not ok:
    what = "non-negative" if allow_zero else "positive"
    raise ConfigError(f"--{name}={value} must be {what}.")


def validate(cfg: Config) -> Config:
  """Checks every flag; returns the config with derived defaults filled in.

  Raises:
    ConfigError: one sentence naming the first bad flag.
  """
  _choice(cfg, "dataset", DATASETS)
  _choice(cfg, "data_source", DATA_SOURCES)
  _choice(cfg, "partition", PARTITIONS)
  _choice(cfg, "algorithm", ALGORITHMS)
  _choice(cfg, "protocol", PROTOCOLS)
  _choice(cfg, "selection", SELECTIONS)
  _choice(cfg, "noise", NOISES)
  _choice(cfg, "download_rule", DOWNLOAD_RULES)
  _choice(cfg, "conv_impl", CONV_IMPLS)
  _choice(cfg, "participant_axis", PARTICIPANT_AXES)
  _choice(cfg, "staleness", STALENESS)
  if cfg.model is None:
    cfg = cfg.replace(model=DEFAULT_MODEL[cfg.dataset])
  _choice(cfg, "model", MODELS)
  for name in ("upload_fraction", "download_fraction", "upload_loss"):
    _fraction(cfg, name)
  for name in ("learning_rate", "batch_size", "num_participants",
               "samples_per_participant", "epochs", "eval_every",
               "checkpoint_every", "decay_every", "dirichlet_alpha",
               "svhn_test_examples", "num_processes", "delta"):
    _positive(cfg, name)
  for name in ("threshold", "noise_scale", "eval_examples", "max_staleness",
               "mesh_shape", "process_id", "cpu_devices"):
    _positive(cfg, name, allow_zero=True)
  for name in ("batch_size", "num_participants", "samples_per_participant",
               "epochs", "eval_every", "checkpoint_every", "decay_every",
               "eval_examples", "max_staleness", "mesh_shape", "cpu_devices"):
    if int(getattr(cfg, name)) != getattr(cfg, name):
      raise ConfigError(f"--{name}={getattr(cfg, name)} must be an integer.")
  if not 0.0 < cfg.stat_decay <= 1.0:
    raise ConfigError(f"--stat_decay={cfg.stat_decay} must be in (0, 1].")
  if cfg.delta >= 1:
    raise ConfigError(f"--delta={cfg.delta} must be below 1.")
  if cfg.clip_bound is not None:
    _positive(cfg, "clip_bound")
  if cfg.l2_clip is not None:
    _positive(cfg, "l2_clip")
  available = (SVHN_PAPER_TRAIN_EXAMPLES if cfg.dataset == "svhn_cropped"
               and cfg.svhn_paper_split else TRAIN_EXAMPLES[cfg.dataset])
  need = cfg.num_participants * cfg.samples_per_participant
  if need > available:
    raise ConfigError(
        f"--num_participants={cfg.num_participants} x "
        f"--samples_per_participant={cfg.samples_per_participant} needs "
        f"{need:,} training examples but --dataset={cfg.dataset} has only "
        f"{available:,}.")
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
  if cfg.noise in ("laplace", "gaussian") and cfg.noise_scale <= 0:
    raise ConfigError(f"--noise={cfg.noise} needs a positive --noise_scale.")
  if cfg.noise == "svt":
    if cfg.epsilon is None or not cfg.epsilon > 0:
      raise ConfigError("--noise=svt needs a positive --epsilon.")
    if cfg.clip_bound is None:
      raise ConfigError("--noise=svt needs --clip_bound (γ): the SVT "
                        "sensitivity is 2γ.")
    if cfg.upload_fraction <= 0:
      raise ConfigError("--noise=svt needs --upload_fraction > 0.")
  elif cfg.epsilon is not None:
    raise ConfigError(f"--epsilon is only used with --noise=svt, not "
                      f"--noise={cfg.noise}.")
  if cfg.algorithm in ("centralized", "standalone", "fedavg") and (
      cfg.noise != "none"):
    raise ConfigError(f"--noise={cfg.noise} has no effect with "
                      f"--algorithm={cfg.algorithm}, which uploads no noised "
                      "updates; use --noise=none.")
  if cfg.algorithm == "fedavg" and cfg.protocol != "parallel":
    raise ConfigError(f"--algorithm=fedavg runs rounds in parallel; use "
                      f"--protocol=parallel, not --protocol={cfg.protocol}.")
  if cfg.protocol == "async" and cfg.algorithm != "dssgd":
    raise ConfigError("--protocol=async is only defined for --algorithm=dssgd.")
  if cfg.process_id >= cfg.num_processes:
    raise ConfigError(f"--process_id={cfg.process_id} must be below "
                      f"--num_processes={cfg.num_processes}.")
  return cfg


def define_flags():
  """Defines the run flags on absl's global FLAGS (idempotent)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if "upload_fraction" in flags.FLAGS:
    return
  d = Config()
  f = flags
  f.DEFINE_string("workdir", None, "Directory for config.json, metrics.jsonl, "
                  "checkpoints, events and plots. Required.")
  f.DEFINE_string("dataset", d.dataset, f"One of {', '.join(DATASETS)}.")
  f.DEFINE_string("data_source", d.data_source, "auto (local files in "
                  "--data_dir, then tensorflow-datasets), tfds or files.")
  f.DEFINE_string("data_dir", d.data_dir, "Directory with the original "
                  "dataset files (idx, .mat, CIFAR batches) or tfds data.")
  f.DEFINE_string("partition", d.partition, "How training data is split "
                  f"over participants: {', '.join(PARTITIONS)}.")
  f.DEFINE_float("dirichlet_alpha", d.dirichlet_alpha, "α of the Dirichlet "
                 "label proportions for --partition=dirichlet.")
  f.DEFINE_boolean("standardize", d.standardize, "Standardize each channel "
                   "with training-set statistics (default: per dataset).")
  f.DEFINE_boolean("svhn_paper_split", d.svhn_paper_split, "SVHN as the paper:"
                   " training pool from train+extra, a fixed 10,000-example "
                   "test subset.")
  f.DEFINE_integer("svhn_test_examples", d.svhn_test_examples, "Test subset "
                   "size with --svhn_paper_split.")
  f.DEFINE_string("model", d.model, f"One of {', '.join(MODELS)} (default: "
                  "the dataset's model).")
  f.DEFINE_string("conv_impl", d.conv_impl, "Convolution lowering: im2col "
                  "(fast with a participant axis), xla, or auto.")
  f.DEFINE_string("participant_axis", d.participant_axis, "How the "
                  "participants of the parallel/async protocols are computed: "
                  "vmap (batched; GPU/TPU), map (lax.map, one after another "
                  "in one program; faster on CPU) or auto (map on CPU, else "
                  "vmap).")
  f.DEFINE_string("algorithm", d.algorithm, f"One of {', '.join(ALGORITHMS)}.")
  f.DEFINE_string("protocol", d.protocol, f"One of {', '.join(PROTOCOLS)}.")
  f.DEFINE_integer("num_participants", d.num_participants, "N, participants.")
  f.DEFINE_integer("samples_per_participant", d.samples_per_participant,
                   "n, training examples held by each participant.")
  f.DEFINE_integer("epochs", d.epochs, "Epochs (one local epoch each).")
  f.DEFINE_integer("batch_size", d.batch_size, "M, local minibatch size.")
  f.DEFINE_float("learning_rate", d.learning_rate, "k, local SGD rate.")
  f.DEFINE_float("upload_fraction", d.upload_fraction, "θu, fraction of the "
                 "parameters uploaded per epoch (0 = share nothing).")
  f.DEFINE_float("download_fraction", d.download_fraction, "θd, fraction of "
                 "the parameters downloaded per epoch.")
  f.DEFINE_string("download_rule", d.download_rule, "Which entries to "
                  f"download: {', '.join(DOWNLOAD_RULES)}.")
  f.DEFINE_string("selection", d.selection, "Upload selection rule: "
                  f"{', '.join(SELECTIONS)}.")
  f.DEFINE_float("threshold", d.threshold, "τ for --selection=threshold and "
                 "the SVT.")
  f.DEFINE_float("clip_bound", d.clip_bound, "γ: uploaded values are bounded "
                 "to [-γ, γ] (default: no bound).")
  f.DEFINE_string("noise", d.noise, f"Upload noise: {', '.join(NOISES)}.")
  f.DEFINE_float("noise_scale", d.noise_scale, "Laplace scale b or Gaussian "
                 "standard deviation σ.")
  f.DEFINE_float("epsilon", d.epsilon, "ε per participant per epoch for "
                 "--noise=svt.")
  f.DEFINE_float("l2_clip", d.l2_clip, "L2 bound of each upload for the "
                 "Gaussian mechanism.")
  f.DEFINE_float("delta", d.delta, "δ reported by the Gaussian accountant.")
  f.DEFINE_float("stat_decay", d.stat_decay, "β: the server multiplies its "
                 "update counters by β every --decay_every epochs.")
  f.DEFINE_integer("decay_every", d.decay_every, "Epochs between decays.")
  f.DEFINE_string("staleness", d.staleness, "Async staleness distribution: "
                  f"{', '.join(STALENESS)}.")
  f.DEFINE_integer("max_staleness", d.max_staleness, "Largest staleness "
                   "(epochs) for --protocol=async.")
  f.DEFINE_float("upload_loss", d.upload_loss, "Probability that an upload "
                 "is lost (--protocol=async).")
  f.DEFINE_integer("eval_every", d.eval_every, "Evaluate every this many "
                   "epochs (and after the last).")
  f.DEFINE_integer("eval_examples", d.eval_examples, "Evaluate on this fixed "
                   "subset of the test split (0 = all).")
  f.DEFINE_integer("checkpoint_every", d.checkpoint_every, "Checkpoint every "
                   "this many epochs (and after the last).")
  f.DEFINE_integer("seed", d.seed, "Random seed (data split, init, training).")
  f.DEFINE_boolean("progress", d.progress, "Print a line per epoch.")
  f.DEFINE_integer("mesh_shape", d.mesh_shape, "Devices to shard the "
                   "participant axis over (0 = all local devices that divide "
                   "it).")
  f.DEFINE_integer("cpu_devices", d.cpu_devices, "Split the host CPU into "
                   "this many XLA devices (one per core is fastest on a "
                   "CPU-only machine: the participant axis is then sharded "
                   "over cores); 0 = JAX's default of one.")
  f.DEFINE_string("coordinator_address", d.coordinator_address, "host:port "
                  "of process 0 for multi-host runs (jax.distributed).")
  f.DEFINE_integer("num_processes", d.num_processes, "Processes in a "
                   "multi-host run.")
  f.DEFINE_integer("process_id", d.process_id, "This process's index.")


def from_flags(flag_values=None) -> Config:
  """Builds and validates a Config from parsed absl flags."""
  if flag_values is None:
    from absl import flags  # pylint: disable=g-import-not-at-top
    flag_values = flags.FLAGS
  names = [f.name for f in dataclasses.fields(Config)]
  cfg = Config(**{n: flag_values[n].value for n in names if n in flag_values})
  return validate(cfg)
