"""One participant on its own machine: data, local model, upload rule, ledger.

:class:`Participant` is what a Flower ``ClientApp`` (:mod:`.client_app`) runs
for each message, with no Flower in it, so that it is tested directly. It runs
exactly the simulation's pieces: the jitted update of
:func:`dssgd_jax.participant.make_update` (download, one local epoch of SGD,
the upload rule: selection, bounding, noise or the SVT) built by the run
layer from the run's config, on the participant's own data.

What stays on the machine: the data, the local model (one ``.npy`` per epoch
in ``state_dir``, the last two kept, written atomically), the PRNG seed and
the ε ledger (``ledger.jsonl``: one line per epoch the participant uploaded
in, with the ε its upload rule has spent so far). What leaves it: the upload's
(index, value) pairs, the training loss, the accuracy of its own model.

Keys: participant ``i``'s key for epoch ``e`` is the simulation's, derived
from the participant's ``seed``: ``fold_in(fold_in(train_key, e), i)`` with
``train_key = split(key(seed))[1]``, so that with the run's ``--seed`` a
deployed participant draws the same numbers as the simulated one (how the
tests compare them). A real participant keeps its seed secret (by default a
random one, stored in ``state_dir``): the noise of its uploads must be
unknown to the server.
"""

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
from dssgd_jax.run.config import Config

SEED_FILE = "seed.json"
LEDGER = "ledger.jsonl"


def load_data_dir(path: str, cfg: Config) -> data_base.Dataset:
  """A participant's own data: ``path/data.npz`` with ``train_images``,
  ``train_labels``, ``test_images``, ``test_labels`` (images float32 in
  [0, 1], (n, H, W, C), as :func:`dssgd_jax.data.load_dataset` returns them),
  preprocessed for ``cfg.model``.

  Raises:
    ConfigError: the file is missing or lacks an array (one sentence).
  """
  file = os.path.join(path, "data.npz")
  try:
    with np.load(file) as z:
      arrays = {k: z[k] for k in ("train_images", "train_labels",
                                  "test_images", "test_labels")}
  except (OSError, KeyError, ValueError) as e:
    raise ConfigError(f"data-dir {path}: {file} is not a readable data file "
                      f"with train_images, train_labels, test_images and "
                      f"test_labels ({e}).") from None
  ds = data_base.Dataset(
      arrays["train_images"].astype(np.float32),
      arrays["train_labels"].astype(np.int32),
      arrays["test_images"].astype(np.float32),
      arrays["test_labels"].astype(np.int32), datasets_lib.NUM_CLASSES,
      cfg.dataset)
  return transforms.preprocess(ds, model=cfg.model,
                               standardize=cfg.standardize)


def participant_key(seed: int, epoch: int, index: int) -> jax.Array:
  """The key the simulation gives participant ``index`` in ``epoch``'s
  update (training and upload noise): the second half of
  ``split(fold_in(fold_in(train_key, epoch), index))``."""
  _, train_key = jax.random.split(jax.random.key(seed))
  key = protocols.participant_keys(jax.random.fold_in(train_key, epoch),
                                   index + 1)[index]
  return jax.random.split(key)[1]


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
  """

  def __init__(self, cfg: Config, index: int, state_dir: str,
               data_dir: str | None = None, seed: int | None = None):
    self.cfg = cfg
    self.index = int(index)
    self.state_dir = state_dir
    os.makedirs(state_dir, exist_ok=True)
    if data_dir:
      ds = load_data_dir(data_dir, cfg)
      images, labels = ds.train_images, ds.train_labels
    else:
      ds, images, labels = self._partition(cfg)
    self.images, self.labels = jnp.asarray(images), jnp.asarray(labels)
    self.model = models_lib.get_model(cfg.model, ds.num_classes,
                                      conv_impl=build.resolve_conv_impl(cfg))
    params = models_lib.init_params(self.model, ds.image_shape,
                                    jax.random.key(0))  # shapes only
    flat, self.unravel = participant_lib.flatten_params(params)
    self.num_params = int(flat.shape[0])
    local_epoch = participant_lib.make_local_epoch(
        self.model.apply, self.unravel, int(cfg.batch_size))
    self.upload_rule = build.upload_rule(cfg, self.num_params)
    self._update = jax.jit(participant_lib.make_update(
        local_epoch, self.upload_rule, float(cfg.learning_rate)))
    self._evaluate = evaluation.make_evaluator(
        self.model.apply, self.unravel, ds.test_images, ds.test_labels, 1)
    self.seed = self._seed(seed)

  def _partition(self, cfg: Config):
    """Part ``index`` of the run's dataset, partitioned as the simulation
    does; kept in ``state_dir/partition.npz`` after the first message (every
    message is a new process: this spares reloading the whole dataset)."""
    if not 0 <= self.index < cfg.num_participants:
      raise ConfigError(f"partition-id={self.index} is not below the run's "
                        f"--num_participants={cfg.num_participants}.")
    what = json.dumps([cfg.dataset, cfg.data_source, cfg.data_dir, cfg.model,
                       cfg.num_participants, cfg.samples_per_participant,
                       cfg.partition, cfg.dirichlet_alpha, cfg.standardize,
                       build.data_seed(cfg), self.index])
    path = os.path.join(self.state_dir, "partition.npz")
    if os.path.exists(path):
      with np.load(path) as z:
        if str(z["what"]) == what:
          ds = data_base.Dataset(z["train_images"], z["train_labels"],
                                 z["test_images"], z["test_labels"],
                                 int(z["num_classes"]), cfg.dataset)
          return ds, ds.train_images, ds.train_labels
    ds, parts = build.data(cfg)
    images = ds.train_images[parts[self.index]]
    labels = ds.train_labels[parts[self.index]]
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
    return os.path.join(self.state_dir, f"local_{epoch}.npy")

  def has_model(self, epoch: int) -> bool:
    return os.path.exists(self._model_path(epoch))

  def latest_model(self, before: int) -> int | None:
    """The last epoch before ``before`` whose model is stored (a
    participant that missed epochs resumes from its own last model)."""
    epochs = [int(n[len("local_"):-len(".npy")])
              for n in os.listdir(self.state_dir)
              if n.startswith("local_") and n.endswith(".npy")]
    epochs = [e for e in epochs if e < before]
    return max(epochs) if epochs else None

  def load_model(self, epoch: int) -> np.ndarray:
    return np.load(self._model_path(epoch))

  def _save_model(self, epoch: int, flat: np.ndarray) -> None:
    path = self._model_path(epoch)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
      np.save(f, flat)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    previous = self.latest_model(epoch)
    for name in os.listdir(self.state_dir):  # keep this and the last one
      if name.startswith("local_") and name.endswith(".npy"):
        old = int(name[len("local_"):-len(".npy")])
        if old < epoch and old != previous:
          os.remove(os.path.join(self.state_dir, name))

  def ledger(self) -> list[dict]:
    path = os.path.join(self.state_dir, LEDGER)
    if not os.path.exists(path):
      return []
    with open(path) as f:
      return [json.loads(l) for l in f if l.strip()]

  def _record(self, epoch: int, uploaded: int) -> float | None:
    """Appends epoch's line to the ledger (replacing a retried epoch's);
    returns ε spent so far by this participant's upload rule."""
    lines = [l for l in self.ledger() if l["epoch"] < epoch]
    shared = sum(1 for l in lines if l["uploaded"] > 0) + (uploaded > 0)
    claim = rules.claim(self.upload_rule, self.num_params, shared,
                        self.cfg.delta) if self.upload_rule else None
    eps = None if claim is None else claim.epsilon
    lines.append({"epoch": epoch, "uploaded": int(uploaded),
                  "epochs_shared": shared, "epsilon": eps,
                  "no_guarantee": None if claim is None else claim.reason})
    _io.write_text(os.path.join(self.state_dir, LEDGER),
                   "".join(json.dumps(l) + "\n" for l in lines), ConfigError)
    return eps

  # -- the protocol ----------------------------------------------------------
  def train(self, epoch: int, download_indices: np.ndarray | None,
            download_values: np.ndarray, init: np.ndarray | None = None
            ) -> dict:
    """Participant's part of ``epoch``: download, train, upload.

    Args:
      epoch: the epoch (1-based); the participant starts from its last
        model before ``epoch`` (retrying an epoch gives the same result; a
        participant that missed epochs starts from its last one).
      download_indices: positions of the downloaded entries (None: all D).
      download_values: their values in the server's vector.
      init: the initial global model, used when the participant holds no
        model yet.

    Returns:
      ``{"indices", "values"}`` of the upload (valid entries only),
      ``loss``, ``downloaded`` (entries), ``epsilon`` (this participant's
      ε so far, None without a guarantee).

    Raises:
      ConfigError: no model for ``epoch - 1`` is stored and no ``init``.
    """
    last = self.latest_model(epoch)
    if last is not None:
      local = self.load_model(last)
    elif init is not None:
      local = np.asarray(init, np.float32)
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
    key = participant_key(self.seed, epoch, self.index)
    new_local, upload, loss = self._update(
        jnp.asarray(server), jnp.asarray(mask), jnp.asarray(local),
        self.images, self.labels, key)
    new_local = np.asarray(new_local)
    valid = np.asarray(upload.mask)
    indices = np.asarray(upload.indices)[valid].astype(np.int32)
    values = np.asarray(upload.values)[valid].astype(np.float32)
    self._save_model(epoch, new_local)
    eps = self._record(epoch, int(valid.sum()))
    return {"indices": indices, "values": values, "loss": float(loss),
            "downloaded": int(mask.sum()), "epsilon": eps}

  def evaluate(self, epoch: int) -> float:
    """Test accuracy of this participant's model after ``epoch``."""
    flat = self.load_model(epoch)
    return float(np.asarray(self._evaluate(jnp.asarray(flat)[None]))[0])
