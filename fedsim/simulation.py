"""The round loop: `run(config, workdir)` trains a federation and writes the record.

Per round: sample the cohort (host, from (seed, round)), run it as compiled blocks
of vmapped clients (fedsim/rounds.py), let the privacy plan turn the sums into the
server's mean delta (plain average, or clipped-and-noised for client-level DP),
step the server optimiser, charge the accountant (with `dp.adaptive_clip`, move
the clip norm for the next round), and every `eval_every` rounds
evaluate on the test split of every hospital and on the unseen hospitals.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from fedsim import (
  augment,
  evaluation,
  io,
  models,
  privacy_plan,
  rounds,
  sampling,
  server,
  sharding,
  strategy,
)
from fedsim import client as client_lib
from fedsim import config as config_lib
from fedsim.client import LocalSchedule, make_client_update
from fedsim.data import make_federated_data
from fedsim.data.base import FederatedData

# Purposes folded into the seed key, so streams never collide.
INIT, ROUND = 0, 1
# Purposes folded into each round key: client keys, delta noise, clipped-count noise.
CLIENTS, DELTA_NOISE, COUNT_NOISE = 0, 1, 2


def local_schedule(config, fed: FederatedData, unroll: int = 1) -> LocalSchedule:
  """The static local-training shape of this run's clients."""
  return client_lib.schedule_from_config(config.client, fed.train.max_examples, unroll)


def hyperparameters(config) -> dict:
  """Hyperparameters that enter the compiled round as traced scalars (sweepable)."""
  values = {"client_lr": config.client.learning_rate,
            "client_momentum": config.client.momentum,
            "prox_mu": config.client.prox_mu,
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


class Setup:
  """Everything a run builds from its config before the first round."""

  def __init__(self, config: ml_collections.ConfigDict, fed: FederatedData):
    self.config, self.fed = config, fed
    schedule = local_schedule(config, fed)
    block_size = config.clients_per_round
    if config.client_sampling_rate > 0:  # ~ expected cohort + 3 std, one call usually
      q, n = config.client_sampling_rate, config.num_clients
      block_size = min(n, int(np.ceil(q * n + 3 * np.sqrt(q * (1 - q) * n))) or 1)
    self.strategy = strategy.resolve(
        config.engine, cohort_size=block_size, num_steps=schedule.num_steps,
        devices=None if config.engine.shard_clients else 1)
    self.schedule = local_schedule(config, fed, self.strategy.unroll)
    self.model = models.make_model(config.model, num_classes=fed.num_classes,
                                   conv=self.strategy.conv)
    self.apply_fn = self.model.apply
    privacy_plan.check_model(jax.eval_shape(self.init_params, jax.random.key(0)),
                             config.dp.level)
    self.plan = privacy_plan.make_plan(config, fed, self.apply_fn)
    client_update = make_client_update(
        self.apply_fn, self.plan.grad_fn, schedule=self.schedule,
        optimizer=config.client.optimizer, mean=fed.mean, std=fed.std,
        sampler=self.plan.sampler, augment_fn=augmentation(config.data))
    mesh = sharding.client_mesh() if self.strategy.devices > 1 else None
    self.block_fn = rounds.make_block_fn(
        client_update, weighting=self.plan.weighting, chunk=self.strategy.chunk,
        delta_transform=self.plan.delta_transform, mesh=mesh)
    self.server_opt = server.server_optimizer(
        config.server.optimizer, learning_rate=config.server.learning_rate,
        momentum=config.server.momentum, beta2=config.server.beta2,
        tau=config.server.tau)
    self.server_step = jax.jit(functools.partial(server.server_update, self.server_opt))
    # The evaluated model: the global params, or their debiased EMA over rounds.
    self.average = (optax.ema(config.server.ema_decay, debias=True)
                    if config.server.ema_decay > 0 else None)
    self.average_step = self.average and jax.jit(self.average.update)
    self.predict = evaluation.make_predict_fn(self.apply_fn, mean=fed.mean, std=fed.std)
    self.hparams = hyperparameters(config)
    self.put = sharding.client_put(mesh) if mesh is not None else jax.device_put

  def init_params(self, key):
    x = jnp.zeros((1,) + self.fed.image_shape, jnp.float32)
    return self.model.init(key, x)


def evaluate(setup: Setup, params) -> tuple[dict, dict]:
  """Test metrics of the seen hospitals and of the unseen ones (flat, and full)."""
  chunk = max(setup.strategy.chunk, 8)
  report = {"test": evaluation.evaluate_split(
      setup.predict, params, setup.fed.test, chunk=chunk,
      class_names=setup.fed.class_names)}
  scalars = evaluation.scalar_summary(report["test"])
  if setup.fed.unseen is not None:
    report["unseen"] = evaluation.evaluate_split(
        setup.predict, params, setup.fed.unseen, chunk=chunk,
        class_names=setup.fed.class_names)
    scalars.update(evaluation.scalar_summary(report["unseen"], prefix="unseen_"))
  return scalars, report


def _prepare_workdir(workdir: str, config) -> None:
  os.makedirs(workdir, exist_ok=True)
  for name in ("summary.json", "metrics.jsonl", "metrics.csv", "privacy.json"):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      os.remove(path)
  io.write_json_atomic(os.path.join(workdir, "config.json"),
                       {"config": config.to_dict(), "versions": io.versions(),
                        "backend": jax.default_backend(),
                        "devices": [str(d) for d in jax.devices()]})


def prepare(config: ml_collections.ConfigDict) -> Setup:
  """Validates `config`, loads and federates the data, builds the run (no training).

  Every error a user can cause (bad field, missing data, impossible privacy
  parameters) is raised here, before any compute and before anything is written.
  """
  config_lib.validate(config)
  return Setup(config, make_federated_data(config))


def run(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> dict:
  """Trains the federation of `config`, writes the run record to `workdir`.

  Returns the summary (also written, last and atomically, to summary.json).
  """
  return train(prepare(config), workdir, progress=progress)


def _checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def resume_round(workdir: str, config) -> int:
  """The round an unfinished run of the same config in `workdir` can resume from (0: none).

  A run resumes when `workdir` holds its config.json (same config), a checkpoint
  and no summary.json (it did not complete).
  """
  path = os.path.join(workdir, "config.json")
  if (not os.path.exists(path) or os.path.exists(os.path.join(workdir, "summary.json"))
      or not os.path.isdir(_checkpoint_dir(workdir))):
    return 0
  with open(path) as f:
    if json.load(f).get("config") != io.to_json(json.loads(config.to_json())):
      return 0
  from fedsim import checkpoint  # orbax is slow to import; only needed here
  return checkpoint.latest_step(_checkpoint_dir(workdir)) or 0


def _server_state(params, opt_state, hparams, average_state) -> dict:
  """What a checkpoint holds: enough to continue bit for bit (keys come from the round)."""
  return {"params": params, "opt_state": opt_state, "clip_norm": hparams["clip_norm"],
          "average": average_state}


def _restore(setup: Setup, workdir: str, step: int, state: dict, writer, hparams):
  """Restores the server state of round `step`, the metrics rows and the ledger so far."""
  from fedsim import checkpoint  # pylint: disable=import-outside-toplevel
  state = checkpoint.restore(_checkpoint_dir(workdir), jax.eval_shape(lambda: state), step)
  writer.truncate(step)
  ledger = setup.plan.ledger
  evaluated_rounds = {row["round"] for row in writer.history}
  for r in range(1, step + 1) if ledger is not None else ():
    ledger.record_round(sampling.participation_mask(  # cohorts come from (seed, round)
        setup.config.num_clients, sampling.cohort_for_round(setup.config, r)))
    if r in evaluated_rounds:
      ledger.snapshot(r)
  return (state["params"], state["opt_state"], {**hparams, "clip_norm": state["clip_norm"]},
          state["average"])


def train(setup: Setup, workdir: str, *, progress: bool = True) -> dict:
  """Runs the rounds of a prepared run; see `run`.

  An unfinished run of the same config in `workdir` resumes from its latest
  checkpoint (`checkpoint_every`) and ends bit for bit where an uninterrupted run
  would (wall_seconds counts this process only).
  """
  config, fed = setup.config, setup.fed
  first_round = resume_round(workdir, config) + 1
  if first_round == 1:
    _prepare_workdir(workdir, config)
  writer = io.MetricWriter(workdir)
  seed_key = jax.random.key(config.seed)
  params = setup.init_params(jax.random.fold_in(seed_key, INIT))
  opt_state = setup.server_opt.init(params)
  ledger = setup.plan.ledger
  hparams = dict(setup.hparams)  # adaptive clipping moves clip_norm (same shapes: no recompile)
  average_state = setup.average.init(params) if setup.average else {}
  if first_round > 1:
    params, opt_state, hparams, average_state = _restore(
        setup, workdir, first_round - 1,
        _server_state(params, opt_state, hparams, average_state), writer, hparams)
  evaluated = params
  start = time.perf_counter()
  scalars, report, stopped_early, rounds_done = {}, {}, None, first_round - 1
  bar = tqdm(range(first_round, config.num_rounds + 1), desc="rounds",
             disable=not progress, dynamic_ncols=True, initial=first_round - 1,
             total=config.num_rounds)
  for r in bar:
    cohort = sampling.cohort_for_round(config, r)
    participating = sampling.participation_mask(config.num_clients, cohort)
    if ledger is not None and config.dp.target_epsilon > 0 and ledger.would_exceed(
        config.dp.target_epsilon, participating):
      stopped_early = f"dp.target_epsilon={config.dp.target_epsilon} would be exceeded in round {r}"
      break
    round_key = jax.random.fold_in(jax.random.fold_in(seed_key, ROUND), r)
    result = rounds.run_cohort(setup.block_fn, params, fed.train, cohort,
                               block=setup.strategy.block,
                               round_key=jax.random.fold_in(round_key, CLIENTS),
                               hparams=hparams, put=setup.put)
    mean_delta = setup.plan.finalize(result, jax.random.fold_in(round_key, DELTA_NOISE),
                                     hparams)
    clip_norm = hparams["clip_norm"]  # the S this round clipped to
    if setup.plan.update_hparams is not None:
      hparams = setup.plan.update_hparams(
          result, jax.random.fold_in(round_key, COUNT_NOISE), hparams)
    if mean_delta is not None:
      params, opt_state = setup.server_step(params, opt_state, mean_delta)
    evaluated = params
    if setup.average:
      evaluated, average_state = setup.average_step(params, average_state)
    if ledger is not None:
      ledger.record_round(participating)
    rounds_done = r
    if r % config.eval_every == 0 or r == config.num_rounds:
      scalars, report = evaluate(setup, evaluated)
      train = {k: float(v) for k, v in result.metrics.items()}
      scalars.update(
          train_loss=train["loss_sum"] / max(train["examples"], 1.0),
          train_accuracy=train["correct"] / max(train["examples"], 1.0),
          cohort_size=len(cohort), wall_seconds=time.perf_counter() - start,
          epsilon=ledger.max_epsilon() if ledger is not None else None,
          **setup.plan.round_stats(train))
      if setup.plan.unit == "hospital":
        scalars["clip_norm"] = float(clip_norm)
      if ledger is not None:
        ledger.snapshot(r)
      writer.write_scalars(r, scalars)
      bar.set_postfix(loss=f"{scalars['loss']:.3f}", acc=f"{scalars['accuracy']:.3f}",
                      **({} if ledger is None else {"eps": f"{scalars['epsilon']:.2f}"}))
    if config.checkpoint_every and r % config.checkpoint_every == 0 and r < config.num_rounds:
      from fedsim import checkpoint  # pylint: disable=import-outside-toplevel
      checkpoint.save(_checkpoint_dir(workdir), r,
                      _server_state(params, opt_state, hparams, average_state))
  bar.close()
  if rounds_done and not scalars:  # stopped before the first evaluation
    scalars, report = evaluate(setup, evaluated)
  state = _server_state(params, opt_state, hparams, average_state)
  return _finish(config, setup, workdir, writer, state,
                 scalars, report, rounds_done, stopped_early, time.perf_counter() - start)


def _finish(config, setup: Setup, workdir, writer, state, scalars, report,
            rounds_done, stopped_early, wall) -> dict:
  """Writes checkpoint, plot, privacy.json, report.json and (last) summary.json."""
  from fedsim import checkpoint  # orbax is slow to import; only needed here
  checkpoint.save(_checkpoint_dir(workdir), rounds_done, state)
  if writer.history:
    io.plot_curves(writer.history, os.path.join(workdir, "curves.png"))
  ledger = setup.plan.ledger
  if ledger is not None:
    io.write_json_atomic(os.path.join(workdir, "privacy.json"), ledger.to_json())
  io.write_json_atomic(os.path.join(workdir, "report.json"), report)
  summary = {
      "rounds": rounds_done,
      "accuracy": scalars.get("accuracy"),
      "auroc": scalars.get("auroc"),
      "balanced_accuracy": scalars.get("balanced_accuracy"),
      "mcc": scalars.get("mcc"),
      "worst_hospital_accuracy": scalars.get("worst_hospital_accuracy"),
      "unseen_accuracy": scalars.get("unseen_accuracy"),
      "unseen_auroc": scalars.get("unseen_auroc"),
      "epsilon": ledger.max_epsilon() if ledger is not None else None,
      "delta": config.dp.delta if ledger is not None else None,
      "accountant": config.dp.accountant if ledger is not None else None,
      "privacy_unit": setup.plan.unit,
      "num_clients": config.num_clients,
      "stopped_early": stopped_early,
      "wall_seconds": wall,
      "strategy": dataclasses.asdict(setup.strategy),
  }
  io.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  return io.to_json(summary)


def format_summary(summary: dict, workdir: str) -> str:
  """The few lines a person reads at the end of a run."""
  fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
  lines = [f"rounds {summary['rounds']}  accuracy {fmt(summary['accuracy'])}  "
           f"AUROC {fmt(summary['auroc'])}  balanced accuracy "
           f"{fmt(summary['balanced_accuracy'])}  worst hospital "
           f"{fmt(summary['worst_hospital_accuracy'])}  unseen hospitals "
           f"{fmt(summary['unseen_accuracy'])}"]
  if summary["epsilon"] is None:
    lines.append("privacy: none (dp.level=none)")
  else:
    lines.append(f"privacy: ({summary['epsilon']:.2f}, {summary['delta']:g})-DP per "
                 f"{summary['privacy_unit']}, {summary['accountant']} accountant "
                 "(max over hospitals)")
  if summary["stopped_early"]:
    lines.append(f"stopped early: {summary['stopped_early']}")
  lines.append(f"{summary['wall_seconds']:.1f} s; record in {workdir}")
  return "\n".join(lines)
