"""Tests for privacy/events.py: event structure, validation, JSON round trip."""

import json

import numpy as np
import pytest
from dp_accounting import dp_event as dpe

from privacy import events
from tests.privacy.conftest import poisson


def test_local_event_structure():
  event = events.local_dp_sgd_event(sampling_rate=0.25, noise_multiplier=2, steps=6)
  assert event == poisson(0.25, 2.0, 6)
  assert isinstance(event.event.event.noise_multiplier, float)  # dp_accounting needs floats.


def test_truncated_event_structure():
  event = events.local_dp_sgd_event(sampling_rate=0.1, noise_multiplier=1.0, steps=3,
                                    truncated_batch_size=12, dataset_size=80)
  assert event == dpe.SelfComposedDpEvent(
      dpe.TruncatedSubsampledGaussianDpEvent(80, 0.1, 12, 1.0), 3)


def test_hospital_and_client_events():
  per_round = events.local_dp_sgd_event(sampling_rate=0.2, noise_multiplier=1.0, steps=5)
  assert events.hospital_event(per_round, 7) == dpe.SelfComposedDpEvent(per_round, 7)
  assert events.hospital_event(per_round, 0) == dpe.NoOpDpEvent()
  assert events.client_level_event(sampling_rate=0.1, noise_multiplier=1.2, rounds=30) == (
      poisson(0.1, 1.2, 30))


def test_fixed_size_event_halves_sigma_for_replace_one():
  event = events.fixed_size_sampled_event(sample_size=10, population=100,
                                          noise_multiplier=1.0, steps=20)
  assert event == dpe.SelfComposedDpEvent(
      dpe.SampledWithoutReplacementDpEvent(100, 10, dpe.GaussianDpEvent(0.5)), 20)


@pytest.mark.parametrize("build,message", [
    (lambda: events.local_dp_sgd_event(sampling_rate=0.1, noise_multiplier=1.0, steps=-1),
     "steps=-1 must be an integer >= 0"),
    (lambda: events.local_dp_sgd_event(sampling_rate=0.1, noise_multiplier=1.0, steps=1,
                                       truncated_batch_size=4),
     "dataset_size=None must be given with truncated_batch_size"),
    (lambda: events.local_dp_sgd_event(sampling_rate=0.1, noise_multiplier=1.0, steps=1,
                                       truncated_batch_size=0, dataset_size=10),
     "truncated_batch_size=0 must be an integer >= 1"),
    (lambda: events.hospital_event(dpe.NoOpDpEvent(), 2.5),
     "rounds_participated=2.5 must be an integer >= 0"),
    (lambda: events.client_level_event(sampling_rate=0.0, noise_multiplier=1.0, rounds=1),
     r"sampling_rate=0.0 must be in \(0, 1\]"),
    (lambda: events.fixed_size_sampled_event(sample_size=11, population=10,
                                             noise_multiplier=1.0, steps=1),
     "sample_size=11 must be <= population=10"),
])
def test_builders_validate(build, message):
  with pytest.raises(ValueError, match=f"^{message}"):
    build()


def test_event_dict_round_trip_nested_and_safe():
  event = dpe.ComposedDpEvent([
      poisson(0.1, 1.0, 3),
      dpe.TruncatedSubsampledGaussianDpEvent(100, 0.1, 12, 1.0),
      dpe.SampledWithoutReplacementDpEvent(100, 10, dpe.GaussianDpEvent(np.float64(2.0)))])
  data = json.loads(json.dumps(events.event_to_dict(event)))
  assert events.event_from_dict(data) == event
  with pytest.raises(ValueError, match="not a dp_accounting event module"):
    events.event_from_dict({"module_name": "os", "class_name": "system"})
  with pytest.raises(TypeError, match="is not a DpEvent"):
    events.event_from_dict({"module_name": "dp_accounting.dp_event", "class_name": "attr"})
