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
the sweep (:mod:`dssgd_jax.sweep`). A run whose loss becomes non-finite is
reported as diverged in the table and the sweep goes on. At the end the
command writes into ``--workdir``:

* ``table.md`` — the final-epoch and best-epoch test accuracy of every row
  and column (Markdown; mean ± std with ``--num_seeds``, and which of the
  paper's orderings hold beyond the combined std),
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
import io
import os
import sys
import time

from dssgd_jax.tools import cli

with cli.exit_on_interrupt(__name__ == "__main__"):  # Ctrl-C while starting
  from absl import app
  from absl import flags

  from dssgd_jax.run import config as config_lib
  from dssgd_jax.run import figures as plot_lib
  from dssgd_jax.tools import sweep
  from dssgd_jax.errors import ConfigError

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
class Run(sweep.Run):
  """One cell of the table: a row (algorithm, θu) and a column (M, k).

  Its key is ``ROW_COLUMN`` (e.g. ``dssgd_0.1_bs32_lr0.01``), its label the
  row's with the column's batch size and learning rate.
  """
  row: str          # "centralized" | "dssgd_0.1" | "standalone" | "fedavg"
  column: str       # "bs32_lr0.01"


def _num(x: float) -> str:
  return f"{x:g}"


def row_label(row: str) -> str:
  if row.startswith("dssgd_"):
    return f"DSSGD θu = {row[len('dssgd_'):]}"
  return ROW_LABELS[row]


def plan(base: config_lib.Config, batch_sizes: list[str],
         learning_rates: list[str], upload_fractions: list[str],
         baselines: list[str]) -> tuple[list[str], list[tuple], list[Run]]:
  """Every run of the sweep, validated before any work starts.

  Returns:
    (row keys in table order, columns as (key, M, k), runs).

  Raises:
    ConfigError: a bad list flag, or a run whose flags do not validate.
  """
  sweep.require_workdir(base, "one subdirectory per run, the table and the "
                        "figures")
  sizes = sweep.parse_list("batch_sizes",
                           batch_sizes or [str(base.batch_size)], int,
                           lambda x: x > 0, "a positive integer")
  rates = sweep.positive_numbers(
      "learning_rates", learning_rates or [repr(base.learning_rate)])
  fractions = sweep.fractions("upload_fractions", upload_fractions)
  baselines = sweep.parse_choices("baselines", baselines, BASELINES)
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
      cfg = sweep.run_config(base, f"{row}_{key}", over.pop("algorithm"),
                             batch_size=m, learning_rate=k, **over)
      runs.append(Run(f"{row}_{key}", f"{row_label(row)}, batch size {m}, "
                      f"learning rate {_num(k)}", cfg, row, key))
  return rows, columns, runs


# ----------------------------------------------------------------------------
# The plan file (reproduce.json); the runs run through sweep.execute.


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
      "runs": [{"name": r.key, "row": r.row, "column": r.column,
                "algorithm": r.config.algorithm} for r in runs],
      "base_config": dataclasses.asdict(base),
      "command": " ".join(sys.argv),
  }


# ----------------------------------------------------------------------------
# Results: table, JSON, CSV.


def run_result(run: Run) -> dict:
  """The run's cell, status, accuracy and cost (:func:`sweep.result`)."""
  return {"name": run.key, "row": run.row, "column": run.column,
          "label": row_label(run.row), **sweep.result(run)}


def _pm(value: float, std: float | None) -> str:
  return f"{value:.4f}" if std is None else f"{value:.4f} ± {std:.4f}"


def _cell(res: dict, which: str = "best") -> str:
  """``which``: ``final`` (last evaluated epoch) or ``best`` (best epoch)."""
  value = res.get(f"{which}_accuracy")
  if value is None:
    return "diverged (epoch 1)" if res["status"] == "diverged" else "—"
  text = _pm(value, res.get(f"{which}_accuracy_std"))
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


def _canary_cell(res: dict) -> str:
  """Measured ε ≥ (95%) / TPR at 1% FPR of the end-to-end canary audit."""
  c = (res.get("audit") or {}).get("canary")
  if not c:
    return "—"
  tpr = "—" if c["tpr_at_1pct_fpr"] is None else f"{c['tpr_at_1pct_fpr']:.2f}"
  return f"{c['epsilon_lower']:.2f} / {tpr}"


def markdown_table(base: config_lib.Config, rows: list[str], columns,
                   results: dict[str, dict]) -> str:
  """The Markdown text of ``table.md``."""
  paper = PAPER.get(base.dataset)
  head = [""]
  for _, m, k in columns:
    head += [f"final, M = {m}, k = {_num(k)}",
             f"best epoch, M = {m}, k = {_num(k)}"]
  if paper:
    head.append(f"paper ({paper[0]})")
  audited = any("audit" in r for r in results.values())
  canaries = any((r.get("audit") or {}).get("canary")
                 for r in results.values())
  if audited:
    head += [f"attack AUC / adv., M = {m}, k = {_num(k)}"
             for _, m, k in columns] + ["ε / participant"]
  if canaries:
    head += [f"measured ε ≥ / TPR@1%FPR, M = {m}, k = {_num(k)}"
             for _, m, k in columns]
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
      cells += [_cell(res, "final"), _cell(res, "best")]
    if paper:
      value = paper[1].get(row)
      cells.append("—" if value is None else f"{value:.4f}")
    if audited:
      cells += [_audit_cell(results[f"{row}_{key}"]) for key, _, _ in columns]
      eps = [(results[f"{row}_{key}"]["metrics"] or [{}])[-1].get(
          "epsilon_spent") for key, _, _ in columns]
      cells.append("0" if first["algorithm"] == "standalone" else "∞" if (
          None in eps) else "/".join(f"{e:g}" for e in eps))
    if canaries:
      cells += [_canary_cell(results[f"{row}_{key}"])
                for key, _, _ in columns]
    cells.append(plot_lib.human_bytes(first["bytes_up_per_epoch"]))
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
      f"{noise}, {_seeds_text(cfg)}, test examples "
      f"{cfg.eval_examples or 'all'}.")
  text = [
      f"# Table 4 reproduction: {cfg.dataset}",
      "",
      "Test accuracy (mean over participants of their own models; "
      "centralized: the one model trained on the union of the data; FedAvg: "
      "the averaged model every participant downloads) at the final epoch "
      "and at the best epoch. The best epoch is chosen on the test set, so "
      "it is optimistic; the final epoch is the honest figure. "
      + (f"Mean ± standard deviation (ddof = 1) over {cfg.num_seeds} seeds "
         "(independent initialization, shuffling and noise; "
         + ("each seed its own data split" if cfg.vary_partition else
            "the same data split") + "); the best epoch is chosen per "
         "seed. " if cfg.num_seeds > 1 else "One seed: no error bars. ")
      + "M = batch size, k = learning rate. Upload per participant per epoch: "
      "(int32 index, float32 value) pairs, dense float32 when everything is "
      "shared. Time: training wall time summed over the row's runs "
      "(`elapsed_s`; evaluation not included).",
      "",
      *lines,
      "",
      f"Settings: {settings}",
      "",
      *orderings(rows, columns, results),
  ]
  if audited:
    text += ["", "Attack: membership inference by loss threshold (Yeom et "
             "al. 2018, `python -m dssgd_jax.audit`) against each "
             "participant's final model, members = its training examples, "
             "non-members = as many test examples; AUC and advantage "
             "(max TPR − FPR) are means over participants. ε per "
             "participant: total over the run by basic composition (∞: no "
             "guarantee; 0: nothing shared)."]
  if canaries:
    text += ["", "Measured ε: the end-to-end audit of what the server "
             "received (`--canaries`, `python -m dssgd_jax.audit`): the "
             "one-run lower bound of Steinke, Nasr and Jagielski (2023) at "
             "95% confidence from the canaries' scores, and the attack's TPR "
             "at 1% FPR; it must never exceed the claimed ε."]
  if paper:
    text += ["", "Paper numbers: SPEC section 6 (seed paper Table 4 for SVHN: "
             "CNN, 1,000 samples per participant; the seed's conclusion for "
             "MNIST). The seed does not say which M and k each number is "
             "for; it reports the maximum over its sweep."]
  return "\n".join(text) + "\n"


def _seeds_text(cfg) -> str:
  if cfg.num_seeds == 1:
    return f"seed {cfg.seed}"
  return (f"seeds {cfg.seed}–{cfg.seed + cfg.num_seeds - 1}"
          + (" (data split per seed)" if cfg.vary_partition else ""))


# The paper's ordering of the rows (Table 4): more sharing is more accurate.
ORDER = ("centralized", "dssgd_1", "dssgd_0.1", "dssgd_0.01", "dssgd_0.001",
         "standalone")


def orderings(rows: list[str], columns, results: dict[str, dict]
              ) -> list[str]:
  """Markdown lines: for each pair of neighbouring rows of the paper's
  ordering (:data:`ORDER`) and each column, whether the final-epoch
  accuracies are ordered as in the paper.

  An ordering *holds* only where the difference exceeds the combined
  standard deviation sqrt(std_a² + std_b²); *reversed* where it is as large
  the other way; otherwise it is *not resolved*. With one seed nothing can
  be resolved.
  """
  present = [r for r in ORDER if r in rows]
  pairs = list(zip(present, present[1:]))
  if not pairs:
    return []
  out = ["Orderings of the final-epoch accuracy (the paper's: centralized ≥ "
         "DSSGD with more sharing ≥ less sharing ≥ standalone); an ordering "
         "holds only where the difference exceeds the combined std "
         "sqrt(std_a² + std_b²):", ""]
  for key, m, k in columns:
    for a, b in pairs:
      ra, rb = results[f"{a}_{key}"], results[f"{b}_{key}"]
      fa, fb = ra.get("final_accuracy"), rb.get("final_accuracy")
      what = f"* M = {m}, k = {_num(k)}: {row_label(a)} > {row_label(b)}:"
      if fa is None or fb is None:
        out.append(f"{what} no result.")
        continue
      sa, sb = ra.get("final_accuracy_std"), rb.get("final_accuracy_std")
      diff = fa - fb
      if sa is None or sb is None:
        out.append(f"{what} not resolved (Δ = {diff:+.4f}; one seed, no "
                   "error bars).")
        continue
      combined = (sa ** 2 + sb ** 2) ** 0.5
      verdict = ("holds" if diff > combined else
                 "reversed" if -diff > combined else "not resolved")
      out.append(f"{what} {verdict} (Δ = {diff:+.4f}, combined std "
                 f"{combined:.4f}).")
  return out


CSV_FIELDS = ("run", "row", "algorithm", "upload_fraction", "batch_size",
              "learning_rate", "epoch", "participant_accuracy_mean",
              "participant_accuracy_min", "participant_accuracy_max",
              "server_accuracy", "train_loss", "uploaded_entries",
              "downloaded_entries", "bytes_up", "bytes_down",
              "bytes_up_cumulative", "epsilon_spent", "wall_time_s",
              "elapsed_s")


def audit_runs(runs: list[Run], results: dict[str, dict], log,
               data=None) -> None:
  """Adds ``audit`` (loss attack AUC/advantage) to every complete result."""
  complete = [r for r in runs if results[r.key]["status"] == "complete"]
  audits = sweep.audit_runs(complete, log, "reproduce", data,
                            attacks=("loss",))
  for key, full in audits.items():
    loss = full["attacks"]["loss"]
    results[key]["audit"] = {"auc": loss["auc"]["mean"],
                             "advantage": loss["advantage"]["mean"],
                             "auc_min": loss["auc"]["min"],
                             "auc_max": loss["auc"]["max"],
                             "num_members": full["num_members"],
                             "canary": full.get("canary")}


def write_results(workdir: str, base, rows, columns, runs, log,
                  audit: bool = False, data=None) -> dict:
  """Writes table.md, results.json, results.csv and the figures.

  ``data``: the sweep's ``(dataset, parts)`` if loaded (for the audit).
  """
  results = {r.key: run_result(r) for r in runs}
  if audit:
    audit_runs(runs, results, log, data)
  table = markdown_table(base, rows, columns, results)
  sweep.write_text(os.path.join(workdir, TABLE), table)
  sweep.write_json(os.path.join(workdir, RESULTS_JSON), {
      "base_config": dataclasses.asdict(base),
      "rows": rows, "columns": [c[0] for c in columns],
      "paper": PAPER.get(base.dataset, (None, {}))[1],
      "runs": list(results.values()),
  })
  f = io.StringIO()
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
  sweep.write_text(os.path.join(workdir, RESULTS_CSV), f.getvalue())
  figures = plot_lib.plot_sweep(workdir, _manifest(base, rows, columns, runs))
  log(f"[reproduce] wrote {os.path.join(workdir, TABLE)}, "
      f"{', '.join(figures)}, {RESULTS_JSON}, {RESULTS_CSV}")
  return results


def reproduce(base: config_lib.Config, batch_sizes=(), learning_rates=(),
              upload_fractions=("1", "0.1", "0.01", "0.001"),
              baselines=BASELINES, dry_run=False, log=None,
              audit=False) -> str:
  """Runs the sweep into ``base.workdir``; returns the Markdown table."""
  log = log or sweep.log_to_stderr
  rows, columns, runs = plan(base, list(batch_sizes), list(learning_rates),
                             list(upload_fractions), list(baselines))
  if dry_run:
    for r in runs:
      state = "complete" if sweep.is_complete(r) else "to run"
      print(f"{r.key}\t{state}\t{r.config.workdir}")
    return ""
  sweep.make_workdir(base.workdir)
  execute_start = time.time()
  # The plan first, so that ``python -m dssgd_jax.plot`` works mid-sweep.
  manifest = _manifest(base, rows, columns, runs)
  sweep.check_existing(runs)  # before writing anything
  sweep.write_json(os.path.join(base.workdir, plot_lib.MANIFEST), manifest)
  data = sweep.execute(runs, log, "reproduce")
  write_results(base.workdir, base, rows, columns, runs, log, audit=audit,
                data=data)
  log(f"[reproduce] done in {time.time() - execute_start:.0f}s.")
  with open(os.path.join(base.workdir, TABLE)) as f:
    return f.read()


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
