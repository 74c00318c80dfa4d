"""Tests for privacy/subsampled_gaussian.py: the fast paths give dp_accounting's numbers."""

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import dp_event as dpe
from dp_accounting.pld import common, privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import special

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


def _dense(pld):
  """(lower loss index, probabilities, infinity mass) of the remove and add PMFs."""
  pmfs = [pld._pmf_remove.to_dense_pmf(), pld._pmf_add.to_dense_pmf()]
  return [(p._lower_loss, p._probs, p._infinity_mass) for p in pmfs]


def _assert_same_pld(ours, library):
  """Same grid and masses. Connect-the-dots divides differences of deltas by e^1e-4 - 1, so
  last-bit differences in the deltas (numpy's log1p/exp against math's) show up at 1e-12."""
  for (lo, probs, inf), (lo_ref, probs_ref, inf_ref) in zip(_dense(ours), _dense(library)):
    assert lo == lo_ref and probs.shape == probs_ref.shape
    np.testing.assert_allclose(probs, probs_ref, rtol=1e-9, atol=1e-11)
    assert np.abs(probs - probs_ref).sum() < 1e-8
    assert inf == pytest.approx(inf_ref, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("sigma,q", [(2.0, 0.2), (0.8, 1.0), (10.0, 0.01)])
def test_gaussian_pld_is_the_librarys_at_the_default_interval(sigma, q):
  library = privacy_loss_distribution.from_gaussian_mechanism(sigma, sampling_prob=q)
  _assert_same_pld(subsampled_gaussian.gaussian_pld(sigma, q, 1e-4), library)


def test_truncated_gaussian_pld_is_the_librarys_at_the_default_interval():
  """Truncation probability 0.29: the replace-one (sensitivity 2) part is mixed in."""
  library = privacy_loss_distribution.from_truncated_subsampled_gaussian_mechanism(
      dataset_size=100, sampling_probability=0.1, truncated_batch_size=12, noise_multiplier=3.0)
  _assert_same_pld(subsampled_gaussian.truncated_gaussian_pld(100, 0.1, 12, 3.0, 1e-4), library)


def test_epsilon_for_delta_is_the_librarys_search():
  composed = [
      subsampled_gaussian.gaussian_pld(1.0, 0.1, 1e-4).self_compose(20),
      subsampled_gaussian.gaussian_pld(0.5, 1.0, 1e-4),  # Symmetric, large losses.
      subsampled_gaussian.gaussian_pld(10.0, 0.01, 1e-4),  # A small (sparse) PMF.
      subsampled_gaussian.truncated_gaussian_pld(100, 0.1, 12, 3.0, 1e-4).self_compose(10),
  ]
  for pld in composed:
    for delta in (0.5, 1e-3, 1e-5, 1e-10):
      assert subsampled_gaussian.epsilon_for_delta(pld, delta) == pld.get_epsilon_for_delta(delta)
  tiny = subsampled_gaussian.gaussian_pld(0.3, 1.0, 1e-4)
  assert subsampled_gaussian.epsilon_for_delta(tiny, 1e-300) == math.inf  # Infinity mass.


def test_step_pld_leaves_unsampled_steps_to_the_library():
  assert subsampled_gaussian.step_pld(poisson(0.0, 1.0, 3), COARSE_PLD) == (None, 0)
  unsampled = dpe.TruncatedSubsampledGaussianDpEvent(100, 0.0, 12, 1.0)
  assert subsampled_gaussian.step_pld(unsampled, COARSE_PLD) == (None, 0)


def _library_pmfs():
  """Dense PMFs of the shapes the ledger self-composes: one step, a composed one, a skewed one."""
  truncated = subsampled_gaussian.truncated_gaussian_pld(100, 0.1, 12, 3.0, 1e-4)
  gaussian = subsampled_gaussian.gaussian_pld(1.0, 0.1, 1e-3)
  pmfs = [truncated._pmf_remove, truncated._pmf_add, gaussian._pmf_add,
          gaussian.self_compose(5)._pmf_remove]
  return [p._probs for p in pmfs] + [np.array([0.0, 0.25, 0.0, 0.5, 0.25, 0.0])]


@pytest.mark.parametrize("index", range(5))
def test_vectorised_self_convolve_bounds_are_the_librarys(index):
  probs = _library_pmfs()[index]
  orders, log_mgfs = subsampled_gaussian.self_convolve_log_mgfs(probs)
  reference = [special.logsumexp(np.arange(len(probs)) * o, b=probs) for o in orders]
  np.testing.assert_allclose(log_mgfs, reference, rtol=1e-13, atol=0)
  for num_times in (1, 2, 7, 60, 1000):
    for tail in (0, 1e-15, 1e-6):
      assert subsampled_gaussian.self_convolve_bounds(probs, num_times, tail) == (
          common.compute_self_convolve_bounds(probs, num_times, tail)), (num_times, tail)


def test_self_compose_is_the_librarys():
  plds = [subsampled_gaussian.truncated_gaussian_pld(100, 0.1, 12, 3.0, 1e-4),
          subsampled_gaussian.gaussian_pld(0.8, 1.0, 1e-4),  # Symmetric.
          subsampled_gaussian.gaussian_pld(10.0, 0.01, 1e-4)]  # Sparse: the library's.
  for pld in plds:
    step = subsampled_gaussian.ComposableStep(pld)
    for num_times in (1, 3, 40):
      for ours in (step.self_compose(num_times),
                   subsampled_gaussian.self_compose(pld, num_times)):
        library = pld.self_compose(num_times)
        assert ours._symmetric == library._symmetric
        for a, b in zip(_dense(ours), _dense(library)):
          assert a[0] == b[0] and a[2] == b[2]
          np.testing.assert_array_equal(a[1], b[1])
