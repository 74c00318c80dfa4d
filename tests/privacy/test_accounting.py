"""Tests for privacy/accounting.py: against dp_accounting called directly, and contracts."""

import json
import logging

import dp_accounting
import numpy as np
import pytest
from dp_accounting import dp_event as dpe
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from privacy import accounting

COARSE_PLD = 1e-3  # Keeps PLD tests fast; the comparison uses the same interval.


@pytest.fixture(autouse=True)
def _quiet_rdp_warnings():
  """dp_accounting logs a warning per non-converging fractional order (expected)."""
  logging.disable(logging.WARNING)
  yield
  logging.disable(logging.NOTSET)


def _direct_rdp(event, delta):
  acct = dp_accounting.rdp.RdpAccountant(orders=accounting.RDP_ORDERS)
  return acct.compose(event).get_epsilon(delta)


def _direct_pld(event, delta, interval=COARSE_PLD):
  acct = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
  return acct.compose(event).get_epsilon(delta)


def _poisson(q, sigma, steps):
  return dpe.SelfComposedDpEvent(dpe.PoissonSampledDpEvent(q, dpe.GaussianDpEvent(sigma)), steps)


# ------------------------------------------------------------------------------ events


def test_local_event_structure():
  event = accounting.local_dp_sgd_event(sampling_rate=0.25, noise_multiplier=2, steps=6)
  assert event == _poisson(0.25, 2.0, 6)
  assert isinstance(event.event.event.noise_multiplier, float)  # dp_accounting needs floats.


def test_truncated_event_structure():
  event = accounting.local_dp_sgd_event(sampling_rate=0.1, noise_multiplier=1.0, steps=3,
                                        truncated_batch_size=12, dataset_size=80)
  assert event == dpe.SelfComposedDpEvent(
      dpe.TruncatedSubsampledGaussianDpEvent(80, 0.1, 12, 1.0), 3)


def test_hospital_and_client_events():
  per_round = accounting.local_dp_sgd_event(sampling_rate=0.2, noise_multiplier=1.0, steps=5)
  assert accounting.hospital_event(per_round, 7) == dpe.SelfComposedDpEvent(per_round, 7)
  assert accounting.hospital_event(per_round, 0) == dpe.NoOpDpEvent()
  assert accounting.client_level_event(sampling_rate=0.1, noise_multiplier=1.2, rounds=30) == (
      _poisson(0.1, 1.2, 30))


# ----------------------------------------------------------------------------- epsilon


@pytest.mark.parametrize("q,sigma,steps,delta", [
    (0.01, 1.0, 1000, 1e-5), (0.1, 0.8, 60, 1e-5), (0.5, 2.0, 10, 1e-3), (1.0, 5.0, 20, 1e-6),
])
def test_rdp_epsilon_equals_dp_accounting(q, sigma, steps, delta):
  event = accounting.local_dp_sgd_event(sampling_rate=q, noise_multiplier=sigma, steps=steps)
  eps = accounting.epsilon(event, delta, "rdp")
  assert eps == _direct_rdp(_poisson(q, sigma, steps), delta)
  # Our orders extend dp_accounting's defaults, so never looser than them.
  assert eps <= dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta) + 1e-12


@pytest.mark.parametrize("q,sigma,steps", [(0.01, 1.0, 200), (0.2, 1.5, 20)])
def test_pld_epsilon_equals_dp_accounting(q, sigma, steps):
  event = accounting.local_dp_sgd_event(sampling_rate=q, noise_multiplier=sigma, steps=steps)
  eps = accounting.epsilon(event, 1e-5, "pld", pld_discretization=COARSE_PLD)
  assert eps == _direct_pld(_poisson(q, sigma, steps), 1e-5)
  # PLD is tighter than RDP for the same event (both are upper bounds).
  assert eps <= accounting.epsilon(event, 1e-5, "rdp")


def test_epsilon_grows_with_steps_and_shrinks_with_sigma():
  eps = lambda sigma, steps: accounting.epsilon(
      accounting.local_dp_sgd_event(sampling_rate=0.05, noise_multiplier=sigma, steps=steps), 1e-5)
  by_steps = [eps(1.0, s) for s in (10, 100, 1000)]
  by_sigma = [eps(s, 100) for s in (0.7, 1.0, 2.0, 4.0)]
  assert by_steps == sorted(by_steps) and len(set(by_steps)) == 3
  assert by_sigma == sorted(by_sigma, reverse=True) and len(set(by_sigma)) == 4


def test_zero_noise_is_infinite_and_zero_steps_free():
  assert accounting.epsilon(_poisson(0.1, 0.0, 3), 1e-5) == np.inf
  empty = accounting.local_dp_sgd_event(sampling_rate=0.1, noise_multiplier=1.0, steps=0)
  assert accounting.epsilon(empty, 1e-5) == 0.0
  assert accounting.epsilon(empty, 1e-5, "pld") == 0.0


# ------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("target,q,steps", [(3.0, 0.01, 2000), (1.0, 0.1, 50), (8.0, 0.5, 30)])
def test_calibration_round_trips_rdp(target, q, steps):
  sigma = accounting.calibrate_noise_multiplier(target_epsilon=target, sampling_rate=q,
                                                steps=steps, delta=1e-5)
  eps = lambda s: accounting.epsilon(_poisson(q, s, steps), 1e-5)
  assert eps(sigma) <= target
  assert eps(sigma) > 0.99 * target
  assert eps(sigma * (1 - 2 * accounting.CALIBRATION_RTOL)) > target


def test_calibration_round_trips_pld():
  kw = dict(sampling_rate=0.05, steps=40, delta=1e-5)
  sigma = accounting.calibrate_noise_multiplier(target_epsilon=2.0, accountant="pld",
                                                pld_discretization=COARSE_PLD, **kw)
  eps = lambda s: _direct_pld(_poisson(0.05, s, 40), 1e-5)
  assert eps(sigma) <= 2.0
  assert eps(sigma * (1 - 2 * accounting.CALIBRATION_RTOL)) > 2.0


# -------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs,message", [
    (dict(noise_multiplier=-1), "dp.noise_multiplier=-1 must be >= 0"),
    (dict(noise_multiplier=float("nan")), "dp.noise_multiplier=nan must be >= 0"),
    (dict(sampling_rate=0.0), r"sampling rate q=0 must be in \(0, 1\]"),
    (dict(sampling_rate=1.5), r"sampling rate q=1.5 must be in \(0, 1\]"),
    (dict(delta=0.0), r"dp.delta=0 must be in \(0, 1\)"),
    (dict(delta=1.0), r"dp.delta=1 must be in \(0, 1\)"),
    (dict(delta=0.01, population=200),
     r"dp.delta=0.01 must be < 1/n = 0.005 for n=200 privacy units"),
    (dict(clip_norm=0.0), "dp.clip_norm=0 must be > 0"),
    (dict(clip_norm=-2.5), "dp.clip_norm=-2.5 must be > 0"),
])
def test_validate_dp_params_messages(kwargs, message):
  params = dict(noise_multiplier=1.0, sampling_rate=0.1, delta=1e-5, clip_norm=1.0,
                population=100) | kwargs
  with pytest.raises(ValueError, match=f"^{message}"):
    accounting.validate_dp_params(**params)


def test_validate_dp_params_accepts_valid():
  accounting.validate_dp_params(noise_multiplier=0.0, sampling_rate=1.0, delta=1e-5,
                                clip_norm=1.0, population=1000)


def test_builders_validate():
  with pytest.raises(ValueError, match="steps=-1 must be an integer >= 0"):
    accounting.local_dp_sgd_event(sampling_rate=0.1, noise_multiplier=1.0, steps=-1)
  with pytest.raises(ValueError, match="dataset_size is required"):
    accounting.local_dp_sgd_event(sampling_rate=0.1, noise_multiplier=1.0, steps=1,
                                  truncated_batch_size=4)
  with pytest.raises(ValueError, match="dp.target_epsilon=0 must be > 0"):
    accounting.calibrate_noise_multiplier(target_epsilon=0.0, sampling_rate=0.1, steps=5,
                                          delta=1e-5)


def test_make_accountant():
  assert isinstance(accounting.make_accountant("rdp"), dp_accounting.rdp.RdpAccountant)
  pld = accounting.make_accountant("pld")
  assert isinstance(pld, pld_privacy_accountant.PLDAccountant)
  assert pld.neighboring_relation == dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
  with pytest.raises(ValueError, match="dp.accountant='moments' is not one of: rdp, pld"):
    accounting.make_accountant("moments")


# ----------------------------------------------------------- truncated / fixed-size events


def test_truncated_refused_by_rdp_and_accounted_by_pld():
  event = accounting.local_dp_sgd_event(sampling_rate=0.1, noise_multiplier=1.0, steps=5,
                                        truncated_batch_size=15, dataset_size=100)
  with pytest.raises(ValueError, match="only by the PLD accountant: use dp.accountant=pld"):
    accounting.epsilon(event, 1e-5, "rdp")
  with pytest.raises(ValueError, match="dp.accountant=pld"):
    accounting.PrivacyLedger([event], delta=1e-5, accountant="rdp")
  eps = accounting.epsilon(event, 1e-5, "pld", pld_discretization=COARSE_PLD)
  assert 0 < eps < np.inf
  assert eps == _direct_pld(event, 1e-5)


def test_fixed_size_sampling_is_replace_one_rdp_only():
  event = accounting.fixed_size_sampled_event(sample_size=10, population=100,
                                              noise_multiplier=1.0, steps=20)
  assert accounting.neighbouring_relation(event) == accounting.REPLACE_ONE
  assert event.event.event == dpe.GaussianDpEvent(0.5)  # Replace-one sensitivity is 2C.
  direct = dp_accounting.rdp.RdpAccountant(
      accounting.RDP_ORDERS, dp_accounting.NeighboringRelation.REPLACE_ONE)
  assert accounting.epsilon(event, 1e-5) == direct.compose(event).get_epsilon(1e-5)
  with pytest.raises(ValueError, match="use dp.accountant=rdp"):
    accounting.epsilon(event, 1e-5, "pld")


# --------------------------------------------------------------------- fast vectorised RDP


def test_vectorised_rdp_matches_dp_accounting():
  q = np.array([0.003, 0.01, 0.1, 0.16, 0.5, 0.9, 1.0, 0.3, 0.2])
  sigma = np.array([0.6, 1.0, 1.0, 4.0, 0.5, 2.0, 2.0, 0.0, 10.0])
  fast = accounting.poisson_gaussian_rdp(q, sigma, accounting.RDP_ORDERS)
  ref = np.stack([
      rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(a, b, accounting.RDP_ORDERS)
      for a, b in zip(q, sigma)])
  finite = np.isfinite(ref)
  np.testing.assert_array_equal(finite, np.isfinite(fast))  # Same orders excluded (inf).
  np.testing.assert_allclose(fast[finite], ref[finite], rtol=1e-9, atol=1e-300)


def test_vectorised_epsilon_from_rdp_matches_dp_accounting():
  rdp = np.stack([
      20 * rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(
          q, s, accounting.RDP_ORDERS) for q, s in [(0.1, 1.0), (0.5, 0.5), (0.01, 5.0)]])
  for delta in (1e-3, 1e-5, 1e-8):
    eps = accounting.epsilon_from_rdp(rdp, accounting.RDP_ORDERS, delta)
    ref = [rdp_privacy_accountant.compute_epsilon(accounting.RDP_ORDERS, r, delta)[0] for r in rdp]
    np.testing.assert_allclose(eps, ref, rtol=1e-12)


# ------------------------------------------------------------------------------- ledger


def _example_ledger(accountant="rdp"):
  sizes = np.array([40, 96, 96, 200, 33, 500])
  rates = np.minimum(1.0, 16 / sizes)
  steps = np.ceil(sizes / 16).astype(int)
  ledger = accounting.PrivacyLedger.for_local_dp_sgd(
      sampling_rates=rates, steps=steps, noise_multiplier=1.1, delta=1e-5, accountant=accountant,
      pld_discretization=COARSE_PLD)
  return ledger, rates, steps


def _masks(num_rounds, num_hospitals, never=(4,)):
  rng = np.random.default_rng(0)
  masks = rng.random((num_rounds, num_hospitals)) < 0.6
  masks[:, list(never)] = False
  return masks


def test_ledger_matches_direct_composition_rdp():
  ledger, rates, steps = _example_ledger()
  masks = _masks(12, 6)
  for r, mask in enumerate(masks):
    ledger.record_round(mask)
    ledger.snapshot(r)
  counts = masks.sum(axis=0)
  np.testing.assert_array_equal(ledger.composition_counts, counts)
  eps = ledger.epsilons()
  for k in range(6):
    per_round = _poisson(float(rates[k]), 1.1, int(steps[k]))
    if counts[k] == 0:
      assert eps[k] == 0.0
      continue
    direct = _direct_rdp(dpe.SelfComposedDpEvent(per_round, int(counts[k])), 1e-5)
    assert eps[k] == pytest.approx(direct, rel=1e-9, abs=0)
  assert eps[4] == 0.0  # Never took part.
  assert eps[1] == eps[2] or counts[1] != counts[2]  # Same event and count: same epsilon.
  assert ledger.max_epsilon() == eps.max()
  assert len(ledger.history) == 12 and ledger.history[-1]["epsilon"] == eps.tolist()


def test_ledger_matches_direct_composition_pld():
  ledger, rates, steps = _example_ledger("pld")
  masks = _masks(3, 6)
  for mask in masks:
    ledger.record_round(mask)
  counts, eps = masks.sum(axis=0), ledger.epsilons()
  for k in np.flatnonzero(counts):
    per_round = _poisson(float(rates[k]), 1.1, int(steps[k]))
    direct = _direct_pld(dpe.SelfComposedDpEvent(per_round, int(counts[k])), 1e-5)
    assert eps[k] == pytest.approx(direct, rel=1e-9, abs=0)
  assert eps[4] == 0.0


def test_ledger_would_exceed_looks_one_round_ahead():
  ledger, _, _ = _example_ledger()
  mask = np.array([True, False, False, False, False, False])
  ledger.record_round(mask)
  now, ahead = ledger.epsilons(), ledger.epsilons_after(mask)
  assert ahead[0] > now[0] and (ahead[1:] == now[1:]).all()
  assert ledger.would_exceed((now[0] + ahead[0]) / 2, mask)
  assert not ledger.would_exceed((now[0] + ahead[0]) / 2, np.zeros(6, bool))
  np.testing.assert_array_equal(ledger.epsilons(), now)  # Looking ahead records nothing.


def test_client_level_ledger_same_for_everyone():
  ledger = accounting.PrivacyLedger.for_client_level(
      num_hospitals=50, sampling_rate=0.2, noise_multiplier=1.0, delta=1e-4)
  for _ in range(25):
    ledger.record_round(np.zeros(50, bool))  # Participation does not matter.
  eps = ledger.epsilons()
  direct = _direct_rdp(_poisson(0.2, 1.0, 25), 1e-4)
  np.testing.assert_allclose(eps, direct, rtol=1e-9)
  assert ledger.unit == "hospital" and ledger.to_json()["composition"] == "every_round"


def test_client_level_fixed_cohort_ledger():
  ledger = accounting.PrivacyLedger.for_client_level(
      num_hospitals=100, cohort_size=20, noise_multiplier=1.0, delta=1e-5)
  for _ in range(10):
    ledger.record_round(None)
  event = accounting.fixed_size_sampled_event(sample_size=20, population=100,
                                              noise_multiplier=1.0, steps=10)
  assert ledger.neighbouring == accounting.REPLACE_ONE
  np.testing.assert_allclose(ledger.epsilons(), accounting.epsilon(event, 1e-5), rtol=1e-9)


def test_ledger_validates_inputs():
  ledger, _, _ = _example_ledger()
  with pytest.raises(ValueError, match=r"participation mask shape \(5,\) != \(6,\)"):
    ledger.record_round(np.ones(5, bool))
  with pytest.raises(ValueError, match="privacy unit 'user' is not one of"):
    accounting.PrivacyLedger([_poisson(0.1, 1.0, 1)], delta=1e-5, unit="user")


def test_ledger_to_json_round_trips():
  ledger, _, _ = _example_ledger()
  for r, mask in enumerate(_masks(4, 6)):
    ledger.record_round(mask)
    ledger.snapshot(r)
  record = ledger.to_json()
  assert json.loads(json.dumps(record, allow_nan=False)) == record
  for key in ("unit", "delta", "accountant", "neighbouring_relation", "hospital_events",
              "epsilon", "history"):
    assert key in record
  assert record["neighbouring_relation"] == "add_or_remove_one"
  events = [accounting.event_from_dict(d) for d in record["hospital_events"]]
  assert events == ledger.hospital_events()
  for event, eps in zip(events, record["epsilon"]):
    assert accounting.epsilon(event, 1e-5) == pytest.approx(eps, rel=1e-9)


def test_event_dict_round_trip_nested_and_safe():
  event = dpe.ComposedDpEvent([
      _poisson(0.1, 1.0, 3),
      dpe.TruncatedSubsampledGaussianDpEvent(100, 0.1, 12, 1.0),
      dpe.SampledWithoutReplacementDpEvent(100, 10, dpe.GaussianDpEvent(np.float64(2.0)))])
  data = json.loads(json.dumps(accounting.event_to_dict(event)))
  assert accounting.event_from_dict(data) == event
  with pytest.raises(ValueError, match="not a dp_accounting event module"):
    accounting.event_from_dict({"module_name": "os", "class_name": "system"})
