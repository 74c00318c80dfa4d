"""Pairwise and self masks: exact unmasked sums with and without dropouts, uniform inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from privacy.secure_agg import encoding, masking

# Chi-square tests below reject at 1e-6 each (false-failure probability, with the fixed seeds
# a deterministic pass once it passes).
_ALPHA = 1e-6


def _plaintext(seed, n, d, bits):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, 2**bits, size=(n, d), dtype=np.uint64).astype(np.uint32))


def _reference_sum(x, survivors, bits):
  keep = np.asarray(survivors)
  return (np.asarray(x, np.uint64)[keep].sum(0) % 2**bits).astype(np.uint32)


DROPOUTS = [
    [True] * 6,
    [True, False, True, True, True, True],
    [False, True, True, True, True, False],
    [True, False, False, True, False, True],
    [False, False, False, False, True, False],
]


@pytest.mark.parametrize("bits", [8, 20, 32])
@pytest.mark.parametrize("alive", DROPOUTS)
def test_unmasked_sum_equals_plaintext_sum_exactly(bits, alive):
  n, d = 6, 33
  x = _plaintext(bits, n, d, bits)
  survivors = jnp.array(alive)
  key = jax.random.key(1)
  y = masking.mask(key, x, bits=bits)
  assert int(jnp.max(y)) < 2**bits
  total = masking.unmask(key, masking.sum_survivors(y, survivors, bits=bits), survivors,
                         bits=bits)
  np.testing.assert_array_equal(total, _reference_sum(x, survivors, bits))
  # The masks were there: the raw sum is not the plaintext sum (each coordinate equal by
  # chance with probability 2^-bits; all 33 at once: never).
  raw = masking.sum_survivors(y, survivors, bits=bits)
  assert not np.array_equal(raw, _reference_sum(x, survivors, bits))


def test_dropout_correction_is_needed_and_the_round_key_matters():
  bits, n, d = 16, 6, 40
  x = _plaintext(2, n, d, bits)
  survivors = jnp.array(DROPOUTS[3])
  key = jax.random.key(3)
  masked_sum = masking.sum_survivors(masking.mask(key, x, bits=bits), survivors, bits=bits)
  expected = _reference_sum(x, survivors, bits)
  # Removing only the survivors' self-masks (as if nobody dropped) leaves pair masks behind.
  ignoring_dropouts = masking.unmask(key, masked_sum, jnp.ones(n, bool), bits=bits)
  assert not np.array_equal(ignoring_dropouts, expected)
  wrong_key = masking.unmask(jax.random.key(4), masked_sum, survivors, bits=bits)
  assert not np.array_equal(wrong_key, expected)


def test_pair_masks_cancel_over_all_hospitals():
  n, d, bits = 7, 25, 32
  key = jax.random.key(5)
  everyone = jnp.ones(n, bool)
  pair_sums = jax.vmap(lambda i: masking.signed_pair_sum(key, i, everyone, d, bits))(
      jnp.arange(n))
  assert np.all(np.asarray(pair_sums) != 0)  # each hospital's own pair noise is not zero
  np.testing.assert_array_equal(jnp.sum(pair_sums, axis=0, dtype=jnp.uint32), 0)
  # m_ij = m_ji, and distinct pairs have distinct masks.
  np.testing.assert_array_equal(masking.pair_mask(key, 2, 5, d, bits),
                                masking.pair_mask(key, 5, 2, d, bits))
  assert not np.array_equal(masking.pair_mask(key, 2, 5, d, bits),
                            masking.pair_mask(key, 2, 4, d, bits))


def _top_bits_histogram(values, bits, top=4):
  return np.bincount(np.asarray(values).ravel() >> (bits - top), minlength=2**top)


@pytest.mark.parametrize("n,bits", [(1, 32), (3, 32), (3, 8)])
def test_one_masked_input_is_uniform_and_independent_of_its_plaintext(n, bits):
  """Hospital 0's masked input for an all-zero plaintext and a spiky one, over 2^14 coords."""
  d = 2**14
  key = jax.random.key(6)
  zeros = jnp.zeros((n, d), jnp.uint32)
  spiky = jnp.full((n, d), 2**bits - 1, jnp.uint32).at[:, ::2].set(2 ** (bits - 1))
  hists = [_top_bits_histogram(masking.mask(key, x, bits=bits)[0], bits) for x in (zeros, spiky)]
  threshold = scipy.stats.chi2.ppf(1 - _ALPHA, df=15)
  for h in hists:
    stat = np.sum((h - d / 16) ** 2 / (d / 16))
    assert stat < threshold, h
  # Two-sample (2 x 16 contingency) test: the two plaintexts' masked inputs look alike.
  assert scipy.stats.chi2_contingency(np.stack(hists))[1] > _ALPHA
  # Without the masks the same statistic rejects at once (the test has power).
  plain = _top_bits_histogram(spiky[0], bits)
  assert np.sum((plain - d / 16) ** 2 / (d / 16)) > threshold


def test_jit_agrees_with_eager():
  bits, x = 12, _plaintext(7, 4, 10, 12)
  key, survivors = jax.random.key(8), jnp.array([True, False, True, True])
  y = masking.mask(key, x, bits=bits)
  np.testing.assert_array_equal(jax.jit(masking.mask, static_argnames="bits")(key, x, bits=bits),
                                y)
  s = masking.sum_survivors(y, survivors, bits=bits)
  np.testing.assert_array_equal(
      jax.jit(masking.unmask, static_argnames="bits")(key, s, survivors, bits=bits),
      masking.unmask(key, s, survivors, bits=bits))


def test_float_pipeline_rotate_encode_mask_drop_unmask_decode():
  """End to end: the decoded sum of survivors is within n sqrt(D) / scale (L2) of the float sum.

  Rounding moves each rotated coordinate by < 1/scale per hospital; unrotation is orthogonal,
  so the error's norm is < n sqrt(D) / scale.
  """
  n, d, bits, scale = 5, 30, 24, 2.0**12
  x = jax.random.normal(jax.random.key(9), (n, d))
  survivors = jnp.array([True, True, False, True, False])
  rot_key, enc_key, mask_key = jax.random.split(jax.random.key(10), 3)
  rotated = encoding.rotate(rot_key, x)  # [n, 32]
  enc_keys = jax.random.split(enc_key, n)
  q = jax.vmap(lambda k, v: encoding.quantize(k, v, scale=scale))(enc_keys, rotated)
  assert int(encoding.overflow_count(q, bits=bits)) == 0
  y = masking.mask(mask_key, encoding.to_ring(q, bits=bits), bits=bits)
  total = masking.unmask(mask_key, masking.sum_survivors(y, survivors, bits=bits), survivors,
                         bits=bits)
  out = encoding.unrotate(rot_key, encoding.decode(total, scale=scale, bits=bits), d)
  err = np.linalg.norm(np.asarray(out) - np.asarray(x)[np.asarray(survivors)].sum(0))
  assert err < n * np.sqrt(32) / scale


def test_a_new_round_key_does_not_recompile():
  traces = []

  @jax.jit
  def round_sum(key, x, survivors):
    traces.append(None)
    y = masking.mask(key, x, bits=16)
    return masking.unmask(key, masking.sum_survivors(y, survivors, bits=16), survivors, bits=16)

  x, survivors = _plaintext(11, 4, 8, 16), jnp.array([True, True, False, True])
  for r in range(3):
    out = round_sum(jax.random.fold_in(jax.random.key(12), r), x, survivors)
    np.testing.assert_array_equal(out, _reference_sum(x, survivors, 16))
  assert len(traces) == 1
