"""DP-SGD steps: clipped per unit, noised once, divided by the public expected units."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedsim import blocks, dp_sgd, round
from fedsim import client as client_lib
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def patient_setup(tiny_fed):
  config = tiny_config()
  config.dp.level = "patient"
  config.dp.delta = 1e-3
  return round.Setup(config, tiny_fed)


def client_lib_data(arrays):
  return blocks.client_data(arrays)


@pytest.mark.parametrize("method", ["vmap", "ghost"])
def test_patient_layouts_clip_the_same_patients(patient_setup, method):
  """Slots (truncated sampler), the flat layout (units adjacent, named by rank) and
  patients found by id agree, sigma = 0."""
  setup = patient_setup
  params = setup.init_params(jax.random.key(0))
  rng = np.random.default_rng(1)
  slots, per = 3, 2  # 3 patient slots of 2 images; slot 1 holds one image only
  mask = jnp.array([True, True, True, False, True, True])
  batch = client_lib.Batch(jnp.asarray(rng.normal(size=(6, 12, 12, 1)), jnp.float32),
                           jnp.asarray(rng.integers(0, 3, 6), jnp.int32),
                           jnp.array([7, 7, 2, -1, 5, 5], jnp.int32), mask,
                           jnp.array([0, 0, 1, -1, 2, 2], jnp.int32))
  hparams = {**setup.hparams, "noise_multiplier": jnp.float32(0.0),
             "clip_norm": jnp.float32(0.01), "expected_units": jnp.float32(3.0)}
  grads, metrics = [], []
  for slots_or_span in ((per, 0), (0, per), (0, 0)):
    grad_fn = dp_sgd.dp_sgd_gradient(setup.apply_fn, unit="patient", method=method,
                                     microbatch_size=0, patient_slots=slots_or_span[0],
                                     patient_span=slots_or_span[1])
    grad, stats = jax.jit(grad_fn)(params, batch, jax.random.key(0), hparams)
    assert float(stats["num_units"]) == slots and float(stats["num_clipped"]) == slots
    grads.append(grad)
    metrics.append((float(stats["loss_sum"]), float(stats["correct"])))
  for other in grads[1:]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 grads[0], other)
  # Every layout takes the metrics from the gradient's own forward pass.
  np.testing.assert_allclose(metrics[0], metrics[1], rtol=1e-5)
  np.testing.assert_allclose(metrics[0], metrics[2], rtol=1e-5)
  assert metrics[0][0] > 0


def test_example_metrics_from_the_gradient_pass_match_a_separate_forward(patient_setup):
  setup = patient_setup
  params = setup.init_params(jax.random.key(0))
  rng = np.random.default_rng(2)
  batch = client_lib.Batch(jnp.asarray(rng.normal(size=(6, 12, 12, 1)), jnp.float32),
                           jnp.asarray(rng.integers(0, 3, 6), jnp.int32),
                           jnp.arange(6, dtype=jnp.int32), jnp.arange(6) < 4)
  hparams = {**setup.hparams, "expected_units": jnp.float32(3.0)}
  stats = [jax.jit(dp_sgd.dp_sgd_gradient(
      setup.apply_fn, unit="example", method=method, microbatch_size=micro))(
          params, batch, jax.random.key(0), hparams)[1] for method, micro in
           (("vmap", 0), ("vmap", 4), ("ghost", 0))]
  for s in stats[:2]:  # vmap: from the gradient's forward pass (microbatched too)
    for key in ("loss_sum", "correct"):
      np.testing.assert_allclose(float(s[key]), float(stats[2][key]), rtol=1e-5)


def test_empty_draw_adds_noise_and_divides_by_the_expected_units(patient_setup):
  setup = patient_setup
  params = setup.init_params(jax.random.key(0))
  b = 8
  batch = client_lib.Batch(jnp.zeros((b, 12, 12, 1)), jnp.zeros(b, jnp.int32),
                           jnp.arange(b, dtype=jnp.int32), jnp.zeros(b, bool),
                           jnp.full(b, -1, jnp.int32))
  hparams = {**setup.hparams, "expected_units": jnp.float32(4.0)}
  grad, stats = jax.jit(setup.plan.grad_fn)(params, batch, jax.random.key(3), hparams)
  leaves = jax.tree.leaves(grad)
  assert all(np.all(np.isfinite(x)) for x in leaves)
  assert float(stats["num_units"]) == 0.0
  # Pure noise / expected units: std sigma * C / 4 on every coordinate.
  flat = np.concatenate([np.ravel(x) for x in leaves])
  expected_std = setup.config.dp.noise_multiplier * setup.config.dp.clip_norm / 4.0
  assert abs(flat.std() / expected_std - 1.0) < 0.05  # > 100k draws: 5% is > 10 sigma


def test_divisor_is_public_not_the_realised_count(patient_setup):
  setup = patient_setup
  params = setup.init_params(jax.random.key(0))
  rng = np.random.default_rng(0)
  b = 8
  batch = client_lib.Batch(jnp.asarray(rng.normal(size=(b, 12, 12, 1)), jnp.float32),
                           jnp.asarray(rng.integers(0, 3, b), jnp.int32),
                           jnp.arange(b, dtype=jnp.int32), jnp.arange(b) < 2,
                           jnp.where(jnp.arange(b) < 2, jnp.arange(b), -1))
  no_noise = {**setup.hparams, "noise_multiplier": jnp.float32(0.0)}
  grad_fn = jax.jit(setup.plan.grad_fn)
  g4, _ = grad_fn(params, batch, jax.random.key(0),
                             {**no_noise, "expected_units": jnp.float32(4.0)})
  g8, _ = grad_fn(params, batch, jax.random.key(0),
                             {**no_noise, "expected_units": jnp.float32(8.0)})
  jax.tree.map(lambda a, c: np.testing.assert_allclose(a, 2 * c, rtol=1e-5, atol=1e-8),
               g4, g8)


def test_noise_is_independent_across_clients_and_steps(patient_setup):
  setup = patient_setup
  fed = setup.fed
  params = setup.init_params(jax.random.key(0))
  update = jax.jit(client_lib.make_client_update(
      setup.apply_fn, setup.plan.grad_fn, schedule=setup.schedule, optimizer="sgd",
      mean=fed.mean, std=fed.std, sampler=setup.plan.sampler))
  same = jax.tree.map(lambda a: jnp.asarray(a[0]), client_lib_data(fed.train))
  empty = same._replace(count=jnp.int32(1))  # (almost) nothing to learn: mostly noise
  keys = blocks.client_keys(jax.random.key(7), np.array([0, 1]))
  d0, _ = update(params, empty, keys[0], setup.hparams)
  d1, _ = update(params, empty, keys[1], setup.hparams)
  a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(d)]) for d in (d0, d1))
  corr = np.corrcoef(a, b)[0, 1]
  assert abs(corr) < 0.05  # ~100k coordinates: |corr| of independent draws ~ 0.003
