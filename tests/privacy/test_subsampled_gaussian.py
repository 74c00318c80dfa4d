"""Tests for privacy/subsampled_gaussian.py: the fast paths give dp_accounting's numbers."""

import dp_accounting
import numpy as np
import pytest
from dp_accounting import dp_event as dpe
from dp_accounting.rdp import rdp_privacy_accountant

from privacy import accountants, subsampled_gaussian
from tests.privacy.conftest import COARSE_PLD, poisson

ORDERS = accountants.RDP_ORDERS


def test_vectorised_rdp_matches_dp_accounting():
  q = np.array([0.003, 0.01, 0.1, 0.16, 0.5, 0.9, 1.0, 0.3, 0.2])
  sigma = np.array([0.6, 1.0, 1.0, 4.0, 0.5, 2.0, 2.0, 0.0, 10.0])
  fast = subsampled_gaussian.poisson_gaussian_rdp(q, sigma, ORDERS)
  ref = np.stack([
      rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(a, b, ORDERS)
      for a, b in zip(q, sigma)])
  finite = np.isfinite(ref)
  np.testing.assert_array_equal(finite, np.isfinite(fast))  # Same orders excluded (inf).
  np.testing.assert_allclose(fast[finite], ref[finite], rtol=1e-9, atol=1e-300)


def test_vectorised_epsilon_from_rdp_matches_dp_accounting():
  rdp = np.stack([
      20 * rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(q, s, ORDERS)
      for q, s in [(0.1, 1.0), (0.5, 0.5), (0.01, 5.0)]])
  for delta in (1e-3, 1e-5, 1e-8):
    eps = subsampled_gaussian.epsilon_from_rdp(rdp, ORDERS, delta)
    ref = [rdp_privacy_accountant.compute_epsilon(ORDERS, r, delta)[0] for r in rdp]
    np.testing.assert_allclose(eps, ref, rtol=1e-12)


def test_poisson_gaussian_params_only_for_poisson_gaussian_steps():
  assert subsampled_gaussian.poisson_gaussian_params(poisson(0.2, 1.5, 4)) == (0.2, 1.5, 4)
  nested = dpe.SelfComposedDpEvent(poisson(0.2, 1.5, 4), 3)
  assert subsampled_gaussian.poisson_gaussian_params(nested) == (0.2, 1.5, 12)
  truncated = dpe.TruncatedSubsampledGaussianDpEvent(100, 0.1, 12, 1.0)
  assert subsampled_gaussian.poisson_gaussian_params(truncated) is None


@pytest.mark.parametrize("step", [
    dpe.PoissonSampledDpEvent(0.05, dpe.GaussianDpEvent(1.2)),
    dpe.TruncatedSubsampledGaussianDpEvent(200, 0.05, 15, 1.2),
])
def test_step_pld_composes_like_the_pld_accountant(step):
  event = dpe.SelfComposedDpEvent(step, 6)
  pld, steps = subsampled_gaussian.step_pld(event, COARSE_PLD)
  assert steps == 6
  direct = dp_accounting.pld.PLDAccountant(value_discretization_interval=COARSE_PLD)
  assert pld.self_compose(steps).get_epsilon_for_delta(1e-5) == pytest.approx(
      direct.compose(event).get_epsilon(1e-5), rel=1e-9)
  assert subsampled_gaussian.step_pld(event, COARSE_PLD)[0] is pld  # Cached.


def test_step_pld_declines_other_events():
  assert subsampled_gaussian.step_pld(poisson(0.1, 0.0, 3), COARSE_PLD) == (None, 0)
  fixed = dpe.SampledWithoutReplacementDpEvent(100, 10, dpe.GaussianDpEvent(1.0))
  assert subsampled_gaussian.step_pld(fixed, COARSE_PLD) == (None, 0)
