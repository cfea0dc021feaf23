"""A plan built by hand runs like the command line.

A rule written here (not in the library), put into a plan built from a
config, runs through the run layer with two seeds; the run is killed after
epoch 1 (a real process exit), rerun, and its metrics, ε and δ, TensorBoard
scalars, checkpoint and summary equal those of the uninterrupted run. A work
directory holding another plan's run is refused with one sentence.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dssgd_jax.errors import ConfigError
from dssgd_jax.run import build
from dssgd_jax.run import config as config_lib
from dssgd_jax.run import experiment
from dssgd_jax.run import outputs

# The script builds the plan: a custom rule (random block + clip + Laplace)
# in a config-built plan, two seeds, and runs it into argv[1].
SCRIPT = textwrap.dedent('''
    import dataclasses, sys
    import jax, jax.numpy as jnp
    from dssgd_jax import rules
    from dssgd_jax.run import build, config, experiment
    from dssgd_jax.selection import Upload

    def select_random_block(count):
        def apply(up, key):
            d = up.values.shape[-1]
            idx = (jax.random.randint(key, (), 0, d) + jnp.arange(count)) % d
            return Upload(up.indices[idx], up.values[idx], up.mask[idx])
        def privacy(p):  # the offset comes from the key, not from the data
            return dataclasses.replace(p, slots=min(count, p.slots))
        return rules.UploadRule(apply, privacy,
                                f"select_random_block({count})")

    cfg = build.validate(config.Config(
        dataset="digits", model="digits_mlp", num_participants=3,
        samples_per_participant=30, batch_size=10, learning_rate=0.1,
        epochs=3, eval_examples=90, protocol="parallel", progress=False,
        num_seeds=2))
    rule = rules.chain(select_random_block(48), rules.clip(0.01),
                       rules.laplace(0.96))   # epsilon = 1 per epoch
    plan = build.plan(cfg).replace(upload_rule=rule, name="random_block")
    summary = experiment.run(plan, workdir=sys.argv[1])
    print(summary["epsilon_spent"])
''')


def _run(tmp_path, workdir, **env):
  script = tmp_path / "custom.py"
  script.write_text(SCRIPT)
  return subprocess.run(
      [sys.executable, str(script), str(workdir)], capture_output=True,
      text=True, timeout=300, env=dict(os.environ, **env), check=False)


def _rows(workdir):
  with open(os.path.join(workdir, outputs.METRICS)) as f:
    rows = [json.loads(l) for l in f]
  for r in rows:
    for k in outputs.TIMING_FIELDS:
      r.pop(k)
  return rows


def _scalars(workdir):
  ea = pytest.importorskip(
      "tensorboard.backend.event_processing.event_accumulator")
  acc = ea.EventAccumulator(os.path.join(str(workdir), "events"),
                            size_guidance={ea.SCALARS: 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
          for tag in acc.Tags()["scalars"]
          if tag not in outputs.TIMING_FIELDS}


@pytest.mark.slow(seconds=45)
def test_a_hand_built_plan_resumes_as_the_command_line_does(tmp_path):
  whole, killed = tmp_path / "whole", tmp_path / "killed"
  out = _run(tmp_path, whole)
  assert out.returncode == 0, out.stderr[-2000:]
  assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(3.0)

  out = _run(tmp_path, killed, **{experiment.KILL_AFTER_EPOCH_ENV: "1"})
  assert out.returncode == experiment.KILLED_EXIT, out.stderr[-2000:]
  assert [r["epoch"] for r in _rows(killed)] == [1]
  out = _run(tmp_path, killed)
  assert out.returncode == 0, out.stderr[-2000:]

  rows = _rows(killed)
  assert rows == _rows(whole)
  assert [r["epsilon_spent"] for r in rows] == pytest.approx([1.0, 2.0, 3.0])
  assert [r["delta_spent"] for r in rows] == [0.0, 0.0, 0.0]
  assert rows[-1]["num_seeds"] == 2 and len(rows[-1]["per_seed"]) == 2
  summaries = [json.loads((w / outputs.SUMMARY).read_text())
               for w in (whole, killed)]
  for s in summaries:  # wall times differ between the two runs
    for part in [s] + s["per_seed"]:
      part.pop("elapsed_s", None)
  assert summaries[0] == summaries[1]
  assert summaries[0]["name"] == "random_block"
  assert summaries[0]["privacy"]["epsilon"] == pytest.approx(3.0)
  with np.load(whole / outputs.CHECKPOINT) as a, np.load(
      killed / outputs.CHECKPOINT) as b:
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert _scalars(killed) == _scalars(whole)
  assert [s for s, _ in _scalars(whole)["epsilon_spent"]] == [1, 2, 3]
  cfg = json.loads((whole / outputs.CONFIG).read_text())
  assert cfg["plan"]["upload_rule"] == (
      "chain(select_random_block(48), clip(0.01), laplace(0.96))")


def test_a_workdir_of_another_plan_is_refused(tmp_path):
  cfg = build.validate(config_lib.Config(
      dataset="digits", model="digits_mlp", num_participants=3,
      samples_per_participant=30, batch_size=10, epochs=1, progress=False,
      workdir=str(tmp_path)))
  experiment.run(cfg)
  from dssgd_jax import rules  # pylint: disable=g-import-not-at-top
  other = build.plan(cfg).replace(
      upload_rule=rules.chain(rules.select_random(10)), epochs=2)
  with pytest.raises(ConfigError, match="holds the run of another plan"):
    experiment.run(other, workdir=str(tmp_path))
