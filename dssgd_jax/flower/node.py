"""One participant on its own machine: data, model, upload rule, policy, ledger.

:class:`Participant` is what a Flower ``ClientApp`` (:mod:`.client_app`) runs
for each message, with no Flower in it, so that it is tested directly. It runs
exactly the simulation's pieces: the jitted update of
:func:`dssgd_jax.participant.make_update` (download, one local epoch of SGD,
the upload rule: selection, bounding, noise or the SVT) built by the run
layer from the run's config, on the participant's own data.

**The participant decides what leaves its machine** (:class:`Policy`, set
when its node starts, never by the server): whether it accepts an upload rule
without a differential-privacy guarantee (by default it does not), the total
ε and δ it will spend over every run on this machine, and whether it reports
its training loss and its own model's accuracy (by default it does not). An
epoch whose rule or cost would break the policy is refused: nothing is
computed on the data, one line goes to the participant's log and ledger, and
the reply carries only the refusal.

What stays on the machine: the data, the local model (one ``.npy`` per epoch
in the run's state dir, the last two kept, written atomically), the last
uploads (to resend an identical retry), the PRNG seed and the ε ledger.
What leaves it (:meth:`Participant.visit`): the upload's (index, value)
pairs, its partition id and the epoch, or a refusal; the loss and accuracy
only when the policy allows.

**The ledger** (``ledger.jsonl`` in the node's state dir, one per machine,
shared by every run) has one line per epoch the participant was asked for:
each time the upload rule ran on the data it is charged, whatever the rule
released (an SVT that releases nothing still looked at the data), and the
run's ε is ``rules.claim`` of its rule for the number of times it ran. A
retried epoch with the same download resends the stored upload (the same
release: not charged again); a retry with a different download runs the
mechanism again with fresh randomness and is charged. The totals over runs
add up (basic composition across runs).

Keys: participant ``i``'s key for epoch ``e`` is the simulation's, derived
from the participant's ``seed``: ``fold_in(fold_in(train_key, e), i)`` with
``train_key = split(key(seed))[1]``, so that with the run's ``--seed`` a
deployed participant draws the same numbers as the simulated one (how the
tests compare them); a charged retry folds in its attempt number. A real
participant keeps its seed secret (by default a random one, stored in
``state_dir``): the noise of its uploads must be unknown to the server.
"""

import dataclasses
import hashlib
import json
import os
import secrets

import jax
import jax.numpy as jnp
import numpy as np

from dssgd_jax import _io
from dssgd_jax import evaluation
from dssgd_jax import models as models_lib
from dssgd_jax import participant as participant_lib
from dssgd_jax import protocols
from dssgd_jax import rules
from dssgd_jax.data import base as data_base
from dssgd_jax.data import datasets as datasets_lib
from dssgd_jax.data import transforms
from dssgd_jax.errors import ConfigError
from dssgd_jax.run import build
from dssgd_jax.run import data as run_data
from dssgd_jax.run import experiment
from dssgd_jax.run import outputs
from dssgd_jax.run.config import Config

SEED_FILE = "seed.json"
LEDGER = "ledger.jsonl"


@dataclasses.dataclass(frozen=True)
class Policy:
  """What a participant accepts to release (set on its own machine).

  Attributes:
    require_guarantee: refuse an epoch whose upload rule gives no
      differential-privacy guarantee (``rules.claim`` says why).
    epsilon_budget: refuse an epoch that would bring the total ε over every
      run on this machine above this.
    delta_budget: likewise for the total δ.
    report_metrics: send the training loss and the own model's test accuracy
      (data-dependent numbers that no ε covers).
  """
  require_guarantee: bool = True
  epsilon_budget: float = 10.0
  delta_budget: float = 1e-5
  report_metrics: bool = False

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "Policy":
    return cls(**json.loads(text))


@dataclasses.dataclass
class Visit:
  """What leaves the participant for one train message.

  Attributes:
    epoch: the epoch.
    refused: the one-sentence reason of a refusal, or None.
    indices, values: the upload's valid entries (None when refused).
    loss, accuracy: only with ``Policy.report_metrics`` (else None).
    downloaded: entries received (kept on the machine, for tests).
    epsilon, delta: this run's ε and δ so far on the ledger (kept on the
      machine).
    charged: whether the upload rule ran on the data for this message.
    partition_id: the participant's position (a protocol field).
  """
  epoch: int
  refused: str | None = None
  indices: np.ndarray | None = None
  values: np.ndarray | None = None
  loss: float | None = None
  accuracy: float | None = None
  downloaded: int = 0
  epsilon: float | None = None
  delta: float = 0.0
  charged: bool = False
  partition_id: int = 0


# What a data.npz holds, per dataset: the raw images as the dataset's loader
# returns them (float32 in [0, 1]) and labels 0..9.
DATA_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


class DataFileError(ConfigError):
  """A participant's data file does not fit the run. Its sentence names the
  file and what is wrong, which may include values computed from the data
  (their range): it is for the participant's own log. The server is told
  only :data:`DATA_FILE_REFUSAL`."""


DATA_FILE_REFUSAL = ("its data.npz does not fit the run (its own log says "
                     "how; nothing computed from the data is sent).")


def load_data_dir(path: str, plan) -> data_base.Dataset:
  """A participant's own data, checked against the run: ``path/data.npz``
  with ``train_images``, ``train_labels``, ``test_images``, ``test_labels``
  (images float32 in [0, 1] shaped (n, H, W, C) as the run's ``--dataset``
  is, labels integers 0-9, at least one example each), preprocessed for the
  plan's model (padding, YUV) but not standardized.

  Raises:
    DataFileError: one sentence naming the file and what is wrong with it (the
      expected shape, dtype or range).
  """
  arrays = read_data_file(os.path.join(path, "data.npz"), plan.data.dataset,
                          where=f"data-dir {path}: ")
  ds = data_base.Dataset(
      arrays["train_images"].astype(np.float32),
      arrays["train_labels"].astype(np.int32),
      arrays["test_images"].astype(np.float32),
      arrays["test_labels"].astype(np.int32), datasets_lib.NUM_CLASSES,
      plan.data.dataset)
  return transforms.preprocess(ds, model=plan.model, standardize=False)


def read_data_file(file: str, dataset: str | None,
                   where: str = "") -> dict:
  """The arrays of a ``data.npz``, checked by :func:`check_data`.

  Args:
    file: the file.
    dataset: the run's dataset (None: any dataset's image shape).
    where: what the error sentence starts with (e.g. the ``--data_dir``).

  Raises:
    DataFileError: one sentence naming the file and what is wrong.
  """
  try:
    with np.load(file) as z:
      arrays = {k: z[k] for k in DATA_ARRAYS}
  except (OSError, KeyError, ValueError, EOFError) as e:
    raise DataFileError(f"{where}{file} is not a readable data file with "
                        "train_images, train_labels, test_images and "
                        f"test_labels ({e}).") from None
  check_data(arrays, dataset, file)
  return arrays


def check_data_file(file: str) -> None:
  """What can be checked of a ``data.npz`` before the run names its
  dataset (every check of :func:`check_data` but the image shape).

  Raises:
    DataFileError: one sentence naming the file and what is wrong.
  """
  read_data_file(file, None)


def check_data(arrays: dict, dataset: str | None, file: str) -> None:
  """Raises DataFileError unless ``arrays`` hold ``dataset``'s examples
  (any dataset's image shape when ``dataset`` is None)."""
  shape = None if dataset is None else tuple(
      datasets_lib.IMAGE_SHAPES[dataset])
  for split in ("train", "test"):
    x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if shape is None:
      if x.ndim != 4:
        raise DataFileError(f"{file}: {split}_images has shape "
                            f"{tuple(x.shape)}, not (n, height, width, "
                            "channels); see the data.npz recipe in "
                            "docs/deployment.md.")
    elif x.ndim != 4 or tuple(x.shape[1:]) != shape:
      want = f"(n, {', '.join(map(str, shape))})"
      raise DataFileError(
          f"{file}: {split}_images has shape {tuple(x.shape)}, but "
          f"--dataset={dataset} images are {want}; see the data.npz recipe "
          "for it in docs/deployment.md.")
    if x.shape[0] < 1:
      raise DataFileError(f"{file}: {split}_images holds no example; it needs "
                          "at least one.")
    if not np.issubdtype(x.dtype, np.floating):
      raise DataFileError(f"{file}: {split}_images is {x.dtype}, not float32 "
                          "values in [0, 1] (divide uint8 pixels by 255, "
                          "digits' 0-16 values by 16).")
    lo, hi = float(np.min(x)), float(np.max(x))
    if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0.0 and hi <= 1.0):
      raise DataFileError(f"{file}: {split}_images values run from {lo:g} to "
                          f"{hi:g}, not within [0, 1] (divide uint8 pixels by "
                          "255, digits' 0-16 values by 16).")
    if y.shape != (x.shape[0],):
      raise DataFileError(f"{file}: {split}_labels has shape {tuple(y.shape)}, "
                          f"not ({x.shape[0]},), one label per image.")
    if not np.issubdtype(y.dtype, np.integer) or (
        y.size and (y.min() < 0 or y.max() >= datasets_lib.NUM_CLASSES)):
      raise DataFileError(f"{file}: {split}_labels must be integers 0 to "
                          f"{datasets_lib.NUM_CLASSES - 1} (got {y.dtype}"
                          + (f", {y.min()} to {y.max()}" if y.size and
                             np.issubdtype(y.dtype, np.number) else "") + ").")


def participant_key(seed: int, epoch: int, index: int,
                    attempt: int = 0) -> jax.Array:
  """The key the simulation gives participant ``index`` in ``epoch``'s
  update (training and upload noise): the second half of
  ``split(fold_in(fold_in(train_key, epoch), index))``; a charged retry
  (``attempt`` >= 1) folds in its number, so no two releases share noise."""
  _, train_key = jax.random.split(jax.random.key(seed))
  key = protocols.participant_keys(jax.random.fold_in(train_key, epoch),
                                   index + 1)[index]
  key = jax.random.split(key)[1]
  return key if attempt == 0 else jax.random.fold_in(key, attempt)


def _log_stderr(msg: str) -> None:
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  print(f"[dssgd participant {time.strftime('%H:%M:%S')}] {msg}",
        file=sys.stderr, flush=True)


class Participant:
  """One participant: ``train`` an epoch, ``evaluate`` its model.

  Args:
    cfg: the run's config (sent by the server; validated here).
    index: the participant's position in the protocol's order (``i``).
    state_dir: where the local models, the seed and the ledger are kept.
    data_dir: the participant's own data (:func:`load_data_dir`); None: the
      run's dataset partitioned as the simulation does, keeping part
      ``index`` (for tests and demos).
    seed: the participant's PRNG seed; None: the one stored in
      ``state_dir``, or a new random one.
    policy: what it accepts to release (:class:`Policy`; default: the
      protective defaults).
    ledger_path: the machine's ledger (default ``state_dir/ledger.jsonl``;
      the Flower app keeps one per node, shared by its runs).
    run_id: how this run is named on the ledger (default: the state dir's
      name).
  """

  def __init__(self, cfg: Config, index: int, state_dir: str,
               data_dir: str | None = None, seed: int | None = None,
               policy: Policy | None = None, ledger_path: str | None = None,
               run_id: str | None = None):
    self.cfg = cfg
    self.plan = build.plan(cfg)
    self.index = int(index)
    self.state_dir = state_dir
    self.policy = policy or Policy()
    self.ledger_path = ledger_path or os.path.join(state_dir, LEDGER)
    self.run_id = run_id or os.path.basename(os.path.normpath(state_dir))
    os.makedirs(state_dir, exist_ok=True)
    if data_dir:
      ds = load_data_dir(data_dir, self.plan)
      images, labels = ds.train_images, ds.train_labels
    else:
      ds, images, labels = self._partition(cfg)
    test_images = ds.test_images
    self.stats = None
    if run_data.standardizes(self.plan.data):  # with its own data only
      (images, test_images), self.stats = run_data.standardize_own(
          images, test_images)
    self.images, self.labels = jnp.asarray(images), jnp.asarray(labels)
    self.model = models_lib.get_model(self.plan.model, ds.num_classes,
                                      conv_impl=self.plan.conv_impl)
    params = models_lib.init_params(self.model, ds.image_shape,
                                    jax.random.key(0))  # shapes only
    flat, self.unravel = participant_lib.flatten_params(params)
    self.num_params = int(flat.shape[0])
    if self.num_params != self.plan.num_params:
      raise DataFileError(
          f"data-dir {data_dir}: its images make a {self.plan.model} of "
          f"{self.num_params:,} parameters, the run's has "
          f"{self.plan.num_params:,}; the images must be "
          f"{self.plan.data.image_shape}.")
    self.trainer = experiment.make_trainer(self.plan, self.model,
                                           self.unravel)
    self.upload_rule = self.plan.upload_rule
    self._update = jax.jit(participant_lib.make_update(
        self.trainer, self.upload_rule))
    self._init_local = jax.jit(self.trainer.init)
    self._evaluate = evaluation.make_evaluator(
        self.model.apply, self.unravel, test_images, ds.test_labels, 1)
    self.seed = self._seed(seed)

  def _partition(self, cfg: Config):
    """Part ``index`` of the run's dataset, partitioned as the simulation
    does (not standardized); kept in ``state_dir/partition.npz`` after the
    first visit (it spares reloading the whole dataset)."""
    if not 0 <= self.index < cfg.num_participants:
      raise ConfigError(f"partition-id={self.index} is not below the run's "
                        f"--num_participants={cfg.num_participants}.")
    what = json.dumps([cfg.dataset, cfg.data_source, cfg.data_dir, cfg.model,
                       cfg.num_participants, cfg.samples_per_participant,
                       cfg.partition, cfg.dirichlet_alpha,
                       list(self.plan.data.sizes or []),
                       build.data_seed(cfg), self.index, 2])
    path = os.path.join(self.state_dir, "partition.npz")
    if os.path.exists(path):
      with np.load(path) as z:
        if str(z["what"]) == what:
          ds = data_base.Dataset(z["train_images"], z["train_labels"],
                                 z["test_images"], z["test_labels"],
                                 int(z["num_classes"]), cfg.dataset)
          return ds, ds.train_images, ds.train_labels
    ds, parts = run_data.load(self.plan.data, self.plan.model)
    own = parts[self.index]
    own = own[own >= 0]
    images = ds.train_images[own]
    labels = ds.train_labels[own]
    tmp = path + ".tmp.npz"
    np.savez(tmp, what=what, train_images=images, train_labels=labels,
             test_images=ds.test_images, test_labels=ds.test_labels,
             num_classes=ds.num_classes)
    os.replace(tmp, path)
    return ds, images, labels

  # -- state on disk -------------------------------------------------------
  def _seed(self, seed):
    path = os.path.join(self.state_dir, SEED_FILE)
    if seed is not None:
      return int(seed)
    if os.path.exists(path):
      with open(path) as f:
        return int(json.load(f)["seed"])
    seed = secrets.randbits(32)
    _io.write_text(path, json.dumps({"seed": seed}), ConfigError)
    return seed

  def _model_path(self, epoch: int) -> str:
    return os.path.join(self.state_dir, f"local_{epoch}.npz")

  def has_model(self, epoch: int) -> bool:
    return os.path.exists(self._model_path(epoch))

  def latest_model(self, before: int) -> int | None:
    """The last epoch before ``before`` whose model is stored (a
    participant that missed epochs resumes from its own last model)."""
    epochs = [int(n[len("local_"):-len(".npz")])
              for n in os.listdir(self.state_dir)
              if n.startswith("local_") and n.endswith(".npz")]
    epochs = [e for e in epochs if e < before]
    return max(epochs) if epochs else None

  def load_local(self, epoch: int) -> participant_lib.LocalState:
    """The participant's local state (parameters and optimizer state) after
    ``epoch``."""
    template = self._init_local(jnp.zeros((self.num_params,), jnp.float32))
    state, _ = outputs.load_checkpoint(self._model_path(epoch), template)
    return state

  def load_model(self, epoch: int) -> np.ndarray:
    """Its flat parameters after ``epoch``."""
    return np.asarray(self.load_local(epoch).params)

  def _save_model(self, epoch: int, local) -> None:
    path = self._model_path(epoch)
    outputs.save_checkpoint(path, local, epoch)
    previous = self.latest_model(epoch)
    for name in os.listdir(self.state_dir):  # keep this and the last one
      if name.startswith("local_") and name.endswith(".npz"):
        old = int(name[len("local_"):-len(".npz")])
        if old < epoch and old != previous:
          os.remove(os.path.join(self.state_dir, name))

  # -- the ledger ------------------------------------------------------------
  def ledger(self) -> list[dict]:
    """Every line of the machine's ledger (all runs)."""
    if not os.path.exists(self.ledger_path):
      return []
    with open(self.ledger_path) as f:
      return [json.loads(l) for l in f if l.strip()]

  def _run_lines(self) -> list[dict]:
    return [l for l in self.ledger() if l.get("run") == self.run_id]

  def mechanism_runs(self) -> int:
    """How many times this run's upload rule ran on the data here."""
    return sum(1 for l in self._run_lines() if l.get("charged"))

  def _claim(self, runs: int) -> rules.Claim:
    return self.plan.claim(runs)

  def spent(self, exclude_this_run: bool = False) -> tuple[float, float, int]:
    """(ε, δ, epochs without a guarantee) over every run on the ledger:
    each run's last ε and δ, added up (basic composition across runs)."""
    last = {}
    for l in self.ledger():
      if l.get("charged"):
        last[l["run"]] = l
    if exclude_this_run:
      last.pop(self.run_id, None)
    eps = sum(l["run_epsilon"] for l in last.values()
              if l["run_epsilon"] is not None)
    delta = sum(l["run_delta"] for l in last.values()
                if l["run_epsilon"] is not None)
    unbounded = sum(l["run_mechanism_runs"] for l in last.values()
                    if l["run_epsilon"] is None)
    return eps, delta, unbounded

  def refusal(self) -> str | None:
    """Why this participant refuses the run's next epoch, or None."""
    p = self.policy
    claim = self._claim(1)
    if claim.epsilon is None:
      if p.require_guarantee:
        return (f"participant {self.index} refuses: the run's upload rule "
                f"{self.upload_rule!r} gives no differential-privacy "
                f"guarantee ({claim.reason.rstrip('.')}), and its policy "
                "requires one (start it with --allow_no_guarantee to opt "
                "out).")
      return None
    other_eps, other_delta, _ = self.spent(exclude_this_run=True)
    nxt = self._claim(self.mechanism_runs() + 1)
    eps, delta = other_eps + nxt.epsilon, other_delta + nxt.delta
    if eps > p.epsilon_budget * (1 + 1e-9) or delta > p.delta_budget * (
        1 + 1e-9):
      return (f"participant {self.index} refuses: this epoch would bring its "
              f"total privacy loss to ε = {eps:.4g}, δ = {delta:.3g}, over "
              f"its budget of ε = {p.epsilon_budget:g}, δ = "
              f"{p.delta_budget:g}.")
    return None

  def _append(self, line: dict) -> None:
    """Appends one line to the ledger (fsynced: a crash never loses a
    charged release)."""
    os.makedirs(os.path.dirname(os.path.abspath(self.ledger_path)),
                exist_ok=True)
    with open(self.ledger_path, "a") as f:
      f.write(json.dumps(line) + "\n")
      f.flush()
      os.fsync(f.fileno())

  def _record(self, epoch: int, uploaded: int, attempt: int,
              charged: bool, refused: str | None = None) -> dict:
    runs = self.mechanism_runs() + int(charged)
    claim = self._claim(runs)
    line = {"run": self.run_id, "epoch": int(epoch), "attempt": int(attempt),
            "charged": bool(charged), "uploaded": int(uploaded),
            "rule": repr(self.upload_rule), "run_mechanism_runs": runs,
            "run_epsilon": claim.epsilon, "run_delta": claim.delta,
            "no_guarantee": claim.reason}
    if refused:
      line["refused"] = refused
    self._append(line)
    eps, delta, unbounded = self.spent()
    line.update(total_epsilon=eps, total_delta=delta,
                total_epochs_without_guarantee=unbounded)
    return line

  # -- the uploads kept for retries -----------------------------------------
  def _upload_path(self, epoch: int) -> str:
    return os.path.join(self.state_dir, f"upload_{epoch}.npz")

  @staticmethod
  def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
      h.update(b"-" if a is None else np.ascontiguousarray(a).tobytes())
    return h.hexdigest()

  def _stored_upload(self, epoch: int, digest: str):
    path = self._upload_path(epoch)
    if not os.path.exists(path):
      return None
    with np.load(path) as z:
      if str(z["digest"]) != digest:
        return None
      return (z["indices"], z["values"], float(z["loss"]))

  def _store_upload(self, epoch, digest, indices, values, loss):
    path = self._upload_path(epoch)
    tmp = path + ".tmp.npz"
    np.savez(tmp, digest=digest, indices=indices, values=values, loss=loss)
    os.replace(tmp, path)
    for name in os.listdir(self.state_dir):  # keep this epoch's and the last
      if name.startswith("upload_") and name.endswith(".npz"):
        old = int(name[len("upload_"):-len(".npz")])
        if old < epoch - 1:
          os.remove(os.path.join(self.state_dir, name))

  # -- the protocol ----------------------------------------------------------
  def visit(self, epoch: int, download_indices: np.ndarray | None,
            download_values: np.ndarray, init: np.ndarray | None = None,
            evaluate: bool = False, log=None) -> Visit:
    """One train message: the policy's check, then download, train, upload.

    Args:
      epoch: the epoch (1-based); the participant starts from its last
        model before ``epoch`` (a participant that missed epochs starts from
        its last one).
      download_indices: positions of the downloaded entries (None: all D).
      download_values: their values in the server's vector.
      init: the initial global model, used when the participant holds no
        model yet.
      evaluate: an evaluation epoch (the accuracy is reported only with
        ``Policy.report_metrics``).
      log: where the one-line refusal goes (default: stderr).

    Returns:
      A :class:`Visit`: what leaves the machine, and the ledger's figures.

    Raises:
      ConfigError: no model for ``epoch - 1`` is stored and no ``init``.
    """
    refused = self.refusal()
    if refused:
      (log or _log_stderr)(refused)
      self._record(epoch, 0, 0, charged=False, refused=refused)
      return Visit(epoch, refused=refused, partition_id=self.index)
    last = self.latest_model(epoch)
    if last is not None:
      local = self.load_local(last)
    elif init is not None:
      local = self._init_local(jnp.asarray(init, jnp.float32))
    else:
      raise ConfigError(f"participant {self.index} holds no model before "
                        f"epoch {epoch} in {self.state_dir} and was sent "
                        "no initial model.")
    d = self.num_params
    server = np.zeros(d, np.float32)
    mask = np.zeros(d, bool)
    if download_indices is None:
      server[:] = download_values
      mask[:] = True
    else:
      server[download_indices] = download_values
      mask[download_indices] = True
    digest = self._digest(download_indices, np.asarray(download_values),
                          np.asarray(local.params))
    stored = self._stored_upload(epoch, digest)
    attempt = sum(1 for l in self._run_lines()
                  if l.get("charged") and l["epoch"] == epoch)
    if stored is not None and self.has_model(epoch):
      indices, values, loss = stored  # the last release, resent
      line = self._record(epoch, len(indices), max(attempt - 1, 0),
                          charged=False)
    else:
      key = participant_key(self.seed, epoch, self.index, attempt)
      new_local, upload, loss = self._update(
          jnp.asarray(server), jnp.asarray(mask), local,
          participant_lib.ParticipantData(self.images, self.labels), key)
      valid = np.asarray(upload.mask)
      indices = np.asarray(upload.indices)[valid].astype(np.int32)
      values = np.asarray(upload.values)[valid].astype(np.float32)
      loss = float(loss)
      self._save_model(epoch, new_local)
      self._store_upload(epoch, digest, indices, values, loss)
      line = self._record(epoch, len(indices), attempt,
                          charged=self.upload_rule is not None)
    report = self.policy.report_metrics
    return Visit(
        epoch, indices=indices, values=values,
        loss=float(loss) if report else None,
        accuracy=self.evaluate(epoch) if report and evaluate else None,
        downloaded=int(mask.sum()), epsilon=line["run_epsilon"],
        delta=line["run_delta"], charged=line["charged"],
        partition_id=self.index)

  def train(self, epoch: int, download_indices: np.ndarray | None,
            download_values: np.ndarray, init: np.ndarray | None = None
            ) -> dict:
    """:meth:`visit` as a dict, with the loss whatever the policy (for
    tests that compare with the simulation); raises on a refusal."""
    report = dataclasses.replace(self.policy, report_metrics=True)
    policy, self.policy = self.policy, report
    try:
      v = self.visit(epoch, download_indices, download_values, init)
    finally:
      self.policy = policy
    if v.refused:
      raise ConfigError(v.refused)
    return {"indices": v.indices, "values": v.values, "loss": v.loss,
            "downloaded": v.downloaded, "epsilon": v.epsilon}

  def evaluate(self, epoch: int) -> float:
    """Test accuracy of this participant's model after ``epoch`` (on its
    own test split, standardized as its training data is)."""
    flat = self.load_model(epoch)
    return float(np.asarray(self._evaluate(jnp.asarray(flat)[None]))[0])
