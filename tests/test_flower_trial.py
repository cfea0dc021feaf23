"""docs/deployment.md's TLS trial on one machine, run as written.

The commands between ``<!-- trial: begin -->`` and ``<!-- trial: end -->``
are read from the file (as a doctest would) and run with bash from the
repository root, in a process group with a hard timeout; only the
environment differs: ``TMPDIR`` (so ``mktemp -d`` lands in the test's
directory) and ``DSSGD_TRIAL_PORT`` (a free port instead of the documented
9093, which another SuperLink may hold). Checks: the script succeeds, the
run completes its epochs with three participants, `status` lists them, the
ledger a participant printed charges what the run claims, and nothing
started by the trial is left running.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

pytest.importorskip("flwr")
if shutil.which("flower-superlink") is None:
  pytest.skip("Flower's command-line tools are not installed",
              allow_module_level=True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "deployment.md")
TIMEOUT_S = 420


def trial_script() -> str:
  with open(DOC) as f:
    text = f.read()
  m = re.search(r"<!-- trial: begin -->\s*```bash\n(.*?)```\s*"
                r"<!-- trial: end -->", text, re.S)
  assert m, "docs/deployment.md has no trial block"
  return m.group(1)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _processes_mentioning(text):
  out = []
  for pid in os.listdir("/proc"):
    if not pid.isdigit():
      continue
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
      continue
    if text in cmd:
      out.append((int(pid), cmd))
  return out


@pytest.mark.slow(seconds=150)
def test_the_documented_tls_trial_runs_as_written(tmp_path):
  script = trial_script()
  # What the test relies on is in the documented commands themselves.
  assert "tls $T/tls" in script and "--hosts" not in script
  assert "--port" not in script  # three participants, one machine
  port = _free_port()
  env = dict(os.environ, TMPDIR=str(tmp_path), DSSGD_TRIAL_PORT=str(port))
  start = time.time()
  proc = subprocess.Popen(["bash", "-e", "-c", script], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)
  try:
    out, _ = proc.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    pytest.fail(f"the trial did not end within {TIMEOUT_S} s:\n{out[-4000:]}")
  took = time.time() - start
  trial_dirs = [d for d in tmp_path.iterdir() if d.is_dir()]
  assert len(trial_dirs) == 1, trial_dirs
  t = trial_dirs[0]
  logs = "".join(f"\n--- {p.name}\n" + p.read_text()[-2000:]
                 for p in t.glob("*.log"))
  assert proc.returncode == 0, out[-4000:] + logs
  assert "Traceback" not in out

  # The run completed its three epochs with the three participants.
  with open(t / "run" / "metrics.jsonl") as f:
    rows = [json.loads(l) for l in f]
  assert [r["epoch"] for r in rows] == [1, 2, 3]
  assert all(r["num_models"] == 3 and r["missing"] == [] and
             not r["refused"] for r in rows), rows
  with open(t / "run" / "summary.json") as f:
    summary = json.load(f)
  assert summary["epsilon_spent"] == pytest.approx(3.0)
  assert os.path.exists(t / "run" / "accuracy.png")
  # `status` listed the run (completed) and the three participants' nodes.
  assert re.search(r"finished:completed", out), out[-3000:]
  assert out.count("online") >= 3, out[-3000:]
  # The ledger printed by `cat` charges ε = 1 for each epoch the SVT ran.
  entries = [json.loads(l) for l in out.splitlines()
             if l.startswith("{") and '"run_epsilon"' in l]
  assert [e["epoch"] for e in entries] == [1, 2, 3], entries
  assert all(e["charged"] for e in entries)
  assert [e["run_epsilon"] for e in entries] == pytest.approx([1, 2, 3])
  # Nothing the trial started is left running (its processes name $T).
  deadline = time.time() + 30
  while _processes_mentioning(str(t)) and time.time() < deadline:
    time.sleep(1.0)
  left = _processes_mentioning(str(t))
  for pid, _ in left:
    os.kill(pid, signal.SIGKILL)
  assert not left, left
  print(f"trial took {took:.0f} s")
