"""Aggregation: weights, the weighted sum over a chunk, the mean."""

import jax.numpy as jnp
import numpy as np
import pytest

from fedsim import aggregation


def test_weights_by_examples_or_uniform_zero_when_padded():
  counts, valid = jnp.array([3, 5, 7]), jnp.array([True, False, True])
  np.testing.assert_array_equal(aggregation.client_weights(counts, valid, "examples"),
                                [3.0, 0.0, 7.0])
  np.testing.assert_array_equal(aggregation.client_weights(counts, valid, "uniform"),
                                [1.0, 0.0, 1.0])
  with pytest.raises(ValueError, match="server.weighting='median' must be one of"):
    aggregation.client_weights(counts, valid, "median")


def test_aggregate_ignores_non_finite_padded_clients():
  deltas = {"w": jnp.array([[1.0, 2.0], [jnp.nan, jnp.inf]])}
  out = aggregation.aggregate(deltas, jnp.array([2.0, 0.0]))
  np.testing.assert_array_equal(out["w"], [2.0, 4.0])


def test_chunk_sums_add_up_to_the_cohort_sum():
  rng = np.random.default_rng(0)
  deltas = {"a": jnp.asarray(rng.normal(size=(6, 3))), "b": jnp.asarray(rng.normal(size=(6,)))}
  weights = jnp.asarray(rng.integers(1, 9, 6), jnp.float32)
  whole = aggregation.aggregate(deltas, weights)
  halves = [aggregation.aggregate({k: v[s] for k, v in deltas.items()}, weights[s])
            for s in (slice(0, 3), slice(3, 6))]
  for k in deltas:
    np.testing.assert_allclose(whole[k], halves[0][k] + halves[1][k], rtol=1e-6)


def test_weighted_mean_divides_and_reports_empty_rounds():
  mean, apply = aggregation.weighted_mean({"w": jnp.array([6.0, 3.0])}, jnp.float32(3.0))
  np.testing.assert_array_equal(mean["w"], [2.0, 1.0])
  assert bool(apply)
  mean, apply = aggregation.weighted_mean({"w": jnp.zeros(2)}, jnp.float32(0.0))
  np.testing.assert_array_equal(mean["w"], [0.0, 0.0])
  assert not bool(apply)
