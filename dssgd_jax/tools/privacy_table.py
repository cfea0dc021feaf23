r"""The measured privacy table: accuracy, ε and membership-inference figures.

Usage::

  python -m dssgd_jax.privacy_table --flagfile=configs/quickstart.cfg \
      --workdir=runs/privacy_digits --svt_epsilons=0.1,1,10,100,1000 \
      --svt_upload_fraction=0.01 --svt_clip_bound=0.01 --svt_threshold=0.001 \
      --svt_download_fractions=1,0.1 --svt_download_rule=most_updated

(the commands behind the privacy tables of README.md).

Rows: ``centralized`` and ``standalone`` (``--privacy_baselines``), DSSGD at
every θu of ``--privacy_upload_fractions`` without noise, and DSSGD with the sparse vector
technique (SPEC section 3, "DP mode": ``--noise=svt``) at every ε per epoch
of ``--svt_epsilons``, with θu = ``--svt_upload_fraction``, γ =
``--svt_clip_bound``, τ = ``--svt_threshold`` and optionally their own θd
and download rule (``--svt_download_fractions``, ``--svt_download_rule``).
Every other flag is a run flag of ``python -m dssgd_jax.main`` (the preset)
and applies to every row; the baselines run with ``--protocol=parallel`` and
no noise.

Columns: the final mean test accuracy of the participants' own models (the
models that are audited), ε per participant over the whole run (basic
composition: ε per epoch × epochs, ``epsilon_spent`` of the last line of
``metrics.jsonl``; ∞ where the run gives no guarantee), and the membership-
inference figures of :mod:`dssgd_jax.audit` (loss-threshold attack of Yeom et
al. 2018 and the reference-calibrated attack: AUC and advantage, mean over
participants with min–max), for the participants' own models and for the
server's global model.

Each row is an ordinary run directory under ``--workdir``; finished runs are
skipped and interrupted ones resume, so rerunning the command after a kill
finishes the table (:mod:`dssgd_jax.sweep`); a row's ``audit.json`` is reused
while it is newer than the row's checkpoint. The command writes
``privacy_table.md`` and ``privacy_table.json`` into ``--workdir``.
"""

import dataclasses
import math
import os
import sys

from dssgd_jax.tools import cli

with cli.exit_on_interrupt(__name__ == "__main__"):  # Ctrl-C while starting
  from absl import app
  from absl import flags

  from dssgd_jax.tools import sweep
  from dssgd_jax.run import config as config_lib
  from dssgd_jax.errors import ConfigError

config_lib.define_flags()

flags.DEFINE_list("privacy_baselines", ["centralized", "standalone"],
                  "Baseline rows: centralized, standalone (empty: none).")
flags.DEFINE_list("privacy_upload_fractions", ["0.1", "0.01", "0.001"],
                  "θu of the noiseless DSSGD rows.")
flags.DEFINE_list("svt_epsilons", ["0.1", "1", "10"], "ε per participant "
                  "per epoch of the DSSGD rows with the sparse vector "
                  "technique (empty: none).")
flags.DEFINE_float("svt_upload_fraction", 0.01, "θu of the SVT rows.")
flags.DEFINE_float("svt_clip_bound", 0.01, "γ of the SVT rows.")
flags.DEFINE_float("svt_threshold", 0.001, "τ of the SVT rows.")
flags.DEFINE_list("svt_download_fractions", [], "θd of the SVT rows, one "
                  "set of rows each (default: --download_fraction).")
flags.DEFINE_string("svt_download_rule", None, "Download rule of the SVT "
                    "rows with θd other than --download_fraction (default: "
                    "--download_rule).")
flags.DEFINE_integer("audit_seed", 0, "Seed of the audit's non-member draws.")

TABLE = "privacy_table.md"
RESULTS = "privacy_table.json"
BASELINES = ("centralized", "standalone")


def plan(base: config_lib.Config, baselines, upload_fractions, svt_epsilons,
         svt_upload_fraction: float, svt_clip_bound: float,
         svt_threshold: float, svt_download_fractions=(),
         svt_download_rule: str | None = None) -> list[sweep.Run]:
  """Every row's run, validated before any work starts, in table order.

  Raises:
    ConfigError: a bad list flag, no row at all, or a row whose flags do not
      validate.
  """
  sweep.require_workdir(base, "one subdirectory per row and the table")
  baselines = sweep.parse_choices("privacy_baselines", list(baselines),
                                  BASELINES)
  upload_fractions = sweep.fractions("privacy_upload_fractions",
                                     list(upload_fractions))
  fractions = (sweep.fractions("svt_download_fractions",
                               list(svt_download_fractions))
               or [base.download_fraction])
  epsilons = sweep.positive_numbers("svt_epsilons", list(svt_epsilons))
  if not (baselines or upload_fractions or epsilons):
    raise ConfigError("--privacy_baselines, --privacy_upload_fractions and "
                      "--svt_epsilons are all empty: the table has no rows.")
  rows = []

  def add(key, label, **over):
    cfg = sweep.run_config(base, key, over.pop("algorithm"), **over)
    rows.append(sweep.Run(key, label, cfg))

  plain = dict(noise="none")
  if "centralized" in baselines:
    add("centralized", "Centralized SGD", algorithm="centralized",
        protocol="parallel")
  if "standalone" in baselines:
    add("standalone", "Standalone", algorithm="standalone",
        protocol="parallel")
  for f in upload_fractions:
    add(f"dssgd_{f:g}", f"DSSGD θu = {f:g}", algorithm="dssgd",
        upload_fraction=f, **plain)
  for dl in fractions:
    download, suffix, label_suffix = {}, "", ""
    if dl != base.download_fraction:
      rule = svt_download_rule or base.download_rule
      download = dict(download_fraction=dl, download_rule=rule)
      suffix, label_suffix = f"_dl{dl:g}_{rule}", f", θd = {dl:g} ({rule})"
    for e in epsilons:
      add(f"svt_{svt_upload_fraction:g}_eps{e:g}{suffix}",
          f"DSSGD θu = {svt_upload_fraction:g}{label_suffix} + SVT, ε = "
          f"{e:g}/epoch",
          algorithm="dssgd", upload_fraction=svt_upload_fraction,
          noise="svt", epsilon=e,
          clip_bound=svt_clip_bound, threshold=svt_threshold, **download)
  return rows


def _fmt(x, spec="{:.4f}"):
  return "—" if x is None else spec.format(x)


def _epsilon_text(res: dict) -> str:
  eps = res["epsilon_spent"]
  if res["algorithm"] == "standalone" or (
      res["algorithm"] == "dssgd" and res["upload_fraction"] == 0):
    return "0 (shares nothing)"
  if eps is None:
    return "∞ (no guarantee)"
  delta = res.get("delta_spent")
  per = res.get("epsilon_per_epoch")
  return f"{eps:g}" + (f" ({per:g}/epoch × {res['epochs']})" if per else
                       "") + (f", δ = {delta:g}" if delta else "")


def _attack_text(block, what):
  if block is None:
    return "n/a"
  v = block[what]
  return f"{v['mean']:.3f} [{v['min']:.2f}, {v['max']:.2f}]"


def _server_text(res: dict) -> str:
  if res["algorithm"] == "centralized":
    return "(the model itself)"
  server = res.get("server")
  if not server:
    return "n/a (nothing shared)"
  return (f"{server['loss']['auc']['mean']:.3f} / "
          f"{server['loss']['advantage']['mean']:.3f} "
          f"({server['num_members']} vs {server['num_members']})")


def _canary_cells(res: dict) -> list[str]:
  """Measured ε ≥, TPR at 1% FPR and AUC of the end-to-end canary audit."""
  c = res.get("canary")
  if res["algorithm"] == "centralized":
    return ["n/a (no uploads: the data is pooled)"] + ["—"] * 2
  if res["algorithm"] == "standalone" or (
      res["algorithm"] == "dssgd" and res["upload_fraction"] == 0):
    return ["0 (nothing sent)"] + ["—"] * 2
  if not c:
    return ["not audited (--canaries=0)"] + ["—"] * 2
  flag = "" if c.get("consistent", True) else " **exceeds the claim**"
  return [f"{c['epsilon_lower']:.2f}{flag}",
          _fmt(c["tpr_at_1pct_fpr"], "{:.3f}"), _fmt(c["auc"], "{:.3f}")]


def claim_markdown(rows: list[sweep.Run], results: dict[str, dict]) -> str:
  """The claim-against-measurement table: per row the accuracy, the claimed
  ε and the end-to-end measured lower bound with its attack's TPR at 1% FPR
  and AUC."""
  head = ["", "mean participant accuracy", "claimed ε per participant "
          "(total)", "measured ε ≥ (95%)", "TPR at 1% FPR", "AUC"]
  lines = ["| " + " | ".join(head) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
  for row in rows:
    r = results[row.key]
    lines.append("| " + " | ".join(
        [row.label, _fmt(r["participant_accuracy_mean"]), _epsilon_text(r)]
        + _canary_cells(r)) + " |")
  return "\n".join(lines)


def markdown(base, rows: list[sweep.Run], results: dict[str, dict]) -> str:
  """The Markdown text of ``privacy_table.md``.

  Args:
    base: the preset.
    rows: the rows' runs, in table order (:func:`plan`).
    results: each row's audit result by key.
  """
  head = ["", "mean participant accuracy", "ε per participant (total)",
          "member / non-member accuracy", "loss attack AUC",
          "loss attack advantage", "calibrated attack AUC",
          "calibrated attack advantage", "server model: loss attack AUC / "
          "advantage"]
  lines = ["| " + " | ".join(head) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
  for row in rows:
    r = results[row.key]
    a = r["attacks"]
    lines.append("| " + " | ".join([
        row.label, _fmt(r["participant_accuracy_mean"]), _epsilon_text(r),
        f"{a['member_accuracy']['mean']:.3f} / "
        f"{a['nonmember_accuracy']['mean']:.3f}",
        _attack_text(a["loss"], "auc"), _attack_text(a["loss"], "advantage"),
        _attack_text(a.get("calibrated"), "auc"),
        _attack_text(a.get("calibrated"), "advantage"),
        _server_text(r)]) + " |")
  first = results[rows[0].key]
  cfg = base
  chance = sorted({(results[row.key]["num_members"],
                    round(results[row.key]["chance_auc_se"], 3),
                    round(results[row.key]["chance_advantage"], 3))
                   for row in rows})
  chance_text = "; ".join(
      f"{m} vs {m}: AUC 0.5 ± {se:.3f}, advantage ≈ {adv:.3f}"
      for m, se, adv in chance)
  svt = [(row.label, results[row.key]) for row in rows
         if row.config.noise == "svt"]
  svt_text = []
  if svt:
    r0 = svt[0][1]
    count = math.ceil(r0["upload_fraction"] * r0["num_params"])
    epsilons = sorted({r["epsilon_per_epoch"] for _, r in svt})
    scales = ", ".join(f"ε = {e:g}: {18 * count * r0['clip_bound'] / e:.3g}"
                       for e in epsilons)
    svt_text = [
        "",
        f"SVT rows (SPEC section 3, NumericSparse): D = {r0['num_params']:,} "
        f"parameters, c = ⌈θu·D⌉ = {count:,} releases per participant per "
        f"epoch, γ = {r0['clip_bound']:g}, τ = {r0['threshold']:g}. The "
        "Laplace scale of a released "
        f"value is 2cΔf/ε2 = 18cγ/ε ({scales}), to be compared with γ = "
        f"{r0['clip_bound']:g}: every released value is then clipped to "
        "[-γ, γ]."]
  can = next((results[row.key]["canary"] for row in rows
              if results[row.key].get("canary")), None)
  canary_text = ([] if can is None else [
      "",
      f"Measured ε: the end-to-end audit of what the server received "
      f"(`--canaries={can['num_canaries']}`: gradient-space canaries, each "
      "included with probability ½ in one participant's update every "
      "epoch, scored from the uploads the server received; "
      "`dssgd_jax.canaries`). The bound is the one-run lower bound of "
      "Steinke, Nasr and Jagielski (2023) at 95% confidence "
      "(`jax_privacy.auditing`, thresholds Bonferroni-corrected, δ = the "
      "claim's δ, else 10⁻⁶); with perfectly separated scores it is capped "
      f"by the number of canaries (about 4.8 for {can['num_canaries']}). "
      "The claim covers it, so it must never exceed the claimed ε."])
  return "\n".join([
      f"# Measured privacy: {cfg.dataset} ({cfg.model})",
      "",
      f"N = {cfg.num_participants} participants × n = "
      f"{cfg.samples_per_participant} examples ({cfg.partition}), "
      f"{cfg.epochs} epochs, batch size {cfg.batch_size}, learning rate "
      f"{cfg.learning_rate:g}, DSSGD protocol {cfg.protocol}, selection "
      f"{cfg.selection}, θd = {cfg.download_fraction:g}, seed {cfg.seed}, "
      f"test examples for accuracy {cfg.eval_examples or 'all'}.",
      "",
      "## Claimed against measured",
      "",
      claim_markdown(rows, results),
      *canary_text,
      "",
      "## Membership inference against the models",
      "",
      *lines,
      "",
      "Accuracy: final epoch, mean over participants of their own models' "
      "test accuracy (centralized: the one model). Attack figures: mean over "
      "participants [min, max] of the membership-inference attack against "
      "each participant's final model, members = its training examples, "
      "non-members = as many test examples (audit seed "
      f"{first['audit_seed']}). Chance level (a model that leaks nothing): "
      f"{chance_text}. Calibrated attack: the other participants' final "
      "models as reference models (n/a for centralized: one model). Server "
      "model: the same loss attack against the server's global model, which "
      "is what the other participants and the server see, with every "
      "participant's training examples as members; this, not a "
      "participant's own model, is what the SVT's ε bounds.",
      *svt_text,
  ]) + "\n"


def privacy_table(base, baselines=("centralized", "standalone"),
                  upload_fractions=("0.1", "0.01", "0.001"),
                  svt_epsilons=("0.1", "1", "10"), svt_upload_fraction=0.01,
                  svt_clip_bound=0.01, svt_threshold=0.001,
                  svt_download_fractions=(), svt_download_rule=None,
                  audit_seed=0, log=None) -> str:
  """Runs (or resumes) every row, audits it, writes and returns the table.

  A run whose loss becomes non-finite ends the command (NonFiniteError): a
  row needs a finished run to audit.
  """
  log = log or sweep.log_to_stderr
  rows = plan(base, baselines, upload_fractions, svt_epsilons,
              svt_upload_fraction, svt_clip_bound, svt_threshold,
              svt_download_fractions, svt_download_rule)
  sweep.make_workdir(base.workdir)
  sweep.check_existing(rows)
  data = sweep.execute(rows, log, "privacy_table", keep_going=False)
  results = sweep.audit_runs(rows, log, "privacy_table", data,
                             seed=audit_seed, reuse=True)
  text = markdown(base, rows, results)
  sweep.write_text(os.path.join(base.workdir, TABLE), text)
  sweep.write_json(os.path.join(base.workdir, RESULTS), {
      "base_config": dataclasses.asdict(base),
      "command": " ".join(sys.argv),
      "rows": [{"key": row.key, "label": row.label, **results[row.key]}
               for row in rows]})
  return text


def main(argv):
  cli.reject_positional(argv)
  f = flags.FLAGS
  with cli.user_errors():
    base = config_lib.from_flags()
    cli.setup_devices(base)  # --cpu_devices, multi-host, as in main
    text = privacy_table(
        base, f.privacy_baselines, f.privacy_upload_fractions,
        f.svt_epsilons, f.svt_upload_fraction, f.svt_clip_bound,
        f.svt_threshold, f.svt_download_fractions, f.svt_download_rule,
        f.audit_seed)
  print(text, end="")


if __name__ == "__main__":
  sys.exit(app.run(main, flags_parser=cli.parse_flags))
