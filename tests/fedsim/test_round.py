"""The round step: one function over a ServerState, compiled once, hyperparameters traced."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedsim import keys, round, sampling
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def setup(tiny_fed):
  return round.Setup(tiny_config(), tiny_fed)


def leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_rounds_advance_the_state_and_compile_once(setup):
  state = round.init_state(setup)
  assert int(state.round) == 0
  for r in (1, 2, 3):
    new, out = round.round_step(setup, state, r)
    assert int(new.round) == r
    np.testing.assert_array_equal(out.cohort, sampling.cohort_for_round(setup.config, r))
    np.testing.assert_array_equal(np.flatnonzero(out.participating), out.cohort)
    assert float(out.sums.metrics["clients"]) == len(out.cohort)
    assert not leaves_equal(new.params, state.params)
    state = new
  # Another value of a traced hyperparameter reuses the same programs.
  setup_hparams = dict(setup.hparams)
  try:
    setup.hparams.update(client_lr=jnp.float32(0.01), server_lr=jnp.float32(0.5))
    round.round_step(setup, state, 4)
  finally:
    setup.hparams.update(setup_hparams)
  assert setup.block_fn.compiled._cache_size() == 1
  assert setup.server_step._cache_size() == 1


def test_round_step_is_a_pure_function_of_setup_state_and_round(setup):
  state = round.init_state(setup)
  a, out_a = round.round_step(setup, state, 5)
  b, out_b = round.round_step(setup, state, 5)
  c, _ = round.round_step(setup, state, 6)
  assert leaves_equal(a, b) and leaves_equal(out_a.sums, out_b.sums)
  assert not leaves_equal(a.params, c.params)


def test_server_learning_rate_is_traced_and_scales_the_step(setup):
  state = round.init_state(setup)
  full, _ = round.round_step(setup, state, 1)
  half_setup = round.Setup(setup.config, setup.fed)
  half_setup.hparams["server_lr"] = jnp.float32(0.5)
  half, _ = round.round_step(half_setup, state, 1)
  for p0, p1, ph in zip(*(jax.tree.leaves(s.params) for s in (state, full, half))):
    np.testing.assert_allclose(ph - p0, 0.5 * (p1 - p0), rtol=1e-5, atol=1e-7)


def test_an_empty_poisson_round_leaves_a_non_private_model_unchanged(tiny_fed):
  config = tiny_config()
  config.dp.level = "none"
  config.client_sampling_rate = 0.05  # 6 hospitals: a round is empty with p = 0.74
  empty = next(r for r in range(1, 50) if len(sampling.cohort_for_round(config, r)) == 0)
  setup = round.Setup(config, tiny_fed)
  state = round.init_state(setup)
  new, out = round.round_step(setup, state, empty)
  assert float(out.sums.weight_sum) == 0.0
  assert leaves_equal(new.params, state.params)
  assert int(new.round) == empty


def test_round_keys_differ_by_purpose_round_and_seed():
  raw = lambda k: tuple(np.asarray(jax.random.key_data(k)).ravel().tolist())
  seen = {raw(k) for seed in (0, 1) for r in (1, 2) for k in keys.round_keys(seed, r)}
  seen.add(raw(keys.init_key(0)))
  assert len(seen) == 2 * 2 * 3 + 1
