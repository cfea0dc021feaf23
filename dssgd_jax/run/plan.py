"""The experiment plan: one immutable value holding everything a run computes
with.

A :class:`Plan` names the model, the participants' data (:class:`DataSpec`),
their local optimizer (optax), the upload rule, the download rule, the
server's aggregation, the protocol or algorithm, the seeds and the run's
length; its privacy claim is derived from the upload rule it holds
(:meth:`Plan.claim`). The run layer takes a plan
(:func:`dssgd_jax.run.experiment.run`): metrics, ε and δ, ``num_seeds``,
checkpoints and resume, TensorBoard, figures and the summary are the same
whether the plan was built from flags (:func:`dssgd_jax.run.build.plan`, what
``python -m dssgd_jax.main`` does) or by hand::

    from dssgd_jax import rules
    from dssgd_jax.run import build, experiment
    base = build.plan(build.validate(Config(dataset="digits", ...)))
    mine = base.replace(upload_rule=rules.chain(my_rule(c), rules.clip(0.01)),
                        name="my_rule")
    summary = experiment.run(mine, workdir="runs/my_rule")

Every object a plan holds prints by a stable name (rules, download rules and
aggregations do; the optimizer by ``optimizer_name``), and
:meth:`Plan.describe` lists them: ``config.json`` stores it, and a work
directory holding another plan's run is refused on resume.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from dssgd_jax import aggregation as aggregation_lib
from dssgd_jax import models as models_lib
from dssgd_jax import rules
from dssgd_jax import server as server_lib
from dssgd_jax.data import datasets as datasets_lib

# What a plan may change on resume (how long, how often it logs and
# checkpoints, where it runs): everything else must match the stored plan.
RESUMABLE = ("epochs", "progress", "checkpoint_every", "eval_every",
             "mesh_shape", "name")


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Which data the participants hold (SPEC section 5).

  Attributes:
    dataset: a name of :data:`dssgd_jax.data.DATASETS`.
    num_participants: N.
    samples_per_participant: n (each participant's, when ``sizes`` is None).
    sizes: each participant's number of examples (unequal participants), or
      None.
    partition, dirichlet_alpha: how the training set is split.
    seed: the seed of the split (and of the evaluation subset).
    vary_partition: with several seeds, run s draws its split from seed + s.
    data_source, data_dir: where the data is read from.
    standardize: per-channel standardization with each participant's own
      training statistics (None: the dataset's default).
    svhn_paper_split, svhn_test_examples: SVHN as the paper.
    eval_examples: evaluate on a fixed subset of the test split (0: all).
    centralized: one model trains on the union of everyone's data.
  """
  dataset: str = "digits"
  num_participants: int = 14
  samples_per_participant: int = 100
  sizes: tuple[int, ...] | None = None
  partition: str = "iid"
  dirichlet_alpha: float = 0.5
  seed: int = 0
  vary_partition: bool = False
  data_source: str = "auto"
  data_dir: str | None = None
  standardize: bool | None = None
  svhn_paper_split: bool = False
  svhn_test_examples: int = 10_000
  eval_examples: int = 0
  centralized: bool = False

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """The dataset's image shape (before any model padding)."""
    return tuple(datasets_lib.IMAGE_SHAPES[self.dataset])

  def replace(self, **kw) -> "DataSpec":
    return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything a run computes with (see the module docstring).

  Attributes:
    model: the model's name (:data:`dssgd_jax.models.MODELS`).
    data: the participants' data.
    optimizer: the local ``optax.GradientTransformation``.
    optimizer_name: how it prints (e.g. ``sgd(0.05)``).
    batch_size: M.
    upload_rule: the :class:`~dssgd_jax.rules.UploadRule` applied to Δw
      (None: nothing is uploaded).
    download_rule: the :class:`~dssgd_jax.server.DownloadRule`.
    aggregation: the server's :class:`~dssgd_jax.aggregation.Aggregation`.
    protocol: ``round_robin``, ``parallel``, ``async``, ``fedavg``,
      ``standalone``, or a callable ``(update, download, aggregation, axis,
      plan) -> Protocol`` for a protocol of one's own.
    epochs: E.
    algorithm: the label the run reports (``dssgd``, ``fedavg``,
      ``standalone``, ``centralized``, or one's own).
    name: a free label (figures, summaries).
    reset_optimizer: the local optimizer's state restarts at each download.
    shuffle: the local epoch's example order
      (:func:`dssgd_jax.participant.epoch_batches`).
    stat_decay, decay_every: β of the server's update counters.
    upload_loss, download_loss: simulated loss probabilities.
    staleness, max_staleness: the async protocol's staleness.
    participant_axis: ``vmap`` or ``map`` (how, not what, is computed).
    conv_impl: the convolutions' lowering (how, not what).
    seed, num_seeds, seed_axis: the runs' seeds (initialization, order,
      noise) and how several are computed.
    delta: δ at which an (ε, δ) claim is reported.
    canaries, canary_scale: the end-to-end audit's canaries
      (:mod:`dssgd_jax.canaries`).
    checked: run every upload rule in checked mode
      (:func:`dssgd_jax.rules.checked`).
    eval_every, checkpoint_every, progress: logging.
    mesh_shape: devices the participant axis is split over (0: all that
      divide it).
    config: the :class:`~dssgd_jax.run.config.Config` it was built from
      (None for a plan built by hand).
  """
  model: str
  data: DataSpec
  optimizer: Any
  optimizer_name: str
  batch_size: int
  upload_rule: rules.UploadRule | None
  download_rule: server_lib.DownloadRule
  aggregation: aggregation_lib.Aggregation
  protocol: str | Callable
  epochs: int
  algorithm: str = "dssgd"
  name: str = ""
  reset_optimizer: bool = False
  shuffle: str = "permutation"
  stat_decay: float = 1.0
  decay_every: int = 1
  upload_loss: float = 0.0
  download_loss: float = 0.0
  staleness: str = "constant"
  max_staleness: int = 0
  participant_axis: str = "vmap"
  conv_impl: str = "xla"
  seed: int = 0
  num_seeds: int = 1
  seed_axis: str = "map"
  delta: float = 1e-5
  canaries: int = 0
  canary_scale: float = 0.0
  checked: bool = False
  eval_every: int = 1
  checkpoint_every: int = 1
  progress: bool = True
  mesh_shape: int = 0
  config: Any = None

  def replace(self, **kw) -> "Plan":
    """A copy with fields replaced (a hand-made variant of a plan)."""
    return dataclasses.replace(self, **kw)

  @functools.cached_property
  def num_params(self) -> int:
    """D, computed abstractly (no data, no backend)."""
    return models_lib.abstract_num_params(self.model, self.data.image_shape)

  @property
  def protocol_name(self) -> str:
    return self.protocol if isinstance(self.protocol, str) else getattr(
        self.protocol, "__name__", "custom")

  @property
  def shares(self) -> bool:
    """Whether the server model is ever updated."""
    return self.upload_rule is not None

  def claim(self, epochs: int) -> rules.Claim:
    """The privacy claim after ``epochs`` epochs, from the rule that runs."""
    if self.data.centralized:
      return rules.Claim(None, 0.0, "--algorithm=centralized pools every "
                         "participant's data in one place.")
    return rules.claim(self.upload_rule, self.num_params, epochs, self.delta)

  def describe(self) -> dict:
    """Every field as JSON (objects by their names): ``config.json``'s
    ``plan``, and what a resumed run must match."""
    out = {}
    for f in dataclasses.fields(self):
      if f.name in ("config", "optimizer"):
        continue
      v = getattr(self, f.name)
      if f.name == "data":
        v = dataclasses.asdict(v)
        if v["sizes"] is not None:
          v["sizes"] = list(v["sizes"])
      elif f.name == "protocol":
        v = self.protocol_name
      elif not isinstance(v, (str, int, float, bool, type(None))):
        v = repr(v)
      out[f.name] = v
    return out
