r"""What a deployed participant's visit costs, and where the time goes.

Starts a SuperLink and N participants on this machine (``--insecure``, free
ports), runs a round-robin DSSGD run over Flower, and reads each epoch's
wall time from the server's ``metrics.jsonl``; the same flags are run in
simulation (``python -m dssgd_jax.main``) for the overhead. Two ways of
running a participant, side by side in one invocation:

* ``warm``: ``python -m dssgd_jax.flower participant`` (this package): one
  process per participant, its SuperNode in process isolation, every
  message handled in that process (``dssgd_jax.flower.executor``), short
  polls;
* ``per_message``: Flower's stock path, ``flower-supernode`` starting a
  fresh ``flwr-clientapp`` process for every message (what the project did
  before), with Flower's polls.

Usage::

  python benchmarks/deploy_visits.py --participants=10 --epochs=4
  python benchmarks/deploy_visits.py --participants=30 --epochs=3 \
      --modes=warm --flags="--dataset=fashion_mnist --data_source=files \
      --data_dir=/usr/share/datasets/fashion-mnist --model=mnist_cnn \
      --samples_per_participant=600"

Prints, per mode: the median epoch time after the first (which compiles),
per participant visit, the simulated epoch's time, and the overhead
(deployed minus simulated), and for ``warm`` the median time a participant
spent handling a message and computing in it. The last line is JSON.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BASE_FLAGS = ("--dataset=digits --model=digits_cnn --samples_per_participant=100 "
              "--batch_size=16 --learning_rate=0.05 --upload_fraction=0.1 "
              "--seed=0 --progress=false --protocol=round_robin")
ENV = dict(os.environ, FLWR_TELEMETRY_ENABLED="0",
           FLWR_DISABLE_UPDATE_CHECK="1", JAX_PLATFORMS="cpu")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _flower(*args, **kw):
  return [sys.executable, "-m", "dssgd_jax.flower", *args]


def _wait_online(address, n, timeout=600):
  deadline = time.time() + timeout
  while time.time() < deadline:
    out = subprocess.run(_flower("status", "--insecure",
                                 f"--superlink={address}"), env=ENV,
                         capture_output=True, text=True, check=False)
    m = re.search(r"\((\d+) online", out.stdout)
    if m and int(m.group(1)) >= n:
      return
    time.sleep(1.0)
  raise SystemExit(f"{n} participants did not come online in {timeout} s")


def _median_after_first(rows):
  times = [r["wall_time_s"] for r in rows[1:]] or [rows[0]["wall_time_s"]]
  return statistics.median(times)


def run_mode(mode, n, epochs, flags, root):
  port = _free_port()
  address = f"127.0.0.1:{port}"
  procs = []
  logs = []

  def start(cmd, name, env=ENV):
    log = open(os.path.join(root, f"{mode}_{name}.log"), "w")
    logs.append(log.name)
    procs.append(subprocess.Popen(cmd, env=env, stdout=log,
                                  stderr=subprocess.STDOUT,
                                  start_new_session=True))

  try:
    start(_flower("superlink", "--insecure", f"--address={address}",
                  f"--state={root}/{mode}_superlink"), "superlink")
    time.sleep(3)
    for i in range(n):
      state = f"{root}/{mode}_p{i}"
      if mode == "warm":
        start(_flower("participant", "--insecure", f"--superlink={address}",
                      f"--partition_id={i}", f"--state_dir={state}",
                      "--allow_no_guarantee", "--verbose"), f"p{i}")
      else:
        node = (f'partition-id={i} state-dir="{state}" '
                'require-guarantee=false')
        start(["flower-supernode", "--insecure", "--superlink", address,
               "--node-config", node, "--port", str(_free_port())], f"p{i}",
              env=dict(ENV, FLWR_HOME=f"{state}_home"))
    _wait_online(address, n)
    workdir = f"{root}/{mode}_run"
    t0 = time.time()
    out = subprocess.run(_flower(
        "run", "--insecure", f"--superlink={address}", "--no-server_eval",
        f"--flags={flags} --num_participants={n} --epochs={epochs} "
        f"--workdir={workdir}", "--connect_timeout=600",
        "--reply_timeout=900"), env=ENV, capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
      raise SystemExit(f"{mode} run failed:\n{out.stdout[-3000:]}"
                       f"{out.stderr[-3000:]}")
    total = time.time() - t0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(l) for l in f]
    res = {"mode": mode, "participants": n, "epochs": epochs,
           "run_s": total, "first_epoch_s": rows[0]["wall_time_s"],
           "epoch_s": _median_after_first(rows)}
    res["visit_s"] = res["epoch_s"] / n
    if mode == "warm":
      handled, computing = [], []
      for path in logs[1:]:
        with open(path) as f:
          for line in f:
            m = re.search(r"train message handled in ([\d.]+)s \(([\d.]+)s "
                          "computing\)", line)
            if m:
              handled.append(float(m.group(1)))
              computing.append(float(m.group(2)))
      # The first visit of each participant compiles: leave it out.
      res["handled_s"] = statistics.median(handled[n:] or handled)
      res["computing_s"] = statistics.median(computing[n:] or computing)
    return res
  finally:
    for p in procs:
      try:
        os.killpg(p.pid, signal.SIGTERM)
      except ProcessLookupError:
        pass
    for p in procs:
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)


def simulate(n, epochs, flags, root):
  workdir = f"{root}/simulated"
  out = subprocess.run(
      [sys.executable, "-m", "dssgd_jax.main", *flags.split(),
       f"--num_participants={n}", f"--epochs={epochs}", f"--workdir={workdir}",
       "--eval_every=1000"], env=ENV, capture_output=True, text=True,
      check=False)
  if out.returncode != 0:
    raise SystemExit(f"simulation failed: {out.stderr[-2000:]}")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return _median_after_first([json.loads(l) for l in f])


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--participants", type=int, default=10)
  p.add_argument("--epochs", type=int, default=4)
  p.add_argument("--modes", default="warm,per_message")
  p.add_argument("--flags", default="", help="run flags added to the base")
  p.add_argument("--keep", action="store_true", help="keep the directory")
  args = p.parse_args()
  flags = f"{BASE_FLAGS} {args.flags}".strip()
  root = tempfile.mkdtemp(prefix="dssgd_visits_")
  try:
    results = []
    sim = simulate(args.participants, args.epochs, flags, root)
    for mode in args.modes.split(","):
      res = run_mode(mode, args.participants, args.epochs, flags, root)
      res["simulated_epoch_s"] = sim
      res["overhead_s"] = res["epoch_s"] - sim
      results.append(res)
      extra = ("" if mode != "warm" else
               f"; a participant handled a message in "
               f"{res['handled_s']:.2f} s, {res['computing_s']:.2f} s of it "
               "computing")
      print(f"{mode:12s} {args.participants} participants: epoch "
            f"{res['epoch_s']:.2f} s (first {res['first_epoch_s']:.1f} s), "
            f"{res['visit_s']:.2f} s per visit; simulated epoch {sim:.3f} s, "
            f"overhead {res['overhead_s']:.2f} s{extra}", flush=True)
    print(json.dumps(results))
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
