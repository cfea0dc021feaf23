"""Tests of dssgd_jax.accounting (Gaussian mechanism) and SVT composition."""

import doctest
import math
import subprocess
import sys

import dp_accounting
import numpy as np
import pytest
from scipy import optimize
from scipy import stats

from dssgd_jax import accounting


def test_pure_events_compose_to_epochs_times_epsilon():
  for eps in (0.1, 1.0, 8.0):
    for epochs in (0, 1, 7, 100):
      assert accounting.compose(accounting.PureDpEvent(eps), epochs,
                                1e-5) == (pytest.approx(epochs * eps), 0.0)
      # Laplace with noise multiplier b/Δ: ε = Δ/b per release.
      assert accounting.compose(dp_accounting.LaplaceDpEvent(1 / eps), epochs,
                                1e-5)[0] == pytest.approx(epochs * eps)


def test_pure_dp_event_is_a_dp_accounting_event():
  assert issubclass(accounting.PureDpEvent, dp_accounting.DpEvent)
  assert accounting.PureDpEvent is accounting.PureDpEvent  # made once
  assert accounting.PureDpEvent(2.0) == accounting.PureDpEvent(2.0)
  with pytest.raises(AttributeError):
    accounting.NoSuchEvent  # pylint: disable=pointless-statement


def test_commands_start_without_dp_accounting():
  # It pulls in scipy's signal/stats/optimize (1.4–2 s per process): only a
  # run with noise, or a report, imports it, when it computes ε.
  code = ("import sys, dssgd_jax.main, dssgd_jax.flower.client_app; "
          "from dssgd_jax.run import build, config; "
          "cfg = build.validate(config.Config(dataset='digits', "
          "model='digits_mlp', num_participants=3, "
          "samples_per_participant=10, "
          "batch_size=5)); "
          "build.claim(cfg, 100, 3); "
          "print(sorted(m for m in ('dp_accounting', 'scipy.signal') "
          "if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=120, check=True)
  assert out.stdout.strip() == "[]", out.stdout
  code = code.replace("model='digits_mlp'", "model='digits_mlp', "
                      "noise='svt', epsilon=1.0, clip_bound=0.01")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=120, check=True)
  assert "dp_accounting" in out.stdout, out.stdout


def _direct(accountant_cls, z, epochs, delta, **kw):
  acc = accountant_cls(**kw)
  if accountant_cls is dp_accounting.rdp.RdpAccountant:
    for _ in range(epochs):  # one GaussianDpEvent per epoch, one by one
      acc.compose(dp_accounting.GaussianDpEvent(z))
  else:
    acc.compose(dp_accounting.GaussianDpEvent(z), epochs)
  return acc.get_epsilon(delta)


@pytest.mark.parametrize("z,epochs,delta", [(1.0, 1, 1e-5), (2.0, 10, 1e-5),
                                            (5.0, 30, 1e-6)])
def test_gaussian_epsilon_rdp_equals_dp_accounting(z, epochs, delta):
  rdp = dp_accounting.rdp.RdpAccountant
  # add_remove: sensitivity C, so the noise multiplier is z itself.
  assert accounting.gaussian_epsilon(
      z, epochs, delta, "rdp", "add_remove") == pytest.approx(
          _direct(rdp, z, epochs, delta), rel=1e-9)
  # replace (default): sensitivity 2C, noise multiplier z / 2.
  assert accounting.gaussian_epsilon(z, epochs, delta) == pytest.approx(
      _direct(rdp, z / 2, epochs, delta), rel=1e-9)


def test_gaussian_epsilon_pld_equals_dp_accounting():
  z, epochs, delta = 6.0, 10, 1e-5
  pld = dp_accounting.pld.PLDAccountant
  assert accounting.gaussian_epsilon(
      z, epochs, delta, "pld", "add_remove") == pytest.approx(
          _direct(pld, z, epochs, delta), rel=1e-4)
  # replace is what dp_accounting's PLD does under REPLACE_ONE (whose RDP
  # accountant, by contrast, ignores the relation for Gaussian events).
  assert accounting.gaussian_epsilon(z, epochs, delta, "pld") == pytest.approx(
      _direct(pld, z, epochs, delta,
              neighboring_relation=dp_accounting.NeighboringRelation.
              REPLACE_ONE), rel=1e-4)


def _analytic_gaussian_epsilon(mu, delta):
  """ε of a μ-GDP mechanism at δ (Balle & Wang 2018; Dong et al. 2019)."""
  def gap(eps):
    return (stats.norm.cdf(-eps / mu + mu / 2)
            - math.exp(eps + stats.norm.logcdf(-eps / mu - mu / 2)) - delta)
  return optimize.brentq(gap, 0.0, 1e5)


@pytest.mark.parametrize("z,epochs", [(0.05, 1), (6.0, 20)])
def test_pld_matches_the_exact_gaussian_mechanism(z, epochs):
  # E releases with noise multiplier z' compose to one with z'/sqrt(E):
  # μ = sqrt(E) / z' exactly; PLD is a tight (pessimistic) estimate.
  delta = 1e-5
  for adjacency, factor in (("replace", 2.0), ("add_remove", 1.0)):
    exact = _analytic_gaussian_epsilon(math.sqrt(epochs) * factor / z, delta)
    pld = accounting.gaussian_epsilon(z, epochs, delta, "pld", adjacency)
    rdp = accounting.gaussian_epsilon(z, epochs, delta, "rdp", adjacency)
    assert exact - 1e-6 <= pld <= exact * 1.01 + 1e-3
    assert rdp >= pld  # RDP is an upper bound too, and looser


def test_gaussian_epsilons_per_epoch():
  eps = accounting.gaussian_epsilons(3.0, 12, 1e-5)
  assert len(eps) == 12
  assert np.all(np.diff(eps) > 0)
  assert eps[-1] == pytest.approx(accounting.gaussian_epsilon(3.0, 12, 1e-5))
  assert eps[0] == pytest.approx(accounting.gaussian_epsilon(3.0, 1, 1e-5))
  pld = accounting.gaussian_epsilons(3.0, 3, 1e-5, accountant="pld")
  assert len(pld) == 3 and np.all(np.array(pld) <= np.array(eps[:3]))


def test_gaussian_epsilon_edge_cases_and_errors():
  assert accounting.gaussian_epsilon(1.0, 0, 1e-5) == 0.0
  assert accounting.gaussian_epsilon(0.0, 3, 1e-5) == math.inf
  assert accounting.gaussian_epsilon(100.0, 1, 1e-5) < 0.2
  assert accounting.gaussian_epsilons(1.0, 0, 1e-5) == []
  for bad in (dict(accountant="moments"), dict(adjacency="swap")):
    with pytest.raises(ValueError):
      accounting.gaussian_epsilon(1.0, 1, 1e-5, **bad)
  with pytest.raises(ValueError):
    accounting.gaussian_epsilon(1.0, 1, 0.0)
  with pytest.raises(ValueError):
    accounting.gaussian_epsilon(-1.0, 1, 1e-5)
  with pytest.raises(ValueError):
    accounting.gaussian_epsilon(1.0, -2, 1e-5)


def test_gaussian_event_and_sensitivity():
  event = accounting.gaussian_event(3.0, 5)
  assert event == dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(1.5), 5)
  assert accounting.gaussian_event(3.0, 5, "add_remove").event == (
      dp_accounting.GaussianDpEvent(3.0))
  assert accounting.sensitivity_factor() == 2.0


def test_noise_multiplier_calibration_round_trip():
  for accountant, epochs, target in (("rdp", 20, 4.0), ("pld", 1, 2.0)):
    z = accounting.gaussian_noise_multiplier(target, epochs, 1e-5,
                                             accountant=accountant, rtol=1e-2)
    eps = accounting.gaussian_epsilon(z, epochs, 1e-5, accountant=accountant)
    assert eps <= target and eps == pytest.approx(target, rel=3e-2)
    assert accounting.gaussian_epsilon(z * 0.97, epochs, 1e-5,
                                       accountant=accountant) > target


def test_docstring_examples():
  result = doctest.testmod(accounting)
  assert result.attempted >= 8 and result.failed == 0
