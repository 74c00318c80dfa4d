"""GroupNorm on shares: group means, a secure inverse square root, the affine map.

y = (x - mean) * rsqrt(var + eps) * scale + bias over groups of channels, as
flax.linen.GroupNorm (eps = 1e-6, below the variance's resolution 2^-18: a zero
variance gives an output equal to the bias, see `inverse_sqrt`).

The variance is the exact ring sum of the products (x - mean)^2 (24 fraction bits),
truncated once to VAR_BITS = 18 fraction bits and divided by the group size: the
small variances of nearly constant groups keep their precision, and the truncation
fails no more often than per-product truncation would (|sum| 2^-39).

`inverse_sqrt` takes v >= 0 with `frac_bits` fraction bits, v < 2^19:
1. the exponent k of v in ring units, 2^k <= v < 2^(k+1): v is compared with every
   2^k at once (64-bit comparisons, exact; on `[images, groups]` values only) and the
   one-hot e_k taken from consecutive comparison bits (local);
2. the mantissa m = v 2^(12 - k) in [1, 2) (products of e_k with public shifts of v,
   exact), y0 = 1.265 - 0.287 m (relative error <= 2.3%), then two Newton steps
   y <- y (3 - m y^2) / 2 (relative error 1.3e-3, then 3e-6, in exact arithmetic);
3. the scale 2^((frac_bits - k) / 2) selected by e_k (public constants, local), kept
   with EXTRA_BITS more fraction bits, times y.

Error: ~1e-3 relative from the mantissa's fixed point, plus |x - mean| 2^-16 + 2 ulp
from the product scale * rsqrt kept with 12 + EXTRA_BITS fraction bits (measured in
tests/privacy/test_encrypted_inference.py). The final product's truncation by
12 + EXTRA_BITS bits fails (garbage) with probability |y| 2^(EXTRA_BITS - 39) per
output, 2^-35 |y| for EXTRA_BITS = 4; the mantissa's truncation (only the selected
exponent's counts: the others are multiplied by an exact 0) with probability var 2^-45
per image and group.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from privacy.encrypted_inference import protocol, ring

EXTRA_BITS = 4
VAR_BITS = 18
VAR_RANGE = 2.0**19
INIT = (1.265, -0.287)  # y0 = a + b m on [1, 2): relative error <= 2.3%
NEWTON_STEPS = 2


def inverse_sqrt(ch, dealer, v: jax.Array, frac_bits: int = VAR_BITS) -> jax.Array:
  """Shares of 1/sqrt(v) with 12 + EXTRA_BITS fraction bits, v `[2, ...]` (module doc)."""
  exponents = np.arange(frac_bits + int(np.log2(VAR_RANGE)))
  powers = [ring.add_public(v, (-np.int64(2)**int(k)).astype(np.uint64))
            for k in (*exponents, exponents[-1] + 1)]
  below = protocol.less_than_zero(ch, dealer, jnp.stack(powers, 1))  # [v < 2^k], 64 bits
  one_hot = below[:, 1:] - below[:, :-1]  # [2, K, ...]: 2^k <= v < 2^(k+1)
  shifted = jnp.stack([_shift(v, ring.FRAC_BITS - int(k)) for k in exponents], 1)
  m = protocol.mul(ch, dealer, one_hot, shifted, fixed=False).sum(1)  # in [1, 2)
  y = ring.add_public(ring.mul_public(m, INIT[1]), ring.public_scalar(INIT[0]))
  for _ in range(NEWTON_STEPS):
    my2 = protocol.mul(ch, dealer, m, protocol.mul(ch, dealer, y, y))
    y = protocol.mul(ch, dealer, y, ring.add_public(ring.mul_public(my2, -0.5),
                                                    ring.public_scalar(1.5)))
  scales = 2.0**((frac_bits - exponents) / 2)  # 1 / sqrt(2^k ring units)
  table = ring.encode(scales.reshape((1, -1) + (1,) * (v.ndim - 1)),
                      ring.FRAC_BITS + EXTRA_BITS)
  return protocol.mul(ch, dealer, y, (one_hot * table).sum(1))


def _shift(v: jax.Array, bits: int) -> jax.Array:
  """v * 2^bits (local): a left shift of both shares, or a truncation for bits < 0."""
  return v << np.uint64(bits) if bits >= 0 else ring.truncate(v, -bits)


def group_norm(ch, dealer, x: jax.Array, scale: jax.Array, bias: jax.Array,
               groups: int) -> jax.Array:
  """GroupNorm of `[2, B, H, W, C]` with shared scale and bias `[2, C]` (module doc), in
  three pieces (dealer.piece): the statistics, `inverse_sqrt` (on `[2, B, G]`: one
  program for every layer) and the normalisation."""
  d, var = dealer.piece(ch, _statistics(groups), x)
  inv = dealer.piece(ch, inverse_sqrt, var)  # [2, B, G], 12 + EXTRA_BITS fraction bits
  return dealer.piece(ch, _normalize, d, inv, scale, bias)


@functools.lru_cache(maxsize=None)
def _statistics(groups: int):
  """The piece `fn(ch, dealer, x) -> (x - mean [2, B, H, W, G, C / G], variance [2, B, G])`
  of `groups` groups."""

  def fn(ch, dealer, x):
    _, b, h, w, c = x.shape
    n = h * w * (c // groups)
    xg = x.reshape(2, b, h, w, groups, c // groups)
    mean = ring.divide_public(xg.sum((2, 3, 5)), n)  # [2, B, G]
    d = xg - mean[:, :, None, None, :, None]
    squares = protocol.mul(ch, dealer, d, d, fixed=False).sum((2, 3, 5))  # 24 fraction bits
    return d, ring.divide_public(squares, n, 2 * ring.FRAC_BITS - VAR_BITS)

  return fn


def _normalize(ch, dealer, d, inv, scale, bias):
  """(x - mean) * inv * scale + bias `[2, B, H, W, C]` from `_statistics`' d."""
  _, b, h, w, groups, size = d.shape
  inv = jnp.repeat(inv, size, axis=2)  # [2, B, C]
  factor = protocol.mul(ch, dealer, inv, jnp.broadcast_to(scale[:, None], inv.shape))
  y = protocol.mul(ch, dealer, d.reshape(2, b, h, w, groups * size), factor[:, :, None, None],
                   fixed=False)
  return ring.truncate(y, ring.FRAC_BITS + EXTRA_BITS) + bias[:, None, None, None]
