"""Round throughput: the engine against a Python loop of clients and centralised training.

Workload W1 (shared/DESIGN.md, "Performance"): 100 hospitals x 64 random uint8 images
28x28x1, 3 classes, the small CNN, one local epoch at batch 16 (4 local steps), client SGD
lr 0.1, FedAvg. One run measures, on one device:

  engine/{conv}/c{chunk}/b{block}  one round of the engine: `round.round_step` on a
      `round.Setup` with `engine.client_chunk=chunk`, `engine.client_block=block`,
      `engine.conv=conv`. `b{chunk}` is a Python loop of jitted vmapped chunk calls,
      `b{cohort}` one call per round with the chunks scanned in-graph (a block that is
      not a multiple of the chunk is padded up to one: see `clients_computed`).
  loop/{conv}          the same round with hospitals run one by one: one jitted call per
      hospital of the engine's client stages (`make_client_update` with the same
      schedule and unroll, the plan's transform, `aggregation`), the engine's cohort and
      keys, then the engine's privatize and server step; per-client data is put on the
      device before timing.
  central/{conv}/b{batch}  centralised non-private SGD on the same examples: jitted steps of
      each `--central_batch` (4 x 1,600 on W1; also 100 x 64, because on XLA:CPU the large
      batch is not the fastest way through the same examples), batches already on device.
  dp_example_{clip}/engine|loop  example-level DP-SGD exactly as `privacy_plan.make_plan`
      builds it (Poisson sampling with expected batch 16, clip 1, noise multiplier 1,
      clipping "vmap" or "ghost"), in the engine at the default strategy and in the loop.
  dp_client/engine|loop  client-level DP (`clip_delta` on each delta, server noise once per
      round; cohort sampling rate 1, so every hospital trains as in W1).
  memory/{hospitals}   peak RSS (and device peak bytes where jax reports them) of a fresh
      process that builds the federation and runs two rounds at the default strategy.

Round seconds exclude the accountant, evaluation and metric writing. Each timed row runs
`--warmup` rounds (the first compiles; `compile_s` = first round - median round,
`xla_compile_s` = XLA's own compile time from jax.monitoring), then `--reps` rounds;
`round_s` is their minimum (`--stat=median` for the median; both are written). The default
engine row (`strategy.resolve` without overrides) always runs: every ratio refers to it.

  python -m benchmarks.round_throughput                # everything (tens of minutes on CPU)
  python -m benchmarks.round_throughput --quick        # smoke test (~2 min on 2 CPU cores)
  python -m benchmarks.round_throughput --rows='engine/*,loop/*,central/*' --conv=patches
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python -m benchmarks.round_throughput

Prints one JSON object on stdout (also written to --out), a markdown table on stderr, and
plots round seconds per chunk size to a PNG beside the JSON. The work is split by job:
benchmarks/workload.py (W1, configs, rows), timing.py (timed rows), memory.py (memory
rows), report.py (ratios, JSON, tables, plot); this module is flags and the run.
"""

from __future__ import annotations

import os
import time
import traceback
from typing import Callable

import jax
from absl import app, flags

from benchmarks import memory, report, timing, workload
from fedsim import io

_HOSPITALS = flags.DEFINE_integer("hospitals", 100, "Hospitals in the federation (all train).")
_EXAMPLES = flags.DEFINE_integer("examples_per_client", 64, "Images per hospital.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 28, "Image side (1 channel).")
_CLASSES = flags.DEFINE_integer("num_classes", 3, "Classes.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Local batch (expected batch for DP-SGD).")
_EPOCHS = flags.DEFINE_integer("local_epochs", 1, "Local epochs.")
_LR = flags.DEFINE_float("learning_rate", 0.1, "Client (and centralised) SGD learning rate.")
_CHUNKS = flags.DEFINE_list("chunks", ["1", "4", "16", "100"],
                            "Client chunk sizes of the engine rows (capped at the cohort).")
_CONV = flags.DEFINE_list("conv", ["xla", "patches"], "Convolution lowerings to measure.")
_UNROLL = flags.DEFINE_integer("unroll", 0, "Local-step unroll (0: the backend's default).")
_REPS = flags.DEFINE_integer("reps", 3, "Timed rounds per row, after the warm-up.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed rounds per row (the first compiles).")
_STAT = flags.DEFINE_enum("stat", "min", ["min", "median"], "Statistic of the timed rounds.")
_CENTRAL_BATCH = flags.DEFINE_list(
    "central_batch", ["1600", "64"], "Centralised batch sizes; the first is the reference of "
    "the `*_over_central` ratios (`*_over_central_best`: the fastest centralised row).")
_DP_CLIPPING = flags.DEFINE_list("dp_clipping", ["vmap", "ghost"],
                                 "Example-level DP clipping methods (dp.clipping).")
_NOISE = flags.DEFINE_float("noise_multiplier", 1.0, "dp.noise_multiplier.")
_CLIP = flags.DEFINE_float("clip_norm", 1.0, "dp.clip_norm (per example, or per delta).")
_DP_GATHER = flags.DEFINE_integer(
    "dp_max_batch_size", 0, "dp.max_batch_size: 0 exact Poisson (a mask over every local "
    "example each step), > 0 a truncated gather of that many examples per step.")
_DP_MICRO = flags.DEFINE_integer("dp_microbatch_size", 0, "dp.microbatch_size (0: none).")
_MEM_SIZES = flags.DEFINE_list("memory_sizes", ["25", "50", "100", "200"],
                               "Hospital counts of the memory rows (a fresh process each).")
_MEM_CHUNK = flags.DEFINE_integer(
    "memory_chunk", 0, "engine.client_chunk (= client_block) of the memory rows; 0: the "
    "default strategy; larger than the cohort: the whole cohort vmapped.")
_ROWS = flags.DEFINE_list(
    "rows", ["*"], "Rows to run: fnmatch patterns, e.g. 'engine/xla/*,loop/*,dp_client/*,"
    "memory/*'. Groups: engine, loop, central, dp_example_vmap, dp_example_ghost, "
    "dp_client, memory.")
_OUT = flags.DEFINE_string(
    "out", "", "JSON path; default benchmarks/results/round_throughput_<backend>[_quick].json.")
_PLOT = flags.DEFINE_bool("plot", True, "Write the PNG (the JSON path with .png).")
_QUICK = flags.DEFINE_bool(
    "quick", False, "Smoke test of every code path, not a measurement: 8 hospitals x 32 "
    "images (2 local steps, so compiles are shorter), 1 rep, chunks 4, conv xla, memory "
    "sizes 8,16 (each unless given explicitly).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random data, params and keys.")
_MEMORY_CHILD = flags.DEFINE_integer("memory_child", 0, "Internal: run one memory row.")


def settings_from_flags() -> workload.Settings:
  """Flags -> Settings; `--quick` changes the defaults of the flags not given."""
  quick = _QUICK.value
  pick = lambda flag, small: small if quick and not flag.present else flag.value
  return workload.Settings(
      hospitals=pick(_HOSPITALS, 8), examples=pick(_EXAMPLES, 32),
      image_size=_IMAGE_SIZE.value, classes=_CLASSES.value, batch_size=_BATCH.value,
      epochs=_EPOCHS.value, lr=_LR.value, chunks=tuple(int(c) for c in pick(_CHUNKS, ["4"])),
      convs=tuple(pick(_CONV, ["xla"])), unroll=_UNROLL.value, reps=pick(_REPS, 1),
      warmup=max(1, _WARMUP.value), stat=_STAT.value,
      central_batches=tuple(int(b) for b in _CENTRAL_BATCH.value),
      dp_clipping=tuple(_DP_CLIPPING.value), noise_multiplier=_NOISE.value,
      clip_norm=_CLIP.value, dp_max_batch_size=_DP_GATHER.value,
      dp_microbatch_size=_DP_MICRO.value,
      memory_sizes=tuple(int(k) for k in pick(_MEM_SIZES, ["8", "16"])),
      memory_chunk=_MEM_CHUNK.value, patterns=tuple(_ROWS.value), quick=quick,
      seed=_SEED.value)


def run_rows(rows: list[workload.Row], s: workload.Settings,
             after_row: Callable[[dict], None] = lambda results: None) -> dict:
  """Runs every row in order; a failing row records its error and the run goes on.

  `after_row(results so far)` runs after each row (the partial report is saved there).
  """
  results = {}
  for i, row in enumerate(rows):
    report.log(f"[{i + 1}/{len(rows)}] {row.name} ...")
    start = time.perf_counter()
    try:
      run = memory.run_memory_row if row.kind == "memory" else timing.run_timed_row
      results[row.name] = run(row, s)
    except Exception as e:  # noqa: BLE001  (a benchmark reports failures, it goes on)
      results[row.name] = {"kind": row.kind, "error": f"{type(e).__name__}: {e}"}
      report.log(traceback.format_exc())
    r = results[row.name]
    summary = (f"error: {r['error']}" if "error" in r else
               f"peak RSS {r['peak_rss_mb']:.0f} MB" if row.kind == "memory" else
               f"round {r['round_s']:.3f} s, compile {r['compile_s']:.1f} s")
    report.log(f"    {summary}  ({time.perf_counter() - start:.1f} s)")
    after_row(results)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  timing.listen_for_compiles()
  s = settings_from_flags()
  if _MEMORY_CHILD.value:
    print(io.dumps(memory.memory_child(s, _MEMORY_CHILD.value)))
    return
  start, load_start = time.perf_counter(), os.getloadavg()
  default = workload.default_strategy(s)
  rows = workload.plan_rows(s, default)
  out = report.output_path(_OUT.value, s)
  report.log(f"{len(rows)} rows on {jax.devices()[0].device_kind} ({jax.default_backend()}); "
             f"default strategy {default}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

  def save(results: dict, complete: bool = False) -> dict:
    data = report.build(s, results, default=default, default_row=rows[0].name,
                        complete=complete, load_start=load_start,
                        wall_s=time.perf_counter() - start)
    report.save(out, data)  # a partial report (complete: false) survives an interrupted run
    return data

  final = save(run_rows(rows, s, after_row=save), complete=True)
  png = out.with_suffix(".png")
  if _PLOT.value:
    report.plot(final, png)
  report.log("\n" + report.markdown(final) + "\n")
  report.log(f"wrote {out}" + (f" and {png}" if _PLOT.value else ""))
  print(io.dumps(final))


if __name__ == "__main__":
  app.run(main)
