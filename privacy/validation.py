"""Checks of DP parameters, before any compute, with one wording for every error.

Usable without fedsim. Every refusal is one `ValueError` that names the field, its value and
what is allowed: `f"{field}={value!r} must be {allowed}"` (shared/DESIGN.md: bad input stops with
one clear line). fedsim's config validation raises through `check` too, so a field reads the same
whether the config or the privacy library refuses it.

Example:

  >>> validate_dp_params(noise_multiplier=-1.0, sampling_rate=0.1, delta=1e-5)
  Traceback (most recent call last):
  ...
  ValueError: dp.noise_multiplier=-1.0 must be >= 0
"""

from __future__ import annotations

from typing import Any

import numpy as np


def check(ok: bool, field: str, value: Any, allowed: str) -> None:
  """Raises `ValueError(f"{field}={value!r} must be {allowed}")` unless `ok`.

  A numpy or JAX scalar is shown as the Python number it holds (`0.5`, not
  `np.float64(0.5)`), so the message reads like the config field it names.

  Args:
    ok: whether the value is allowed.
    field: the config field or argument name, e.g. "dp.delta".
    value: the value given.
    allowed: what the field must be, e.g. "in (0, 1)".

  Raises:
    ValueError: when `ok` is false.

  >>> check(0.5 < 1, "dp.delta", 0.5, "in (0, 1)")
  >>> check(2.0 < 1, "dp.delta", 2.0, "in (0, 1)")
  Traceback (most recent call last):
  ...
  ValueError: dp.delta=2.0 must be in (0, 1)
  """
  if ok:
    return
  if hasattr(value, "item") and np.ndim(value) == 0:
    value = value.item()
  raise ValueError(f"{field}={value!r} must be {allowed}")


def _is_integer(value: Any) -> bool:
  if isinstance(value, bool):
    return False
  try:
    return int(value) == value
  except (TypeError, ValueError, OverflowError):  # None, strings, NaN, inf
    return False


def check_noise_multiplier(noise_multiplier: float) -> float:
  """`dp.noise_multiplier` >= 0 (NaN refused), as a Python float."""
  check(noise_multiplier >= 0, "dp.noise_multiplier", noise_multiplier, ">= 0")
  return float(noise_multiplier)


def check_sampling_rate(sampling_rate: float) -> float:
  """A Poisson sampling rate q in (0, 1], as a Python float."""
  check(0 < sampling_rate <= 1, "sampling_rate", sampling_rate,
        "in (0, 1] (expected batch or cohort size / privacy units)")
  return float(sampling_rate)


def check_delta(delta: float) -> float:
  """`dp.delta` in (0, 1), as a Python float."""
  check(0 < delta < 1, "dp.delta", delta, "in (0, 1)")
  return float(delta)


def check_count(field: str, value: int, minimum: int = 0) -> int:
  """An integer count (steps, rounds, sizes) >= `minimum`, as a Python int.

  >>> check_count("steps", -1)
  Traceback (most recent call last):
  ...
  ValueError: steps=-1 must be an integer >= 0
  """
  check(_is_integer(value) and value >= minimum, field, value, f"an integer >= {minimum}")
  return int(value)


def validate_dp_params(
    *,
    noise_multiplier: float,
    sampling_rate: float,
    delta: float,
    clip_norm: float | None = None,
    population: int | None = None,
) -> None:
  """Checks DP parameters before any compute; raises one ValueError naming the field.

  Args:
    noise_multiplier: noise std / clip norm (`dp.noise_multiplier`), >= 0.
    sampling_rate: Poisson sampling rate q of privacy units, in (0, 1].
    delta: target delta (`dp.delta`), in (0, 1) and < 1/population.
    clip_norm: `dp.clip_norm`, > 0 when given.
    population: number of privacy units n the sampling draws from (examples or patients of
      a hospital, or hospitals for client-level DP), when known.

  Raises:
    ValueError: e.g. "dp.noise_multiplier=-1.0 must be >= 0".

  >>> validate_dp_params(noise_multiplier=1.0, sampling_rate=0.1, delta=0.01, population=200)
  Traceback (most recent call last):
  ...
  ValueError: dp.delta=0.01 must be < 1/n = 0.005 for n=200 privacy units
  """
  check_noise_multiplier(noise_multiplier)
  check_sampling_rate(sampling_rate)
  check_delta(delta)
  if population is not None:
    check_count("population", population, minimum=1)
    check(delta < 1 / population, "dp.delta", delta,
          f"< 1/n = {1 / population:g} for n={population} privacy units")
  if clip_norm is not None:
    check(clip_norm > 0, "dp.clip_norm", clip_norm, "> 0")
