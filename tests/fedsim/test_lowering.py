"""The unrolled threefry lowering on XLA:CPU: no loop in the program, the same bits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.random import threefry2x32

from fedsim import lowering


def test_threefry_is_unrolled_on_cpu_and_draws_the_same_bits():
  assert lowering.unroll_threefry_on_cpu()
  key = jax.random.key(7)
  text = jax.jit(lambda k: jax.random.normal(k, (1001,))).lower(key).as_text()
  assert "while" not in text

  words = jax.random.bits(jax.random.key(3), (4, 257), jnp.uint32)
  k1, k2, x1, x2 = words
  unrolled = jax.jit(lambda *a: threefry2x32.threefry2x32_p.bind(*a))(k1, k2, x1, x2)
  rolled_fn = functools.partial(threefry2x32._threefry2x32_lowering, use_rolled_loops=True)
  rolled = jax.jit(rolled_fn)(k1, k2, x1, x2)
  assert "while" in jax.jit(rolled_fn).lower(k1, k2, x1, x2).as_text()
  for a, b in zip(unrolled, rolled):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
