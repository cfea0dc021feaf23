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


def jit_env(tmp_path_factory):
  """Subprocess environment with a persistent compilation cache shared by
  this session's CLI tests (identical tiny runs compile once)."""
  return dict(os.environ, JAX_PLATFORMS="cpu",
              JAX_COMPILATION_CACHE_DIR=str(
                  session_dir(tmp_path_factory, "dssgd_jit_cache")),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
