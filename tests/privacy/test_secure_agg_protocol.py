"""One secure-aggregation round, end to end: exact unmasked sums, dropouts, graphs, noise.

Chunking, blocks and rotation inside the compiled round: tests/fedsim/test_secure_agg_round.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from privacy.secure_agg import graph, protocol

CAPACITY, N, D, BITS, SCALE = 8, 7, 21, 20, 16.0
chunk_sums = jax.jit(protocol.chunk_sums, static_argnums=0)


def _spec():
  return protocol.Spec(bits=BITS, scale=SCALE, clip_norm=1e9, rotate=False, size=D)


def _plan(k, threshold, sent, alive, seed=0):
  """A round with the given dropouts, checked recoverable as `plan_round` would."""
  g = graph.neighbour_graph(np.random.default_rng(seed), n=N, capacity=CAPACITY, k=k)
  pad = lambda a: np.concatenate([np.asarray(a, bool), np.zeros(CAPACITY - N, bool)])
  plan = protocol.RoundPlan(N, g, pad(sent), pad(alive), threshold)
  protocol.check_round(plan, round_index=1)
  return plan


def _round(spec, plan, x, chunk, server_sent=None):
  """The hospitals' chunk sums added up, then the server's unmasking: (sums, ring total).

  `server_sent`: who the server believes sent (default: who did)."""
  hospital_keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(5),
                                                          jnp.arange(CAPACITY))
  secrets = protocol.deal(jax.random.key_data(hospital_keys), plan.threshold,
                          holders=plan.graph.neighbours.shape[1] + 1)
  rotation = jax.random.key(6)
  inputs = protocol.client_inputs(spec, plan, secrets, rotation)
  weights = jnp.asarray(plan.sent, jnp.float32)
  total = None
  for start in range(0, CAPACITY, chunk):
    part = lambda a: a[start:start + chunk]
    sums = chunk_sums(spec, {"w": part(x)}, part(weights), jax.tree.map(part, inputs))
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  ring = protocol.unmask(spec.bits, total.masked, secrets, jnp.asarray(plan.graph.neighbours),
                         jnp.asarray(plan.graph.valid), jnp.arange(CAPACITY) < N,
                         jnp.asarray(plan.sent if server_sent is None else server_sent),
                         jnp.asarray(plan.alive), plan.threshold)
  return total, ring, rotation


def _integer_updates(seed, low=-2000, high=2000):
  """Updates on the quantisation grid (x * scale integral: the rounding is exact)."""
  rng = np.random.default_rng(seed)
  q = rng.integers(low, high, size=(CAPACITY, D))
  return jnp.asarray(q / SCALE, jnp.float32), q


ALL = [True] * N
# (sent, alive): up to n - t = 3 hospitals lost, before and after sending.
DROPOUTS = [(ALL, ALL),
            ([True, False, True, True, False, True, True], [True, False, True, True, False,
                                                            True, True]),
            ([True, True, False, True, True, True, True], [True, False, False, True, True,
                                                           False, True])]


@pytest.mark.parametrize("k,threshold", [(0, 4), (4, 2)], ids=["complete", "secagg+k4"])
@pytest.mark.parametrize("sent,alive", DROPOUTS, ids=["none", "before", "before+after"])
def test_unmasked_sum_is_the_exact_integer_sum_of_the_senders(k, threshold, sent, alive):
  plan = _plan(k, threshold=threshold, sent=sent, alive=alive)
  x, q = _integer_updates(1)
  sums, ring, _ = _round(_spec(), plan, x, chunk=CAPACITY)
  expected = q[plan.sent].sum(0) % 2**BITS
  np.testing.assert_array_equal(np.asarray(ring), expected)
  # The server's view was masked: its raw sum is not the plaintext sum.
  assert not np.array_equal(np.asarray(sums.masked) % 2**BITS, expected)
  # The exact sum parts carried for the report agree with numpy's sum.
  exact = np.asarray(sums.high, np.int64) * 2**16 + np.asarray(sums.low, np.int64)
  np.testing.assert_array_equal(exact, q[plan.sent].sum(0))


def test_overflow_is_counted_and_wraps():
  bits = BITS  # sums must stay in [-2^19, 2^19)
  plan = _plan(0, threshold=4, sent=ALL, alive=ALL)
  x, q = _integer_updates(4, low=-2**18, high=2**18)
  spec = _spec()
  sums, ring, rotation = _round(spec, plan, x, chunk=CAPACITY)
  true = q[plan.sent].sum(0)
  outside = (true < -2**(bits - 1)) | (true >= 2**(bits - 1))
  assert 0 < outside.sum() < D
  report = protocol.report(spec, sums, protocol.decode(spec, ring, rotation))
  assert int(report["secagg_overflows"]) == outside.sum()
  decoded = np.asarray(protocol.decode(spec, ring, rotation)) * SCALE
  np.testing.assert_array_equal(decoded[~outside], true[~outside])
  np.testing.assert_array_equal((decoded[outside] - true[outside]) % 2**bits, 0)
  assert np.all(decoded[outside] != true[outside])


def test_fewer_than_t_survivors_fails_loudly_naming_the_round():
  rng = np.random.default_rng(0)
  with pytest.raises(protocol.SecureAggregationError,
                     match=r"round 7: threshold t=6 not met \(cohort 7, dropped before sending"):
    protocol.plan_round(rng, n=7, capacity=8, neighbours=0, threshold=6, dropout_before=0.5,
                        dropout_after=0.0, round_index=7)
  plan = protocol.plan_round(rng, n=7, capacity=8, neighbours=0, threshold=7,
                             dropout_before=0.0, dropout_after=0.0, round_index=1)
  assert plan.stats() == {"secagg_survivors": 7, "secagg_dropped_before": 0,
                          "secagg_dropped_after": 0}
  # SecAgg+: a hospital with every neighbour gone cannot be unmasked even if most survive.
  with pytest.raises(protocol.SecureAggregationError, match="shares among survivors"):
    for seed in range(50):
      protocol.plan_round(np.random.default_rng(seed), n=7, capacity=8, neighbours=2,
                          threshold=3, dropout_before=0.0, dropout_after=0.3, round_index=2)


def test_dropouts_do_not_depend_on_the_padding_of_the_cohort():
  """The ledger replays a round's senders from the config: the same n draws the same."""
  plans = [protocol.plan_round(np.random.default_rng(3), n=7, capacity=c, neighbours=k,
                               threshold=1, dropout_before=0.3, dropout_after=0.3,
                               round_index=1) for c, k in ((8, 0), (16, 0), (16, 4))]
  for plan in plans:
    np.testing.assert_array_equal(plan.sent[:7], plans[0].sent[:7])
    np.testing.assert_array_equal(plan.alive[:7], plans[0].alive[:7])
    assert not plan.sent[7:].any()
  assert 0 < plans[0].sent.sum() < 7 and plans[0].alive.sum() < plans[0].sent.sum()


def test_secagg_plus_graph_is_k_regular_symmetric_and_fresh_each_round():
  n, k = 20, 6
  graphs = [graph.neighbour_graph(np.random.default_rng(r), n=n, capacity=24, k=k)
            for r in (1, 2)]
  for g in graphs:
    adjacency = np.zeros((24, 24), bool)
    rows = np.repeat(np.arange(24), k)
    adjacency[rows[g.valid.ravel()], g.neighbours.ravel()[g.valid.ravel()]] = True
    np.testing.assert_array_equal(adjacency, adjacency.T)
    np.testing.assert_array_equal(adjacency.sum(1), [k] * n + [0] * 4)
  assert not np.array_equal(graphs[0].neighbours, graphs[1].neighbours)


@pytest.mark.parametrize("bits", [8, 32])
def test_exact_sums_at_the_ring_edges_and_the_dropout_correction_is_needed(bits):
  """8 bits wrap, 32 bits use every uint32 bit; ignoring the dropouts leaves masks behind."""
  spec = dataclasses.replace(_spec(), bits=bits)
  sent = [True, False, True, True, False, True, True]
  plan = _plan(0, threshold=4, sent=sent, alive=sent)
  x, q = _integer_updates(2)
  _, ring, _ = _round(spec, plan, x, chunk=4)
  expected = q[plan.sent].sum(0) % 2**bits
  np.testing.assert_array_equal(np.asarray(ring), expected)
  _, as_if_none_dropped, _ = _round(spec, plan, x, chunk=4, server_sent=np.arange(CAPACITY) < N)
  assert not np.array_equal(np.asarray(as_if_none_dropped), expected)


# Chi-square rejects at 1e-6 (false-failure probability; deterministic with the fixed seeds).
_ALPHA = 1e-6


@pytest.mark.parametrize("bits", [8, 32])
def test_a_single_masked_input_is_uniform_and_independent_of_its_plaintext(bits):
  """One hospital's masked input over 4096 coordinates, for a zero and a spiky plaintext:
  each histogram (top 8 bits) uniform, the two alike, and the unmasked spiky one not."""
  d, top = 4096, 8
  spec = protocol.Spec(bits=bits, scale=1.0, clip_norm=1e9, rotate=False, size=d)
  inputs = protocol.ClientInputs(
      jnp.array([3, 4], jnp.uint32), jnp.int32(0), jnp.array([1, 2]),
      jnp.array([[7, 8], [9, 10]], jnp.uint32), jnp.array([True, True]), jnp.bool_(True),
      jnp.array([0, 0], jnp.uint32))
  spiky = jnp.full((d,), 2**bits - 1, jnp.uint32).at[::2].set(2 ** (bits - 1))
  histogram = lambda v: np.bincount(np.asarray(v) >> (bits - top), minlength=2**top)
  hists = [histogram(protocol.masked_input(spec, x, inputs))
           for x in (jnp.zeros((d,), jnp.uint32), spiky)]
  for h in hists:
    assert scipy.stats.chisquare(h).pvalue > _ALPHA
  assert scipy.stats.chi2_contingency(np.stack(hists))[1] > _ALPHA
  assert scipy.stats.chisquare(histogram(spiky)).pvalue < _ALPHA  # the test has power


@pytest.mark.parametrize("noise", ["skellam", "gaussian"])
def test_distributed_noise_of_the_senders_has_the_target_variance(noise):
  """Shares of t - 1 = 2 senders carry (z D)^2; 7 senders carry 7/2 of it. (Gaussian shares
  are rounded too: + <= 1/4 step^2 each, 4e-5 of the variance here.)"""
  d, z, scale, t = 2048, 1.0, 64.0, 3
  stddev = protocol.distributed_noise(noise_multiplier=z, clip_norm=1.0, scale=scale,
                                      padded=d, threshold=t)
  np.testing.assert_allclose(stddev**2 * (t - 1), (z * (scale + np.sqrt(d)))**2)
  spec = protocol.Spec(bits=32, scale=scale, clip_norm=1.0, rotate=False, size=d,
                       noise=noise, noise_stddev=stddev)
  plan = _plan(0, threshold=t, sent=ALL, alive=ALL)
  hospital_keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(8),
                                                          jnp.arange(CAPACITY))
  secrets = protocol.deal(jax.random.key_data(hospital_keys), t, holders=CAPACITY)
  inputs = protocol.client_inputs(spec, plan, secrets, jax.random.key(6))
  sums = chunk_sums(spec, {"w": jnp.zeros((CAPACITY, d))}, jnp.asarray(plan.sent, jnp.float32),
                    inputs)
  # The plaintexts are zeros, so the senders' exact integer sum is their noise (unmasking
  # recovers it mod 2^bits, tested above).
  noise = np.asarray(sums.high, np.int64) * 2**16 + np.asarray(sums.low, np.int64)
  target = N * stddev**2
  stat = (d - 1) * noise.var(ddof=1) / target  # chi-square with d - 1 degrees of freedom
  chi2 = scipy.stats.chi2(d - 1)
  assert _ALPHA / 2 < chi2.cdf(stat) < 1 - _ALPHA / 2
  assert abs(noise.mean()) < 5.3 * np.sqrt(target / d)  # two-sided 1e-7


def test_range_scale_leaves_room_for_updates_rounding_and_noise():
  kwargs = dict(bits=16, hospitals=10, weight=1.0, clip_norm=1.0, padded=1024)
  s = protocol.range_scale(**kwargs)
  assert 10 * s + 10 <= 2**15 - 1 < 10 * (s * 1.001) + 10
  assert protocol.range_scale(**kwargs, noise_multiplier=1.0, threshold=5) < s
  with pytest.raises(ValueError, match="secure_agg.bits=8 is too small for 10 hospitals and"):
    protocol.range_scale(**{**kwargs, "bits": 8}, noise_multiplier=1.0, threshold=5)
