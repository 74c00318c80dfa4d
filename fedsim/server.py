"""The server: its state between rounds and its optimiser step (optax).

The server treats `-mean(client deltas)` as a pseudo-gradient for an optax
optimiser (Reddi et al. 2021, "Adaptive Federated Optimization"): FedAvg is SGD
with learning rate 1, FedAvgM adds momentum, FedAdam / FedYogi / FedAdagrad are
the adaptive variants. The learning rate is a traced hyperparameter
(`hparams["server_lr"]`), applied after the optimiser's direction (every server
optimiser here is linear in it), so a sweep can vmap over it.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

PyTree = Any
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


@flax.struct.dataclass
class ServerState:
  """Everything that carries over from one round to the next (and is checkpointed).

  Attributes:
    params: the global model.
    opt_state: the server optimiser's state.
    clip_norm: the clip norm of the next round (client-level adaptive clipping
      moves it; otherwise `dp.clip_norm`), float32 `[]`.
    average: state of the evaluated moving average of the params ({} when off).
    round: rounds completed, int32 `[]`.
  """

  params: PyTree
  opt_state: PyTree
  clip_norm: jax.Array
  average: PyTree
  round: jax.Array


def server_optimizer(name: str, *, momentum: float = 0.9, beta2: float = 0.99,
                     tau: float = 1e-3) -> optax.GradientTransformation:
  """The optax transform of server optimiser `name` at learning rate 1 (see module doc)."""
  if name == "fedavg":
    return optax.sgd(1.0)
  if name == "fedavgm":
    return optax.sgd(1.0, momentum=momentum)
  if name == "fedadam":
    return optax.adam(1.0, b1=momentum, b2=beta2, eps=tau)
  if name == "fedyogi":
    return optax.yogi(1.0, b1=momentum, b2=beta2, eps=tau)
  if name == "fedadagrad":
    return optax.adagrad(1.0, initial_accumulator_value=0.0, eps=tau)
  raise ValueError(f"server.optimizer={name!r} must be one of {list(SERVER_OPTIMIZERS)}")


def init_state(opt: optax.GradientTransformation, average: Optional[optax.GradientTransformation],
               params: PyTree, clip_norm: jax.Array) -> ServerState:
  """The server state before round 1."""
  return ServerState(params=params, opt_state=opt.init(params),
                     clip_norm=jnp.asarray(clip_norm, jnp.float32),
                     average=average.init(params) if average is not None else {},
                     round=jnp.zeros((), jnp.int32))


def server_update(opt: optax.GradientTransformation, state: ServerState, mean_delta: PyTree,
                  *, learning_rate: jax.Array, apply: jax.Array = True) -> ServerState:
  """One server step with `-mean_delta` as the pseudo-gradient.

  `apply=False` (a traced bool: no client took part in a non-private round)
  leaves params and optimiser state as they were.
  """
  pseudo_grad = jax.tree.map(jnp.negative, mean_delta)
  updates, opt_state = opt.update(pseudo_grad, state.opt_state, state.params)
  updates = jax.tree.map(lambda u: learning_rate * u, updates)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)
  return state.replace(params=keep(params, state.params),
                       opt_state=keep(opt_state, state.opt_state))


def moving_average(average: Optional[optax.GradientTransformation],
                   state: ServerState) -> tuple[PyTree, ServerState]:
  """`(evaluated params, state)`: the global params, or their debiased EMA over rounds."""
  if average is None:
    return state.params, state
  evaluated, average_state = average.update(state.params, state.average)
  return evaluated, state.replace(average=average_state)
