r"""A sweep's executions timed against each other: vmapped, one after another, processes.

  python -m benchmarks.sweep_throughput --configurations=16 \
      --out=benchmarks/results/sweep_16_cpu.json
  python -m benchmarks.sweep_throughput --configurations=64 --modes=vmap,sequential \
      --out=benchmarks/results/sweep_64_gpu.json      # on a GPU: 64 in one program
  python -m benchmarks.sweep_throughput --configurations=16 --config.num_rounds=2 \
      --config.eval_every=2                            # shorter (a loaded 2-core CPU)

`--configurations=N` replaces the config's axes with N noise multipliers (geometric,
0.8 to 4): one group, shapes unchanged, so every configuration can share one
program; `--configurations=0` keeps the config's own axes. Each mode in `--modes`
trains every configuration into its own sub-workdir, one mode after another:

  vmap        fedsim.sweep.run with sweep.execution="vmap": each group one vmapped
              program (fedsim/sweep_vmap.py), `--config.sweep.group_size` at a time
  sequential  sweep.execution="sequential": one Setup per group, runs one after another
  processes   each configuration launched alone in a fresh Python process (its own
              imports, data, compilation), one after another: what a user without
              sweeps does

and the JSON holds wall and CPU seconds per mode (children's CPU for processes), the
ratios to `sequential` and to `processes`, the largest relative difference of every
configuration's summary figures from its sequential run, the load average before
and after (figures from a shared CPU are inflated; ratios within one run are the
steadier), the backend, devices and XLA flags. `sweep.execution="auto"` picks the
faster of vmap and sequential per backend from these numbers (fedsim/sweep_vmap.py).
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from fedsim import io, simulation, sweep

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/privacy_utility.py",
                                          "A sweep config.", lock_config=True)
_CONFIGURATIONS = flags.DEFINE_integer(
    "configurations", 16, "N > 0: the axes become N noise multipliers (one group); "
    "0: the config's own axes.")
_MODES = flags.DEFINE_list("modes", ["vmap", "sequential", "processes"],
                           "Executions to time, in this order (vmap, sequential, processes).")
_OUT = flags.DEFINE_string("out", "", "Where to write the JSON result (printed anyway).")
_ALONE = flags.DEFINE_string("alone", "", "Internal: INDEX:WORKDIR, run that configuration "
                             "alone (the processes mode launches this).")
MODES = ("vmap", "sequential", "processes")
FIGURES = ("accuracy", "balanced_accuracy", "auroc", "worst_hospital_accuracy",
           "unseen_accuracy", "epsilon")


def sweep_config():
  """The benchmarked sweep: the config, with `--configurations` noise multipliers."""
  config = _CONFIG.value
  n = _CONFIGURATIONS.value
  if n > 0:
    with config.unlocked():
      config.sweep.axes = ml_collections.ConfigDict({"dp": {"noise_multiplier": tuple(
          float(f"{v:.4g}") for v in np.geomspace(0.8, 4.0, n))}})
  return config


def _figures(path: str) -> dict:
  with open(os.path.join(path, "summary.json")) as f:
    summary = json.load(f)
  return {k: summary[k] for k in FIGURES if summary.get(k) is not None}


def _processes(configurations, root: str) -> None:
  """Each configuration in its own `python -m benchmarks.sweep_throughput --alone`."""
  flags_given = [a for a in sys.argv[1:] if not a.startswith(("--out", "--modes", "--alone"))]
  for c in configurations:
    subprocess.run([sys.executable, "-m", "benchmarks.sweep_throughput", *flags_given,
                    f"--alone={c.index}:{os.path.join(root, c.name)}"], check=True)


def _time(mode: str, config, configurations, root: str) -> tuple[float, float]:
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  wall, cpu = time.perf_counter(), time.process_time()
  if mode == "processes":
    _processes(configurations, root)
  else:
    with config.unlocked():
      config.sweep.execution = mode
    sweep.run(config, root, progress=False, configurations=configurations)
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = time.process_time() - cpu + (after.ru_utime + after.ru_stime
                                     - children.ru_utime - children.ru_stime)
  return time.perf_counter() - wall, cpu


def _path(root: str, mode: str, c) -> str:
  return os.path.join(root, c.name) if mode == "processes" else sweep.run_dir(root, c)


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
  config = sweep_config()
  if _ALONE.value:  # one configuration of the processes mode
    index, workdir = _ALONE.value.split(":", 1)
    simulation.run(sweep.expand(config)[int(index)].config, workdir, progress=False)
    return
  for mode in _MODES.value:
    if mode not in MODES:
      raise app.UsageError(f"--modes={_MODES.value} must list some of {list(MODES)}")
  load_before = os.getloadavg()
  seconds, figures = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    configurations = sweep.plan(config, os.path.join(tmp, "plan"))
    for mode in _MODES.value:
      root = os.path.join(tmp, mode)
      seconds[mode] = _time(mode, config, configurations, root)
      figures[mode] = [_figures(_path(root, mode, c)) for c in configurations]
      print(f"{mode}: {seconds[mode][0]:.1f} s wall, {seconds[mode][1]:.1f} s CPU", flush=True)
  result = {"configurations": len(configurations),
            "groups": len(sweep.groups(configurations)),
            "group_size": config.sweep.group_size,
            "rounds": config.num_rounds,
            **{f"{m}_wall_seconds": s[0] for m, s in seconds.items()},
            **{f"{m}_cpu_seconds": s[1] for m, s in seconds.items()},
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "versions": io.versions()}
  for reference in ("sequential", "processes"):
    for m in seconds:
      if m != reference and reference in seconds:
        result[f"{m}_over_{reference}_wall"] = seconds[m][0] / seconds[reference][0]
        result[f"{m}_over_{reference}_cpu"] = seconds[m][1] / seconds[reference][1]
  if "sequential" in figures:
    for m in figures:
      pairs = zip(figures[m], figures["sequential"])
      result[f"{m}_max_relative_difference"] = max(
          (abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for a, b in pairs for k in b),
          default=0.0)
  print(io.dumps(result, indent=2))
  if _OUT.value:
    io.write_json_atomic(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)
