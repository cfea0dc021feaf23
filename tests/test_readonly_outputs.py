"""A run directory that cannot be written to: plot and audit end in one line.

``python -m dssgd_jax.plot WORKDIR`` and ``python -m dssgd_jax.audit WORKDIR``
on a read-only directory must print one ``error:`` line naming the file they
could not write and why, exit with status 2, show no traceback and leave every
file already in the directory byte-identical; the audit prints its report
before that line.

The tests run as root, and root ignores permission bits, so ``chmod`` cannot
make a directory read-only here. Instead every write into the run directory is
refused inside the process with ``OSError(EROFS, "Read-only file system")``,
as a read-only mount would: in-process with ``monkeypatch``, and for the
command lines by a ``sitecustomize.py`` on ``PYTHONPATH`` that installs the
same wrappers (``open``, ``os.open``, ``os.replace``, ...) before
``python -m dssgd_jax.<tool>`` starts. If a write slipped past the wrappers
the tool would succeed or a file would change, and the tests would fail.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

from cli_helpers import jit_env
from dssgd_jax.tools import audit
from dssgd_jax.run import figures as plot
from dssgd_jax.errors import UserError
from dssgd_jax.run import build
from dssgd_jax.run import config as config_lib
from dssgd_jax.run import experiment
from dssgd_jax.run import outputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READONLY_ENV = "DSSGD_TEST_READONLY_DIR"
EROFS_TEXT = "Read-only file system"

# Written as sitecustomize.py: the child process refuses writes under
# $DSSGD_TEST_READONLY_DIR from its first line on. The tests load the same
# file to patch this process.
_PATCH_SOURCE = r'''
import builtins
import errno
import io
import os

_WRITE_FLAGS = (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC
                | os.O_APPEND)


def install(root, set_attr=setattr):
  """Makes writes under ``root`` raise OSError(EROFS), as on a read-only
  mount (root ignores permission bits, so chmod would not do)."""
  root = os.path.realpath(root)

  def inside(path):
    if isinstance(path, int):
      return False
    try:
      p = os.path.realpath(os.fsdecode(os.fspath(path)))
    except TypeError:
      return False
    return p == root or p.startswith(root + os.sep)

  def refuse(path):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS),
                  os.fsdecode(os.fspath(path)))

  real_open = builtins.open

  def open_(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and inside(file):
      refuse(file)
    return real_open(file, mode, *args, **kwargs)

  real_os_open = os.open

  def os_open(path, flags, *args, **kwargs):
    if flags & _WRITE_FLAGS and inside(path):
      refuse(path)
    return real_os_open(path, flags, *args, **kwargs)

  def two_paths(real):
    def wrapper(src, dst, *args, **kwargs):
      for p in (src, dst):
        if inside(p):
          refuse(p)
      return real(src, dst, *args, **kwargs)
    return wrapper

  def one_path(real):
    def wrapper(path, *args, **kwargs):
      if inside(path):
        refuse(path)
      return real(path, *args, **kwargs)
    return wrapper

  set_attr(builtins, "open", open_)
  set_attr(io, "open", open_)
  set_attr(os, "open", os_open)
  for name in ("replace", "rename", "link", "symlink"):
    set_attr(os, name, two_paths(getattr(os, name)))
  for name in ("remove", "unlink", "mkdir", "rmdir", "chmod", "utime",
               "truncate"):
    set_attr(os, name, one_path(getattr(os, name)))


if os.environ.get("DSSGD_TEST_READONLY_DIR"):
  install(os.environ["DSSGD_TEST_READONLY_DIR"])
'''


@pytest.fixture(scope="module")
def patch_dir(tmp_path_factory):
  """A directory holding only the sitecustomize.py above."""
  path = tmp_path_factory.mktemp("readonly_patch")
  (path / "sitecustomize.py").write_text(_PATCH_SOURCE)
  return path


@pytest.fixture
def read_only(patch_dir, monkeypatch):
  """``read_only(path)`` refuses writes under ``path`` in this process."""
  spec = importlib.util.spec_from_file_location(
      "_readonly_patch", patch_dir / "sitecustomize.py")
  module = importlib.util.module_from_spec(spec)
  monkeypatch.delenv(READONLY_ENV, raising=False)
  spec.loader.exec_module(module)
  return lambda path: module.install(str(path), monkeypatch.setattr)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  """A sweep directory holding one real, finished tiny run (``run``) that
  has its figures and an audit.json already."""
  path = tmp_path_factory.mktemp("sweep")
  workdir = str(path / "run")
  experiment.run(build.validate(config_lib.Config(
      dataset="digits", model="digits_mlp", num_participants=3,
      samples_per_participant=30, batch_size=10, epochs=1, eval_examples=60,
      progress=False, workdir=workdir)))
  audit.audit_run(workdir, attacks=("loss",))
  for name in ("metrics.jsonl", "config.json", "checkpoint.npz",
               plot.RUN_FIGURE, audit.AUDIT_FILE):
    assert os.path.exists(os.path.join(workdir, name)), name
  return path


def _snapshot(root) -> dict[str, bytes]:
  """Every file under ``root`` (relative path -> bytes)."""
  files = {}
  for dirpath, _, names in os.walk(root):
    for name in names:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, root)] = f.read()
  return files


def _run_read_only(patch_dir, readonly, *args, merge=False):
  """``python -m ARGS`` with writes under ``readonly`` refused."""
  env = jit_env()
  env[READONLY_ENV] = str(readonly)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(patch_dir)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  return subprocess.run(
      [sys.executable, "-m", *args], cwd=REPO, env=env, text=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT if merge else subprocess.PIPE,
      timeout=600, check=False)


def _assert_one_error_line(out, path):
  assert out.returncode == 2, (out.stdout, out.stderr)
  assert "Traceback" not in out.stderr + out.stdout
  lines = out.stderr.splitlines()
  assert len(lines) == 1, out.stderr
  assert lines[0].startswith("error: ")
  assert path in lines[0] and EROFS_TEXT in lines[0], lines[0]


# ----------------------------------------------------------------------------
# plot


def test_plot_run_raises_a_user_error_naming_the_file(sweep, read_only):
  workdir = str(sweep / "run")
  before = _snapshot(sweep)
  read_only(sweep)
  with pytest.raises(plot.PlotError) as e:
    plot.plot_run(workdir)
  assert isinstance(e.value, UserError)
  figure = os.path.join(workdir, plot.RUN_FIGURE)
  assert str(e.value) == f"Cannot write {figure}: {EROFS_TEXT}."
  # experiment.run draws the figures last and only warns when it cannot.
  logged = []
  outputs.draw_figures(workdir, logged.append)
  assert len(logged) == 1 and logged[0].startswith("warning: ")
  assert figure in logged[0] and EROFS_TEXT in logged[0]
  assert _snapshot(sweep) == before


@pytest.mark.parametrize("which,figure", [("run", plot.RUN_FIGURE),
                                          ("sweep", plot.SWEEP_FIGURE)])
def test_plot_cli_on_a_read_only_directory(patch_dir, sweep, which, figure):
  workdir = str(sweep / "run") if which == "run" else str(sweep)
  before = _snapshot(sweep)
  out = _run_read_only(patch_dir, sweep, "dssgd_jax.plot", workdir)
  _assert_one_error_line(out, os.path.join(workdir, figure))
  assert out.stdout == ""
  assert _snapshot(sweep) == before


# ----------------------------------------------------------------------------
# audit


def test_audit_write_result_raises_a_user_error_naming_the_file(sweep,
                                                                read_only):
  workdir = str(sweep / "run")
  before = _snapshot(sweep)
  read_only(sweep)
  with pytest.raises(audit.AuditError) as e:
    audit.write_result(workdir, {"attacks": {}})
  path = os.path.join(workdir, audit.AUDIT_FILE)
  assert str(e.value) == f"Cannot write {path}: {EROFS_TEXT}."
  assert _snapshot(sweep) == before


@pytest.mark.slow(seconds=25)
def test_audit_cli_prints_the_report_then_one_error_line(patch_dir, sweep):
  workdir = str(sweep / "run")
  path = os.path.join(workdir, audit.AUDIT_FILE)
  header = f"Audit of {workdir} "
  before = _snapshot(sweep)

  out = _run_read_only(patch_dir, sweep, "dssgd_jax.audit", workdir)
  _assert_one_error_line(out, path)
  assert out.stdout.startswith(header), out.stdout
  for attack in audit.ATTACKS:
    assert f"  {attack} " in out.stdout, attack
  assert "Wrote" not in out.stdout
  assert _snapshot(sweep) == before

  # stdout and stderr on one stream (`2>&1`): the whole report comes before
  # the error, which is the last line.
  merged = _run_read_only(patch_dir, sweep, "dssgd_jax.audit", workdir,
                          merge=True)
  assert merged.returncode == 2
  assert "Traceback" not in merged.stdout
  lines = merged.stdout.splitlines()
  assert lines[-1] == out.stderr.strip()
  assert [l for l in lines if l.startswith("error:")] == [lines[-1]]
  assert "\n".join(lines[:-1]) == out.stdout.rstrip("\n")
  assert _snapshot(sweep) == before
