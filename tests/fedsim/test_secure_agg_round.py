"""Secure aggregation inside the compiled round: matches plaintext, survives dropouts, stops."""

import copy
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import flatten_util

from fedsim import aggregation, blocks, sampling, simulation
from fedsim import config as config_lib
from fedsim import round as round_lib
from fedsim.client import ClientData
from privacy.secure_agg import protocol
from tests.conftest import tiny_config


def _config(**secure_agg):
  c = tiny_config()
  c.dp.level = "none"
  c.client.learning_rate = 0.1
  c.secure_agg.update(dict(enabled=True, clip_norm=1e4, scale=2.0**12), **secure_agg)
  return c


@pytest.fixture(scope="module")
def plain(tiny_fed):
  """The plaintext round; its config's other secure_agg fields are not read while disabled."""
  c = tiny_config()
  c.dp.level = "none"
  c.client.learning_rate = 0.1
  c.secure_agg.update(bits=3, scale=1.0, threshold=99, dropout_before=0.9)
  setup = round_lib.Setup(c, tiny_fed)
  assert setup.secure_agg is None
  state = round_lib.init_state(setup)
  out = round_lib.round_step(setup, state, 1)[1]
  assert out.secure_agg is None
  return setup, state, out


@pytest.fixture(scope="module")
def secure(tiny_fed):
  return round_lib.Setup(_config(), tiny_fed)


def _flat(tree):
  return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def test_secure_round_matches_the_plaintext_round_to_quantisation_error(plain, secure):
  _, state, expected = plain
  new_state, out = round_lib.round_step(secure, state, 1)
  got, want = _flat(out.sums.delta_sum), _flat(expected.sums.delta_sum)
  # 3 hospitals, weights <= counts: each rotated coordinate moves < weight / scale.
  weights = float(expected.sums.weight_sum)
  bound = weights * np.sqrt(secure.secure_agg.spec.padded) / secure.secure_agg.spec.scale
  err = np.linalg.norm(got - want)
  assert 0 < err < bound
  assert float(out.sums.weight_sum) == weights
  stats = {k: float(v) for k, v in out.secure_agg.items()}
  assert stats["secagg_overflows"] == 0 and stats["secagg_survivors"] == 3
  np.testing.assert_allclose(stats["secagg_quantisation_error"],
                             err / np.linalg.norm(want), rtol=1e-3)
  assert int(new_state.round) == 1


def _toy_secure_agg(block, neighbours=0):
  """Secure aggregation of a 5-coordinate update `{"a": [4], "b": []}` over cohorts <= 6."""
  template = {"a": jnp.zeros(4), "b": jnp.zeros(())}
  spec = protocol.Spec(bits=24, scale=2.0**10, clip_norm=1e6, rotate=True, size=5)
  return aggregation.SecureAggregation(
      spec, flatten_util.ravel_pytree(template)[1], seed=0, block=block, cohort_bound=6,
      neighbours=neighbours, threshold=3, dropout_before=0.2, dropout_after=0.2,
      noise_multiplier=0.0)


def _toy_update(params, data, key, hparams):
  del params, key, hparams
  return {"a": data.images, "b": data.labels}, {}


def _toy_round(secure, chunk, round_index):
  """The block program over blocks of `secure.block` slots; the server's decoded sum."""
  cohort = np.array([0, 2, 3, 5, 7, 8])
  rng = np.random.default_rng(1)
  images, labels = rng.normal(size=(10, 4)).astype(np.float32), rng.normal(size=10)
  block_fn = blocks.make_block_fn(_toy_update, weighting="uniform", chunk=chunk,
                                  aggregate=secure.aggregate)
  round_ = secure.begin_round(cohort, round_index)
  total = None
  for index, (ids, valid) in enumerate(sampling.chunk_ids(cohort, secure.block)):
    inputs, valid = secure.block_inputs(round_, index, valid)
    data = ClientData(jnp.asarray(images[ids]), jnp.asarray(labels[ids], jnp.float32),
                      jnp.zeros(len(ids)), jnp.asarray(valid, jnp.int32), jnp.ones(len(ids)))
    total = block_fn(None, data, jnp.asarray(valid), blocks.client_keys(jax.random.key(0), ids),
                     {}, total, inputs)
  sent = cohort[round_.plan.sent[:len(cohort)]]
  return total, secure.finish(total, round_), (images[sent].sum(0), labels[sent].sum())


def test_chunks_and_blocks_add_up_to_one_secure_sum():
  # Round 2 of seed 0: 2 of 6 drop before sending; round 5: 1 before and 1 after.
  for r, before, after in ((2, 2, 0), (5, 1, 1)):
    (one, (sums, stats), (a, b)), (split, _, _) = [
        _toy_round(_toy_secure_agg(block), chunk, r) for block, chunk in ((8, 8), (4, 2))]
    # One block of 8 vmapped vs two blocks scanned in two chunks each: the same modular sum.
    np.testing.assert_array_equal(one.delta_sum.masked, split.delta_sum.masked)
    assert (stats["secagg_dropped_before"], stats["secagg_dropped_after"]) == (before, after)
    # Each of <= 6 senders moves each of 8 rotated coordinates by < 1/scale.
    err = np.linalg.norm(np.append(sums.delta_sum["a"] - a, sums.delta_sum["b"] - b))
    assert 0 < err < 6 * np.sqrt(8) / 2.0**10
    np.testing.assert_allclose(stats["secagg_quantisation_error"],
                               err / np.linalg.norm(np.append(a, b)), rtol=1e-3)
    assert int(stats["secagg_overflows"]) == 0


def test_dropouts_are_recovered_and_reported(secure, plain):
  _, state, _ = plain
  setup = copy.copy(secure)  # the same compiled round, other dropout rates (host-side only)
  setup.secure_agg = dataclasses.replace(secure.secure_agg, dropout_before=0.25,
                                         dropout_after=0.25, threshold=1)
  seen = set()
  for r in range(1, 9):
    try:
      out = round_lib.round_step(setup, state, r)[1]
    except protocol.SecureAggregationError as error:  # everybody gone: nobody to unmask
      assert "survivors 0;" in str(error)
      continue
    stats = {k: float(v) for k, v in out.secure_agg.items()}
    sent = 3 - stats["secagg_dropped_before"]
    assert stats["secagg_survivors"] + stats["secagg_dropped_after"] == sent
    assert float(out.sums.metrics["clients"]) == sent  # only senders are aggregated
    assert stats["secagg_quantisation_error"] < 1e-2  # the senders' sum, decoded
    seen.add((stats["secagg_dropped_before"] > 0, stats["secagg_dropped_after"] > 0))
  assert {(True, False), (True, True)} & seen and {(False, True), (True, True)} & seen


def test_too_few_survivors_stops_the_run_with_its_record(tiny_fed, workdir):
  config = _config(threshold=3, dropout_after=0.9)
  config.num_rounds = 2
  summary = simulation.train(round_lib.Setup(config, tiny_fed), workdir, progress=False)
  assert summary["rounds"] == 0
  assert "secure aggregation failed in round 1" in summary["stopped_early"]
  assert "threshold t=3 not met (cohort 3" in summary["stopped_early"]
  with open(os.path.join(workdir, "summary.json")) as f:
    written = json.load(f)
  assert written["stopped_early"] == summary["stopped_early"]
  assert written["secure_agg"]["threshold"] == 3 and written["secure_agg"]["enabled"]


@pytest.mark.parametrize("change,message", [
    (dict(threshold=4), r"secure_agg.threshold=4 must be <= 3 \(the shares of a secret: the "
                        r"cohort of clients_per_round=3\)"),
    (dict(bits=40), r"secure_agg.bits=40 must be an integer in \[2, 32\]"),
    (dict(neighbours=3), r"secure_agg.neighbours=3 must be even"),
    (dict(dropout_before=1.0), r"secure_agg.dropout_before=1.0 must be in \[0, 1\)"),
    (dict(clip_norm=0.0), r"secure_agg.clip_norm=0.0 must be > 0 with dp.level='none' "
                          r"\(the encoding needs a bound"),
])
def test_invalid_secure_agg_configs_fail_before_compute(change, message):
  with pytest.raises(ValueError, match=message):
    config_lib.validate(_config(**change))


def test_client_level_dp_bounds_the_range_by_its_clip_norm():
  config = _config(clip_norm=0.0)
  config.dp.level = "client"
  config.client_sampling_rate = 0.5
  config_lib.validate(config)
  config.dp.adaptive_clip = True
  with pytest.raises(ValueError, match="dp.adaptive_clip=True"):
    config_lib.validate(config)


def test_secure_aggregation_over_patient_level_dp_sgd(tiny_fed):
  """PriMIA's combination: DP-SGD inside hospitals, secure aggregation across them. Same keys,
  so the same noised deltas: the secure sum is the plaintext one up to quantisation."""
  c = tiny_config()
  c.dp.level = "patient"
  plain_setup = round_lib.Setup(c, tiny_fed)
  state = round_lib.init_state(plain_setup)
  want = _flat(round_lib.round_step(plain_setup, state, 1)[1].sums.delta_sum)
  c.secure_agg.update(enabled=True, clip_norm=1e4, scale=2.0**12)
  secure_setup = round_lib.Setup(c, tiny_fed)
  out = round_lib.round_step(secure_setup, state, 1)[1]
  spec = secure_setup.secure_agg.spec
  bound = float(out.sums.weight_sum) * np.sqrt(spec.padded) / spec.scale
  assert 0 < np.linalg.norm(_flat(out.sums.delta_sum) - want) < bound < 0.1 * np.linalg.norm(want)
  assert float(out.secure_agg["secagg_overflows"]) == 0
