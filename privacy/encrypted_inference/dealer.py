"""The dealer: correlated randomness that depends on no input (the offline phase).

The dealer sees neither the image nor the weights. It hands out
- a mask B per linear layer, once per model (setup): the parties open W - B,
  and per image a pair (A, C = A (x) B) shaped like the layer's input and output
  (a Beaver triple whose weight side is fixed, so W - B is opened only once);
- Beaver triples (a, b, a * b) for elementwise products;
- AND triples (u, v, u & v) of 64-bit words, XOR-shared, for the comparison's adder;
- doubly shared bits (the same random bit XOR-shared and additively shared), to turn
  a comparison's bit into a ring element.

The protocol asks for material through a dealer object: a `Recorder` lists the
requests while the protocol is traced (and counts their bytes), `generate` makes
the material of such a list (jitted, timed as the offline phase), and `Replay`
hands it to the online phase in the same order.
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


def make_masks(key: jax.Array, weight_shapes: dict) -> dict:
  """The dealer's mask B per linear layer (uniform ring elements, same shape as W)."""
  return {name: ring.random_ring(jax.random.fold_in(key, i), shape)
          for i, (name, shape) in enumerate(sorted(weight_shapes.items()))}


def _words(request: Request, out_shape: tuple) -> int:
  """Uniform 64-bit words the material of `request` takes (values and share masks)."""
  n = _size(request.shape)
  return {"linear": 2 * n + _size(out_shape), "triple": 5 * n, "and": 5 * n,
          "dabit": 3 * n}[request.kind]


class _Stream:
  """Consecutive slices of one draw of uniform words (one PRNG call for everything)."""

  def __init__(self, words: jax.Array):
    self.words, self.at = words, 0

  def take(self, shape) -> jax.Array:
    n = _size(shape)
    out = self.words[self.at:self.at + n].reshape(shape)
    self.at += n
    return out

  def share(self, value: jax.Array) -> jax.Array:
    """Additive shares `[2, ...]`: (value - r, r)."""
    r = self.take(value.shape)
    return jnp.stack([value - r, r])

  def xor_share(self, value: jax.Array) -> jax.Array:
    """XOR shares `[2, ...]`: (value ^ r, r)."""
    r = self.take(value.shape)
    return jnp.stack([value ^ r, r])


def _material(request: Request, out_shape: tuple, masks: dict, rand: _Stream) -> tuple:
  shape = request.shape
  if request.kind == "linear":
    a = rand.take(shape)
    return rand.share(a), rand.share(request.op(a, masks[request.layer]))
  if request.kind == "triple":
    a, b = rand.take(shape), rand.take(shape)
    return rand.share(a), rand.share(b), rand.share(a * b)
  if request.kind == "and":
    u, v = rand.take(shape), rand.take(shape)
    return rand.xor_share(u), rand.xor_share(v), rand.xor_share(u & v)
  bit = rand.take(shape) & np.uint64(1)  # "dabit"
  return rand.xor_share(bit) & np.uint64(1), rand.share(bit)


def generate(requests: list[tuple[Request, tuple]], masks: dict, key: jax.Array) -> list[tuple]:
  """The material of `requests` ((request, output shape) pairs), in order."""
  total = sum(_words(r, out) for r, out in requests)
  rand = _Stream(ring.random_ring(key, (total,)))
  return [_material(r, out, masks, rand) for r, out in requests]


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
      return zeros(request.shape), zeros(request.shape)
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
