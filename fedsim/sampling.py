"""Cohort sampling: which hospitals train in a round.

Both samplers are host-side numpy, driven by a generator derived from (seed,
round), so the cohort of a round is reproducible and is exactly what the
accountant is told. Fixed-size cohorts sample without replacement; Poisson
cohorts include each hospital independently with rate q (variable size; the round
runs them in fixed-size, masked chunks so nothing recompiles).
"""

from __future__ import annotations

import numpy as np

from fedsim import keys


def round_rng(seed: int, round_index: int, purpose: int) -> np.random.Generator:
  """A generator for one (seed, round, purpose), independent of every other."""
  return np.random.default_rng([seed, round_index, purpose])


def fixed_cohort(rng: np.random.Generator, population: int, size: int) -> np.ndarray:
  """`size` distinct hospital ids, sorted."""
  if not 1 <= size <= population:
    raise ValueError(f"clients_per_round={size} must be in [1, num_clients={population}]")
  return np.sort(rng.choice(population, size=size, replace=False))


def poisson_cohort(rng: np.random.Generator, population: int, rate: float) -> np.ndarray:
  """Each hospital independently with probability `rate`; may be empty."""
  if not 0.0 < rate <= 1.0:
    raise ValueError(f"client_sampling_rate={rate} must be in (0, 1]")
  return np.flatnonzero(rng.random(population) < rate)


def chunk_ids(cohort: np.ndarray, chunk: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Splits a cohort into fixed-size chunks: `(ids [chunk], valid [chunk])` each.

  The last chunk is padded with id 0 and `valid=False`; an empty cohort gives
  no chunks.
  """
  out = []
  for start in range(0, len(cohort), chunk):
    ids = cohort[start:start + chunk]
    valid = np.arange(chunk) < len(ids)
    out.append((np.pad(ids, (0, chunk - len(ids))), valid))
  return out


def cohort_for_round(config, round_index: int) -> np.ndarray:
  """The hospitals of round `round_index` of a run, reproducible from (seed, round).

  Poisson with `config.client_sampling_rate` when it is > 0, else a fixed-size
  cohort of `config.clients_per_round`.
  """
  rng = round_rng(config.seed, round_index, keys.COHORT)
  if config.client_sampling_rate > 0:
    return poisson_cohort(rng, config.num_clients, config.client_sampling_rate)
  return fixed_cohort(rng, config.num_clients, config.clients_per_round)


def participation_mask(num_clients: int, cohort: np.ndarray) -> np.ndarray:
  """`[num_clients]` bool: who is in `cohort` (for the ledger)."""
  mask = np.zeros(num_clients, bool)
  mask[cohort] = True
  return mask


def participation(config, round_index: int) -> np.ndarray:
  """`[num_clients]` bool: the hospitals round `round_index` of a run charges."""
  return participation_mask(config.num_clients, cohort_for_round(config, round_index))
