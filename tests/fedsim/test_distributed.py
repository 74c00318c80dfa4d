"""Two processes, one federation (`launch.py --distributed`, CPU collectives over gloo)."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from fedsim import checkpoint, simulation
from fedsim import workdir as workdir_lib
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = """
from tests.conftest import tiny_config
def get_config():
  c = tiny_config()
  c.num_clients, c.clients_per_round, c.checkpoint_every, c.eval_every = 8, 4, 0, 2
  return c
"""


def _config():
  c = tiny_config()
  c.num_clients, c.clients_per_round, c.checkpoint_every, c.eval_every = 8, 4, 0, 2
  return c


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_the_federation_one_process_trains(tmp_path):
  """Final params equal to 1e-6 (float32 sums in another order: each process's device
  sums its half of the cohort, then a psum; measured 2.4e-7), epsilon exactly."""
  (tmp_path / "two.py").write_text(CONFIG)
  workdir = tmp_path / "two"
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
  env["JAX_PLATFORMS"] = "cpu"
  procs = [subprocess.Popen(
      [sys.executable, "launch.py", f"--config={tmp_path / 'two.py'}", f"--workdir={workdir}",
       "--distributed", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}", "--noprogress"], cwd=ROOT, env=env, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in (0, 1)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  one = simulation.run(_config(), os.fspath(tmp_path / "one"), progress=False)
  two = json.loads((workdir / "summary.json").read_text())
  assert two["epsilon"] == one["epsilon"] and two["rounds"] == one["rounds"] == 2
  assert two["strategy"]["devices"] == 2  # one client mesh over both processes' devices
  restore = lambda path: checkpoint.restore(workdir_lib.checkpoint_dir(os.fspath(path)))
  for a, b in zip(jax.tree.leaves(restore(workdir)), jax.tree.leaves(restore(tmp_path / "one"))):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  # Process 0 wrote the record; process 1 only a scratch copy, without checkpoints.
  assert not os.path.exists(workdir_lib.checkpoint_dir(os.fspath(tmp_path / "two.process1")))
  assert outputs[0].splitlines()[-3:-1] == outputs[1].splitlines()[-3:-1]  # same figures
