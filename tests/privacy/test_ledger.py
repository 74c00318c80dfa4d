"""Tests for privacy/ledger.py: per-hospital epsilons equal direct composition."""

import json
import math

import numpy as np
import pytest
from dp_accounting import dp_event as dpe
from dp_accounting.pld import pld_privacy_accountant

from privacy import accountants, events, ledger
from tests.privacy.conftest import COARSE_PLD, direct_pld, direct_rdp, poisson

pytestmark = pytest.mark.usefixtures("quiet_rdp_warnings")


def _example_ledger(accountant="rdp", noise_multiplier=1.1):
  sizes = np.array([40, 96, 96, 200, 33, 500])  # Hospitals 1 and 2: the same event.
  rates = np.minimum(1.0, 16 / sizes)
  steps = np.ceil(sizes / 16).astype(int)
  record = ledger.PrivacyLedger.for_local_dp_sgd(
      sampling_rates=rates, steps=steps, noise_multiplier=noise_multiplier, delta=1e-5,
      accountant=accountant, pld_discretization=COARSE_PLD)
  return record, rates, steps


def _masks(num_rounds, num_hospitals, never=(4,)):
  rng = np.random.default_rng(0)
  masks = rng.random((num_rounds, num_hospitals)) < 0.6
  masks[:, list(never)] = False
  return masks


def test_ledger_matches_direct_composition_rdp():
  record, rates, steps = _example_ledger()
  masks = _masks(12, 6)
  masks[:, 2] = masks[:, 1]  # Hospitals 1 and 2: same event, same rounds.
  for r, mask in enumerate(masks):
    record.record_round(mask)
    record.snapshot(r)
  counts = masks.sum(axis=0)
  np.testing.assert_array_equal(record.composition_counts, counts)
  eps = record.epsilons()
  for k in range(6):
    per_round = poisson(float(rates[k]), 1.1, int(steps[k]))
    if counts[k] == 0:
      assert eps[k] == 0.0
      continue
    direct = direct_rdp(dpe.SelfComposedDpEvent(per_round, int(counts[k])), 1e-5)
    assert eps[k] == pytest.approx(direct, rel=1e-9, abs=0)
  assert eps[4] == 0.0  # Never took part.
  assert counts[1] == counts[2] > 0 and eps[1] == eps[2] > 0  # Same event and count.
  assert record.max_epsilon() == eps.max()
  assert len(record.history) == 12 and record.history[-1]["epsilon"] == eps.tolist()


def test_ledger_matches_direct_composition_pld():
  record, rates, steps = _example_ledger("pld")
  masks = _masks(3, 6)
  for mask in masks:
    record.record_round(mask)
  counts, eps = masks.sum(axis=0), record.epsilons()
  for k in np.flatnonzero(counts):
    per_round = poisson(float(rates[k]), 1.1, int(steps[k]))
    direct = direct_pld(dpe.SelfComposedDpEvent(per_round, int(counts[k])), 1e-5)
    assert eps[k] == pytest.approx(direct, rel=1e-9, abs=0)
  assert eps[4] == 0.0


def test_pld_ledger_at_the_default_interval_is_the_librarys():
  """Issue 10, item 4: hospitals composed over rounds, against `PLDAccountant()` (defaults).

  Hospital 0: Poisson batches, 3 local steps a round; hospital 1: truncated Poisson batches
  (as in experiments/default.py); hospital 2: large noise (sigma 10). Each sits out some rounds.
  """
  per_round = [
      events.local_dp_sgd_event(sampling_rate=0.05, noise_multiplier=2.0, steps=3),
      events.local_dp_sgd_event(sampling_rate=0.1, noise_multiplier=3.0, steps=2,
                                truncated_batch_size=12, dataset_size=100),
      events.local_dp_sgd_event(sampling_rate=0.01, noise_multiplier=10.0, steps=50),
  ]
  record = ledger.PrivacyLedger(per_round, delta=1e-5, accountant="pld", unit="patient")
  assert record.pld_discretization == 1e-4
  masks = _masks(8, 3, never=())
  for mask in masks:
    record.record_round(mask)
  assert (record.composition_counts > 0).all()
  eps = record.epsilons()
  for k, event in enumerate(record.hospital_events()):
    library = pld_privacy_accountant.PLDAccountant().compose(event).get_epsilon(1e-5)
    assert eps[k] == pytest.approx(library, rel=1e-9), k


def test_ledger_would_exceed_looks_one_round_ahead():
  record, _, _ = _example_ledger()
  mask = np.array([True, False, False, False, False, False])
  record.record_round(mask)
  now, ahead = record.epsilons(), record.epsilons_after(mask)
  assert ahead[0] > now[0] and (ahead[1:] == now[1:]).all()
  assert record.would_exceed((now[0] + ahead[0]) / 2, mask)
  assert not record.would_exceed((now[0] + ahead[0]) / 2, np.zeros(6, bool))
  np.testing.assert_array_equal(record.epsilons(), now)  # Looking ahead records nothing.


def test_client_level_ledger_same_for_everyone():
  record = ledger.PrivacyLedger.for_client_level(
      num_hospitals=50, sampling_rate=0.2, noise_multiplier=1.0, delta=1e-4)
  for _ in range(25):
    record.record_round(np.zeros(50, bool))  # Participation does not matter.
  eps = record.epsilons()
  direct = direct_rdp(poisson(0.2, 1.0, 25), 1e-4)
  np.testing.assert_allclose(eps, direct, rtol=1e-9)
  assert record.unit == "hospital" and record.to_json()["composition"] == "every_round"


def test_client_level_fixed_cohort_ledger():
  record = ledger.PrivacyLedger.for_client_level(
      num_hospitals=100, cohort_size=20, noise_multiplier=1.0, delta=1e-5)
  for _ in range(10):
    record.record_round(None)
  event = events.fixed_size_sampled_event(sample_size=20, population=100,
                                          noise_multiplier=1.0, steps=10)
  assert record.neighbouring == accountants.REPLACE_ONE
  np.testing.assert_allclose(record.epsilons(), accountants.epsilon(event, 1e-5), rtol=1e-9)


def test_ledger_validates_inputs():
  record, _, _ = _example_ledger()
  with pytest.raises(ValueError, match=r"^participation_mask.shape=\(5,\) must be \(6,\)"):
    record.record_round(np.ones(5, bool))
  with pytest.raises(ValueError, match=r"^unit='user' must be one of \['example', "):
    ledger.PrivacyLedger([poisson(0.1, 1.0, 1)], delta=1e-5, unit="user")
  with pytest.raises(ValueError, match=r"^per_round_events=\[\] must be non-empty"):
    ledger.PrivacyLedger([], delta=1e-5)
  truncated = events.local_dp_sgd_event(sampling_rate=0.1, noise_multiplier=1.0, steps=5,
                                        truncated_batch_size=15, dataset_size=100)
  with pytest.raises(ValueError, match="^dp.accountant='rdp' must be 'pld'"):
    ledger.PrivacyLedger([truncated], delta=1e-5, accountant="rdp")


def test_ledger_to_json_round_trips():
  record, _, _ = _example_ledger()
  for r, mask in enumerate(_masks(4, 6)):
    record.record_round(mask)
    record.snapshot(r)
  data = record.to_json()
  assert json.loads(json.dumps(data, allow_nan=False)) == data
  for key in ("unit", "delta", "accountant", "neighbouring_relation", "hospital_events",
              "epsilon", "history"):
    assert key in data
  assert data["neighbouring_relation"] == "add_or_remove_one"
  hospital_events = [events.event_from_dict(d) for d in data["hospital_events"]]
  assert hospital_events == record.hospital_events()
  for event, eps in zip(hospital_events, data["epsilon"]):
    assert accountants.epsilon(event, 1e-5) == pytest.approx(eps, rel=1e-9)


def test_ledger_json_numbers_are_plain_floats_inf_included():
  """No noise: epsilon inf, left as a float for the writer (one NaN/inf rule, the writer's)."""
  record, _, _ = _example_ledger(noise_multiplier=0.0)
  mask = np.array([True, True, False, False, False, False])
  record.record_round(mask)
  record.snapshot(1)
  data = record.to_json()
  assert data["epsilon"] == [math.inf, math.inf, 0.0, 0.0, 0.0, 0.0]
  assert data["max_epsilon"] == math.inf and type(data["max_epsilon"]) is float
  assert data["history"] == [{"round": 1, "epsilon": data["epsilon"], "max_epsilon": math.inf}]
  assert all(type(e) is float for e in data["epsilon"] + data["history"][0]["epsilon"])


def test_pld_ledger_builds_each_step_once():
  """One-step PLDs are kept per distinct event, not rebuilt (nor taken from the LRU cache)."""
  record, _, _ = _example_ledger("pld")
  masks = _masks(2, 6)
  record.record_round(masks[0])
  first = record.epsilons()
  steps = dict(record._steps)
  assert record.pld_step_bytes > 0
  record.record_round(masks[1])
  record.epsilons()
  assert all(record._steps[u][0] is step for u, (step, _) in steps.items())
  np.testing.assert_array_equal(first, record._epsilons_at(masks[0].astype(np.int64)))


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_client_level_rounds_charged_their_own_noise_match_dp_accounting(accountant):
  """Per-round noise multipliers (the distributed noise that survived dropouts) are composed
  as dp_accounting composes the rounds' events one by one."""
  z = [1.0, 1.4, 1.0, 1.2, 1.4]
  record = ledger.PrivacyLedger.for_client_level(
      num_hospitals=30, sampling_rate=0.2, noise_multiplier=1.0, delta=1e-5,
      accountant=accountant, pld_discretization=COARSE_PLD)
  for sigma in z:
    record.record_round(None, noise_multiplier=sigma)
  by_hand = dpe.ComposedDpEvent([poisson(0.2, sigma, 1) for sigma in z])
  direct = direct_rdp if accountant == "rdp" else direct_pld
  want = direct(by_hand, 1e-5)
  np.testing.assert_allclose(record.epsilons(), want, rtol=1e-9 if accountant == "rdp" else 1e-6)
  # More noise than configured costs less; the configured z every round costs the most.
  assert want < direct(poisson(0.2, 1.0, 5), 1e-5)
  data = record.to_json()
  assert data["round_event_index"] == [0, 1, 0, 2, 1]
  assert [e["event"]["event"]["noise_multiplier"] for e in data["per_round_events"]] == [
      1.0, 1.4, 1.2]
  composed = events.event_from_dict(data["hospital_events"][0])
  assert accountants.epsilon(composed, 1e-5, accountant,
                             pld_discretization=COARSE_PLD) == pytest.approx(want, rel=1e-6)
  ahead = record.epsilons_after(None, noise_multiplier=3.0)[0]
  assert record.epsilons()[0] < ahead < record.epsilons_after(None)[0]
  with pytest.raises(ValueError, match=r"^noise_multiplier=1.0 must be None \(a round's own"):
    _example_ledger()[0].record_round(np.ones(6, bool), noise_multiplier=1.0)
