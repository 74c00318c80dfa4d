"""Shamir t-of-n secret sharing over GF(p), p = 2^31 - 1, vectorised over secrets.

In secure aggregation each hospital shares its self-mask seed and its pair-key secret so that
any t survivors let the server remove what dropouts left behind, while fewer than t learn
nothing: the shares of t - 1 points of a random degree t-1 polynomial are uniform whatever
its constant term (the secret).

JAX runs without 64-bit types here, so field arithmetic is in uint32: a product of two residues
is split into 16-bit halves and folded with 2^31 = 1 (mod p), which is exact. Inverses use
Fermat (a^(p-2)). Shares are the polynomial's values at x = 1..n.

Example:

  >>> import jax, jax.numpy as jnp
  >>> s = share(jax.random.key(0), jnp.array([42, 7], jnp.uint32), n=5, t=3)
  >>> reconstruct(jnp.array([5, 2, 4]), s[jnp.array([4, 1, 3])]).tolist()
  [42, 7]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PRIME = 2**31 - 1
_P = jnp.uint32(PRIME)


def _reduce(v: jax.Array) -> jax.Array:
  """v mod p for uint32 v (< 2^32): fold bit 31 (2^31 = 1 mod p), then one conditional subtract."""
  v = (v & _P) + jnp.right_shift(v, jnp.uint32(31))
  return jnp.where(v >= _P, v - _P, v)


def add_mod(a: jax.Array, b: jax.Array) -> jax.Array:
  """(a + b) mod p for residues a, b < p (their uint32 sum cannot wrap)."""
  return _reduce(a + b)


def sub_mod(a: jax.Array, b: jax.Array) -> jax.Array:
  """(a - b) mod p for residues a, b < p."""
  return _reduce(a + (_P - b))


def mul_mod(a: jax.Array, b: jax.Array) -> jax.Array:
  """(a * b) mod p for residues a, b < p, exactly, in uint32.

  With a = ah 2^16 + al and b likewise (ah, bh < 2^15): a b = hh 2^32 + mid 2^16 + ll, where
  2^32 = 2 (mod p) and mid 2^16 = (mid >> 15) 2^31 + (mid & 0x7FFF) 2^16 = (mid >> 15) +
  (mid & 0x7FFF) 2^16 (mod p). Every partial product fits in uint32.
  """
  a, b = a.astype(jnp.uint32), b.astype(jnp.uint32)
  s16, m16 = jnp.uint32(16), jnp.uint32(0xFFFF)
  ah, al, bh, bl = jnp.right_shift(a, s16), a & m16, jnp.right_shift(b, s16), b & m16
  hh, mid, ll = ah * bh, ah * bl + al * bh, al * bl
  mid_part = add_mod(jnp.right_shift(mid, jnp.uint32(15)),
                     jnp.left_shift(mid & jnp.uint32(0x7FFF), s16))
  return add_mod(add_mod(_reduce(hh * jnp.uint32(2)), mid_part), _reduce(ll))


def pow_mod(a: jax.Array, exponent: int) -> jax.Array:
  """a^exponent mod p by square-and-multiply, scanned over the exponent's (static) bits."""
  bits = jnp.array([(exponent >> b) & 1 for b in reversed(range(exponent.bit_length()))], bool)
  base = a.astype(jnp.uint32)

  def step(result, bit):
    result = mul_mod(result, result)
    return jnp.where(bit, mul_mod(result, base), result), None

  result, _ = jax.lax.scan(step, jnp.ones_like(base), bits)
  return result


def inv_mod(a: jax.Array) -> jax.Array:
  """a^-1 mod p for nonzero residues (Fermat); 0 maps to 0."""
  return pow_mod(a, PRIME - 2)


def check_threshold(n: int, t: int) -> None:
  """Raises ValueError unless 1 <= t <= n < p."""
  if not 1 <= t <= n < PRIME:
    raise ValueError(f"threshold t={t} and parties n={n} must satisfy 1 <= t <= n < 2^31 - 1")


def share(key: jax.Array, secrets: jax.Array, *, n: int, t: int) -> jax.Array:
  """Splits each secret into n shares, any t of which reconstruct it.

  Args:
    key: PRNG key for the polynomials' random coefficients (fresh per sharing).
    secrets: uint32 `[m]`, residues in [0, p).
    n: number of shares (parties), at x = 1..n.
    t: threshold (polynomials of degree t - 1).

  Returns:
    uint32 `[n, m]`: row k holds the shares for party x = k + 1.
  """
  check_threshold(n, t)
  coeffs = jax.random.randint(key, (t - 1, secrets.shape[0]), 0, PRIME, jnp.int32)
  return _evaluate(secrets, coeffs.astype(jnp.uint32), n)


def share_traced(key: jax.Array, secrets: jax.Array, *, n: int, t: jax.Array) -> jax.Array:
  """`share` with a traced threshold 1 <= t <= n (one compilation for every t).

  Draws n - 1 coefficients and zeroes those of degree >= t, so the polynomial has degree
  t - 1 as in `share`.
  """
  check_threshold(n, 1)
  coeffs = jax.random.randint(key, (n - 1, secrets.shape[0]), 0, PRIME, jnp.int32)
  degree = jnp.arange(1, n)[:, None]
  return _evaluate(secrets, jnp.where(degree < t, coeffs.astype(jnp.uint32), jnp.uint32(0)), n)


def _evaluate(secrets: jax.Array, coeffs: jax.Array, n: int) -> jax.Array:
  """Values at x = 1..n of the polynomials secret + coeffs[0] x + ...: uint32 `[n, m]`."""
  coeffs = jnp.concatenate([secrets.astype(jnp.uint32)[None], coeffs])  # c_0 = secret
  xs = jnp.arange(1, n + 1, dtype=jnp.uint32)[:, None]  # [n, 1]

  def horner(acc, c):
    return add_mod(mul_mod(acc, xs), c[None]), None

  acc, _ = jax.lax.scan(horner, jnp.zeros((n, secrets.shape[0]), jnp.uint32), coeffs[::-1])
  return acc


def _prod_mod(v: jax.Array) -> jax.Array:
  """Product mod p over the last axis of `[..., k]`."""
  out, _ = jax.lax.scan(lambda acc, col: (mul_mod(acc, col), None),
                        jnp.ones(v.shape[:-1], jnp.uint32), jnp.moveaxis(v, -1, 0))
  return out


def reconstruct(xs: jax.Array, shares: jax.Array) -> jax.Array:
  """Lagrange interpolation at 0: the secrets from k shares at distinct points.

  With k >= t shares of a degree t-1 polynomial this is the secret; with fewer it is a value
  that does not depend on the secret (the shares carry no information about it).

  Args:
    xs: int `[k]`, the distinct nonzero points (party index + 1) the shares were taken at;
      distinctness is the caller's to ensure (a repeated point has no inverse).
    shares: uint32 `[k, m]`.

  Returns:
    uint32 `[m]` in [0, p).
  """
  return reconstruct_subset(xs, shares, jnp.ones(xs.shape, bool))


def reconstruct_subset(xs: jax.Array, shares: jax.Array, use: jax.Array) -> jax.Array:
  """`reconstruct` from the shares with `use[k]` only (bool `[k]`; fixed shapes, any subset)."""
  xs = xs.astype(jnp.uint32)
  skip = jnp.eye(xs.shape[0], dtype=bool) | ~use[None, :]
  one = jnp.uint32(1)
  # basis_k(0) = prod_{l != k, l used} x_l / (x_l - x_k)
  num = jnp.where(skip, one, xs[None, :])
  den = jnp.where(skip, one, sub_mod(xs[None, :], xs[:, None]))
  basis = mul_mod(_prod_mod(num), inv_mod(_prod_mod(den)))  # [k]
  terms = jnp.where(use[:, None], mul_mod(basis[:, None], shares.astype(jnp.uint32)),
                    jnp.uint32(0))  # [k, m]
  out, _ = jax.lax.scan(lambda acc, row: (add_mod(acc, row), None),
                        jnp.zeros(shares.shape[1:], jnp.uint32), terms)
  return out


def words_to_field(words: jax.Array) -> jax.Array:
  """uint32 `[k]` (e.g. `jax.random.key_data` of a seed) -> 16-bit limbs `[2k]`, each < p.

  A 32-bit word does not fit in GF(2^31 - 1), so seeds are shared limb by limb (high first).
  """
  words = words.astype(jnp.uint32)
  limbs = jnp.stack([jnp.right_shift(words, jnp.uint32(16)), words & jnp.uint32(0xFFFF)], -1)
  return limbs.reshape(*words.shape[:-1], -1)


def field_to_words(limbs: jax.Array) -> jax.Array:
  """Inverse of `words_to_field`: limbs `[2k]` -> uint32 words `[k]`."""
  pairs = limbs.astype(jnp.uint32).reshape(*limbs.shape[:-1], -1, 2)
  return jnp.left_shift(pairs[..., 0], jnp.uint32(16)) | pairs[..., 1]
