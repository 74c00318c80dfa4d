"""Shamir sharing over GF(2^31 - 1): field arithmetic, t-of-n reconstruction, t-1 secrecy."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from privacy.secure_agg import shamir

P = shamir.PRIME
EDGES = [0, 1, 2, 3, 2**15, 2**16 - 1, 2**16, 2**30, P - 2, P - 1]


def test_field_arithmetic_matches_python_ints():
  rng = np.random.default_rng(0)
  a = np.concatenate([np.repeat(EDGES, len(EDGES)), rng.integers(0, P, 20_000)])
  b = np.concatenate([np.tile(EDGES, len(EDGES)), rng.integers(0, P, 20_000)])
  ja, jb = jnp.asarray(a, jnp.uint32), jnp.asarray(b, jnp.uint32)
  pa, pb = [int(v) for v in a], [int(v) for v in b]
  assert np.asarray(shamir.mul_mod(ja, jb)).tolist() == [u * v % P for u, v in zip(pa, pb)]
  assert np.asarray(shamir.add_mod(ja, jb)).tolist() == [(u + v) % P for u, v in zip(pa, pb)]
  assert np.asarray(shamir.sub_mod(ja, jb)).tolist() == [(u - v) % P for u, v in zip(pa, pb)]
  nonzero = ja[ja != 0]
  assert np.all(np.asarray(shamir.mul_mod(nonzero, shamir.inv_mod(nonzero))) == 1)
  assert np.asarray(shamir.pow_mod(ja[:50], 5)).tolist() == [pow(u, 5, P) for u in pa[:50]]


def test_hand_worked_lagrange():
  # f(x) = 5 + 3x: f(1) = 8, f(2) = 11.  g(x) = 1 - x = 1 + (p - 1) x: g(1) = 0, g(2) = p - 1.
  shares = jnp.array([[8, 0], [11, P - 1]], jnp.uint32)
  assert shamir.reconstruct(jnp.array([1, 2]), shares).tolist() == [5, 1]
  # Order of the points does not matter.
  assert shamir.reconstruct(jnp.array([2, 1]), shares[::-1]).tolist() == [5, 1]


def test_threshold_one_gives_the_secret_to_everyone():
  secrets = jnp.array([0, 9, P - 1], jnp.uint32)
  shares = shamir.share(jax.random.key(1), secrets, n=4, t=1)
  np.testing.assert_array_equal(shares, jnp.tile(secrets, (4, 1)))


@pytest.mark.parametrize("n,t", [(5, 3), (4, 4), (6, 2)])
def test_any_t_or_more_shares_reconstruct_exactly(n, t):
  rng = np.random.default_rng(n * 10 + t)
  secrets = jnp.asarray(np.concatenate([[0, 1, P - 1], rng.integers(0, P, 47)]), jnp.uint32)
  shares = shamir.share(jax.random.key(2), secrets, n=n, t=t)
  assert shares.shape == (n, 50) and int(jnp.max(shares)) < P
  rebuild = jax.jit(shamir.reconstruct)  # one compile per subset size, not per subset
  for k in range(t, n + 1):
    for subset in itertools.combinations(range(n), k):
      idx = jnp.array(subset)
      np.testing.assert_array_equal(rebuild(idx + 1, shares[idx]), secrets)


def test_fewer_than_t_shares_do_not_reconstruct():
  # Each of 2,000 secrets equals its t-1 interpolation with probability 1/p: union bound
  # 2000 / (2^31 - 1) < 1e-6 of a false failure (fixed seeds: deterministic once it passes).
  n, t, m = 5, 3, 2000
  secrets = jnp.asarray(np.random.default_rng(3).integers(0, P, m), jnp.uint32)
  shares = shamir.share(jax.random.key(4), secrets, n=n, t=t)
  for subset in itertools.combinations(range(n), t - 1):
    idx = jnp.array(subset)
    assert not np.any(np.asarray(shamir.reconstruct(idx + 1, shares[idx]) == secrets))


def test_t_minus_one_shares_are_independent_of_the_secret():
  """Shares at t-1 = 2 points, for secret 0 and secret p-1, look alike and uniform.

  Chi-square on the top 4 bits of each share (31-bit residues) over 2^14 sharings; each test
  rejects at 1e-6 (false failure < 1e-5 in all).
  """
  n, t, m = 4, 3, 2**14
  threshold = scipy.stats.chi2.ppf(1 - 1e-6, df=15)
  hists = []
  for secret, seed in ((0, 5), (P - 1, 6)):
    shares = shamir.share(jax.random.key(seed), jnp.full((m,), secret, jnp.uint32), n=n, t=t)
    for row in (0, 2):  # the parties at x = 1 and x = 3
      h = np.bincount(np.asarray(shares[row]) >> 27, minlength=16)
      assert np.sum((h - m / 16) ** 2 / (m / 16)) < threshold, h
      hists.append(h)
  assert scipy.stats.chi2_contingency(np.stack(hists))[1] > 1e-6
  # The t-1 point interpolation is uniform too, not concentrated on the secret.
  guess = shamir.reconstruct(jnp.array([1, 3]), shares[jnp.array([0, 2])])
  h = np.bincount(np.asarray(guess) >> 27, minlength=16)
  assert np.sum((h - m / 16) ** 2 / (m / 16)) < threshold, h


@pytest.mark.parametrize("n,t", [(3, 0), (3, 4), (0, 0)])
def test_bad_thresholds_are_refused(n, t):
  with pytest.raises(ValueError, match="must satisfy 1 <= t <= n"):
    shamir.share(jax.random.key(0), jnp.zeros(2, jnp.uint32), n=n, t=t)


def test_jit_agrees_with_eager():
  secrets = jnp.array([5, 77, P - 3], jnp.uint32)
  key = jax.random.key(7)
  shares = shamir.share(key, secrets, n=5, t=3)
  np.testing.assert_array_equal(
      jax.jit(shamir.share, static_argnames=("n", "t"))(key, secrets, n=5, t=3), shares)
  idx = jnp.array([4, 0, 2])
  np.testing.assert_array_equal(jax.jit(shamir.reconstruct)(idx + 1, shares[idx]), secrets)


def test_a_self_mask_seed_survives_sharing_and_gives_the_same_mask():
  """The protocol's use: hospital 3 shares its self-mask seed; any 3 of 5 parties rebuild it."""
  from privacy.secure_agg import protocol

  seed = jax.random.fold_in(jax.random.key(8), 3)
  words = jax.random.key_data(seed)
  secrets = shamir.words_to_field(words)
  assert int(jnp.max(secrets)) < 2**16
  np.testing.assert_array_equal(shamir.field_to_words(secrets), words)
  shares = shamir.share(jax.random.key(9), secrets, n=5, t=3)
  idx = jnp.array([0, 2, 4])
  rebuilt = jax.random.wrap_key_data(shamir.field_to_words(shamir.reconstruct(idx + 1,
                                                                              shares[idx])))
  np.testing.assert_array_equal(protocol.mask_from_seed(rebuilt, 64, 32),
                                protocol.mask_from_seed(seed, 64, 32))
