"""Fixed-point encoding of float vectors into the ring Z_(2^b), b <= 32.

Secure aggregation sums integers modulo 2^b, so each hospital's float update is scaled,
stochastically rounded to an integer (unbiased: E[q] = x * scale) and reduced mod 2^b into a
uint32 whose wrap-around arithmetic is the ring's (2^b divides 2^32). The server decodes the
modular sum to the centred interval [-2^(b-1), 2^(b-1)), which equals the true integer sum
exactly unless that sum leaves the interval; `overflow_count` says how many coordinates did,
computed exactly from the quantised plaintext (for the report, never sent to the server).

Per coordinate and per hospital, rounding moves a value by less than 1/scale, so a decoded sum
of n hospitals is within n/scale of the float sum when nothing overflows.

`rotate` / `unrotate` apply a randomised Hadamard transform H D / sqrt(D) (random signs D from
a key shared by all hospitals in a round, padding to a power of two): it is orthogonal and
linear, so the sum of rotations is the rotation of the sum, and it flattens spiky updates so a
smaller b suffices.

Example:

  >>> import jax, jax.numpy as jnp
  >>> x = jnp.array([[0.5, -1.25], [0.25, 2.0]])
  >>> keys = jax.random.split(jax.random.key(0), 2)
  >>> q = jax.vmap(lambda k, v: encode(k, v, scale=4.0, bits=16))(keys, x)
  >>> decode(jnp.sum(q, axis=0, dtype=jnp.uint32), scale=4.0, bits=16).tolist()
  [0.75, 0.75]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Largest float32 below 2^31: quantised values are saturated here before the int32 cast.
_INT32_SAFE = float(2**31 - 128)


def check_bits(bits: int) -> None:
  """Validates the ring size outside jit.

  Raises:
    ValueError: if bits is not an int in [1, 32].
  """
  if not isinstance(bits, int) or not 1 <= bits <= 32:
    raise ValueError(f"bits={bits!r} must be an int in [1, 32]")


def ring_mask(bits: int) -> jax.Array:
  """2^bits - 1 as a uint32: `v & ring_mask(bits)` reduces a uint32 modulo 2^bits."""
  check_bits(bits)
  return jnp.uint32((1 << bits) - 1)


def quantize(key: jax.Array, x: jax.Array, *, scale: float) -> jax.Array:
  """Stochastically rounds `x * scale` to signed integers, unbiased.

  q = floor(y) + Bernoulli(y - floor(y)), so E[q] = y and |q - y| < 1. Values beyond the int32
  range are saturated (no ring of b <= 32 bits could hold them anyway; they count as overflow).

  Args:
    key: PRNG key for the rounding (one per hospital: rounding noise must be independent).
    x: float array, any shape, e.g. `[d]`.
    scale: quantisation levels per unit (resolution 1/scale).

  Returns:
    int32 array of x's shape.
  """
  y = jnp.clip(jnp.asarray(x, jnp.float32) * scale, -_INT32_SAFE, _INT32_SAFE)
  low = jnp.floor(y)
  up = jax.random.uniform(key, y.shape, jnp.float32) < (y - low)
  return low.astype(jnp.int32) + up.astype(jnp.int32)


def to_ring(q: jax.Array, *, bits: int) -> jax.Array:
  """Signed integers -> their residues mod 2^bits, as uint32 (two's complement, then mask)."""
  return jax.lax.bitcast_convert_type(q.astype(jnp.int32), jnp.uint32) & ring_mask(bits)


def encode(key: jax.Array, x: jax.Array, *, scale: float, bits: int) -> jax.Array:
  """One hospital's float update -> Z_(2^bits), by unbiased stochastic rounding.

  Args:
    key: PRNG key for the rounding.
    x: float array, e.g. `[d]`; vmap (with split keys) for `[hospitals, d]`.
    scale: quantisation levels per unit.
    bits: ring size b in [1, 32].

  Returns:
    uint32 array of x's shape, entries in [0, 2^bits).
  """
  return to_ring(quantize(key, x, scale=scale), bits=bits)


def decode(total: jax.Array, *, scale: float, bits: int) -> jax.Array:
  """A modular sum in Z_(2^bits) -> floats, read in the centred interval [-2^(b-1), 2^(b-1)).

  The residue is sign-extended from bit b-1 (shift left to the top of 32 bits, reinterpret as
  int32, arithmetic shift back), which is exact when the true integer sum lies in that interval.
  No offset is added at encoding, so the number of hospitals is not needed here.

  Args:
    total: uint32 array, e.g. `[d]`: the sum of encoded updates (any representative mod 2^b).
    scale: the encoding's scale.
    bits: the encoding's ring size.

  Returns:
    float32 array of total's shape.
  """
  shift = jnp.uint32(32 - bits)
  top = jnp.left_shift(total.astype(jnp.uint32) & ring_mask(bits), shift)
  signed = jnp.right_shift(jax.lax.bitcast_convert_type(top, jnp.int32), shift.astype(jnp.int32))
  return signed.astype(jnp.float32) / scale


def overflow_count(q: jax.Array, *, bits: int) -> jax.Array:
  """Coordinates whose true integer sum over hospitals leaves [-2^(b-1), 2^(b-1)).

  Computed exactly from the quantised plaintexts (the emulation holds them; the server would
  not), for the run's report: each counted coordinate decodes wrongly by a multiple of 2^b.

  Args:
    q: int32 `[hospitals, d]` from `quantize`, hospitals < 2^15.
    bits: ring size b in [1, 32].

  Returns:
    int32 scalar count.
  """
  return overflow_from_parts(*exact_sum_parts(q), bits=bits)


def exact_sum_parts(q: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Additive parts of the exact sum over axis 0 of int32 `[n, ...]`: (sum of q >> 16, sum of
  q & 0xFFFF). Parts of disjoint groups add up (chunks of a round) while the total count of
  hospitals stays below 2^15; `overflow_from_parts` reads them."""
  return (jnp.sum(jnp.right_shift(q, 16), axis=0, dtype=jnp.int32),
          jnp.sum(q & 0xFFFF, axis=0, dtype=jnp.int32))


def overflow_from_parts(high: jax.Array, low: jax.Array, *, bits: int) -> jax.Array:
  """`overflow_count` from summed `exact_sum_parts` (low need not be below 2^16)."""
  check_bits(bits)
  high, low = high + jnp.right_shift(low, 16), low & 0xFFFF
  # -2^(b-1) = lo_h * 2^16 + lo_l and 2^(b-1) = hi_h * 2^16 + hi_l, with 0 <= *_l < 2^16.
  lo_h, lo_l = (-(1 << (bits - 1))) >> 16, (-(1 << (bits - 1))) & 0xFFFF
  hi_h, hi_l = (1 << (bits - 1)) >> 16, (1 << (bits - 1)) & 0xFFFF
  below = (high < lo_h) | ((high == lo_h) & (low < lo_l))
  above = (high > hi_h) | ((high == hi_h) & (low >= hi_l))
  return jnp.sum(below | above, dtype=jnp.int32)


def padded_size(d: int) -> int:
  """The power of two >= d that the Hadamard rotation works in."""
  return 1 << max(d - 1, 0).bit_length()


def _hadamard(x: jax.Array) -> jax.Array:
  """Orthonormal fast Walsh-Hadamard transform over the last axis `[..., D]`, D a power of 2."""
  size = x.shape[-1]
  h = 1
  while h < size:
    y = x.reshape(*x.shape[:-1], size // (2 * h), 2, h)
    a, b = y[..., 0, :], y[..., 1, :]
    x = jnp.stack([a + b, a - b], axis=-2).reshape(*x.shape[:-1], size)
    h *= 2
  return x / jnp.sqrt(jnp.float32(size))


def _signs(key: jax.Array, size: int) -> jax.Array:
  return jnp.where(jax.random.bernoulli(key, 0.5, (size,)), 1.0, -1.0).astype(jnp.float32)


def rotate(key: jax.Array, x: jax.Array) -> jax.Array:
  """Randomised Hadamard rotation H D x / sqrt(D) after zero-padding to a power of two.

  Args:
    key: the round's rotation key, the same for every hospital (so rotations sum linearly).
    x: float `[..., d]`.

  Returns:
    float32 `[..., padded_size(d)]`, same Euclidean norm as x over the last axis.
  """
  x = jnp.asarray(x, jnp.float32)
  size = padded_size(x.shape[-1])
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])
  return _hadamard(x * _signs(key, size))


def unrotate(key: jax.Array, y: jax.Array, d: int) -> jax.Array:
  """Inverse of `rotate`: D H y / sqrt(D), truncated to the original `d` coordinates.

  Args:
    key: the key given to `rotate`.
    y: float `[..., D]`, D a power of two (a rotated vector or a sum of them).
    d: the length before padding.

  Returns:
    float32 `[..., d]`.
  """
  y = jnp.asarray(y, jnp.float32)
  return (_hadamard(y) * _signs(key, y.shape[-1]))[..., :d]
