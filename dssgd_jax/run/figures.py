"""Figures of a run or a sweep, drawn from what the run layer writes.

``accuracy.png`` and ``accuracy_vs_bytes.png`` of a run (:func:`plot_run`:
the participants' mean test accuracy against epochs with the min/max band
over participants and the server model's accuracy, and the same against the
cumulative bytes each participant uploaded), ``figure.png`` and
``figure_bytes.png`` of a sweep directory (:func:`plot_sweep`: one line per
table row, one panel per column). They read only ``metrics.jsonl`` (a torn
last line of a running experiment is ignored), ``config.json`` and
``reproduce.json``, so they can be drawn at any time, also while the run is
going. Figures are drawn with matplotlib's Agg backend (no display needed).
Each figure is written to a temporary file that replaces the old one only
when complete; a file that cannot be written raises :class:`PlotError` (one
sentence naming it) and leaves the files already there as they were. The
command is ``python -m dssgd_jax.plot`` (:mod:`dssgd_jax.tools.plot`).
"""

import json
import os

import numpy as np

from dssgd_jax import _io
from dssgd_jax.errors import UserError

METRICS = "metrics.jsonl"
CONFIG = "config.json"
MANIFEST = "reproduce.json"

RUN_FIGURE = "accuracy.png"
RUN_BYTES_FIGURE = "accuracy_vs_bytes.png"
SWEEP_FIGURE = "figure.png"
SWEEP_BYTES_FIGURE = "figure_bytes.png"


class PlotError(UserError):
  """The figures cannot be drawn: nothing to plot, or a file cannot be
  written."""


def read_metrics(rundir: str, max_epoch: int | None = None) -> list[dict]:
  """The rows of ``rundir/metrics.jsonl`` (a torn last line is dropped)."""
  path = os.path.join(rundir, METRICS)
  rows = []
  if not os.path.exists(path):
    return rows
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        break
      if max_epoch is not None and row.get("epoch", 0) > max_epoch:
        break
      rows.append(row)
  return rows


def _read_json(path: str) -> dict:
  """A JSON file, or one sentence naming it (PlotError) if it is unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise PlotError(f"{path} is not readable JSON "
                    f"({getattr(e, 'strerror', None) or e}).") from None


def read_config(rundir: str) -> dict:
  path = os.path.join(rundir, CONFIG)
  if not os.path.exists(path):
    return {}
  return _read_json(path)


def accuracy_key(algorithm: str | None) -> str:
  """The metric a row reports: FedAvg's model is the server's average."""
  return "server_accuracy" if algorithm == "fedavg" else (
      "participant_accuracy_mean")


def curve(rows: list[dict], key: str = "participant_accuracy_mean"
          ) -> dict[str, list[float]]:
  """Evaluated epochs of ``rows``: epoch, accuracy, min, max, its standard
  deviation over seeds (``--num_seeds``; None for one seed), cumulative bytes
  uploaded per participant."""
  out = {"epoch": [], "acc": [], "min": [], "max": [], "std": [],
         "bytes_up": []}
  total = 0.0
  for r in rows:
    total += float(r.get("bytes_up") or 0.0)
    if r.get(key) is None:
      continue
    out["epoch"].append(r["epoch"])
    out["acc"].append(r[key])
    out["std"].append(r.get(key + "_std"))
    if key == "participant_accuracy_mean":
      out["min"].append(r["participant_accuracy_min"])
      out["max"].append(r["participant_accuracy_max"])
    else:
      out["min"].append(r[key])
      out["max"].append(r[key])
    out["bytes_up"].append(total)
  return out


def _has_std(c: dict) -> bool:
  return any(v is not None for v in c.get("std", []))


def _std_band(ax, c: dict, x_key: str, color, label) -> None:
  """The mean ± 1 std band of a seeded curve (nothing for one seed)."""
  if not _has_std(c):
    return
  std = np.asarray([v or 0.0 for v in c["std"]])
  acc = np.asarray(c["acc"])
  ax.fill_between(c[x_key], acc - std, acc + std, alpha=0.3, color=color,
                  lw=0, label=label)


def _pyplot():
  """pyplot, on the Agg backend unless a notebook or a user chose one."""
  import sys  # pylint: disable=g-import-not-at-top
  import matplotlib  # pylint: disable=g-import-not-at-top
  if "matplotlib.pyplot" not in sys.modules and "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # files only; leaves notebooks' inline figures be
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def human_bytes(x: float) -> str:
  for unit in ("B", "KB", "MB", "GB", "TB"):
    if abs(x) < 1000 or unit == "TB":
      return f"{x:.3g} {unit}"
    x /= 1000.0
  return f"{x:.3g} TB"


def _save(plt, fig, path: str, dpi: int) -> str:
  """Writes ``fig`` as the PNG file ``path`` and closes it; returns ``path``.

  The figure goes to ``path.tmp`` first and replaces ``path`` only once it
  is complete, so a failed write (a read-only directory, a full disk) leaves
  the previous figure as it was.

  Raises:
    PlotError: the file cannot be written (its path and the reason).
  """
  try:
    return _io.atomic_write(
        path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"), PlotError)
  finally:
    plt.close(fig)


def _integer_ticks(ax) -> None:
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# ----------------------------------------------------------------------------
# One run.


def _run_title(cfg: dict) -> str:
  if not cfg:
    return ""
  alg = cfg.get("algorithm", "?")
  if alg == "dssgd":
    alg = f"DSSGD θu={cfg.get('upload_fraction'):g}"
  return (f"{alg} on {cfg.get('dataset')} ({cfg.get('model')}), "
          f"N={cfg.get('num_participants')}, n={cfg.get('samples_per_participant')}"
          f", M={cfg.get('batch_size')}, k={cfg.get('learning_rate'):g}")


def plot_run(rundir: str, dpi: int = 120) -> list[str]:
  """Draws a single run's figures into ``rundir``; returns their paths."""
  rows = read_metrics(rundir)
  if not rows:
    raise PlotError(f"{os.path.join(rundir, METRICS)} has no complete epoch "
                    "yet; nothing to plot.")
  cfg = read_config(rundir)
  plt = _pyplot()
  c = curve(rows)
  server = curve(rows, "server_accuracy")
  title = _run_title(cfg)
  paths = []
  for x_key, name, xlabel in (
      ("epoch", RUN_FIGURE, "epoch"),
      ("bytes_up", RUN_BYTES_FIGURE,
       "cumulative bytes uploaded per participant")):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seeds = cfg.get("num_seeds") or 1
    over = f" (mean of {seeds} seeds)" if seeds > 1 else ""
    line = ax.plot(c[x_key], c["acc"], marker="o", ms=3,
                   label="participants' models (mean)" + over)[0]
    ax.fill_between(c[x_key], c["min"], c["max"],
                    alpha=0.1 if seeds > 1 else 0.25,
                    color=line.get_color(),
                    label="min–max over participants" + over)
    _std_band(ax, c, x_key, line.get_color(), f"±1 std over {seeds} seeds")
    if server["acc"] and cfg.get("algorithm") != "centralized":
      sline = ax.plot(server[x_key], server["acc"], ls="--",
                      label="server model" + over)[0]
      _std_band(ax, server, x_key, sline.get_color(), None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    if x_key == "epoch":
      _integer_ticks(ax)
    if x_key == "bytes_up":
      if c["bytes_up"] and c["bytes_up"][-1] > 0:
        ax.set_xscale("log")
      else:
        ax.text(0.5, 0.5, "this run uploads nothing", ha="center",
                transform=ax.transAxes, color="gray")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    paths.append(_save(plt, fig, os.path.join(rundir, name), dpi))
  return paths


# ----------------------------------------------------------------------------
# A sweep (reproduce) directory.


def _discover_runs(workdir: str) -> dict:
  """A manifest for a directory of runs not written by reproduce.py."""
  runs = []
  for name in sorted(os.listdir(workdir)):
    sub = os.path.join(workdir, name)
    if os.path.isfile(os.path.join(sub, METRICS)):
      cfg = read_config(sub)
      runs.append({"name": name, "label": name, "row": name,
                   "column": "runs", "algorithm": cfg.get("algorithm")})
  return {"runs": runs, "columns": [{"key": "runs", "label": ""}],
          "rows": [{"key": r["row"], "label": r["label"]} for r in runs],
          "epochs": None, "title": workdir}


def read_manifest(workdir: str) -> dict:
  path = os.path.join(workdir, MANIFEST)
  if os.path.exists(path):
    return _read_json(path)
  return _discover_runs(workdir)


def _zero_upload(c: dict) -> bool:
  return not c["bytes_up"] or c["bytes_up"][-1] <= 0


def plot_sweep(workdir: str, manifest: dict | None = None, dpi: int = 120
               ) -> list[str]:
  """Draws ``figure.png`` and ``figure_bytes.png`` of a sweep directory."""
  if manifest is None:
    manifest = read_manifest(workdir)
  runs = manifest["runs"]
  if not runs:
    raise PlotError(f"{workdir} holds no runs (no metrics.jsonl, config.json "
                    "or reproduce.json); nothing to plot.")
  plt = _pyplot()
  columns = manifest["columns"]
  rows = manifest["rows"]
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  color = {r["key"]: colors[i % len(colors)] for i, r in enumerate(rows)}
  label = {r["key"]: r["label"] for r in rows}
  curves = {}
  for run in runs:
    metrics = read_metrics(os.path.join(workdir, run["name"]),
                           manifest.get("epochs"))
    curves[run["name"]] = curve(metrics, accuracy_key(run.get("algorithm")))
  paths = []
  ncol = len(columns)
  for x_key, name, xlabel in (
      ("epoch", SWEEP_FIGURE, "epoch"),
      ("bytes_up", SWEEP_BYTES_FIGURE,
       "cumulative bytes uploaded per participant (log)")):
    legend_w = 2.6  # inches on the right for the legend
    fig, axes = plt.subplots(1, ncol, figsize=(5.2 * ncol + legend_w, 4.4),
                             squeeze=False, sharey=True)
    for ax, col in zip(axes[0], columns):
      for run in runs:
        if run["column"] != col["key"]:
          continue
        c = curves[run["name"]]
        if not c["epoch"]:
          continue
        kw = dict(color=color[run["row"]], label=label[run["row"]])
        if x_key == "bytes_up":
          if _zero_upload(c):
            ax.axhline(max(c["acc"]), ls=":", lw=1.5,
                       **{**kw, "label": kw["label"] + " (no upload; best)"})
          else:
            ax.plot(c["bytes_up"], c["acc"], marker="o", ms=2.5, **kw)
        else:
          ax.plot(c["epoch"], c["acc"], marker="o", ms=2.5, **kw)
          if _has_std(c):
            _std_band(ax, c, "epoch", kw["color"], None)
          elif c["min"] != c["max"]:
            ax.fill_between(c["epoch"], c["min"], c["max"], alpha=0.1,
                            color=kw["color"], lw=0)
      if x_key == "epoch":
        _integer_ticks(ax)
      if x_key == "bytes_up":
        if any(not _zero_upload(curves[r["name"]]) for r in runs
               if r["column"] == col["key"]):
          ax.set_xscale("log")
      ax.set_title(col["label"], fontsize=10)
      ax.set_xlabel(xlabel)
      ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    handles, labels = [], []
    for ax in axes[0]:
      for h, l in zip(*ax.get_legend_handles_labels()):
        if l not in labels:
          handles.append(h)
          labels.append(l)
    fig.legend(handles, labels, loc="center right", fontsize=8,
               frameon=False)
    title = manifest.get("title")
    if title:
      fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - legend_w / (5.2 * ncol + legend_w), 1))
    paths.append(_save(plt, fig, os.path.join(workdir, name), dpi))
  return paths


def plot(workdir: str, dpi: int = 120) -> list[str]:
  """Redraws the figures of a run or sweep directory; returns their paths."""
  if not os.path.isdir(workdir):
    raise PlotError(f"{workdir} is not a directory.")
  if os.path.exists(os.path.join(workdir, METRICS)):
    return plot_run(workdir, dpi)
  if os.path.exists(os.path.join(workdir, CONFIG)):
    raise PlotError(f"{os.path.join(workdir, METRICS)} does not exist yet; "
                    "nothing to plot.")
  return plot_sweep(workdir, dpi=dpi)
