"""Fixed-point encoding into Z_(2^b), its overflow count, and the Hadamard rotation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from privacy.secure_agg import encoding


def _encode_all(key, x, *, scale, bits):
  keys = jax.random.split(key, x.shape[0])
  return jax.vmap(lambda k, v: encoding.encode(k, v, scale=scale, bits=bits))(keys, x)


def test_hand_worked_negative_values_wrap_and_decode_back():
  # scale 1, 8 bits: -1 -> 255, -128 -> 128, 127 -> 127 (integers round to themselves).
  q = encoding.encode(jax.random.key(0), jnp.array([-1.0, -128.0, 127.0, 0.0]), scale=1.0, bits=8)
  assert q.dtype == jnp.uint32
  assert q.tolist() == [255, 128, 127, 0]
  assert encoding.decode(q, scale=1.0, bits=8).tolist() == [-1.0, -128.0, 127.0, 0.0]
  # A representative above 2^b decodes the same as its residue.
  assert encoding.decode(jnp.array([255 + 256], jnp.uint32), scale=1.0, bits=8).tolist() == [-1.0]


@pytest.mark.parametrize("bits", [16, 24, 32])
def test_round_trip_of_a_sum_is_within_one_step_per_hospital(bits):
  n, d, scale = 5, 257, 2.0**10
  x = jax.random.uniform(jax.random.key(1), (n, d), minval=-3.0, maxval=3.0)
  q = _encode_all(jax.random.key(2), x, scale=scale, bits=bits)
  assert int(jnp.max(q)) < 2**bits
  total = jnp.sum(q, axis=0, dtype=jnp.uint32)
  decoded = np.asarray(encoding.decode(total, scale=scale, bits=bits), np.float64)
  err = np.abs(decoded - np.asarray(x, np.float64).sum(0))
  assert err.max() < n / scale
  # Rounding really happened (the bound is not vacuous): some coordinates moved.
  assert err.max() > 0.1 / scale


def test_single_value_round_trip_within_one_step():
  scale = 100.0
  x = jax.random.normal(jax.random.key(3), (1000,))
  back = encoding.decode(encoding.encode(jax.random.key(4), x, scale=scale, bits=20),
                         scale=scale, bits=20)
  assert float(jnp.max(jnp.abs(back - x))) < 1.0 / scale + 1e-6


def test_stochastic_rounding_is_unbiased():
  # Each value is rounded 20,000 times; the fractional parts give Bernoulli(f) with variance
  # <= 1/4, so the std of each mean is <= 0.0036 and 0.025 is 7 std: false failure < 1e-11.
  # Nearest or floor rounding is off by >= 0.25 on 0.25, 0.5, -0.7, 2.25.
  values = jnp.array([0.25, 0.5, -0.7, 2.25, 3.0, -1.9])
  keys = jax.random.split(jax.random.key(5), 20_000)
  q = jax.vmap(lambda k: encoding.quantize(k, values, scale=1.0))(keys)
  np.testing.assert_allclose(np.asarray(q).mean(0), np.asarray(values), atol=0.025)
  # Each value lands on one of its two neighbouring integers only.
  assert np.all(np.abs(np.asarray(q) - np.asarray(values)) < 1.0)


def test_overflow_is_counted_and_wraps_by_the_ring_size():
  # 8 bits: representable sums are [-128, 128).
  q = jnp.array([[50, -43, -40, 42, 43, 0],
                 [50, -43, -40, 42, 43, 0],
                 [50, -43, -48, 43, 42, 0]], jnp.int32)
  # sums: 150 (over), -129 (under), -128 (edge, ok), 127 (edge, ok), 128 (over), 0.
  assert int(encoding.overflow_count(q, bits=8)) == 3
  total = jnp.sum(encoding.to_ring(q, bits=8), axis=0, dtype=jnp.uint32)
  assert encoding.decode(total, scale=1.0, bits=8).tolist() == [150 - 256, -129 + 256, -128,
                                                                127, 128 - 256, 0]


@pytest.mark.parametrize("bits", [1, 8, 16, 31, 32])
def test_overflow_count_matches_an_int64_reference(bits):
  rng = np.random.default_rng(6)
  span = 2**31 if bits >= 30 else 2 ** (bits - 1) * 3
  q = rng.integers(-span, span, size=(7, 4000)).astype(np.int32)
  total = q.astype(np.int64).sum(0)
  expected = int(np.sum((total < -(2 ** (bits - 1))) | (total >= 2 ** (bits - 1))))
  assert 0 < expected < q.shape[1]  # the test exercises both sides
  assert int(encoding.overflow_count(jnp.asarray(q), bits=bits)) == expected


def test_bits_out_of_range_are_refused():
  with pytest.raises(ValueError, match="bits=33 must be an int in"):
    encoding.encode(jax.random.key(0), jnp.zeros(3), scale=1.0, bits=33)
  with pytest.raises(ValueError, match="bits=0 must be an int in"):
    encoding.overflow_count(jnp.zeros((2, 3), jnp.int32), bits=0)


def test_jit_agrees_with_eager():
  x = jax.random.normal(jax.random.key(7), (4, 9))
  key = jax.random.key(8)
  eager = _encode_all(key, x, scale=64.0, bits=12)
  jitted = jax.jit(_encode_all, static_argnames=("scale", "bits"))(key, x, scale=64.0, bits=12)
  np.testing.assert_array_equal(eager, jitted)
  dec = jax.jit(encoding.decode, static_argnames=("scale", "bits"))
  np.testing.assert_array_equal(dec(eager[0], scale=64.0, bits=12),
                                encoding.decode(eager[0], scale=64.0, bits=12))


@pytest.mark.parametrize("d,size", [(1, 1), (2, 2), (3, 4), (64, 64), (65, 128)])
def test_padded_size(d, size):
  assert encoding.padded_size(d) == size


def test_hadamard_matches_scipy():
  x = jax.random.normal(jax.random.key(9), (3, 16))
  expected = np.asarray(x) @ scipy.linalg.hadamard(16).T / 4.0
  np.testing.assert_allclose(encoding._hadamard(x), expected, rtol=1e-5, atol=1e-5)


# Jitted as the round runs them (one compilation per shape, not one per eager op).
_rotate = jax.jit(encoding.rotate)
_unrotate = jax.jit(encoding.unrotate, static_argnums=2)


def test_rotation_is_orthogonal_and_invertible():
  key = jax.random.key(10)
  x = jax.random.normal(jax.random.key(11), (3, 37))
  y = _rotate(key, x)
  assert y.shape == (3, 64)
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(_unrotate(key, y, 37), x, atol=1e-5)
  # As a matrix (rows: rotated basis vectors of the padded space) it is orthogonal.
  m = np.asarray(_rotate(key, jnp.eye(64)))
  np.testing.assert_allclose(m @ m.T, np.eye(64), atol=1e-5)
  # Random signs from the key: another key gives another rotation; the wrong key does not invert.
  assert not np.allclose(_rotate(jax.random.key(12), x), y, atol=1e-3)
  assert not np.allclose(_unrotate(jax.random.key(12), y, 37), x, atol=1e-3)


def test_rotation_spreads_a_spike_and_commutes_with_the_sum():
  key = jax.random.key(13)
  spike = jnp.zeros(50).at[17].set(8.0)
  y = _rotate(key, spike)
  np.testing.assert_allclose(jnp.abs(y), jnp.full(64, 1.0), rtol=1e-5)  # 8 / sqrt(64)
  x = jax.random.normal(jax.random.key(14), (4, 50))
  np.testing.assert_allclose(_rotate(key, x).sum(0), _rotate(key, x.sum(0)),
                             atol=1e-4)
