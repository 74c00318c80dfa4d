"""Bucketed DP-SGD gathers (engine.dp_gather): fewer rows, the same training and ledger."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedsim import blocks, keys
from fedsim import client as client_lib
from fedsim import config as config_lib
from fedsim import round as round_lib
from privacy.sampling import PoissonSampler
from tests.conftest import tiny_config


def test_gather_rows_is_a_half_octave_grid_capped_at_the_limit():
  got = [blocks.gather_rows(k, 1000) for k in (0, 1, 3, 5, 7, 9, 13, 17, 25, 33, 97, 129)]
  assert got == [1, 1, 3, 6, 8, 12, 16, 24, 32, 48, 128, 192]
  assert blocks.gather_rows(150, 160) == 160
  kept = np.arange(1, 2000)
  rows = np.array([blocks.gather_rows(int(k), 10**6) for k in kept])
  assert (rows >= kept).all() and (rows <= 1.5 * kept + 1).all()


@pytest.mark.parametrize("unit,max_units", [("example", 0), ("patient", 0), ("patient", 3)])
def test_flat_layout_keeps_the_same_examples_as_the_fixed_one(unit, max_units):
  images = np.array([1, 3, 2, 4, 1, 2, 3, 1, 4, 2, 1, 1])  # per patient
  patients = np.repeat(np.arange(len(images)), images)
  n = len(patients) + 5
  ids = jnp.asarray(np.pad(patients, (0, 5), constant_values=-1), jnp.int32)
  real = jnp.arange(n) < len(patients)
  fixed = PoissonSampler(unit, max_units=max_units, unit_images=4 if unit == "patient" else 1)
  for i in range(30):
    key, rate = jax.random.key(i), jnp.float32(0.3)
    want = fixed.draw(key, ids, real, rate)
    kept = np.sort(np.asarray(want.index)[np.asarray(want.mask)])
    rows = int(np.sum(want.mask))
    flat = PoissonSampler(unit, max_units=max_units, unit_images=fixed.unit_images,
                          gather=max(rows, 1)).draw(key, ids, real, rate)
    index, mask, units = map(np.asarray, flat[:3])
    assert mask[:rows].all() and not mask[rows:].any()  # the kept rows are a prefix
    np.testing.assert_array_equal(np.sort(index[mask]), kept)
    assert bool(flat.truncated) == bool(want.truncated)
    owner = patients[index[mask]] if unit == "patient" else index[mask]
    for u in np.unique(units[mask]):  # a unit is one patient, its rows adjacent
      rows_of = np.flatnonzero(units == u)
      assert len(set(owner[units[mask] == u])) == 1
      assert (np.diff(rows_of) == 1).all()


@pytest.fixture(scope="module")
def rounds(tiny_fed):
  """A round of patient-level DP-SGD, fixed gathers (the cohort in one block) and bucketed
  ones (one client a block, sizes read two blocks at a time: several blocks per read, and
  several reads); example level: the same prefix of the same draw, tested above."""
  out = {}
  for level in ("patient",):
    for gather, block, prefetch in (("fixed", 4, 0), ("bucketed", 1, 2)):
      config = tiny_config()
      config.dp.level, config.engine.dp_gather = level, gather
      config.engine.shard_clients, config.engine.client_block = False, block
      config_lib.validate(config)
      with pytest.MonkeyPatch.context() as patch:
        if prefetch:
          patch.setattr(round_lib, "PREFETCH_CLIENTS", prefetch)
        setup = round_lib.Setup(config, tiny_fed)
        state = round_lib.init_state(setup)
        state, output = round_lib.round_step(setup, state, 1)
      out[level, gather] = setup, state, output
  return out


@pytest.mark.parametrize("level", ["patient"])
def test_bucketed_rounds_train_like_fixed_ones(rounds, level):
  fixed, bucketed = rounds[level, "fixed"], rounds[level, "bucketed"]
  assert len(bucketed[2].cohort) > 2  # more one-client blocks than one read covers
  assert not fixed[0].flat and bucketed[0].flat
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               fixed[1].params, bucketed[1].params)
  for name in ("examples", "num_units", "steps", "truncated_steps"):
    assert float(fixed[2].sums.metrics[name]) == float(bucketed[2].sums.metrics[name])
  np.testing.assert_allclose(float(fixed[2].sums.metrics["loss_sum"]),
                             float(bucketed[2].sums.metrics["loss_sum"]), rtol=1e-5)
  # The accounting is the config's: the same DpEvent, the same epsilon.
  assert fixed[0].plan.new_ledger().hospital_events() == \
      bucketed[0].plan.new_ledger().hospital_events()


def test_batch_sizes_count_the_rows_each_step_keeps(rounds):
  """`client.batch_sizes` sees exactly the draws `client_update` trains on."""
  setup, _, output = rounds["patient", "bucketed"]
  block = next(blocks.gather(setup.fed.train, output.cohort, len(output.cohort)))
  client_keys = blocks.client_keys(keys.round_keys(setup.config.seed, 1).clients, block.ids)
  sizes = jax.vmap(lambda d, k: client_lib.batch_sizes(setup.plan.sampler, setup.schedule,
                                                       d, k))(block.data, client_keys)
  assert int(np.sum(sizes)) == float(output.sums.metrics["examples"]) > 0
