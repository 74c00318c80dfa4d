"""The client update: one hospital's local training as a pure, vmappable function.

`make_client_update(...)` returns `client_update(global_params, data, key, hparams)
-> (delta, metrics)`. Local steps run in `lax.scan`; the batch of each step is a
fixed-shape gather plus a mask, so ragged hospitals share one compiled program and
padded examples (or padded steps) contribute exactly zero. The gradient of a step
comes from a `GradientFn`, the seam where DP-SGD replaces plain averaging.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax

from fedsim import keys
from privacy.sampling import PoissonSampler, index_uniform, poisson_rate

PyTree = Any
CLIENT_OPTIMIZERS = ("sgd", "momentum", "adam")


class ClientData(NamedTuple):
  """One hospital's padded training split (leading axis `max_examples`)."""

  images: jax.Array    # uint8 [N, H, W, C]
  labels: jax.Array    # int32 [N] (segmentation: masks [N, H, W])
  patients: jax.Array  # int32 [N], -1 on padding
  count: jax.Array     # int32 [] real examples
  num_patients: jax.Array  # int32 []


class Batch(NamedTuple):
  """One local step's examples: a fixed-size gather plus a mask."""

  x: jax.Array        # float [B, H, W, C], normalised
  y: jax.Array        # int32 [B] (segmentation: masks [B, H, W])
  patients: jax.Array  # int32 [B]
  mask: jax.Array     # bool [B]
  units: jax.Array | None = None  # int32 [B] DP-SGD: unit rank in the batch (-1: none)


class GradientFn(Protocol):
  """Turns one local batch into the gradient the optimiser sees.

  `(params, batch, key, hparams) -> (grad, stats)`; stats is a dict of scalars
  summed over steps and clients: at least `loss_sum` and `correct` over the
  batch's real examples (from the forward pass the gradient needs anyway), plus
  e.g. clipped counts for DP.
  """

  def __call__(self, params: PyTree, batch: Batch, key: jax.Array,
               hparams: dict) -> tuple[PyTree, dict]:
    ...


@dataclasses.dataclass(frozen=True)
class LocalSchedule:
  """Static shape of local training (identical for every client of a run).

  Attributes:
    max_examples: padded examples per client.
    batch_size: examples per local step (the gather size).
    epochs: local epochs (ignored when `steps` > 0).
    steps: fixed number of local steps, each a uniform batch (0: from epochs).
    unroll: `lax.scan` unroll factor for local steps.
  """

  max_examples: int
  batch_size: int
  epochs: int = 1
  steps: int = 0
  unroll: int = 1

  @property
  def steps_per_epoch(self) -> int:
    return -(-self.max_examples // self.batch_size)

  @property
  def num_steps(self) -> int:
    return self.steps if self.steps > 0 else self.epochs * self.steps_per_epoch


def schedule_from_config(client_config, max_examples: int, unroll: int = 1) -> LocalSchedule:
  """The run's `LocalSchedule` from the `client` config (one builder for the clients
  and the accountant, so the steps that run are the steps that are charged)."""
  return LocalSchedule(max_examples=max_examples, batch_size=client_config.batch_size,
                       epochs=client_config.local_epochs, steps=client_config.local_steps,
                       unroll=unroll)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy `[B]`."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def soft_dice_loss(logits: jax.Array, masks: jax.Array) -> jax.Array:
  """Per-image soft Dice loss `[B]`: 1 - mean, over the foreground classes present in
  the image's mask, of `(2 sum p y + 1) / (sum p + sum y + 1)`; 0 for an image with no
  foreground. Absent classes are left to the cross-entropy: their Dice term would
  only push the class's probability to 0, and a small class (lesions) absent from
  most slices would then never be predicted. logits `[B, H, W, K]`, masks int `[B, H, W]`."""
  probs = jax.nn.softmax(logits, axis=-1)[..., 1:]
  truth = jax.nn.one_hot(masks, logits.shape[-1], dtype=probs.dtype)[..., 1:]
  inter = jnp.sum(probs * truth, axis=(1, 2))
  size = jnp.sum(truth, axis=(1, 2))
  dice = (2 * inter + 1.0) / (jnp.sum(probs, axis=(1, 2)) + size + 1.0)
  present = (size > 0).astype(probs.dtype)
  return jnp.sum(present * (1.0 - dice), axis=-1) / jnp.maximum(jnp.sum(present, axis=-1), 1.0)


def example_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """The loss of each example `[B]`, one scalar per example whatever the task (so
  per-example and per-patient clipping apply unchanged).

  Classification (logits `[B, K]`): softmax cross-entropy. Segmentation (logits
  `[B, H, W, K]`, masks `[B, H, W]`): per-pixel cross-entropy averaged over the
  image, plus the image's soft Dice loss.
  """
  if logits.ndim == 2:
    return cross_entropy(logits, labels)
  return jnp.mean(cross_entropy(logits, labels), axis=(1, 2)) + soft_dice_loss(logits, labels)


def example_hits(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Float `[B]`: 1 where the class is right (classification), or the image's
  fraction of right pixels (segmentation)."""
  hits = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return hits if hits.ndim == 1 else jnp.mean(hits, axis=(1, 2))


def normalize(images: jax.Array, mean: float, std: float) -> jax.Array:
  """uint8 pixels -> float32 `(x / 255 - mean) / std`."""
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def mean_gradient(apply_fn: Callable) -> GradientFn:
  """Non-private gradient: mean loss over the batch's real examples."""

  def grad_fn(params, batch: Batch, key, hparams):
    del key, hparams
    w = batch.mask.astype(jnp.float32)

    def loss(p):
      logits = apply_fn(p, batch.x)
      loss_sum = jnp.sum(w * example_loss(logits, batch.y))
      return loss_sum / jnp.maximum(jnp.sum(w), 1.0), (loss_sum, logits)

    grad, (loss_sum, logits) = jax.grad(loss, has_aux=True)(params)
    return grad, batch_stats(loss_sum, logits, batch)

  return grad_fn


def batch_stats(loss_sum: jax.Array, logits: jax.Array, batch: Batch) -> dict:
  """The loss and accuracy sums every `GradientFn` reports."""
  hit = jnp.where(batch.mask, example_hits(logits, batch.y), 0.0)
  return {"loss_sum": loss_sum, "correct": jnp.sum(hit)}


def client_optimizer(name: str, hparams: dict) -> optax.GradientTransformation:
  """Local optax optimiser; learning rate and momentum may be traced arrays."""
  lr = hparams["client_lr"]
  if name == "sgd":
    return optax.sgd(lr)
  if name == "momentum":
    return optax.sgd(lr, momentum=hparams["client_momentum"])
  if name == "adam":
    return optax.adam(lr)
  raise ValueError(f"client.optimizer={name!r} must be one of {CLIENT_OPTIMIZERS}")


def epoch_batches(key: jax.Array, count: jax.Array,
                  schedule: LocalSchedule) -> tuple[jax.Array, jax.Array]:
  """Shuffled batches for every local step: indices `[S, B]`, active flags `[S]`.

  Each epoch is a random permutation with the real examples first, cut into
  `steps_per_epoch` batches; batches past the client's data are inactive.
  With `schedule.steps` > 0 each step is an independent uniform batch instead.
  """
  n, b = schedule.max_examples, schedule.batch_size
  padded = schedule.steps_per_epoch * b
  real = jnp.arange(n) < count

  def permutation(k):
    u = index_uniform(k, n)
    order = jnp.argsort(jnp.where(real, u, 2.0 + u))
    return jnp.pad(order, (0, padded - n), constant_values=n - 1)

  if schedule.steps > 0:
    keys = jax.random.split(key, schedule.steps)
    idx = jax.vmap(lambda k: permutation(k)[:b])(keys)
    return idx, jnp.ones((schedule.steps,), bool)
  keys = jax.random.split(key, schedule.epochs)
  idx = jax.vmap(permutation)(keys).reshape(schedule.epochs, -1, b)
  active = jnp.arange(schedule.steps_per_epoch) * b < count
  return idx.reshape(-1, b), jnp.tile(active, schedule.epochs)


def active_steps(count, schedule: LocalSchedule):
  """Local steps a client with `count` examples takes (numpy or jax arrays).

  `epochs * ceil(count / batch_size)`, or `schedule.steps` when fixed. The
  accountant charges each hospital exactly this many steps.
  """
  if schedule.steps > 0:
    return count * 0 + schedule.steps
  return schedule.epochs * (-(-count // schedule.batch_size))


def local_keys(key: jax.Array, schedule: LocalSchedule) -> tuple[jax.Array, jax.Array]:
  """A client's round key -> (epoch-shuffle key, per-step keys `[S]`).

  Each step key splits into (draw, gradient) keys; `batch_sizes` derives the same
  draws as `client_update` from these.
  """
  batch_key, step_key = jax.random.split(key)
  steps = jax.vmap(lambda s: jax.random.fold_in(step_key, s))(jnp.arange(schedule.num_steps))
  return batch_key, steps


def poisson_inputs(data: ClientData, schedule: LocalSchedule
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """What every Poisson draw of a client needs: real examples `[N]`, the rate, and the
  active local steps `[S]` (the accountant charges exactly these)."""
  real = jnp.arange(schedule.max_examples) < data.count
  rate = poisson_rate(data.count, schedule.batch_size)
  active = jnp.arange(schedule.num_steps) < active_steps(data.count, schedule)
  return real, rate, active


def batch_sizes(sampler: PoissonSampler, schedule: LocalSchedule, data: ClientData,
                key: jax.Array) -> jax.Array:
  """int32 `[S]`: the examples kept in each active local step's Poisson batch.

  The same draws as `client_update` with `key` (0 for inactive steps): the engine
  reads them to gather each step in as few rows as hold every kept example.
  """
  real, rate, active = poisson_inputs(data, schedule)

  def kept(step_key):
    draw = sampler.draw(jax.random.split(step_key)[0], data.patients, real, rate)
    return jnp.sum(draw.mask, dtype=jnp.int32)
  return jnp.where(active, jax.vmap(kept)(local_keys(key, schedule)[1]), 0)


def make_client_update(apply_fn: Callable, grad_fn: GradientFn, *,
                       schedule: LocalSchedule, optimizer: str,
                       mean: float, std: float,
                       sampler: PoissonSampler | None = None,
                       augment_fn: Callable | None = None):
  """Builds `client_update(global_params, data, key, hparams) -> (delta, metrics)`.

  Args:
    apply_fn: `(params, x [B,H,W,C]) -> logits [B, classes]`.
    grad_fn: the gradient of one local step (see `GradientFn`).
    schedule: static local-training shape.
    sampler: None for shuffled epochs; a `PoissonSampler` for DP-SGD.
    augment_fn: optional `(key, x, mask) -> x` in-graph augmentation of each
      local batch (before per-example gradients, so DP clipping still bounds
      every unit); never applied at evaluation.
    optimizer: name in CLIENT_OPTIMIZERS.
    mean, std: fixed normalisation constants of the data set.

  The returned function is pure: `delta = local_params - global_params`;
  `metrics` holds sums (`loss_sum`, `correct`, `examples`, `steps`, plus the
  gradient stats) so chunks aggregate by addition. `hparams` carries the traced
  hyperparameters (`client_lr`, `client_momentum`, `prox_mu`, ...).
  """

  def client_update(global_params, data: ClientData, key, hparams):
    batch_key, step_keys = local_keys(key, schedule)
    opt = client_optimizer(optimizer, hparams)
    real, rate, active = poisson_inputs(data, schedule)
    if sampler is None:
      idx, active = epoch_batches(batch_key, data.count, schedule)
    else:  # drawn inside the step; only the active flags are precomputed
      idx = jnp.zeros((schedule.num_steps, 1), jnp.int32)

    def local_step(params, opt_state, inputs):
      """One local step -> (params, opt_state, step metrics); no-op if inactive."""
      index, is_active, k = inputs
      draw_key, grad_key = jax.random.split(k)
      step_hparams, extra, units = hparams, {}, None
      if sampler is None:
        mask = real[index]
      else:
        index, mask, units, truncated = sampler.draw(draw_key, data.patients, real, rate)
        step_hparams = {**hparams, "expected_units": sampler.expected_units(
            data.count, data.num_patients, rate)}
        extra["truncated_steps"] = (truncated & is_active).astype(jnp.float32)
      x = normalize(data.images[index], mean, std)
      if augment_fn is not None:
        x = augment_fn(jax.random.fold_in(k, keys.AUGMENT), x, mask & is_active)
      batch = Batch(x, data.labels[index], data.patients[index], mask & is_active, units)
      grad, stats = grad_fn(params, batch, grad_key, step_hparams)
      prox = jax.tree.map(lambda p, g: hparams["prox_mu"] * (p - g), params,
                          global_params)
      grad = jax.tree.map(jnp.add, grad, prox)
      updates, new_state = opt.update(grad, opt_state, params)
      keep = lambda new, old: jax.tree.map(
          lambda a, b: jnp.where(is_active, a, b), new, old)
      metrics = {"examples": jnp.sum(batch.mask.astype(jnp.float32)),
                 "steps": is_active.astype(jnp.float32), **stats, **extra}
      return (keep(optax.apply_updates(params, updates), params),
              keep(new_state, opt_state), metrics)

    def scan_step(carry, inputs):
      params, opt_state, totals = carry
      # Inactive (padded) steps run masked and are discarded: a `lax.cond` here
      # measured 6x slower on XLA:CPU (convolutions inside a conditional).
      params, opt_state, metrics = local_step(params, opt_state, inputs)
      return (params, opt_state, jax.tree.map(jnp.add, totals, metrics)), None

    opt_state = opt.init(global_params)
    first = (idx[0], active[0], step_keys[0])
    metric_shapes = jax.eval_shape(local_step, global_params, opt_state, first)[2]
    totals = jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metric_shapes)
    (params, _, metrics), _ = jax.lax.scan(
        scan_step, (global_params, opt_state, totals), (idx, active, step_keys),
        unroll=schedule.unroll)
    delta = jax.tree.map(jnp.subtract, params, global_params)
    return delta, metrics

  return client_update
