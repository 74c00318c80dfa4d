"""One federated round, one function: `round_step(setup, state, round) -> (state, output)`.

The stages run in the order of shared/DESIGN.md, each a named function with one home:

  cohort           sample_cohort        which hospitals train (host, from (seed, round))
  gather           blocks.gather        their data, one fixed-size block at a time
  client updates   client.make_client_update   local steps in `lax.scan`, vmapped
  transform        PrivacyPlan.transform      per client: client-level DP clipping
  aggregate        aggregation.aggregate      weighted sum (or SecureAggregation: masked, modular)
  privatize        PrivacyPlan.privatize      the server's mean delta (noised for DP-FedAvg)
  server update    server.server_update       optax step; EMA; next clip norm

`Setup` holds what a run builds once from its config; `ServerState` (fedsim/server.py)
is everything that carries over between rounds. Hyperparameters that do not change
shapes (`Setup.hparams`: learning rates, noise multiplier, clip norm) enter the
compiled programs as traced values, so one compilation serves every value.
Host work (ledger, evaluation, writing) happens outside the step.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fedsim import (
  aggregation,
  augment,
  blocks,
  evaluation,
  keys,
  lowering,
  models,
  privacy_plan,
  sampling,
  server,
  sharding,
  strategy,
)
from fedsim import canaries as canaries_lib
from fedsim import client as client_lib
from fedsim.data.base import FederatedData

PyTree = Any
# Bucketed DP-SGD gathers: how many clients' block sizes one device -> host read covers
# (their blocks stay gathered on the device until they run).
PREFETCH_CLIENTS = 256


def hyperparameters(config) -> dict:
  """Hyperparameters that enter the compiled round as traced scalars (sweepable)."""
  values = {"client_lr": config.client.learning_rate,
            "client_momentum": config.client.momentum,
            "prox_mu": config.client.prox_mu,
            "server_lr": config.server.learning_rate,
            "noise_multiplier": config.dp.noise_multiplier,
            "clip_norm": config.dp.clip_norm}
  return {k: jnp.float32(v) for k, v in values.items()}


def augmentation(data_config):
  """The configured in-graph augmentation, or None when `data.augment` is off."""
  if not data_config.augment:
    return None
  return functools.partial(augment.augment, crop_padding=data_config.augment_crop_padding,
                           flip=data_config.augment_flip,
                           max_rotation_degrees=data_config.augment_rotation)


def expected_block(config) -> int:
  """Clients per round to plan blocks for: the fixed cohort, or E + 3 std of a Poisson one."""
  if config.client_sampling_rate <= 0:
    return config.clients_per_round
  q, n = config.client_sampling_rate, config.num_clients
  return min(n, int(np.ceil(q * n + 3 * np.sqrt(q * (1 - q) * n))) or 1)


class Setup:
  """Everything a run builds from its config before the first round (no mutable state:
  one Setup can serve any number of runs)."""

  def __init__(self, config: ml_collections.ConfigDict, fed: FederatedData,
               canaries: canaries_lib.Canaries | None = None):
    # `canaries` (audit.enabled): already in `fed`; gradient canaries also enter DP-SGD.
    self.config, self.fed, self.canaries = config, fed, canaries
    lowering.unroll_threefry_on_cpu()  # DP noise: the same bits, fused into the round
    steps = client_lib.schedule_from_config(config.client, fed.train.max_examples).num_steps
    # Several processes (launch.py --distributed): one client mesh over all their devices.
    distributed = jax.process_count() > 1
    if distributed and (config.secure_agg.enabled or not config.engine.shard_clients):
      raise ValueError("secure_agg.enabled=False and engine.shard_clients=True are needed "
                       "with several processes (--distributed)")
    self.strategy = strategy.resolve(
        config.engine, cohort_size=expected_block(config), num_steps=steps,
        devices=jax.device_count() if distributed else
        None if config.engine.shard_clients else 1)
    self.schedule = client_lib.schedule_from_config(
        config.client, fed.train.max_examples, self.strategy.unroll)
    self.model = models.make_model(config.model, num_classes=fed.num_classes,
                                   conv=self.strategy.conv)
    self.apply_fn = self.model.apply
    params_shape = jax.eval_shape(self.init_params, jax.random.key(0))
    privacy_plan.check_model(params_shape, config.dp.level)
    dp = config.dp
    # The flat layout for per-block gather sizes. Patients keep their slots with vmap
    # clipping (per-patient gradient sums by id cost more than the empty slots: 3.9 s
    # vs 3.0 s a default round on the CPU) and with microbatches (ghost clipping of
    # patients found by id is not sliced).
    self.flat = self.strategy.dp_gather == "bucketed" and (dp.level == "example" or (
        dp.level == "patient" and dp.clipping == "ghost" and not dp.microbatch_size))
    self.plan = privacy_plan.make_plan(config, fed, self.apply_fn, flat=self.flat,
                                       ghost_rows=self.strategy.ghost_rows)
    grad_fn = self.plan.grad_fn
    if canaries is not None and canaries.kind == "gradient":
      grad_fn = canaries_lib.with_gradient_canaries(grad_fn, canaries, params_shape)
    mesh = sharding.client_mesh() if self.strategy.devices > 1 else None
    self.secure_agg = None
    if config.secure_agg.enabled:
      self.secure_agg = aggregation.secure_aggregation(
          config, params_shape,
          block=self.strategy.block, cohort_bound=expected_block(config),
          max_weight=float(fed.train.counts.max()) if self.plan.weighting == "examples" else 1.0)

    def client_update(sampler):
      return client_lib.make_client_update(
          self.apply_fn, grad_fn, schedule=self.schedule,
          optimizer=config.client.optimizer, mean=fed.mean, std=fed.std,
          sampler=sampler, augment_fn=augmentation(config.data))

    def block_program(sampler):
      """The compiled block program of clients drawing with `sampler`."""
      return blocks.make_block_fn(
          client_update(sampler), weighting=self.plan.weighting, chunk=self.strategy.chunk,
          transform=self.plan.transform, mesh=mesh,
          aggregate=self.secure_agg.aggregate if self.secure_agg else aggregation.aggregate)

    self.client_update = client_update(self.plan.sampler)
    self.block_fn = (blocks.bucketed_block_fn(block_program, self.plan.sampler, self.schedule)
                     if self.flat else block_program(self.plan.sampler))
    self.put = sharding.client_put(mesh) if mesh is not None else jax.device_put
    self.processes = sharding.ProcessBlocks(mesh, self.strategy.block) if distributed else None
    if self.processes is not None:
      self.put = self.processes.put
    self.server_opt = server.server_optimizer(
        config.server.optimizer, momentum=config.server.momentum,
        beta2=config.server.beta2, tau=config.server.tau)
    # The evaluated model: the global params, or their debiased EMA over rounds.
    self.average = (optax.ema(config.server.ema_decay, debias=True)
                    if config.server.ema_decay > 0 else None)
    # Stage 6 runs op by op: a few small ops per leaf, and compiled into one
    # program XLA:CPU divides differently in the last bit (results would change).
    self.privatize = self.plan.privatize
    self.update_clip_norm = self.plan.update_clip_norm
    self.server_step = jax.jit(functools.partial(server_step, self.server_opt, self.average))
    # The training loop's variant: the old params, optimiser state and average are
    # overwritten, so their buffers are donated (callers that keep the old state use
    # `server_step`).
    self.server_step_donated = jax.jit(
        functools.partial(_server_step_donated, self.server_opt, self.average),
        donate_argnums=0)
    self.predict = evaluation.make_predict_fn(self.apply_fn, mean=fed.mean, std=fed.std)
    self.hparams = hyperparameters(config)

  def init_params(self, key):
    x = jnp.zeros((1,) + self.fed.image_shape, jnp.float32)
    return self.model.init(key, x)


def init_state(setup: Setup) -> server.ServerState:
  """The server state before round 1 (params from the seed's INIT key)."""
  params = setup.init_params(keys.init_key(setup.config.seed))
  return server.init_state(setup.server_opt, setup.average, params,
                           setup.hparams["clip_norm"])


class RoundOutput(NamedTuple):
  """What one round hands to the host (device values are read only when logged)."""

  cohort: np.ndarray         # hospital ids that trained
  participating: np.ndarray  # bool [num_clients]: who the ledger charges
  sums: blocks.RoundSums     # delta, weight and metric sums over the cohort
  clip_norm: jax.Array       # the clip norm this round used
  model: PyTree              # the params to evaluate (global, or their EMA)
  secure_agg: Optional[dict] = None  # secure aggregation's round stats, when enabled


def sample_cohort(config, round_index: int) -> np.ndarray:
  """Stage 1, cohort: the hospital ids of round `round_index` (data-independent)."""
  return sampling.cohort_for_round(config, round_index)


def client_updates(setup: Setup, params: PyTree, cohort: np.ndarray, key: jax.Array,
                   hparams: dict, secure: Optional[aggregation.SecureRound] = None
                   ) -> blocks.RoundSums:
  """Stages 2-5: gather each block, run its clients, transform and aggregate their deltas.

  One call of the compiled block program per block (usually one per round); the
  next block is gathered while the current one computes (async dispatch). With
  secure aggregation (`secure`), each block's hospitals mask what they send. With
  bucketed DP-SGD gathers (`block_fn.kept`), the sizes of up to PREFETCH_CLIENTS
  clients' blocks are read from the device at once, not one block at a time (each
  read waits for the blocks before it).
  """
  rows = slice(None)
  if setup.processes is not None:  # this process's rows of each block; replicated params
    rows = setup.processes.rows
    params, hparams = setup.processes.replicate((params, hparams))

  def on_device():
    for index, block in enumerate(blocks.gather(setup.fed.train, cohort,
                                                setup.strategy.block, rows)):
      valid, inputs = block.valid, None
      if secure is not None:
        inputs, valid = setup.secure_agg.block_inputs(secure, index, valid)
        inputs = setup.put(inputs)
      yield (setup.put(block.data), setup.put(valid),
             setup.put(blocks.client_keys(key, block.ids)), inputs)

  total, todo, kept = None, on_device(), getattr(setup.block_fn, "kept", None)
  if kept is None:
    for data, valid, client_keys, inputs in todo:
      total = setup.block_fn(params, data, valid, client_keys, hparams, total, inputs)
  else:  # bucketed gathers: one read of the sizes for a window of blocks
    window = max(1, PREFETCH_CLIENTS // setup.strategy.block)
    while group := list(itertools.islice(todo, window)):
      sizes = jax.device_get([kept(data, keys) for data, _, keys, _ in group])
      for (data, valid, client_keys, inputs), size in zip(group, sizes):
        total = setup.block_fn(params, data, valid, client_keys, hparams, total, inputs,
                               kept=int(size))
  return total if setup.processes is None else setup.processes.local(total)


def server_step(opt: optax.GradientTransformation, average, state: server.ServerState,
                mean_delta: PyTree, apply: jax.Array, clip_norm: jax.Array,
                hparams: dict, round_index: jax.Array):
  """Stage 7, server update (jitted in `Setup`): optimiser step, moving average, next S.

  Returns `(state, evaluated params)`.
  """
  state = server.server_update(opt, state, mean_delta, learning_rate=hparams["server_lr"],
                               apply=apply)
  evaluated, state = server.moving_average(average, state)
  return state.replace(clip_norm=clip_norm, round=round_index), evaluated


def _server_step_donated(opt, average, carried: tuple, state: server.ServerState, *args):
  """`server_step` with `carried = (params, opt_state, average)` apart, to donate them."""
  params, opt_state, moving = carried
  return server_step(opt, average, state.replace(params=params, opt_state=opt_state,
                                                 average=moving), *args)


def finish_round(setup: Setup, state: server.ServerState, sums: blocks.RoundSums,
                 round_keys: keys.RoundKeys, hparams: dict,
                 round_index: int, *, donate: bool = False) -> tuple[server.ServerState, PyTree]:
  """Stages 6-7: privatize the round's sums, step the server; `(state, evaluated params)`.

  `donate=True` hands the old params, optimiser state and average to the new ones
  (their buffers are reused: `state` must not be read afterwards, but its clip norm).
  """
  mean_delta, apply = setup.privatize(sums, round_keys.delta_noise, hparams)
  clip_norm = state.clip_norm
  if setup.update_clip_norm is not None:
    clip_norm = setup.update_clip_norm(sums, round_keys.count_noise, hparams)
  args = (mean_delta, apply, clip_norm, hparams, jnp.int32(round_index))
  if not donate:
    return setup.server_step(state, *args)
  carried = (state.params, state.opt_state, state.average)
  return setup.server_step_donated(
      carried, state.replace(params=None, opt_state=None, average=None), *args)


def round_step(setup: Setup, state: server.ServerState, round_index: int, *,
               donate: bool = False) -> tuple[server.ServerState, RoundOutput]:
  """Round `round_index` (1-based): every stage, in order. Pure given (setup, state, round).

  `donate=True` (the training loop): the old state's params, optimiser state and
  average are overwritten in place; `state` must not be used again.
  """
  config = setup.config
  cohort = sample_cohort(config, round_index)
  round_keys = keys.round_keys(config.seed, round_index)
  hparams = {**setup.hparams, "clip_norm": state.clip_norm}
  secure = setup.secure_agg.begin_round(cohort, round_index) if setup.secure_agg else None
  sums = client_updates(setup, state.params, cohort, round_keys.clients, hparams, secure)
  secure_stats = None
  if secure is not None:  # the server unmasks and decodes the round's modular sum
    sums, secure_stats = setup.secure_agg.finish(sums, secure)
    if setup.secure_agg.noise_multiplier:  # the senders added the noise already
      hparams = {**hparams, "noise_multiplier": jnp.float32(0.0)}
  new_state, model = finish_round(setup, state, sums, round_keys, hparams, round_index,
                                  donate=donate)
  return new_state, RoundOutput(
      cohort, sampling.participation_mask(config.num_clients, cohort), sums,
      state.clip_norm, model, secure_stats)
