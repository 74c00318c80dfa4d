"""The privacy plan: the sampling that runs is the sampling that is accounted."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedsim import blocks, privacy_plan, round, simulation
from fedsim import client as client_lib
from privacy import events
from privacy.sampling import poisson_rate
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
  return round.Setup(dp_config("patient"), tiny_fed)


def test_ledger_events_match_the_sampler_that_runs(patient_setup):
  setup = patient_setup
  fed = setup.fed
  rates, steps, _ = privacy_plan.local_sampling(setup.config, fed)
  # The rate the client computes in-graph, and the steps it actually takes.
  in_graph = np.asarray(poisson_rate(jnp.asarray(fed.train.counts),
                                     setup.config.client.batch_size))
  np.testing.assert_allclose(in_graph, rates, rtol=1e-6)
  data = jax.tree.map(jnp.asarray, blocks.client_data(fed.train))
  update = jax.jit(client_lib.make_client_update(
      setup.apply_fn, setup.plan.grad_fn, schedule=setup.schedule,
      optimizer="sgd", mean=fed.mean, std=fed.std, sampler=setup.plan.sampler))
  params = setup.init_params(jax.random.key(0))
  for k in range(fed.num_clients):
    _, metrics = update(params, jax.tree.map(lambda a: a[k], data), jax.random.key(k),
                        setup.hparams)
    assert int(metrics["steps"]) == steps[k]
  # After one round with everyone, hospital k is charged exactly its steps at its rate.
  ledger = setup.plan.new_ledger()
  ledger.record_round(np.ones(fed.num_clients, bool))
  for k, event in enumerate(ledger.hospital_events()):
    expected = events.local_dp_sgd_event(
        sampling_rate=float(rates[k]), noise_multiplier=setup.config.dp.noise_multiplier,
        steps=int(steps[k]))
    assert event == events.hospital_event(expected, 1)
    assert event.event.event.sampling_probability == pytest.approx(in_graph[k])


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
    round.Setup(config, tiny_fed)


def test_delta_must_be_below_one_over_units(tiny_fed):
  config = dp_config("example", delta=0.2)
  with pytest.raises(ValueError, match="dp.delta"):
    round.Setup(config, tiny_fed)


def test_one_setup_serves_several_runs_with_fresh_ledgers(tmp_path, tiny_fed):
  """The plan is immutable: a second run of the same Setup is charged from zero."""
  setup = round.Setup(dp_config("example"), tiny_fed)
  first = simulation.train(setup, os.fspath(tmp_path / "a"), progress=False)
  second = simulation.train(setup, os.fspath(tmp_path / "b"), progress=False)
  assert first["epsilon"] == second["epsilon"] > 0
  assert first["accuracy"] == second["accuracy"]
  assert setup.plan.new_ledger().rounds_recorded == 0


def test_clipping_path_changes_neither_the_event_nor_the_update(tiny_fed):
  """dp.clipping is an optimisation: same DpEvents, same client update (float tolerance).

  With a truncated gather the patient level runs in slots (`unit_size`) with vmap
  clipping and, on the CPU, in the flat layout with ghost clipping (the default's paths;
  examples: tests/privacy/test_clipping.py): the layouts differ, the sampling does not.
  """
  level, gather = "patient", 3
  setups = {clip: round.Setup(dp_config(level, clipping=clip, max_batch_size=gather,
                                        accountant="pld"),
                              tiny_fed) for clip in ("vmap", "ghost")}
  ledgers = {clip: s.plan.new_ledger() for clip, s in setups.items()}
  for ledger in ledgers.values():
    ledger.record_round(np.ones(tiny_fed.num_clients, bool))
  assert ledgers["vmap"].hospital_events() == ledgers["ghost"].hospital_events()
  same_sampling = lambda sampler: dataclasses.replace(sampler, gather=0)
  assert same_sampling(setups["ghost"].plan.sampler) == same_sampling(setups["vmap"].plan.sampler)
  assert setups["ghost"].plan.sampler.max_units == gather
  data = jax.tree.map(lambda a: jnp.asarray(a[0]), blocks.client_data(tiny_fed.train))
  params = setups["vmap"].init_params(jax.random.key(0))
  out = {clip: jax.jit(s.client_update)(params, data, jax.random.key(1), s.hparams)
         for clip, s in setups.items()}
  for a, b in zip(jax.tree.leaves(out["vmap"][0]), jax.tree.leaves(out["ghost"][0])):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  assert np.abs(jax.tree.leaves(out["vmap"][0])[0]).max() > 0
  for k in ("loss_sum", "correct", "num_units", "num_clipped"):
    np.testing.assert_allclose(out["vmap"][1][k], out["ghost"][1][k], rtol=1e-4)
