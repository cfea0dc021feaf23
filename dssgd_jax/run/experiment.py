"""The epoch loop: train, evaluate, log, checkpoint, resume (SPEC section 6).

``run(cfg)`` is what ``python -m dssgd_jax.main`` calls. It writes into
``cfg.workdir``:

* ``config.json`` — the resolved configuration;
* ``metrics.jsonl`` — one JSON object per epoch (accuracy of the participants'
  own models: mean/min/max, the server model's accuracy, training loss,
  entries and bytes uploaded and downloaded per participant, lost uploads, ε
  spent — derived from the upload rule that runs — and wall time);
* ``checkpoint.npz`` — the protocol state stored by key path, the PRNG key
  and the epoch, written atomically (a temporary file, fsync, then
  ``os.replace``) so a kill while writing never corrupts the previous
  checkpoint;
* ``events/`` — TensorBoard scalars (:mod:`dssgd_jax.run.events`);
* ``summary.json`` and the figures — written when the run completes.

Rerunning the same command resumes from the last complete checkpoint. Epoch
keys are ``fold_in(train_key, epoch)``, so a resumed run draws the same random
numbers and produces the same metrics as an uninterrupted one. In a
multi-process run only process 0 writes. Every failure a user can cause is
one :class:`~dssgd_jax.errors.UserError` sentence; Ctrl-C is
:class:`~dssgd_jax.errors.Interrupted` (exit status 130).
"""

import contextlib
import dataclasses
import json
import os
import sys
import time
import zipfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dssgd_jax import _io
from dssgd_jax import evaluation
from dssgd_jax import models as models_lib
from dssgd_jax import participant as participant_lib
from dssgd_jax import protocols
from dssgd_jax import server as server_lib
from dssgd_jax import sharding as sharding_lib
from dssgd_jax.run import build
from dssgd_jax.run import events as events_lib
from dssgd_jax.run.config import Config
from dssgd_jax.errors import ConfigError, Interrupted, NonFiniteError

CHECKPOINT = "checkpoint.npz"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
SUMMARY = "summary.json"

# Config fields that may change between a run and its resumption.
_RESUMABLE_CHANGES = ("epochs", "progress", "checkpoint_every", "eval_every",
                      "workdir", "mesh_shape", "cpu_devices",
                      "coordinator_address", "num_processes", "process_id")

# Metric fields that measure time and so differ between identical runs.
TIMING_FIELDS = ("wall_time_s", "elapsed_s")


@dataclasses.dataclass
class Experiment:
  """Everything a run needs, built once from a config (see :func:`setup`)."""
  cfg: Config
  model: Any
  unravel: Callable
  num_params: int
  protocol: Any                 # protocols.Protocol
  upload_rule: Any              # rules.UploadRule | None
  download_rule: Any            # server.DownloadRule
  axis: Any                     # protocols.ParticipantAxis
  epoch_fn: Callable            # jitted (state, images, labels, key) -> ...
  init_state: dict              # {"server": ServerState, "local": (P, D), ...}
  images: jax.Array             # (P, n, ...) private training data
  labels: jax.Array             # (P, n)
  evaluate: Callable            # state -> (accuracies, server accuracy)
  test_images: np.ndarray
  test_labels: np.ndarray
  train_key: jax.Array          # () or, with seeds, (S,)
  num_seeds: int = 1

  @property
  def num_models(self) -> int:
    """Models per run: N participants (1 for ``centralized``)."""
    return int(self.init_state["local"].shape[1 if self.num_seeds > 1 else 0])

  @property
  def shares(self) -> bool:
    """Whether the server model is ever updated."""
    return self.upload_rule is not None


def participant_layout(cfg: Config, images: np.ndarray, labels: np.ndarray,
                       parts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Each model's private data with a leading model axis: (N, n, ...), or
  (1, N·n, ...) — the union — for ``centralized``."""
  if cfg.algorithm == "centralized":
    union = parts.reshape(1, -1)
    return images[union], labels[union]
  return images[parts], labels[parts]


def setup(cfg: Config, dataset=None, parts=None) -> Experiment:
  """Loads data, builds the model, the protocol, the state and the jitted
  epoch.

  With ``--num_seeds=S`` > 1 every array of the state (and the PRNG key) has
  a leading seed axis of size S, the private data too under
  ``--vary_partition``, and the epoch maps the protocol's epoch over it
  (``--seed_axis``): run s is the run of ``--seed`` + s.

  Args:
    cfg: a validated config.
    dataset: optional preloaded :class:`~dssgd_jax.data.Dataset` (already
      preprocessed); by default :func:`dssgd_jax.run.build.data` loads it.
    parts: optional (N, n) partition indices to go with ``dataset``.
  """
  if dataset is None:
    dataset, parts = build.data(cfg)
  num_seeds = int(cfg.num_seeds)
  model = models_lib.get_model(cfg.model, dataset.num_classes,
                               conv_impl=build.resolve_conv_impl(cfg))
  init_keys, train_keys = [], []
  for s in range(num_seeds):
    init_key, train_key = jax.random.split(jax.random.key(cfg.seed + s))
    init_keys.append(init_key)
    train_keys.append(train_key)
  flats = []
  for init_key in init_keys:
    params = models_lib.init_params(model, dataset.image_shape, init_key)
    flat, unravel = participant_lib.flatten_params(params)
    flats.append(flat)
  num_params = int(flats[0].shape[0])
  layouts = [participant_layout(cfg, dataset.train_images,
                                dataset.train_labels, p)
             for p in build.seed_partitions(cfg, dataset, parts)[
                 :1 if not cfg.vary_partition else num_seeds]]
  images, labels = layouts[0]
  num_models = images.shape[0]
  if num_seeds > 1:  # one device (config.validate rejects --mesh_shape > 1)
    place = sharding_lib.placement(num_models, 1)
  else:
    place = sharding_lib.placement(num_models, cfg.mesh_shape)
  lowering = build.resolve_participant_axis(cfg)
  axis = protocols.ParticipantAxis(
      lowering, place.mesh if lowering == "map" else None)
  local_epoch = participant_lib.make_local_epoch(model.apply, unravel,
                                                 int(cfg.batch_size))
  proto = build.protocol(cfg, local_epoch, num_params, axis)
  states = [proto.init(server_lib.init(f), jnp.tile(f[None], (num_models, 1)))
            for f in flats]
  upload_rule = build.upload_rule(cfg, num_params)

  test_x, test_y = evaluation_split(cfg, dataset)
  evaluate = evaluation.make_evaluator(model.apply, unravel, test_x, test_y,
                                       num_seeds * num_models)
  server_eval = evaluation.make_evaluator(model.apply, unravel, test_x,
                                          test_y, num_seeds)

  def evaluate_all(st):
    """(accuracies, server accuracy): (P,) and a float (or None); with
    seeds (S, P) and (S,)."""
    local = st["local"]
    if num_seeds > 1:
      local = local.reshape((-1,) + local.shape[2:])
    acc = np.asarray(evaluate(local))
    if num_seeds > 1:
      acc = acc.reshape(num_seeds, num_models)
    if cfg.algorithm == "centralized":  # the one model is also the server's
      return acc, (acc[:, 0] if num_seeds > 1 else float(acc[0]))
    if upload_rule is None:
      return acc, None  # nothing is shared: the server is never updated
    server = st["server"].params
    server_acc = np.asarray(server_eval(server if num_seeds > 1
                                        else server[None]))
    return acc, (server_acc if num_seeds > 1 else float(server_acc[0]))

  if num_seeds == 1:
    state = place.put_state(states[0])
    epoch_fn = place.jit_epoch(proto.epoch)
    train_key = train_keys[0]
  else:
    state = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *states)
    if cfg.vary_partition:
      images = np.stack([x for x, _ in layouts])
      labels = np.stack([y for _, y in layouts])
    epoch_fn = jax.jit(
        protocols.over_seeds(proto.epoch, build.resolve_seed_axis(cfg),
                        shared_data=not cfg.vary_partition),
        donate_argnums=(0,))
    train_key = jnp.stack(train_keys)
  images, labels = place.put_data(images, labels)
  return Experiment(
      cfg=cfg, model=model, unravel=unravel, num_params=num_params,
      protocol=proto, upload_rule=upload_rule,
      download_rule=build.download_rule(cfg, num_params), axis=axis,
      epoch_fn=epoch_fn, init_state=state,
      images=images, labels=labels,
      evaluate=evaluate_all, test_images=test_x, test_labels=test_y,
      train_key=train_key, num_seeds=num_seeds)


def evaluation_split(cfg: Config, dataset) -> tuple[np.ndarray, np.ndarray]:
  """The test images and labels a run evaluates on: all of them, or the
  fixed ``--eval_examples`` subset drawn from the data seed."""
  test_x, test_y = dataset.test_images, dataset.test_labels
  if cfg.eval_examples and cfg.eval_examples < len(test_y):
    pick = np.random.default_rng(build.data_seed(cfg) + 1).choice(
        len(test_y), cfg.eval_examples, replace=False)
    pick.sort()
    test_x, test_y = test_x[pick], test_y[pick]
  return test_x, test_y


def epoch_key(train_key: jax.Array, epoch: int) -> jax.Array:
  """The PRNG key of ``epoch``: ``fold_in(train_key, epoch)``, per seed when
  ``train_key`` has a seed axis."""
  if train_key.ndim:
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(train_key, epoch)
  return jax.random.fold_in(train_key, epoch)



# ----------------------------------------------------------------------------
# Checkpoints.


# Test hooks (tests/test_resume.py): exit abruptly, as a kill would, after
# epoch N's checkpoint, or in the middle of writing epoch N's checkpoint.
KILL_AFTER_EPOCH_ENV = "DSSGD_JAX_KILL_AFTER_EPOCH"
KILL_IN_CHECKPOINT_ENV = "DSSGD_JAX_KILL_IN_CHECKPOINT"
KILLED_EXIT = 137


def _kill_requested(env: str, epoch: int) -> bool:
  return os.environ.get(env) == str(epoch)


def _leaf_names(state: Any) -> list[tuple[str, Any]]:
  """(key path, leaf) of every array of ``state``, e.g. ``['server'].params``."""
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  return [("state" + jax.tree_util.keystr(path), leaf) for path, leaf in flat]


def save_checkpoint(path: str, state: Any, epoch: int,
                    train_key: jax.Array | None = None) -> None:
  """Writes ``state`` (a pytree of arrays) and ``epoch`` atomically to path.

  Every array is stored under its key path (``state['server'].params``), so
  a checkpoint is read back by name, never by position. ``train_key`` (the
  PRNG key epoch keys are folded from) is stored too, so that a resumed run
  can check it draws the same random numbers. One ``.npz`` written to a
  temporary file, fsynced and renamed: a kill at any moment leaves the
  previous checkpoint whole.
  """
  arrays = {name: np.asarray(x) for name, x in _leaf_names(state)}
  arrays["epoch"] = np.asarray(epoch)
  if train_key is not None:
    arrays["train_key"] = np.asarray(jax.random.key_data(train_key))
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
    if _kill_requested(KILL_IN_CHECKPOINT_ENV, epoch):
      f.truncate(f.tell() // 2)  # a torn write, then die before os.replace
      f.flush()
      os._exit(KILLED_EXIT)  # pylint: disable=protected-access
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def load_checkpoint(path: str, template: Any,
                    train_key: jax.Array | None = None) -> tuple[Any, int]:
  """Reads a checkpoint written by :func:`save_checkpoint` into template.

  Raises:
    ConfigError: the file is unreadable, holds other arrays (names or
      shapes) than the run's state, or was written with another PRNG key
      (another --seed).
  """
  named = _leaf_names(template)
  _, treedef = jax.tree_util.tree_flatten(template)
  try:
    with np.load(path) as z:
      stored = {n for n in z.files if n.startswith("state")}
      want = {n for n, _ in named}
      if stored != want:
        diff = sorted(stored ^ want)[0]
        raise ConfigError(
            f"{path} holds other state than this run ({diff} is in one and "
            "not the other); it was written by another version or "
            "configuration: use a new --workdir.")
      new = [jnp.asarray(z[n], dtype=leaf.dtype) for n, leaf in named]
      epoch = int(z["epoch"])
      saved_key = z["train_key"] if "train_key" in z.files else None
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise ConfigError(f"{path} is not a readable checkpoint ({e}); delete it "
                      "to restart the run from epoch 0, or use a new "
                      "--workdir.") from None
  for (name, b), a in zip(named, new):
    if a.shape != b.shape:
      raise ConfigError(f"{path} holds {name} of shape {a.shape}, not "
                        f"{b.shape}; use a new --workdir.")
  if saved_key is not None and train_key is not None and not np.array_equal(
      saved_key, np.asarray(jax.random.key_data(train_key))):
    raise ConfigError(f"{path} was written with another PRNG key (another "
                      "--seed); use a new --workdir.")
  return jax.tree_util.tree_unflatten(treedef, new), epoch


# ----------------------------------------------------------------------------
# Privacy and cost.


def privacy_note(cfg: Config, num_params: int, epochs: int) -> dict:
  """The run's privacy claim as JSON: ε, δ, and the reason when there is
  none."""
  c = build.claim(cfg, num_params, epochs)
  return {"epsilon": c.epsilon, "delta": c.delta, "no_guarantee": c.reason}


def _read_metrics(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          break  # a torn last line from a kill; drop it
  return rows


def _write_lines(path: str, rows: list[dict]) -> None:
  _io.write_text(path, "".join(json.dumps(r) + "\n" for r in rows),
                 ConfigError)


def _check_config(workdir: str, cfg: Config) -> None:
  """Refuses flags that differ from those of the run a work directory holds.

  A directory without a checkpoint holds no completed epoch (a run that failed
  before its first checkpoint): nothing to protect, any flags are accepted.
  """
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path) or not os.path.exists(
      os.path.join(workdir, CHECKPOINT)):
    return
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} is not a readable run configuration ({e}); "
                      "use a new --workdir.") from None
  new = dataclasses.asdict(cfg)
  for k, v in new.items():
    if k in _RESUMABLE_CHANGES or k not in old:
      continue
    if old[k] != v:
      raise ConfigError(
          f"--workdir={workdir} holds a run with --{k}={old[k]!r}, not "
          f"{v!r}; use a new --workdir or the same flags to resume.")


def _fmt_time(s: float) -> str:
  if s < 120:
    return f"{s:.0f}s"
  if s < 7200:
    return f"{s / 60:.1f}min"
  return f"{s / 3600:.1f}h"


def _is_eval_epoch(cfg: Config, epoch: int) -> bool:
  return epoch % cfg.eval_every == 0 or epoch == cfg.epochs


@contextlib.contextmanager
def _writing(path: str):
  """Turns a failed write of ``path`` into one sentence (exit status 2)."""
  try:
    yield
  except OSError as e:
    raise ConfigError(f"{path} cannot be written ({e.strerror or e}); "
                      "check --workdir.") from None


def _check_writable(workdir: str) -> None:
  """Fails before any work if nothing can be written in ``workdir``."""
  probe = os.path.join(workdir, f".write_test_{os.getpid()}")
  try:
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} cannot be written "
                      f"({e.strerror or e}).") from None


def _write_json(path: str, text: str) -> None:
  _io.write_text(path, text, ConfigError)


def run(cfg: Config, dataset=None, parts=None, log=None) -> dict:
  """Runs (or resumes) an experiment; returns the summary dict.

  In a multi-process run every process computes and only process 0 writes
  (config, metrics, events, checkpoints, summary, figures); the others read
  the checkpoint to resume.

  Args:
    cfg: a validated :class:`~dssgd_jax.run.config.Config` with ``workdir`` set.
    dataset, parts: optional preloaded data (see :func:`setup`).
    log: callable for progress lines (default: print to stderr).

  Raises:
    ConfigError: the work directory cannot be written, holds another run, or
      holds more epochs than ``--epochs``.
    Interrupted: Ctrl-C (one sentence naming the last checkpoint).
  """
  if log is None:
    def log(msg):
      # One write per line: print() writes the text and the newline
      # separately, and a Ctrl-C between the two would leave a half line
      # that the error sentence then continues.
      sys.stderr.write(f"{msg}\n")
      sys.stderr.flush()
  if not cfg.workdir:
    raise ConfigError("--workdir is required: the directory where the run "
                      "writes its config, metrics and checkpoints.")
  workdir = cfg.workdir
  writer = jax.process_index() == 0
  if writer:
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise ConfigError(f"--workdir={workdir} cannot be created: "
                        f"{e.strerror}.") from None
    if not os.path.isdir(workdir):
      raise ConfigError(f"--workdir={workdir} is not a directory.")
    _check_writable(workdir)
  _check_config(workdir, cfg)
  exp = setup(cfg, dataset, parts)
  ckpt_path = os.path.join(workdir, CHECKPOINT)
  metrics_path = os.path.join(workdir, METRICS)
  state, start = exp.init_state, 0
  if os.path.exists(ckpt_path):  # read (and check) it before writing anything
    state, start = load_checkpoint(ckpt_path, exp.init_state, exp.train_key)
    if start > cfg.epochs:
      raise ConfigError(
          f"Nothing was run: --workdir={workdir} already holds {start} "
          f"epochs, more than --epochs={cfg.epochs}; pass --epochs={start} "
          "or more, or use a new --workdir.")
    if cfg.progress and start < cfg.epochs:
      log(f"Resuming {workdir} after epoch {start}.")
  rows = [r for r in _read_metrics(metrics_path) if r["epoch"] <= start]
  if writer:
    _write_json(os.path.join(workdir, CONFIG), cfg.to_json())
    _write_lines(metrics_path, rows)

  num_models = exp.num_models
  if cfg.progress and start < cfg.epochs:
    mesh = exp.axis.mesh
    axis = ("" if exp.protocol.name == "round_robin" else
            f", participant axis {exp.axis.lowering}")
    log(f"[{cfg.algorithm}] {num_models} model(s) x {exp.num_params:,} "
        f"parameters, protocol {exp.protocol.name}{axis}, {jax.device_count()} "
        f"{jax.default_backend()} device(s)"
        + ("" if mesh is None else f" (participants split over {mesh.size})"))
  elapsed = rows[-1]["elapsed_s"] if rows else 0.0
  with _io.interrupts_deferred():
    tb = (events_lib.open_writer(workdir, resume_epoch=start) if writer
          else None)
  epoch_times = []
  saved, running = start, start + 1
  try:
    for epoch in range(start + 1, cfg.epochs + 1):
      running = epoch
      t0 = time.time()
      key = epoch_key(exp.train_key, epoch)
      new_state, stats = exp.epoch_fn(state, exp.images, exp.labels, key)
      losses = np.asarray(stats.loss)
      if not np.all(np.isfinite(losses)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(losses))[0])
        who = "the model" if cfg.algorithm == "centralized" else (
            f"participant {bad[-1]}")
        if exp.num_seeds > 1:
          who += f" of the run with seed {cfg.seed + bad[0]}"
        raise NonFiniteError(
            f"Epoch {epoch}: {who} has a non-finite training loss "
            f"({losses[bad]}); stopping — try a smaller --learning_rate "
            f"(outputs up to epoch {epoch - 1} are kept in {workdir}).")
      state = new_state
      row = _metrics_row(exp, epoch, state, stats, time.time() - t0, elapsed)
      elapsed = row["elapsed_s"]
      rows.append(row)
      # A Ctrl-C during the epoch's writes acts when they are all done.
      with _io.interrupts_deferred():
        if writer:
          with _writing(metrics_path):
            with open(metrics_path, "a") as f:
              f.write(json.dumps(row) + "\n")
              f.flush()
              os.fsync(f.fileno())
          if tb is not None:
            tb.write(epoch, row)
        if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
          if writer:
            with _writing(ckpt_path):
              save_checkpoint(ckpt_path, state, epoch, exp.train_key)
          saved = epoch
      epoch_times.append(row["wall_time_s"])
      if cfg.progress:
        log(_progress_line(cfg, row, epoch_times))
      if _kill_requested(KILL_AFTER_EPOCH_ENV, epoch):
        os._exit(KILLED_EXIT)  # pylint: disable=protected-access
  except KeyboardInterrupt:
    raise Interrupted(
        f"Interrupted during epoch {running}; the last checkpoint in "
        f"{workdir} is epoch {saved}; rerun the same "
        "command to resume.") from None
  finally:
    if tb is not None:
      tb.close()
  summary = summarize(cfg, rows)
  summary["privacy"] = privacy_note(cfg, exp.num_params, summary["epochs"])
  if writer:
    _write_json(os.path.join(workdir, SUMMARY), json.dumps(summary, indent=2))
    _draw_figures(workdir, log)
  return summary


def _metrics_row(exp: Experiment, epoch: int, state, stats, wall: float,
                 elapsed: float) -> dict:
  """One line of ``metrics.jsonl`` (see README "What a run writes").

  With seeds every per-run field is the mean over the seeds, with a
  ``<field>_std`` companion (sample standard deviation, ``ddof=1``) and the
  runs' own values in ``per_seed``.
  """
  cfg = exp.cfg
  num_seeds = exp.num_seeds
  acc = server_acc = None
  if _is_eval_epoch(cfg, epoch):
    acc, server_acc = exp.evaluate(state)
  per = []
  for s in range(num_seeds):
    if num_seeds == 1:
      per.append(run_fields(cfg, exp.num_params, epoch, acc, server_acc,
                            stats))
    else:
      per.append(run_fields(
          cfg, exp.num_params, epoch, None if acc is None else acc[s],
          None if server_acc is None else float(server_acc[s]),
          jax.tree_util.tree_map(lambda x, s=s: x[s], stats)))
  row = {"epoch": epoch}
  if num_seeds == 1:
    row.update(per[0])
  else:
    row.update(mean_over_seeds(per))
  row.update(num_models=exp.num_models,
             num_params=exp.num_params,
             wall_time_s=wall,
             elapsed_s=elapsed + wall)
  if num_seeds > 1:
    row["num_seeds"] = num_seeds
    row["per_seed"] = [dict(seed=cfg.seed + s, **p)
                       for s, p in enumerate(per)]
  return row


def run_fields(cfg: Config, num_params: int, epoch: int, acc, server_acc,
               stats) -> dict:
  """The fields of one run (one seed) in a metrics row.

  Args:
    cfg, num_params: the run's config and D (for the bytes and the ε).
    epoch: the epoch just finished.
    acc: (P,) the participants' test accuracies, or None (not evaluated).
    server_acc: the server model's accuracy, or None.
    stats: the epoch's :class:`~dssgd_jax.protocols.EpochStats` (arrays).
  """
  out = {}
  if acc is not None:
    acc = np.asarray(acc)
    out.update(participant_accuracy_mean=float(acc.mean()),
               participant_accuracy_min=float(acc.min()),
               participant_accuracy_max=float(acc.max()),
               server_accuracy=server_acc)
  else:
    out.update(participant_accuracy_mean=None, participant_accuracy_min=None,
               participant_accuracy_max=None, server_accuracy=None)
  up_each = np.asarray(stats.uploaded)
  down_each = np.asarray(stats.downloaded)
  losses = np.asarray(stats.loss)
  claim = build.claim(cfg, num_params, epoch)
  out.update(
      train_loss=float(losses.mean()) if losses.size else None,
      uploaded_entries=float(up_each.mean()),
      downloaded_entries=float(down_each.mean()),
      bytes_up=server_lib.wire_bytes(up_each, num_params),
      bytes_down=server_lib.wire_bytes(down_each, num_params),
      lost_uploads=int(np.sum(np.asarray(stats.upload_lost))),
      lost_downloads=(None if stats.download_lost is None else
                      int(np.sum(np.asarray(stats.download_lost)))),
      epsilon_spent=claim.epsilon,
      delta_spent=None if claim.epsilon is None else claim.delta)
  return out


def mean_over_seeds(per_seed: list[dict]) -> dict:
  """Each field's mean over runs and its ``<field>_std`` (``ddof=1``);
  None where any run has None.

  >>> mean_over_seeds([{"loss": 1, "eps": None}, {"loss": 2, "eps": None},
  ...                  {"loss": 3, "eps": None}])
  {'loss': 2.0, 'loss_std': 1.0, 'eps': None, 'eps_std': None}
  """
  out = {}
  for name in per_seed[0]:
    values = [p[name] for p in per_seed]
    if any(v is None for v in values):
      out[name], out[name + "_std"] = None, None
      continue
    v = np.asarray(values, dtype=np.float64)
    out[name] = float(v.mean())
    out[name + "_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
  return out


def _draw_figures(workdir: str, log: Callable[[str], None]) -> None:
  """accuracy.png and accuracy_vs_bytes.png (``python -m dssgd_jax.plot``)."""
  try:
    from dssgd_jax.run import figures  # pylint: disable=g-import-not-at-top
    figures.plot_run(workdir)
  except Exception as e:  # pylint: disable=broad-except
    log(f"warning: could not draw the figures of {workdir}: {e}")


def _progress_line(cfg: Config, row: dict, epoch_times: list[float]) -> str:
  """One labelled line per epoch. The first epoch of a process includes
  compilation, so it gets no time estimate; later ones use the median of the
  last (steady) epochs."""
  parts = [f"[{cfg.algorithm}] epoch {row['epoch']}/{cfg.epochs}"]
  if row["participant_accuracy_mean"] is not None:
    std = row.get("participant_accuracy_mean_std")
    pm = "" if std is None else f" ± {std:.4f} over {row['num_seeds']} seeds"
    parts.append(
        f"test acc {row['participant_accuracy_mean']:.4f}{pm} "
        f"(participants min {row['participant_accuracy_min']:.3f}, max "
        f"{row['participant_accuracy_max']:.3f})")
    if row["server_accuracy"] is not None:
      parts.append(f"server {row['server_accuracy']:.4f}")
  if row["train_loss"] is not None:
    parts.append(f"loss {row['train_loss']:.4f}")
  parts.append(f"uploaded {row['uploaded_entries']:,.0f} of "
               f"{row['num_params']:,} entries/participant")
  if row["epsilon_spent"] is not None:
    delta = row.get("delta_spent")
    parts.append(f"ε {row['epsilon_spent']:.3g}" +
                 (f" (δ {delta:.3g})" if delta else ""))
  if len(epoch_times) == 1:
    parts.append(f"{row['wall_time_s']:.2f}s (with compilation)")
  else:
    steady = epoch_times[1:][-5:]
    left = float(np.median(steady)) * (cfg.epochs - row["epoch"])
    parts.append(f"{row['wall_time_s']:.2f}s/epoch, ~{_fmt_time(left)} left")
  return "  ".join(parts)


def summarize(cfg: Config, rows: list[dict]) -> dict:
  """Final and best accuracies, total cost and ε of a list of metric rows.

  ``final_*`` is the last evaluated epoch; ``best_participant_accuracy_mean``
  the best evaluated epoch's, which is selection on the test set. With seeds
  each field is the mean over the runs with a ``<field>_std`` companion (the
  best epoch chosen per run), and ``per_seed`` holds each run's summary.
  """
  if rows and "per_seed" in rows[-1]:
    num_seeds = len(rows[-1]["per_seed"])
    per = [_summarize_one(cfg, [dict(r["per_seed"][s], epoch=r["epoch"],
                                     elapsed_s=r["elapsed_s"]) for r in rows])
           for s in range(num_seeds)]
    fixed = ("algorithm", "epochs", "elapsed_s")
    out = {k: per[0][k] for k in fixed}
    out.update(mean_over_seeds([{k: v for k, v in p.items() if k not in fixed}
                                for p in per]))
    out["num_seeds"] = num_seeds
    out["per_seed"] = [dict(seed=r["seed"], **p)
                       for r, p in zip(rows[-1]["per_seed"], per)]
    return out
  return _summarize_one(cfg, rows)


def _summarize_one(cfg: Config, rows: list[dict]) -> dict:
  evals = [r for r in rows if r["participant_accuracy_mean"] is not None]
  last = evals[-1] if evals else {}
  best_row = max(evals, key=lambda r: r["participant_accuracy_mean"],
                 default={})
  return {
      "algorithm": cfg.algorithm,
      "epochs": rows[-1]["epoch"] if rows else 0,
      "final_participant_accuracy_mean": last.get("participant_accuracy_mean"),
      "final_participant_accuracy_min": last.get("participant_accuracy_min"),
      "final_participant_accuracy_max": last.get("participant_accuracy_max"),
      "final_server_accuracy": last.get("server_accuracy"),
      "best_participant_accuracy_mean": best_row.get(
          "participant_accuracy_mean"),
      "best_epoch": best_row.get("epoch"),
      "bytes_up_total": float(sum(r["bytes_up"] for r in rows)),
      "bytes_down_total": float(sum(r["bytes_down"] for r in rows)),
      "epsilon_spent": rows[-1]["epsilon_spent"] if rows else None,
      "delta_spent": rows[-1].get("delta_spent") if rows else None,
      "elapsed_s": rows[-1]["elapsed_s"] if rows else 0.0,
  }
