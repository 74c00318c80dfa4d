"""Server optimisers: one contract every optimiser passes; the traced learning rate."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedsim import server


def state_for(opt, params, average=None):
  return server.init_state(opt, average, params, 1.0)


@pytest.mark.parametrize("name", server.SERVER_OPTIMIZERS)
def test_server_optimizers_descend_the_pseudo_gradient(name):
  params = {"w": jnp.ones(3)}
  opt = server.server_optimizer(name)
  mean_delta = {"w": jnp.full(3, 0.5)}  # clients moved every weight up
  state = server.server_update(opt, state_for(opt, params), mean_delta, learning_rate=0.1)
  assert np.all(np.asarray(state.params["w"]) > 1.0)
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(opt.init(params))


@pytest.mark.parametrize("name", server.SERVER_OPTIMIZERS)
def test_learning_rate_scales_the_step_like_optax(name):
  """The traced learning rate gives optax's own step at that learning rate."""
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  mean_delta = {"w": jnp.array([0.3, -0.1, 0.2])}
  reference = {"fedavg": optax.sgd(0.3), "fedavgm": optax.sgd(0.3, momentum=0.9),
               "fedadam": optax.adam(0.3, b1=0.9, b2=0.99, eps=1e-3),
               "fedyogi": optax.yogi(0.3, b1=0.9, b2=0.99, eps=1e-3),
               "fedadagrad": optax.adagrad(0.3, initial_accumulator_value=0.0, eps=1e-3)}[name]
  grad = jax.tree.map(jnp.negative, mean_delta)
  updates, _ = reference.update(grad, reference.init(params), params)
  expected = optax.apply_updates(params, updates)
  opt = server.server_optimizer(name)
  state = jax.jit(server.server_update, static_argnums=0)(
      opt, state_for(opt, params), mean_delta, learning_rate=jnp.float32(0.3))
  np.testing.assert_allclose(state.params["w"], expected["w"], rtol=1e-6)


def test_no_client_leaves_the_state_unchanged():
  params = {"w": jnp.ones(2)}
  opt = server.server_optimizer("fedavgm")
  before = server.server_update(opt, state_for(opt, params), {"w": jnp.ones(2)},
                                learning_rate=1.0)
  after = server.server_update(opt, before, {"w": jnp.full(2, 7.0)}, learning_rate=1.0,
                               apply=jnp.bool_(False))
  jax.tree.map(np.testing.assert_array_equal, after, before)


def test_moving_average_is_debiased_ema_of_params():
  opt, average = server.server_optimizer("fedavg"), optax.ema(0.5, debias=True)
  state = state_for(opt, {"w": jnp.zeros(1)}, average)
  for value in (2.0, 4.0):
    state = state.replace(params={"w": jnp.array([value])})
    evaluated, state = server.moving_average(average, state)
  # EMA of (2, 4) at decay 0.5 with bias correction: (0.25*2 + 0.5*4) / 0.75.
  np.testing.assert_allclose(evaluated["w"], [(0.5 * 0.5 * 2 + 0.5 * 4) / 0.75], rtol=1e-6)
  no_average, same = server.moving_average(None, state)
  assert no_average is state.params and same is state


def test_unknown_optimizer_names_the_field():
  with pytest.raises(ValueError, match="server.optimizer='sgd' must be one of"):
    server.server_optimizer("sgd")
