"""DpEvents that describe what a federated DP run does, and their JSON form.

Usable without fedsim. The DpEvent is the privacy record (shared/DESIGN.md, invariants 1 and 4):
small pure functions build the event that matches the sampling that runs (Poisson, truncated
Poisson, or fixed-size without replacement), and `event_to_dict` / `event_from_dict` save it with
the results and read it back. Accounting an event is `privacy.accountants`' job.

Example:

  >>> local_dp_sgd_event(sampling_rate=0.25, noise_multiplier=2, steps=6)
  ... # doctest: +NORMALIZE_WHITESPACE
  SelfComposedDpEvent(event=PoissonSampledDpEvent(sampling_probability=0.25,
      event=GaussianDpEvent(noise_multiplier=2.0)), count=6)
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import attr
import numpy as np
from dp_accounting import dp_event as dpe

from privacy import validation

DpEvent = dpe.DpEvent


def _self_composed(event: DpEvent, count: int) -> DpEvent:
  """`count` repetitions of `event`; zero repetitions cost nothing (NoOp)."""
  if count == 0:
    return dpe.NoOpDpEvent()
  return dpe.SelfComposedDpEvent(event, count)


def local_dp_sgd_event(
    *,
    sampling_rate: float,
    noise_multiplier: float,
    steps: int,
    truncated_batch_size: int | None = None,
    dataset_size: int | None = None,
) -> DpEvent:
  """One hospital's DP-SGD local steps in ONE round.

  Each step Poisson-samples the hospital's privacy units (examples or patients) with rate
  q = expected batch / n_k, sums their clipped gradients and adds N(0, (sigma * C)^2).
  Neighbouring relation: add or remove one unit of this hospital.

  Args:
    sampling_rate: q_k in (0, 1].
    noise_multiplier: sigma >= 0.
    steps: local steps in the round, >= 0.
    truncated_batch_size: when the Poisson batch is truncated to at most this many units
      (a random subset is kept), the event is `TruncatedSubsampledGaussianDpEvent`, which
      only the PLD accountant supports.
    dataset_size: n_k, required with `truncated_batch_size` (ignored otherwise).

  Returns:
    SelfComposed(PoissonSampled(q, Gaussian(sigma)), steps), or
    SelfComposed(TruncatedSubsampledGaussian(n_k, q, B, sigma), steps).

  >>> local_dp_sgd_event(sampling_rate=0.1, noise_multiplier=1.0, steps=0)
  NoOpDpEvent()
  """
  q = validation.check_sampling_rate(sampling_rate)
  sigma = validation.check_noise_multiplier(noise_multiplier)
  steps = validation.check_count("steps", steps)
  if truncated_batch_size is None:
    step = dpe.PoissonSampledDpEvent(q, dpe.GaussianDpEvent(sigma))
  else:
    validation.check(dataset_size is not None, "dataset_size", dataset_size,
                     "given with truncated_batch_size")
    step = dpe.TruncatedSubsampledGaussianDpEvent(
        dataset_size=validation.check_count("dataset_size", dataset_size, minimum=1),
        sampling_probability=q,
        truncated_batch_size=validation.check_count(
            "truncated_batch_size", truncated_batch_size, minimum=1),
        noise_multiplier=sigma,
    )
  return _self_composed(step, steps)


def hospital_event(per_round_event: DpEvent, rounds_participated: int) -> DpEvent:
  """Composition of a hospital's per-round event over the rounds it took part in.

  Valid for example- and patient-level DP, where a hospital's units are touched only in
  rounds it takes part in and the cohort is drawn independently of the data. Same
  neighbouring relation as `per_round_event`. Zero rounds gives `NoOpDpEvent` (epsilon 0).
  """
  return _self_composed(
      per_round_event, validation.check_count("rounds_participated", rounds_participated))


def client_level_event(*, sampling_rate: float, noise_multiplier: float, rounds: int) -> DpEvent:
  """DP-FedAvg with Poisson client sampling, over `rounds` rounds.

  Each round every hospital joins the cohort independently with q = expected cohort /
  hospitals; the server adds N(0, (sigma * S)^2) once to the sum of client deltas clipped to
  S. Neighbouring relation: add or remove one hospital (all of its data).
  """
  step = dpe.PoissonSampledDpEvent(
      validation.check_sampling_rate(sampling_rate),
      dpe.GaussianDpEvent(validation.check_noise_multiplier(noise_multiplier)),
  )
  return _self_composed(step, validation.check_count("rounds", rounds))


def fixed_size_sampled_event(
    *, sample_size: int, population: int, noise_multiplier: float, steps: int
) -> DpEvent:
  """Fixed-size sampling without replacement (e.g. a fixed cohort of `clients_per_round`).

  Each step draws `sample_size` of `population` units uniformly without replacement, sums
  their clipped contributions (norm <= C) and adds N(0, (sigma * C)^2). Neighbouring
  relation: replace one unit (n public). Replacing a unit moves the sum by up to 2C, so the
  Gaussian's noise-to-sensitivity ratio is sigma / 2. RDP only (dp.accountant=rdp).

  >>> fixed_size_sampled_event(sample_size=10, population=100, noise_multiplier=1.0,
  ...                          steps=1).event  # doctest: +NORMALIZE_WHITESPACE
  SampledWithoutReplacementDpEvent(source_dataset_size=100, sample_size=10,
      event=GaussianDpEvent(noise_multiplier=0.5))
  """
  population = validation.check_count("population", population, minimum=1)
  sample_size = validation.check_count("sample_size", sample_size, minimum=1)
  validation.check(sample_size <= population, "sample_size", sample_size,
                   f"<= population={population}")
  step = dpe.SampledWithoutReplacementDpEvent(
      population, sample_size,
      dpe.GaussianDpEvent(validation.check_noise_multiplier(noise_multiplier) / 2),
  )
  return _self_composed(step, validation.check_count("steps", steps))


# ---------------------------------------------------------------------------- serialisation


def _to_jsonable(value: Any) -> Any:
  if isinstance(value, DpEvent):
    return event_to_dict(value)
  if isinstance(value, (list, tuple)):
    return [_to_jsonable(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def event_to_dict(event: DpEvent) -> dict[str, Any]:
  """A JSON-serialisable dict of a DpEvent (the fields of dp_accounting's `to_named_tuple`).

  >>> event_to_dict(dpe.GaussianDpEvent(2.0))  # doctest: +NORMALIZE_WHITESPACE
  {'module_name': 'dp_accounting.dp_event', 'class_name': 'GaussianDpEvent',
   'noise_multiplier': 2.0}
  """
  out = {"module_name": type(event).__module__, "class_name": type(event).__name__}
  for field in attr.fields(type(event)):
    out[field.name] = _to_jsonable(getattr(event, field.name))
  return out


def _from_jsonable(value: Any) -> Any:
  if isinstance(value, Mapping) and "class_name" in value:
    return event_from_dict(value)
  if isinstance(value, list):
    return [_from_jsonable(v) for v in value]
  return value


def event_from_dict(data: Mapping[str, Any]) -> DpEvent:
  """Inverse of `event_to_dict`; only classes from dp_accounting are instantiated.

  >>> event = client_level_event(sampling_rate=0.1, noise_multiplier=1.2, rounds=30)
  >>> event_from_dict(event_to_dict(event)) == event
  True
  """
  module_name = data["module_name"]
  if not module_name.startswith("dp_accounting."):
    raise ValueError(f"not a dp_accounting event module: {module_name!r}")
  cls = getattr(importlib.import_module(module_name), data["class_name"])
  if not (isinstance(cls, type) and issubclass(cls, DpEvent)):
    raise TypeError(f"{module_name}.{data['class_name']} is not a DpEvent")
  kwargs = {k: _from_jsonable(v) for k, v in data.items() if k not in ("module_name", "class_name")}
  return cls(**kwargs)
