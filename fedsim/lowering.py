"""How the engine asks XLA to lower what jax leaves to the platform.

jax lowers its threefry hash (every `jax.random` draw) as a rolled loop of five rounds on
XLA:CPU, to keep programs small, and unrolled on GPUs and TPUs. Inside the engine's compiled
rounds the rolled loop cannot fuse with the arrays it fills, and DP-SGD draws a Gaussian per
parameter per local step: on the 2-core CPU, W1's private round (100 hospitals, 4 local
steps) took 1.03 s rolled and 0.97 s unrolled, the default's 0.97 s and 0.87 s (README,
"Performance"). The hash is the same, so the bits are the same: no run changes.
"""

from __future__ import annotations

import functools

from absl import logging


@functools.cache
def unroll_threefry_on_cpu() -> bool:
  """Lowers jax's threefry hash unrolled on XLA:CPU too (programs lowered from now on).

  Returns:
    Whether the rule is in place: False (logged) when this jax version lacks the
    internals it replaces, and jax's own lowering stays.
  """
  try:
    from jax._src.interpreters import mlir
    from jax._src.random import threefry2x32
    rule, primitive = threefry2x32._threefry2x32_lowering_rule, threefry2x32.threefry2x32_p
  except (ImportError, AttributeError) as error:
    logging.warning("threefry stays rolled on XLA:CPU (%s)", error)
    return False
  mlir.register_lowering(primitive, rule, platform="cpu")
  return True
