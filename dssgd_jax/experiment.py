"""The epoch loop: train, evaluate, log, checkpoint, resume (SPEC section 6).

``run(cfg)`` is what ``python -m dssgd_jax.main`` calls. It writes into
``cfg.workdir``:

* ``config.json`` — the resolved configuration;
* ``metrics.jsonl`` — one JSON object per epoch (accuracy of the participants'
  own models: mean/min/max, the server model's accuracy, training loss,
  entries and bytes uploaded and downloaded per participant, ε spent, wall
  time);
* ``checkpoint.npz`` — server state, every participant's parameters and the
  epoch, written atomically (a temporary file, fsync, then ``os.replace``) so a
  kill while writing never corrupts the previous checkpoint;
* ``summary.json`` — written when the run completes.

Rerunning the same command resumes from the last complete checkpoint. Epoch
keys are ``fold_in(train_key, epoch)``, so a resumed run draws the same random
numbers and produces the same metrics as an uninterrupted one.
"""

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

from dssgd_jax import algorithms
from dssgd_jax import evaluation
from dssgd_jax import models as models_lib
from dssgd_jax import participant as participant_lib
from dssgd_jax import server as server_lib
from dssgd_jax import sharding as sharding_lib
from dssgd_jax.config import Config
from dssgd_jax.errors import ConfigError, NonFiniteError

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
  spec: Any
  epoch_fn: Callable            # jitted (state, images, labels, key) -> ...
  init_state: dict              # {"server": ServerState, "local": (P, D)}
  images: jax.Array             # (P, n, ...) private training data
  labels: jax.Array             # (P, n)
  evaluate: Callable            # (P', D) -> accuracies
  test_images: np.ndarray
  test_labels: np.ndarray
  train_key: jax.Array


def resolve_conv_impl(cfg: Config | None) -> str:
  """The convolution lowering for ``--conv_impl=auto``, per backend.

  CPU: ``im2col`` — XLA:CPU's own convolution is about 13x slower here.
  GPU: ``im2col`` — batched GEMMs, 1.3-4.5x the speed of cuDNN's grouped
  convolutions under ``vmap`` on an H100. TPU: ``xla`` (grouped convolutions
  map onto the MXU natively; not measured). Numbers in BENCHMARKS.md.
  """
  impl = "auto" if cfg is None else cfg.conv_impl
  if impl != "auto":
    return impl
  return "xla" if jax.default_backend() == "tpu" else "im2col"


# Models for which ``lax.map`` beats ``vmap`` on XLA:CPU (BENCHMARKS.md): the
# 5x5 convolutions on 32x32 images, where one participant's step is big
# enough to use the cores; on the small models ``vmap``'s batching wins.
CPU_MAP_MODELS = ("mnist_cnn", "svhn_cnn")


def resolve_participant_axis(cfg: Config | None, model: str | None = None
                             ) -> str:
  """The participant-axis lowering for ``--participant_axis=auto``.

  CPU: ``map`` (``lax.map``) for the 32x32 CNNs of :data:`CPU_MAP_MODELS`
  (1.1-1.4x the speed of ``vmap``), ``vmap`` for the MLPs and the digits CNN
  (1.2-3.5x the speed of ``map``). GPU and TPU: ``vmap`` (one batched
  program keeps the accelerator busy at batch 1). Numbers in BENCHMARKS.md.

  >>> resolve_participant_axis(None, "mnist_mlp")
  'vmap'
  """
  axis = "auto" if cfg is None else cfg.participant_axis
  if axis != "auto":
    return axis
  if model is None and cfg is not None:
    model = cfg.model
  if jax.default_backend() == "cpu" and model in CPU_MAP_MODELS:
    return "map"
  return "vmap"


def setup(cfg: Config, dataset=None, parts=None) -> Experiment:
  """Loads data, builds the model, the initial state and the jitted epoch.

  Args:
    cfg: a validated config.
    dataset: optional preloaded :class:`~dssgd_jax.data.Dataset` (already
      preprocessed); by default ``dssgd_jax.data.prepare(cfg)`` loads it.
    parts: optional (N, n) partition indices to go with ``dataset``.
  """
  if dataset is None:
    from dssgd_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    dataset, parts = data_lib.prepare(cfg)
  model = models_lib.get_model(cfg.model, dataset.num_classes,
                               conv_impl=resolve_conv_impl(cfg))
  root = jax.random.key(cfg.seed)
  init_key, train_key = jax.random.split(root)
  params = models_lib.init_params(model, dataset.image_shape, init_key)
  flat, unravel = participant_lib.flatten_params(params)
  num_params = int(flat.shape[0])
  spec = algorithms.exchange_spec(cfg, num_params)
  images, labels = algorithms.participant_layout(
      cfg, dataset.train_images, dataset.train_labels, parts)
  num_models = images.shape[0]
  place = sharding_lib.placement(cfg, num_models)  # participant axis
  axis = resolve_participant_axis(cfg)
  spec = dataclasses.replace(spec, participant_axis=axis, mesh=(
      place.mesh if axis == "map" else None))
  local = jnp.tile(flat[None], (num_models, 1))
  state = {"server": server_lib.init(flat), "local": local}
  epoch = algorithms.epoch_function(cfg, model.apply, unravel, spec)
  if hasattr(epoch, "init_extra"):
    state["extra"] = epoch.init_extra(state)
  state = place.put_state(state)

  def epoch_fn(st, imgs, labs, key):
    extra = st.get("extra")
    if extra is not None:
      server, local, stats, extra = epoch(st["server"], st["local"], imgs,
                                          labs, key, extra)
      return {"server": server, "local": local, "extra": extra}, stats
    server, local, stats = epoch(st["server"], st["local"], imgs, labs, key)
    return {"server": server, "local": local}, stats

  test_x, test_y = dataset.test_images, dataset.test_labels
  if cfg.eval_examples and cfg.eval_examples < len(test_y):
    pick = np.random.default_rng(cfg.seed + 1).choice(
        len(test_y), cfg.eval_examples, replace=False)
    pick.sort()
    test_x, test_y = test_x[pick], test_y[pick]
  evaluate = evaluation.make_evaluator(model.apply, unravel, test_x, test_y,
                                       num_models)
  server_eval = evaluation.make_evaluator(model.apply, unravel, test_x,
                                          test_y, 1)

  def evaluate_all(st):
    acc = np.asarray(evaluate(st["local"]))
    if cfg.algorithm == "centralized":
      return acc, float(acc[0])  # the one model is also the "server" model
    if not spec.upload:
      return acc, None  # standalone: the server is never updated
    server_acc = float(np.asarray(server_eval(st["server"].params[None]))[0])
    return acc, server_acc

  images, labels = place.put_data(images, labels)
  return Experiment(
      cfg=cfg, model=model, unravel=unravel, num_params=num_params, spec=spec,
      epoch_fn=place.jit_epoch(epoch_fn), init_state=state,
      images=images, labels=labels,
      evaluate=evaluate_all, test_images=test_x, test_labels=test_y,
      train_key=train_key)


# ----------------------------------------------------------------------------
# Checkpoints.


# Test hooks (tests/test_resume.py): exit abruptly, as a kill would, after
# epoch N's checkpoint, or in the middle of writing epoch N's checkpoint.
KILL_AFTER_EPOCH_ENV = "DSSGD_JAX_KILL_AFTER_EPOCH"
KILL_IN_CHECKPOINT_ENV = "DSSGD_JAX_KILL_IN_CHECKPOINT"
KILLED_EXIT = 137


def _kill_requested(env: str, epoch: int) -> bool:
  return os.environ.get(env) == str(epoch)


def save_checkpoint(path: str, state: Any, epoch: int,
                    train_key: jax.Array | None = None) -> None:
  """Writes ``state`` (a pytree of arrays) and ``epoch`` atomically to path.

  ``train_key`` (the PRNG key epoch keys are folded from) is stored too, so
  that a resumed run can check it draws the same random numbers.
  """
  leaves, _ = jax.tree_util.tree_flatten(state)
  arrays = {f"leaf_{i:04d}": np.asarray(x) for i, x in enumerate(leaves)}
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
    ConfigError: the file is unreadable, holds other shapes, or was written
      with another PRNG key (another --seed).
  """
  leaves, treedef = jax.tree_util.tree_flatten(template)
  try:
    with np.load(path) as z:
      new = [jnp.asarray(z[f"leaf_{i:04d}"], dtype=leaf.dtype)
             for i, leaf in enumerate(leaves)]
      epoch = int(z["epoch"])
      saved_key = z["train_key"] if "train_key" in z.files else None
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise ConfigError(f"{path} is not a readable checkpoint ({e}); delete it "
                      "to restart the run from epoch 0, or use a new "
                      "--workdir.") from None
  for a, b in zip(new, leaves):
    if a.shape != b.shape:
      raise ConfigError(f"{path} holds arrays of another shape ({a.shape} "
                        f"vs {b.shape}); use a new --workdir.")
  if saved_key is not None and train_key is not None and not np.array_equal(
      saved_key, np.asarray(jax.random.key_data(train_key))):
    raise ConfigError(f"{path} was written with another PRNG key (another "
                      "--seed); use a new --workdir.")
  return jax.tree_util.tree_unflatten(treedef, new), epoch


# ----------------------------------------------------------------------------
# Privacy accounting.


def epsilon_spent(cfg: Config, epochs_done: int) -> float | None:
  """ε per participant after ``epochs_done`` epochs (None: no DP guarantee)."""
  if cfg.algorithm != "dssgd" or cfg.upload_fraction == 0:
    return 0.0 if cfg.algorithm == "standalone" or (
        cfg.algorithm == "dssgd" and cfg.upload_fraction == 0) else None
  if cfg.noise == "svt":
    from dssgd_jax import privacy  # pylint: disable=g-import-not-at-top
    return float(privacy.epsilon_spent(cfg.epsilon, epochs_done))
  # The Gaussian mechanism covers the released values only; the choice of
  # indices is covered too only when it does not depend on the data (random
  # selection, or everything uploaded). Otherwise no ε is claimed.
  data_independent = cfg.selection == "random" or cfg.upload_fraction >= 1.0
  if (cfg.noise == "gaussian" and cfg.l2_clip is not None and epochs_done > 0
      and data_independent):
    from dssgd_jax import accounting  # pylint: disable=g-import-not-at-top
    return float(accounting.gaussian_epsilon(
        cfg.noise_scale / cfg.l2_clip, epochs_done, cfg.delta))
  return None


# ----------------------------------------------------------------------------
# The loop.


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
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _check_config(workdir: str, cfg: Config) -> None:
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path):
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


def run(cfg: Config, dataset=None, parts=None, log=None) -> dict:
  """Runs (or resumes) an experiment; returns the summary dict.

  Args:
    cfg: a validated :class:`~dssgd_jax.config.Config` with ``workdir`` set.
    dataset, parts: optional preloaded data (see :func:`setup`).
    log: callable for progress lines (default: print to stderr).
  """
  if log is None:
    def log(msg):
      print(msg, file=sys.stderr, flush=True)
  if not cfg.workdir:
    raise ConfigError("--workdir is required: the directory where the run "
                      "writes its config, metrics and checkpoints.")
  workdir = cfg.workdir
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} cannot be created: "
                      f"{e.strerror}.") from None
  _check_config(workdir, cfg)
  exp = setup(cfg, dataset, parts)
  ckpt_path = os.path.join(workdir, CHECKPOINT)
  metrics_path = os.path.join(workdir, METRICS)
  state, start = exp.init_state, 0
  if os.path.exists(ckpt_path):  # read (and check) it before writing anything
    state, start = load_checkpoint(ckpt_path, exp.init_state, exp.train_key)
    if cfg.progress:
      log(f"Resuming {workdir} after epoch {start}.")
  with open(os.path.join(workdir, CONFIG) + ".tmp", "w") as f:
    f.write(cfg.to_json())
  os.replace(os.path.join(workdir, CONFIG) + ".tmp",
             os.path.join(workdir, CONFIG))
  rows = [r for r in _read_metrics(metrics_path) if r["epoch"] <= start]
  _write_lines(metrics_path, rows)

  num_models = int(exp.images.shape[0])
  if cfg.progress and start < cfg.epochs:
    mesh = exp.spec.mesh
    log(f"[{cfg.algorithm}] {num_models} model(s) x {exp.num_params:,} "
        f"parameters, protocol {cfg.protocol}, participant axis "
        f"{exp.spec.participant_axis}, {jax.device_count()} "
        f"{jax.default_backend()} device(s)"
        + ("" if mesh is None else f" (participants split over {mesh.size})"))
  elapsed = rows[-1]["elapsed_s"] if rows else 0.0
  tb = _tensorboard_writer(workdir)
  epoch_times = []
  for epoch in range(start + 1, cfg.epochs + 1):
    t0 = time.time()
    key = jax.random.fold_in(exp.train_key, epoch)
    new_state, stats = exp.epoch_fn(state, exp.images, exp.labels, key)
    losses = np.asarray(stats.loss)
    if not np.all(np.isfinite(losses)):
      bad = int(np.flatnonzero(~np.isfinite(losses))[0])
      who = "the model" if cfg.algorithm == "centralized" else (
          f"participant {bad}")
      raise NonFiniteError(
          f"Epoch {epoch}: {who} has a non-finite training loss "
          f"({losses[bad]}); stopping — try a smaller --learning_rate "
          f"(outputs up to epoch {epoch - 1} are kept in {workdir}).")
    state = new_state
    row = {"epoch": epoch}
    if _is_eval_epoch(cfg, epoch):
      acc, server_acc = exp.evaluate(state)
      row.update(participant_accuracy_mean=float(acc.mean()),
                 participant_accuracy_min=float(acc.min()),
                 participant_accuracy_max=float(acc.max()),
                 server_accuracy=server_acc)
    else:
      row.update(participant_accuracy_mean=None, participant_accuracy_min=None,
                 participant_accuracy_max=None, server_accuracy=None)
    up = float(np.mean(np.asarray(stats.uploaded)))
    down = float(np.mean(np.asarray(stats.downloaded)))
    wall = time.time() - t0
    elapsed += wall
    row.update(
        train_loss=float(losses.mean()),
        uploaded_entries=up,
        downloaded_entries=down,
        bytes_up=algorithms.uploaded_bytes(exp.spec, up, exp.num_params),
        bytes_down=algorithms.downloaded_bytes(exp.spec, down, exp.num_params),
        epsilon_spent=epsilon_spent(cfg, epoch),
        num_models=num_models,
        num_params=exp.num_params,
        wall_time_s=wall,
        elapsed_s=elapsed)
    rows.append(row)
    with open(metrics_path, "a") as f:
      f.write(json.dumps(row) + "\n")
      f.flush()
      os.fsync(f.fileno())
    if tb is not None:
      tb(epoch, row)
    if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
      save_checkpoint(ckpt_path, state, epoch, exp.train_key)
    epoch_times.append(wall)
    if cfg.progress:
      log(_progress_line(cfg, row, epoch_times))
    if _kill_requested(KILL_AFTER_EPOCH_ENV, epoch):
      os._exit(KILLED_EXIT)  # pylint: disable=protected-access
  summary = summarize(cfg, rows)
  with open(os.path.join(workdir, SUMMARY), "w") as f:
    json.dump(summary, f, indent=2)
  _draw_figures(workdir, log)
  return summary


def _draw_figures(workdir: str, log: Callable[[str], None]) -> None:
  """accuracy.png and accuracy_vs_bytes.png (``python -m dssgd_jax.plot``)."""
  try:
    from dssgd_jax import plot  # pylint: disable=g-import-not-at-top
    plot.plot_run(workdir)
  except Exception as e:  # pylint: disable=broad-except
    log(f"warning: could not draw the figures of {workdir}: {e}")


def _progress_line(cfg: Config, row: dict, epoch_times: list[float]) -> str:
  # The first epoch of a process includes compilation: leave it out of the
  # estimate once there is a steady one.
  steady = epoch_times[1:][-5:] or epoch_times
  left = float(np.median(steady)) * (cfg.epochs - row["epoch"])
  parts = [f"[{cfg.algorithm}] epoch {row['epoch']}/{cfg.epochs}"]
  if row["participant_accuracy_mean"] is not None:
    parts.append(
        f"acc {row['participant_accuracy_mean']:.4f} "
        f"[{row['participant_accuracy_min']:.3f}, "
        f"{row['participant_accuracy_max']:.3f}]")
    if row["server_accuracy"] is not None:
      parts.append(f"server {row['server_accuracy']:.4f}")
  parts.append(f"loss {row['train_loss']:.4f}")
  parts.append(f"up {row['uploaded_entries']:,.0f}")
  if row["epsilon_spent"] is not None:
    parts.append(f"eps {row['epsilon_spent']:.3g}")
  if len(epoch_times) == 1 and row["epoch"] < cfg.epochs:
    parts.append(f"{row['wall_time_s']:.2f}s (with compilation), "
                 f"≤{_fmt_time(left)} left")
  else:
    parts.append(f"{row['wall_time_s']:.2f}s/epoch, ~{_fmt_time(left)} left")
  return "  ".join(parts)


def summarize(cfg: Config, rows: list[dict]) -> dict:
  """Final and best accuracies, total cost and ε of a list of metric rows."""
  evals = [r for r in rows if r["participant_accuracy_mean"] is not None]
  last = evals[-1] if evals else {}
  best = max((r["participant_accuracy_mean"] for r in evals), default=None)
  return {
      "algorithm": cfg.algorithm,
      "epochs": rows[-1]["epoch"] if rows else 0,
      "final_participant_accuracy_mean": last.get("participant_accuracy_mean"),
      "final_participant_accuracy_min": last.get("participant_accuracy_min"),
      "final_participant_accuracy_max": last.get("participant_accuracy_max"),
      "final_server_accuracy": last.get("server_accuracy"),
      "best_participant_accuracy_mean": best,
      "bytes_up_total": float(sum(r["bytes_up"] for r in rows)),
      "bytes_down_total": float(sum(r["bytes_down"] for r in rows)),
      "epsilon_spent": rows[-1]["epsilon_spent"] if rows else None,
      "elapsed_s": rows[-1]["elapsed_s"] if rows else 0.0,
  }


def _tensorboard_writer(workdir: str):
  """A ``(step, row) -> None`` TensorBoard scalar writer, or None."""
  try:
    from dssgd_jax import tb_events  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return tb_events.make_writer(workdir)


