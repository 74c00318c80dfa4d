"""Secure aggregation inside the compiled round: matches plaintext, survives dropouts, stops."""

import copy
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import dp_event as dpe
from dp_accounting import rdp
from jax import flatten_util

from fedsim import aggregation, blocks, privacy_plan, sampling, simulation
from fedsim import config as config_lib
from fedsim import round as round_lib
from fedsim.client import ClientData
from privacy import accountants
from privacy.secure_agg import protocol
from tests.conftest import tiny_config


def _config(level="none", **secure_agg):
  c = tiny_config()
  c.dp.level = level
  c.client.learning_rate = 0.1
  c.secure_agg.update(dict(enabled=True, clip_norm=1e4, scale=2.0**12), **secure_agg)
  return c


@pytest.fixture(scope="module")
def plain(tiny_fed):
  """The plaintext round of patient-level DP-SGD; its config's other secure_agg fields are
  not read while disabled."""
  c = tiny_config()
  c.dp.level = "patient"
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
  """The same round under secure aggregation with 32 bits (PriMIA's combination: DP-SGD
  inside the hospitals, secure aggregation across them)."""
  return round_lib.Setup(_config("patient"), tiny_fed)


def _flat(tree):
  return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def test_secure_run_matches_the_plaintext_run_to_quantisation_error(plain, secure):
  """Same keys, so the same DP-SGD-noised deltas: the secure sum is the plaintext one up to
  quantisation, and so are the models after one and two rounds."""
  plain_setup, state, expected = plain
  new_state, out = round_lib.round_step(secure, state, 1)
  got, want = _flat(out.sums.delta_sum), _flat(expected.sums.delta_sum)
  # 3 hospitals, weights <= counts: each rotated coordinate moves < weight / scale.
  weights = float(expected.sums.weight_sum)
  bound = weights * np.sqrt(secure.secure_agg.spec.padded) / secure.secure_agg.spec.scale
  err = np.linalg.norm(got - want)
  assert 0 < err < bound < 0.1 * np.linalg.norm(want)
  assert float(out.sums.weight_sum) == weights
  stats = {k: float(v) for k, v in out.secure_agg.items()}
  assert stats["secagg_overflows"] == 0 and stats["secagg_survivors"] == 3
  np.testing.assert_allclose(stats["secagg_quantisation_error"],
                             err / np.linalg.norm(want), rtol=1e-3)
  assert int(new_state.round) == 1
  # The server's first step is linear in the mean delta (fedavgm, lr 1, no momentum yet):
  # the models differ by the decoded sum's error over the weights.
  model_err = np.linalg.norm(_flat(out.model) - _flat(expected.model))
  np.testing.assert_allclose(model_err, err / weights, rtol=1e-2)
  # A second round from each side's model: the models differ by round 1's error carried by
  # the momentum, (1 + 0.9) model_err, plus round 2's own rounding (and a little drift,
  # since the gradients were taken at slightly different models).
  plain_state = round_lib.round_step(plain_setup, state, 1)[0]
  plain2, secure2 = (round_lib.round_step(setup, s, 2)[1]
                     for setup, s in ((plain_setup, plain_state), (secure, new_state)))
  err2 = float(secure2.secure_agg["secagg_quantisation_error"]) * np.linalg.norm(
      _flat(secure2.sums.delta_sum)) / float(secure2.sums.weight_sum)
  diff2 = np.linalg.norm(_flat(secure2.model) - _flat(plain2.model))
  assert 0 < diff2 < 1.1 * (1.9 * model_err + err2)


def _toy_secure_agg(block, neighbours=0):
  """Secure aggregation of a 5-coordinate update `{"a": [4], "b": []}` over cohorts <= 6."""
  template = {"a": jnp.zeros(4), "b": jnp.zeros(())}
  spec = protocol.Spec(bits=24, scale=2.0**10, clip_norm=1e6, rotate=True, size=5)
  return aggregation.SecureAggregation(
      spec, flatten_util.ravel_pytree(template)[1], seed=0, block=block, cohort_bound=6,
      neighbours=neighbours, threshold=3, dropout_before=0.2, dropout_after=0.2,
      noise_multiplier=0.0)


_TRACES = []


def _toy_update(params, data, key, hparams):
  del params, key, hparams
  _TRACES.append(None)  # once per compilation of a block program
  return {"a": data.images, "b": data.labels}, {}


def _toy_round(secure, block_fn, round_index):
  """The block program over blocks of `secure.block` slots; the server's decoded sum."""
  cohort = np.array([0, 2, 3, 5, 7, 8])
  rng = np.random.default_rng(1)
  images, labels = rng.normal(size=(10, 4)).astype(np.float32), rng.normal(size=10)
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
  """One block of 8 vmapped vs two blocks scanned in two chunks each, over two rounds with
  other dropouts and masks (and no recompilation)."""
  setups = []
  for block, chunk in ((8, 8), (4, 2)):
    secure = _toy_secure_agg(block)
    setups.append((secure, blocks.make_block_fn(_toy_update, weighting="uniform", chunk=chunk,
                                                aggregate=secure.aggregate)))
  traces = []
  # Round 8 of seed 0: 2 of 6 drop before sending; round 5: 1 before and 1 after.
  for r, before, after in ((8, 2, 0), (5, 1, 1)):
    traces.append(len(_TRACES))
    (one, (sums, stats), (a, b)), (split, _, _) = [_toy_round(*s, r) for s in setups]
    np.testing.assert_array_equal(one.delta_sum.masked, split.delta_sum.masked)
    assert (stats["secagg_dropped_before"], stats["secagg_dropped_after"]) == (before, after)
    # Each of <= 6 senders moves each of 8 rotated coordinates by < 1/scale.
    err = np.linalg.norm(np.append(sums.delta_sum["a"] - a, sums.delta_sum["b"] - b))
    assert 0 < err < 6 * np.sqrt(8) / 2.0**10
    np.testing.assert_allclose(stats["secagg_quantisation_error"],
                               err / np.linalg.norm(np.append(a, b)), rtol=1e-3)
    assert int(stats["secagg_overflows"]) == 0
  assert traces[0] < traces[1] == len(_TRACES)  # round 5 compiled nothing new


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


def test_the_ledger_charges_the_distributed_noise_that_survived(tiny_fed, workdir):
  """Client-level DP with Skellam shares and dropouts: each round is charged the noise its
  senders carried (metrics' secagg_noise_multiplier), composed as dp_accounting would."""
  config = _config(clip_norm=0.0, scale=0.0, bits=32, threshold=2, dropout_before=0.3,
                   distributed_noise="skellam")
  config.dp.level, config.dp.noise_multiplier = "client", 1.0
  config.client_sampling_rate, config.num_rounds = 0.5, 3
  summary = simulation.train(round_lib.Setup(config, tiny_fed), workdir, progress=False)
  assert summary["rounds"] == 3 and summary["stopped_early"] is None
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  z = [row["secagg_noise_multiplier"] for row in rows]
  assert sum(row["secagg_dropped_before"] for row in rows) > 0 and max(z) > 1.0
  for r, row in enumerate(rows, 1):  # the live round's senders, replayed from the config
    senders = row["secagg_survivors"] + row["secagg_dropped_after"]
    assert z[r - 1] == protocol.surviving_noise_multiplier(1.0, senders=senders, threshold=2)
    assert aggregation.charged_noise_multiplier(config, r) == z[r - 1]
  by_hand = dpe.ComposedDpEvent([
      dpe.PoissonSampledDpEvent(0.5, dpe.GaussianDpEvent(zr)) for zr in z])
  want = rdp.RdpAccountant(accountants.RDP_ORDERS).compose(by_hand).get_epsilon(1e-5)
  assert summary["epsilon"] == pytest.approx(want, rel=1e-9)
  configured = rdp.RdpAccountant(accountants.RDP_ORDERS).compose(
      dpe.SelfComposedDpEvent(dpe.PoissonSampledDpEvent(0.5, dpe.GaussianDpEvent(1.0)), 3))
  assert want < configured.get_epsilon(1e-5)
  # A resumed run, `compute_epsilon --config` and sweeps replay the same charges.
  assert privacy_plan.ledger_preview(config).max_epsilon() == summary["epsilon"]
