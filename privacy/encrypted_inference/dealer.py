"""The dealer: correlated randomness that depends on no input (the offline phase).

The dealer sees neither the image nor the weights. It hands out
- a mask B per linear layer, once per model (setup): the parties open W - B,
  and per image a pair (A, C = A (x) B) shaped like the layer's input and output
  (a Beaver triple whose weight side is fixed, so W - B is opened only once);
- Beaver triples (a, b, a * b) for elementwise products, pairs (a, a^2) for squares;
- AND triples (u, v, u & v) of 8- to 64-bit words, XOR-shared, for the comparison's adder
  (for an AND of the parties' private inputs, u is party 0's alone and v party 1's);
- doubly shared bits (the same random bit XOR-shared and additively shared), to turn
  a comparison's bit into a ring element.

Seed compression (CrypTen's trusted third party): the dealer shares a seed with each
party, and both expand their random shares from it (A_j, a_j, b_j, u_j, v_j, a dabit's
XOR share, and party 0's share of each computed value); the dealer sends party 1 only
the correction of each value it computes (C, c = a b, w = u & v, the bit's ring share).

The protocol asks for material through a dealer object: a `Recorder` lists the
requests (and the protocol's pieces, network.compile_protocol) while the protocol is
traced and counts their bytes, `group` makes the material of consecutive requests (one
compiled program per piece, timed as the offline phase; `generate` of a whole list), and
`Replay` hands it to the online phase in the same order (`Pieces` to compiled pieces).
Each request's words come from XLA's RngBitGenerator (`rbg` keys, 2.3x threefry's rate
on the CPU), one draw per party, keyed by fold_in(fold_in(seed, party), request index),
small requests sharing one draw (OWN_DRAW_WORDS; docs/encrypted_inference.md says what
the generator means for security).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from privacy.encrypted_inference import channels, ring

Op = Callable[[jax.Array, jax.Array], jax.Array]  # ring-bilinear map (conv or matmul)


class Request(NamedTuple):
  kind: str         # "linear" | "triple" | "square" | "and" | "and_private" | "dabit"
  shape: tuple      # input shape (linear: A's shape)
  layer: str = ""   # linear: the layer whose mask B is used
  op: Op = None     # linear: the layer's bilinear map
  bits: int = 64    # and: the width of the words


UINT = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}


def make_masks(key: jax.Array, weight_shapes: dict) -> dict:
  """The dealer's mask B per linear layer (uniform ring elements, same shape as W)."""
  names = sorted(weight_shapes)
  sizes = [_size(weight_shapes[name]) for name in names]
  rbg = jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")
  words = jnp.split(ring.random_ring(rbg, (sum(sizes),)), np.cumsum(sizes)[:-1])
  return {name: w.reshape(weight_shapes[name]) for name, w in zip(names, words)}


def _words(request: Request, out_shape: tuple) -> tuple[int, int]:
  """Uniform 64-bit words of the material of `request`, from party 0's and party 1's seed."""
  n, out = _size(request.shape), _size(out_shape)
  narrow = -(-n * request.bits // 64)
  return {"linear": (n + out, n), "triple": (3 * n, 2 * n), "square": (2 * n, n),
          "and": (3 * narrow, 2 * narrow), "and_private": (2 * narrow, narrow),
          "dabit": (-(-n // 8) + n, -(-n // 8))}[request.kind]


class _Streams:
  """Consecutive slices of party 0's and party 1's seeded words for one request.

  A random shared value (A, a Beaver factor, an AND factor, a dabit's bit) is one draw
  from each party's words; a share of a value the dealer computes is party 0's draw and
  party 1's correction, value - share_0 (or value ^ share_0): the only material sent.
  """

  def __init__(self, words0: jax.Array, words1: jax.Array):
    self.words, self.at = (words0, words1), [0, 0]

  def take(self, party: int, shape, bits: int = 64) -> jax.Array:
    """Uniform `bits`-bit words `shape` of `party` (narrow words cut from 64-bit ones)."""
    n = _size(shape)
    words = -(-n * bits // 64)
    out = self.words[party][self.at[party]:self.at[party] + words]
    self.at[party] += words
    if bits < 64:
      out = jax.lax.bitcast_convert_type(out, UINT[bits]).reshape(-1)[:n]
    return out.reshape(shape)

  def random(self, shape, bits: int = 64) -> jax.Array:
    """Shares `[2, ...]` of a uniform value: one seeded draw per party."""
    return jnp.stack([self.take(0, shape, bits), self.take(1, shape, bits)])

  def share(self, value: jax.Array, xor: bool = False) -> jax.Array:
    """Shares `[2, ...]` of `value`: party 0's seeded draw, party 1's correction."""
    r = self.take(0, value.shape, value.dtype.itemsize * 8)
    return jnp.stack([r, value ^ r if xor else value - r])


def _material(request: Request, out_shape: tuple, mask: jax.Array | None,
              words0: jax.Array, words1: jax.Array) -> tuple:
  """The material of one request from the parties' seeded words."""
  shape, rand = request.shape, _Streams(words0, words1)
  if request.kind == "linear":
    a = rand.random(shape)
    return a, rand.share(request.op(ring.reconstruct(a), mask))
  if request.kind == "triple":
    a, b = rand.random(shape), rand.random(shape)
    return a, b, rand.share(ring.reconstruct(a) * ring.reconstruct(b))
  if request.kind == "square":
    a = rand.random(shape)
    return a, rand.share(ring.reconstruct(a) * ring.reconstruct(a))
  if request.kind == "and":
    u, v = rand.random(shape, request.bits), rand.random(shape, request.bits)
    return u, v, rand.share((u[0] ^ u[1]) & (v[0] ^ v[1]), xor=True)
  if request.kind == "and_private":  # u party 0's alone, v party 1's alone
    u, v = rand.take(0, shape, request.bits), rand.take(1, shape, request.bits)
    return u, v, rand.share(u & v, xor=True)
  one = np.uint8(1)  # "dabit": a random bit, XOR-shared (bytes) and additively shared
  bits = rand.random(shape, 8) & one
  return bits, rand.share((bits[0] ^ bits[1]).astype(ring.DTYPE))


def party_words(key: jax.Array, party: int, index: int, n: int) -> jax.Array:
  """`n` uniform words of request `index`, expanded from the seed the dealer shares with
  `party` (an rbg key per request, derived from the party's seed by fold_in)."""
  seed = jax.random.bits(jax.random.fold_in(jax.random.fold_in(key, party), index), (4,),
                         jnp.uint32)
  return ring.random_ring(jax.random.wrap_key_data(seed, impl="rbg"), (n,))


# A request of at least this many words gets its own draw per party: slicing one draw for
# everything made the offline phase 1.5x slower (cnn_tanh, batch 64); the small requests
# share one draw (each draw is a compiled RNG op: compilation time).
OWN_DRAW_WORDS = 1 << 16


def draw_offsets(requests) -> tuple[list, tuple[int, int]]:
  """Where each request's words come from: None (its own draw per party) or its offsets
  (party 0, party 1) in the draw the small requests share; and that draw's sizes."""
  at, out = (0, 0), []
  for r, shape in requests:
    size = _words(r, shape)
    out.append(None if sum(size) >= OWN_DRAW_WORDS else at)
    if sum(size) < OWN_DRAW_WORDS:
      at = (at[0] + size[0], at[1] + size[1])
  return out, at


def shared_words(key: jax.Array, requests) -> list[jax.Array]:
  """Each party's draw shared by the small requests (keyed by the number of requests)."""
  sizes = draw_offsets(requests)[1]
  return [party_words(key, j, len(requests), sizes[j]) for j in (0, 1)]


def signature(requests) -> tuple:
  """`requests` without their layer names: what a group's program depends on (the layers'
  masks are its arguments, `group_masks`)."""
  return tuple((r._replace(layer=""), shape) for r, shape in requests)


def group_masks(requests, masks: dict) -> list[jax.Array]:
  """The masks of the linear requests among `requests`, in order."""
  return [masks[r.layer] for r, _ in requests if r.kind == "linear"]


def group(requests: tuple, key: jax.Array, first, shared: list, base, masks: list) -> list:
  """The material of consecutive `requests` (a `signature`), the first one being request
  number `first` of the protocol and its small requests' words starting at `base`
  (party 0, party 1) in the `shared` draws. `first` and `base` may be traced, so groups
  of the same signature share one compiled program."""
  masks, out = iter(masks), []
  for i, ((r, shape), at) in enumerate(zip(requests, draw_offsets(requests)[0])):
    size = _words(r, shape)
    if at is None:
      words = [party_words(key, j, first + i, size[j]) for j in (0, 1)]
    else:
      words = [jax.lax.dynamic_slice_in_dim(shared[j], base[j] + at[j], size[j])
               for j in (0, 1)]
    out.append(_material(r, shape, next(masks) if r.kind == "linear" else None, *words))
  return out


group_jit = jax.jit(group, static_argnums=0)


def generate(requests: list[tuple[Request, tuple]], masks: dict, key: jax.Array, *,
             op_by_op: bool = False) -> list[tuple]:
  """The material of `requests` ((request, output shape) pairs), in order: as one
  program, or `op_by_op` one compiled program per request signature."""
  shared = shared_words(key, requests)
  if not op_by_op:
    return group(signature(requests), key, 0, shared, (0, 0), group_masks(requests, masks))
  out = []
  for i, (request, at) in enumerate(zip(requests, draw_offsets(requests)[0])):
    out += group_jit(signature([request]), key, i, shared, at or (0, 0),
                     group_masks([request], masks))
  return out


class Piece(NamedTuple):
  """A call of `fn(ch, dealer, *args)` that one compiled program runs (network.py): its
  requests are `requests[start:stop]`, `args` its arguments' shapes."""
  fn: Callable
  start: int
  stop: int
  args: tuple


def shapes(tree):
  """ShapeDtypeStructs of the arrays in `tree`."""
  return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), tree)


class Recorder:
  """Lists what the protocol asks for and counts party 1's bytes; returns zeros. Also
  lists the protocol's pieces and the shapes of each request's material."""

  def __init__(self, channel: channels.Channel):
    self.requests: list[tuple[Request, tuple]] = []
    self.material: list[tuple] = []  # shapes
    self.pieces: list[Piece] = []
    self.channel = channel

  def piece(self, ch, fn: Callable, *args, layer: str = ""):
    """Runs `fn(ch, self, *args)` as one piece (pieces do not nest); its linear requests
    use the mask of `layer` (kept out of `fn`, so same-shaped layers share a program)."""
    start = len(self.requests)
    out = fn(ch, self, *args)
    for i in range(start, len(self.requests)):
      if self.requests[i][0].kind == "linear":
        self.requests[i] = (self.requests[i][0]._replace(layer=layer), self.requests[i][1])
    self.pieces.append(Piece(fn, start, len(self.requests), shapes(args)))
    return out

  def __call__(self, request: Request, out_shape: tuple = ()) -> tuple:
    out = self._zeros(request, out_shape)
    self.requests.append((request, out_shape))
    self.material.append(shapes(out))
    return out

  def _zeros(self, request: Request, out_shape: tuple) -> tuple:
    n = _size(request.shape)
    zeros = lambda shape: jnp.zeros((2, *shape), ring.DTYPE)
    # Sent: party 1's correction of the one value the dealer computes (C, c, w, the bit's
    # ring share); everything else both parties expand from their seeds.
    if request.kind == "linear":
      self.channel.deal(channels.ring_bytes(_size(out_shape)))
      return zeros(request.shape), zeros(out_shape)
    if request.kind == "dabit":
      self.channel.deal(channels.ring_bytes(n))
      return jnp.zeros((2, *request.shape), jnp.uint8), zeros(request.shape)
    if request.kind in ("and", "and_private"):
      self.channel.deal(channels.ring_bytes(n, request.bits))
      shares = jnp.zeros((2, *request.shape), UINT[request.bits])
      if request.kind == "and":
        return shares, shares, shares
      return shares[0], shares[1], shares
    if request.kind == "square":
      self.channel.deal(channels.ring_bytes(n))
      return zeros(request.shape), zeros(request.shape)
    self.channel.deal(channels.ring_bytes(n))
    return tuple(zeros(request.shape) for _ in range(3))


class Replay:
  """Hands out generated material in the order it was requested; runs pieces in line."""

  def __init__(self, material: list[tuple]):
    self._material = iter(material)

  def __call__(self, request: Request, out_shape: tuple = ()) -> tuple:
    del request, out_shape  # same order as recorded
    return next(self._material)

  def piece(self, ch, fn: Callable, *args, layer: str = ""):
    del layer  # the material is already made
    return fn(ch, self, *args)


class Pieces(Replay):
  """Replay whose pieces run compiled: `programs` are the recorded pieces' (number of
  requests, program(material, *args)), in order."""

  def __init__(self, material: list[tuple], programs: list[tuple[int, Callable]]):
    super().__init__(material)
    self._programs = iter(programs)

  def piece(self, ch, fn: Callable, *args, layer: str = ""):
    del ch, fn, layer  # the program is the recorded piece's
    n, program = next(self._programs)
    return program([next(self._material) for _ in range(n)], *args)


def _size(shape) -> int:
  n = 1
  for d in shape:
    n *= int(d)
  return n
