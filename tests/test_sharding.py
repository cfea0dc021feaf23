"""The participant axis sharded over devices gives the one-device metrics.

XLA_FLAGS must be set before JAX starts, so the sharded runs happen in
subprocesses: one with 8 forced CPU devices, and a two-process multi-host
run on localhost (jax.distributed with gloo collectives on CPU).
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from dssgd_jax.run import build

from dssgd_jax.run import config as config_lib
from dssgd_jax.run import experiment
from dssgd_jax import sharding
from dssgd_jax.errors import ConfigError

_RUNS = {
    "parallel_cnn": dict(model="digits_cnn", protocol="parallel"),
    "async_mlp": dict(model="digits_mlp", protocol="async", max_staleness=1,
                      staleness="uniform", upload_loss=0.25),
}
_COMMON = dict(dataset="digits", num_participants=8, samples_per_participant=16,
               batch_size=8, learning_rate=0.1, upload_fraction=0.2, epochs=2,
               eval_examples=100, progress=False, seed=1)


def train_and_measure(kw):
  """Trains a ``_COMMON`` + ``kw`` run epoch by epoch; JSON-able metrics.

  The one loop behind both sides of the comparison: called here for the
  one-device reference and by ``_WORKER`` in the 8-device subprocess.
  """
  cfg = build.validate(config_lib.Config(**{**_COMMON, **kw}))
  exp = experiment.setup(cfg)
  st = exp.init_state
  for e in range(1, cfg.epochs + 1):
    st, stats = exp.epoch_fn(st, exp.data,
                             jax.random.fold_in(exp.train_key, e))
  acc, server_acc = exp.evaluate(st)
  return {"acc": np.asarray(acc).tolist(), "server": server_acc,
          "loss": np.asarray(stats.loss).tolist(),
          "uploaded": np.asarray(stats.uploaded).tolist(),
          "local": np.asarray(st.protocol.local.params).sum(axis=1).tolist(),
          "spec": str(getattr(exp.data.images, "sharding", ""))}


_WORKER = r"""
import json, sys
import jax
sys.path.insert(0, sys.argv[2])
from test_sharding import train_and_measure
out = {"devices": jax.device_count()}
for name, kw in json.loads(sys.argv[1]).items():
  out[name] = train_and_measure(kw)
print(json.dumps(out))
"""


def _env(devices):
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={devices}")
  return env


@pytest.mark.slow(seconds=40)
def test_eight_devices_match_one_device():
  proc = subprocess.run(
      [sys.executable, "-c", _WORKER, json.dumps(_RUNS),
       os.path.dirname(os.path.abspath(__file__))],
      env=_env(8), capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert got["devices"] == 8
  for name, kw in _RUNS.items():
    ref = train_and_measure({**kw, "mesh_shape": 1})
    g = got[name]
    assert "participants" in g["spec"], g["spec"]  # really sharded
    np.testing.assert_allclose(g["acc"], ref["acc"], atol=1e-6)
    if ref["server"] is not None:
      assert g["server"] == pytest.approx(ref["server"], abs=1e-6)
    np.testing.assert_allclose(g["loss"], ref["loss"], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(g["uploaded"], ref["uploaded"])
    np.testing.assert_allclose(g["local"], ref["local"], rtol=1e-4,
                               atol=1e-4)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir, epochs, extra_env=None):
  """Runs ``python -m dssgd_jax.main`` as two processes on 127.0.0.1 that
  share one work directory; returns their (returncode, stderr)."""
  flags = ["--dataset=digits", "--model=digits_mlp", "--num_participants=8",
           "--samples_per_participant=16", "--batch_size=8",
           "--learning_rate=0.1", "--upload_fraction=0.2", f"--epochs={epochs}",
           "--eval_examples=100", "--seed=1", "--protocol=parallel",
           "--noprogress"]
  port = _free_port()
  procs = []
  for pid in range(2):
    env = _env(2)
    env.update(extra_env or {})
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "dssgd_jax.main", *flags,
         f"--workdir={workdir}",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
         f"--process_id={pid}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True))
  out = []
  try:
    for p in procs:
      _, err = p.communicate(timeout=300)
      out.append((p.returncode, err))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return out


@pytest.mark.slow(seconds=80)
def test_two_processes_share_one_workdir_and_resume(tmp_path):
  # Only process 0 writes: one row per epoch, one readable checkpoint; a
  # two-process run killed after epoch 2 and resumed equals one process.
  shared = tmp_path / "shared"
  for code, err in _two_processes(
      shared, 3, {experiment.KILL_AFTER_EPOCH_ENV: "2"}):
    assert code == experiment.KILLED_EXIT, err[-3000:]
  with np.load(shared / "checkpoint.npz") as z:
    assert int(z["epoch"]) == 2
  assert [json.loads(l)["epoch"] for l in (shared / "metrics.jsonl").open()
          ] == [1, 2]
  for code, err in _two_processes(shared, 3):
    assert code == 0, err[-3000:]
  assert not list(shared.glob("*.tmp"))
  single = build.validate(config_lib.Config(
      **{**_COMMON, "model": "digits_mlp", "protocol": "parallel",
         "epochs": 3, "workdir": str(tmp_path / "single")}))
  experiment.run(single, log=lambda m: None)

  def metrics(d):
    rows = [json.loads(l) for l in (tmp_path / d / "metrics.jsonl").open()]
    for r in rows:
      for k in experiment.TIMING_FIELDS:
        r.pop(k, None)
    return rows

  ref, got = metrics("single"), metrics("shared")
  assert [r["epoch"] for r in got] == [1, 2, 3]
  for a, b in zip(got, ref):
    assert a.keys() == b.keys()
    for k in a:
      if isinstance(b[k], float):
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
      else:
        assert a[k] == b[k], k


def test_mesh_size():
  assert sharding.mesh_size(30, 0, 8) == 6
  assert sharding.mesh_size(32, 0, 8) == 8
  assert sharding.mesh_size(7, 0, 8) == 7
  assert sharding.mesh_size(1, 0, 8) == 1
  assert sharding.mesh_size(30, 5, 8) == 5
  with pytest.raises(ConfigError):
    sharding.mesh_size(30, 4, 8)
  with pytest.raises(ConfigError):
    sharding.mesh_size(32, 16, 8)


def test_cpu_devices_flag_sets_xla_flags_once(monkeypatch):
  from dssgd_jax.tools import cli  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  cli.force_cpu_devices(4)
  assert os.environ["XLA_FLAGS"] == (
      "--xla_cpu_enable_fast_math=false "
      "--xla_force_host_platform_device_count=4")
  cli.force_cpu_devices(2)  # an explicit device count is never overridden
  assert os.environ["XLA_FLAGS"].count("device_count") == 1
  monkeypatch.delenv("XLA_FLAGS")
  cli.force_cpu_devices(1)
  assert "XLA_FLAGS" not in os.environ


@pytest.mark.parametrize("flag, value", [("participant_axis", "pmap"),
                                         ("cpu_devices", -1)])
def test_bad_device_flags_are_config_errors(flag, value):
  with pytest.raises(ConfigError, match=f"--{flag}"):
    build.validate(config_lib.Config(**{flag: value}))
