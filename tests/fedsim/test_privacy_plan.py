"""DP inside the engine: the sampling that runs is the sampling that is accounted."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedsim import client as client_lib
from fedsim import privacy_plan, simulation
from fedsim.data.base import ClientArrays
from privacy import accounting
from tests.conftest import tiny_config


def dp_config(level="patient", **dp):
  c = tiny_config()
  c.dp.level = level
  c.dp.delta = 1e-3
  if level == "client":
    c.client_sampling_rate = 0.5
  for k, v in dp.items():
    c.dp[k] = v
  return c


@pytest.fixture(scope="module")
def patient_setup(tiny_fed):
  return simulation.Setup(dp_config("patient"), tiny_fed)


def test_ledger_events_match_the_sampler_that_runs(patient_setup):
  setup = patient_setup
  fed = setup.fed
  rates, steps, _ = privacy_plan.local_sampling(setup.config, fed)
  # The rate the client computes in-graph, and the steps it actually takes.
  in_graph = np.asarray(client_lib.poisson_rate(jnp.asarray(fed.train.counts),
                                                setup.config.client.batch_size))
  np.testing.assert_allclose(in_graph, rates, rtol=1e-6)
  data = jax.tree.map(jnp.asarray, client_lib_data(fed.train))
  update = jax.jit(client_lib.make_client_update(
      setup.apply_fn, setup.plan.grad_fn, schedule=setup.schedule,
      optimizer="sgd", mean=fed.mean, std=fed.std, sampler=setup.plan.sampler))
  params = setup.init_params(jax.random.key(0))
  for k in range(fed.num_clients):
    _, metrics = update(params, jax.tree.map(lambda a: a[k], data), jax.random.key(k),
                        setup.hparams)
    assert int(metrics["steps"]) == steps[k]
  # After one round with everyone, hospital k is charged exactly its steps at its rate.
  ledger = privacy_plan.make_plan(setup.config, fed, setup.apply_fn).ledger
  ledger.record_round(np.ones(fed.num_clients, bool))
  for k, event in enumerate(ledger.hospital_events()):
    expected = accounting.local_dp_sgd_event(
        sampling_rate=float(rates[k]), noise_multiplier=setup.config.dp.noise_multiplier,
        steps=int(steps[k]))
    assert event == accounting.hospital_event(expected, 1)
    assert event.event.event.sampling_probability == pytest.approx(in_graph[k])


def client_lib_data(arrays: ClientArrays):
  return client_lib.ClientData(arrays.images, arrays.labels, arrays.patients,
                               arrays.counts, arrays.num_patients)


def test_truncated_patient_draw_keeps_whole_patients_and_flags_truncation():
  images = np.array([1, 3, 2, 4, 1, 2, 3, 1, 4, 2, 1, 1])  # per patient
  patients = np.repeat(np.arange(len(images)), images)
  n = len(patients) + 5  # padded slots
  data = client_lib.ClientData(
      images=jnp.zeros((n, 1, 1, 1), jnp.uint8), labels=jnp.zeros(n, jnp.int32),
      patients=jnp.asarray(np.pad(patients, (0, 5), constant_values=-1), jnp.int32),
      count=jnp.int32(len(patients)), num_patients=jnp.int32(len(images)))
  real = jnp.arange(n) < len(patients)
  exact = client_lib.PoissonSampler("patient")
  capped = client_lib.PoissonSampler("patient", max_units=3, unit_images=4)
  seen_truncated = seen_whole = 0
  for i in range(100):
    key, rate = jax.random.key(i), jnp.float32(0.4)
    _, all_sel, _ = exact.draw(key, data, real, rate)
    index, mask, truncated = capped.draw(key, data, real, rate)
    assert index.shape == (12,)  # 3 patients x at most 4 images
    sampled = set(patients[np.asarray(all_sel)[:len(patients)]])
    kept_images = np.asarray(index)[np.asarray(mask)]
    kept = set(patients[kept_images])
    assert len(kept_images) == len(set(kept_images.tolist()))  # no image twice
    assert kept <= sampled and len(kept) == min(3, len(sampled))
    for p in kept:  # whole patients only
      assert set(np.flatnonzero(patients == p)) <= set(kept_images.tolist())
    assert bool(truncated) == (len(sampled) > 3)
    seen_truncated += bool(truncated)
    seen_whole += not bool(truncated)
  assert seen_truncated and seen_whole  # both branches exercised


def test_patient_slots_clip_the_same_patients_as_ids(patient_setup):
  """The slotted layout (truncated sampler) and the id-grouped one agree, sigma = 0."""
  setup = patient_setup
  params = setup.init_params(jax.random.key(0))
  rng = np.random.default_rng(1)
  slots, per = 3, 2  # 3 patient slots of 2 images; slot 1 holds one image only
  mask = jnp.array([True, True, True, False, True, True])
  batch = client_lib.Batch(jnp.asarray(rng.normal(size=(6, 12, 12, 1)), jnp.float32),
                           jnp.asarray(rng.integers(0, 3, 6), jnp.int32),
                           jnp.array([7, 7, 2, -1, 5, 5], jnp.int32), mask)
  hparams = {**setup.hparams, "noise_multiplier": jnp.float32(0.0),
             "clip_norm": jnp.float32(0.01), "expected_units": jnp.float32(3.0)}
  grads, metrics = [], []
  for patient_slots in (per, 0):
    grad_fn = privacy_plan.dp_sgd_gradient(setup.apply_fn, unit="patient", method="vmap",
                                           microbatch_size=0, patient_slots=patient_slots)
    grad, stats = jax.jit(grad_fn)(params, batch, jax.random.key(0), hparams)
    assert float(stats["num_units"]) == slots and float(stats["num_clipped"]) == slots
    grads.append(grad)
    metrics.append((float(stats["loss_sum"]), float(stats["correct"])))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), *grads)
  # Slots take the metrics from the gradient's forward pass; ids run a separate one.
  np.testing.assert_allclose(metrics[0], metrics[1], rtol=1e-5)
  assert metrics[0][0] > 0


def test_example_metrics_from_the_gradient_pass_match_a_separate_forward(patient_setup):
  setup = patient_setup
  params = setup.init_params(jax.random.key(0))
  rng = np.random.default_rng(2)
  batch = client_lib.Batch(jnp.asarray(rng.normal(size=(6, 12, 12, 1)), jnp.float32),
                           jnp.asarray(rng.integers(0, 3, 6), jnp.int32),
                           jnp.arange(6, dtype=jnp.int32), jnp.arange(6) < 4)
  hparams = {**setup.hparams, "expected_units": jnp.float32(3.0)}
  stats = [jax.jit(privacy_plan.dp_sgd_gradient(
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
                           jnp.arange(b, dtype=jnp.int32), jnp.zeros(b, bool))
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
                           jnp.arange(b, dtype=jnp.int32), jnp.arange(b) < 2)
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
  from fedsim import rounds
  keys = rounds.client_keys(jax.random.key(7), np.array([0, 1]))
  d0, _ = update(params, empty, keys[0], setup.hparams)
  d1, _ = update(params, empty, keys[1], setup.hparams)
  a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(d)]) for d in (d0, d1))
  corr = np.corrcoef(a, b)[0, 1]
  assert abs(corr) < 0.05  # ~100k coordinates: |corr| of independent draws ~ 0.003


@pytest.mark.parametrize("level", ["example", "patient", "client"])
def test_dp_run_writes_privacy_record(tmp_path, level):
  workdir = os.fspath(tmp_path / level)
  summary = simulation.run(dp_config(level), workdir, progress=False)
  record = json.load(open(os.path.join(workdir, "privacy.json")))
  assert summary["epsilon"] == pytest.approx(record["max_epsilon"])
  assert summary["epsilon"] > 0 and summary["privacy_unit"] == record["unit"]
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert rows[-1]["epsilon"] == pytest.approx(summary["epsilon"])
  assert [r["epsilon"] for r in rows] == sorted(r["epsilon"] for r in rows)


def test_target_epsilon_stops_before_exceeding(tmp_path):
  config = dp_config("client")
  config.num_rounds = 6
  full = privacy_plan.ledger_preview(config)
  config.dp.target_epsilon = full.max_epsilon() * 0.6
  workdir = os.fspath(tmp_path / "stop")
  summary = simulation.run(config, workdir, progress=False)
  assert summary["stopped_early"] and summary["rounds"] < 6
  assert summary["epsilon"] <= config.dp.target_epsilon
  assert os.path.exists(os.path.join(workdir, "summary.json"))


def test_batch_norm_model_is_refused_for_dp():
  class BN(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.BatchNorm(use_running_average=True)(nn.Dense(3)(x))
  variables = jax.eval_shape(BN().init, jax.random.key(0), jnp.zeros((1, 4)))
  with pytest.raises(ValueError, match="BatchNorm"):
    privacy_plan.check_model(variables, "patient")
  privacy_plan.check_model(variables, "none")


def test_client_level_requires_poisson_cohorts(tiny_fed):
  config = dp_config("client")
  config.client_sampling_rate = 0.0
  with pytest.raises(ValueError, match="client_sampling_rate"):
    simulation.Setup(config, tiny_fed)


def test_delta_must_be_below_one_over_units(tiny_fed):
  config = dp_config("example", delta=0.2)
  with pytest.raises(ValueError, match="dp.delta"):
    simulation.Setup(config, tiny_fed)
