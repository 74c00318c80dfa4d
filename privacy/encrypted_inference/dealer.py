"""The dealer: correlated randomness that depends on no input (the offline phase).

The dealer sees neither the image nor the weights. It hands out
- a mask B per linear layer, once per model (setup): the parties open W - B,
  and per image a pair (A, C = A (x) B) shaped like the layer's input and output
  (a Beaver triple whose weight side is fixed, so W - B is opened only once);
- Beaver triples (a, b, a * b) for elementwise products;
- AND triples (u, v, u & v) of 8- to 64-bit words, XOR-shared, for the comparison's adder;
- doubly shared bits (the same random bit XOR-shared and additively shared), to turn
  a comparison's bit into a ring element.

The protocol asks for material through a dealer object: a `Recorder` lists the
requests while the protocol is traced (and counts their bytes), `generate` makes
the material of such a list (jitted, timed as the offline phase), and `Replay`
hands it to the online phase in the same order. The words come from one draw of
XLA's RngBitGenerator (`rbg` keys, 2.3x threefry's rate on the CPU; neither is a
cryptographic generator, docs/encrypted_inference.md).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from privacy.encrypted_inference import channels, ring

Op = Callable[[jax.Array, jax.Array], jax.Array]  # ring-bilinear map (conv or matmul)


class Request(NamedTuple):
  kind: str         # "linear" | "triple" | "and" | "dabit"
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


def _words(request: Request, out_shape: tuple) -> int:
  """Uniform 64-bit words the material of `request` takes (values and share masks)."""
  n = _size(request.shape)
  return {"linear": 2 * n + _size(out_shape), "triple": 5 * n,
          "and": 5 * -(-n * request.bits // 64), "dabit": 2 * -(-n // 8) + n}[request.kind]


class _Stream:
  """Consecutive slices of one draw of uniform words (one PRNG call for everything)."""

  def __init__(self, words: jax.Array):
    self.words, self.at = words, 0

  def take(self, shape, bits: int = 64) -> jax.Array:
    """Uniform `bits`-bit words `shape` (narrow words are cut from whole 64-bit ones)."""
    n = _size(shape)
    words = -(-n * bits // 64)
    out = self.words[self.at:self.at + words]
    self.at += words
    if bits < 64:
      out = jax.lax.bitcast_convert_type(out, UINT[bits]).reshape(-1)[:n]
    return out.reshape(shape)

  def share(self, value: jax.Array) -> jax.Array:
    """Additive shares `[2, ...]`: (value - r, r)."""
    r = self.take(value.shape)
    return jnp.stack([value - r, r])

  def xor_share(self, value: jax.Array, bits: int = 64) -> jax.Array:
    """XOR shares `[2, ...]`: (value ^ r, r)."""
    r = self.take(value.shape, bits)
    return jnp.stack([value ^ r, r])


def _material(request: Request, out_shape: tuple, mask: jax.Array | None,
               words: jax.Array) -> tuple:
  """The material of one request from its uniform `words`."""
  shape, rand = request.shape, _Stream(words)
  if request.kind == "linear":
    a = rand.take(shape)
    return rand.share(a), rand.share(request.op(a, mask))
  if request.kind == "triple":
    a, b = rand.take(shape), rand.take(shape)
    return rand.share(a), rand.share(b), rand.share(a * b)
  if request.kind == "and":
    bits = request.bits
    u, v = rand.take(shape, bits), rand.take(shape, bits)
    return tuple(rand.xor_share(t, bits) for t in (u, v, u & v))
  one = np.uint8(1)  # "dabit": a random bit, XOR-shared (bytes) and additively shared
  bit = rand.take(shape, 8) & one
  return rand.xor_share(bit, 8) & one, rand.share(bit.astype(ring.DTYPE))


# Op by op (not under an outer jit), one compilation per request shape.
_material_jit = jax.jit(_material, static_argnums=(0, 1))


def generate(requests: list[tuple[Request, tuple]], masks: dict, key: jax.Array, *,
             op_by_op: bool = False) -> list[tuple]:
  """The material of `requests` ((request, output shape) pairs), in order."""
  material = _material_jit if op_by_op else _material
  sizes = [_words(r, out) for r, out in requests]
  rbg = jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")
  words = ring.random_ring(rbg, (sum(sizes),))
  starts = np.cumsum([0, *sizes[:-1]])
  return [material(r, out, masks.get(r.layer), jax.lax.dynamic_slice_in_dim(words, at, n))
          for (r, out), at, n in zip(requests, starts, sizes)]


class Recorder:
  """Lists what the protocol asks for and counts party 1's bytes; returns zeros."""

  def __init__(self, channel: channels.Channel):
    self.requests: list[tuple[Request, tuple]] = []
    self.channel = channel

  def __call__(self, request: Request, out_shape: tuple = ()) -> tuple:
    self.requests.append((request, out_shape))
    n = _size(request.shape)
    zeros = lambda shape: jnp.zeros((2, *shape), ring.DTYPE)
    if request.kind == "linear":
      self.channel.deal(channels.ring_bytes(n + _size(out_shape)))
      return zeros(request.shape), zeros(out_shape)
    if request.kind == "dabit":
      self.channel.deal(channels.ring_bytes(n, 1) + channels.ring_bytes(n))
      return jnp.zeros((2, *request.shape), jnp.uint8), zeros(request.shape)
    if request.kind == "and":
      self.channel.deal(channels.ring_bytes(3 * n, request.bits))
      return tuple(jnp.zeros((2, *request.shape), UINT[request.bits]) for _ in range(3))
    self.channel.deal(channels.ring_bytes(3 * n))
    return tuple(zeros(request.shape) for _ in range(3))


class Replay:
  """Hands out generated material in the order it was requested."""

  def __init__(self, material: list[tuple]):
    self._material = iter(material)

  def __call__(self, request: Request, out_shape: tuple = ()) -> tuple:
    del request, out_shape  # same order as recorded
    return next(self._material)


def _size(shape) -> int:
  n = 1
  for d in shape:
    n *= int(d)
  return n
