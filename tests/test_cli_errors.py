"""Bad flags and bad files through the real CLI (``python -m dssgd_jax.main``).

Every case must exit with status 2 and print exactly one line to stderr that
starts with ``error:`` and names the flag or file, with no traceback, and must
leave an existing run in ``--workdir`` byte-for-byte unchanged. Most cases are
caught by ``config.validate`` before JAX is even imported.
"""

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from dssgd_jax.run import experiment

from cli_helpers import ForkedCli
from cli_helpers import jit_env as _jit_env
from cli_helpers import session_dir as _session_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE = ["--dataset=digits", "--model=digits_mlp", "--num_participants=4",
        "--samples_per_participant=50", "--batch_size=10",
        "--learning_rate=0.1", "--eval_examples=120", "--epochs=2",
        "--noprogress"]

# (flags added after BASE, text the one-line message must contain).
BAD_FLAGS = [
    (["--upload_fraction=1.5"], "--upload_fraction"),
    (["--download_fraction=-0.1"], "--download_fraction"),
    (["--upload_loss=2"], "--upload_loss"),
    (["--learning_rate=0"], "--learning_rate"),
    (["--learning_rate=-0.01"], "--learning_rate"),
    (["--batch_size=0"], "--batch_size"),
    (["--batch_size=51"], "--batch_size"),
    (["--epochs=0"], "--epochs"),
    (["--num_participants=0"], "--num_participants"),
    (["--num_participants=100"], "--num_participants"),  # 5,000 > 1,437
    (["--samples_per_participant=-5"], "--samples_per_participant"),
    (["--threshold=-1"], "--threshold"),
    (["--stat_decay=0"], "--stat_decay"),
    (["--clip_bound=0"], "--clip_bound"),
    (["--dataset=imagenet"], "--dataset"),
    (["--model=resnet50"], "--model"),
    (["--algorithm=sgd"], "--algorithm"),
    (["--protocol=gossip"], "--protocol"),
    (["--selection=smallest"], "--selection"),
    (["--noise=uniform"], "--noise"),
    (["--partition=random"], "--partition"),
    (["--download_rule=oldest"], "--download_rule"),
    (["--noise=svt"], "--epsilon"),
    (["--noise=svt", "--epsilon=1"], "--clip_bound"),
    (["--epsilon=1"], "--epsilon"),
    (["--noise=laplace"], "--noise_scale"),
    (["--algorithm=fedavg", "--protocol=async"], "--protocol"),
    (["--algorithm=standalone", "--noise=laplace", "--noise_scale=1"],
     "--noise"),
    (["--protocol=async", "--algorithm=centralized"], "--protocol=async"),
    (["--batch_size=abc"], "--batch_size"),
    (["--learning_rate=fast"], "--learning_rate"),
    (["--no_such_flag=1"], "no_such_flag"),
    (["--flagfile=/no/such/preset.cfg"], "/no/such/preset.cfg"),
    (["leftover_argument"], "leftover_argument"),
    # Issue "Runs that never crash": each of these was a traceback.
    (["--model=mnist_cnn"], "--model=mnist_cnn"),
    (["--model=svhn_cnn"], "--dataset=digits"),
    (["--seed=-1"], "--seed"),
    (["--seed=100000000000000000000"], "--seed"),
    (["--learning_rate=inf"], "must be finite"),
    (["--learning_rate=nan"], "must be finite"),
    (["--eval_examples=100000"], "--eval_examples"),
    (["--progress=maybe"], "--progress"),
    (["--epochs=1.5"], "--epochs"),
    # Issue "Every flag means what it says": unread flags are rejected.
    (["--download_fraction=0.1", "--download_rule=all"], "--download_rule"),
    (["--noise=svt", "--epsilon=1", "--clip_bound=0.1", "--l2_clip=1"],
     "--l2_clip"),
    (["--staleness=uniform"], "--staleness"),
    (["--protocol=async"], "--max_staleness"),
    (["--algorithm=fedavg", "--upload_fraction=0.5"], "--upload_fraction"),
    (["--algorithm=fedavg", "--noise=svt", "--epsilon=1", "--clip_bound=1"],
     "--noise=svt"),
    (["--decay_every=2"], "--decay_every"),
    (["--delta=1e-6"], "--delta"),
    # Contradicting the finished run in --workdir (not resumable changes).
    (["--seed=1"], "--seed"),
    (["--algorithm=standalone"], "--algorithm"),
]


def _snapshot(path):
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      p = os.path.join(root, name)
      with open(p, "rb") as f:
        out[os.path.relpath(p, path)] = hashlib.sha256(f.read()).hexdigest()
  return out


_FORKED = []


@pytest.fixture(scope="module", autouse=True)
def _fork_server():
  with ForkedCli("dssgd_jax.main", _jit_env()) as server:
    _FORKED.append(server)
    yield
    _FORKED.pop()


def _cli(args, timeout=300):
  """``python -m dssgd_jax.main ARGS``: its own process, forked from a server
  that has done the imports (cli_helpers.ForkedCli);
  test_the_real_entry_point_gives_the_same_error runs the real command."""
  return _FORKED[0](args, cwd=REPO, timeout=timeout)


def _real_cli(args, timeout=300):
  return subprocess.run([sys.executable, "-m", "dssgd_jax.main", *args],
                        capture_output=True, text=True, cwd=REPO,
                        env=_jit_env(), timeout=timeout)


def _assert_one_line_error(out, must_contain):
  assert out.returncode == 2, (out.returncode, out.stderr)
  assert "Traceback" not in out.stderr + out.stdout, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1, out.stderr
  assert lines[0].startswith("error:"), lines[0]
  assert must_contain in lines[0], lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A finished 2-epoch run (real, through the CLI; one per session)."""
  root = _session_dir(tmp_path_factory, "cli_errors_finished")
  workdir = root / "run"
  with open(root / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (workdir / "summary.json").exists():
      out = _cli([*BASE, f"--workdir={workdir}"])
      assert out.returncode == 0, out.stderr
  return workdir


@pytest.mark.parametrize("flags,must_contain", BAD_FLAGS,
                         ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag(flags, must_contain, finished_run):
  before = _snapshot(finished_run)
  out = _cli([*BASE, f"--workdir={finished_run}", *flags])
  _assert_one_line_error(out, must_contain)
  assert _snapshot(finished_run) == before


def test_epochs_below_what_the_workdir_holds(finished_run):
  before = _snapshot(finished_run)
  out = _cli([*BASE, f"--workdir={finished_run}", "--epochs=1"])
  _assert_one_line_error(out, "Nothing was run")
  assert "--epochs=1" in out.stderr and "2 epochs" in out.stderr
  assert _snapshot(finished_run) == before


def test_unwritable_workdir():
  # /proc/self exists but nothing can be created in it, even by root.
  _assert_one_line_error(_cli([*BASE, "--workdir=/proc/self"]),
                         "--workdir=/proc/self")


@pytest.mark.slow(seconds=25)
def test_workdir_without_a_completed_epoch_accepts_new_flags(tmp_path):
  # A run that failed in epoch 1 (no checkpoint) holds nothing to protect:
  # the corrected command runs there.
  out = _cli([*BASE, f"--workdir={tmp_path}", "--learning_rate=1e12"])
  _assert_one_line_error(out, "Epoch 1")
  out = _cli([*BASE, f"--workdir={tmp_path}", "--epochs=1"])
  assert out.returncode == 0, out.stderr
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["learning_rate"] == 0.1


@pytest.mark.slow(seconds=20)
def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
  # SIGINT while epochs run: one line naming the last checkpoint, status 130,
  # and the same command resumes.
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  flags = [*BASE, f"--workdir={tmp_path}", "--epochs=100000", "--progress"]
  proc = subprocess.Popen([sys.executable, "-m", "dssgd_jax.main", *flags],
                          cwd=REPO, env=_jit_env(),
                          stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while time.time() < deadline and not (tmp_path / "checkpoint.npz").exists():
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  try:
    _, err = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 130, err[-2000:]
  assert "Traceback" not in err
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: Interrupted during epoch "), last
  assert "the last checkpoint" in last and "rerun the same command" in last
  with open(tmp_path / "metrics.jsonl") as f:
    epochs = [json.loads(l)["epoch"] for l in f]
  assert epochs == list(range(1, len(epochs) + 1))


@pytest.mark.slow(seconds=15)
def test_ctrl_c_while_epoch_1_compiles_is_one_line_and_exit_130(tmp_path):
  # JAX compiles on a thread pool and Ctrl-C interrupts only the main
  # thread's wait: a normal exit tore the runtime down under the running
  # compilation (SIGSEGV, "Fatal Python error"). The signal is sent 1.5 s
  # after the setup line, during epoch 1's compilation: a fresh compilation
  # cache and XLA's optimizations on make epoch 1 take 6.5 s here.
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  env = dict(_jit_env(), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"))
  env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
  flags = [*BASE, f"--workdir={tmp_path / 'run'}", "--epochs=3",
           "--progress", "--model=digits_cnn"]
  proc = subprocess.Popen([sys.executable, "-m", "dssgd_jax.main", *flags],
                          cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    first = proc.stderr.readline()  # "[dssgd] ... model(s) x ... parameters"
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert first.startswith("[dssgd]"), first
  assert proc.returncode == 130, err[-3000:]
  # One line (which one depends on where the signal lands on a loaded
  # machine; here, "during epoch 1 ... is epoch 0").
  lines = err.strip().splitlines()
  assert len(lines) == 1, err[-3000:]
  assert lines[0].startswith("error: Interrupted "), lines
  assert "rerun the same command" in lines[0], lines


def test_missing_workdir():
  _assert_one_line_error(_cli(BASE), "--workdir")


@pytest.mark.parametrize("flags,must_contain", [
    (["--upload_fraction=1.5"], "--upload_fraction"),
    (["--batch_size=abc"], "--batch_size"),
    (["leftover_argument"], "leftover_argument")],
                         ids=["config", "absl", "positional"])
def test_the_real_entry_point_gives_the_same_error(flags, must_contain,
                                                   finished_run):
  # The forked commands above stand for `python -m dssgd_jax.main`: the real
  # command gives the same status and line (one per kind of failure: a
  # config check, absl's flag parsing, a positional argument).
  args = [*BASE, f"--workdir={finished_run}", *flags]
  real, forked = _real_cli(args), _cli(args)
  _assert_one_line_error(real, must_contain)
  assert (forked.returncode, forked.stderr) == (real.returncode, real.stderr)


def test_workdir_is_a_file(tmp_path):
  path = tmp_path / "not_a_dir"
  path.write_text("x")
  _assert_one_line_error(_cli([*BASE, f"--workdir={path}"]), "--workdir")
  assert path.read_text() == "x"


def test_bad_flagfile_content(tmp_path):
  preset = tmp_path / "preset.cfg"
  preset.write_text("--dataset=digits\n--batch_size=ten\n")
  _assert_one_line_error(_cli([f"--flagfile={preset}",
                               f"--workdir={tmp_path / 'w'}"]), "--batch_size")


def test_missing_dataset_files(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  out = _cli(["--dataset=mnist", "--data_source=files", f"--data_dir={empty}",
              "--num_participants=2", "--samples_per_participant=10",
              "--batch_size=5",
              f"--workdir={tmp_path / 'w' / 'run'}"])
  _assert_one_line_error(out, str(empty))
  # The run created its work directory, wrote nothing and left no trace.
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("name", ["checkpoint.npz", "config.json"])
def test_corrupt_file_in_workdir(name, tmp_path, finished_run):
  workdir = tmp_path / "copy"
  shutil.copytree(finished_run, workdir)
  (workdir / name).write_bytes(b"\x00garbage, not a " + name.encode())
  before = _snapshot(workdir)
  out = _cli([*BASE, f"--workdir={workdir}", "--epochs=3"])
  _assert_one_line_error(out, name)
  assert _snapshot(workdir) == before


@pytest.mark.slow(seconds=22)
def test_non_finite_loss_stops_and_keeps_earlier_outputs(tmp_path):
  # Huge Laplace noise on the uploads (parallel protocol: every participant
  # trains epoch 1 on the initial model) makes the server's vector overflow,
  # so every participant's epoch-2 loss is non-finite.
  flags = [*BASE, f"--workdir={tmp_path}", "--protocol=parallel",
           "--noise=laplace", "--noise_scale=1e30"]
  out = _cli([*flags, "--epochs=1"])
  assert out.returncode == 0, out.stderr
  before = _snapshot(tmp_path)
  out = _cli([*flags, "--epochs=3"])
  _assert_one_line_error(out, "Epoch 2: participant 0")
  assert "non-finite" in out.stderr and "--learning_rate" in out.stderr
  after = _snapshot(tmp_path)
  for name in ("metrics.jsonl", "checkpoint.npz", "summary.json"):
    assert after[name] == before[name], name
  with open(tmp_path / "metrics.jsonl") as f:
    assert [json.loads(l)["epoch"] for l in f] == [1]


def test_huge_learning_rate_stops_in_epoch_1(tmp_path):
  out = _cli([*BASE, f"--workdir={tmp_path}", "--learning_rate=1e12"])
  _assert_one_line_error(out, "Epoch 1: participant")
  assert not os.path.exists(tmp_path / experiment.CHECKPOINT)
  assert not os.path.exists(tmp_path / experiment.SUMMARY)


def test_ctrl_c_during_an_entry_points_imports_is_one_line_and_exit_130():
  # `with cli.exit_on_interrupt(...)` around main.py's imports: a SIGINT in
  # the block ends the process with one line, whatever the import was doing.
  code = ("import os, signal, time\n"
          "from dssgd_jax.tools import cli\n"
          "with cli.exit_on_interrupt():\n"
          "  os.kill(os.getpid(), signal.SIGINT)\n"
          "  time.sleep(30)\n"
          "print('not reached')\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 130, out.stderr
  assert out.stdout == ""
  assert out.stderr.strip().splitlines() == [
      "error: Interrupted while starting; rerun the same command."]


# numpy: the first module each of these imports after dssgd_jax.cli.
_SIGINT_AT_IMPORT = """
import importlib.abc, os, runpy, signal, sys
class SigintAt(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name == "numpy" and "dssgd_jax.tools.cli" in sys.modules:
      sys.meta_path.remove(self)
      os.kill(os.getpid(), signal.SIGINT)
      for _ in range(10 ** 6):  # the handler runs between bytecodes
        pass
    return None
sys.meta_path.insert(0, SigintAt())
sys.argv = [sys.argv[1], "--help"]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
print("not reached")
"""


@pytest.mark.parametrize("entry", ["dssgd_jax.main", "dssgd_jax.audit",
                                   "dssgd_jax.plot", "dssgd_jax.reproduce",
                                   "dssgd_jax.privacy_table"])
def test_ctrl_c_while_an_entry_point_imports_is_one_line_and_exit_130(entry):
  out = subprocess.run([sys.executable, "-c", _SIGINT_AT_IMPORT, entry],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 130, (out.returncode, out.stderr[-2000:])
  assert out.stdout == ""
  assert out.stderr.strip().splitlines() == [
      "error: Interrupted while starting; rerun the same command."]


def test_exit_on_interrupt_is_a_plain_block_when_disabled():
  # Imported as a library (a notebook): Ctrl-C stays a KeyboardInterrupt,
  # and the previous handler is back after an enabled block.
  import os as os_  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  from dssgd_jax.tools import cli  # pylint: disable=g-import-not-at-top
  before = signal.getsignal(signal.SIGINT)
  with pytest.raises(KeyboardInterrupt):
    with cli.exit_on_interrupt(False):
      os_.kill(os_.getpid(), signal.SIGINT)
      for _ in range(10 ** 6):  # the handler runs between bytecodes
        pass
  with cli.exit_on_interrupt(True):
    assert signal.getsignal(signal.SIGINT) is not before
  assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_inside_a_gc_callback_is_not_lost():
  # JAX runs a callback at every garbage collection; a KeyboardInterrupt
  # raised inside one is printed and dropped by Python, and the run went on.
  # Under cli.user_errors the signal is delivered again after the callback.
  import gc  # pylint: disable=g-import-not-at-top
  import os as os_  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  from dssgd_jax.tools import cli  # pylint: disable=g-import-not-at-top
  fired = []

  def callback(phase, info):
    del info
    if phase == "start" and not fired:
      fired.append(time.time())
      os_.kill(os_.getpid(), signal.SIGINT)
      for _ in range(10 ** 5):  # the handler runs here, in the callback
        pass

  hook = sys.unraisablehook
  with pytest.raises(KeyboardInterrupt):
    with cli.interrupts_not_lost():
      gc.callbacks.append(callback)
      try:
        gc.collect()
        time.sleep(10)  # the signal comes again here
      finally:
        gc.callbacks.remove(callback)
  assert fired and time.time() - fired[0] < 5
  assert sys.unraisablehook is hook
