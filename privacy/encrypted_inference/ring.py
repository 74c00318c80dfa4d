"""Fixed-point numbers in the ring Z_2^64, and two-party additive secret sharing.

A real number v is stored as the ring element round(v * 2^FRAC_BITS) mod 2^64
(two's complement: the top bit is the sign), so the resolution is 2^-12 ~ 2.4e-4
and the range |v| < 2^51. uint64 arithmetic wraps mod 2^64 natively; the project
runs with `jax_enable_x64` off, so every function here must run inside `x64()`.

Bilinear maps (convolutions, matmuls) of ring elements run in float64 on 16-bit limbs
(`bilinear`, the CryptGPU approach of Tan et al., S&P 2021) where uint64 has no kernel:
XLA:GPU has no uint64 convolution, cuDNN and cuBLAS run float64 ones (network.use_limbs
picks per backend and layer kind).

A shared value is one array `[2, ...]` uint64: `s[0]` is party 0's share (the
hospital), `s[1]` party 1's (the model owner); the value is `s[0] + s[1]` mod 2^64.
One share alone is a uniform ring element, independent of the value.

Truncation after a product (two fixed-point factors carry 2 * FRAC_BITS fraction
bits) is the local two-party truncation of SecureML (Mohassel & Zhang 2017, Thm 1):
party 0 shifts its share, party 1 negates, shifts and negates (floor plus ceiling).
No message. The result is within one ulp (2^-12) of the exact quotient, except with probability
at most 2^(k + 1 - 64) for a value |x| < 2^k in ring units, when it is wrong by
about 2^64 / 2^bits (garbage). For a product of two fixed-point numbers with true
value |v| (k = 24 + log2 |v|) that is |v| * 2^-39: 1.8e-12 at |v| = 1, 2^-31 at
|v| = 256.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

RING_BITS = 64
FRAC_BITS = 12
SCALE = 1 << FRAC_BITS
BYTES = RING_BITS // 8  # one ring element on the wire
DTYPE = jnp.uint64

x64 = functools.partial(jax.enable_x64, True)  # `with x64(): ...` around ring code


def encode(values, frac_bits: int = FRAC_BITS) -> jax.Array:
  """Real numbers -> ring elements, round(v * 2^frac_bits) mod 2^64."""
  scaled = jnp.round(jnp.asarray(values, jnp.float64) * (1 << frac_bits))
  return scaled.astype(jnp.int64).astype(DTYPE)


def decode(ring: jax.Array, frac_bits: int = FRAC_BITS) -> jax.Array:
  """Ring elements -> float64 reals (two's complement, divided by 2^frac_bits)."""
  return ring.astype(jnp.int64).astype(jnp.float64) / (1 << frac_bits)


def random_ring(key: jax.Array, shape) -> jax.Array:
  """Uniform ring elements `shape` (jax.random bits)."""
  return jax.random.bits(key, tuple(shape), DTYPE)


def share(key: jax.Array, value: jax.Array) -> jax.Array:
  """`[2, ...]` additive shares of ring elements `value`: (value - r, r), r uniform."""
  r = random_ring(key, value.shape)
  return jnp.stack([value - r, r])


def reconstruct(shares: jax.Array) -> jax.Array:
  """The shared ring elements, `shares[0] + shares[1]` mod 2^64."""
  return shares[0] + shares[1]


@functools.partial(jax.jit, static_argnums=1)
def truncate(shares: jax.Array, bits: int = FRAC_BITS) -> jax.Array:
  """Shares of the value divided by 2^bits (SecureML local truncation; module doc)."""
  shift = np.uint64(bits)
  return jnp.stack([shares[0] >> shift, -((-shares[1]) >> shift)])


def add_public(shares: jax.Array, value: jax.Array) -> jax.Array:
  """Shares of x + c for a public ring element c (party 0 adds it)."""
  return shares.at[0].add(value)


def public_scalar(value: float, frac_bits: int = FRAC_BITS) -> np.uint64:
  """A public real constant as a ring scalar (numpy, usable in jitted code)."""
  return np.int64(round(value * (1 << frac_bits))).astype(np.uint64)


def mul_public(shares: jax.Array, value: float) -> jax.Array:
  """Shares of x * c for a public real c, truncated back to FRAC_BITS (local)."""
  return truncate(shares * public_scalar(value))


def divide_public(shares: jax.Array, n: int, drop_bits: int = 0) -> jax.Array:
  """Shares of x / n / 2^drop_bits for a public integer n >= 1 (local): x >> (floor(log2 n)
  + drop_bits), then times 2^floor(log2 n) / n in (1/2, 1]. Error <= 2 ulp + |x / n|
  2^-12 (a product by 1/n encoded directly would lose all precision for n > 2^12)."""
  shift = int(n).bit_length() - 1
  x = truncate(shares, shift + drop_bits) if shift + drop_bits else shares
  return mul_public(x, 2.0**shift / n)


# Limbs: a ring element is sum_i x_i 2^(16 i), x_i < 2^16. op(x, w) mod 2^64 is the sum over
# the 10 limb pairs with i + j < 4 (the others vanish mod 2^64) of op(x_i, w_j) 2^(16 (i + j)),
# each limb product < 2^32. Pairs with the same i + j = s are one float64 op on limbs
# concatenated along the contracted axis: at most 4 K products < 2^32 summed, exact while
# 4 K (2^16 - 1)^2 <= 2^53, K the reduction length per output (MAX_REDUCTION = 524,304).
LIMB_BITS = 16
LIMBS = RING_BITS // LIMB_BITS
LIMB_MASK = np.uint64((1 << LIMB_BITS) - 1)
MAX_REDUCTION = 2**53 // (LIMBS * ((1 << LIMB_BITS) - 1)**2)


def bilinear(op, x: jax.Array, w: jax.Array) -> jax.Array:
  """op(x, w) mod 2^64 for uint64 x, w, bit-identical to op on uint64, in float64.

  `op` is bilinear and contracts x's last axis with w's axis -2 (an HWIO convolution,
  a dense `[in, out]` kernel). 4 float64 ops, one per limb weight 2^(16 s), s < 4.
  """
  reduction = w.size // w.shape[-1]
  if reduction > MAX_REDUCTION:
    raise ValueError(f"reduction length {reduction} > {MAX_REDUCTION}: float64 limb "
                     "products would not be exact")
  limbs = lambda v: [((v >> np.uint64(LIMB_BITS * i)) & LIMB_MASK).astype(jnp.float64)
                     for i in range(LIMBS)]
  xs, ws = limbs(x), limbs(w)
  out = 0
  for s in range(LIMBS):
    part = op(jnp.concatenate(xs[:s + 1], -1), jnp.concatenate(ws[s::-1], -2))
    out = out + (part.astype(jnp.int64).astype(DTYPE) << np.uint64(LIMB_BITS * s))
  return out
