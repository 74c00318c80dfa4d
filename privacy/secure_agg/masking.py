"""Pairwise and self masks (Bonawitz et al. 2017, section 4), vectorised over hospitals.

Each hospital i sends y_i = x_i + b_i + sum_{j != i} s_ij m_ij  (mod 2^b), where

* m_ij = m_ji is a pseudorandom vector from a pair seed derived with `jax.random.fold_in` from
  the round key and the ordered pair (min(i, j), max(i, j)) (in the protocol: a Diffie-Hellman
  agreed key), and s_ij = +1 if i < j, -1 if i > j, so pairs of survivors cancel in the sum;
* b_i is a self-mask from hospital i's own seed, which the server removes for survivors only
  (in the protocol it learns b_i from t Shamir shares; shares of a dropped hospital's pair keys
  are released instead, never both for the same hospital).

If hospitals drop before sending, the survivors' sum still holds s_ij m_ij for each survivor i
and dropped j; the server recomputes and removes them from the pair seeds (reconstructed from
Shamir shares in the protocol; derived directly here). One masked input alone is uniform on
the ring whatever the plaintext, since b_i is.

Example:

  >>> import jax, jax.numpy as jnp
  >>> x = jnp.array([[1, 2], [3, 4], [5, 6]], jnp.uint32)
  >>> key = jax.random.key(7)
  >>> y = mask(key, x, bits=8)
  >>> alive = jnp.array([True, False, True])
  >>> unmask(key, sum_survivors(y, alive, bits=8), alive, bits=8).tolist()
  [6, 8]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from privacy.secure_agg import encoding

_PAIR_DOMAIN, _SELF_DOMAIN = 0, 1


def mask_from_seed(seed: jax.Array, d: int, bits: int) -> jax.Array:
  """The pseudorandom vector a seed expands to: uint32 `[d]`, uniform on [0, 2^bits)."""
  return jax.random.bits(seed, (d,), jnp.uint32) & encoding.ring_mask(bits)


def pair_seed(round_key: jax.Array, i: jax.Array, j: jax.Array) -> jax.Array:
  """The seed of the pair {i, j}, the same from both ends: folds in (min(i, j), max(i, j))."""
  lo, hi = jnp.minimum(i, j), jnp.maximum(i, j)
  return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(round_key, _PAIR_DOMAIN), lo), hi)


def self_seed(round_key: jax.Array, i: jax.Array) -> jax.Array:
  """Hospital i's self-mask seed (the secret it Shamir-shares in the protocol)."""
  return jax.random.fold_in(jax.random.fold_in(round_key, _SELF_DOMAIN), i)


def pair_mask(round_key: jax.Array, i: jax.Array, j: jax.Array, d: int, bits: int) -> jax.Array:
  """m_ij = m_ji, uint32 `[d]` in [0, 2^bits)."""
  return mask_from_seed(pair_seed(round_key, i, j), d, bits)


def self_mask(round_key: jax.Array, i: jax.Array, d: int, bits: int) -> jax.Array:
  """b_i, uint32 `[d]` in [0, 2^bits)."""
  return mask_from_seed(self_seed(round_key, i), d, bits)


def signed_pair_sum(round_key: jax.Array, i: jax.Array, partners: jax.Array, d: int,
                    bits: int) -> jax.Array:
  """sum_j partners[j] * s_ij * m_ij mod 2^bits, for hospital i (s_ij = +1 if i < j else -1).

  Args:
    round_key: the round's key.
    i: int scalar, the hospital.
    partners: bool `[n]`, which pairs (i, j) to include; (i, i) is always left out.
    d: vector length.
    bits: ring size.

  Returns:
    uint32 `[d]`.
  """
  def add(total, j_keep):
    j, keep = j_keep
    m = pair_mask(round_key, i, j, d, bits)
    signed = jnp.where(i < j, m, jnp.uint32(0) - m)
    return total + jnp.where(keep & (j != i), signed, jnp.uint32(0)), None

  # A scan over partners keeps one [d] mask live at a time (a vmap would hold [n, d] per
  # hospital, [n, n, d] under `mask`'s vmap).
  j = jnp.arange(partners.shape[0])
  total, _ = jax.lax.scan(add, jnp.zeros((d,), jnp.uint32), (j, partners))
  return total & encoding.ring_mask(bits)


def mask(round_key: jax.Array, encoded: jax.Array, *, bits: int) -> jax.Array:
  """Every hospital's masked input y_i = x_i + b_i + sum_{j != i} s_ij m_ij (mod 2^bits).

  Args:
    round_key: the round's key (pair and self seeds derive from it).
    encoded: uint32 `[n, d]` in [0, 2^bits), from `encoding.encode`.
    bits: ring size.

  Returns:
    uint32 `[n, d]` in [0, 2^bits).
  """
  n, d = encoded.shape
  everyone = jnp.ones((n,), bool)

  def one(i, x):
    noise = self_mask(round_key, i, d, bits) + signed_pair_sum(round_key, i, everyone, d, bits)
    return (x + noise) & encoding.ring_mask(bits)

  return jax.vmap(one)(jnp.arange(n), encoded.astype(jnp.uint32))


def sum_survivors(masked: jax.Array, survivors: jax.Array, *, bits: int) -> jax.Array:
  """The server's modular sum of the inputs that arrived: uint32 `[d]` from `[n, d]`, `[n]`."""
  kept = jnp.where(survivors[:, None], masked, jnp.uint32(0))
  return jnp.sum(kept, axis=0, dtype=jnp.uint32) & encoding.ring_mask(bits)


def unmask(round_key: jax.Array, masked_sum: jax.Array, survivors: jax.Array, *,
           bits: int) -> jax.Array:
  """Removes the survivors' self-masks and their pair masks with dropped hospitals.

  masked_sum = sum_{i in S} x_i + sum_{i in S} b_i + sum_{i in S, j not in S} s_ij m_ij, the
  pairs inside S having cancelled; both remaining terms are recomputed from seeds and removed.

  Args:
    round_key: the round's key.
    masked_sum: uint32 `[d]`, `sum_survivors` of the masked inputs.
    survivors: bool `[n]`, hospitals whose input arrived.
    bits: ring size.

  Returns:
    uint32 `[d]`: sum_{i in S} x_i mod 2^bits.
  """
  d = masked_sum.shape[-1]
  dropped = ~survivors

  def one(i, alive):
    noise = self_mask(round_key, i, d, bits) + signed_pair_sum(round_key, i, dropped, d, bits)
    return jnp.where(alive, noise, jnp.uint32(0))

  noise = jax.vmap(one)(jnp.arange(survivors.shape[0]), survivors)
  return (masked_sum - jnp.sum(noise, axis=0, dtype=jnp.uint32)) & encoding.ring_mask(bits)
