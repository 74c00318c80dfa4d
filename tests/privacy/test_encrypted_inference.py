"""Encrypted inference: ring, sharing, protocols against plaintext, message counts."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedsim import models
from privacy.encrypted_inference import channels, group_norm, network, protocol, ring
from privacy.encrypted_inference import dealer as dealer_lib

EDGES = np.array([0, 1, -1, 2**63 - 1, -2**63, 4096, -4096], np.int64).astype(np.uint64)
ULP = 2.0**-ring.FRAC_BITS


def run(fn, *args, masks=None):
  """Record, deal and run `fn(ch, dealer, *args)`: (output, channel totals)."""
  offline, online, counts = network.compile_protocol(fn, masks or {}, *args, jit=True)
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
    op = network.linear_op("conv", 1, limbs=True)  # the GPU path, bit-identical on the CPU
    out, counts = run(lambda c, d, xs: protocol.linear(
        c, d, xs, model["layer"]["w"], model["layer"]["f"], model["layer"]["b"], op, "layer"),
        shared(x), masks=masks)
    got = np.asarray(ring.decode(ring.reconstruct(out)))
    xq, wq = (np.asarray(ring.decode(ring.encode(v))) for v in (x, w))
    want = np.asarray(network.linear_op("conv")(jnp.asarray(xq), jnp.asarray(wq))) + np.asarray(
        ring.decode(ring.encode(bias)))
  np.testing.assert_array_less(np.abs(got - want), ULP + 1e-9)
  assert counts["online_bytes"] == 2 * 8 * x.size and counts["rounds"] == 1


def _edges_and_random(bits, seed):
  """Ring elements of |x| < 2^(bits - 1): the range's edges and 300 random ones."""
  top = 2**(bits - 1)
  edges = np.array([0, 1, -1, 4096, -4096, top - 1, -top], np.int64)
  rand = np.asarray(ring.random_ring(jax.random.key(seed), (300,))).astype(np.int64)
  return jnp.asarray(np.concatenate([edges, rand >> (64 - bits)]).astype(np.uint64))


def _full_range(seed, shape):
  """Uniform uint64 words `shape` with the limb edges planted at both ends."""
  edges = np.array([0, 1, 2**16 - 1, 2**16, 2**32 - 1, 2**48, 2**63 - 1, 2**63, 2**64 - 1],
                   np.uint64)
  flat = np.random.default_rng(seed).integers(0, 2**64 - 1, math.prod(shape), np.uint64,
                                              endpoint=True)
  flat[:len(edges)] = edges
  flat[-len(edges):] = edges[::-1]
  return jnp.asarray(flat.reshape(shape))


def test_limb_bilinear_is_bit_identical_to_the_uint64_op():
  # The float64 limb products are exact (each < 2^32, at most 4 K of them summed), so
  # conv (strides 1 and 2, 7x7 and 1x1) and dense equal the wrapping uint64 op bit for bit.
  cases = [("conv", 1, (2, 6, 6, 3), (3, 3, 3, 4)), ("conv", 2, (2, 9, 9, 2), (7, 7, 2, 3)),
           ("conv", 2, (1, 8, 8, 5), (1, 1, 5, 2)), ("dense", 1, (4, 37), (37, 5))]
  # The uint64 reference runs on the CPU (XLA:GPU has no uint64 convolution), the limbs on
  # the default device: on a GPU this checks cuDNN's float64 convolutions are exact too.
  def apply(limbs):
    ops = [network.linear_op(kind, stride, limbs=limbs) for kind, stride, _, _ in cases]
    return jax.jit(lambda xs, ws: [op(x, w) for op, x, w in zip(ops, xs, ws)])

  with ring.x64():
    xs = [_full_range(20 + i, c[2]) for i, c in enumerate(cases)]
    ws = [_full_range(40 + i, c[3]) for i, c in enumerate(cases)]
    wants = apply(False)(*jax.device_put((xs, ws), jax.devices("cpu")[0]))
    for want, got in zip(wants, apply(True)(xs, ws)):
      assert got.dtype == jnp.uint64
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    too_long = jax.ShapeDtypeStruct((1, ring.MAX_REDUCTION + 1), jnp.uint64)
    with pytest.raises(ValueError, match="reduction length"):
      jax.eval_shape(network.linear_op("dense", 1, limbs=True), too_long,
                     jax.ShapeDtypeStruct((ring.MAX_REDUCTION + 1, 1), jnp.uint64))


def _uint64_linear_ops(text: str) -> list[str]:
  """The convolutions and matmuls on uint64 in a compiled program (HLO text)."""
  return [line for line in text.splitlines()
          if ("convolution(" in line or " dot(" in line) and "= u64[" in line]


def test_limbs_protocol_has_no_uint64_convolution_and_equals_the_uint64_one():
  # XLA:GPU has no uint64 convolution: with linear="limbs" neither the dealer's program
  # nor the parties' has one (checked on the lowered programs, no GPU needed), and the
  # protocol's output is bit-identical to the uint64 protocol's with the same randomness.
  rng = np.random.default_rng(12)
  params = {"params": {"conv1": {"kernel": rng.normal(0, 0.5, (3, 3, 1, 2)),
                                 "bias": rng.normal(0, 0.1, 2)},
                       "head": {"kernel": rng.normal(0, 0.5, (32, 3)),
                                "bias": rng.normal(0, 0.1, 3)}}}
  outputs, key = {}, jax.random.key(13)
  with ring.x64():
    model, masks = network.setup(channels.Channel(), params, jax.random.key(14))
    x = shared(rng.normal(0, 1, (2, 4, 4, 1)))
    for linear, device in (("limbs", None), ("uint64", jax.devices("cpu")[0])):
      fn = network.inference_fn(network.sequential(("conv1", "relu", "flatten", "head"),
                                                   linear), "logits")
      with jax.default_device(device):  # uint64 convolutions: CPU only
        offline, online, _ = network.compile_protocol(fn, masks, model, x)
      args = jax.device_put((key, model, x), device)
      material = offline(args[0])
      found = _uint64_linear_ops("\n".join(p.as_text() for p in offline.programs +
                                             online.programs))
      assert (not found) if linear == "limbs" else found  # the check sees uint64 ops
      outputs[linear] = np.asarray(online(material, *args[1:])[1])
  np.testing.assert_array_equal(outputs["limbs"], outputs["uint64"])


def test_dealer_material_from_two_seeds_is_exact_and_uniform():
  # Each party's random shares are its own seed's words (so only corrections are sent);
  # the dealt values reconstruct exactly; every share alone is uniform (chi-square on one
  # byte, 255 degrees of freedom, 1e-6 false-failure quantile 377.08, fixed seed).
  n = 65536
  kinds = ("triple", "and", "dabit", "square", "and_private")
  reqs = [(dealer_lib.Request(kind, (n,), bits=16 if "and" in kind else 64), ()) for kind in kinds]
  key = jax.random.key(11)
  with ring.x64():
    material = dealer_lib.generate(reqs, {}, key)
    words0 = np.asarray(dealer_lib.party_words(key, 0, 0, 3 * n))  # request 0's
    words1 = np.asarray(dealer_lib.party_words(key, 1, 0, 2 * n))
  (a, b, c), (u, v, w), (rb, ra), (sa, sc), (pu, pv, pw) = (
      [np.asarray(t) for t in m] for m in material)
  np.testing.assert_array_equal(np.stack([a[0], b[0], c[0]]).reshape(-1), words0)
  np.testing.assert_array_equal(np.stack([a[1], b[1]]).reshape(-1), words1)
  np.testing.assert_array_equal(c[0] + c[1], (a[0] + a[1]) * (b[0] + b[1]))
  np.testing.assert_array_equal(sc[0] + sc[1], (sa[0] + sa[1])**2)
  np.testing.assert_array_equal(w[0] ^ w[1], (u[0] ^ u[1]) & (v[0] ^ v[1]))
  np.testing.assert_array_equal(pw[0] ^ pw[1], pu & pv)  # u party 0's alone, v party 1's
  np.testing.assert_array_equal(ra[0] + ra[1], (rb[0] ^ rb[1]).astype(np.uint64))
  assert set(np.unique(rb)) == {0, 1}
  for share in (c[0], c[1], u[1], w[1], ra[1]):
    h = np.bincount((share.astype(np.uint64) & np.uint64(255)).astype(np.int64), minlength=256)
    assert ((h - n / 256)**2 / (n / 256)).sum() < 377.08


def _and_bytes(bits: int, n: int) -> tuple[int, int]:
  """Bytes of one opened operand over a `bits`-bit comparison of n values, counted by
  hand: (G of the parties' own words: n words, the tree: each level's G and P pairs, 2n
  values of half the width, packed into bytes below 8 bits, and the last level's single
  AND, n bits)."""
  tree, width = 0, bits // 2
  while width >= 2:
    tree += math.ceil(2 * n * width / 8)
    width //= 2
  return n * bits // 8, tree + math.ceil(n / 8)


def _compare_bytes(bits: int, n: int) -> tuple[int, int]:
  """(online, offline) bytes of n comparisons: G's AND sends one value each way, a tree
  AND two; the dealer sends one correction per AND output."""
  g, tree = _and_bytes(bits, n)
  return 2 * g + 4 * tree, g + tree


def test_sign_exact_on_every_edge_of_each_width():
  # 64 bits: every ring element; narrower words: exact on their stated range.
  with ring.x64():
    for bits in (64, 16):
      x = _edges_and_random(bits, bits)
      sign, counts = run(lambda ch, d, s: protocol.msb(ch, d, s, bits=bits),
                         ring.share(jax.random.key(5), x))
      negative = np.asarray(x).astype(np.int64) < 0
      np.testing.assert_array_equal(np.asarray(sign[0] ^ sign[1]), negative)
      online, offline = _compare_bytes(bits, x.size)
      assert counts == {"online_bytes": online, "rounds": int(math.log2(bits)) + 1,
                        "offline_bytes": offline + 2 * channels.SEED_BYTES,
                        "online_bytes_by_step": {"compare": online}}
  assert sum(_and_bytes(16, 8)) == 8 * (3 * 16 - 3) // 8  # 3 w - 3 gates per comparison


def test_relu_exact_on_its_range():
  with ring.x64():
    x = _edges_and_random(protocol.COMPARE_BITS, 4)
    relu, counts = run(lambda ch, d, s: protocol.relu(ch, d, s), ring.share(jax.random.key(5), x))
    negative = np.asarray(x).astype(np.int64) < 0
    np.testing.assert_array_equal(np.asarray(ring.reconstruct(relu)),
                                  np.where(negative, 0, np.asarray(x)).astype(np.uint64))
  n = x.size  # a 32-bit comparison, 2 bits to ring, a product with the bit
  assert counts["online_bytes"] == _compare_bytes(32, n)[0] + 2 * math.ceil(n / 8) + 32 * n
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
            + _compare_bytes(32, batch * pairs)[0]  # 3 comparisons in 32 bits
            + 2 * math.ceil(batch * pairs / 8)   # their bits to ring
            + 2 * 2 * 8 * batch * classes        # product of each class's 2 wins
            + 8 * batch * 2 * classes)           # party 1 reveals one-hot and logits
  # The dealer sends party 1 one correction per computed value: C, the AND outputs,
  # the bits' ring shares, the products' c; the rest comes from the two seeds.
  offline = (8 * batch * classes + _compare_bytes(32, batch * pairs)[1] + 8 * batch * pairs
             + 8 * batch * classes + 2 * channels.SEED_BYTES)
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
  mean = np.abs(groups.mean((1, 2, 4))).repeat(2, -1)[:, None, None]
  # Stated: ~1e-3 relative, |x - mean| 2^-16, 2 ulp, and the error of x - mean (x's
  # rounding 2^-13, the group mean's ring.divide_public: 2 ulp + |mean| 2^-12) scaled by
  # |scale| / std.
  shift = (2.5 * ULP + mean * ULP) / std
  bound = 2e-3 * np.abs(want) + centred * 2.0**-15 + np.abs(scale) * shift + 4 * ULP
  np.testing.assert_array_less(np.abs(got - want), bound)


@pytest.mark.slow  # ~20 s, 35 s under -n 2 (the suite budget); pieces: test_encrypted_compile
def test_resnet18_encrypted_logits_match_plaintext_on_a_tiny_input():
  # fedsim.models.ResNet18 at width 8 (channels 8 to 64), 8 px: stem, GroupNorm, strided
  # convolutions, 1x1 projections, residual sums, global mean, head. Compiled in pieces
  # (~20 s; the whole program took 40-80 s): its 103 pieces (21 linear layers, 21 x 3 for
  # GroupNorm, 17 ReLUs, mean, output) are 27 programs (12 linear, 4 + 1 + 4 GroupNorm,
  # 4 ReLU, mean, output), the material 26 (the mean asks for none) and 2 shared draws.
  resnet = models.ResNet18(num_classes=3, width=8)
  x = np.random.default_rng(12).normal(0, 1, (2, 8, 8, 1)).astype(np.float32)
  params = jax.jit(resnet.init)(jax.random.key(1), x)  # one compilation, not op by op
  plain = np.asarray(jax.jit(resnet.apply)(params, x))
  with ring.x64():
    model, masks = network.setup(channels.Channel(), params, jax.random.key(8))
    fn = network.inference_fn(network.forward_fn("resnet18"), "logits")
    offline, online, _ = network.compile_protocol(fn, masks, model, shared(x))
    one_hot, logits = online(offline(jax.random.key(7)), model, shared(x))
    logits = np.asarray(ring.decode(logits))
  assert (len(online.programs), len(offline.programs)) == (27, 28)
  np.testing.assert_allclose(logits, plain, atol=0.02)
  np.testing.assert_array_equal(np.asarray(one_hot).argmax(-1), plain.argmax(-1))
