"""What a run writes into its work directory, and how it reads it back.

Shared by the simulated run (:mod:`dssgd_jax.run.experiment`) and the
deployed server (:mod:`dssgd_jax.flower.server_app`), so both write the same
files the same way:

* ``config.json`` — the resolved configuration and the plan's description
  (:meth:`~dssgd_jax.run.plan.Plan.describe`); a work directory holding
  another plan's run is refused (:func:`check_resumable`);
* ``metrics.jsonl`` — one JSON object per epoch (:func:`run_fields`), fsynced
  as written; a torn last line from a kill is dropped on reading;
* ``checkpoint.npz`` — the run's state stored by key path, the PRNG key and
  the epoch, written atomically (a temporary file, fsync, then
  ``os.replace``) so a kill while writing never corrupts the previous one;
* ``events/`` — TensorBoard scalars (:mod:`dssgd_jax.run.events`);
* ``summary.json`` and the figures (:mod:`dssgd_jax.run.figures`) — written
  when the run completes.

Every failure a user can cause is one :class:`~dssgd_jax.errors.ConfigError`
sentence.
"""

import contextlib
import json
import os
import zipfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dssgd_jax import _io
from dssgd_jax import server as server_lib
from dssgd_jax.errors import ConfigError
from dssgd_jax.run.plan import RESUMABLE

CHECKPOINT = "checkpoint.npz"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
SUMMARY = "summary.json"

# Config fields that may change between a run and its resumption.
RESUMABLE_FLAGS = RESUMABLE + ("workdir", "cpu_devices", "coordinator_address",
                               "num_processes", "process_id")

# Metric fields that measure time and so differ between identical runs.
TIMING_FIELDS = ("wall_time_s", "elapsed_s")


# Test hooks (tests/test_resume.py): exit abruptly, as a kill would, after
# epoch N's checkpoint, or in the middle of writing epoch N's checkpoint.
KILL_AFTER_EPOCH_ENV = "DSSGD_JAX_KILL_AFTER_EPOCH"
KILL_IN_CHECKPOINT_ENV = "DSSGD_JAX_KILL_IN_CHECKPOINT"
KILLED_EXIT = 137


def kill_requested(env: str, epoch: int) -> bool:
  return os.environ.get(env) == str(epoch)


def _leaf_names(state: Any) -> list[tuple[str, Any]]:
  """(key path, leaf) of every array of ``state``, e.g. ``state.server.params``."""
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  return [("state" + jax.tree_util.keystr(path), leaf) for path, leaf in flat]


def save_checkpoint(path: str, state: Any, epoch: int,
                    train_key: jax.Array | None = None) -> None:
  """Writes ``state`` (a pytree of arrays) and ``epoch`` atomically to path.

  Every array is stored under its key path (``state.protocol.server.params``), so
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
    if kill_requested(KILL_IN_CHECKPOINT_ENV, epoch):
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
# Metrics, config and summary files.


def read_metrics(path: str) -> list[dict]:
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


def write_lines(path: str, rows: list[dict]) -> None:
  _io.write_text(path, "".join(json.dumps(r) + "\n" for r in rows),
                 ConfigError)


@contextlib.contextmanager
def writing(path: str):
  """Turns a failed write of ``path`` into one sentence (exit status 2)."""
  try:
    yield
  except OSError as e:
    raise ConfigError(f"{path} cannot be written ({e.strerror or e}); "
                      "check --workdir.") from None


def check_writable(workdir: str) -> None:
  """Fails before any work if nothing can be written in ``workdir``."""
  probe = os.path.join(workdir, f".write_test_{os.getpid()}")
  try:
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} cannot be written "
                      f"({e.strerror or e}).") from None


def write_json(path: str, text: str) -> None:
  _io.write_text(path, text, ConfigError)


def append_metrics(path: str, row: dict) -> None:
  """Appends one metrics line, fsynced (a kill never loses a reported
  epoch)."""
  with writing(path):
    with open(path, "a") as f:
      f.write(json.dumps(row) + "\n")
      f.flush()
      os.fsync(f.fileno())


def missing_dirs(path: str | None) -> list[str]:
  """The directories ``os.makedirs(path)`` would create, deepest first."""
  out = []
  path = os.path.abspath(path) if path else None
  while path and not os.path.exists(path):
    out.append(path)
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return out


def remove_if_empty(dirs: list[str]) -> None:
  """Removes ``dirs`` (deepest first, as :func:`missing_dirs` lists them)
  while they are empty: a run that failed before writing leaves no trace."""
  for d in dirs:
    try:
      os.rmdir(d)
    except OSError:
      return


def prepare_workdir(workdir: str | None, writer: bool = True) -> str:
  """Creates ``workdir`` and checks it can be written, before any work.

  Raises:
    ConfigError: no work directory, or it cannot be created or written.
  """
  if not workdir:
    raise ConfigError("--workdir is required: the directory where the run "
                      "writes its config, metrics and checkpoints.")
  if writer:
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise ConfigError(f"--workdir={workdir} cannot be created: "
                        f"{e.strerror}.") from None
    if not os.path.isdir(workdir):
      raise ConfigError(f"--workdir={workdir} is not a directory.")
    check_writable(workdir)
  return workdir


def config_json(plan) -> dict:
  """What ``config.json`` holds: the config's fields (when the plan was
  built from one) and the plan's description under ``plan``."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  out = {}
  if plan.config is not None:
    out.update(dataclasses.asdict(plan.config))
  else:  # the fields the figures and tools read, from the plan itself
    out.update(algorithm=plan.algorithm, dataset=plan.data.dataset,
               model=plan.model,
               num_participants=plan.data.num_participants,
               samples_per_participant=plan.data.samples_per_participant,
               batch_size=plan.batch_size, epochs=plan.epochs,
               num_seeds=plan.num_seeds)
  out["plan"] = plan.describe()
  return out


def check_resumable(workdir: str, plan) -> None:
  """Refuses a plan other than the one whose run ``workdir`` holds.

  A directory without a checkpoint holds no completed epoch (a run that
  failed before its first checkpoint): nothing to protect, any plan is
  accepted. Fields of :data:`~dssgd_jax.run.plan.RESUMABLE` may change.
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
  new = config_json(plan)
  if plan.config is not None:
    for k, v in new.items():
      if k == "plan" or k in RESUMABLE_FLAGS or k not in old:
        continue
      if old[k] != v:
        raise ConfigError(
            f"--workdir={workdir} holds a run with --{k}={old[k]!r}, not "
            f"{v!r}; use a new --workdir or the same flags to resume.")
  old_plan = old.get("plan")
  if old_plan is None:
    return
  for k, v in new["plan"].items():
    if k in RESUMABLE or k not in old_plan:
      continue
    if old_plan[k] != v:
      raise ConfigError(
          f"--workdir={workdir} holds the run of another plan ({k}: "
          f"{old_plan[k]!r}, not {v!r}); use a new --workdir or the same "
          "plan to resume.")


def is_eval_epoch(plan, epoch: int) -> bool:
  return epoch % plan.eval_every == 0 or epoch == plan.epochs


def privacy_note(plan, epochs: int) -> dict:
  """The run's privacy claim as JSON: ε, δ, and the reason when there is
  none."""
  c = plan.claim(epochs)
  return {"epsilon": c.epsilon, "delta": c.delta, "no_guarantee": c.reason}


def run_fields(plan, epoch: int, acc, server_acc, stats) -> dict:
  """The fields of one run (one seed) in a metrics row.

  Args:
    plan: the run's plan (D for the bytes, the rule for the ε).
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
  num_params = plan.num_params
  claim = plan.claim(epoch)
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
  if getattr(stats, "staleness", None) is not None:
    stale = np.asarray(stats.staleness)
    out.update(staleness=[int(x) for x in stale.ravel()],
               staleness_mean=float(stale.mean()) if stale.size else None)
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


def draw_figures(workdir: str, log: Callable[[str], None]) -> None:
  """accuracy.png and accuracy_vs_bytes.png (``python -m dssgd_jax.plot``);
  a figure that cannot be drawn is a warning, not a failed run."""
  try:
    from dssgd_jax.run import figures  # pylint: disable=g-import-not-at-top
    figures.plot_run(workdir)
  except Exception as e:  # pylint: disable=broad-except
    log(f"warning: could not draw the figures of {workdir}: {e}")


def _fmt_time(s: float) -> str:
  if s < 120:
    return f"{s:.0f}s"
  if s < 7200:
    return f"{s / 60:.1f}min"
  return f"{s / 3600:.1f}h"


def progress_line(plan, row: dict, epoch_times: list[float]) -> str:
  """One labelled line per epoch. The first epoch of a process includes
  compilation, so it gets no time estimate; later ones use the median of the
  last (steady) epochs."""
  parts = [f"[{plan.algorithm}] epoch {row['epoch']}/{plan.epochs}"]
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
    left = float(np.median(steady)) * (plan.epochs - row["epoch"])
    parts.append(f"{row['wall_time_s']:.2f}s/epoch, ~{_fmt_time(left)} left")
  return "  ".join(parts)


def summarize(plan, rows: list[dict]) -> dict:
  """Final and best accuracies, total cost and ε of a list of metric rows.

  ``final_*`` is the last evaluated epoch; ``best_participant_accuracy_mean``
  the best evaluated epoch's, which is selection on the test set. With seeds
  each field is the mean over the runs with a ``<field>_std`` companion (the
  best epoch chosen per run), and ``per_seed`` holds each run's summary.
  """
  if rows and "per_seed" in rows[-1]:
    num_seeds = len(rows[-1]["per_seed"])
    per = [_summarize_one(plan, [dict(r["per_seed"][s], epoch=r["epoch"],
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
  return _summarize_one(plan, rows)


def _summarize_one(plan, rows: list[dict]) -> dict:
  evals = [r for r in rows if r["participant_accuracy_mean"] is not None]
  last = evals[-1] if evals else {}
  best_row = max(evals, key=lambda r: r["participant_accuracy_mean"],
                 default={})
  return {
      "algorithm": plan.algorithm,
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
