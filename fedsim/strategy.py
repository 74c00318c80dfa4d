"""Client-execution strategy per backend: chunk width, conv lowering, unrolling.

Chosen from measurement (benchmarks/round_throughput.py, numbers in the README):
on XLA:CPU, vmapping clients whose weights differ makes convolutions batch
poorly and a rolled scan around convolution backward passes is slow, so clients
run a few at a time in-graph with convolutions as patches + einsum and local steps
unrolled; on GPU/TPU the whole block is vmapped with native convolutions. Every
choice can be overridden by `engine.*` config fields.
"""

from __future__ import annotations

import dataclasses

import jax

# backend -> (chunk: clients vmapped at once, 0 = whole block; conv; unroll)
DEFAULTS = {
    "cpu": (1, "patches", 8),
    "gpu": (0, "xla", 1),
    "tpu": (0, "xla", 1),
}


@dataclasses.dataclass(frozen=True)
class Strategy:
  chunk: int   # clients vmapped at once
  block: int   # clients per jitted call (a multiple of chunk)
  conv: str    # "xla" | "patches"
  unroll: int  # lax.scan unroll factor for local steps


def resolve(engine_config, *, cohort_size: int, num_steps: int,
            backend: str | None = None) -> Strategy:
  """The strategy for this backend, with `engine.*` overrides applied.

  Args:
    engine_config: the `engine` ConfigDict (client_chunk, conv, unroll; 0 or
      "auto" mean "choose").
    cohort_size: clients per round (expected size for Poisson cohorts).
    num_steps: local steps per client (bounds the unroll factor).
    backend: jax backend name; default `jax.default_backend()`.
  """
  backend = backend or jax.default_backend()
  chunk, conv, unroll = DEFAULTS.get(backend, DEFAULTS["gpu"])
  cohort_size = max(1, cohort_size)
  chunk = engine_config.client_chunk or chunk or cohort_size
  chunk = min(chunk, cohort_size)
  block = -(-cohort_size // chunk) * chunk
  conv = conv if engine_config.conv == "auto" else engine_config.conv
  unroll = min(engine_config.unroll or unroll, max(1, num_steps))
  return Strategy(chunk=chunk, block=block, conv=conv, unroll=unroll)
