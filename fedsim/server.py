"""Server side of a round: aggregation weights and server optimisers (optax).

The server treats `-mean(client deltas)` as a pseudo-gradient for an optax
optimiser (Reddi et al. 2021, "Adaptive Federated Optimization"): FedAvg is SGD
with learning rate 1, FedAvgM adds momentum, FedAdam / FedYogi / FedAdagrad are
the adaptive variants.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
WEIGHTINGS = ("examples", "uniform")


def server_optimizer(name: str, *, learning_rate: float, momentum: float = 0.9,
                     beta2: float = 0.99, tau: float = 1e-3
                     ) -> optax.GradientTransformation:
  """The optax transform for server optimiser `name` (see SERVER_OPTIMIZERS)."""
  if name == "fedavg":
    return optax.sgd(learning_rate)
  if name == "fedavgm":
    return optax.sgd(learning_rate, momentum=momentum)
  if name == "fedadam":
    return optax.adam(learning_rate, b1=momentum, b2=beta2, eps=tau)
  if name == "fedyogi":
    return optax.yogi(learning_rate, b1=momentum, b2=beta2, eps=tau)
  if name == "fedadagrad":
    return optax.adagrad(learning_rate, initial_accumulator_value=0.0, eps=tau)
  raise ValueError(f"server.optimizer={name!r} must be one of {SERVER_OPTIMIZERS}")


def client_weights(counts: jax.Array, valid: jax.Array, weighting: str) -> jax.Array:
  """Aggregation weight of each client `[c]`: its examples, or 1; 0 when padded."""
  if weighting == "examples":
    w = counts.astype(jnp.float32)
  elif weighting == "uniform":
    w = jnp.ones(counts.shape, jnp.float32)
  else:
    raise ValueError(f"server.weighting={weighting!r} must be one of {WEIGHTINGS}")
  return jnp.where(valid, w, 0.0)


def weighted_sum(deltas: PyTree, weights: jax.Array) -> PyTree:
  """`sum_k weights[k] * deltas[k]` over the leading client axis.

  Padded clients (weight 0) contribute exactly zero even if their delta is not
  finite: `where`, not multiplication.
  """
  def leaf_sum(d):
    w = weights.reshape((-1,) + (1,) * (d.ndim - 1))
    return jnp.sum(jnp.where(w != 0, w * d, 0.0), axis=0)
  return jax.tree.map(leaf_sum, deltas)


def server_update(opt: optax.GradientTransformation, params: PyTree, opt_state,
                  mean_delta: PyTree) -> tuple[PyTree, Any]:
  """One server step with `-mean_delta` as the pseudo-gradient."""
  pseudo_grad = jax.tree.map(jnp.negative, mean_delta)
  updates, opt_state = opt.update(pseudo_grad, opt_state, params)
  return optax.apply_updates(params, updates), opt_state
