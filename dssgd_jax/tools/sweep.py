"""Sweeps: many runs of one preset, one run directory each, one table.

The entry-point tools that run a set of experiments and tabulate them are
built on this module: :mod:`dssgd_jax.reproduce` (the paper's Table 4) and
:mod:`dssgd_jax.privacy_table` (the measured privacy table). It holds the
plumbing they share, so that each tool keeps only its rows, columns and
table:

* planning: a :class:`Run` per run of the table, ``(key, label, config)``,
  whose config is the preset with the run's own flags, validated before any
  work starts and with its own directory ``--workdir/KEY``
  (:func:`run_config`); the comma-separated list flags that span the table
  (:func:`parse_list`, :func:`parse_choices`);
* executing: :func:`execute` runs every run in order through
  :func:`dssgd_jax.run.experiment.run`, loading the dataset once for all of
  them. A complete run (:func:`is_complete`) is skipped and an interrupted one
  resumes from its checkpoint, so rerunning the tool after a kill finishes
  the sweep; a run whose loss becomes non-finite is recorded
  (:func:`diverged`) and not retried;
* collecting: :func:`result` (status, accuracy and bytes of a run, from its
  ``metrics.jsonl``), :func:`audit_runs` (the membership-inference audit of
  :mod:`dssgd_jax.audit`) and :func:`write_json` / :func:`write_text`, which
  replace an output file only once it is complete.
"""

import dataclasses
import json
import math
import os
import sys
from typing import Callable, Sequence

import numpy as np

from dssgd_jax import _io
from dssgd_jax.run import build
from dssgd_jax.run import config as config_lib
from dssgd_jax.run import figures as plot_lib
from dssgd_jax.errors import ConfigError, NonFiniteError

SUMMARY = "summary.json"
DIVERGED = "diverged.json"

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep.

  Attributes:
    key: its name in the sweep and the name of its directory under
      ``--workdir`` (e.g. ``dssgd_0.1``).
    label: what the progress lines call it (e.g. ``DSSGD θu = 0.1``).
    config: its validated configuration, ``workdir`` included.
  """
  key: str
  label: str
  config: config_lib.Config


def log_to_stderr(msg: str) -> None:
  """The default ``log`` of the tools: one line on stderr."""
  print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------
# Planning.


def require_workdir(base: config_lib.Config, holds: str) -> None:
  """Raises ConfigError unless ``--workdir`` is set.

  Args:
    base: the preset.
    holds: what the directory holds, for the message (e.g. "one subdirectory
      per row and the table").
  """
  if not base.workdir:
    raise ConfigError(f"--workdir is required: the directory that holds "
                      f"{holds}.")


def parse_list(name: str, values: Sequence[str], kind: Callable,
               check: Callable[..., bool], what: str) -> list:
  """The values of a comma-separated list flag, converted and checked.

  Args:
    name: the flag, without ``--``.
    values: its items as given.
    kind: the conversion of one item (``int``, ``float``, ``str``).
    check: True for an acceptable converted item.
    what: what every item must be, for the message (e.g. "a positive
      integer").

  Returns:
    The converted items, in order.

  Raises:
    ConfigError: an item does not convert or fails ``check``, or two items
      are equal (they would be the same run).
  """
  out = []
  for v in values:
    try:
      x = kind(v)
    except ValueError:
      raise ConfigError(f"--{name}={','.join(values)}: {v!r} is not "
                        f"{what}.") from None
    if not check(x):
      raise ConfigError(f"--{name}={','.join(values)}: {v} is not {what}.")
    if x in out:
      raise ConfigError(f"--{name}={','.join(values)} lists {v} twice.")
    out.append(x)
  return out


def positive_numbers(name: str, values: Sequence[str]) -> list[float]:
  """:func:`parse_list` of finite numbers above 0."""
  return parse_list(name, values, float, lambda x: 0 < x < math.inf,
                    "a positive number")


def fractions(name: str, values: Sequence[str]) -> list[float]:
  """:func:`parse_list` of fractions in (0, 1] (θu, θd)."""
  return parse_list(name, values, float, lambda x: 0 < x <= 1,
                    "a fraction in (0, 1]")


def parse_choices(name: str, values: Sequence[str],
                  choices: Sequence[str]) -> list[str]:
  """The items of a list flag whose items are names out of ``choices``.

  Raises:
    ConfigError: an item is not one of ``choices`` or is listed twice.
  """
  for v in values:
    if v not in choices:
      raise ConfigError(f"--{name}={','.join(values)}: {v!r} is not one of: "
                        f"{', '.join(choices)}.")
  return parse_list(name, values, str, lambda x: True, "a name")


def run_config(base: config_lib.Config, key: str, algorithm: str,
               **overrides) -> config_lib.Config:
  """The validated config of the run ``key``: ``base`` for ``algorithm``.

  Args:
    base: the preset (every run flag the sweep does not set).
    key: the run's key; its work directory is ``base.workdir/key``.
    algorithm: the run's algorithm; the flags it does not read are reset
      (:func:`dssgd_jax.run.config.for_algorithm`).
    **overrides: the run's own flags.

  Raises:
    ConfigError: the run's flags do not validate.
  """
  cfg = build.for_algorithm(base, algorithm,
                                 workdir=os.path.join(base.workdir, key),
                                 **overrides)
  return build.validate(cfg)


# ----------------------------------------------------------------------------
# Executing.


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def is_complete(run: Run) -> bool:
  """True when the run's summary.json covers the requested epochs."""
  summary = _read_json(os.path.join(run.config.workdir, SUMMARY))
  return bool(summary) and summary.get("epochs", 0) >= run.config.epochs


def diverged(run: Run) -> dict | None:
  """The record of an earlier divergence before ``--epochs``, if any."""
  record = _read_json(os.path.join(run.config.workdir, DIVERGED))
  if record and record.get("epoch", 0) <= run.config.epochs:
    return record
  return None


def make_workdir(workdir: str) -> None:
  """Creates the sweep's ``--workdir``; ConfigError if it cannot be."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} cannot be created: "
                      f"{e.strerror}.") from None


def check_existing(runs: Sequence[Run]) -> None:
  """Refuses, before any work, a run directory that holds other flags' run.

  Raises:
    ConfigError: a run's directory holds a run with other flags (see
      :func:`dssgd_jax.run.experiment.run`).
  """
  from dssgd_jax.run import outputs  # pylint: disable=g-import-not-at-top
  for run in runs:
    if os.path.isdir(run.config.workdir):
      outputs.check_resumable(run.config.workdir, build.plan(run.config))


def execute(runs: Sequence[Run], log: Log, tool: str,
            keep_going: bool = True):
  """Runs (or resumes, or skips) every run in order.

  A complete run, or one that diverged before, is skipped; the others run
  (or resume from their checkpoint) through
  :func:`dssgd_jax.run.experiment.run`, all on one copy of the dataset.

  Args:
    runs: the sweep's runs, in order; they share the data flags.
    log: where progress lines go.
    tool: the tool's name, the prefix of its progress lines.
    keep_going: a run whose loss becomes non-finite is recorded
      (``diverged.json``, see :func:`diverged`) and the sweep goes on; False:
      its NonFiniteError ends the sweep.

  Returns:
    The ``(dataset, parts)`` it loaded, for the caller to reuse (None when
    every run was skipped).
  """
  from dssgd_jax.run import experiment  # pylint: disable=g-import-not-at-top
  todo = []
  for run in runs:
    if is_complete(run):
      log(f"[{tool}] {run.key}: complete, skipped.")
    elif diverged(run):
      log(f"[{tool}] {run.key}: diverged earlier, skipped.")
    else:
      todo.append(run)
  data = None
  for i, run in enumerate(todo):
    log(f"[{tool}] run {i + 1}/{len(todo)}: {run.label} -> "
        f"{run.config.workdir}")
    if data is None:
      data = build.data(run.config)
    try:
      experiment.run(run.config, *data, log=log)
    except NonFiniteError as e:
      if not keep_going:
        raise
      log(f"[{tool}] {run.key} diverged: {e}")
      rows = plot_lib.read_metrics(run.config.workdir)
      write_json(os.path.join(run.config.workdir, DIVERGED),
                 {"epoch": len(rows) + 1, "message": str(e)})
  return data


# ----------------------------------------------------------------------------
# Collecting.


def result(run: Run) -> dict:
  """Status, best/final accuracy and bytes of one run (from its files).

  Accuracy is ``plot.accuracy_key`` of the algorithm (FedAvg: the server's
  averaged model; otherwise the participants' mean); ``config`` and
  ``metrics`` (the lines of ``metrics.jsonl`` up to ``--epochs``) come last.
  """
  rows = plot_lib.read_metrics(run.config.workdir, run.config.epochs)
  key = plot_lib.accuracy_key(run.config.algorithm)
  evals = [r for r in rows if r.get(key) is not None]
  best = max(evals, key=lambda r: r[key], default=None)
  record = diverged(run)
  status = ("complete" if len(rows) >= run.config.epochs else
            "diverged" if record else "incomplete")
  n = max(len(rows), 1)
  seeds = _per_seed_accuracy(rows, key)
  return {
      "algorithm": run.config.algorithm,
      "upload_fraction": (run.config.upload_fraction
                          if run.config.algorithm == "dssgd" else None),
      "batch_size": run.config.batch_size,
      "learning_rate": run.config.learning_rate,
      "status": status,
      "diverged_at_epoch": record["epoch"] if record else None,
      "epochs_done": len(rows),
      "accuracy_metric": key,
      "best_accuracy": best[key] if best else None,
      "best_epoch": best["epoch"] if best else None,
      "final_accuracy": evals[-1][key] if evals else None,
      "final_participant_accuracy_min": (
          evals[-1]["participant_accuracy_min"] if evals else None),
      "final_participant_accuracy_max": (
          evals[-1]["participant_accuracy_max"] if evals else None),
      **seeds,
      "best_server_accuracy": max(
          (r["server_accuracy"] for r in rows
           if r.get("server_accuracy") is not None), default=None),
      "bytes_up_per_epoch": sum(r["bytes_up"] for r in rows) / n,
      "bytes_down_per_epoch": sum(r["bytes_down"] for r in rows) / n,
      "bytes_up_total": sum(r["bytes_up"] for r in rows),
      "elapsed_s": rows[-1]["elapsed_s"] if rows else 0.0,
      "config": dataclasses.asdict(run.config),
      "metrics": rows,
  }


def _per_seed_accuracy(rows: list[dict], key: str) -> dict:
  """With ``--num_seeds``: each run's best and final accuracy, and the mean
  ± std (``ddof=1``) over the runs of both (the best epoch chosen per run).

  Overrides ``best_accuracy``/``final_accuracy`` (means over seeds of the
  per-run values); one seed: the ``_std`` fields are None.
  """
  if not rows or "per_seed" not in rows[-1]:
    return {"num_seeds": 1, "best_accuracy_std": None,
            "final_accuracy_std": None}
  num_seeds = len(rows[-1]["per_seed"])
  per = []
  for s in range(num_seeds):
    evals = [(r["epoch"], r["per_seed"][s][key]) for r in rows
             if r["per_seed"][s].get(key) is not None]
    if not evals:
      return {"num_seeds": num_seeds, "best_accuracy_std": None,
              "final_accuracy_std": None}
    best_epoch, best = max(evals, key=lambda e: e[1])
    per.append({"seed": rows[-1]["per_seed"][s]["seed"], "best": best,
                "best_epoch": best_epoch, "final": evals[-1][1]})
  best = np.asarray([p["best"] for p in per])
  final = np.asarray([p["final"] for p in per])
  return {"num_seeds": num_seeds,
          "best_accuracy": float(best.mean()),
          "best_accuracy_std": float(best.std(ddof=1)),
          "final_accuracy": float(final.mean()),
          "final_accuracy_std": float(final.std(ddof=1)),
          "per_seed": per}


def cached_audit(workdir: str, seed: int,
                 attacks: Sequence[str] | None = None) -> dict | None:
  """The run's audit.json if it is newer than its checkpoint and complete.

  Complete: drawn with ``seed``, holding every attack asked for and the
  canary audit's result (an audit.json from before canaries is redone).

  Args:
    workdir: the run's directory.
    seed: the audit seed the result must have been drawn with.
    attacks: the attacks it must hold (default: all of ``audit.ATTACKS``).
  """
  from dssgd_jax.tools import audit as audit_lib  # pylint: disable=g-import-not-at-top
  from dssgd_jax.run import experiment  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, audit_lib.AUDIT_FILE)
  try:
    if os.path.getmtime(path) < os.path.getmtime(
        os.path.join(workdir, experiment.CHECKPOINT)):
      return None
  except OSError:
    return None
  res = _read_json(path)
  if not isinstance(res, dict) or res.get("audit_seed") != seed or (
      "num_params" not in res) or "canary" not in res or any(
          a not in res.get("attacks", {})
          for a in (attacks or audit_lib.ATTACKS)):
    return None
  return res


def audit_runs(runs: Sequence[Run], log: Log, tool: str, data=None,
               attacks: Sequence[str] | None = None, seed: int = 0,
               reuse: bool = False) -> dict[str, dict]:
  """The membership-inference audit of every run's final models.

  Args:
    runs: finished runs; they share the data flags.
    log: where progress lines go.
    tool: the tool's name, the prefix of its progress lines.
    data: ``(dataset, parts)`` as :func:`execute` returns it (None: loaded
      on first need).
    attacks: which of ``audit.ATTACKS`` to run (default: all); the loss
      attack must be one of them.
    seed: seed of the audit's non-member draws.
    reuse: keep a run's audit.json where it is current
      (:func:`cached_audit`) instead of auditing again.

  Returns:
    ``{run.key: result}``, results of :func:`dssgd_jax.audit.audit_run`
    (each also written to the run's ``audit.json``).
  """
  from dssgd_jax.tools import audit as audit_lib  # pylint: disable=g-import-not-at-top
  attacks = tuple(attacks or audit_lib.ATTACKS)
  out = {}
  for run in runs:
    res = cached_audit(run.config.workdir, seed, attacks) if reuse else None
    if res is None:
      if data is None:
        data = build.data(run.config)
      res = audit_lib.audit_run(run.config.workdir, attacks=attacks,
                                seed=seed, dataset=data[0], parts=data[1])
    loss = res["attacks"]["loss"]
    can = res.get("canary")
    log(f"[{tool}] audit {run.key}: loss-attack AUC "
        f"{loss['auc']['mean']:.4f}, advantage "
        f"{loss['advantage']['mean']:.4f}" + (
            "" if can is None else
            f"; canaries: measured ε ≥ {can['epsilon_lower']:.3f}"))
    out[run.key] = res
  return out


def write_text(path: str, text: str) -> None:
  """Writes ``text`` as it is to ``path`` atomically (:mod:`dssgd_jax._io`).

  Raises:
    ConfigError: the file cannot be written (its path and the reason).
  """
  _io.write_text(path, text, ConfigError)


def write_json(path: str, obj) -> None:
  """:func:`write_text` of ``obj`` as JSON (indented by 2)."""
  write_text(path, json.dumps(obj, indent=2))
