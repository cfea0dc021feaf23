"""Every flag changes the run or is rejected (issue "Compose in code, run like
the command line").

Validation (``run.build.validate``) decides from what the plan builder read,
not from a list of cases. These tests check that decision against what runs:

* **Randomized:** configs are drawn at random over algorithms × protocols ×
  noise × selection × download rule × aggregation × the fractions at their
  edges (0, 1) and between. For every config that validates, every flag that
  differs from its default must change the run: the run with that flag reset
  to its default differs — unless the flag's value is what the builder
  resolved anyway (``--protocol=parallel`` for FedAvg). The run is the real
  exchange (the plan's upload rule, download rule, aggregation and
  protocol) over a cheap stand-in local epoch (D = 64, a data- and
  key-dependent step), so a variant compiles in a fraction of a second; its
  fingerprint is everything the exchange produces in three epochs (server
  parameters and counters, every participant's parameters, the entries
  sent and received, the lost transfers, the bytes) and the privacy claim.
* **The issue's cases** that gave exactly the metrics of the run without the
  flag are rejected or change the run.
* **Data, model and training flags** change a real (tiny) run's parameters.
* Flags that choose *how* or *where* the same computation runs
  (``--conv_impl``, ``--participant_axis``, ``--mesh_shape``,
  ``--cpu_devices``, the multi-host flags, ``--seed_axis``) give the same
  numbers by design (tests/test_participant_axis.py, tests/test_sharding.py,
  tests/test_seeds.py); flags that change what a run writes or prints
  (``--workdir``, ``--progress``, ``--checkpoint_every``, ``--eval_every``)
  are tested in tests/test_experiment.py and tests/test_resume.py; the data
  source flags need files (tests/test_data.py).
"""

import functools
import random
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dssgd_jax import participant
from dssgd_jax import protocols
from dssgd_jax import server as server_lib
from dssgd_jax.errors import ConfigError
from dssgd_jax.participant import LocalState, ParticipantData
from dssgd_jax.run import build
from dssgd_jax.run import config as config_lib
from dssgd_jax.run import experiment

TINY = dict(dataset="digits", model="digits_mlp", num_participants=3,
            samples_per_participant=24, batch_size=8, learning_rate=0.1,
            epochs=2, eval_examples=60, progress=False)
D = 64

# The values each exchange flag is drawn from (the first is the default).
CHOICES = {
    "algorithm": ["dssgd", "dssgd", "dssgd", "fedavg", "standalone",
                  "centralized"],
    "protocol": ["round_robin", "parallel", "async"],
    "noise": ["none", "laplace", "gaussian", "svt"],
    "selection": ["largest", "random", "threshold", "largest_approx"],
    "upload_fraction": [0.1, 0.0, 1.0, 0.3],
    "download_fraction": [1.0, 0.0, 0.5],
    "download_rule": ["auto", "all", "most_updated", "random"],
    "aggregation": ["auto", "sum", "weighted_mean", "entry_mean"],
    "server_learning_rate": [1.0, 0.5],
    "server_momentum": [0.0, 0.5],
    "stat_decay": [1.0, 0.5],
    "decay_every": [1, 2],
    "clip_bound": [None, 0.05],
    "l2_clip": [None, 0.1],
    "noise_scale": [0.0, 0.05],
    "epsilon": [None, 10.0],
    "threshold": [1e-4, 0.01],
    "delta": [1e-5, 1e-3],
    "staleness": ["constant", "uniform", "geometric"],
    "max_staleness": [0, 1, 3],
    "upload_loss": [0.0, 0.5, 1.0],  # 1 is rejected
    "download_loss": [0.0, 0.5, 1.0],  # 1 is rejected
}
NUM_CONFIGS = 24


def _stand_in_epoch(local, x, y, key, count=None):
  """A data- and key-dependent 'local epoch' that compiles at once; its
  updates (about N(0, 1) per entry) are large enough that every bound the
  draws can set binds (γ = 0.05, C = 0.1)."""
  step = jnp.mean(x) + jnp.mean(y) * 0.01 + jax.random.normal(
      key, local.params.shape)
  return local._replace(params=local.params - step), jnp.mean(step ** 2)


_TRAINER = participant.Trainer(lambda w: LocalState(w, ()), _stand_in_epoch,
                               False, optax.sgd(0.1))


@functools.lru_cache(maxsize=None)
def _data():
  kx, ky = jax.random.split(jax.random.key(1))
  return ParticipantData(jax.random.uniform(kx, (3, 4, 2)),
                         jax.random.randint(ky, (3, 4), 0, 10).astype(
                             jnp.float32))


def _exchange_fingerprint(cfg):
  """Everything the exchange produces in three epochs (module doc)."""
  plan = build.plan(cfg, num_params=D)
  update = participant.make_update(_TRAINER, plan.upload_rule)
  proto = experiment.make_protocol(plan, update,
                                   protocols.ParticipantAxis("vmap"))
  init = jnp.linspace(-1.0, 1.0, D)
  state = proto.init(server_lib.init(init),
                     LocalState(jnp.tile(init[None], (3, 1)), ()))
  fn = jax.jit(proto.epoch)
  out = []
  for e in range(3):  # three: a staleness of 1 and of 3 differ from epoch 3
    state, stats = fn(state, _data(), jax.random.key(e))
    out += [np.asarray(state.server.params), np.asarray(state.server.stat),
            np.asarray(state.local.params), np.asarray(stats.uploaded),
            np.asarray(stats.downloaded), np.asarray(stats.upload_lost),
            np.asarray(server_lib.wire_bytes(stats.uploaded, D)),
            np.asarray(server_lib.wire_bytes(stats.downloaded, D))]
  claim = plan.claim(3)
  return out, (claim.epsilon, claim.delta, claim.reason)


def _same(a, b):
  (xa, ca), (xb, cb) = a, b
  return ca == cb and len(xa) == len(xb) and all(
      u.shape == v.shape and np.array_equal(u, v) for u, v in zip(xa, xb))


def _draw(rng: random.Random) -> config_lib.Config:
  over = {}
  for name, values in CHOICES.items():
    if rng.random() < 0.5 or name == "algorithm":
      over[name] = rng.choice(values)
  # Make the noise modes usable more often than chance would.
  if over.get("noise") in ("laplace", "gaussian"):
    over.setdefault("noise_scale", 0.05)
    over.setdefault("l2_clip" if over["noise"] == "gaussian" else
                    "clip_bound", 0.1 if over["noise"] == "gaussian" else
                    0.05)
  if over.get("noise") == "svt":
    over.setdefault("epsilon", 10.0)
    over.setdefault("clip_bound", 0.05)
  return config_lib.Config(**TINY, **over)


@pytest.mark.slow(seconds=100)
def test_random_configs_every_flag_changes_the_run_or_is_rejected():
  rng = random.Random(20261204)
  defaults = config_lib.DEFAULTS
  accepted = rejected = checked = 0
  t0 = time.time()
  while accepted < NUM_CONFIGS:
    cfg = _draw(rng)
    try:
      cfg = build.validate(cfg)
    except ConfigError as e:
      assert str(e).startswith("--") and "\n" not in str(e), str(e)
      rejected += 1
      continue
    accepted += 1
    resolved = build.record(cfg).resolved
    base = _exchange_fingerprint(cfg)
    for name in CHOICES:
      value, default = getattr(cfg, name), getattr(defaults, name)
      if value == default:
        continue
      try:
        other = build.validate(cfg.replace(**{name: default}))
      except ConfigError:
        continue  # without the flag the run is not even valid: it matters
      checked += 1
      if resolved.get(name) == value:
        continue  # says what runs anyway (e.g. FedAvg's parallel rounds)
      assert not _same(base, _exchange_fingerprint(other)), (
          f"--{name}={value!r} was accepted but changed nothing in {cfg}")
  print(f"{accepted} configs accepted, {rejected} rejected, {checked} flags "
        f"checked, {time.time() - t0:.0f} s")
  assert checked > 2 * NUM_CONFIGS


@pytest.mark.parametrize("over,flag", [
    # The cases of the issue that gave the metrics of the run without them.
    (dict(upload_fraction=0.0, protocol="parallel"), "--protocol"),
    (dict(download_fraction=0.0, stat_decay=0.5), "--stat_decay"),
    (dict(download_fraction=0.0, download_loss=0.5), "--download_loss"),
    (dict(upload_fraction=1.0, selection="random"), "--selection"),
    (dict(selection="largest_approx"), "--selection"),  # exact on CPU
])
def test_the_issues_no_effect_cases_are_rejected(over, flag):
  with pytest.raises(ConfigError, match=flag) as e:
    build.validate(config_lib.Config(**TINY, **over))
  assert "has no effect on this run" in str(e.value)


def test_flags_that_matter_in_the_issues_cases_are_accepted():
  # --participant_axis with θu = 0 (a parallel standalone run): accepted,
  # not rejected for "round_robin visits one at a time"; FedAvg clips with
  # --clip_bound, as its builder does.
  build.validate(config_lib.Config(**TINY, upload_fraction=0.0,
                                   participant_axis="map"))
  cfg = build.validate(config_lib.Config(**TINY, algorithm="fedavg",
                                         clip_bound=0.1))
  assert "clip(0.1)" in repr(build.plan(cfg).upload_rule)


def _run_fingerprint(cfg):
  exp = experiment.setup(cfg)
  state = exp.init_state
  for e in range(1, cfg.epochs + 1):
    state, _ = exp.epoch_fn(state, exp.data,
                            experiment.epoch_key(exp.train_key, e))
  acc, _ = exp.evaluate(state)
  return [np.asarray(state.protocol.local.params), np.asarray(acc)], None


RUN_ALTERNATIVES = {
    "model": "digits_cnn", "learning_rate": 0.2, "batch_size": 4,
    "num_participants": 2, "samples_per_participant": 20, "epochs": 1,
    "seed": 3, "partition": "shards", "standardize": True,
    "eval_examples": 30, "dirichlet_alpha": 2.0, "data_seed": 7,
    "num_seeds": 2, "optimizer": "adam", "momentum": 0.9,
    "weight_decay": 0.01, "lr_schedule": "cosine", "size_skew": 0.5,
    "participant_sizes": "10,30,20",
}
_BASE_PRINTS = {}


def _check_flag(base, name, value):
  changed = base.replace(**{name: value})
  try:
    changed = build.validate(changed)
  except ConfigError as e:
    assert f"--{name}" in str(e), (name, str(e))
    assert "\n" not in str(e)
    return "rejected"
  if base not in _BASE_PRINTS:
    _BASE_PRINTS[base] = _run_fingerprint(build.validate(base))
  assert not _same(_BASE_PRINTS[base], _run_fingerprint(changed)), (
      f"--{name}={value!r} was accepted but changed nothing in {base}")
  return "changed"


@pytest.mark.slow(seconds=40)
def test_every_data_and_training_flag_changes_the_run_or_is_rejected():
  base = build.validate(config_lib.Config(**TINY, protocol="parallel"))
  outcomes = {n: _check_flag(base, n, v) for n, v in RUN_ALTERNATIVES.items()}
  assert outcomes["dirichlet_alpha"] == "rejected"  # needs dirichlet
  assert list(outcomes.values()).count("changed") == len(outcomes) - 1
  # The optimizer's own flags, where they are read.
  momentum = base.replace(momentum=0.9)
  assert _check_flag(momentum, "nesterov", True) == "changed"
  assert _check_flag(momentum, "reset_optimizer", True) == "changed"
  assert _check_flag(base, "reset_optimizer", True) == "rejected"  # plain SGD
  assert _check_flag(base, "nesterov", True) == "rejected"


def test_every_flag_is_covered_somewhere():
  covered = (set(CHOICES) | set(RUN_ALTERNATIVES) | {
      "dataset", "nesterov", "reset_optimizer"} | {
          # Same numbers by design, or what the run writes (module doc).
          "conv_impl", "participant_axis", "mesh_shape", "cpu_devices",
          "coordinator_address", "num_processes", "process_id", "workdir",
          "progress", "checkpoint_every", "eval_every", "data_source",
          "data_dir", "svhn_paper_split", "svhn_test_examples",
          # tests/test_seeds.py: the split per seed; the same numbers.
          "vary_partition", "seed_axis",
          # tests/test_canaries.py, tests/test_mechanism_audit.py.
          "canaries", "canary_scale", "checked"})
  assert covered == set(config_lib.FIELDS)


def test_unread_flags_are_rejected_with_the_reason():
  base = config_lib.Config(**TINY)
  cases = [
      (dict(algorithm="fedavg", upload_fraction=0.5), "--upload_fraction"),
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
      (dict(canary_scale=0.1), "--canary_scale"),
      (dict(num_processes=2), "--num_processes"),
      (dict(size_skew=1.0, participant_sizes="10,20,30"), "--size_skew"),
      (dict(participant_sizes="10,20"), "--participant_sizes"),
  ]
  for over, needle in cases:
    with pytest.raises(ConfigError, match=needle.replace("+", r"\+")):
      build.validate(base.replace(**over))


def test_for_algorithm_gives_a_valid_baseline_of_any_preset():
  preset = build.validate(config_lib.Config(
      **TINY, upload_fraction=0.01, download_fraction=0.5, stat_decay=0.9,
      noise="svt", epsilon=1.0, clip_bound=0.1, protocol="async",
      max_staleness=1, upload_loss=0.2))
  for alg in ("standalone", "centralized", "fedavg", "dssgd"):
    cfg = build.validate(build.for_algorithm(
        preset, alg, noise="none" if alg != "dssgd" else preset.noise))
    assert cfg.algorithm == alg
