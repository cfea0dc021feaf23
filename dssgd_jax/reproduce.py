r"""Reproduces the paper's Table 4 and its figure for any dataset preset.

Usage::

  python -m dssgd_jax.reproduce --flagfile=configs/quickstart.cfg \
      --workdir=runs/table_digits
  python -m dssgd_jax.reproduce --flagfile=configs/svhn_cnn.cfg \
      --workdir=runs/table_svhn --batch_sizes=1,32 --learning_rates=0.01,0.001

Rows (paper section 4, Table 4): centralized SGD on the union of the data,
DSSGD with θu = 1, 0.1, 0.01, 0.001 (``--upload_fractions``), every participant
alone (standalone) and federated averaging (``--baselines``). Columns: every
combination of ``--batch_sizes`` and ``--learning_rates`` (default: the
preset's ``--batch_size`` and ``--learning_rate``). Every other flag is a run
flag of ``python -m dssgd_jax.main`` and applies to every run; a flag after
``--flagfile`` overrides the file (e.g. ``--epochs=5``). The preset's
``--algorithm`` and ``--upload_fraction`` are replaced by each row's, and the
baselines run without upload noise.

Each run lives in its own subdirectory of ``--workdir`` (e.g.
``dssgd_0.1_bs32_lr0.01/``) and is an ordinary run directory: a run whose
``summary.json`` already covers ``--epochs`` is skipped, an interrupted one
resumes from its checkpoint, so rerunning the command after a kill finishes
the sweep. A run whose loss becomes non-finite is reported as diverged in the
table and the sweep goes on. At the end the command writes into ``--workdir``:

* ``table.md`` — the best test accuracy of every row and column (Markdown),
  with the paper's numbers beside ours where the dataset is one of the
  paper's (SVHN, MNIST), and the upload per participant per epoch;
* ``figure.png`` — test accuracy against epochs, one line per row, one panel
  per column; ``figure_bytes.png`` — accuracy against cumulative bytes
  uploaded per participant;
* ``results.json`` (every run's config, summary and metrics) and
  ``results.csv`` (one line per run and epoch);
* ``reproduce.json`` — the plan, written first (``python -m dssgd_jax.plot
  WORKDIR`` redraws the figures of a sweep that is still running).

With ``--audit`` every complete run is also audited by a membership-inference
attack (:func:`dssgd_jax.audit.audit_run`: the loss-threshold attack of Yeom
et al. 2018 against each participant's final model; ``audit.json`` in the run
directory) and the table gets one "attack AUC / advantage" column per batch
size / learning rate column (mean over participants), plus ε per participant.

Accuracy is the mean over participants of their own models' test accuracy
(centralized: the one model; FedAvg: the averaged server model, which is what
every FedAvg participant holds after downloading).
"""

import csv
import dataclasses
import json
import os
import sys
import time

from absl import app
from absl import flags

from dssgd_jax import cli
from dssgd_jax.run import config as config_lib
from dssgd_jax import plot as plot_lib
from dssgd_jax.errors import ConfigError, NonFiniteError

config_lib.define_flags()
config_lib.declare_key_flags()  # list the run flags, by group, in --help

BASELINES = ("centralized", "standalone", "fedavg")

flags.DEFINE_list("batch_sizes", [], "Batch sizes M of the table's columns, "
                  "e.g. 1,32 (default: --batch_size).")
flags.DEFINE_list("learning_rates", [], "Learning rates k of the table's "
                  "columns, e.g. 0.01,0.001 (default: --learning_rate).")
flags.DEFINE_list("upload_fractions", ["1", "0.1", "0.01", "0.001"],
                  "θu of the DSSGD rows (empty: no DSSGD rows).")
flags.DEFINE_list("baselines", list(BASELINES), "Baseline rows, any of "
                  f"{', '.join(BASELINES)} (empty: none).")
flags.DEFINE_boolean("dry_run", False, "Print the runs and exit.")
flags.DEFINE_boolean("audit", False, "Run the membership-inference audit "
                     "(dssgd_jax.audit) on every complete run and add its "
                     "AUC and advantage to the table.")

TABLE = "table.md"
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
DIVERGED = "diverged.json"
SUMMARY = "summary.json"

# The paper's numbers (SPEC section 6): seed Table 4 (SVHN CNN, 1,000 samples
# per participant) and the seed's conclusion (MNIST-scale).
PAPER = {
    "svhn_cropped": ("SVHN, seed Table 4", {
        "centralized": 0.8819, "dssgd_0.1": 0.8274, "dssgd_0.01": 0.7548,
        "dssgd_0.001": 0.6228, "standalone": 0.5211}),
    "mnist": ("MNIST, seed conclusion", {
        "centralized": 0.9919, "dssgd_0.1": 0.9912, "dssgd_0.01": 0.9852}),
}

ROW_LABELS = {"centralized": "Centralized SGD", "standalone": "Standalone",
              "fedavg": "FedAvg"}


@dataclasses.dataclass(frozen=True)
class Run:
  """One cell of the table: a row (algorithm, θu) and a column (M, k)."""
  row: str          # "centralized" | "dssgd_0.1" | "standalone" | "fedavg"
  column: str       # "bs32_lr0.01"
  config: config_lib.Config

  @property
  def name(self) -> str:
    return f"{self.row}_{self.column}"


def _num(x: float) -> str:
  return f"{x:g}"


def row_label(row: str) -> str:
  if row.startswith("dssgd_"):
    return f"DSSGD θu = {row[len('dssgd_'):]}"
  return ROW_LABELS[row]


def _parse_list(name: str, values: list[str], kind, check, what: str) -> list:
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


def plan(base: config_lib.Config, batch_sizes: list[str],
         learning_rates: list[str], upload_fractions: list[str],
         baselines: list[str]) -> tuple[list[str], list[tuple], list[Run]]:
  """Every run of the sweep, validated before any work starts.

  Returns:
    (row keys in table order, columns as (key, M, k), runs).

  Raises:
    ConfigError: a bad list flag, or a run whose flags do not validate.
  """
  if not base.workdir:
    raise ConfigError("--workdir is required: the directory that holds one "
                      "subdirectory per run, the table and the figures.")
  sizes = _parse_list("batch_sizes", batch_sizes or [str(base.batch_size)],
                      int, lambda x: x > 0, "a positive integer")
  rates = _parse_list("learning_rates",
                      learning_rates or [repr(base.learning_rate)], float,
                      lambda x: 0 < x < float("inf"), "a positive number")
  fractions = _parse_list("upload_fractions", upload_fractions, float,
                          lambda x: 0 < x <= 1, "a fraction in (0, 1]")
  for b in baselines:
    if b not in BASELINES:
      raise ConfigError(f"--baselines={','.join(baselines)}: {b!r} is not one"
                        f" of: {', '.join(BASELINES)}.")
  if len(set(baselines)) != len(baselines):
    raise ConfigError(f"--baselines={','.join(baselines)} lists a row twice.")
  for m in sizes:
    if m > base.samples_per_participant:
      raise ConfigError(
          f"--batch_sizes={','.join(map(str, sizes))}: {m} is larger than "
          f"--samples_per_participant={base.samples_per_participant}.")
  rows = []
  if "centralized" in baselines:
    rows.append("centralized")
  rows += [f"dssgd_{_num(f)}" for f in fractions]
  rows += [b for b in ("standalone", "fedavg") if b in baselines]
  if not rows:
    raise ConfigError("--upload_fractions and --baselines are both empty: "
                      "the table has no rows.")
  columns = [(f"bs{m}_lr{_num(k)}", m, k) for m in sizes for k in rates]
  runs = []
  for key, m, k in columns:
    for row in rows:
      if row.startswith("dssgd_"):
        over = dict(algorithm="dssgd",
                    upload_fraction=fractions[[f"dssgd_{_num(f)}" for f in
                                               fractions].index(row)])
      else:
        # Baselines exchange no noised updates; every flag that the
        # baseline does not read is reset (config.for_algorithm).
        # --protocol=parallel is what the baselines run.
        over = dict(algorithm=row, noise="none", protocol="parallel")
      cfg = config_lib.for_algorithm(
          base, over.pop("algorithm"), batch_size=m, learning_rate=k,
          workdir=os.path.join(base.workdir, f"{row}_{key}"), **over)
      runs.append(Run(row, key, config_lib.validate(cfg)))
  return rows, columns, runs


# ----------------------------------------------------------------------------
# Running.


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


def _manifest(base, rows, columns, runs) -> dict:
  return {
      "title": (f"{base.dataset} ({base.model}), N={base.num_participants}, "
                f"n={base.samples_per_participant}, {base.epochs} epochs, "
                f"{base.protocol}"),
      "epochs": base.epochs,
      "rows": [{"key": r, "label": row_label(r)} for r in rows],
      "columns": [{"key": key, "label": f"batch size {m}, learning rate "
                                        f"{_num(k)}",
                   "batch_size": m, "learning_rate": k}
                  for key, m, k in columns],
      "runs": [{"name": r.name, "row": r.row, "column": r.column,
                "algorithm": r.config.algorithm} for r in runs],
      "base_config": dataclasses.asdict(base),
      "command": " ".join(sys.argv),
  }


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def execute(runs: list[Run], log) -> None:
  """Runs (or resumes, or skips) every run in order."""
  from dssgd_jax.run import experiment  # pylint: disable=g-import-not-at-top
  todo = [r for r in runs if not is_complete(r) and not diverged(r)]
  for r in runs:
    if r not in todo:
      why = "diverged earlier" if diverged(r) and not is_complete(r) else (
          "complete")
      log(f"[reproduce] {r.name}: {why}, skipped.")
  data = None
  for i, run in enumerate(todo):
    log(f"[reproduce] run {i + 1}/{len(todo)}: {row_label(run.row)}, batch "
        f"size {run.config.batch_size}, learning rate "
        f"{_num(run.config.learning_rate)} -> {run.config.workdir}")
    if data is None:
      from dssgd_jax.run import build  # pylint: disable=g-import-not-at-top
      data = build.data(run.config)
    try:
      experiment.run(run.config, *data, log=log)
    except NonFiniteError as e:
      log(f"[reproduce] {run.name} diverged: {e}")
      rows = plot_lib.read_metrics(run.config.workdir)
      _write_json(os.path.join(run.config.workdir, DIVERGED),
                  {"epoch": len(rows) + 1, "message": str(e)})


# ----------------------------------------------------------------------------
# Results: table, JSON, CSV.


def run_result(run: Run) -> dict:
  """Best/final accuracy, cost and status of one run (from its files)."""
  rows = plot_lib.read_metrics(run.config.workdir, run.config.epochs)
  key = plot_lib.accuracy_key(run.config.algorithm)
  evals = [r for r in rows if r.get(key) is not None]
  best = max(evals, key=lambda r: r[key], default=None)
  record = diverged(run)
  status = ("complete" if len(rows) >= run.config.epochs else
            "diverged" if record else "incomplete")
  n = max(len(rows), 1)
  return {
      "name": run.name, "row": run.row, "column": run.column,
      "label": row_label(run.row), "algorithm": run.config.algorithm,
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


def _cell(res: dict) -> str:
  if res["best_accuracy"] is None:
    return "diverged (epoch 1)" if res["status"] == "diverged" else "—"
  text = f"{res['best_accuracy']:.4f}"
  if res["status"] == "diverged":
    text += f" (diverged, epoch {res['diverged_at_epoch']})"
  elif res["status"] == "incomplete":
    text += f" ({res['epochs_done']} epochs)"
  return text


def _audit_cell(res: dict) -> str:
  a = res.get("audit")
  if not a:
    return "—"
  return f"{a['auc']:.3f} / {a['advantage']:.3f}"


def markdown_table(base: config_lib.Config, rows: list[str], columns,
                   results: dict[str, dict]) -> str:
  """The Markdown text of ``table.md``."""
  paper = PAPER.get(base.dataset)
  head = [""] + [f"M = {m}, k = {_num(k)}" for _, m, k in columns]
  if paper:
    head.append(f"paper ({paper[0]})")
  audited = any("audit" in r for r in results.values())
  if audited:
    head += [f"attack AUC / adv., M = {m}, k = {_num(k)}"
             for _, m, k in columns] + ["ε / participant"]
  head += ["upload / participant / epoch", "time"]
  lines = ["| " + " | ".join(head) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
  for row in rows:
    cells = [row_label(row)]
    first = None
    total_time = 0.0
    for key, _, _ in columns:
      res = results[f"{row}_{key}"]
      first = first or res
      total_time += res["elapsed_s"]
      cells.append(_cell(res))
    if paper:
      value = paper[1].get(row)
      cells.append("—" if value is None else f"{value:.4f}")
    if audited:
      cells += [_audit_cell(results[f"{row}_{key}"]) for key, _, _ in columns]
      eps = [(results[f"{row}_{key}"]["metrics"] or [{}])[-1].get(
          "epsilon_spent") for key, _, _ in columns]
      cells.append("0" if first["algorithm"] == "standalone" else "∞" if (
          None in eps) else "/".join(f"{e:g}" for e in eps))
    cells.append(plot_lib._human_bytes(first["bytes_up_per_epoch"]))  # pylint: disable=protected-access
    cells.append(f"{total_time:.0f} s")
    lines.append("| " + " | ".join(cells) + " |")
  cfg = base
  noise = "no upload noise" if cfg.noise == "none" else f"noise {cfg.noise}"
  settings = (
      f"{cfg.dataset} ({cfg.model}), N = {cfg.num_participants} participants "
      f"× n = {cfg.samples_per_participant} examples ({cfg.partition}), "
      f"{cfg.epochs} epochs, DSSGD protocol {cfg.protocol}, selection "
      f"{cfg.selection}, θd = {_num(cfg.download_fraction)}, γ = "
      f"{'none' if cfg.clip_bound is None else _num(cfg.clip_bound)}, "
      f"{noise}, seed {cfg.seed}, test examples "
      f"{cfg.eval_examples or 'all'}.")
  text = [
      f"# Table 4 reproduction: {cfg.dataset}",
      "",
      "Best test accuracy over the epochs (mean over participants of their "
      "own models; centralized: the one model trained on the union of the "
      "data; FedAvg: the averaged model every participant downloads). "
      "M = batch size, k = learning rate. Upload per participant per epoch: "
      "(int32 index, float32 value) pairs, dense float32 when everything is "
      "shared. Time: training and evaluation wall time summed over the "
      "row's runs.",
      "",
      *lines,
      "",
      f"Settings: {settings}",
  ]
  if audited:
    text += ["", "Attack: membership inference by loss threshold (Yeom et "
             "al. 2018, `python -m dssgd_jax.audit`) against each "
             "participant's final model, members = its training examples, "
             "non-members = as many test examples; AUC and advantage "
             "(max TPR − FPR) are means over participants. ε per "
             "participant: total over the run by basic composition (∞: no "
             "guarantee; 0: nothing shared)."]
  if paper:
    text += ["", "Paper numbers: SPEC section 6 (seed paper Table 4 for SVHN: "
             "CNN, 1,000 samples per participant; the seed's conclusion for "
             "MNIST). The seed does not say which M and k each number is "
             "for; it reports the maximum over its sweep."]
  return "\n".join(text) + "\n"


CSV_FIELDS = ("run", "row", "algorithm", "upload_fraction", "batch_size",
              "learning_rate", "epoch", "participant_accuracy_mean",
              "participant_accuracy_min", "participant_accuracy_max",
              "server_accuracy", "train_loss", "uploaded_entries",
              "downloaded_entries", "bytes_up", "bytes_down",
              "bytes_up_cumulative", "epsilon_spent", "wall_time_s",
              "elapsed_s")


def audit_runs(runs: list[Run], results: dict[str, dict], log) -> None:
  """Adds ``audit`` (loss attack AUC/advantage) to every complete result."""
  from dssgd_jax import audit as audit_lib  # pylint: disable=g-import-not-at-top
  from dssgd_jax.run import build  # pylint: disable=g-import-not-at-top
  data = None
  for run in runs:
    res = results[run.name]
    if res["status"] != "complete":
      continue
    if data is None:
      data = build.data(run.config)
    full = audit_lib.audit_run(run.config.workdir, attacks=("loss",),
                               dataset=data[0], parts=data[1])
    loss = full["attacks"]["loss"]
    res["audit"] = {"auc": loss["auc"]["mean"],
                    "advantage": loss["advantage"]["mean"],
                    "auc_min": loss["auc"]["min"],
                    "auc_max": loss["auc"]["max"],
                    "num_members": full["num_members"]}
    log(f"[reproduce] audit {run.name}: AUC {loss['auc']['mean']:.4f}, "
        f"advantage {loss['advantage']['mean']:.4f}")


def write_results(workdir: str, base, rows, columns, runs, log,
                  audit: bool = False) -> dict:
  """Writes table.md, results.json, results.csv and the figures."""
  results = {r.name: run_result(r) for r in runs}
  if audit:
    audit_runs(runs, results, log)
  table = markdown_table(base, rows, columns, results)
  with open(os.path.join(workdir, TABLE), "w") as f:
    f.write(table)
  _write_json(os.path.join(workdir, RESULTS_JSON), {
      "base_config": dataclasses.asdict(base),
      "rows": rows, "columns": [c[0] for c in columns],
      "paper": PAPER.get(base.dataset, (None, {}))[1],
      "runs": list(results.values()),
  })
  with open(os.path.join(workdir, RESULTS_CSV), "w", newline="") as f:
    w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for res in results.values():
      cum = 0.0
      for m in res["metrics"]:
        cum += m["bytes_up"]
        w.writerow({**m, "run": res["name"], "row": res["row"],
                    "algorithm": res["algorithm"],
                    "upload_fraction": res["upload_fraction"],
                    "batch_size": res["batch_size"],
                    "learning_rate": res["learning_rate"],
                    "bytes_up_cumulative": cum})
  figures = plot_lib.plot_sweep(workdir, _manifest(base, rows, columns, runs))
  log(f"[reproduce] wrote {os.path.join(workdir, TABLE)}, "
      f"{', '.join(figures)}, {RESULTS_JSON}, {RESULTS_CSV}")
  return results


def reproduce(base: config_lib.Config, batch_sizes=(), learning_rates=(),
              upload_fractions=("1", "0.1", "0.01", "0.001"),
              baselines=BASELINES, dry_run=False, log=None,
              audit=False) -> str:
  """Runs the sweep into ``base.workdir``; returns the Markdown table."""
  if log is None:
    def log(msg):
      print(msg, file=sys.stderr, flush=True)
  rows, columns, runs = plan(base, list(batch_sizes), list(learning_rates),
                             list(upload_fractions), list(baselines))
  if dry_run:
    for r in runs:
      state = "complete" if is_complete(r) else "to run"
      print(f"{r.name}\t{state}\t{r.config.workdir}")
    return ""
  try:
    os.makedirs(base.workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"--workdir={base.workdir} cannot be created: "
                      f"{e.strerror}.") from None
  execute_start = time.time()
  # The plan first, so that ``python -m dssgd_jax.plot`` works mid-sweep.
  manifest = _manifest(base, rows, columns, runs)
  for r in runs:  # validate existing run dirs before writing anything
    _check_existing(r)
  _write_json(os.path.join(base.workdir, plot_lib.MANIFEST), manifest)
  execute(runs, log)
  write_results(base.workdir, base, rows, columns, runs, log, audit=audit)
  log(f"[reproduce] done in {time.time() - execute_start:.0f}s.")
  with open(os.path.join(base.workdir, TABLE)) as f:
    return f.read()


def _check_existing(run: Run) -> None:
  if os.path.isdir(run.config.workdir):
    from dssgd_jax.run import experiment  # pylint: disable=g-import-not-at-top
    experiment._check_config(run.config.workdir, run.config)  # pylint: disable=protected-access


def main(argv):
  cli.reject_positional(argv)
  f = flags.FLAGS
  with cli.user_errors():
    base = config_lib.from_flags()
    cli.setup_devices(base)
    table = reproduce(base, f.batch_sizes, f.learning_rates,
                      f.upload_fractions, f.baselines, f.dry_run,
                      audit=f.audit)
  print(table, end="")


if __name__ == "__main__":
  sys.exit(app.run(main, flags_parser=cli.parse_flags))
