"""Helpers shared by the CLI tests (subprocess runs of the entry points)."""

import json
import os
import select
import subprocess
import sys


def session_dir(tmp_path_factory, name):
  """A directory shared by all pytest-xdist workers of this test session."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent
  path = base / name
  path.mkdir(exist_ok=True)
  return path


def jit_env():
  """Subprocess environment: CPU, and this session's persistent compilation
  cache and compile settings (tests/conftest.py), so identical tiny runs in
  different tests compile once."""
  return dict(os.environ, JAX_PLATFORMS="cpu")


# The fork server behind `ForkedCli`: imports the entry point's module once,
# then forks one child per command. A child is a process of its own (its own
# flags, stdout, stderr and exit status, as `python -m MODULE ARGS` gives),
# started without paying Python's and JAX's imports again. Requests and
# replies are JSON lines on stdin/stdout; the child's output goes to files.
_SERVER = r'''
import importlib, json, os, sys, tempfile, traceback
module = importlib.import_module(sys.argv[1])
for name in sys.argv[2:]:  # what the module imports when it runs
  importlib.import_module(name)
reply = os.fdopen(os.dup(1), "w")
for line in sys.stdin:
  req = json.loads(line)
  files = [tempfile.mkstemp() for _ in range(2)]  # (fd, path): stdout, stderr
  pid = os.fork()
  if pid == 0:
    code = 1
    try:
      for target, (fd, _) in zip((1, 2), files):
        os.dup2(fd, target)
      os.chdir(req["cwd"])
      os.environ.update(req["env"])
      sys.argv = [module.__file__, *req["argv"]]
      try:
        module.run()
        code = 0
      except SystemExit as e:  # what the interpreter does with it
        if e.code is None or isinstance(e.code, int):
          code = e.code or 0
        else:
          print(e.code, file=sys.stderr)
      except BaseException:  # an uncaught exception: traceback, status 1
        traceback.print_exc()
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(code)
  _, status = os.waitpid(pid, 0)
  outs = []
  for fd, path in files:
    os.close(fd)
    with open(path) as f:
      outs.append(f.read())
    os.remove(path)
  reply.write(json.dumps([os.waitstatus_to_exitcode(status), *outs]) + "\n")
  reply.flush()
'''


# What a run imports only once it runs (figures, data, event files): the fork
# server imports them too, so that each command pays only its own work.
# (matplotlib's figure and Agg modules are most of pyplot's import, without
# choosing a backend.)
RUN_IMPORTS = ("dssgd_jax.run.figures", "matplotlib.figure",
               "matplotlib.backends.backend_agg", "dssgd_jax.data",
               "dssgd_jax.run.build", "dssgd_jax.participant",
               "sklearn.datasets", "tensorboardX")


class ForkedCli:
  """``python -m MODULE ARGS`` for many commands, each in its own process.

  Each command runs in a child forked from one server process that has
  imported ``MODULE`` (which must have a ``run()`` that its ``__main__``
  block calls), so a command costs its own work, not ~4 s of imports: the
  child parses its flags, prints, writes and exits with its status exactly as
  ``python -m`` would. JAX is imported but not started in the server, so each
  child starts its own backend. Use a real subprocess where the test sends a
  signal.
  """

  def __init__(self, module, env, preload=RUN_IMPORTS):
    self._proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, module, *preload],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, env=env)
    self._module = module

  def __call__(self, args, cwd, timeout=300, env=None):
    """Runs one command; ``env``: variables added to the server's for it."""
    self._proc.stdin.write(json.dumps(
        {"argv": [str(a) for a in args], "cwd": str(cwd),
         "env": {k: str(v) for k, v in (env or {}).items()}}) + "\n")
    self._proc.stdin.flush()
    ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
    if not ready:
      self.close()
      raise TimeoutError(f"python -m {self._module} {' '.join(args)}: "
                         f"no exit within {timeout} s")
    line = self._proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the fork server for {self._module} died")
    returncode, stdout, stderr = json.loads(line)
    return subprocess.CompletedProcess(args, returncode, stdout, stderr)

  def close(self):
    self._proc.kill()
    self._proc.wait()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
