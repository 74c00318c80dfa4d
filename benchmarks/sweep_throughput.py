r"""A sweep against the same configurations run one after another (same process, device).

  python -m benchmarks.sweep_throughput --config=experiments/privacy_utility.py \
      --out=benchmarks/results/sweep_cpu.json

Times `fedsim.sweep.run` (each group of configurations shares one Setup: one
federation, one compilation) and then `simulation.run` of each configuration alone
(its own data and compilation), in that order (the second pass profits from warm
imports and caches, so the ratio is conservative), checks that every configuration's
summary.json is the same in both except wall time, and writes wall and process CPU
seconds (on a CPU shared with other work, the CPU seconds are the steadier ratio).
"""

import json
import os
import tempfile
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from fedsim import io, simulation, sweep

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/privacy_utility.py",
                                          "A sweep config.", lock_config=True)
_OUT = flags.DEFINE_string("out", "", "Where to write the JSON result (printed anyway).")


def _summary(path: str) -> dict:
  with open(os.path.join(path, "summary.json")) as f:
    return {k: v for k, v in json.load(f).items() if k != "wall_seconds"}


def main(argv):
  del argv
  config = _CONFIG.value
  with tempfile.TemporaryDirectory() as tmp:
    swept, alone = os.path.join(tmp, "sweep"), os.path.join(tmp, "alone")
    configurations = sweep.plan(config, swept)
    wall, cpu = time.perf_counter(), time.process_time()
    sweep.run(config, swept, progress=False, configurations=configurations)
    sweep_seconds = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    for c in configurations:
      simulation.run(c.config, os.path.join(alone, c.name), progress=False)
    alone_seconds = time.perf_counter() - wall, time.process_time() - cpu
    identical = all(_summary(sweep.run_dir(swept, c)) == _summary(os.path.join(alone, c.name))
                    for c in configurations)
  result = {"configurations": len(configurations),
            "groups": len(sweep.groups(configurations)),
            "sweep_wall_seconds": sweep_seconds[0], "sweep_cpu_seconds": sweep_seconds[1],
            "one_after_another_wall_seconds": alone_seconds[0],
            "one_after_another_cpu_seconds": alone_seconds[1],
            "wall_ratio": sweep_seconds[0] / alone_seconds[0],
            "cpu_ratio": sweep_seconds[1] / alone_seconds[1], "summaries_identical": identical,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "versions": io.versions()}
  print(io.dumps(result, indent=2))
  if _OUT.value:
    io.write_json_atomic(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)
