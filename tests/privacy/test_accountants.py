"""Tests for privacy/accountants.py: against dp_accounting called directly, and contracts."""

import inspect

import dp_accounting
import numpy as np
import pytest
from dp_accounting import dp_event as dpe
from dp_accounting.pld import pld_privacy_accountant

from privacy import accountants, events
from tests.privacy.conftest import COARSE_PLD, direct_pld, direct_rdp, poisson

pytestmark = pytest.mark.usefixtures("quiet_rdp_warnings")


# ----------------------------------------------------------------------------- epsilon


@pytest.mark.parametrize("q,sigma,steps,delta", [
    (0.01, 1.0, 1000, 1e-5), (0.1, 0.8, 60, 1e-5), (0.5, 2.0, 10, 1e-3), (1.0, 5.0, 20, 1e-6),
])
def test_rdp_epsilon_equals_dp_accounting(q, sigma, steps, delta):
  event = events.local_dp_sgd_event(sampling_rate=q, noise_multiplier=sigma, steps=steps)
  eps = accountants.epsilon(event, delta, "rdp")
  assert eps == direct_rdp(poisson(q, sigma, steps), delta)
  # Our orders extend dp_accounting's defaults, so never looser than them.
  assert eps <= dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta) + 1e-12


def _library_default_pld(event, delta):
  """dp_accounting's `PLDAccountant()`, default arguments: the number users compare against."""
  return pld_privacy_accountant.PLDAccountant().compose(event).get_epsilon(delta)


def test_pld_discretization_is_never_coarser_than_the_librarys_default():
  default = inspect.signature(pld_privacy_accountant.PLDAccountant).parameters[
      "value_discretization_interval"].default
  assert accountants.PLD_DISCRETIZATION <= default


@pytest.mark.parametrize("q,sigma,steps,expected", [
    (0.01, 4.0, 10_000, 0.947),  # Issue 10's example (0.960 at the old 1e-3 interval).
    (0.01, 10.0, 10_000, 0.343),  # Large noise: the old interval was 8.6 % above the library.
])
def test_pld_epsilon_at_the_default_interval_is_the_librarys(q, sigma, steps, expected):
  """Issue 10, item 4: within 1 % of the library (we build its PLD, so agree to rounding)."""
  event = events.local_dp_sgd_event(sampling_rate=q, noise_multiplier=sigma, steps=steps)
  library = _library_default_pld(event, 1e-5)
  eps = accountants.epsilon(event, 1e-5, "pld")
  assert eps == pytest.approx(library, rel=1e-9)
  assert round(eps, 3) == expected


def test_truncated_pld_epsilon_at_the_default_interval_is_the_librarys():
  event = events.local_dp_sgd_event(sampling_rate=0.1, noise_multiplier=3.0, steps=50,
                                    truncated_batch_size=12, dataset_size=100)
  library = _library_default_pld(event, 1e-5)
  assert accountants.epsilon(event, 1e-5, "pld") == pytest.approx(library, rel=1e-9)


def test_pld_accountant_leaves_other_events_to_the_library():
  """A composition mixing a cached step, a plain Gaussian and a no-op event."""
  event = dpe.ComposedDpEvent([poisson(0.05, 2.0, 30), dpe.GaussianDpEvent(8.0),
                               dpe.PoissonSampledDpEvent(0.0, dpe.GaussianDpEvent(1.0))])
  acct = accountants.make_accountant("pld")
  assert acct.compose(event).get_epsilon(1e-5) == pytest.approx(
      _library_default_pld(event, 1e-5), rel=1e-9)
  no_noise = accountants.make_accountant("pld").compose(poisson(0.05, 0.0, 3))
  assert no_noise.get_epsilon(1e-5) == np.inf


@pytest.mark.parametrize("q,sigma,steps", [(0.01, 1.0, 200), (0.2, 1.5, 20)])
def test_pld_epsilon_equals_dp_accounting(q, sigma, steps):
  event = events.local_dp_sgd_event(sampling_rate=q, noise_multiplier=sigma, steps=steps)
  eps = accountants.epsilon(event, 1e-5, "pld", pld_discretization=COARSE_PLD)
  assert eps == direct_pld(poisson(q, sigma, steps), 1e-5)
  # PLD is tighter than RDP for the same event (both are upper bounds).
  assert eps <= accountants.epsilon(event, 1e-5, "rdp")


def test_epsilon_grows_with_steps_and_shrinks_with_sigma():
  eps = lambda sigma, steps: accountants.epsilon(
      events.local_dp_sgd_event(sampling_rate=0.05, noise_multiplier=sigma, steps=steps), 1e-5)
  by_steps = [eps(1.0, s) for s in (10, 100, 1000)]
  by_sigma = [eps(s, 100) for s in (0.7, 1.0, 2.0, 4.0)]
  assert by_steps == sorted(by_steps) and len(set(by_steps)) == 3
  assert by_sigma == sorted(by_sigma, reverse=True) and len(set(by_sigma)) == 4


def test_zero_noise_is_infinite_and_zero_steps_free():
  assert accountants.epsilon(poisson(0.1, 0.0, 3), 1e-5) == np.inf
  empty = events.local_dp_sgd_event(sampling_rate=0.1, noise_multiplier=1.0, steps=0)
  assert accountants.epsilon(empty, 1e-5) == 0.0
  assert accountants.epsilon(empty, 1e-5, "pld") == 0.0


def test_epsilon_validates_delta():
  with pytest.raises(ValueError, match=r"^dp.delta=0.0 must be in \(0, 1\)"):
    accountants.epsilon(poisson(0.1, 1.0, 3), 0.0)


# ------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("target,q,steps", [(3.0, 0.01, 2000), (1.0, 0.1, 50), (8.0, 0.5, 30)])
def test_calibration_round_trips_rdp(target, q, steps):
  sigma = accountants.calibrate_noise_multiplier(target_epsilon=target, sampling_rate=q,
                                                 steps=steps, delta=1e-5)
  eps = lambda s: accountants.epsilon(poisson(q, s, steps), 1e-5)
  assert eps(sigma) <= target
  assert eps(sigma) > 0.99 * target
  assert eps(sigma * (1 - 2 * accountants.CALIBRATION_RTOL)) > target


def test_calibration_round_trips_pld():
  kw = dict(sampling_rate=0.05, steps=40, delta=1e-5)
  sigma = accountants.calibrate_noise_multiplier(target_epsilon=2.0, accountant="pld",
                                                 pld_discretization=COARSE_PLD, **kw)
  eps = lambda s: direct_pld(poisson(0.05, s, 40), 1e-5)
  assert eps(sigma) <= 2.0
  assert eps(sigma * (1 - 2 * accountants.CALIBRATION_RTOL)) > 2.0


@pytest.mark.parametrize("target,message", [
    (0.0, "dp.target_epsilon=0.0 must be > 0 and finite"),
    (np.inf, "dp.target_epsilon=inf must be > 0 and finite"),
])
def test_calibration_validates_target(target, message):
  with pytest.raises(ValueError, match=f"^{message}"):
    accountants.calibrate_noise_multiplier(target_epsilon=target, sampling_rate=1.0, steps=5,
                                           delta=1e-5)


# ------------------------------------------------------------------- accountants, relations


def test_make_accountant():
  assert isinstance(accountants.make_accountant("rdp"), dp_accounting.rdp.RdpAccountant)
  pld = accountants.make_accountant("pld")
  assert isinstance(pld, pld_privacy_accountant.PLDAccountant)
  assert pld.neighboring_relation == dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
  with pytest.raises(ValueError, match=r"^dp.accountant='moments' must be one of \['rdp', 'pld'\]"):
    accountants.make_accountant("moments")
  with pytest.raises(ValueError, match="^neighbouring='swap' must be one of"):
    accountants.make_accountant("rdp", neighbouring="swap")


def test_truncated_refused_by_rdp_and_accounted_by_pld():
  event = events.local_dp_sgd_event(sampling_rate=0.1, noise_multiplier=1.0, steps=5,
                                    truncated_batch_size=15, dataset_size=100)
  with pytest.raises(ValueError, match="^dp.accountant='rdp' must be 'pld' for truncated"):
    accountants.epsilon(event, 1e-5, "rdp")
  eps = accountants.epsilon(event, 1e-5, "pld", pld_discretization=COARSE_PLD)
  assert 0 < eps < np.inf
  # The truncated step's replace-one part is built on arrays: the same to rounding.
  assert eps == pytest.approx(direct_pld(event, 1e-5), rel=1e-9)


def test_fixed_size_sampling_is_replace_one_rdp_only():
  event = events.fixed_size_sampled_event(sample_size=10, population=100,
                                          noise_multiplier=1.0, steps=20)
  assert accountants.neighbouring_relation(event) == accountants.REPLACE_ONE
  direct = dp_accounting.rdp.RdpAccountant(
      accountants.RDP_ORDERS, dp_accounting.NeighboringRelation.REPLACE_ONE)
  assert accountants.epsilon(event, 1e-5) == direct.compose(event).get_epsilon(1e-5)
  with pytest.raises(ValueError, match="^dp.accountant='pld' must be 'rdp' for fixed-size"):
    accountants.epsilon(event, 1e-5, "pld")


def test_mixed_relations_are_refused():
  mixed = dpe.ComposedDpEvent([
      poisson(0.1, 1.0, 2),
      events.fixed_size_sampled_event(sample_size=1, population=10, noise_multiplier=1.0,
                                      steps=1)])
  with pytest.raises(ValueError, match="no single neighbouring relation"):
    accountants.neighbouring_relation(mixed)
  assert accountants.neighbouring_relation(poisson(0.1, 1.0, 2)) == accountants.ADD_OR_REMOVE_ONE
