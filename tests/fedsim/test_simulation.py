"""End-to-end runs: launch.py writes the record; a seed reproduces the run bit for bit."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from fedsim import checkpoint, simulation
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def final_params(workdir):
  state = checkpoint.restore(os.path.join(workdir, "checkpoints"), None)
  return state["params"]


def test_same_config_and_seed_reproduce_params_bit_for_bit(tmp_path):
  a, b, c = (os.fspath(tmp_path / n) for n in "abc")
  simulation.run(tiny_config(), a, progress=False)
  simulation.run(tiny_config(), b, progress=False)
  other = tiny_config()
  other.seed = 1
  simulation.run(other, c, progress=False)
  pa, pb, pc = final_params(a), final_params(b), final_params(c)
  jax.tree.map(np.testing.assert_array_equal, pa, pb)
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, pa, pc)))
  rows = [json.loads(line) for line in open(os.path.join(a, "metrics.jsonl"))]
  assert [r["round"] for r in rows] == [1, 2]


def test_launch_runs_end_to_end_and_writes_the_record(tmp_path):
  workdir = os.fspath(tmp_path / "run")
  cmd = [sys.executable, "launch.py", "--config=experiments/default.py",
         "--config.num_clients=6", "--config.clients_per_round=3",
         "--config.num_rounds=2", "--config.eval_every=1", "--config.data.image_size=12",
         "--config.data.examples_per_client=24", "--config.data.num_unseen=1",
         "--config.client.batch_size=8", "--progress=false", f"--workdir={workdir}"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["rounds"] == 2 and 0.0 <= summary["accuracy"] <= 1.0
  for name in ("config.json", "metrics.jsonl", "metrics.csv", "curves.png", "report.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert "accuracy" in out.stdout


def test_launch_rejects_a_bad_field_in_one_line_and_writes_nothing(tmp_path):
  workdir = os.fspath(tmp_path / "bad")
  out = subprocess.run(
      [sys.executable, "launch.py", "--config.clients_per_round=500",
       f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert out.stderr.strip().splitlines()[-1] == (
      "error: clients_per_round=500 must be <= num_clients=10")
  assert not os.path.exists(workdir)


def _final_state(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return checkpoint.restore(directory, None, checkpoint.latest_step(directory))


def test_resume_after_interruption_is_bit_exact(tmp_path, monkeypatch):
  config = tiny_config()
  config.dp.level = "patient"
  config.num_rounds, config.checkpoint_every, config.eval_every = 4, 2, 1
  config.server.ema_decay = 0.5  # the averaged model is part of the state
  straight, resumed = os.fspath(tmp_path / "straight"), os.fspath(tmp_path / "resumed")
  simulation.run(config, straight, progress=False)

  real = simulation.sampling.cohort_for_round

  def preempted_in_round_3(cfg, r):
    if r == 3:
      raise RuntimeError("preempted")
    return real(cfg, r)

  monkeypatch.setattr(simulation.sampling, "cohort_for_round", preempted_in_round_3)
  with pytest.raises(RuntimeError, match="preempted"):
    simulation.run(config, resumed, progress=False)
  monkeypatch.undo()
  assert not os.path.exists(os.path.join(resumed, "summary.json"))
  assert simulation.resume_round(resumed, config) == 2
  other = tiny_config()
  other.seed = 1
  assert simulation.resume_round(resumed, other) == 0  # another config starts afresh

  summary = simulation.run(config, resumed, progress=False)
  expected = json.load(open(os.path.join(straight, "summary.json")))
  for key in ("rounds", "accuracy", "auroc", "epsilon"):
    assert summary[key] == expected[key]
  jax.tree.map(np.testing.assert_array_equal, _final_state(resumed), _final_state(straight))
  rows = [[json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
          for d in (resumed, straight)]
  assert [r["round"] for r in rows[0]] == [1, 2, 3, 4]
  for a, b in zip(*rows):
    a.pop("wall_seconds"), b.pop("wall_seconds")
    assert a == b
  privacy = [json.load(open(os.path.join(d, "privacy.json"))) for d in (resumed, straight)]
  assert privacy[0] == privacy[1]


def test_ema_changes_what_is_evaluated_not_what_is_trained(tmp_path):
  config = tiny_config()
  config.num_rounds, config.eval_every = 3, 3
  plain, averaged = os.fspath(tmp_path / "plain"), os.fspath(tmp_path / "ema")
  simulation.run(config, plain, progress=False)
  config.server.ema_decay = 0.5
  simulation.run(config, averaged, progress=False)
  states = [_final_state(d) for d in (plain, averaged)]
  jax.tree.map(np.testing.assert_array_equal, states[0]["params"], states[1]["params"])
  losses = [json.loads(open(os.path.join(d, "metrics.jsonl")).readline())["loss"]
            for d in (plain, averaged)]
  assert losses[0] != losses[1]  # evaluated: the average, not the last params
