"""Tests of the membership-inference audit (dssgd_jax.audit).

The AUC and advantage are checked against slow references (scikit-learn's
roc_auc_score, a brute-force threshold sweep) on random scores with ties; the
whole audit is checked on a deliberately overfit model (attack far above
chance) and on a model that has not learned anything (attack at chance).
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dssgd_jax.tools import audit
from dssgd_jax.run import build
from dssgd_jax.run import config as config_lib
from dssgd_jax.run import experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(dataset="digits", model="digits_mlp", batch_size=10,
            eval_examples=120, progress=False)


def _brute_force_advantage(pos, neg):
  best = 0.0
  for t in np.concatenate([pos, neg, [np.inf]]):
    best = max(best, np.mean(pos >= t) - np.mean(neg >= t))
  return best


@pytest.mark.parametrize("m,n,levels", [(7, 5, 3), (50, 80, 10),
                                        (200, 200, 1000), (1, 1, 2)])
def test_auc_and_advantage_match_slow_references(m, n, levels):
  rng = np.random.default_rng(m * 1000 + n)
  for _ in range(20):
    pos = rng.integers(0, levels, m).astype(float)  # many ties
    neg = rng.integers(0, levels, n).astype(float) - 0.3 * rng.integers(0, 2)
    labels = np.r_[np.ones(m), np.zeros(n)]
    scores = np.r_[pos, neg]
    res = audit.attack_metrics(pos, neg)
    if m > 0 and n > 0 and len(set(labels)) == 2:
      assert res["auc"] == pytest.approx(roc_auc_score(labels, scores),
                                         abs=1e-12)
    assert res["advantage"] == pytest.approx(
        _brute_force_advantage(pos, neg), abs=1e-12)


def test_metrics_extremes():
  assert audit.attack_metrics(np.array([2., 3.]), np.array([0., 1.])) == {
      "auc": 1.0, "advantage": 1.0}
  assert audit.attack_metrics(np.array([0., 1.]), np.array([2., 3.])) == {
      "auc": 0.0, "advantage": 0.0}
  same = audit.attack_metrics(np.ones(10), np.ones(10))
  assert same == {"auc": 0.5, "advantage": 0.0}
  with pytest.raises(ValueError):
    audit.attack_metrics(np.array([np.nan]), np.array([0.]))


def test_per_example_stats_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 6, 10)) * 5
  labels = rng.integers(0, 10, size=(3, 6))
  s = audit.per_example_stats(jnp.asarray(logits, jnp.float32),
                              jnp.asarray(labels))
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  lp_y = np.take_along_axis(logp, labels[..., None], -1)[..., 0]
  others = np.where(np.eye(10, dtype=bool)[labels], -np.inf, logits)
  z_y = np.take_along_axis(logits, labels[..., None], -1)[..., 0]
  np.testing.assert_allclose(s["loss"], -lp_y, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(s["logit_conf"],
                             lp_y - np.log1p(-np.exp(lp_y)), rtol=1e-3,
                             atol=1e-3)
  np.testing.assert_allclose(s["margin"], z_y - others.max(-1), rtol=1e-5,
                             atol=1e-5)
  # A very confident example keeps a positive, ordered loss (no rounding to 0).
  big = audit.per_example_stats(jnp.array([[40., 0.], [50., 0.]]),
                                jnp.array([0, 0]))
  assert 0 < float(big["loss"][1]) < float(big["loss"][0])


def test_calibrated_scores_subtract_reference_mean():
  target = {"logit_conf": np.array([3.0, 1.0])}
  refs = {"logit_conf": np.array([[1.0, 0.0], [3.0, 2.0]])}
  std = audit.pooled_reference_std(refs["logit_conf"])
  assert std == pytest.approx(np.sqrt(2.0))
  np.testing.assert_allclose(
      audit.membership_scores("calibrated", target, refs),
      np.array([1.0, 0.0]) / np.sqrt(2.0))
  with pytest.raises(ValueError):
    audit.membership_scores("calibrated", target)


def test_choose_examples_balanced_and_deterministic():
  cfg = config_lib.Config(algorithm="standalone")
  parts = np.arange(40).reshape(4, 10)
  mem, non = audit.choose_examples(cfg, parts, num_test=25, seed=3)
  assert mem.shape == non.shape == (4, 10)
  np.testing.assert_array_equal(mem, parts)
  assert all(len(set(r)) == 10 for r in non) and non.max() < 25
  mem2, non2 = audit.choose_examples(cfg, parts, num_test=25, seed=3)
  np.testing.assert_array_equal(non, non2)
  # Centralized: all 40 members, subsampled to the 25 test examples.
  mem, non = audit.choose_examples(cfg.replace(algorithm="centralized"),
                                   parts, num_test=25, seed=3)
  assert mem.shape == non.shape == (1, 25)
  assert set(mem[0]) <= set(parts.ravel())


def _run(path, **kw):
  cfg = build.validate(config_lib.Config(workdir=str(path),
                                              **dict(TINY, **kw)))
  experiment.run(cfg)
  return cfg


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
  """4 participants alone on 40 digits each for 80 epochs: memorized."""
  return _run(tmp_path_factory.mktemp("overfit"), algorithm="standalone",
              num_participants=4, samples_per_participant=40, epochs=80,
              learning_rate=0.2, eval_every=80, checkpoint_every=80)


def test_audit_detects_an_overfit_model(overfit_run):
  res = audit.audit_run(overfit_run.workdir)
  assert res["attacks"]["member_accuracy"]["mean"] == 1.0
  for attack in audit.ATTACKS:
    assert res["attacks"][attack]["auc"]["mean"] > 0.75, attack
    assert res["attacks"][attack]["advantage"]["mean"] > 0.35, attack
  assert len(res["attacks"]["loss"]["per_model"]["auc"]) == 4
  assert res["num_members"] == res["num_nonmembers"] == 40
  assert res["server"] is None  # standalone: nothing shared
  with open(os.path.join(overfit_run.workdir, "audit.json")) as f:
    assert json.load(f)["attacks"]["loss"] == res["attacks"]["loss"]


def test_audit_of_an_untrained_model_is_at_chance(tmp_path):
  cfg = _run(tmp_path, algorithm="centralized", num_participants=4,
             samples_per_participant=90, epochs=1, learning_rate=1e-6)
  res = audit.audit_run(cfg.workdir)
  assert res["num_members"] == 360  # the whole digits test split
  for attack in ("loss", "margin"):
    assert abs(res["attacks"][attack]["auc"]["mean"] - 0.5) < 0.1, attack
  assert res["attacks"]["calibrated"] is None  # one model, no references


def test_unfinished_and_missing_runs_are_user_errors(tmp_path, overfit_run):
  with pytest.raises(audit.AuditError, match="is not a directory"):
    audit.audit_run(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(audit.AuditError, match="config.json"):
    audit.audit_run(str(tmp_path / "empty"))
  # A copy of the finished run whose config asks for more epochs.
  unfinished = tmp_path / "unfinished"
  unfinished.mkdir()
  with open(os.path.join(overfit_run.workdir, "config.json")) as f:
    cfg = json.load(f)
  cfg["epochs"] = 200
  (unfinished / "config.json").write_text(json.dumps(cfg))
  with open(os.path.join(overfit_run.workdir, "checkpoint.npz"), "rb") as f:
    (unfinished / "checkpoint.npz").write_bytes(f.read())
  with pytest.raises(audit.AuditError, match="unfinished"):
    audit.audit_run(str(unfinished))
  res = audit.audit_run(str(unfinished), allow_unfinished=True, write=False)
  assert res["epoch"] == 80


@pytest.mark.slow(seconds=20)
def test_cli(tmp_path, overfit_run):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "dssgd_jax.audit",
                        str(tmp_path / "missing")], capture_output=True,
                       text=True, cwd=REPO, env=env, check=False)
  assert out.returncode == 2
  assert "Traceback" not in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1
  out = subprocess.run([sys.executable, "-m", "dssgd_jax.audit",
                        "--attacks=loss", overfit_run.workdir],
                       capture_output=True, text=True, cwd=REPO, env=env,
                       check=False)
  assert out.returncode == 0, out.stderr
  assert "loss" in out.stdout and "audit.json" in out.stdout


def test_reproduce_audit_adds_columns(tmp_path):
  from dssgd_jax.tools import reproduce  # pylint: disable=g-import-not-at-top
  base = build.validate(config_lib.Config(
      workdir=str(tmp_path), num_participants=3, samples_per_participant=30,
      epochs=1, learning_rate=0.1, **TINY))
  table = reproduce.reproduce(base, upload_fractions=[],
                              baselines=["standalone"], audit=True,
                              log=lambda msg: None)
  assert "attack AUC / adv." in table and "ε / participant" in table
  with open(tmp_path / "results.json") as f:
    run = json.load(f)["runs"][0]
  assert 0.0 <= run["audit"]["auc"] <= 1.0
  assert os.path.exists(tmp_path / run["name"] / "audit.json")
