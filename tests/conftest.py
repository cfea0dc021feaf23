"""Shared test setup: keep JAX on CPU and compile as little and as fast as
possible (the suite is mostly XLA compilation of hundreds of tiny programs).

* ``JAX_DISABLE_MOST_OPTIMIZATIONS=1``: XLA's optimizing passes cost far more
  than they save on programs that run once (on 2 CPU cores they were about
  40% of the suite's time). They change neither what a program computes nor
  which tests pass (float reassociation stays within every tolerance the tests
  use); the benchmark and real runs keep them.
* ``XLA_FLAGS=--xla_cpu_use_fusion_emitters=false``: XLA:CPU's older fusion
  code generator compiles these programs about twice as fast (measured on the
  exchange programs of tests/test_flags.py: 0.9 s against 1.4-2.7 s each).
* A persistent compilation cache for the whole session, shared by the
  pytest-xdist workers and every subprocess a test starts: many tests compile
  the same program (the same tiny run, built by a fresh closure each time),
  which JAX's in-memory cache cannot see but the persistent cache, keyed by
  the program itself, can. It lives in a temporary directory that the
  session removes at the end.

All three are set in the environment before JAX is imported, so the workers and
the CLI subprocesses inherit them, and a test that compares a subprocess's
numbers with its own computes both the same way. A value already in the
environment is kept.
"""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_cpu_use_fusion_emitters=false").strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  # Set by the first process that imports this file (pytest itself, or the
  # xdist controller before it starts its workers): one cache per session.
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix="dssgd_test_jit_cache_")
  os.environ["DSSGD_TEST_OWNS_JIT_CACHE"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
  del config
  if os.environ.get("DSSGD_TEST_OWNS_JIT_CACHE") == str(os.getpid()):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
