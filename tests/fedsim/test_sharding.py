"""Sharded equals unsharded: the client axis split over 8 fake CPU devices, two rounds.

One subprocess checks every DP level (each launch pays JAX's import and compiles the
programs the levels share)."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent("""
    import traceback
    import jax, numpy as np
    from fedsim import round, sampling, simulation
    from tests.conftest import tiny_config
    assert jax.device_count() == 8, jax.devices()

    def check(level):
      config = tiny_config()
      config.num_clients, config.clients_per_round = 8, 5
      config.data.examples_per_client = 20
      config.dp.level = level
      config.client_sampling_rate = 0.6 if level == "client" else 0.0
      sharded = simulation.prepare(config)
      config.engine.shard_clients = False
      config.engine.client_chunk = config.engine.client_block = 8
      plain = round.Setup(config, sharded.fed)
      assert sharded.strategy.devices == 8 and sharded.strategy.block == 8
      assert plain.strategy.devices == 1
      states, outs = [], []
      for setup in (sharded, plain):
        state = round.init_state(setup)
        for r in (1, 2):
          state, out = round.round_step(setup, state, r)
        states.append(state)
        outs.append(out)
      a, b = (out.sums for out in outs)
      assert len(a.delta_sum["params"]["conv1"]["kernel"].sharding.device_set) == 8
      jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-5),
                   a.delta_sum, b.delta_sum)
      np.testing.assert_allclose(a.metrics["examples"], b.metrics["examples"])
      jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-5),
                   states[0].params, states[1].params)
      assert sharded.strategy.conv == plain.strategy.conv == "xla"  # native convolutions

    for level in LEVELS:
      try:
        check(level)
        print("SHARDED_OK", level)
      except Exception:
        print("SHARDED_FAILED", level, traceback.format_exc())
""")

LEVELS = ("none", "example", "patient", "client")


def test_sharded_round_equals_unsharded_on_8_devices_at_every_dp_level():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # no compilation cache (see test_simulation)
  script = SCRIPT.replace("LEVELS", repr(LEVELS))
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1800)
  passed = [line.split()[1] for line in out.stdout.splitlines()
            if line.startswith("SHARDED_OK")]
  assert passed == list(LEVELS), out.stdout[-6000:] + out.stderr[-3000:]
