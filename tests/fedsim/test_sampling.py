"""Cohort sampling: reproducible from (seed, round), data-independent, chunked with masks."""

import numpy as np
import pytest

from fedsim import sampling
from tests.conftest import tiny_config


def test_fixed_cohort_is_distinct_sorted_and_of_the_asked_size():
  rng = np.random.default_rng(0)
  for _ in range(50):
    cohort = sampling.fixed_cohort(rng, 20, 7)
    assert len(cohort) == len(set(cohort.tolist())) == 7
    assert list(cohort) == sorted(cohort) and 0 <= cohort.min() and cohort.max() < 20
  with pytest.raises(ValueError, match="clients_per_round=21 must be in"):
    sampling.fixed_cohort(rng, 20, 21)


def test_poisson_cohort_has_the_rate():
  rng = np.random.default_rng(1)
  sizes = [len(sampling.poisson_cohort(rng, 100, 0.2)) for _ in range(400)]
  # Mean of 400 Binomial(100, 0.2) sizes: std 0.2; 1.0 is 5 std.
  assert abs(np.mean(sizes) - 20.0) < 1.0
  with pytest.raises(ValueError, match="client_sampling_rate=0.0 must be in"):
    sampling.poisson_cohort(rng, 100, 0.0)


def test_cohort_depends_on_seed_and_round_only():
  config = tiny_config()
  config.num_clients, config.clients_per_round = 50, 10
  first = [sampling.cohort_for_round(config, r) for r in (1, 2)]
  again = [sampling.cohort_for_round(config, r) for r in (1, 2)]
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first[0], first[1])
  config.seed = 1
  assert not np.array_equal(sampling.cohort_for_round(config, 1), first[0])
  config.client_sampling_rate = 0.3  # Poisson: variable size, same reproducibility
  np.testing.assert_array_equal(sampling.cohort_for_round(config, 4),
                                sampling.cohort_for_round(config, 4))


def test_chunks_pad_the_last_one_with_invalid_clients():
  chunks = sampling.chunk_ids(np.array([3, 5, 8, 9, 11]), 2)
  assert [ids.tolist() for ids, _ in chunks] == [[3, 5], [8, 9], [11, 0]]
  assert [valid.tolist() for _, valid in chunks] == [[True, True], [True, True],
                                                      [True, False]]
  assert sampling.chunk_ids(np.array([], np.int64), 4) == []


def test_participation_marks_exactly_the_cohort():
  config = tiny_config()
  mask = sampling.participation(config, 3)
  assert mask.shape == (config.num_clients,)
  np.testing.assert_array_equal(np.flatnonzero(mask), sampling.cohort_for_round(config, 3))
