"""Memory rows: the peak RSS of a fresh process that runs two engine rounds.

Peak RSS only grows within a process, so each memory row runs in a child
interpreter (`python -m benchmarks.round_throughput --memory_child=HOSPITALS`, the
same environment and XLA_FLAGS) that builds the federation and the `round.Setup`,
runs two rounds of `round.round_step` and prints one JSON line; the parent adds it
to the report. Memory must stay bounded as hospitals grow (shared/DESIGN.md,
"Performance"): these rows show by how much it grows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import resource
import subprocess
import sys
from typing import Optional

import jax

from benchmarks import timing, workload

REPO = pathlib.Path(__file__).resolve().parent.parent
CHILD_TIMEOUT_S = 1800


def rss_mb() -> Optional[float]:
  """Current resident set size in MB (Linux), else None."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
  except (OSError, ValueError):
    return None


def peak_rss_mb() -> float:
  """Peak resident set size of this process so far, in MB."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KiB


def memory_child(s: workload.Settings, hospitals: int) -> dict:
  """In the child: build `hospitals` hospitals, run two engine rounds, report memory.

  The engine runs at the default strategy, or with `engine.client_chunk` =
  `engine.client_block` = `s.memory_chunk` when that is set.
  """
  rss_start = rss_mb()
  setup = workload.build_setup(s, hospitals=hospitals, chunk=s.memory_chunk,
                               block=s.memory_chunk)
  one_round = timing.engine_round_fn(setup)
  rss_ready, peak_ready = rss_mb(), peak_rss_mb()
  times = timing.time_rounds(one_round, reps=1)
  stats = jax.devices()[0].memory_stats() or {}
  train = setup.fed.train
  return {
      "hospitals": hospitals, "chunk": setup.strategy.chunk, "block": setup.strategy.block,
      "conv": setup.strategy.conv, "host_data_mb": sum(
          getattr(train, f.name).nbytes for f in dataclasses.fields(train)) / 2**20,
      "rss_at_start_mb": rss_start, "rss_after_setup_mb": rss_ready,
      "peak_rss_before_round_mb": peak_ready, "peak_rss_mb": peak_rss_mb(),
      "rss_after_rounds_mb": rss_mb(),
      "device_peak_bytes_in_use": stats.get("peak_bytes_in_use"),
      "device_bytes_limit": stats.get("bytes_limit"),
      "first_round_s": times["first_round_s"], "round_s": times["round_s"],
  }


def child_flags(s: workload.Settings, hospitals: int) -> list[str]:
  """The command-line flags that make the child rebuild `s`'s workload for `hospitals`."""
  passed = {"examples_per_client": s.examples, "image_size": s.image_size,
            "num_classes": s.classes, "batch_size": s.batch_size, "local_epochs": s.epochs,
            "learning_rate": s.lr, "unroll": s.unroll, "memory_chunk": s.memory_chunk,
            "seed": s.seed, "memory_child": hospitals}
  return [f"--{k}={v}" for k, v in passed.items()]


def run_memory_row(row: workload.Row, s: workload.Settings) -> dict:
  """Runs `memory_child` for `row.hospitals` in a fresh interpreter; returns its JSON row."""
  cmd = [sys.executable, "-m", "benchmarks.round_throughput"] + child_flags(s, row.hospitals)
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                        timeout=CHILD_TIMEOUT_S)
  if proc.returncode != 0:
    raise RuntimeError(f"memory child failed ({proc.returncode}): {proc.stderr[-2000:]}")
  return {"kind": "memory", **json.loads(proc.stdout.strip().splitlines()[-1])}
