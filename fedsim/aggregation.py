"""Aggregation: from the clients' (transformed) deltas to the server's mean delta.

Every step of it lives here: the weight of each client, the weighted sum over a
chunk of clients (`aggregate`, the one seam where secure aggregation plugs in),
and the division by the total weight (`weighted_mean`). Padded clients carry
weight 0 and contribute exactly zero, even when their delta is not finite.
With `secure_agg.enabled` the chunk sum is `SecureAggregation.aggregate` (masked
fixed-point encodings, summed modularly) and the round's sum is unmasked and
decoded by `SecureAggregation.finish` before the mean.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import flatten_util

from fedsim import keys, sampling
from privacy.secure_agg import encoding, protocol

PyTree = Any
WEIGHTINGS = ("examples", "uniform")


def client_weights(counts: jax.Array, valid: jax.Array, weighting: str) -> jax.Array:
  """Aggregation weight of each client `[c]`: its examples, or 1; 0 when padded.

  >>> client_weights(jnp.array([3, 5, 7]), jnp.array([True, True, False]), "examples")
  Array([3., 5., 0.], dtype=float32)
  """
  if weighting == "examples":
    w = counts.astype(jnp.float32)
  elif weighting == "uniform":
    w = jnp.ones(counts.shape, jnp.float32)
  else:
    raise ValueError(f"server.weighting={weighting!r} must be one of {list(WEIGHTINGS)}")
  return jnp.where(valid, w, 0.0)


def aggregate(deltas: PyTree, weights: jax.Array) -> PyTree:
  """`sum_k weights[k] * deltas[k]` over the leading client axis of a chunk.

  Padded clients (weight 0) contribute exactly zero even if their delta is not
  finite: `where`, not multiplication. Chunk sums add up to the round's sum.

  >>> aggregate({"w": jnp.array([[1.0, 2.0], [jnp.nan, 0.0]])}, jnp.array([2.0, 0.0]))
  {'w': Array([2., 4.], dtype=float32)}
  """
  def leaf_sum(d):
    w = weights.reshape((-1,) + (1,) * (d.ndim - 1))
    return jnp.sum(jnp.where(w != 0, w * d, 0.0), axis=0)
  return jax.tree.map(leaf_sum, deltas)


def weighted_mean(delta_sum: PyTree, weight_sum: jax.Array) -> tuple[PyTree, jax.Array]:
  """`(delta_sum / weight_sum, any client?)`; the mean is zero when no client took part.

  Stays on the device (no host read of the total), so the round step is one
  traceable function whatever the cohort drawn.
  """
  has_clients = weight_sum > 0
  safe = jnp.where(has_clients, weight_sum, 1.0)
  return jax.tree.map(lambda d: d / safe, delta_sum), has_clients


class SecureRound(NamedTuple):
  """One round's secure-aggregation setup (`SecureAggregation.begin_round`)."""

  plan: protocol.RoundPlan
  secrets: protocol.RoundSecrets
  inputs: protocol.ClientInputs  # per cohort slot
  rotation: jax.Array


@dataclasses.dataclass(frozen=True)
class SecureAggregation:
  """`secure_agg.enabled`: the chunk sum is the hospitals' masked encodings
  (privacy/secure_agg/protocol.py); the server unmasks and decodes the round's modular
  sum before the mean (`finish`). Built by `secure_aggregation`."""

  spec: protocol.Spec
  unravel: Callable          # flat [D] -> the delta pytree
  seed: int
  block: int                 # cohort slots per block
  cohort_bound: int          # cohort size planned for (fixed, or Poisson E + 3 std)
  neighbours: int
  threshold: int             # 0: a majority of each neighbourhood
  dropout_before: float
  dropout_after: float
  noise_multiplier: float    # > 0: distributed noise replaces the server's (DP-FedAvg's z)

  def aggregate(self, deltas: PyTree, weights: jax.Array,
                inputs: protocol.ClientInputs) -> protocol.SecureSums:
    """The chunk's sums (`make_block_fn`'s aggregate): masked, exact and plain."""
    return protocol.chunk_sums(self.spec, deltas, weights, inputs)

  def round_threshold(self, n: int) -> int:
    """t for a cohort of n: `secure_agg.threshold`, or a majority of a neighbourhood."""
    if self.threshold:
      return self.threshold
    return min(n, self.neighbours + 1 if self.neighbours else n) // 2 + 1

  def begin_round(self, cohort: np.ndarray, round_index: int) -> SecureRound:
    """Graph, dropouts, secrets and shares of round `round_index` (fails loudly if the
    survivors cannot unmask it: `protocol.SecureAggregationError`)."""
    n = len(cohort)  # slots: whole blocks, at least the planned cohort's (shapes stay put)
    capacity = max(1, -(-n // self.block), -(-self.cohort_bound // self.block)) * self.block
    threshold = self.round_threshold(n)
    plan = protocol.plan_round(
        sampling.round_rng(self.seed, round_index, keys.DROPOUTS), n=n, capacity=capacity,
        neighbours=self.neighbours, threshold=threshold, dropout_before=self.dropout_before,
        dropout_after=self.dropout_after, round_index=round_index)
    key = keys.secure_agg_key(self.seed, round_index)
    ids = jnp.asarray(np.concatenate([cohort, np.zeros(capacity - n, cohort.dtype)]))
    hospital_keys = jax.vmap(jax.random.fold_in, (None, 0))(
        jax.random.fold_in(key, keys.HOSPITALS), ids)
    secrets = protocol.deal(jax.random.key_data(hospital_keys), jnp.int32(threshold),
                            holders=plan.graph.neighbours.shape[1] + 1)
    rotation = jax.random.fold_in(key, keys.ROTATION)
    return SecureRound(plan, secrets, protocol.client_inputs(self.spec, plan, secrets, rotation),
                       rotation)

  def block_inputs(self, secure: SecureRound, index: int, valid: np.ndarray):
    """Block `index`'s `(inputs, valid)`: its slots, and only hospitals that sent count."""
    slots = slice(index * self.block, (index + 1) * self.block)
    return (jax.tree.map(lambda a: a[slots], secure.inputs),
            valid & secure.plan.sent[slots])

  def finish(self, sums, secure: SecureRound):
    """The server's step: `(sums with the decoded float delta sum, round stats)`."""
    plan = secure.plan
    total = protocol.unmask(
        self.spec.bits, sums.delta_sum.masked, secure.secrets, jnp.asarray(plan.graph.neighbours),
        jnp.asarray(plan.graph.valid), jnp.arange(plan.sent.shape[0]) < plan.n,
        jnp.asarray(plan.sent), jnp.asarray(plan.alive), jnp.int32(plan.threshold))
    decoded = protocol.decode(self.spec, total, secure.rotation)
    stats = {**protocol.report(self.spec, sums.delta_sum, decoded), **plan.stats()}
    if self.noise_multiplier:  # the noise that survived, as the ledger charges it
      stats["secagg_noise_multiplier"] = protocol.surviving_noise_multiplier(
          self.noise_multiplier, senders=int(plan.sent.sum()), threshold=plan.threshold)
    return sums._replace(delta_sum=self.unravel(decoded)), stats


def round_senders(config, round_index: int) -> int:
  """How many hospitals of round `round_index`'s cohort send their masked input: the draw
  `SecureAggregation.begin_round` makes, replayed from the config alone (for the ledger)."""
  sa = config.secure_agg
  n = len(sampling.cohort_for_round(config, round_index))
  rng = sampling.round_rng(config.seed, round_index, keys.DROPOUTS)
  return int(protocol.draw_dropouts(rng, n, sa.dropout_before, sa.dropout_after)[0].sum())


def charged_noise_multiplier(config, round_index: int) -> float | None:
  """The noise multiplier round `round_index` is accounted with: with distributed noise, the
  one that survived its dropouts (`protocol.surviving_noise_multiplier`); else None (the
  configured one)."""
  sa = config.secure_agg
  if not (sa.enabled and sa.distributed_noise != "none"):
    return None
  return protocol.surviving_noise_multiplier(
      config.dp.noise_multiplier, senders=round_senders(config, round_index),
      threshold=sa.threshold)


def secure_aggregation(config, params: PyTree, *, block: int, cohort_bound: int,
                       max_weight: float) -> SecureAggregation:
  """The `config.secure_agg` mechanism for updates shaped like `params` (validated config).

  The encoding range: each delta is clipped to `secure_agg.clip_norm` (0: `dp.clip_norm`,
  which DP-FedAvg already clipped to) and multiplied by its weight (<= `max_weight`);
  `secure_agg.scale = 0` takes the largest scale at which `cohort_bound` such updates
  (and their distributed noise) cannot overflow (`protocol.range_scale`).
  With `secure_agg.distributed_noise`, each sender adds the share of DP-FedAvg's noise that
  makes any t - 1 senders' noise the accounted N(0, (z D)^2) (`protocol.distributed_noise`);
  the server then adds none.
  """
  sa = config.secure_agg
  flat, unravel = flatten_util.ravel_pytree(
      jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
  clip_norm = sa.clip_norm or config.dp.clip_norm
  padded = encoding.padded_size(flat.shape[0]) if sa.rotate else flat.shape[0]
  z = config.dp.noise_multiplier if sa.distributed_noise != "none" else 0.0
  scale = sa.scale or protocol.range_scale(
      bits=sa.bits, hospitals=cohort_bound, weight=max_weight, clip_norm=clip_norm,
      padded=padded, noise_multiplier=z, threshold=sa.threshold)
  if z and not sa.scale:  # no finer than the noise (its shares stay within int32 draws)
    scale = min(scale, protocol.noise_scale_cap(
        noise_multiplier=z, clip_norm=clip_norm, padded=padded, threshold=sa.threshold))
  stddev = protocol.distributed_noise(
      noise_multiplier=z, clip_norm=clip_norm, scale=scale, padded=padded,
      threshold=sa.threshold) if z else 0.0
  spec = protocol.Spec(bits=sa.bits, scale=float(scale), clip_norm=float(clip_norm),
                       rotate=sa.rotate, size=flat.shape[0], noise=sa.distributed_noise,
                       noise_stddev=stddev)
  return SecureAggregation(spec, unravel, config.seed, block, cohort_bound, sa.neighbours,
                           sa.threshold, sa.dropout_before, sa.dropout_after, z)
