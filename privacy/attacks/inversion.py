"""Gradient inversion: images reconstructed from the update a server sees.

Two attacks on one loop (`invert`), compiled once per shape: the optimisation runs in
`lax.scan`, vmapped over restarts and over targets (several observed updates at once).

- Inverting Gradients (Geiping et al. 2020, `method="ig"`): minimise
  `1 - cos(simulated update, observed update) + tv_weight * TV(x)` with Adam on the
  *signed* gradient, the step size divided by 10 at 3/8, 5/8 and 7/8 of the steps, and
  the images projected onto the box of valid pixel values after every step.
- Deep Leakage from Gradients (Zhu et al. 2019, `method="dlg"`): minimise the squared
  L2 distance between the updates, with L-BFGS (`optimizer="lbfgs"`, unconstrained, the
  result clipped to the box) or Adam (projected).

The attacker knows the model and the client's local procedure; `update_fn(x, y)` is
its differentiable simulation of the client (e.g. `gradient_update` for one local
step, `local_sgd_update` for the model difference of several, as in Inverting
Gradients' multi-step variant). It does not know the DP noise, and simulates none.
For a single image the label comes from the last layer (`recover_label`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from privacy import validation

PyTree = Any
METHODS = ("ig", "dlg")
OPTIMIZERS = ("adam", "lbfgs")


def recover_label(head_bias_grad: jax.Array) -> jax.Array:
  """The label of a single image from the gradient of the last layer's bias `[classes]`.

  For softmax cross-entropy that gradient is `softmax(z) - onehot(y)`: only the true
  class is negative (Zhao et al. 2020, iDLG). For a model difference `-lr * grad`
  pass `-delta`. Works on `[..., classes]`.
  """
  return jnp.argmin(head_bias_grad, axis=-1)


def gradient_update(loss_fn: Callable, params: PyTree) -> Callable:
  """`update_fn(x, y)`: the gradient of `loss_fn(params, x, y)` (one local step)."""
  return lambda x, y: jax.grad(loss_fn)(params, x, y)


def local_sgd_update(loss_fn: Callable, params: PyTree, *, steps: int,
                     learning_rate: float | jax.Array) -> Callable:
  """`update_fn(x, y)`: `params_after - params` of `steps` full-batch SGD steps on (x, y)."""

  def update_fn(x, y):
    def step(p, _):
      g = jax.grad(loss_fn)(p, x, y)
      return jax.tree.map(lambda a, b: a - learning_rate * b, p, g), None
    final, _ = jax.lax.scan(step, params, None, length=steps)
    return jax.tree.map(jnp.subtract, final, params)

  return update_fn


def total_variation(x: jax.Array) -> jax.Array:
  """Mean absolute difference of neighbouring pixels of `[..., H, W, C]` images."""
  dy = jnp.abs(x[..., 1:, :, :] - x[..., :-1, :, :])
  dx = jnp.abs(x[..., :, 1:, :] - x[..., :, :-1, :])
  return jnp.mean(dy) + jnp.mean(dx)


def _flat(tree: PyTree) -> jax.Array:
  return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def cosine_distance(a: PyTree, b: PyTree) -> jax.Array:
  """`1 - cos(a, b)` over all leaves of two pytrees (Inverting Gradients' objective)."""
  a, b = _flat(a), _flat(b)
  return 1.0 - jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-12)


def squared_distance(a: PyTree, b: PyTree) -> jax.Array:
  """`||a - b||^2` over all leaves (DLG's objective)."""
  return jnp.sum(jnp.square(_flat(a) - _flat(b)))


class Reconstruction(NamedTuple):
  """What `invert` returns for T targets and R restarts."""

  images: jax.Array  # [T, R, B, H, W, C] in the box, the model's input space
  loss: jax.Array    # [T, R] final matching loss (the attacker's choice of restart)


def ig_schedule(learning_rate: float, steps: int) -> optax.Schedule:
  """Inverting Gradients' step size: / 10 at 3/8, 5/8 and 7/8 of the steps."""
  bounds = {int(steps * f): 0.1 for f in (3 / 8, 5 / 8, 7 / 8)}
  return optax.piecewise_constant_schedule(learning_rate, bounds)


def _check(method, optimizer, steps, learning_rate, tv_weight, restarts) -> None:
  validation.check(method in METHODS, "method", method, f"one of {list(METHODS)}")
  validation.check(optimizer in OPTIMIZERS, "optimizer", optimizer,
                   f"one of {list(OPTIMIZERS)}")
  validation.check(method == "dlg" or optimizer == "adam", "optimizer", optimizer,
                   "'adam' for method='ig' (signed Adam)")
  validation.check(isinstance(steps, int) and steps >= 1, "steps", steps, "an integer >= 1")
  validation.check(learning_rate > 0, "learning_rate", learning_rate, "> 0")
  validation.check(tv_weight >= 0, "tv_weight", tv_weight, ">= 0")
  validation.check(isinstance(restarts, int) and restarts >= 1, "restarts", restarts,
                   "an integer >= 1")


def make_inverter(make_update_fn: Callable, *, image_shape: tuple[int, ...],
                  bounds: tuple[float, float], method: str = "ig", optimizer: str = "adam",
                  steps: int, learning_rate: float, tv_weight: float = 0.0,
                  restarts: int = 1) -> Callable:
  """A jitted `invert(context, targets, labels, key) -> Reconstruction`.

  Args:
    make_update_fn: `context -> update_fn(x [B, *image_shape], y [B]) -> update`; the
      `context` (e.g. the model's params and the client's learning rate) is an array
      pytree passed to every call, so one compilation serves every model and value.
    image_shape: `(B, H, W, C)` of one update's images.
    bounds: `(low, high)` of valid inputs (the normalised pixel range): the box.
    method, optimizer: see the module docstring.
    steps, learning_rate, tv_weight, restarts: the optimisation.

  The returned function takes `targets` (observed updates with a leading axis T),
  `labels` `[T, B]` and a key, and runs all T x R reconstructions as one program.
  """
  _check(method, optimizer, steps, learning_rate, tv_weight, restarts)
  low, high = bounds
  lbfgs = optimizer == "lbfgs"
  if method == "ig":
    opt = optax.adam(ig_schedule(learning_rate, steps))
  else:
    opt = optax.lbfgs(learning_rate) if lbfgs else optax.adam(learning_rate)

  def one(context, target, labels, key):
    update_fn = make_update_fn(context)
    match = cosine_distance if method == "ig" else squared_distance

    def loss(x):
      value = match(update_fn(x, labels), target)
      return value + tv_weight * total_variation(x) if tv_weight else value

    value_and_grad = optax.value_and_grad_from_state(loss) if lbfgs else jax.value_and_grad(loss)
    x0 = jnp.clip(jax.random.normal(key, image_shape), low, high)

    def step(carry, _):
      x, state = carry
      value, grad = value_and_grad(x, state=state) if lbfgs else value_and_grad(x)
      if method == "ig":
        grad = jnp.sign(grad)
      if lbfgs:
        updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=loss)
        x = optax.apply_updates(x, updates)
      else:
        updates, state = opt.update(grad, state, x)
        x = jnp.clip(optax.apply_updates(x, updates), low, high)
      return (x, state), None

    (x, _), _ = jax.lax.scan(step, (x0, opt.init(x0)), None, length=steps)
    x = jnp.clip(x, low, high)
    return x, loss(x)

  def invert(context, targets, labels, key):
    t = labels.shape[0]
    keys = jax.random.split(key, (t, restarts))
    over_restarts = jax.vmap(one, in_axes=(None, None, None, 0))
    images, losses = jax.vmap(over_restarts, in_axes=(None, 0, 0, 0))(
        context, targets, labels, keys)
    return Reconstruction(images, losses)

  return jax.jit(invert)
