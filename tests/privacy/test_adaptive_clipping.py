"""Adaptive clipping (Andrew et al. 2021): noise split, quantile tracking, wiring."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedsim import config as config_lib
from fedsim import keys, privacy_plan, sampling, simulation
from fedsim import round as round_lib
from privacy import adaptive_clipping, clipping
from tests.conftest import tiny_config


def client_config(adaptive=True, **dp):
  c = tiny_config()
  c.dp.level = "client"
  c.dp.delta = 1e-3
  c.client_sampling_rate = 0.5
  c.dp.adaptive_clip = adaptive
  c.dp.clipped_count_stddev = 2.0  # E = 3: the default E / 20 is < z / 2 here
  for k, v in dp.items():
    c.dp[k] = v
  return c


def update(clip_norm, unclipped, cohort, key=0, **kw):
  kw = {"target_quantile": 0.5, "learning_rate": 0.2, "count_stddev": 0.0,
        "expected_cohort": float(cohort), **kw}
  return float(adaptive_clipping.update_clip_norm(
      clip_norm, unclipped, cohort, jax.random.key(key), **kw))


def test_delta_noise_multiplier_keeps_the_total_at_z():
  z, sb = 1.2, 2.0
  z_delta = adaptive_clipping.delta_noise_multiplier(z, sb)
  assert z_delta == pytest.approx((z ** -2 - (2 * sb) ** -2) ** -0.5, rel=1e-12)
  assert z_delta > z  # the count takes part of the budget: more noise on the delta
  assert adaptive_clipping.total_noise_multiplier(z_delta, sb) == pytest.approx(z, rel=1e-12)
  assert adaptive_clipping.delta_noise_multiplier(0.0, 1.0) == 0.0


@pytest.mark.parametrize("z, sb", [(1.0, 0.5), (1.0, 0.25), (1.0, 0.0)])
def test_count_noise_that_spends_the_whole_budget_is_refused(z, sb):
  with pytest.raises(ValueError, match="count_stddev"):
    adaptive_clipping.delta_noise_multiplier(z, sb)


def test_update_moves_the_clip_norm_toward_the_quantile():
  # 1 of 10 unclipped: b_bar = (1 - 5) / 10 + 1/2 = 0.1 < 0.5, S grows by exp(0.08).
  assert update(1.0, 1, 10) == pytest.approx(math.exp(0.2 * 0.4), rel=1e-6)
  # 9 of 10 unclipped: S shrinks by exp(-0.08).
  assert update(1.0, 9, 10) == pytest.approx(math.exp(-0.2 * 0.4), rel=1e-6)
  assert update(2.0, 5, 10) == pytest.approx(2.0, rel=1e-6)  # at the quantile
  # Noise enters through the count only, and the fraction is clamped to [0, 1].
  assert update(1.0, 0, 10, count_stddev=1e6) in (
      pytest.approx(math.exp(0.1), rel=1e-6), pytest.approx(math.exp(-0.1), rel=1e-6))
  assert update(1.0, 5, 10, learning_rate=0.0, count_stddev=3.0) == 1.0


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.8])
def test_clip_norm_converges_to_the_target_quantile(quantile):
  norms = jnp.asarray(np.random.default_rng(0).lognormal(0.0, 1.0, 400), jnp.float32)
  n = norms.shape[0]

  def round_(clip_norm, key):
    unclipped = jnp.sum(norms <= clip_norm)
    new = adaptive_clipping.update_clip_norm(
        clip_norm, unclipped, n, key, target_quantile=quantile, learning_rate=0.2,
        count_stddev=2.0, expected_cohort=float(n))
    return new, new

  keys = jax.random.split(jax.random.key(1), 600)
  _, path = jax.jit(lambda k: jax.lax.scan(round_, jnp.float32(0.05), k))(keys)
  final = np.asarray(path[-100:])
  fractions = [np.mean(np.asarray(norms) <= s) for s in final]
  assert abs(np.mean(fractions) - quantile) < 0.03
  assert np.mean(final) == pytest.approx(np.quantile(np.asarray(norms), quantile), rel=0.15)


def test_clients_report_unclipped_in_graph():
  delta = {"w": jnp.array([3.0, 4.0])}  # norm 5
  _, at = privacy_plan.clip_delta(delta, {"clip_norm": jnp.float32(5.0)})
  _, below = privacy_plan.clip_delta(delta, {"clip_norm": jnp.float32(4.9)})
  assert (float(at["delta_unclipped"]), float(at["delta_clipped"])) == (1.0, 0.0)
  assert (float(below["delta_unclipped"]), float(below["delta_clipped"])) == (0.0, 1.0)


@pytest.mark.parametrize("field, value, message", [
    ("target_quantile", 0.0, "dp.target_quantile=0.0 must be in (0, 1)"),
    ("target_quantile", 1.0, "dp.target_quantile=1.0 must be in (0, 1)"),
    ("clip_learning_rate", -0.1, "dp.clip_learning_rate=-0.1 must be >= 0"),
    ("clipped_count_stddev", -1.0, "dp.clipped_count_stddev=-1.0 must be >= 0"),
    ("clipped_count_stddev", 0.0, "dp.clipped_count_stddev=0.0 (sigma_b=0.15) must be > "
     "dp.noise_multiplier / 2"),
    ("clipped_count_stddev", 0.6, "dp.clipped_count_stddev=0.6 (sigma_b=0.6) must be >"),
])
def test_invalid_adaptive_field_is_named(field, value, message):
  config = client_config(**{field: value})
  with pytest.raises(ValueError) as error:
    config_lib.validate(config)
  assert message in str(error.value)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("level", ["none", "example", "patient"])
def test_adaptive_clip_needs_client_level(level):
  config = client_config()
  config.dp.level = level
  with pytest.raises(ValueError, match=r"dp.adaptive_clip=True must be False with "
                                       f"dp.level='{level}'"):
    config_lib.validate(config)


def test_setup_refuses_what_validate_refuses(tiny_fed):
  config = client_config(clipped_count_stddev=0.0)  # E / 20 = 0.15 <= z / 2 = 0.6
  with pytest.raises(ValueError, match="dp.clipped_count_stddev"):
    round_lib.Setup(config, tiny_fed)


def test_eta_zero_clips_like_the_fixed_run_and_only_rescales_the_noise(tiny_fed):
  fixed = round_lib.Setup(client_config(adaptive=False), tiny_fed)
  adaptive = round_lib.Setup(client_config(clip_learning_rate=0.0), tiny_fed)
  assert fixed.plan.update_clip_norm is None
  params = fixed.init_params(jax.random.key(0))
  cohort = sampling.cohort_for_round(fixed.config, 1)
  run = lambda s: round_lib.client_updates(s, params, cohort, jax.random.key(2), s.hparams)
  a, f = run(adaptive), run(fixed)
  assert float(a.metrics["delta_clipped"]) == float(f.metrics["delta_clipped"])
  assert float(a.metrics["delta_clipped"] + a.metrics["delta_unclipped"]) == len(cohort)
  jax.tree.map(np.testing.assert_array_equal, a.delta_sum, f.delta_sum)
  new = adaptive.plan.update_clip_norm(a, jax.random.key(3), adaptive.hparams)
  assert float(new) == float(adaptive.hparams["clip_norm"])
  # Same key: the delta noise is the fixed run's times z_delta / z.
  expected = fixed.config.client_sampling_rate * fixed.config.num_clients
  clean = jax.tree.map(lambda d: d / expected, f.delta_sum)
  noise = lambda s, r: np.concatenate([np.ravel(x - c) for x, c in zip(
      jax.tree.leaves(s.plan.privatize(r, jax.random.key(4), s.hparams)[0]),
      jax.tree.leaves(clean))])
  z = fixed.config.dp.noise_multiplier
  ratio = adaptive_clipping.delta_noise_multiplier(z, 2.0) / z
  np.testing.assert_allclose(noise(adaptive, a), ratio * noise(fixed, f), rtol=1e-3,
                             atol=1e-6)


def rows(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_adaptive_run_records_clip_norm_and_keeps_the_ledger(tmp_path, tiny_fed):
  num_rounds = 3
  fixed_config = client_config(adaptive=False)
  adaptive_config = client_config(clip_learning_rate=0.5)
  for c in (fixed_config, adaptive_config):
    c.num_rounds = num_rounds
  fixed = simulation.train(round_lib.Setup(fixed_config, tiny_fed),
                           os.fspath(tmp_path / "fixed"), progress=False)
  setup = round_lib.Setup(adaptive_config, tiny_fed)
  summary = simulation.train(setup, os.fspath(tmp_path / "a"), progress=False)
  again = simulation.train(setup, os.fspath(tmp_path / "b"), progress=False)

  # Accounting unchanged: the joint release is a Gaussian with the configured z.
  assert summary["epsilon"] == pytest.approx(fixed["epsilon"], rel=1e-12)
  privacy = [json.load(open(os.path.join(tmp_path, d, "privacy.json"))) for d in ("fixed", "a")]
  assert privacy[0] == privacy[1]
  # S is recorded every round; it starts at dp.clip_norm and then moves.
  norms = [r["clip_norm"] for r in rows(tmp_path / "a")]
  assert len(norms) == num_rounds and norms[0] == pytest.approx(adaptive_config.dp.clip_norm)
  assert all(b != a for a, b in zip(norms, norms[1:]))
  assert all(r["clip_norm"] == pytest.approx(1.0) for r in rows(tmp_path / "fixed"))
  # Reproducible from config and seed; the Setup's hparams are not mutated.
  assert norms == [r["clip_norm"] for r in rows(tmp_path / "b")]
  assert summary["accuracy"] == again["accuracy"]
  assert float(setup.hparams["clip_norm"]) == adaptive_config.dp.clip_norm
  # A new clip norm each round is a new traced value, not a new program.
  assert setup.block_fn.compiled._cache_size() == 1


def test_round_hands_the_count_and_the_delta_noise_different_keys(tiny_fed):
  """Round r draws the delta noise from `round_keys(seed, r).delta_noise` and the clip-norm
  update's count noise from `.count_noise`: two different keys (recorded as the round runs)."""
  setup = round_lib.Setup(client_config(), tiny_fed)
  seen = {"delta": [], "count": []}
  privatize, update_clip_norm = setup.privatize, setup.update_clip_norm

  def recording_privatize(sums, key, hparams):
    seen["delta"].append(jax.random.key_data(key))
    return privatize(sums, key, hparams)

  def recording_update(sums, key, hparams):
    seen["count"].append(jax.random.key_data(key))
    return update_clip_norm(sums, key, hparams)

  setup.privatize, setup.update_clip_norm = recording_privatize, recording_update
  state = round_lib.init_state(setup)
  for r in (1, 2):
    state, _ = round_lib.round_step(setup, state, r)
  for r, delta, count in zip((1, 2), seen["delta"], seen["count"], strict=True):
    expected = keys.round_keys(setup.config.seed, r)
    np.testing.assert_array_equal(delta, jax.random.key_data(expected.delta_noise))
    np.testing.assert_array_equal(count, jax.random.key_data(expected.count_noise))
    assert not np.array_equal(delta, count)


def test_count_noise_is_independent_of_the_delta_noise():
  """Over many rounds the clip-norm update's noise and the delta noise are uncorrelated.

  The draws are the ones the round makes: `adaptive_clipping.update_clip_norm` on round r's
  `count_noise` key and `clipping.privatize` on its `delta_noise` key (the wiring is checked
  above). With n = 4000 rounds, each of the 8 sample correlations between the count noise and
  one coordinate of the delta noise is about N(0, 1/n) when they are independent, so
  |r| < 5 / sqrt(n) fails by chance with probability < 8 * 5.8e-7 < 5e-6.
  """
  n, width = 4000, 8
  round_keys = jax.vmap(lambda r: keys.round_keys(0, r))(jnp.arange(1, n + 1))
  count_keys, delta_keys = round_keys.count_noise, round_keys.delta_noise
  assert not np.any(np.all(
      jax.random.key_data(count_keys) == jax.random.key_data(delta_keys), axis=-1))

  def count_noise(key):  # centered count 0: S' = exp(-(b_bar - 1/2)), b_bar - 1/2 = noise / E
    new = adaptive_clipping.update_clip_norm(
        1.0, 5, 10, key, target_quantile=0.5, learning_rate=1.0, count_stddev=1.0,
        expected_cohort=100.0)
    return -jnp.log(new) * 100.0

  def delta_noise(key):  # privatize of a zero sum: the noise alone, std 1
    return clipping.privatize({"w": jnp.zeros(width)}, key, clip_norm=1.0,
                              noise_multiplier=1.0, expected_batch_size=1.0)["w"]

  counts = np.asarray(jax.vmap(count_noise)(count_keys), np.float64)
  deltas = np.asarray(jax.vmap(delta_noise)(delta_keys), np.float64)
  # Both are the unit-variance draws (std of a std estimate: 1 / sqrt(2n) = 0.011).
  assert abs(counts.std() - 1) < 0.06 and np.all(np.abs(deltas.std(axis=0) - 1) < 0.06)
  z = lambda x: (x - x.mean(axis=0)) / x.std(axis=0)
  correlations = (z(counts)[:, None] * z(deltas)).mean(axis=0)
  assert np.all(np.abs(correlations) < 5 / np.sqrt(n)), correlations
