"""Two-party protocols on shares (ring.py), each step's messages counted (channels.py).

Every function takes the channel `ch` and the `dealer` (dealer.py), shares `[2, ...]`
(party 0, party 1), and computes what each party computes from its own share, public
(opened) values and its dealer material. Errors, in ulps of 2^-12:

- `linear`, `mul`: exact ring products, then `ring.truncate` (<= 1 ulp per output;
  failure probability in ring.py); products with a bit are exact (no truncation).
- `msb`: exact on every ring element at 64 bits, on |x| < 2^(bits - 1) for narrower
  words; `relu`, `argmax`, `max_pool` compare in 32 bits: exact for |v| < 2^19 (max
  pool 2^18); the sign bit of x0 + x1 comes from the top carry of a binary adder tree
  on XOR-shared words.
- `avg_pool`: one truncation by 2 bits (<= 1 ulp); `global_mean`: ring.divide_public.
- `tanh`: piecewise quartic (TANH_KNOTS), knots compared in 16 bits: |error| <= 2.8e-4
  in real arithmetic, plus the input's rounding and the truncations: |error| < 7e-4
  (5.6e-4 measured on 16,001 points in [-8, 8]) for |x| < TANH_RANGE (2043.4).

Per element, online: an open of n ring elements costs 2 * 8n bytes (both parties
send) and 1 round; `msb` in w bits 3w - 3 AND gates: w of the parties' own bits (each
party sends 1 bit per gate), 2w - 3 on shared bits (2 bits each), so (10w - 12) / 8 bytes
(w = 64: 78.5 bytes, 7 rounds; 32: 38.5, 6 rounds; 16: 18.5, 5 rounds; narrow words packed);
a bit to ring 2 bits (1 round); a product 32 bytes, a square 16; `relu` = 32-bit msb + bit
to ring + product with the bit: 70.75 bytes, 8 rounds; `tanh` 9 16-bit comparisons, 2
squares and 5 products: 360.75 bytes, 9 rounds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from privacy.encrypted_inference import channels, ring
from privacy.encrypted_inference import dealer as dealer_lib
from privacy.encrypted_inference.dealer import Request

ONE = np.uint64(1)


def linear(ch, dealer, x: jax.Array, w: jax.Array, f: jax.Array, bias: jax.Array | None,
           op, layer: str) -> jax.Array:
  """Shares of op(x, W) + bias, truncated; `f` = W - B opened at setup.

  With the dealer's (A, C = op(A, B)), the parties open E = x - A and party j
  computes op(E, W_j) + op(A_j, F) + C_j: the sum is op(E + A, W) = op(x, W).
  """
  out_shape = jax.eval_shape(op, x[0], w[0]).shape
  a, c = dealer(Request("linear", x.shape[1:], layer, op), out_shape)
  ch.exchange(channels.ring_bytes(x[0].size), "linear")
  z = _linear_local(op, x, w, f, a, c)
  return z if bias is None else z + bias.reshape((2,) + (1,) * (z.ndim - 2) + (-1,))


# The parties' local work between messages is jitted per step: one compilation per
# shape instead of one per primitive when the protocol runs op by op (--nojit).
@functools.partial(jax.jit, static_argnums=0)
def _linear_local(op, x, w, f, a, c):
  e = ring.reconstruct(x - a)  # opened
  return ring.truncate(jnp.stack([op(e, w[j]) + op(a[j], f) + c[j] for j in (0, 1)]))


def mul(ch, dealer, x: jax.Array, y: jax.Array, *, fixed: bool = True) -> jax.Array:
  """Elementwise x * y (Beaver triple, 1 round); `fixed=False` when y is an integer."""
  a, b, c = dealer(Request("triple", x.shape[1:]))
  ch.exchange(channels.ring_bytes(2 * x[0].size), "mul")
  return _mul_local(x, y, a, b, c, fixed)


@functools.partial(jax.jit, static_argnums=5)
def _mul_local(x, y, a, b, c, fixed):
  e, d = ring.reconstruct(x - a), ring.reconstruct(y - b)  # opened
  z = (c + e * b + d * a).at[0].add(e * d)
  return ring.truncate(z) if fixed else z


def square(ch, dealer, x: jax.Array) -> jax.Array:
  """Elementwise x^2, truncated (a pair (a, a^2): one opened value, 1 round)."""
  a, c = dealer(Request("square", x.shape[1:]))
  ch.exchange(channels.ring_bytes(x[0].size), "mul")
  return _square_local(x, a, c)


@jax.jit
def _square_local(x, a, c):
  e = ring.reconstruct(x - a)  # opened
  return ring.truncate((c + (e << ONE) * a).at[0].add(e * e))


def _and_private(ch, dealer, x0: jax.Array, x1: jax.Array) -> jax.Array:
  """XOR shares of x0 & x1 for party 0's own x0 and party 1's own x1 (1 round): with
  the dealer's u (party 0's), v (party 1's), shares w of u & v, party 0 sends d = x0 ^ u,
  party 1 sends e = x1 ^ v, and x0 & x1 = (x0 & e) ^ (d & v) ^ (u & v)."""
  bits = x0.dtype.itemsize * 8
  u, v, w = dealer(Request("and_private", x0.shape, bits=bits))
  ch.exchange(channels.ring_bytes(x0.size, bits), "compare")
  return _and_private_local(x0, x1, u, v, w)


@jax.jit
def _and_private_local(x0, x1, u, v, w):
  d, e = x0 ^ u, x1 ^ v  # sent
  return jnp.stack([(x0 & e) ^ w[0], (d & v) ^ w[1]])


def _and(ch, dealer, x: jax.Array, y: jax.Array) -> jax.Array:
  """XOR shares of x & y, words of x's width (AND triple, 1 round)."""
  bits = x.dtype.itemsize * 8
  u, v, w = dealer(Request("and", x.shape[1:], bits=bits))
  ch.exchange(channels.ring_bytes(2 * x[0].size, bits), "compare")
  return _and_local(x, y, u, v, w)


@jax.jit
def _and_local(x, y, u, v, w):
  d, e = (x ^ u)[0] ^ (x ^ u)[1], (y ^ v)[0] ^ (y ^ v)[1]  # opened
  z = w ^ (d & v) ^ (e & u)
  return z.at[0].set(z[0] ^ (d & e))


def msb(ch, dealer, x: jax.Array, *, bits: int = 64, shift: int = 0) -> jax.Array:
  """XOR shares (0/1 bytes) of the sign bit of x >> shift read as a `bits`-bit number.

  Each party keeps the bits [shift, shift + bits) of its share (party 1 after the
  local truncation's negation), so the two are `bits`-bit shares y0, y1 of x >> shift
  (within 1, as ring.truncate) mod 2^bits: the sign bit is x's sign whenever |x >> shift|
  < 2^(bits - 1). bits=64, shift=0 is exact on every ring element; narrower words are
  exact on a stated range (relu, argmax) and cheaper.

  The sign bit is top(y0) ^ top(y1) ^ the carry into the top bit. The carry is the
  generate of a binary tree over the lower bits (only the top carry, not every prefix):
  G = y0 & y1 and P = y0 ^ y1 per bit, moved up one place (the top bit drops out, bit 0
  is (0, 0); G's AND is of the parties' own words, `_and_private`); each level compacts
  odd and even bits into half-width words (local) and combines pairs,
  G = G_hi ^ (P_hi & G_lo), P = P_hi & P_lo. Values narrower than a byte are packed
  8 // width to a byte, so every AND bit the dealer and the channel pay for is a gate:
  bits + 2 (bits / 2 + ... + 2) + 1 = 3 bits - 3 gates (16: 45, 32: 93, 64: 189),
  log2(bits) + 1 rounds.
  """
  y = _low_bits(x, bits, shift)
  p, width = y << y.dtype.type(1), bits  # moved up one bit; XOR shares of P: (y0, y1)
  g = _and_private(ch, dealer, p[0], p[1])
  while width > 2:
    g_hi, lhs, rhs = _level_inputs(g, p, width)
    g, p = _level_outputs(g_hi, _and(ch, dealer, lhs, rhs), width // 2, g_hi.shape)
    width //= 2
  g_hi, lhs, rhs = _level_inputs(g, p, 2)
  return _top(y, _and(ch, dealer, lhs, rhs), g_hi)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _low_bits(x, bits, shift):
  """Each party's `bits`-bit share of x >> shift (local, SecureML truncation)."""
  if shift:
    x = ring.truncate(x, shift)
  return x.astype(dealer_lib.UINT[bits])


@functools.partial(jax.jit, static_argnums=2)
def _level_inputs(g, p, width):
  """G_hi and the AND inputs (P_hi, P_hi) & (G_lo, P_lo) of a tree level (the last level,
  width 2: P_hi & G_lo only), packed below 8 bits."""
  (g_hi, g_lo), (p_hi, p_lo) = _halves(g, width), _halves(p, width)
  if width == 2:
    return g_hi, _pack(p_hi, 1), _pack(g_lo, 1)
  half = width // 2
  return g_hi, _pack(jnp.stack([p_hi, p_hi], 1), half), _pack(jnp.stack([g_lo, p_lo], 1), half)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _level_outputs(g_hi, both, width, shape):
  """(G, P) of the next level from G_hi and the level's ANDs (P_hi & G_lo, P_hi & P_lo)."""
  both = _unpack(both, width, (2, 2, *shape[1:]))
  return g_hi ^ both[:, 0], both[:, 1]


def _pack(x, width):
  """`[2, ...]` values of `width` < 8 bits -> `[2, ceil(n / k)]` bytes, k = 8 // width
  (wider values unchanged)."""
  if width >= 8:
    return x
  k = 8 // width
  flat = x.reshape(2, -1)
  flat = jnp.pad(flat, ((0, 0), (0, -flat.shape[1] % k))).reshape(2, -1, k)
  return (flat << jnp.arange(0, 8, width, dtype=jnp.uint8)).sum(-1, dtype=jnp.uint8)


def _unpack(z, width, shape):
  """Inverse of `_pack`: bytes -> `[2, ...]` values of `width` bits, shaped `shape`."""
  if width >= 8:
    return z
  mask = np.uint8((1 << width) - 1)
  out = (z[..., None] >> jnp.arange(0, 8, width, dtype=jnp.uint8)) & mask
  return out.reshape(2, -1)[:, :int(np.prod(shape[1:]))].reshape(shape)


def _halves(v, width):
  """(odd bits, even bits) of `width`-bit words, each compacted to width / 2 bits
  (local and XOR-linear), in bytes or words of width / 2 bits."""
  half = width // 2
  out = []
  for u in (v >> v.dtype.type(1), v):
    t = 1
    u = u & _spread_mask(v.dtype, 1)
    while t < half:
      u = (u | (u >> v.dtype.type(t))) & _spread_mask(v.dtype, 2 * t)
      t *= 2
    out.append(u.astype(dealer_lib.UINT[max(half, 8)]))
  return out


def _spread_mask(dtype, t: int):
  """The word of `dtype` with the low t bits of every 2t-bit group set (0x55.., 0x33..)."""
  bits = np.dtype(dtype).itemsize * 8
  return np.dtype(dtype).type(sum(((1 << t) - 1) << k for k in range(0, bits, 2 * t)))


@jax.jit
def _top(y, last, g_hi):
  """Sign bit shares: top(y_j) ^ carry_j, carry = G_hi ^ (P_hi & G_lo) (last level)."""
  top = y.dtype.type(y.dtype.itemsize * 8 - 1)
  carry = g_hi ^ _unpack(last, 1, g_hi.shape)
  return ((y >> top).astype(jnp.uint8) & np.uint8(1)) ^ carry


def bit_to_ring(ch, dealer, bit: jax.Array) -> jax.Array:
  """Additive shares of a XOR-shared bit (doubly shared random bit r, 1 round)."""
  rb, ra = dealer(Request("dabit", bit.shape[1:]))
  ch.exchange(channels.ring_bytes(bit[0].size, 1), "bit_to_ring")
  return _bit_to_ring_local(bit, rb, ra)


@jax.jit
def _bit_to_ring_local(bit, rb, ra):
  c = ((bit ^ rb)[0] ^ (bit ^ rb)[1]).astype(ring.DTYPE)  # opened
  return (ra * (ONE - (c << ONE))).at[0].add(c)  # r (1 - 2c) + c = c xor r


def less_than_zero(ch, dealer, x: jax.Array, *, bits: int = 64, shift: int = 0) -> jax.Array:
  """Additive shares of [x < 0] (0 or 1, an integer, not fixed point); `msb`'s range."""
  return bit_to_ring(ch, dealer, msb(ch, dealer, x, bits=bits, shift=shift))


# ReLU and argmax compare in 32 bits: exact whenever |v| < 2^(31 - FRAC_BITS) = 2^19.
COMPARE_BITS = 32
COMPARE_RANGE = 2.0**(COMPARE_BITS - 1 - ring.FRAC_BITS)
POOL_PAD = COMPARE_RANGE / 2  # max pooling: exact for |x| < POOL_PAD = 2^18


def relu(ch, dealer, x: jax.Array) -> jax.Array:
  """max(x, 0): x * (1 - [x < 0]), exact for |x| < COMPARE_RANGE."""
  negative = less_than_zero(ch, dealer, x, bits=COMPARE_BITS)
  keep = ring.add_public(-negative, ONE)
  return mul(ch, dealer, x, keep, fixed=False)


# tanh: the knots are compared in 16 bits after a shift by 8: (x - t) >> 8 (within one
# unit of 2^-4) has the sign of x - t for |x - t| < 2^(15 + 8 - FRAC_BITS) - 2^-4, and is
# decided within TANH_MARGIN = 2^-4 of the knot, so each piece is fitted on its interval
# widened by the margin. With knots in [-4.5, 4.5]: exact pieces for |x| < TANH_RANGE.
KNOT_BITS, KNOT_SHIFT = 16, 8
TANH_MARGIN = 2.0**(KNOT_SHIFT - ring.FRAC_BITS)
TANH_RANGE = 2.0**(KNOT_BITS - 1 + KNOT_SHIFT - ring.FRAC_BITS) - TANH_MARGIN - 4.5


def _fit_tanh(knots: np.ndarray, degree: int, margin: float) -> tuple[np.ndarray, np.ndarray]:
  """Pieces: -1 below the first knot, a polynomial in (x - centre) on each interval
  (least squares on Chebyshev nodes of the interval widened by `margin`), +1 from the
  last knot. Returns (centres [pieces], coefficients [pieces, degree + 1], constant first)."""
  centres, rows = [0.0], [[-1.0] + [0.0] * degree]
  for lo, hi in zip(knots[:-1], knots[1:]):
    u = np.cos(np.linspace(0, np.pi, 400)) * ((hi - lo) / 2 + margin)
    centres.append((lo + hi) / 2)
    rows.append(np.polyfit(u, np.tanh(u + (lo + hi) / 2), degree)[::-1])
  centres.append(0.0)
  rows.append([1.0] + [0.0] * degree)
  return np.array(centres), np.array(rows)


TANH_KNOTS = np.linspace(-4.5, 4.5, 9)  # outside: -1 and +1 (1 - tanh(4.5 - 1/16) = 2.8e-4)
TANH_DEGREE = 4
TANH_CENTRES, TANH_COEFFS = _fit_tanh(TANH_KNOTS, TANH_DEGREE, TANH_MARGIN)


def tanh(ch, dealer, x: jax.Array) -> jax.Array:
  """Piecewise-quartic tanh for |x| < TANH_RANGE: the knots' comparisons give a one-hot
  piece indicator, which selects the piece's centre and coefficients locally (public
  constants times shared bits); then one quartic in z = x - centre: z^2 (a square),
  (z^3, z^4 = a product and a square at once), and the four coefficient products,
  summed before one truncation. 9 rounds."""
  knots = jnp.stack([ring.add_public(x, ring.public_scalar(-t)) for t in TANH_KNOTS], 1)
  below = less_than_zero(ch, dealer, knots, bits=KNOT_BITS, shift=KNOT_SHIFT)  # [x < t_k]
  piece = jnp.concatenate([below[:, :1], below[:, 1:] - below[:, :-1],
                           ring.add_public(-below[:, -1:], ONE)], 1)  # [2, pieces, B, ...]
  select = lambda table: _select(piece, ring.encode(table))
  z = x - select(TANH_CENTRES)
  z2 = square(ch, dealer, z)
  z3, z4 = ch.parallel(lambda c: mul(c, dealer, z2, z), lambda c: square(c, dealer, z2))
  coeffs = jnp.stack([select(TANH_COEFFS[:, i]) for i in range(1, TANH_DEGREE + 1)], 1)
  terms = mul(ch, dealer, coeffs, jnp.stack([z, z2, z3, z4], 1), fixed=False)
  # One truncation for the whole sum: the terms' rounding errors do not add up.
  return ring.truncate(terms.sum(1)) + select(TANH_COEFFS[:, 0])


@jax.jit
def _select(piece, table):
  """sum_k piece_k * table_k: shares of the selected public constant (local, exact)."""
  return (piece * table.reshape((1, -1) + (1,) * (piece.ndim - 2))).sum(1)


def avg_pool(x: jax.Array) -> jax.Array:
  """2x2 average pooling (stride 2, VALID) of `[2, B, H, W, C]`: sum, then / 4 (local)."""
  _, b, h, w, c = x.shape
  x = x[:, :, :h // 2 * 2, :w // 2 * 2]
  x = x.reshape(2, b, h // 2, 2, w // 2, 2, c).sum((3, 5))
  return ring.truncate(x, 2)


def global_mean(x: jax.Array) -> jax.Array:
  """Mean over H and W of `[2, B, H, W, C]` (local; ring.divide_public's error)."""
  return ring.divide_public(x.sum((2, 3)), x.shape[2] * x.shape[3])


def max_pool(ch, dealer, x: jax.Array, window: int = 3, stride: int = 2) -> jax.Array:
  """Max pooling of `[2, B, H, W, C]` with SAME padding (flax.linen.max_pool's), exact for
  |x| < POOL_PAD: the window's values play a knock-out tournament, max(a, b) = b +
  relu(a - b), all pairs of a level at once (4 levels of relu for a 3x3 window). Padding
  is the public -POOL_PAD, which never wins against a real value in range."""
  _, _, h, w, _ = x.shape
  pads = jax.lax.padtype_to_pads((h, w), (window, window), (stride, stride), "SAME")
  pad = ((0, 0), (0, 0), *pads, (0, 0))
  x = jnp.pad(x, pad).at[0].add(jnp.pad(jnp.zeros(x.shape[1:], ring.DTYPE), pad[1:],
                                        constant_values=ring.public_scalar(-POOL_PAD)))
  out_h, out_w = -(-h // stride), -(-w // stride)
  views = [x[:, :, i:i + stride * out_h:stride, j:j + stride * out_w:stride]
           for i in range(window) for j in range(window)]
  while len(views) > 1:
    half = len(views) // 2
    a, b = jnp.stack(views[:half], 1), jnp.stack(views[half:2 * half], 1)
    wins = b + relu(ch, dealer, a - b)  # [2, pairs, ...]: one relu call for the level
    views = [wins[:, k] for k in range(half)] + views[2 * half:]
  return views[0]


def argmax(ch, dealer, logits: jax.Array) -> jax.Array:
  """Additive shares of the one-hot argmax `[2, B, C]` (first index on ties), exact.

  All pairs i < j are compared at once (l_i < l_j); class i wins if it beats every
  other class, a product of C - 1 bits (a tree of products of bits).
  """
  classes = logits.shape[-1]
  pairs = [(i, j) for i in range(classes) for j in range(i + 1, classes)]
  if not pairs:
    return jnp.zeros_like(logits).at[0].set(ONE)
  diffs = jnp.stack([logits[..., i] - logits[..., j] for i, j in pairs], -1)
  lt = less_than_zero(ch, dealer, diffs, bits=COMPARE_BITS)  # [2, B, pairs]: l_i < l_j
  index = {pair: k for k, pair in enumerate(pairs)}
  factors = []
  for i in range(classes):
    row = [ring.add_public(-lt[..., index[(i, j)]], ONE) if i < j else lt[..., index[(j, i)]]
           for j in range(classes) if j != i]
    factors.append(jnp.stack(row, -1))
  wins = jnp.stack(factors, -2)  # [2, B, C, C - 1]
  while wins.shape[-1] > 1:
    half = wins.shape[-1] // 2
    prod = mul(ch, dealer, wins[..., :half], wins[..., half:2 * half], fixed=False)
    wins = jnp.concatenate([prod, wins[..., 2 * half:]], -1)
  return wins[..., 0]


def reveal_to_hospital(ch: channels.Channel, shares: jax.Array, step: str) -> jax.Array:
  """Party 1 sends its share to party 0 (1 round, one way); party 0 learns the value."""
  ch.send(channels.ring_bytes(shares[0].size), step)
  return ring.reconstruct(shares)
