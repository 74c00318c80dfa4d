"""Sweeps: each configuration is its own run (vmapped groups included); table, resume,
bad axes."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from experiments import membership
from fedsim import (
  checkpoint,
  privacy_plan,
  simulation,
  sweep,
  sweep_report,
  sweep_vmap,
  tensorboard,
)
from fedsim import round as round_lib
from fedsim.data import make_federated_data
from privacy import accountants
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOISES = (1.0, 2.0)


def sweep_config(**axes):
  """A tiny federation (3 hospitals of 8x8 images, 2 rounds) plus a sweep section."""
  c = tiny_config()
  c.num_clients, c.clients_per_round = 3, 2
  c.data.image_size = 8
  c.sweep = ml_collections.ConfigDict()
  c.sweep.axes = ml_collections.ConfigDict()
  for field, values in (axes or {"dp.noise_multiplier": NOISES}).items():
    node = c.sweep.axes
    *parents, leaf = field.split(".")
    for part in parents:
      if part not in node:
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    node[leaf] = values
  c.sweep.metric = "balanced_accuracy"
  c.sweep.epsilon_bands = (5.0, 20.0)
  c.sweep.selection_eta = 1.0
  c.sweep.selection_mean = 0.0
  c.sweep.execution = "sequential"
  c.sweep.group_size = 0
  return c


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  """A 2-configuration sweep trained as one vmapped group, and the second
  configuration launched alone."""
  root = tmp_path_factory.mktemp("sweep")
  workdir = os.fspath(root / "sweep")
  config = sweep_config()
  config.sweep.execution = "vmap"
  configurations = sweep.plan(config, workdir)
  rows, text = sweep.run(config, workdir, progress=False, configurations=configurations)
  alone = os.fspath(root / "alone")
  simulation.run(configurations[1].config, alone, progress=False)
  return {"config": config, "workdir": workdir, "configurations": configurations,
          "rows": rows, "text": text, "alone": alone}


def _read(path, name):
  with open(os.path.join(path, name)) as f:
    if name.endswith(".jsonl"):
      return [json.loads(line) for line in f]
    return json.load(f)


def _drop_wall(value):
  if isinstance(value, dict):
    return {k: _drop_wall(v) for k, v in value.items() if k != "wall_seconds"}
  if isinstance(value, list):
    return [_drop_wall(v) for v in value]
  return value


def test_a_configuration_of_a_vmapped_group_is_bit_identical_to_its_lone_run(swept):
  # Both configurations ran as one vmapped program (FedAvgM, patient-level DP-SGD: the
  # batched arithmetic is the lone run's on XLA:CPU, bit for bit).
  mine = sweep.run_dir(swept["workdir"], swept["configurations"][1])
  alone = swept["alone"]
  for name in ("summary.json", "metrics.jsonl", "privacy.json", "report.json"):
    assert _drop_wall(_read(mine, name)) == _drop_wall(_read(alone, name)), name
  assert _read(mine, "config.json")["config"] == _read(alone, "config.json")["config"]
  restore = lambda path: checkpoint.restore(os.path.join(path, "checkpoints"), None)["params"]
  jax.tree.map(np.testing.assert_array_equal, restore(mine), restore(alone))
  # and the two configurations did differ
  first = sweep.run_dir(swept["workdir"], swept["configurations"][0])
  assert _read(first, "summary.json")["epsilon"] > _read(mine, "summary.json")["epsilon"]


def test_table_has_every_axis_and_metric_column_and_the_outputs_exist(swept):
  workdir = swept["workdir"]
  with open(os.path.join(workdir, "results.csv")) as f:
    table = list(csv.DictReader(f))
  assert len(table) == len(NOISES) == len(_read(workdir, "results.jsonl"))
  for column in ("dp.noise_multiplier", *sweep_report.METRICS):
    assert column in table[0], column
  assert [float(r["dp.noise_multiplier"]) for r in table] == list(NOISES)
  assert _read(workdir, "results.jsonl") == swept["rows"]
  assert os.path.getsize(os.path.join(workdir, "privacy_utility.png")) > 1000
  assert "best balanced_accuracy per epsilon band" in swept["text"]
  lines = swept["text"].splitlines()
  assert len(lines) <= 25  # one screen
  best = max(swept["rows"], key=lambda r: r["balanced_accuracy"])
  assert any(line.endswith(best["run"]) for line in lines)


def test_a_runs_tensorboard_events_hold_its_metrics(swept):
  for path in (swept["alone"], sweep.run_dir(swept["workdir"], swept["configurations"][0])):
    scalars = tensorboard.read_scalars(os.path.join(path, tensorboard.FOLDER))
    rows = _read(path, "metrics.jsonl")
    for tag in ("accuracy", "loss", "epsilon", "auroc"):
      assert [s for s, _ in scalars[tag]] == [r["round"] for r in rows]
      np.testing.assert_allclose([v for _, v in scalars[tag]], [r[tag] for r in rows],
                                 rtol=1e-6)  # simple_value is a float32


def test_resume_skips_finished_configurations_and_writes_the_same_table(swept, tmp_path):
  workdir = os.fspath(tmp_path / "sweep")
  shutil.copytree(swept["workdir"], workdir)
  first, second = (sweep.run_dir(workdir, c) for c in swept["configurations"])
  os.remove(os.path.join(second, "summary.json"))  # killed before it finished
  untouched = {name: os.stat(os.path.join(first, name)).st_mtime_ns
               for name in ("summary.json", "metrics.jsonl")}
  rows, _ = sweep.run(swept["config"], workdir, progress=False)
  assert {name: os.stat(os.path.join(first, name)).st_mtime_ns for name in untouched} == untouched
  assert _drop_wall(rows) == _drop_wall(swept["rows"])
  assert _drop_wall(_read(second, "metrics.jsonl")) == _drop_wall(
      _read(swept["alone"], "metrics.jsonl"))


def test_shape_changing_axes_are_split_into_separate_programs():
  config = sweep_config(**{"dp.noise_multiplier": (1.0, 2.0), "data.image_size": (8, 12)})
  configurations = sweep.expand(config)
  assert len(configurations) == 4
  groups = sweep.groups(configurations)
  assert [[c.values["data.image_size"] for c in g] for g in groups] == [[8, 8], [12, 12]]
  assert [c.config.dp.noise_multiplier for c in groups[0]] == [1.0, 2.0]


def test_traced_fields_are_the_rounds_hyperparameters():
  base = tiny_config()
  assert len(sweep.TRACED_FIELDS) == len(round_lib.hyperparameters(base))
  for field in sweep.TRACED_FIELDS:
    changed = tiny_config()
    section, leaf = field.split(".")
    changed[section][leaf] = changed[section][leaf] + 0.25
    before, after = round_lib.hyperparameters(base), round_lib.hyperparameters(changed)
    assert [k for k in before if before[k] != after[k]], field
    assert sweep.group_key(changed) == sweep.group_key(base)


@pytest.mark.parametrize("axes, message", [
    ({"dp.noise_level": (1.0,)}, "sweep.axes.dp.noise_level=(1.0,) must be an axis over a "
     "config field; the config has no field 'dp.noise_level'"),
    ({"dp.clip_norm": ()}, "sweep.axes.dp.clip_norm=() must be a non-empty tuple of values"),
    ({"dp.clip_norm": (1.0, 1.0)}, "sweep.axes.dp.clip_norm=(1.0, 1.0) must be a tuple of "
     "distinct values"),
    ({"clients_per_round": (2, 500)}, "sweep configuration 001_clients_per_round=500: "
     "clients_per_round=500 must be <= num_clients=3"),
    ({"target_epsilon": (3.0,), "dp.noise_multiplier": (1.0,)},
     "sweep.axes.target_epsilon=(3.0,) must be absent when sweep.axes.dp.noise_multiplier "
     "is given (it sets the noise multiplier)"),
    ({"num_rounds": (1.5,)}, "sweep.axes.num_rounds=1.5 must be of the field's type"),
])
def test_bad_axes_fail_before_compute_with_one_line(tmp_path, axes, message):
  workdir = os.fspath(tmp_path / "never")
  with pytest.raises(ValueError) as error:
    sweep.plan(sweep_config(**axes), workdir)
  assert str(error.value).startswith(message) and "\n" not in str(error.value)
  assert not os.path.exists(workdir)


def test_launch_refuses_a_bad_sweep_in_one_line(tmp_path):
  workdir = os.fspath(tmp_path / "never")
  out = subprocess.run(
      [sys.executable, "launch.py", "--config=experiments/privacy_utility.py",
       "--config.sweep.axes.dp.clip_norm=()", f"--workdir={workdir}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert out.stderr.strip().splitlines()[-1] == (
      "error: sweep.axes.dp.clip_norm=() must be a non-empty tuple of values")
  assert not os.path.exists(workdir)


def test_target_epsilon_axis_calibrates_the_noise_to_the_runs_own_ledger():
  configurations = sweep.expand(sweep_config(target_epsilon=(3.0, 6.0)))
  fed = make_federated_data(configurations[0].config)
  sigmas = [c.config.dp.noise_multiplier for c in configurations]
  assert sigmas[0] > sigmas[1]
  for c, target in zip(configurations, (3.0, 6.0)):
    sigma = c.config.dp.noise_multiplier
    below = sigma * (1 - 2 * accountants.CALIBRATION_RTOL)
    assert sweep._max_epsilon(c.config, fed, below) > target  # pylint: disable=protected-access
  # the first configuration's whole run, as the ledger preview replays it, meets its target
  assert privacy_plan.ledger_preview(configurations[0].config).max_epsilon() <= 3.0


def test_a_vmapped_group_with_fedadam_and_ema_matches_lone_runs_to_float_tolerance(tmp_path):
  # The batched server step (Adam's sqrt and division, the EMA's debiasing) may differ
  # from the lone one in the last bit (docs/sweeps.md): figures agree to 1e-5.
  config = sweep_config(**{"server.learning_rate": (0.1, 0.05)})
  config.server.optimizer, config.server.ema_decay = "fedadam", 0.5
  config.sweep.execution, config.sweep.group_size = "vmap", 2
  workdir = os.fspath(tmp_path / "sweep")
  configurations = sweep.plan(config, workdir)
  sweep.run(config, workdir, progress=False, configurations=configurations)
  restore = lambda path: checkpoint.restore(os.path.join(path, "checkpoints"), None)
  for c in configurations:
    mine, alone = sweep.run_dir(workdir, c), os.fspath(tmp_path / c.name)
    simulation.run(c.config, alone, progress=False)
    assert _read(mine, "privacy.json") == _read(alone, "privacy.json")
    for a, b in zip(_drop_wall(_read(mine, "metrics.jsonl")),
                    _drop_wall(_read(alone, "metrics.jsonl")), strict=True):
      assert a.keys() == b.keys() and a["cohort_size"] == b["cohort_size"]
      np.testing.assert_allclose([a[k] for k in sorted(a) if a[k] is not None],
                                 [b[k] for k in sorted(b) if b[k] is not None], rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5),
                 restore(mine), restore(alone))


def test_execution_auto_is_sequential_on_cpu_and_vmap_on_accelerators():
  assert sweep_vmap.execution("auto", "cpu") == "sequential"
  assert sweep_vmap.execution("auto", "gpu") == sweep_vmap.execution("auto", "tpu") == "vmap"
  assert sweep_vmap.execution("vmap", "cpu") == "vmap"


def test_a_sweep_over_an_attack_study_is_refused_in_one_line(tmp_path):
  config = membership.get_config()
  config.sweep = sweep_config().sweep
  with pytest.raises(ValueError) as error:
    sweep.plan(config, os.fspath(tmp_path / "never"))
  assert str(error.value) == (
      "sweep configuration 000_dp.noise_multiplier=1.0: attack.kind='membership' must be "
      "'none' in a sweep (an attack study runs alone: launch it once per setting)")


def test_target_epsilon_calibration_accounts_for_audit_canaries():
  # Canaries join as one-image patients: other sampling rates, so another ledger.
  config = sweep_config(target_epsilon=(4.0,))
  config.audit.enabled, config.audit.num_canaries, config.audit.num_hospitals = True, 8, 2
  (c,) = sweep.expand(config)
  fed = sweep.run_federation(c.config)
  assert fed.train.counts.sum() > make_federated_data(c.config).train.counts.sum()
  sigma = c.config.dp.noise_multiplier
  assert sweep._max_epsilon(c.config, fed, sigma) <= 4.0  # pylint: disable=protected-access
  assert sweep._max_epsilon(  # pylint: disable=protected-access
      c.config, fed, sigma * (1 - 2 * accountants.CALIBRATION_RTOL)) > 4.0


@pytest.mark.parametrize("field, value, message", [
    ("execution", "fast", "sweep.execution='fast' must be one of ['auto', 'vmap', 'sequential']"),
    ("group_size", -1, "sweep.group_size=-1 must be an int >= 0: configurations vmapped at "
     "once (0: a whole group)"),
])
def test_bad_execution_options_fail_in_one_line(tmp_path, field, value, message):
  config = sweep_config()
  config.sweep[field] = value
  with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
    sweep.plan(config, os.fspath(tmp_path / "never"))
