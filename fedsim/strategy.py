"""Client-execution strategy per backend: chunk width, conv lowering, unrolling.

Chosen from measurement (benchmarks/round_throughput.py, numbers in the README):
on XLA:CPU (jax 0.10, 2 cores, workload W1) vmapping clients whose weights differ
makes convolutions batch poorly (per-client cost grows with the chunk) and a
rolled scan around convolution backward passes is several times slower than a
Python loop of calls, so each call runs one client with its local steps
unrolled. On a GPU (H200, jax 0.11, W1) the whole cohort is one call with native
convolutions, vmapped up to 1,000 clients at a time: at 100 hospitals the full vmap
was 1.4-5.3x faster than chunks of 1-10 and 2.8x faster than a Python loop; at
10,000 hospitals chunks of 1,000 scanned in one call were 1.1x faster than the full
vmap (and bound memory). TPU takes the GPU default, unmeasured. Every choice can be
overridden by `engine.*` config fields.

Ghost clipping (`ghost_rows`): on the CPU its passes run over blocks of 32 rows, one
after another (`privacy.ghost.record`; the same result): a block's per-example buffers
stay in cache. The default's private round (one process, median of 10): 0.92 s whole,
0.74 s in blocks of 32; blocks of 16 were a little faster still but the unrolled blocks
compile longer (the default's first five rounds: 16.4 s whole, 19.5 s in blocks of 64,
23.2 s of 32, 30.4 s of 16), which 16 rows repay only after ~80 rounds. GPUs take the
whole batch at once.

DP-SGD batches (`dp_gather`): a Poisson step keeps a random number of examples, so
a fixed-shape program computes on a gather sized for the largest step (the
truncation cap, or every patient slot), mostly padding. On the CPU ("bucketed")
each block's kept examples are counted first (the same draws, on the host) and the
block runs a program gathering the next size of a half-octave grid (recompiled
once per size: 96, 128, 192 rows cover the default run); on a GPU ("fixed") one
program for every block keeps the device busy without host round trips.
"""

from __future__ import annotations

import dataclasses

import jax

# backend -> (chunk: clients vmapped at once, block: clients per jitted call,
# conv, unroll, dp_gather, ghost_rows); 0 means "the whole cohort" / "the whole batch".
DEFAULTS = {
    "cpu": (1, 1, "xla", 0, "bucketed", 32),  # unroll 0: all local steps (a rolled loop is slow)
    "gpu": (1000, 0, "xla", 1, "fixed", 0),
    "tpu": (1000, 0, "xla", 1, "fixed", 0),
}
DP_GATHERS = ("auto", "fixed", "bucketed")


@dataclasses.dataclass(frozen=True)
class Strategy:
  chunk: int   # clients vmapped at once
  block: int   # clients per jitted call (a multiple of chunk)
  conv: str    # "xla" | "patches"
  unroll: int  # lax.scan unroll factor for local steps
  devices: int = 1  # devices the block's client axis is split over
  dp_gather: str = "fixed"  # "fixed" | "bucketed" (one device, one process)
  ghost_rows: int = 0  # ghost clipping's row blocks (0: the whole batch at once)


def resolve(engine_config, *, cohort_size: int, num_steps: int,
            backend: str | None = None, devices: int | None = None) -> Strategy:
  """The strategy for this backend, with `engine.*` overrides applied.

  Args:
    engine_config: the `engine` ConfigDict (client_chunk, conv, unroll; 0 or
      "auto" mean "choose").
    cohort_size: clients per round (expected size for Poisson cohorts).
    num_steps: local steps per client (bounds the unroll factor).
    backend: jax backend name; default `jax.default_backend()`.
    devices: devices to shard the client axis over (default: all local devices
      when `engine.shard_clients`); with more than one, a block is one vmapped
      chunk whose size is a multiple of the device count.
  """
  backend = backend or jax.default_backend()
  chunk, block, conv, unroll, dp_gather, ghost_rows = DEFAULTS.get(backend, DEFAULTS["gpu"])
  cohort_size = max(1, cohort_size)
  chunk = min(engine_config.client_chunk or chunk or cohort_size, cohort_size)
  block = min(engine_config.client_block or block or cohort_size, cohort_size)
  if not engine_config.client_chunk:  # a default width is a cap: split the block evenly
    chunk = -(-block // -(-block // chunk)) if block > chunk else chunk
  block = -(-max(block, chunk) // chunk) * chunk  # a multiple of chunk
  conv = conv if engine_config.conv == "auto" else engine_config.conv
  unroll = min(engine_config.unroll or unroll or num_steps, max(1, num_steps))
  if devices is None:
    devices = jax.local_device_count() if engine_config.shard_clients else 1
  if devices > 1:  # one vmapped chunk per block, split evenly over the devices
    chunk = block = -(-max(block, devices) // devices) * devices
  dp_gather = dp_gather if engine_config.dp_gather == "auto" else engine_config.dp_gather
  # .get: a run recorded before the field (attack.workdir) has no engine.ghost_rows
  ghost_rows = engine_config.get("ghost_rows", 0) or ghost_rows
  if devices > 1 or jax.process_count() > 1:  # every device must run the same program
    dp_gather = "fixed"
  return Strategy(chunk=chunk, block=block, conv=conv, unroll=unroll, devices=devices,
                  dp_gather=dp_gather, ghost_rows=ghost_rows)
