r"""Scale: one DSSGD epoch from 1 to 1,024 participants on one device.

Usage::

  python -m dssgd_jax.bench_scale                       # 1, 2, 4, ..., 1024
  python -m dssgd_jax.bench_scale --max_participants=64 --plot=/tmp/scale.png

For each participant count P it builds the ``parallel`` protocol's jitted
epoch for ``mnist_mlp`` (109,386 parameters; download θd = 1, one local epoch
of SGD at batch 32 over ``--samples`` examples each, ``largest`` θu = 0.1,
server update) and reports the median seconds per epoch, the samples/s, and
the peak memory of the epoch program: XLA's own figure (arguments + outputs
+ temporaries - donated aliases, from ``compiled.memory_analysis()``) and, on
GPU/TPU, the device allocator's peak. The data are random MNIST-shaped
images (timing does not depend on their values). The last line is a JSON
object; ``--plot`` writes a PNG of time and memory against P (matplotlib).
"""

import argparse
import json
import statistics
import sys

import jax

from dssgd_jax.tools import bench
from dssgd_jax import models as models_lib
from dssgd_jax import protocols


def device_peak_bytes():
  """The default device's allocator peak, where the backend reports one."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return None if not stats else stats.get("peak_bytes_in_use")


def participant_counts(max_participants: int) -> list[int]:
  """1, 2, 4, ... up to ``max_participants`` (included).

  >>> participant_counts(10)
  [1, 2, 4, 8, 10]
  """
  out, p = [], 1
  while p < max_participants:
    out.append(p)
    p *= 2
  return out + [max_participants]


def plot(rows: list[dict], path: str, title: str) -> None:
  """Seconds per epoch and peak memory against participants (log-log)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
  p = [r["participants"] for r in rows]
  a.plot(p, [r["epoch_s"] for r in rows], "o-")
  a.set_xlabel("participants")
  a.set_ylabel("seconds per epoch")
  a.grid(True, which="both", alpha=0.3)
  mem = [r["xla_peak_mb"] for r in rows]
  if all(m is not None for m in mem):
    b.plot(p, mem, "o-", label="XLA program peak")
  dev = [r["device_peak_mb"] for r in rows]
  if all(m is not None for m in dev):
    b.plot(p, dev, "s--", label="device allocator peak")
  for ax in (a, b):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
  b.set_xlabel("participants")
  b.set_ylabel("peak memory (MB)")
  b.grid(True, which="both", alpha=0.3)
  b.legend()
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="mnist_mlp",
                 choices=sorted(models_lib.MODELS))
  p.add_argument("--max_participants", type=int, default=1024)
  p.add_argument("--samples", type=int, default=64,
                 help="examples per participant")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--participant_axis", default="auto",
                 choices=("auto", "vmap", "map"))
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--plot", default=None, help="write a PNG here")
  p.add_argument("--replot", default=None, metavar="JSON",
                 help="only redraw --plot from the JSON line of an earlier run "
                 "(a file holding it)")
  args = p.parse_args(argv)
  if args.max_participants < 1:
    p.error("--max_participants must be at least 1")
  if args.replot:
    if not args.plot:
      p.error("--replot needs --plot")
    with open(args.replot) as f:
      last = [line for line in f if line.startswith("{")][-1]
    run = json.loads(last)
    plot(run["rows"], args.plot, _title(run))
    print(f"plot: {args.plot}")
    return
  lowering = args.participant_axis
  if lowering == "auto":
    lowering = protocols.auto_lowering(args.model)
  print(f"dssgd_jax.bench_scale: {args.model}, {args.samples} examples per "
        f"participant, batch {args.batch_size}, participant axis {lowering}, "
        f"backend {jax.default_backend()}", flush=True)
  print(f"{'participants':>12s}{'epoch s':>10s}{'samples/s':>12s}"
        f"{'compile s':>11s}{'XLA MB':>10s}{'device MB':>11s}", flush=True)
  rows = []
  for num in participant_counts(args.max_participants):
    workload = bench.Workload(args.model, num, args.samples, args.batch_size,
                              models_lib.auto_conv_impl())
    run, compile_s, _, peak = workload.build_axis(lowering)  # warmed up
    secs = statistics.median(run() for _ in range(args.repeats))
    dev = device_peak_bytes()
    row = {"participants": num, "epoch_s": secs,
           "samples_per_s": num * args.samples / secs, "compile_s": compile_s,
           "xla_peak_mb": None if peak is None else peak / 2 ** 20,
           "device_peak_mb": None if dev is None else dev / 2 ** 20}
    rows.append(row)
    fmt = lambda x: "n/a" if x is None else f"{x:.1f}"  # pylint: disable=unnecessary-lambda-assignment
    print(f"{num:>12d}{secs:>10.3f}{row['samples_per_s']:>12.0f}"
          f"{compile_s:>11.1f}{fmt(row['xla_peak_mb']):>10s}"
          f"{fmt(row['device_peak_mb']):>11s}", flush=True)
    del run, workload
  run = {"model": args.model, "participant_axis": lowering,
         "backend": jax.default_backend(), "samples": args.samples,
         "batch_size": args.batch_size, "rows": rows}
  if args.plot:
    plot(rows, args.plot, _title(run))
    print(f"plot: {args.plot}")
  print(json.dumps(run))


def _title(run: dict) -> str:
  return (f"One DSSGD epoch ({run['model']}, parallel, {run['samples']} "
          f"examples/participant, batch {run.get('batch_size', 32)}, "
          f"{run['backend']}, participant axis {run['participant_axis']})")


if __name__ == "__main__":
  main(sys.argv[1:])
