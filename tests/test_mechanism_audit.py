"""The mechanism audit: a measured lower bound on each upload rule's ε.

Every chain the command line can build is audited on its worst-case
neighbouring inputs: the bound never exceeds the claim, the tight chains
(Laplace and Gaussian at a claim of ε = 1 per upload) are measured to within
2x of their claim, a rule with a false declaration (x100 after the clip) is
caught, and chains without a guarantee show a large bound. The statistics are
``jax_privacy.auditing``'s; they are checked here against a slow,
obviously correct Clopper–Pearson computation with scipy.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dssgd_jax import accounting
from dssgd_jax import mechanism_audit
from dssgd_jax import rules
from dssgd_jax.run import build
from dssgd_jax.run import config as config_lib

D = 10          # c = ceil(0.1 * 10) = 1 slot: the tight case
GAMMA = 0.01


def _times_100():
  """A rule that multiplies the values by 100 and declares it changes
  nothing (the identity as its privacy): a false declaration."""
  return rules.UploadRule(
      lambda up, key: up._replace(values=100.0 * up.values), lambda p: p,
      "times_100")


def _gaussian_sigma_for_epsilon_1(l2_bound):
  z = accounting.gaussian_noise_multiplier(1.0, 1, 1e-5)
  return z * l2_bound


def test_clopper_pearson_bound_matches_a_slow_reference():
  rng = np.random.default_rng(0)
  in_s = rng.normal(1.0, 1.0, 4000)
  out_s = rng.normal(0.0, 1.0, 4000)
  t, alpha = 1.5, 0.05
  tp, fp = int(np.sum(in_s >= t)), int(np.sum(out_s >= t))
  # One-sided Clopper–Pearson bounds at alpha/2 each.
  tpr_lb = stats.beta.ppf(alpha / 2, tp, 4000 - tp + 1)
  fpr_ub = stats.beta.ppf(1 - alpha / 2, fp + 1, 4000 - fp)
  want = max(0.0, math.log(tpr_lb / fpr_ub))
  got = mechanism_audit.epsilon_at(in_s, out_s, t, alpha, 0.0)
  assert got == pytest.approx(want, rel=1e-6)


def test_neighbouring_inputs_saturate_the_declared_bounds():
  rule = rules.chain(rules.select_random(3), rules.l2_clip(0.5),
                     rules.clip(0.1), rules.laplace(1.0))
  assert set(mechanism_audit.declared_bounds(rule, D)) == {0.1, 0.5}
  pairs = mechanism_audit.neighbouring_inputs(D, 2.0)
  assert set(pairs) == set(mechanism_audit.PAIRS)
  for first, second in pairs.values():
    assert first.shape == second.shape == (D,)
    assert not np.array_equal(first, second)


@pytest.mark.slow(seconds=25)
def test_laplace_at_epsilon_1_is_measured_tightly():
  rule = rules.chain(rules.select_random(1), rules.clip(GAMMA),
                     rules.laplace(2 * GAMMA))
  res = mechanism_audit.audit_rule(rule, D, trials=500_000,
                                   pilot_trials=50_000)
  assert res.claim_epsilon == pytest.approx(1.0)
  assert 0.5 <= res.epsilon_lower <= 1.0, res.summary()
  assert res.pair == "sign"


@pytest.mark.slow(seconds=25)
def test_gaussian_at_epsilon_1_is_measured_within_2x():
  sigma = _gaussian_sigma_for_epsilon_1(GAMMA)  # clip(γ) on 1 slot: C = γ
  rule = rules.chain(rules.select_random(1), rules.clip(GAMMA),
                     rules.gaussian(sigma))
  res = mechanism_audit.audit_rule(rule, D, trials=1_000_000,
                                   pilot_trials=100_000)
  assert res.claim_epsilon == pytest.approx(1.0, abs=2e-3)
  assert res.claim_delta == 1e-5 and res.delta == 1e-5
  assert 0.5 <= res.epsilon_lower <= res.claim_epsilon, res.summary()


def test_a_false_declaration_is_caught():
  # clip(γ), then x100 declared as the identity, then Laplace(2γ): the claim
  # stays ε = 1 per upload; the truth is 100.
  rule = rules.chain(rules.select_random(1), rules.clip(GAMMA), _times_100(),
                     rules.laplace(2 * GAMMA))
  res = mechanism_audit.audit_rule(rule, D, trials=100_000,
                                   pilot_trials=20_000)
  assert res.claim_epsilon == pytest.approx(1.0)
  assert res.epsilon_lower > 5.0 and not res.consistent, res.summary()
  assert "EXCEEDS THE CLAIM" in res.summary()


def test_data_dependent_selection_without_noise_is_told_apart():
  res = mechanism_audit.audit_rule(
      rules.chain(rules.select_largest(1), rules.clip(GAMMA),
                  rules.laplace(2 * GAMMA)), D, trials=50_000,
      pilot_trials=10_000)
  assert res.claim_epsilon is None and "select_largest" in res.reason
  assert res.pair == "support" and res.score.endswith("presence")
  assert res.epsilon_lower > 8.0, res.summary()  # ln(50,000/3.7) = 9.5


def _cli_configs():
  """Every upload chain the command line builds (DSSGD and FedAvg), with
  parameters giving a claim near ε = 1 per upload where there is one."""
  base = dict(dataset="digits", num_participants=3,
              samples_per_participant=24, batch_size=8, upload_fraction=0.1)
  laplace = dict(noise="laplace", noise_scale=2 * GAMMA)
  sigma = _gaussian_sigma_for_epsilon_1(GAMMA)
  out = []
  for selection in config_lib.SELECTIONS:
    for noise, bound in itertools.product(
        ["none", "laplace", "gaussian"],
        [dict(clip_bound=GAMMA), dict(l2_clip=GAMMA),
         dict(clip_bound=GAMMA, l2_clip=GAMMA)]):
      over = dict(base, selection=selection, **bound)
      if noise == "laplace":
        over.update(laplace)
      elif noise == "gaussian":
        over.update(noise="gaussian", noise_scale=sigma)
      if selection == "threshold":
        over["threshold"] = GAMMA / 2
      out.append(over)
  out.append(dict(base, noise="svt", epsilon=1.0, clip_bound=GAMMA,
                  threshold=GAMMA / 2))
  out.append(dict(base, algorithm="fedavg", noise="gaussian", l2_clip=GAMMA,
                  noise_scale=sigma, upload_fraction=0.1))
  return out


@pytest.mark.slow(seconds=30)
def test_every_cli_chain_has_a_bound_below_its_claim():
  """Every distinct chain with a claim is audited; of the chains without
  one, one per reason (a data-dependent selection, no noise) shows that the
  audit finds the difference the missing guarantee allows."""
  chains, without = {}, {}
  for over in _cli_configs():
    try:
      cfg = build.validate(config_lib.Config(**over))
    except config_lib.ConfigError:
      continue  # a combination the command line rejects
    rule = build.upload_rule(cfg, D)
    claim = rules.claim(rule, D, 1)
    if claim.epsilon is not None:
      chains[repr(rule)] = rule
    else:
      without.setdefault(claim.reason.split(" ")[0], rule)
  assert len(chains) >= 8 and len(without) >= 3, (chains, without)
  for rule in list(chains.values()) + list(without.values()):
    res = mechanism_audit.audit_rule(rule, D, trials=40_000,
                                     pilot_trials=8_000, confidence=0.99)
    assert res.consistent, res.summary()
    if res.claim_epsilon is None:
      assert res.epsilon_lower > 8.0, res.summary()  # ln(40,000/4.6) = 9.1
    else:
      assert res.epsilon_lower > 0.05, res.summary()  # not vacuous


def test_checked_mode_runs_every_built_in_rule():
  """Every built-in rule's declaration holds on its outputs, including the
  edge cases: nothing passes a threshold, values far beyond the bounds,
  a chain after a noise rule."""
  built_in = [
      rules.select_largest(3), rules.select_largest_approx(3),
      rules.select_random(3), rules.select_threshold(3, 0.5),
      rules.clip(0.1), rules.l2_clip(0.2), rules.laplace(0.3),
      rules.gaussian(0.3), rules.svt(3, 1.0, 0.1, 0.05),
  ]
  chains = [rules.chain(r) for r in built_in] + [
      rules.chain(rules.select_random(4), rules.l2_clip(0.2), rules.clip(0.1),
                  rules.gaussian(0.5)),
      rules.chain(rules.select_threshold(D, 0.5), rules.clip(0.1),
                  rules.laplace(0.3)),
      rules.chain(rules.l2_clip(1.0), rules.gaussian(0.5),
                  rules.select_largest(2), rules.clip(0.05)),
      rules.chain(rules.chain(rules.select_random(5), rules.clip(0.1)),
                  rules.svt(2, 10.0, 0.1, 0.0)),
  ]
  inputs = [jnp.zeros(D), 10.0 * jnp.ones(D), jnp.linspace(-3.0, 3.0, D),
            0.01 * jax.random.normal(jax.random.key(3), (D,))]
  keys = jax.random.split(jax.random.key(0), 16)
  for rule in chains:
    fn = rules.with_checks(jax.vmap(
        lambda d, k, r=rules.checked(rule): r.apply(rules.dense(d), k),
        in_axes=(None, 0)))
    plain = jax.vmap(lambda d, k, r=rule: r.apply(rules.dense(d), k),
                     in_axes=(None, 0))
    for x in inputs:
      got = fn(x, keys)
      want = plain(x, keys)
      # checked computes the same (values to float rounding: its program
      # fuses differently).
      np.testing.assert_array_equal(got.indices, want.indices)
      np.testing.assert_array_equal(got.mask, want.mask)
      np.testing.assert_allclose(got.values, want.values, rtol=1e-6,
                                 atol=1e-7)


def test_checked_mode_catches_false_declarations():
  wrong_slots = rules.UploadRule(
      lambda up, key: up, lambda p: dataclasses_replace(p, slots=1),
      "claims_one_slot")
  with pytest.raises(rules.DeclarationError, match="claims_one_slot declares 1 slots"):
    rules.with_checks(rules.checked(rules.chain(wrong_slots)).apply)(
        rules.dense(jnp.ones(D)), jax.random.key(0))
  rule = rules.checked(rules.chain(rules.select_random(2), rules.l2_clip(0.1),
                                   _times_100()))
  with pytest.raises(rules.DeclarationError,
                     match="times_100 declares an L2 norm of at most 0.1"):
    rules.with_checks(jax.vmap(rule.apply, in_axes=(None, 0)))(
        rules.dense(jnp.ones(D)), jax.random.split(jax.random.key(0), 3))


def dataclasses_replace(p, **kw):
  import dataclasses  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(p, **kw)


def test_undeclared_rules_fail_closed():
  silent = rules.UploadRule(lambda up, key: up, name="silent")
  for rule in (rules.chain(rules.select_random(1), rules.clip(GAMMA), silent,
                           rules.laplace(2 * GAMMA)),
               rules.chain(rules.select_random(1), rules.clip(GAMMA),
                           rules.laplace(2 * GAMMA), silent)):
    c = rules.claim(rule, D, 5)
    assert c.epsilon is None
    assert c.reason.startswith("silent declares no privacy property")
  # The same chain without it keeps its claim.
  assert rules.claim(rules.chain(rules.select_random(1), rules.clip(GAMMA),
                                 rules.laplace(2 * GAMMA)), D, 5).epsilon == 5
