"""The training loop: `run(config, workdir)` trains a federation and writes the record.

Each round is `round.round_step` (fedsim/round.py: cohort, gather, client updates,
transform, aggregate, privatize, server update). Around it, on the host: the
per-hospital ledger is charged for the round (`PrivacyLedger.record_round`), every
`eval_every` rounds the evaluated model is tested on every hospital's test split
and on the unseen hospitals, metrics are written, and every `checkpoint_every`
rounds the `ServerState` is checkpointed; an interrupted run resumes from it
bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
import time

import flax.serialization
import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from fedsim import aggregation, evaluation, io, privacy_plan, sampling, server, tensorboard
from fedsim import canaries as canaries_lib
from fedsim import config as config_lib
from fedsim import round as round_lib
from fedsim import workdir as workdir_lib
from fedsim.data import make_federated_data
from fedsim.data.base import FederatedData
from fedsim.round import Setup
from privacy.secure_agg.protocol import SecureAggregationError


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


def prepare(config: ml_collections.ConfigDict) -> Setup:
  """Validates `config`, loads and federates the data, builds the run (no training).

  Every error a user can cause (bad field, missing data, impossible privacy
  parameters) is raised here, before any compute and before anything is written.
  """
  config_lib.validate(config)
  return Setup(config, *federate(config))


def federate(config: ml_collections.ConfigDict
             ) -> tuple[FederatedData, canaries_lib.Canaries | None]:
  """The data a run of `config` trains on: the federation, with the audit's canaries
  inserted as patients when `audit.enabled` (they change their hospitals' sampling rates,
  so the ledger preview must see them too), and the canaries (None without)."""
  fed = make_federated_data(config)
  if not config.audit.enabled:
    return fed, None
  canaries = canaries_lib.make(config.audit, fed, config.seed)
  return canaries_lib.insert(fed, canaries), canaries


def run(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
        overwrite: bool = False) -> dict:
  """Trains the federation of `config`, writes the run record to `workdir`.

  Returns the summary (also written, last and atomically, to summary.json).
  """
  return train(prepare(config), workdir, progress=progress, overwrite=overwrite)


def save_state(workdir: str, state: server.ServerState) -> None:
  """Checkpoints `state` as step `state.round` (orbax)."""
  if jax.process_index() > 0:  # several processes: their states are process 0's
    return
  from fedsim import checkpoint  # orbax is slow to import; only needed here
  tree = flax.serialization.to_state_dict(state)
  if jax.process_count() > 1:  # orbax saves process 0's copy from host arrays
    tree = jax.device_get(tree)
  checkpoint.save(workdir_lib.checkpoint_dir(workdir), int(state.round), tree)


def restore_state(workdir: str, step: int, like: server.ServerState) -> server.ServerState:
  """The checkpointed state of round `step`, placed on devices as a fresh state is.

  Restored to host memory, then put on the default device uncommitted, exactly
  like a freshly initialised state, so the block program may lay it out over the
  client mesh as it does in round 1 (orbax would commit it to one device).
  """
  from fedsim import checkpoint  # pylint: disable=import-outside-toplevel
  host = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                      flax.serialization.to_state_dict(like))
  restored = checkpoint.restore(workdir_lib.checkpoint_dir(workdir), host, step)
  return flax.serialization.from_state_dict(like, jax.device_put(restored))


def open_record(setup: Setup, workdir: str, *, overwrite: bool):
  """Opens (or resumes) a run's record in `workdir`: `(done, writer, events, ledger, state)`,
  the rounds already done, the metric and TensorBoard writers truncated to them, the ledger
  replayed to them (None without DP) and the server state restored from their checkpoint."""
  done = workdir_lib.open_run(workdir, setup.config, overwrite=overwrite)
  writer = io.MetricWriter(workdir)
  if done:
    writer.truncate(done)
  events = tensorboard.open_run_events(workdir, writer.history)
  ledger = setup.plan.new_ledger() if setup.plan.new_ledger else None
  state = round_lib.init_state(setup)
  if done:
    state = restore_state(workdir, done, state)
    if ledger is not None:
      privacy_plan.replay_ledger(ledger, setup.config, done,
                                 snapshot_rounds={row["round"] for row in writer.history})
  return done, writer, events, ledger, state


def train(setup: Setup, workdir: str, *, progress: bool = True,
          overwrite: bool = False) -> dict:
  """Runs the rounds of a prepared run; see `run`.

  An unfinished run of the same config in `workdir` resumes from its latest
  checkpoint (`checkpoint_every`) and ends bit for bit where an uninterrupted run
  would (wall_seconds counts this process only). A workdir holding a run of
  another config is refused unless `overwrite` (fedsim/workdir.py).
  """
  config = setup.config
  done, writer, events, ledger, state = open_record(setup, workdir, overwrite=overwrite)
  evaluated, rounds_done = state.params, done
  start = time.perf_counter()
  scalars, report, stopped_early = {}, {}, None
  bar = tqdm(range(done + 1, config.num_rounds + 1), desc="rounds", disable=not progress,
             dynamic_ncols=True, initial=done, total=config.num_rounds)
  for r in bar:
    if ledger is not None and config.dp.target_epsilon > 0 and ledger.would_exceed(
        config.dp.target_epsilon, sampling.participation(config, r),
        noise_multiplier=aggregation.charged_noise_multiplier(config, r)):
      stopped_early = f"dp.target_epsilon={config.dp.target_epsilon} would be exceeded in round {r}"
      break
    try:
      state, out = round_lib.round_step(setup, state, r, donate=True)
    except SecureAggregationError as error:  # too few survivors: stop, record written
      stopped_early = str(error)
      break
    evaluated, rounds_done = out.model, r
    logged = after_round(setup, workdir, writer, events, ledger, r, out, state, start)
    if logged is not None:
      scalars, report = logged
      utility = ("dice", "dice") if "dice" in scalars else ("acc", "accuracy")
      bar.set_postfix(loss=f"{scalars['loss']:.3f}",
                      **{utility[0]: f"{scalars[utility[1]]:.3f}"},
                      **({} if ledger is None else {"eps": f"{scalars['epsilon']:.2f}"}))
  bar.close()
  if rounds_done and not scalars:  # stopped before the first evaluation
    scalars, report = evaluate(setup, evaluated)
  if config.task == "segmentation" and rounds_done:
    evaluation.plot_segmentations(setup.predict, evaluated, setup.fed.test,
                                  os.path.join(workdir, "segmentations.png"),
                                  class_names=setup.fed.class_names,
                                  chunk=max(setup.strategy.chunk, 8))
  return finish_record(setup, workdir, writer, state, ledger, scalars, report, stopped_early,
                       time.perf_counter() - start)


def after_round(setup: Setup, workdir: str, writer, events, ledger, r: int,
                out: round_lib.RoundOutput, state: server.ServerState,
                start: float) -> tuple[dict, dict] | None:
  """Round `r`'s host side: the ledger charged, the model (`out.model`) evaluated and its
  figures written when due, `state` checkpointed when due. `(scalars, report)` of an
  evaluated round, else None. `start`: when the process's training began (wall time)."""
  config = setup.config
  if ledger is not None:
    ledger.record_round(out.participating,  # the distributed noise that survived, if any
                        noise_multiplier=aggregation.charged_noise_multiplier(config, r))
  logged = None
  if r % config.eval_every == 0 or r == config.num_rounds:
    scalars, report = evaluate(setup, out.model)
    scalars.update(round_scalars(setup, out, ledger, time.perf_counter() - start))
    if ledger is not None:
      ledger.snapshot(r)
    writer.write_scalars(r, scalars)
    events.write_scalars(r, scalars)
    logged = scalars, report
  if config.checkpoint_every and r % config.checkpoint_every == 0 and r < config.num_rounds:
    save_state(workdir, state)
  return logged


def round_scalars(setup: Setup, out: round_lib.RoundOutput, ledger, wall: float) -> dict:
  """The training figures of one round (host reads of its device sums)."""
  train_sums = {k: float(v) for k, v in out.sums.metrics.items()}
  scalars = dict(
      train_loss=train_sums["loss_sum"] / max(train_sums["examples"], 1.0),
      **{"train_pixel_accuracy" if setup.config.task == "segmentation" else "train_accuracy":
         train_sums["correct"] / max(train_sums["examples"], 1.0)},
      cohort_size=len(out.cohort), wall_seconds=wall,
      epsilon=ledger.max_epsilon() if ledger is not None else None,
      **setup.plan.round_stats(train_sums))
  if setup.plan.unit == "hospital":
    scalars["clip_norm"] = float(out.clip_norm)
  scalars.update({k: float(v) for k, v in (out.secure_agg or {}).items()})
  return scalars


def finish_record(setup: Setup, workdir, writer, state, ledger, scalars, report, stopped_early,
                  wall) -> dict:
  """Writes checkpoint, plot, privacy.json, report.json and (last) summary.json."""
  config = setup.config
  save_state(workdir, state)
  if writer.history:
    io.plot_curves(writer.history, os.path.join(workdir, "curves.png"))
  if ledger is not None:
    io.write_json_atomic(os.path.join(workdir, "privacy.json"), ledger.to_json())
  io.write_json_atomic(os.path.join(workdir, "report.json"), report)
  summary = {
      "rounds": int(state.round),
      **{k: scalars.get(k) for k in SUMMARY_UTILITY[config.task]},
      **{k: v for k, v in scalars.items() if k.startswith("dice_")},  # per class
      "epsilon": ledger.max_epsilon() if ledger is not None else None,
      "delta": config.dp.delta if ledger is not None else None,
      "accountant": config.dp.accountant if ledger is not None else None,
      "privacy_unit": setup.plan.unit,
      "num_clients": config.num_clients,
      "stopped_early": stopped_early,
      "wall_seconds": wall,
      "strategy": dataclasses.asdict(setup.strategy),
  }
  if setup.secure_agg is not None:  # the parameters it ran with (scale, range resolved)
    summary["secure_agg"] = {**config.secure_agg.to_dict(), "scale": setup.secure_agg.spec.scale,
                             "clip_norm": setup.secure_agg.spec.clip_norm}
  if setup.canaries is not None:  # audit.enabled: empirical lower bounds beside epsilon
    summary.update(canaries_lib.audit_run(
        setup, setup.canaries, round_lib.init_state(setup).params, state.params,
        significance=config.audit.significance, delta=config.dp.delta))
  io.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  return io.to_json(summary)


# The utility figures summary.json carries, per task (accuracy and AUROC mean nothing
# for masks; Dice and Hausdorff distance nothing for classes).
SUMMARY_UTILITY = {
    "classification": ("accuracy", "auroc", "balanced_accuracy", "mcc",
                       "worst_hospital_accuracy", "unseen_accuracy", "unseen_auroc"),
    "segmentation": ("dice", "iou", "hd95", "global_dice", "worst_hospital_dice",
                     "unseen_dice", "unseen_iou", "unseen_hd95"),
}


def format_summary(summary: dict, workdir: str) -> str:
  """The few lines a person reads at the end of a run."""
  fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
  if "dice" in summary:
    classes = ", ".join(f"{k[5:]} {fmt(v)}" for k, v in summary.items()
                        if k.startswith("dice_"))
    lines = [f"rounds {summary['rounds']}  Dice {fmt(summary['dice'])} ({classes})  IoU "
             f"{fmt(summary['iou'])}  HD95 {fmt(summary['hd95'])} px  worst hospital Dice "
             f"{fmt(summary['worst_hospital_dice'])}  unseen hospitals Dice "
             f"{fmt(summary['unseen_dice'])}"]
  else:
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
  if "audit_epsilon_lower_bound" in summary:
    a = summary["audit"]
    lines.append(f"audit: epsilon >= {summary['audit_epsilon_lower_bound']:.2f} (one run, "
                 f"Steinke et al.; Gaussian f-DP: {summary['audit_epsilon_lower_bound_fdp']:.2f})"
                 f" from {a['num_canaries']} {a['kind']} canaries, "
                 f"{1 - a['significance']:.0%} confidence")
  if summary.get("secure_agg"):
    sa = summary["secure_agg"]
    lines.append(f"secure aggregation: {sa['bits']} bits, scale {sa['scale']:.4g}, "
                 f"threshold {sa['threshold'] or 'majority'}, "
                 f"{sa['neighbours'] or 'all'} neighbours, dropouts "
                 f"{sa['dropout_before']:g} before / {sa['dropout_after']:g} after sending"
                 + ("" if sa["distributed_noise"] == "none" else
                    f", distributed {sa['distributed_noise']} noise (charged as it survived)"))
  if summary["stopped_early"]:
    lines.append(f"stopped early: {summary['stopped_early']}")
  lines.append(f"{summary['wall_seconds']:.1f} s; record in {workdir}")
  return "\n".join(lines)
