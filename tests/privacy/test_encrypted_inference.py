"""Encrypted inference: ring, sharing, protocols against plaintext, message counts."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedsim import models
from privacy.encrypted_inference import channels, group_norm, network, protocol, ring

EDGES = np.array([0, 1, -1, 2**63 - 1, -2**63, 4096, -4096], np.int64).astype(np.uint64)
ULP = 2.0**-ring.FRAC_BITS


def run(fn, *args, masks=None):
  """Record, deal and run `fn(ch, dealer, *args)`: (output, channel totals)."""
  offline, online, counts = network.compile_protocol(fn, masks or {}, *args, jit=False)
  return online(offline(jax.random.key(7)), *args), counts


def shared(values, seed=0):
  return ring.share(jax.random.key(seed), ring.encode(values))


def test_share_reconstruct_round_trip():
  with ring.x64():
    x = jnp.concatenate([jnp.asarray(EDGES), ring.random_ring(jax.random.key(1), (500,))])
    np.testing.assert_array_equal(ring.reconstruct(ring.share(jax.random.key(2), x)), x)
    v = np.array([0.0, 1.5, -1.5, -1000.25, 3.0e6, ULP, -ULP])
    np.testing.assert_array_equal(ring.decode(ring.encode(v)), v)  # exact on the grid


def _byte_histogram(words, shift):
  return np.bincount(((words >> np.uint64(shift)) & np.uint64(255)).astype(np.int64),
                     minlength=256)


def test_one_share_alone_is_uniform_and_independent_of_the_secret():
  # 65,536 shares of each of two secrets; chi-square on the top and bottom byte of one
  # share, 255 degrees of freedom: 377.08 is the 1 - 1e-6 quantile (scipy.stats.chi2.ppf),
  # so each check fails a correct sharing with probability 1e-6 (here: fixed seeds).
  n = 65536
  with ring.x64():
    secrets = [jnp.zeros(n, ring.DTYPE), jnp.full(n, 2**63 + 12345, ring.DTYPE)]
    shares = [np.asarray(ring.share(jax.random.key(10 + i), s)) for i, s in enumerate(secrets)]
  for party in (0, 1):
    hists = []
    for s in shares:
      for shift in (0, 56):
        h = _byte_histogram(s[party], shift)
        assert ((h - n / 256)**2 / (n / 256)).sum() < 377.08
        hists.append(h)
    # Same distribution whatever the secret: two-sample chi-square, top byte.
    a, b = hists[1], hists[3]
    assert (((a - b)**2) / (a + b)).sum() < 377.08


def test_mul_and_truncation_within_fixed_point_error():
  a = np.concatenate([[0.0, -1e-4, 255.9, -255.9], np.random.default_rng(0).normal(0, 30, 200)])
  b = np.concatenate([[-7.0, 3.0, -1.0, 0.5], np.random.default_rng(1).normal(0, 5, 200)])
  with ring.x64():
    out, _ = run(lambda ch, d, x, y: protocol.mul(ch, d, x, y), shared(a), shared(b, 1))
    got = np.asarray(ring.decode(ring.reconstruct(out)))
  aq, bq = np.round(a / ULP) * ULP, np.round(b / ULP) * ULP
  np.testing.assert_array_less(np.abs(got - aq * bq), ULP + 1e-12)  # one truncation
  np.testing.assert_array_less(np.abs(got - a * b), (np.abs(a) + np.abs(b)) * ULP / 2 + 2 * ULP)


def test_conv_layer_equals_plaintext_within_one_ulp():
  # (Dense layers: the one-layer model below.)
  rng = np.random.default_rng(2)
  x, w = rng.normal(0, 2, (3, 6, 6, 2)), rng.normal(0, 0.5, (3, 3, 2, 4))
  bias = rng.normal(0, 1, 4)
  with ring.x64():
    ch = channels.Channel()
    params = {"params": {"layer": {"kernel": w, "bias": bias}}}
    model, masks = network.setup(ch, params, jax.random.key(3))
    op = network._op(w)
    out, counts = run(lambda c, d, xs: protocol.linear(
        c, d, xs, model["layer"]["w"], model["layer"]["f"], model["layer"]["b"], op, "layer"),
        shared(x), masks=masks)
    got = np.asarray(ring.decode(ring.reconstruct(out)))
    xq, wq = (np.asarray(ring.decode(ring.encode(v))) for v in (x, w))
    want = np.asarray(op(jnp.asarray(xq), jnp.asarray(wq))) + np.asarray(
        ring.decode(ring.encode(bias)))
  np.testing.assert_array_less(np.abs(got - want), ULP + 1e-9)
  assert counts["online_bytes"] == 2 * 8 * x.size and counts["rounds"] == 1


def _edges_and_random(bits, seed):
  """Ring elements of |x| < 2^(bits - 1): the range's edges and 300 random ones."""
  top = 2**(bits - 1)
  edges = np.array([0, 1, -1, 4096, -4096, top - 1, -top], np.int64)
  rand = np.asarray(ring.random_ring(jax.random.key(seed), (300,))).astype(np.int64)
  return jnp.asarray(np.concatenate([edges, rand >> (64 - bits)]).astype(np.uint64))


def test_sign_exact_on_every_edge_of_each_width():
  # 64 bits: every ring element; narrower words: exact on their stated range.
  with ring.x64():
    for bits, words in ((64, 12), (16, 8)):
      x = _edges_and_random(bits, bits)
      sign, counts = run(lambda ch, d, s: protocol.msb(ch, d, s, bits=bits),
                         ring.share(jax.random.key(5), x))
      negative = np.asarray(x).astype(np.int64) < 0
      np.testing.assert_array_equal(np.asarray(sign[0] ^ sign[1]), negative)
      per_element = words * 2 * 2 * bits // 8  # AND words: both parties open 2 words
      assert counts == {"online_bytes": per_element * x.size,
                        "rounds": int(math.log2(bits)) + 1,
                        "offline_bytes": words * 3 * bits // 8 * x.size + channels.SEED_BYTES,
                        "online_bytes_by_step": {"compare": per_element * x.size}}


def test_relu_exact_on_its_range():
  with ring.x64():
    x = _edges_and_random(protocol.COMPARE_BITS, 4)
    relu, counts = run(lambda ch, d, s: protocol.relu(ch, d, s), ring.share(jax.random.key(5), x))
    negative = np.asarray(x).astype(np.int64) < 0
    np.testing.assert_array_equal(np.asarray(ring.reconstruct(relu)),
                                  np.where(negative, 0, np.asarray(x)).astype(np.uint64))
  n = x.size  # 10 AND words of 32 bits, 2 bits to ring, a product with the bit
  assert counts["online_bytes"] == 160 * n + 2 * math.ceil(n / 8) + 32 * n
  assert counts["rounds"] == 6 + 1 + 1


def test_argmax_agrees_with_numpy_first_index_on_ties():
  # Shaped like the one-layer model's logits below, so the compiled steps are shared.
  logits = np.array([[-1e4, 1e4, -0.5], [1, 1, 0], [0, 1, 1], [2, 2, 2], [-ULP, 0, -ULP]])
  with ring.x64():
    out, _ = run(lambda ch, d, s: protocol.argmax(ch, d, s), shared(logits))
    one_hot = np.asarray(ring.reconstruct(out))
  np.testing.assert_array_equal(one_hot, np.eye(3, dtype=np.uint64)[logits.argmax(-1)])


def test_tanh_replacement_within_stated_error():
  edge = protocol.TANH_RANGE - 1e-3
  v = np.concatenate([np.linspace(-8, 8, 4001), [-4.5, 4.5, 0.0, -100.0, 100.0, -edge, edge]])
  with ring.x64():
    out, _ = run(lambda ch, d, s: protocol.tanh(ch, d, s), shared(v))
    got = np.asarray(ring.decode(ring.reconstruct(out)))
  assert np.abs(got - np.tanh(v)).max() < 7e-4


def _one_layer(classes=3, batch=5, features=16):
  """A dense model on 4x4 images, shared; returns (model, masks, input shares, params)."""
  rng = np.random.default_rng(6)
  params = {"params": {"head": {"kernel": rng.normal(0, 0.5, (features, classes)),
                                "bias": rng.normal(0, 0.1, classes)}}}
  x = rng.normal(0, 1, (batch, 4, 4, 1))
  with ring.x64():
    model, masks = network.setup(channels.Channel(), params, jax.random.key(8))
  return model, masks, x, params


def test_one_layer_model_byte_and_round_counts_match_hand_count():
  classes, batch, k = 3, 5, 16
  model, masks, x, _ = _one_layer(classes, batch, k)
  fn = network.inference_fn(network.sequential(("flatten", "head")), "logits")
  with ring.x64():
    (one_hot, logits), counts = run(fn, model, shared(x), masks=masks)
  pairs = classes * (classes - 1) // 2
  online = (2 * 8 * batch * k                    # open x - A
            + 10 * 2 * 2 * 4 * batch * pairs     # 3 comparisons: 10 AND words of 32 bits
            + 2 * math.ceil(batch * pairs / 8)   # their bits to ring
            + 2 * 2 * 8 * batch * classes        # product of each class's 2 wins
            + 8 * batch * 2 * classes)           # party 1 reveals one-hot and logits
  offline = (8 * (batch * k + batch * classes) + 10 * 3 * 4 * batch * pairs
             + math.ceil(batch * pairs / 8) + 8 * batch * pairs + 24 * batch * classes
             + channels.SEED_BYTES)
  assert (counts["online_bytes"], counts["offline_bytes"]) == (online, offline)
  assert counts["rounds"] == 1 + 6 + 1 + 1 + 1


def test_a_corrupted_share_changes_the_output():
  # Semi-honest security: a party that replaces its share is not detected, the output is
  # silently wrong (docs/encrypted_inference.md).
  model, masks, x, params = _one_layer()
  fn = network.inference_fn(network.sequential(("flatten", "head")), "logits")
  with ring.x64():
    xs = shared(x)
    (_, honest), _ = run(fn, model, xs, masks=masks)
    bad = xs.at[1].set(ring.random_ring(jax.random.key(9), xs[1].shape))
    (_, cheated), _ = run(fn, model, bad, masks=masks)
    honest, cheated = (np.asarray(ring.decode(v)) for v in (honest, cheated))
  head = params["params"]["head"]
  plain = x.reshape(len(x), -1) @ head["kernel"] + head["bias"]
  np.testing.assert_allclose(honest, plain, atol=1e-2)
  assert np.abs(cheated - plain).min() > 1.0


def test_max_pool_equals_flax_exactly():
  x = np.random.default_rng(10).normal(0, 3, (2, 5, 6, 3))  # odd height: SAME pads one side
  with ring.x64():
    want = np.asarray(nn.max_pool(ring.decode(ring.encode(x)), (3, 3), (2, 2), padding="SAME"))
    out, _ = run(lambda ch, d, s: protocol.max_pool(ch, d, s), shared(x))
    np.testing.assert_array_equal(np.asarray(ring.decode(ring.reconstruct(out))), want)


def test_group_norm_within_stated_error():
  # Groups whose standard deviations run from 0.05 to 200 (the inverse square root's
  # exponent search covers them all), a learned scale and bias.
  rng = np.random.default_rng(11)
  x = rng.normal(0, 1, (2, 3, 3, 16)) * np.repeat([0.05, 1, 30, 200], 4) + 3
  scale, bias = rng.normal(1, 0.3, 16), rng.normal(0, 0.3, 16)
  want = np.asarray(nn.GroupNorm(num_groups=8).apply(
      {"params": {"scale": scale, "bias": bias}}, x))
  with ring.x64():
    out, _ = run(lambda ch, d, s, g, b: group_norm.group_norm(ch, d, s, g, b, 8),
                 shared(x), shared(scale, 1), shared(bias, 2))
    got = np.asarray(ring.decode(ring.reconstruct(out)))
  groups = x.reshape(2, 3, 3, 8, 2)
  centred = np.abs(x - groups.mean((1, 2, 4)).repeat(2, -1)[:, None, None])
  std = groups.std((1, 2, 4)).repeat(2, -1)[:, None, None]
  # Stated: ~1e-3 relative, |x - mean| 2^-16, 2 ulp, and the inputs' rounding (2^-13
  # each, x and its mean) scaled by |scale| / std.
  bound = 2e-3 * np.abs(want) + centred * 2.0**-15 + np.abs(scale) * ULP / std + 4 * ULP
  np.testing.assert_array_less(np.abs(got - want), bound)


@pytest.mark.slow  # ~40-80 s of CPU compiling the ResNet-18 protocol
def test_resnet18_encrypted_logits_match_plaintext_on_a_tiny_input():
  # fedsim.models.ResNet18 at width 8 (channels 8 to 64), 8 px: stem, GroupNorm, strided
  # convolutions, 1x1 projections, residual sums, global mean, head.
  resnet = models.ResNet18(num_classes=3, width=8)
  x = np.random.default_rng(12).normal(0, 1, (2, 8, 8, 1)).astype(np.float32)
  params = jax.jit(resnet.init)(jax.random.key(1), x)  # one compilation, not op by op
  plain = np.asarray(jax.jit(resnet.apply)(params, x))
  with ring.x64():
    model, masks = network.setup(channels.Channel(), params, jax.random.key(8))
    fn = network.inference_fn(network.forward_fn("resnet18"), "logits")
    (one_hot, logits), counts = run(fn, model, shared(x), masks=masks)
    logits = np.asarray(ring.decode(logits))
  np.testing.assert_allclose(logits, plain, atol=0.02)
  np.testing.assert_array_equal(np.asarray(one_hot).argmax(-1), plain.argmax(-1))
