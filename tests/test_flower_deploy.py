"""DSSGD over Flower's deployment engine, on 127.0.0.1.

A module fixture starts a real SuperLink (TLS, SuperNode authentication, a
state database) and three participants with registered keys, each one warm
process (``python -m dssgd_jax.flower participant``: its SuperNode and its
app in one process), all started with the documented commands, each in its
own process group with a hard timeout, all killed at the end. A fourth
participant, whose key is not registered, is started beside them and is
refused while the others run. Then, on the bundled digits:

* round robin, two epochs: the server's parameters (its checkpoint) and the
  participants' metrics equal the simulation's with the same flags and seed;
  the bytes on the wire are measured beside the simulation's
  ``bytes_up``/``bytes_down``;
* parallel (θd = 0.5), three epochs: the server (SuperLink and ServerApp) is
  killed after epoch 1 and restarted with the same command; the run resumes
  from its checkpoint, and its first two epochs equal the simulation's
  (server parameters and participants' metrics); then one participant is
  killed: the run completes and its missed epoch is a lost upload;
* asynchronous, three epochs: each upload applied on arrival, the arrival
  order recorded; replaying it in simulation gives the server's parameters;
  then a participant is stopped and started again in the middle of a run,
  which completes, the participant's missed arrivals recorded;
* ``stop`` ends a run, and Ctrl-C on ``run`` does too, with no process left.

Each run is bounded by a timeout.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("flwr")
if shutil.which("flower-superlink") is None:
  pytest.skip("Flower's command-line tools are not installed",
              allow_module_level=True)

from dssgd_jax.run import build  # pylint: disable=g-import-not-at-top
from dssgd_jax.run import config as config_lib  # pylint: disable=g-import-not-at-top
from dssgd_jax.run import experiment  # pylint: disable=g-import-not-at-top


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 3
FLAGS = ("--dataset=digits --model=digits_mlp --num_participants=3 "
         "--samples_per_participant=40 --batch_size=10 --learning_rate=0.1 "
         f"--upload_fraction=0.1 --seed={SEED} --progress=false")
RUN_TIMEOUT = 600
# How long the server waits for a participant's reply. Generous: the test
# shares the machine's cores with the rest of the suite, and a reply is a new
# process (imports, compilation cache) that can take tens of seconds then. The
# restarted run waits RESTART_REPLY_TIMEOUT for the participant killed in it.
REPLY_TIMEOUT = 180
RESTART_REPLY_TIMEOUT = 90
MARKER = "DSSGD_FLOWER_TEST"  # in the environment of every process started


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Cluster:
  """SuperLink + SuperNodes as process groups, all stopped by ``close``."""

  def __init__(self, root, env):
    self.root = root
    self.env = env
    self.procs = {}
    self.address = f"127.0.0.1:{_free_port()}"
    self.tls = os.path.join(root, "tls")
    self.ca = os.path.join(self.tls, "ca.crt")

  def cli(self, *args, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "dssgd_jax.flower", *args],
                          env=self.env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, **kw)

  def cli_async(self, *args):
    return subprocess.Popen(
        [sys.executable, "-m", "dssgd_jax.flower", *args], env=self.env,
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  def start(self, name, *args):
    log = open(os.path.join(self.root, f"{name}.log"), "w")
    self.procs[name] = subprocess.Popen(
        ["timeout", "-k", "5", "1200", sys.executable, "-m",
         "dssgd_jax.flower", *args], env=self.env, cwd=REPO, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)

  def kill(self, name):
    p = self.procs.pop(name, None)
    if p is None:
      return
    try:
      os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    p.wait(timeout=30)

  def log(self, name):
    with open(os.path.join(self.root, f"{name}.log")) as f:
      return f.read()

  def start_superlink(self):
    self.start("superlink", "superlink", f"--address={self.address}",
               f"--tls={self.tls}", f"--state={self.root}/superlink_state")
    deadline = time.time() + 60
    host, port = self.address.split(":")
    while time.time() < deadline:
      with socket.socket() as s:
        if s.connect_ex((host, int(port))) == 0:
          return
      time.sleep(0.5)
    raise AssertionError("the SuperLink did not start:\n" +
                         self.log("superlink"))

  def participant_args(self, i, key):
    return ["participant", f"--superlink={self.address}", f"--ca={self.ca}",
            f"--key={key}", f"--partition_id={i}",
            f"--state_dir={self.root}/p{i}", f"--seed={SEED}",
            # Runs without noise, compared with the simulation's metrics:
            # these participants opt out of the protective defaults.
            "--allow_no_guarantee", "--report_metrics"]

  def wait_for_participants(self, n, timeout=120):
    """Until ``status`` lists n participants online."""
    deadline = time.time() + timeout
    while time.time() < deadline:
      out = self.cli("status", f"--superlink={self.address}",
                     f"--ca={self.ca}", timeout=60)
      m = re.search(r"\((\d+) online", out.stdout)
      if out.returncode == 0 and m and int(m.group(1)) >= n:
        return
      time.sleep(1.0)
    raise AssertionError(f"{n} participants never came online: "
                         + out.stdout + out.stderr)

  def run(self, workdir, extra, reply_timeout=REPLY_TIMEOUT,
          background=False):
    args = ["run", f"--superlink={self.address}", f"--ca={self.ca}",
            f"--flwr_home={self.root}/home_run",
            f"--flags={FLAGS} --workdir={workdir} {extra}",
            f"--reply_timeout={reply_timeout}", "--connect_timeout=90"]
    if background:
      self.start("run", *args)
      return None
    return self.cli(*args, timeout=RUN_TIMEOUT)

  def close(self):
    for name in list(self.procs):
      self.kill(name)
    # Flower starts some helpers (flower-superexec) in sessions of their
    # own: find every process that inherited this cluster's marker.
    marker = f"{MARKER}={self.env[MARKER]}".encode()
    for pid in os.listdir("/proc"):
      if not pid.isdigit() or int(pid) == os.getpid():
        continue
      try:
        with open(f"/proc/{pid}/environ", "rb") as f:
          if marker in f.read().split(b"\0"):
            os.kill(int(pid), signal.SIGKILL)
      except OSError:
        pass


def _all_ok(procs):
  """Waits for concurrent CLI calls; each must exit 0."""
  for p in procs:
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("flower"))
  env = dict(os.environ, JAX_PLATFORMS="cpu", FLWR_TELEMETRY_ENABLED="0",
             FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=1").strip(),
             **{MARKER: f"{os.getpid()}-{time.time()}"})
  c = Cluster(root, env)
  try:
    keys = [os.path.join(root, "keys", f"p{i}") for i in range(4)]
    _all_ok([c.cli_async("tls", c.tls)] +
            [c.cli_async("key", k) for k in keys])
    c.start_superlink()
    _all_ok([c.cli_async("register", k + ".pub", f"--superlink={c.address}",
                         f"--ca={c.ca}", f"--flwr_home={root}/home_reg{i}")
             for i, k in enumerate(keys[:3])])  # p3's key is never registered
    for i in range(3):
      c.start(f"node{i}", *c.participant_args(i, keys[i]))
    c.keys = keys
    c.wait_for_participants(3)
    yield c
  finally:
    c.close()


def _simulate(tmp_path, extra: str):
  argv = (FLAGS + " " + extra).split()
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  config_lib.define_flags(fv)
  fv(["sim"] + argv + [f"--workdir={tmp_path}"])
  cfg = config_lib.from_flags(fv)
  experiment.run(cfg)
  return cfg


def _metrics(workdir):
  with open(os.path.join(workdir, experiment.METRICS)) as f:
    return [json.loads(l) for l in f if l.strip()]


def _server_params(workdir):
  with np.load(os.path.join(workdir, experiment.CHECKPOINT)) as z:
    # The simulation stores the run's state, the deployed server its own.
    name = next(n for n in ("state.protocol.server.params",
                            "state['server'].params") if n in z.files)
    return z[name], int(z["epoch"])


def _assert_same_run(deployed, simulated):
  params, epoch = _server_params(deployed)
  sim_params, sim_epoch = _server_params(simulated)
  assert epoch == sim_epoch
  np.testing.assert_allclose(params, sim_params, rtol=1e-5, atol=1e-6)
  dep, sim = _metrics(deployed), _metrics(simulated)
  assert [r["epoch"] for r in dep] == [r["epoch"] for r in sim]
  for a, b in zip(dep, sim):
    for k in ("participant_accuracy_mean", "participant_accuracy_min",
              "participant_accuracy_max", "server_accuracy", "train_loss",
              "uploaded_entries", "downloaded_entries", "bytes_up",
              "bytes_down", "lost_uploads"):
      if b[k] is None:
        assert a[k] is None, k
      else:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (k, a, b)
    assert a["missing"] == []
    # Measured bytes: the payload plus Flower's framing of the records.
    assert b["bytes_up"] <= a["wire_bytes_up"] <= 1.2 * b["bytes_up"] + 4096
    assert b["bytes_down"] <= a["wire_bytes_down"]


def _start_unregistered(cluster):
  """A participant whose key was never registered (checked at the end: it
  must be refused while the registered ones run)."""
  cluster.start("unregistered", *cluster.participant_args(3, cluster.keys[3]),
                "--activation_retry=5")


def _check_refused(cluster):
  p = cluster.procs["unregistered"]
  assert p.wait(timeout=120) == 2
  log = cluster.log("unregistered")
  assert "Failed to activate SuperNode" in log, log[-3000:]
  # It cannot tell at first a key never registered from one whose earlier
  # session is still marked online: it says so, retries, then says which.
  assert "still marks its earlier session online" in log, log[-3000:]
  assert "it is not registered" in log and "Traceback" not in log, log[-3000:]
  cluster.procs.pop("unregistered")


def _check_same_as_simulation(cluster, tmp_path, protocol, extra):
  extra = f"--protocol={protocol} --epochs=2 {extra}"
  workdir = tmp_path / f"deployed_{protocol}"
  out = cluster.run(workdir, extra)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  sim = _simulate(tmp_path / f"sim_{protocol}", extra)
  _assert_same_run(workdir, sim.workdir)
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["deployment"] == "flower" and summary["epochs"] == 2


def _wait_for_epoch(workdir, epoch, timeout=RUN_TIMEOUT):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(os.path.join(workdir, experiment.METRICS)) and any(
        r["epoch"] >= epoch for r in _metrics(workdir)):
      return
    time.sleep(0.5)
  raise AssertionError(f"{workdir} never reached epoch {epoch}")


def _checkpoint_epoch(workdir):
  try:
    return _server_params(workdir)[1]
  except (OSError, KeyError, ValueError):
    return 0


def _check_parallel_with_faults(cluster, tmp_path):
  """Parallel, θd = 0.5: the server is killed after epoch 1 and restarted
  with the same command; epochs 1-2 must be the simulation's (server
  parameters, participants' accuracies); then participant 2 is killed and
  its epoch 3 is a lost upload."""
  extra = ("--protocol=parallel --download_fraction=0.5 --epochs=3 "
           "--eval_every=2")
  workdir = tmp_path / "deployed_parallel"
  cluster.run(workdir, extra, background=True)
  _wait_for_epoch(workdir, 1)
  cluster.kill("superlink")  # the SuperLink and the ServerApp it started
  cluster.kill("run")
  assert _metrics(workdir)[-1]["epoch"] == 1
  cluster.start_superlink()  # same database: the registered participants
  cluster.run(workdir, extra, reply_timeout=RESTART_REPLY_TIMEOUT,
              background=True)
  deadline = time.time() + RUN_TIMEOUT
  while _checkpoint_epoch(workdir) < 2 and time.time() < deadline:
    time.sleep(0.2)
  shutil.copy(workdir / experiment.CHECKPOINT, tmp_path / "epoch2.npz")
  cluster.kill("node2")
  _wait_for_epoch(workdir, 3)
  p = cluster.procs.pop("run")
  assert p.wait(timeout=120) == 0, cluster.log("run")[-3000:]
  assert "resuming" in cluster.log("run")
  rows = _metrics(workdir)
  assert [r["epoch"] for r in rows] == [1, 2, 3]
  assert [r["missing"] for r in rows] == [[], [], [2]], _tails(cluster)
  assert [r["lost_uploads"] for r in rows] == [0, 0, 1]
  assert rows[-1]["participant_accuracy_mean"] is not None  # 2 evaluated
  # Up to the lost upload, across the restart, the simulation's run.
  sim = _simulate(tmp_path / "sim_parallel",
                  extra.replace("--epochs=3", "--epochs=2"))
  os.makedirs(tmp_path / "upto2")
  shutil.copy(tmp_path / "epoch2.npz",
              tmp_path / "upto2" / experiment.CHECKPOINT)
  with open(tmp_path / "upto2" / experiment.METRICS, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows[:2])
  _assert_same_run(tmp_path / "upto2", sim.workdir)


def _tails(cluster, chars=1500):
  """The end of every process's log, for a failure's message."""
  return "\n".join(f"--- {name}:\n{cluster.log(name)[-chars:]}"
                   for name in ("run", "node0", "node1", "node2"))


def _check_back(cluster):
  """Participant 2, killed hard in the parallel run, is started again: it
  signs in again (retrying while the SuperLink still marks its earlier
  session online, if it does) and comes back."""
  cluster.start("node2", *cluster.participant_args(2, cluster.keys[2]))
  cluster.wait_for_participants(3, timeout=150)


def _replayed(tmp_path, name, extra, order):
  """The simulation of an asynchronous run's recorded arrival order."""
  import jax  # pylint: disable=g-import-not-at-top
  from dssgd_jax import protocols  # pylint: disable=g-import-not-at-top
  from dssgd_jax.flower import server_app  # pylint: disable=g-import-not-at-top
  cfg = server_app.participant_config(server_app.parse_flags(
      f"{FLAGS} --workdir={tmp_path / name} {extra}"))
  train_key = jax.random.split(jax.random.key(cfg.seed))[1]
  replay = lambda update, download, agg, axis, plan: protocols.arrivals(
      update, download, np.asarray(order), train_key, aggregation=agg,
      stat_decay=plan.stat_decay, decay_every=plan.decay_every)
  experiment.run(build.plan(cfg).replace(protocol=replay),
                 log=lambda m: None)
  return tmp_path / name


def _check_async(cluster, tmp_path):
  """Asynchronous: the recorded arrival order, replayed, is the run; then
  a participant stopped and started again in the middle of a run."""
  extra = "--protocol=async --epochs=3 --download_fraction=0.5 --eval_every=3"
  workdir = tmp_path / "deployed_async"
  out = cluster.run(workdir, extra)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  rows = _metrics(workdir)
  order = [r["arrivals"] for r in rows]
  assert [len(o) for o in order] == [3, 3, 3]
  assert all(len(r["staleness"]) == 3 for r in rows)
  sim = _replayed(tmp_path, "sim_async", extra, order)
  np.testing.assert_allclose(_server_params(workdir)[0],
                             _server_params(sim)[0], rtol=1e-5, atol=1e-6)
  # Participant 1 stops (SIGTERM: it signs off) after the first block and
  # starts again: the others go on, and it comes back into the run.
  workdir = tmp_path / "deployed_async_restart"
  epochs = 60
  cluster.run(workdir, extra.replace("--epochs=3", f"--epochs={epochs}"),
              reply_timeout=60, background=True)
  _wait_for_epoch(workdir, 1)
  p = cluster.procs.pop("node1")
  os.kill(_children(p.pid)[0], signal.SIGTERM)  # the participant, not `timeout`
  assert p.wait(timeout=60) == 0, cluster.log("node1")[-2000:]
  assert "participant 1 stopped" in cluster.log("node1")
  _wait_for_epoch(workdir, 3)
  cluster.start("node1", *cluster.participant_args(1, cluster.keys[1]))
  run = cluster.procs.pop("run")
  assert run.wait(timeout=RUN_TIMEOUT) == 0, cluster.log("run")[-3000:]
  rows = _metrics(workdir)
  assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
  took_part = [1 in r["arrivals"] for r in rows]
  gone = took_part.index(False)
  assert any(took_part[gone:]), took_part  # gone, then back


def _check_stop_and_ctrl_c(cluster, tmp_path):
  """`stop` ends a run; Ctrl-C on `run` stops its run; nothing is left."""
  extra = "--protocol=round_robin --epochs=200"
  workdir = tmp_path / "stopped"
  cluster.run(workdir, extra, background=True)
  _wait_for_epoch(workdir, 1)
  out = cluster.cli("stop", f"--superlink={cluster.address}",
                    f"--ca={cluster.ca}")
  assert out.returncode == 0 and "Stopped run" in out.stdout, out.stderr
  run = cluster.procs.pop("run")
  assert run.wait(timeout=120) != 0
  assert "finished:stopped" in cluster.log("run")
  # Ctrl-C: the run is stopped, `run` exits with 130.
  workdir = tmp_path / "interrupted"
  run = cluster.cli_async("run", f"--superlink={cluster.address}",
                          f"--ca={cluster.ca}",
                          f"--flags={FLAGS} --workdir={workdir} {extra}")
  _wait_for_epoch(workdir, 1)
  run.send_signal(signal.SIGINT)
  out, _ = run.communicate(timeout=120)
  assert run.returncode == 130, out[-2000:]
  assert "was stopped" in out and "Traceback" not in out
  status = cluster.cli("status", f"--superlink={cluster.address}",
                       f"--ca={cluster.ca}")
  assert "running" not in status.stdout, status.stdout
  flwr_runs = [pid for pid in os.listdir("/proc") if pid.isdigit() and
               _cmdline(pid).startswith("flwr run")]
  assert not flwr_runs


def _children(pid):
  with open(f"/proc/{pid}/task/{pid}/children") as f:
    return [int(c) for c in f.read().split()]


def _cmdline(pid):
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return f.read().replace(b"\0", b" ").decode(errors="replace")
  except OSError:
    return ""


@pytest.mark.slow(seconds=360)
def test_deployment_end_to_end(cluster, tmp_path):
  # One test (one cluster, one pytest-xdist worker), in this order: the
  # participant killed hard in the parallel run comes back a minute later.
  _start_unregistered(cluster)
  _check_same_as_simulation(cluster, tmp_path, "round_robin",
                            "--eval_every=2")
  _check_refused(cluster)
  _check_parallel_with_faults(cluster, tmp_path)
  _check_back(cluster)
  _check_async(cluster, tmp_path)
  _check_stop_and_ctrl_c(cluster, tmp_path)
