"""What privacy costs the default run: its round with and without DP-SGD, in one process.

  python -m benchmarks.default_dp_overhead                    # experiments/default.py
  python -m benchmarks.default_dp_overhead --clipping=vmap,ghost --reps=5
  python -m benchmarks.default_dp_overhead --clipping=ghost --microbatch=0,8,16   # memory
  python -m benchmarks.default_dp_overhead --clipping=ghost --gather=fixed,bucketed

Rows (each a `round.Setup` built from experiments/default.py, the federation generated
once): `none` (dp.level='none', the same federation, cohort and local steps without
privacy), `patient_{clipping}` (the default: patient-level DP-SGD, truncated Poisson
gather in patient slots) and `example_{clipping}` (example-level DP-SGD over the same
images, gather of `--example_gather` images); with `--microbatch=m,...` each private row
also runs with `dp.microbatch_size=m` (units a slice; suffix `_mb{m}`), and with
`--gather=g,...` with `engine.dp_gather=g` (suffix `_{g}`; "auto": the backend's). Round seconds are
`round.round_step` (no accounting, evaluation or writing), the minimum of `--reps` rounds
after one warm-up, the rows' timed rounds in rotation (a drift of the machine moves them
alike); `temp_mb` is XLA's temporary memory of the compiled block program
(`memory_analysis()`: the peak working set of one call beyond its arguments and outputs).
Writes a JSON with the ratios to `none` (benchmarks/results/default_dp_overhead_<backend>.json).
"""

from __future__ import annotations

import os
import time

import jax
from absl import app, flags

from benchmarks import report, timing
from experiments import default as default_experiment
from fedsim import blocks, io, keys
from fedsim import config as config_lib
from fedsim import round as round_lib
from fedsim.data import make_federated_data

_CLIPPING = flags.DEFINE_list("clipping", ["vmap", "ghost"], "dp.clipping values to time.")
_REPS = flags.DEFINE_integer("reps", 3, "Timed rounds per row, after one warm-up.")
_EXAMPLE_GATHER = flags.DEFINE_integer(
    "example_gather", 160, "dp.max_batch_size of the example-level rows (images); the "
    "default's patient gather is 64 patients in slots of the largest patient's images.")
_MICROBATCH = flags.DEFINE_list(
    "microbatch", ["0"], "dp.microbatch_size values of the private rows (0: unsliced); "
    "patient rows slice patients, example rows images.")
_GATHER = flags.DEFINE_list(
    "gather", ["auto"], "engine.dp_gather values of the private rows (auto: the backend's).")
_OUT = flags.DEFINE_string("out", "", "JSON path (default benchmarks/results/...).")


def _setup(fed, gather="auto", **dp) -> round_lib.Setup:
  config = default_experiment.get_config()
  config.engine.dp_gather = gather
  for field, value in dp.items():
    config.dp[field] = value
  config_lib.validate(config)
  return round_lib.Setup(config, fed)


def block_temp_mb(setup: round_lib.Setup) -> float:
  """XLA's temporary memory of one call of the compiled block program, in MiB (round 1)."""
  state = round_lib.init_state(setup)
  block = next(blocks.gather(setup.fed.train, round_lib.sample_cohort(setup.config, 1),
                             setup.strategy.block))
  client_keys = blocks.client_keys(keys.round_keys(setup.config.seed, 1).clients, block.ids)
  hparams = {**setup.hparams, "clip_norm": state.clip_norm}
  args = (state.params, block.data, block.valid, client_keys, hparams)
  program = setup.block_fn  # bucketed gathers: the program this block runs
  if hasattr(program, "kept"):
    program = program.program_for(int(jax.device_get(program.kept(block.data, client_keys))))
  total = jax.eval_shape(lambda: program(*args))
  compiled = program.compiled.lower(total, *args, None).compile()
  return compiled.memory_analysis().temp_size_in_bytes / 2**20


def main(argv):
  del argv
  timing.listen_for_compiles()
  fed = make_federated_data(default_experiment.get_config())
  rows = {"none": dict(level="none")}
  for clip in _CLIPPING.value:
    for size in map(int, _MICROBATCH.value):
      for gather in _GATHER.value:
        suffix = (f"_mb{size}" if size else "") + (f"_{gather}" if gather != "auto" else "")
        rows[f"patient_{clip}{suffix}"] = dict(clipping=clip, microbatch_size=size,
                                               gather=gather)
        rows[f"example_{clip}{suffix}"] = dict(level="example", clipping=clip,
                                               max_batch_size=_EXAMPLE_GATHER.value,
                                               microbatch_size=size, gather=gather)
  setups = {name: _setup(fed, **dp) for name, dp in rows.items()}
  start = time.perf_counter()
  results = timing.time_rounds_interleaved(
      {name: timing.engine_round_fn(setup) for name, setup in setups.items()},
      reps=_REPS.value)
  for name, setup in setups.items():
    results[name]["temp_mb"] = block_temp_mb(setup)
    report.log(f"{name}: round {results[name]['round_s']:.3f} s (median "
               f"{results[name]['round_s_median']:.3f} s), temp {results[name]['temp_mb']:.1f} MiB")
  report.log(f"{len(rows)} rows, {_REPS.value} rounds each in rotation: "
             f"{time.perf_counter() - start:.0f} s")
  base = results["none"]["round_s"]
  ratios = {f"{k}_over_none": v["round_s"] / base for k, v in results.items() if k != "none"}
  memory = results["none"]["temp_mb"]
  ratios.update({f"{k}_temp_mb_over_none": v["temp_mb"] / memory
                 for k, v in results.items() if k != "none"})
  data = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
          "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
          "versions": io.versions(), "rows": results, "ratios": ratios}
  out = _OUT.value or f"benchmarks/results/default_dp_overhead_{jax.default_backend()}.json"
  io.write_json_atomic(out, data)
  report.log("\n".join(f"{k}: {v:.2f}x" for k, v in ratios.items()) + f"\nwrote {out}")


if __name__ == "__main__":
  app.run(main)
