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
* ``XLA_FLAGS=--xla_cpu_parallel_codegen_split_count=1``: one code generation
  thread per program; the test workers already keep every core busy, and the
  split costs more than it saves on small programs (eight exchange programs:
  15.4-16.5 s of CPU against 18.2-18.7 s).
* A persistent compilation cache for the whole session, shared by the
  pytest-xdist workers and every subprocess a test starts: many tests compile
  the same program (the same tiny run, built by a fresh closure each time),
  which JAX's in-memory cache cannot see but the persistent cache, keyed by
  the program itself, can. It lives in a temporary directory that the
  session removes at the end.

All four are set in the environment before JAX is imported, so the workers and
the CLI subprocesses inherit them, and a test that compares a subprocess's
numbers with its own computes both the same way. A value already in the
environment is kept.
"""

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
for _flag in ("--xla_cpu_use_fusion_emitters=false",
              "--xla_cpu_parallel_codegen_split_count=1"):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " +
                               _flag).strip()
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


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook
def pytest_xdist_auto_num_workers(config):
  """``-n auto``: one worker more than the cores (up to 8): the worker that
  runs the Flower deployment test mostly waits while the test's own processes
  (SuperLink, SuperNodes, apps) do the work."""
  del config
  return min(8, (os.cpu_count() or 1) + 1)


def pytest_configure(config):
  # With pytest-xdist, hand out tests one at a time (each worker holds the
  # test it runs and the next), so the order below decides when each starts.
  # Tests of one module may then run on several workers, each setting up the
  # module's fixtures: an expensive one is shared by the session (a lock,
  # cli_helpers.session_dir) or belongs to one test.
  if getattr(config.option, "maxschedchunk", "absent") is None:
    config.option.maxschedchunk = 1


def pytest_collection_modifyitems(config, items):
  """Longest tests first (``@pytest.mark.slow(seconds=...)``, their time on
  a 2-core machine), the rest in collection order: a long test that starts
  last would leave the other workers idle while it runs. The Flower
  deployment test, the longest, starts first."""
  del config

  def seconds(item):
    mark = item.get_closest_marker("slow")
    return mark.kwargs.get("seconds", 0) if mark else 0

  items.sort(key=lambda item: -seconds(item))  # stable
