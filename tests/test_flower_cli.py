"""The deployment's commands fail fast, in one sentence, before starting
anything: each failure a new user met following docs/deployment.md.

Every case runs ``python -m dssgd_jax.flower`` as a user would, bounded in
time, and checks: exit status 2, one line on stderr naming what to fix, no
traceback, and nothing already written changed. The wrong-certificate case
starts a real SuperLink (Flower's ``flower-superlink``, 127.0.0.1, a free
port) with a certificate that does not cover 127.0.0.1.
"""

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("flwr")
if shutil.which("flower-superlink") is None:
  pytest.skip("Flower's command-line tools are not installed",
              allow_module_level=True)

from dssgd_jax.flower import __main__ as cli  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ("--dataset=digits --model=digits_mlp --num_participants=2 "
        "--samples_per_participant=20 --batch_size=10 --epochs=1 "
        "--progress=false")


def _flower(*args, timeout=60, cwd=REPO):
  env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0")
  start = time.time()
  out = subprocess.run([sys.executable, "-m", "dssgd_jax.flower", *args],
                       env=env, cwd=cwd, capture_output=True, text=True,
                       timeout=timeout)
  return out, time.time() - start


def _one_sentence(out, *words):
  assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
  assert "Traceback" not in out.stderr + out.stdout, out.stderr
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
  for w in words:
    assert w in lines[0], (w, lines[0])
  return lines[0]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _tree_digest(path):
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(path)):
    for name in sorted(files):
      p = os.path.join(root, name)
      h.update(p.encode())
      with open(p, "rb") as f:
        h.update(f.read())
      h.update(str(os.stat(p).st_mtime_ns).encode())
  return h.hexdigest()


def test_tls_always_covers_what_the_superlinks_own_processes_dial(tmp_path):
  # The docs' own `--hosts=` forms: a name, localhost only, 0.0.0.0.
  for hosts in ("dssgd.example.org", "localhost", "0.0.0.0", ""):
    out, _ = _flower("tls", str(tmp_path / hosts), f"--hosts={hosts}")
    assert out.returncode == 0, out.stderr
    names = cli._certificate_names(str(tmp_path / hosts / "server.pem"))  # pylint: disable=protected-access
    assert "127.0.0.1" in names and "localhost" in names, names
    assert "0.0.0.0" not in names
    if hosts == "dssgd.example.org":
      assert hosts in names


@pytest.mark.slow(seconds=40)
def test_a_certificate_that_does_not_cover_the_address_is_one_sentence(
    tmp_path, monkeypatch):
  """The silent hang of the last round: a SuperLink whose certificate does
  not cover 127.0.0.1. `superlink` refuses the certificate; a SuperLink
  started without this package's checks is refused by `run` and
  `participant` in one sentence, within seconds."""
  monkeypatch.setattr(cli, "certificate_hosts", lambda hosts: list(hosts))
  tls = tmp_path / "tls"
  cli.write_tls(str(tls), ["dssgd.example.org"])
  assert cli._certificate_names(str(tls / "server.pem")) == [  # pylint: disable=protected-access
      "dssgd.example.org"]
  port = _free_port()
  out, _ = _flower("superlink", f"--tls={tls}", f"--address=127.0.0.1:{port}")
  _one_sentence(out, "not 127.0.0.1", "python -m dssgd_jax.flower tls")

  link = subprocess.Popen(
      ["timeout", "-k", "5", "300", "flower-superlink", "--host", "127.0.0.1",
       "--port", str(port), "--ssl-ca-certfile", str(tls / "ca.crt"),
       "--ssl-certfile", str(tls / "server.pem"), "--ssl-keyfile",
       str(tls / "server.key"), "--database", str(tmp_path / "db.sqlite")],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
      env=dict(os.environ, FLWR_TELEMETRY_ENABLED="0"),
      start_new_session=True)
  try:
    cli.wait_for(f"127.0.0.1:{port}", 60, "The test's SuperLink")
    workdir = tmp_path / "run"
    for host in ("127.0.0.1", "localhost"):
      out, took = _flower("run", f"--superlink={host}:{port}",
                          f"--ca={tls / 'ca.crt'}",
                          f"--flags={TINY} --workdir={workdir}")
      line = _one_sentence(out, "does not verify", f"--hosts={host}")
      assert took < 45, (took, line)
      assert not workdir.exists()
    out, took = _flower("participant", f"--superlink=127.0.0.1:{port}",
                        f"--ca={tls / 'ca.crt'}", "--partition_id=0",
                        f"--state_dir={tmp_path / 'p0'}",
                        f"--key={tls / 'server.key'}")
    _one_sentence(out, "does not verify")
    assert took < 45
  finally:
    os.killpg(link.pid, signal.SIGKILL)
    link.wait(timeout=30)


def test_busy_ports_are_one_sentence(tmp_path):
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    out, _ = _flower("superlink", "--insecure", f"--address=127.0.0.1:{port}")
    _one_sentence(out, f"port {port} is in use", "--address")
    out, _ = _flower("participant", "--insecure", "--partition_id=0",
                     f"--state_dir={tmp_path / 'p0'}", f"--port={port}")
    _one_sentence(out, f"--port={port} is in use", "none to take a free one")
    assert not (tmp_path / "p0").exists()


def test_no_superlink_is_one_sentence_within_its_deadline(tmp_path):
  port = _free_port()
  out, took = _flower("run", "--insecure", f"--superlink=127.0.0.1:{port}",
                      f"--flags={TINY} --workdir={tmp_path / 'run'}")
  _one_sentence(out, "did not answer within 10 s", "--superlink")
  assert took < 40
  out, took = _flower("participant", "--insecure", "--partition_id=0",
                      f"--superlink=127.0.0.1:{port}", "--connect_timeout=2",
                      f"--state_dir={tmp_path / 'p0'}")
  _one_sentence(out, "did not answer within 2 s")
  assert took < 30


def test_flag_errors_are_refused_before_anything_starts(tmp_path):
  """No SuperLink runs here: each refusal comes before `run` dials one."""
  port = _free_port()
  common = ["run", "--insecure", f"--superlink=127.0.0.1:{port}"]
  out, _ = _flower(*common, f"--flags={TINY} --upload_fractoin=0.1")
  _one_sentence(out, "upload_fractoin")
  flagfile = tmp_path / "typo.cfg"
  flagfile.write_text("--dataset=digits\n--epohcs=3\n")
  out, _ = _flower(*common, f"--flags=--flagfile={flagfile}")
  _one_sentence(out, "epohcs", str(flagfile))
  out, _ = _flower(*common, f"--flags={TINY} --upload_fraction=2")
  _one_sentence(out, "--upload_fraction")


@pytest.mark.slow(seconds=20)
def test_a_changed_flag_on_an_existing_run_is_refused_at_once(tmp_path):
  workdir = tmp_path / "run"
  sim = subprocess.run(
      [sys.executable, "-m", "dssgd_jax.main", *TINY.split(),
       f"--workdir={workdir}"], capture_output=True, text=True, timeout=300,
      cwd=REPO)
  assert sim.returncode == 0, sim.stderr
  before = _tree_digest(workdir)
  # Relative paths are resolved where the command is typed.
  out, took = _flower("run", "--insecure",
                      f"--superlink=127.0.0.1:{_free_port()}",
                      f"--flags={TINY} --learning_rate=0.5 --workdir=run",
                      cwd=tmp_path)
  _one_sentence(out, str(workdir), "learning_rate")
  assert took < 30
  assert _tree_digest(workdir) == before


def test_a_mismatched_data_file_is_refused_when_the_participant_starts(
    tmp_path):
  import numpy as np  # pylint: disable=g-import-not-at-top
  np.savez(tmp_path / "data.npz",
           train_images=np.zeros((4, 28, 28, 1), np.float32),
           train_labels=np.array([0, 1, 2, 11]),
           test_images=np.zeros((2, 28, 28, 1), np.float32),
           test_labels=np.array([0, 1]))
  out, _ = _flower("participant", "--insecure", "--partition_id=0",
                   f"--state_dir={tmp_path / 'p0'}",
                   f"--data_dir={tmp_path}")
  _one_sentence(out, str(tmp_path / "data.npz"), "0 to 9")


def test_every_option_is_described_with_its_default():
  parser = cli._parser()  # pylint: disable=protected-access
  sub = next(a for a in parser._actions  # pylint: disable=protected-access
             if a.dest == "command")
  for name, p in sub.choices.items():
    for a in p._actions:  # pylint: disable=protected-access
      if a.dest == "help":
        continue
      assert a.help, (name, a.dest)
    text = p.format_help()
    for a in p._actions:  # pylint: disable=protected-access
      if a.option_strings and a.default not in (None, False, "",
                                                 "==SUPPRESS=="):
        assert f"(default: {a.default})" in " ".join(text.split()), (
            name, a.dest)
