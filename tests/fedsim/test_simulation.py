"""End-to-end runs: a seed reproduces the run bit for bit; a killed run resumes exactly.

launch.py's record of a finished run is checked in test_launch.py."""

import json
import os
import signal
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


def test_launch_rejects_a_bad_field_in_one_line_and_writes_nothing(tmp_path):
  workdir = os.fspath(tmp_path / "bad")
  out = subprocess.run(
      [sys.executable, "launch.py", "--config.clients_per_round=500",
       f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert out.stderr.strip().splitlines()[-1] == (
      "error: clients_per_round=500 must be <= num_clients=100")
  assert not os.path.exists(workdir)


def _final_state(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return checkpoint.restore(directory, None, checkpoint.latest_step(directory))


RESUME_CONFIG = """
from tests.conftest import tiny_config

def get_config():
  c = tiny_config()
  c.num_clients, c.clients_per_round = 8, 5
  c.dp.level = "patient"
  c.num_rounds, c.checkpoint_every, c.eval_every = 5, 1, 1
  c.server.ema_decay = 0.5  # the averaged model is part of the state
  return c
"""

# Runs launch.py in this process and SIGKILLs it right after round 3's checkpoint.
KILL_AFTER_ROUND_3 = """
import os, runpy, signal, sys
from fedsim import simulation
save = simulation.save_state
def save_then_die(workdir, state):
  save(workdir, state)
  if int(state.round) == 3:
    os.kill(os.getpid(), signal.SIGKILL)
simulation.save_state = save_then_die
sys.argv = ["launch.py", *sys.argv[1:]]
runpy.run_path("launch.py", run_name="__main__")
"""


def launch(args, devices, *, script=None):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  if devices > 1:  # a cached 8-device CPU program differed from a fresh one in the last bit
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
  cmd = [sys.executable, *(["-c", script] if script else ["launch.py"]), *args]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("devices", [1, 8])
def test_sigkilled_run_resumes_bit_for_bit(tmp_path, devices):
  """A process killed with SIGKILL after round 3 and launched again ends where an
  uninterrupted run ends: params, optimiser and EMA state, metrics and ledger."""
  config_file = tmp_path / "resume_config.py"
  config_file.write_text(RESUME_CONFIG)
  straight, resumed = os.fspath(tmp_path / "straight"), os.fspath(tmp_path / "resumed")
  args = lambda workdir: [f"--config={config_file}", f"--workdir={workdir}", "--noprogress"]
  assert launch(args(straight), devices).returncode == 0
  killed = launch(args(resumed), devices, script=KILL_AFTER_ROUND_3)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert not os.path.exists(os.path.join(resumed, "summary.json"))
  assert checkpoint.latest_step(os.path.join(resumed, "checkpoints")) == 3
  again = launch(args(resumed), devices)
  assert again.returncode == 0, again.stderr[-2000:]

  jax.tree.map(np.testing.assert_array_equal, _final_state(resumed), _final_state(straight))
  rows = [[json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
          for d in (resumed, straight)]
  assert [r["round"] for r in rows[0]] == [1, 2, 3, 4, 5]
  for a, b in zip(*rows):
    a.pop("wall_seconds"), b.pop("wall_seconds")
    assert a == b
  privacy = [json.load(open(os.path.join(d, "privacy.json"))) for d in (resumed, straight)]
  assert privacy[0] == privacy[1]
  summaries = [json.load(open(os.path.join(d, "summary.json"))) for d in (resumed, straight)]
  for key in ("rounds", "accuracy", "auroc", "epsilon"):
    assert summaries[0][key] == summaries[1][key]


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
