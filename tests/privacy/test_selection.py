"""Private selection (Papernot & Steinke 2022, Theorem 2) on worked examples."""

import math

import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from privacy import accountants, events, selection
from privacy import ledger as ledger_lib

ORDERS = np.array(accountants.RDP_ORDERS)


def gaussian_rdp(sigma):
  return ORDERS / (2 * sigma**2)


def test_truncated_negative_binomial_mean_and_law():
  assert selection.expected_repetitions(1.0, 0.1) == pytest.approx(10.0)  # geometric
  for eta in (-0.5, 0.0, 1.0, 3.0):
    gamma = selection.gamma_for_mean(eta, 6.0)
    k = np.arange(1, 50_000)
    p = selection.repetition_pmf(k, eta, gamma)
    assert p.sum() == pytest.approx(1.0, abs=1e-9)
    assert (k * p).sum() == pytest.approx(6.0, rel=1e-9)
  # eta = 1 is the geometric law gamma (1 - gamma)^(k - 1)
  np.testing.assert_allclose(selection.repetition_pmf(np.arange(1, 6), 1.0, 0.25),
                             0.25 * 0.75 ** np.arange(5), rtol=1e-12)


def test_rdp_bound_is_theorem_2_on_a_worked_gaussian_example():
  # Gaussian mechanism sigma = 4: eps(lam) = lam / 32; geometric (eta = 1), gamma = 0.1.
  sigma, gamma = 4.0, 0.1
  got = selection.rdp_after_selection(ORDERS, gaussian_rdp(sigma), eta=1.0, gamma=gamma)
  # min over lam_hat of 2 (1 - 1/lh) lh / 32 + 2 log(10) / lh = (lh - 1) / 16 + 2 log 10 / lh,
  # minimised at lh* = sqrt(32 log 10) = 8.58 (value 1.0106); the orders grid gets close.
  lh = math.sqrt(2 * sigma**2 * math.log(1 / gamma))
  best = (lh - 1) / sigma**2 + 2 * math.log(1 / gamma) / lh
  grid = np.min(np.concatenate([[2 * math.log(10)],
                                (ORDERS - 1) / sigma**2 + 2 * math.log(10) / ORDERS]))
  assert best <= grid <= best + 0.01
  np.testing.assert_allclose(got, ORDERS / 32 + grid + math.log(10) / (ORDERS - 1),
                             rtol=1e-12)


def test_epsilon_uses_dp_accountings_conversion_and_exceeds_the_runs():
  rdp = gaussian_rdp(4.0)
  got = selection.selection_epsilon(ORDERS, rdp, 1e-5, eta=1.0, mean_repetitions=10)
  selected = selection.rdp_after_selection(ORDERS, rdp, eta=1.0, gamma=0.1)
  reference, _ = rdp_privacy_accountant.compute_epsilon(ORDERS, selected, 1e-5)
  assert got == pytest.approx(reference, rel=1e-9)
  one_run, _ = rdp_privacy_accountant.compute_epsilon(ORDERS, rdp, 1e-5)
  assert got > one_run
  more = selection.selection_epsilon(ORDERS, rdp, 1e-5, eta=1.0, mean_repetitions=100)
  assert more > got


@pytest.mark.parametrize("sigma", [0.7, 1.5, 8.0])
@pytest.mark.parametrize("eta, mean", [(1.0, 2.0), (0.0, 8.0), (-0.5, 30.0)])
def test_selection_never_costs_less_than_one_run(sigma, eta, mean):
  rdp = gaussian_rdp(sigma)
  one_run, _ = rdp_privacy_accountant.compute_epsilon(ORDERS, rdp, 1e-6)
  assert selection.selection_epsilon(ORDERS, rdp, 1e-6, eta=eta,
                                     mean_repetitions=mean) > one_run


def test_record_rdp_is_the_worst_hospitals_curve():
  ledger = ledger_lib.PrivacyLedger.for_local_dp_sgd(
      sampling_rates=[0.05, 0.2, 0.2], steps=4, noise_multiplier=1.3, delta=1e-5)
  ledger.record_round(np.array([True, True, False]))
  ledger.record_round(np.array([True, True, False]))
  curve = selection.record_rdp(ledger.to_json())
  worst = events.local_dp_sgd_event(sampling_rate=0.2, noise_multiplier=1.3, steps=8)
  expected = accountants.make_accountant("rdp").compose(worst).rdp
  np.testing.assert_allclose(curve, expected, rtol=1e-9)
  truncated = ledger_lib.PrivacyLedger.for_local_dp_sgd(
      sampling_rates=[0.2], steps=4, noise_multiplier=1.3, delta=1e-5, accountant="pld",
      truncated_batch_size=3, dataset_sizes=[10])
  truncated.record_round(np.array([True]))
  assert selection.record_rdp(truncated.to_json()) is None  # no RDP bound for truncation


def test_bad_distribution_parameters_are_refused():
  with pytest.raises(ValueError, match="selection eta=-1.0 must be > -1"):
    selection.gamma_for_mean(-1.0, 5.0)
  with pytest.raises(ValueError, match="selection mean_repetitions=1.0 must be > 1"):
    selection.gamma_for_mean(1.0, 1.0)
