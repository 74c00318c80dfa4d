"""Encrypted inference compiled in pieces: the same material, outputs and counts as the
protocol compiled as one program, with same-shaped pieces sharing a program."""

import functools

import flax.linen as nn
import jax
import numpy as np

from privacy.encrypted_inference import channels, group_norm, network, ring
from privacy.encrypted_inference import dealer as dealer_lib


def _whole_program(fn, masks, key, *args):
  """The protocol as one jitted program per phase (compile_protocol before pieces):
  (material, output, channel totals)."""
  ch = channels.Channel()
  recorder = dealer_lib.Recorder(ch)
  jax.eval_shape(functools.partial(fn, ch, recorder), *args)
  material = jax.jit(lambda k: dealer_lib.generate(recorder.requests, masks, k))(key)
  online = jax.jit(lambda m, *a: fn(channels.Channel(), dealer_lib.Replay(m), *a))
  return material, online(material, *args), ch.totals()


def test_pieces_are_bit_identical_to_the_whole_program(monkeypatch):
  # Two same-shaped convolutions (one program, each layer's own mask), two ReLUs (one
  # program), GroupNorm's three pieces; small draws lowered so that some requests get their
  # own draw and the rest share one (each group finds its words by index and offset).
  monkeypatch.setattr(dealer_lib, "OWN_DRAW_WORDS", 200)
  rng = np.random.default_rng(3)
  conv = lambda: {"kernel": rng.normal(0, 0.4, (3, 3, 4, 4)), "bias": rng.normal(0, 0.1, 4)}
  params = {"params": {"conv1": conv(), "conv2": conv(),
                       "norm": {"scale": rng.normal(1, 0.2, 4), "bias": rng.normal(0, 0.2, 4)}}}
  x = rng.normal(0, 1, (2, 4, 4, 4))
  forward = network.sequential(("conv1", "relu", "conv2", "relu"))

  def fn(ch, dealer, model, xs):
    y = forward(ch, dealer, model, xs)
    return group_norm.group_norm(ch, dealer, y, model["norm"]["scale"], model["norm"]["b"], 2)

  key = jax.random.key(5)
  with ring.x64():
    model, masks = network.setup(channels.Channel(), params, jax.random.key(4))
    xs = ring.share(jax.random.key(6), ring.encode(x))
    offline, online, counts = network.compile_protocol(fn, masks, model, xs)
    material = offline(key)
    out = online(material, model, xs)
    whole_material, whole_out, whole_counts = _whole_program(fn, masks, key, model, xs)
    got = np.asarray(ring.decode(ring.reconstruct(out)))
  assert counts == whole_counts
  assert jax.tree.all(jax.tree.map(np.array_equal, material, whole_material))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(whole_out))
  # 7 pieces: conv, relu, conv, relu, statistics, inverse sqrt, normalisation; 5 programs
  # each side (plus the two shared draws).
  assert (len(offline.programs), len(online.programs)) == (7, 5)
  p = params["params"]
  plain = lambda v, w: nn.relu(jax.lax.conv_general_dilated(
      v, w["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + w["bias"])
  want = nn.GroupNorm(num_groups=2).apply({"params": p["norm"]},
                                          plain(plain(x, p["conv1"]), p["conv2"]))
  np.testing.assert_allclose(got, want, atol=0.02)
