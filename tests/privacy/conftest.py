"""Shared references for the accounting tests: dp_accounting called directly."""

import logging

import dp_accounting
import pytest
from dp_accounting import dp_event as dpe
from dp_accounting.pld import pld_privacy_accountant

from privacy import accountants

COARSE_PLD = 1e-3  # Keeps PLD tests fast; the comparison uses the same interval.


@pytest.fixture
def quiet_rdp_warnings():
  """dp_accounting logs a warning per non-converging fractional order (expected)."""
  logging.disable(logging.WARNING)
  yield
  logging.disable(logging.NOTSET)


def direct_rdp(event, delta):
  """Epsilon from dp_accounting's RdpAccountant at our orders (add or remove one)."""
  acct = dp_accounting.rdp.RdpAccountant(orders=accountants.RDP_ORDERS)
  return acct.compose(event).get_epsilon(delta)


def direct_pld(event, delta, interval=COARSE_PLD):
  """Epsilon from dp_accounting's PLDAccountant at `interval` (add or remove one)."""
  acct = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
  return acct.compose(event).get_epsilon(delta)


def poisson(q, sigma, steps):
  """SelfComposed(PoissonSampled(q, Gaussian(sigma)), steps), built by hand."""
  return dpe.SelfComposedDpEvent(dpe.PoissonSampledDpEvent(q, dpe.GaussianDpEvent(sigma)), steps)
