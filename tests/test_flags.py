"""Every flag changes the run or is rejected (issue "Every flag means what it
says").

For every algorithm x protocol x noise mode, and every flag, the flag is
changed from the base value: either ``config.validate`` rejects it with one
sentence naming the flag, or the run changes.

* Exchange flags (sharing, privacy, protocol): the run is the real protocol
  and upload/download rules built by ``run.build`` from the config, over a
  cheap stand-in local epoch (D = 64, a data- and key-dependent step), so a
  variant compiles in a fraction of a second. Its fingerprint is everything
  the exchange produces: server parameters and update counters,
  every participant's parameters, the entries sent and received, the lost
  uploads, the bytes and the privacy claim (three epochs).
* Data, model and training flags change a real (tiny) run's parameters or
  accuracy.
* Flags that choose *how* or *where* the same computation runs (``--conv_impl``,
  ``--participant_axis``, ``--mesh_shape``, ``--cpu_devices``, the multi-host
  flags) give the same numbers by design (tests/test_participant_axis.py,
  tests/test_sharding.py); flags that change what a run writes or prints
  (``--workdir``, ``--progress``, ``--checkpoint_every``, ``--eval_every``)
  are tested in tests/test_experiment.py and tests/test_resume.py; the data
  source flags need files (tests/test_data.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dssgd_jax import protocols
from dssgd_jax import server as server_lib
from dssgd_jax.errors import ConfigError
from dssgd_jax.run import build
from dssgd_jax.run import config as config_lib
from dssgd_jax.run import experiment

TINY = dict(dataset="digits", model="digits_mlp", num_participants=3,
            samples_per_participant=24, batch_size=8, learning_rate=0.1,
            epochs=2, eval_examples=60, progress=False)

NOISE_BASE = {
    "none": {},
    "laplace": dict(noise="laplace", noise_scale=0.01, clip_bound=0.05),
    "gaussian": dict(noise="gaussian", noise_scale=0.05, l2_clip=1.0,
                     selection="random"),
    "svt": dict(noise="svt", epsilon=10.0, clip_bound=0.05, threshold=0.01),
}

COMBOS = ([("dssgd", p, n) for p in protocols.PROTOCOLS for n in NOISE_BASE]
          + [("fedavg", "parallel", n) for n in NOISE_BASE]
          + [(a, "parallel", "none") for a in ("standalone", "centralized")])

# One other value per exchange flag.
EXCHANGE_ALTERNATIVES = {
    "protocol": "parallel",
    "upload_fraction": 0.3,
    "download_fraction": 0.5,
    "download_rule": "random",
    "selection": "threshold",
    "threshold": 0.08,
    "stat_decay": 0.5,
    "decay_every": 2,
    "clip_bound": 0.02,
    "l2_clip": 0.05,
    "noise": "laplace",
    "noise_scale": 0.2,
    "epsilon": 0.5,
    "delta": 1e-3,
    "staleness": "uniform",
    "max_staleness": 3,
    "upload_loss": 1.0,
    "download_loss": 1.0,
}

# Values that make a flag readable in a base where it is not (the test then
# changes the flag from there too): e.g. --decay_every needs --stat_decay < 1.
ENABLERS = {
    "decay_every": dict(stat_decay=0.5, download_fraction=0.5),
    "stat_decay": dict(download_fraction=0.5),
    "threshold": dict(selection="threshold"),
}

D = 64


def _base(algorithm, protocol, noise):
  over = dict(NOISE_BASE[noise])
  if protocol == "async":
    over["max_staleness"] = 1
  if algorithm == "fedavg":
    over.pop("selection", None)
    over.pop("clip_bound", None)
  return config_lib.Config(**TINY, algorithm=algorithm,
                           protocol=protocol, **over)


def _stand_in_epoch(w, x, y, key, lr, count=None):
  """A data- and key-dependent 'local epoch' that compiles at once."""
  step = jnp.mean(x) + jnp.mean(y) * 0.01 + jax.random.normal(key, w.shape)
  return w - lr * step, jnp.mean(step ** 2)


@functools.lru_cache(maxsize=None)
def _data():
  kx, ky = jax.random.split(jax.random.key(1))
  return (jax.random.uniform(kx, (3, 4, 2)),
          jax.random.randint(ky, (3, 4), 0, 10).astype(jnp.float32))


def _exchange_fingerprint(cfg):
  """Everything the exchange produces in three epochs (module doc)."""
  proto = build.protocol(cfg, _stand_in_epoch, D,
                         protocols.ParticipantAxis("vmap"))
  init = jnp.linspace(-1.0, 1.0, D)
  state = proto.init(server_lib.init(init), jnp.tile(init[None], (3, 1)))
  x, y = _data()
  fn = jax.jit(proto.epoch)
  out = []
  for e in range(3):  # three: a staleness of 1 and of 3 differ from epoch 3
    state, stats = fn(state, x, y, jax.random.key(e))
    out += [np.asarray(state["server"].params), np.asarray(state["server"].stat),
            np.asarray(state["local"]), np.asarray(stats.uploaded),
            np.asarray(stats.downloaded), np.asarray(stats.upload_lost),
            np.asarray(server_lib.wire_bytes(stats.uploaded, D)),
            np.asarray(server_lib.wire_bytes(stats.downloaded, D))]
  claim = build.claim(cfg, D, 3)
  return out, (claim.epsilon, claim.delta, claim.reason)


def _same(a, b):
  (xa, ca), (xb, cb) = a, b
  return ca == cb and len(xa) == len(xb) and all(
      u.shape == v.shape and np.array_equal(u, v) for u, v in zip(xa, xb))


_BASE_PRINTS = {}


def _check_flag(base, name, value, fingerprint):
  changed = base.replace(**{name: value})
  try:
    changed = config_lib.validate(changed)
  except ConfigError as e:
    assert f"--{name}" in str(e), (name, str(e))
    assert "\n" not in str(e)
    return "rejected"
  key = (base, fingerprint)
  if key not in _BASE_PRINTS:
    _BASE_PRINTS[key] = fingerprint(config_lib.validate(base))
  assert not _same(_BASE_PRINTS[key], fingerprint(changed)), (
      f"--{name}={value!r} was accepted but changed nothing in {base}")
  return "changed"


@pytest.mark.slow(seconds=30)
@pytest.mark.parametrize("algorithm,protocol,noise", COMBOS)
def test_every_exchange_flag_changes_the_run_or_is_rejected(
    algorithm, protocol, noise):
  base = _base(algorithm, protocol, noise)
  try:
    config_lib.validate(base)
  except ConfigError as e:  # the combination itself is not available
    assert algorithm == "fedavg" and noise in ("laplace", "svt"), str(e)
    assert "--noise" in str(e)
    return
  outcomes = {}
  for name, value in EXCHANGE_ALTERNATIVES.items():
    if getattr(base, name) == value:
      continue
    outcomes[name] = _check_flag(base, name, value, _exchange_fingerprint)
    enabler = ENABLERS.get(name)
    if enabler:
      enabled = base.replace(**enabler)
      try:
        config_lib.validate(enabled)
      except ConfigError:
        continue
      if getattr(enabled, name) != value:
        _check_flag(enabled, name, value, _exchange_fingerprint)
  # Sanity: the table is not vacuous for the collaborative algorithms.
  if algorithm != "centralized" and algorithm != "standalone":
    assert "changed" in outcomes.values()
  if algorithm in ("standalone", "centralized"):
    assert set(outcomes.values()) == {"rejected"}


def _run_fingerprint(cfg):
  exp = experiment.setup(cfg)
  state = exp.init_state
  for e in range(1, cfg.epochs + 1):
    state, _ = exp.epoch_fn(state, exp.images, exp.labels,
                            experiment.epoch_key(exp.train_key, e))
  acc, _ = exp.evaluate(state)
  return [np.asarray(state["local"]), np.asarray(acc)], None


RUN_ALTERNATIVES = {
    "model": "digits_cnn", "learning_rate": 0.2, "batch_size": 4,
    "num_participants": 2, "samples_per_participant": 20, "epochs": 1,
    "seed": 3, "partition": "shards", "standardize": True,
    "eval_examples": 30, "dirichlet_alpha": 2.0, "data_seed": 7,
    "num_seeds": 2,
}


@pytest.mark.slow(seconds=30)
def test_every_data_and_training_flag_changes_the_run_or_is_rejected():
  # These flags are read the same way by every algorithm (run/experiment.py
  # and run/build.data); DSSGD's parallel protocol stands for all of them.
  base = config_lib.validate(_base("dssgd", "parallel", "none"))
  outcomes = {n: _check_flag(base, n, v, _run_fingerprint)
              for n, v in RUN_ALTERNATIVES.items()}
  assert outcomes["dirichlet_alpha"] == "rejected"  # needs dirichlet
  assert list(outcomes.values()).count("changed") == len(outcomes) - 1


def test_the_tables_cover_every_flag():
  covered = (set(EXCHANGE_ALTERNATIVES) | set(RUN_ALTERNATIVES) | {
      "algorithm", "dataset"} | {
          # Same numbers by design, or what the run writes (module doc).
          "conv_impl", "participant_axis", "mesh_shape", "cpu_devices",
          "coordinator_address", "num_processes", "process_id", "workdir",
          "progress", "checkpoint_every", "eval_every", "data_source",
          "data_dir", "svhn_paper_split", "svhn_test_examples",
          # tests/test_seeds.py: the split per seed; the same numbers.
          "vary_partition", "seed_axis"})
  assert covered == set(config_lib.FIELDS)


def test_unread_flags_are_rejected_with_the_reason():
  base = config_lib.Config(**TINY)
  cases = [
      (dict(algorithm="fedavg", upload_fraction=0.5), "--upload_fraction"),
      (dict(algorithm="fedavg", clip_bound=0.1), "--clip_bound"),
      (dict(algorithm="fedavg", download_fraction=0.5), "--download_fraction"),
      (dict(noise="svt", epsilon=1.0, clip_bound=0.1, l2_clip=1.0),
       "--l2_clip"),
      (dict(protocol="round_robin", staleness="uniform"), "--staleness"),
      (dict(protocol="round_robin", max_staleness=2), "--max_staleness"),
      (dict(algorithm="standalone", noise="laplace", noise_scale=1.0),
       "--noise"),
      (dict(eval_examples=361), "--eval_examples"),
      (dict(download_fraction=0.1, download_rule="all"), "--download_rule"),
      (dict(selection="largest", noise="gaussian", noise_scale=1.0,
            l2_clip=1.0, delta=1e-6), "--delta"),
      (dict(model="mnist_cnn"), "--model=mnist_cnn"),
      (dict(seed=-1), "--seed"),
      (dict(vary_partition=True), "--vary_partition"),
      (dict(seed_axis="vmap"), "--seed_axis"),
      (dict(num_seeds=0), "--num_seeds"),
      (dict(num_seeds=3, seed=2**32 - 2), "--num_seeds"),
      (dict(seed=2**70), "--seed"),
      (dict(learning_rate=float("inf")), "must be finite"),
  ]
  for over, needle in cases:
    with pytest.raises(ConfigError, match=needle.replace("+", r"\+")):
      config_lib.validate(base.replace(**over))


def test_for_algorithm_gives_a_valid_baseline_of_any_preset():
  preset = config_lib.validate(config_lib.Config(
      **TINY, upload_fraction=0.01, download_fraction=0.5, stat_decay=0.9,
      noise="svt", epsilon=1.0, clip_bound=0.1, protocol="async",
      max_staleness=1, upload_loss=0.2))
  for alg in ("standalone", "centralized", "fedavg", "dssgd"):
    cfg = config_lib.validate(config_lib.for_algorithm(
        preset, alg, noise="none" if alg != "dssgd" else preset.noise))
    assert cfg.algorithm == alg
