"""Aggregation: from the clients' (transformed) deltas to the server's mean delta.

Every step of it lives here: the weight of each client, the weighted sum over a
chunk of clients (`aggregate`, the one seam where secure aggregation plugs in),
and the division by the total weight (`weighted_mean`). Padded clients carry
weight 0 and contribute exactly zero, even when their delta is not finite.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

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
