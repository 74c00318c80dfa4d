"""Tests for privacy/validation.py: one wording, `{field}={value!r} must be {allowed}`."""

import numpy as np
import pytest

from privacy import validation


@pytest.mark.parametrize("kwargs,message", [
    (dict(noise_multiplier=-1), "dp.noise_multiplier=-1 must be >= 0"),
    (dict(noise_multiplier=-1.0), "dp.noise_multiplier=-1.0 must be >= 0"),
    (dict(noise_multiplier=float("nan")), "dp.noise_multiplier=nan must be >= 0"),
    (dict(sampling_rate=0.0), r"sampling_rate=0.0 must be in \(0, 1\] \(expected batch"),
    (dict(sampling_rate=1.5), r"sampling_rate=1.5 must be in \(0, 1\]"),
    (dict(delta=0.0), r"dp.delta=0.0 must be in \(0, 1\)"),
    (dict(delta=1.0), r"dp.delta=1.0 must be in \(0, 1\)"),
    (dict(delta=0.01, population=200),
     r"dp.delta=0.01 must be < 1/n = 0.005 for n=200 privacy units"),
    (dict(population=0), "population=0 must be an integer >= 1"),
    (dict(clip_norm=0.0), "dp.clip_norm=0.0 must be > 0"),
    (dict(clip_norm=-2.5), "dp.clip_norm=-2.5 must be > 0"),
])
def test_validate_dp_params_messages(kwargs, message):
  params = dict(noise_multiplier=1.0, sampling_rate=0.1, delta=1e-5, clip_norm=1.0,
                population=100) | kwargs
  with pytest.raises(ValueError, match=f"^{message}"):
    validation.validate_dp_params(**params)


def test_validate_dp_params_accepts_valid():
  validation.validate_dp_params(noise_multiplier=0.0, sampling_rate=1.0, delta=1e-5,
                                clip_norm=1.0, population=1000)


def test_check_is_the_one_wording():
  validation.check(True, "anything", object(), "ignored")
  with pytest.raises(ValueError) as error:
    validation.check(False, "client.learning_rate", -0.1, "> 0")
  assert str(error.value) == "client.learning_rate=-0.1 must be > 0"


@pytest.mark.parametrize("value,shown", [
    (np.float64(0.5), "0.5"), (np.float32(2.0), "2.0"), (np.int64(3), "3"),
    (np.array(7), "7"), ("rdp", "'rdp'"),
])
def test_check_shows_numpy_scalars_as_python_numbers(value, shown):
  with pytest.raises(ValueError, match=f"^field={shown} must be ok$"):
    validation.check(False, "field", value, "ok")


@pytest.mark.parametrize("value", [-1, 1.5, True, float("nan"), float("inf"), None, "3"])
def test_check_count_refuses_non_integers(value):
  with pytest.raises(ValueError, match=r"^steps=.* must be an integer >= 0$"):
    validation.check_count("steps", value)


def test_checks_return_python_types():
  assert type(validation.check_count("steps", np.int64(4))) is int
  assert validation.check_count("steps", 4.0) == 4
  assert type(validation.check_noise_multiplier(np.float32(1.5))) is float
  assert type(validation.check_sampling_rate(np.float64(0.25))) is float
  assert type(validation.check_delta(np.float64(1e-5))) is float
