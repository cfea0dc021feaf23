"""Helpers shared by the CLI tests (subprocess runs of the entry points)."""

import os


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
