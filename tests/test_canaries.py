"""The end-to-end audit: canaries scored from what the server received.

The canaries' design and scoring against numpy; the one-run statistics are
``jax_privacy.auditing``'s. Then whole runs: without noise the measured bound
is clearly positive (the claim is "no guarantee"), with the sparse vector
technique and with random selection + Laplace it stays below the claim.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from dssgd_jax import canaries
from dssgd_jax.run import build
from dssgd_jax.run import config as config_lib
from dssgd_jax.run import experiment
from dssgd_jax.selection import Upload
from dssgd_jax.tools import audit

TINY = dict(dataset="digits", model="digits_mlp", num_participants=4,
            samples_per_participant=60, batch_size=20, learning_rate=0.1,
            epochs=3, eval_examples=100, progress=False, protocol="parallel",
            canaries=400)


def test_design_and_vectors():
  c = canaries.draw(9, num_participants=3, num_params=40, seed=1)
  assert len(set(c.index.tolist())) == 9
  assert set(c.sign.tolist()) <= {-1.0, 1.0}
  v = canaries.vectors(c, 3, 40)
  for k in range(9):
    want = c.sign[k] if c.included[k] else 0.0
    assert v[c.owner[k], c.index[k]] == want
  assert np.count_nonzero(v) == int(c.included.sum())
  again = canaries.draw(9, 3, 40, seed=1)
  assert all(np.array_equal(a, b) for a, b in zip(c, again))


def test_observe_equals_numpy():
  rng = np.random.default_rng(0)
  p, cap, d, m = 3, 5, 20, 6
  idx = np.stack([rng.choice(d, cap, replace=False) for _ in range(p)])
  vals = rng.normal(size=(p, cap)).astype(np.float32)
  mask = rng.random((p, cap)) < 0.7
  owner = rng.integers(0, p, m)
  index = np.array([idx[o, rng.integers(0, cap)] if k % 2 else
                    rng.integers(0, d) for k, o in enumerate(owner)])
  sign = rng.choice([-1.0, 1.0], m).astype(np.float32)
  got = canaries.observe(Upload(jnp.asarray(idx), jnp.asarray(vals),
                                jnp.asarray(mask)), jnp.asarray(owner),
                         jnp.asarray(index), jnp.asarray(sign))
  want = np.zeros(m)
  for k in range(m):
    for s in range(cap):
      if mask[owner[k], s] and idx[owner[k], s] == index[k]:
        want[k] += sign[k] * vals[owner[k], s]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def _audited(tmp_path, name, **over):
  cfg = build.validate(config_lib.Config(
      **dict(TINY, **over), workdir=str(tmp_path / name)))
  experiment.run(cfg)
  return audit.audit_run(cfg.workdir, attacks=("loss",))


def test_without_noise_the_bound_is_clearly_positive(tmp_path):
  res = _audited(tmp_path, "plain")
  can = res["canary"]
  assert res["epsilon_spent"] is None  # no guarantee
  assert can["num_canaries"] == 400 and 150 < can["num_included"] < 250
  assert can["epsilon_lower"] > 3.0, can
  assert can["auc"] > 0.99 and can["tpr_at_1pct_fpr"] > 0.9
  assert os.path.exists(tmp_path / "plain" / "canaries.npz")
  assert "What the server received" in audit.format_report(res)


@pytest.mark.parametrize("over", [
    dict(noise="svt", epsilon=0.5, clip_bound=0.01, threshold=0.001,
         upload_fraction=0.01),
    dict(selection="random", clip_bound=0.01, noise="laplace",
         noise_scale=2.0, upload_fraction=0.01),
], ids=["svt", "random+laplace"])
def test_with_noise_the_bound_stays_below_the_claim(tmp_path, over):
  res = _audited(tmp_path, "noisy", **over)
  can = res["canary"]
  assert res["epsilon_spent"] is not None
  assert can["epsilon_lower"] <= res["epsilon_spent"], (can, res)
  assert can["consistent"]
