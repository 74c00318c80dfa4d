"""Sweeps: one base config, axes of values, every configuration exactly its own run.

A sweep config (experiments/privacy_utility.py) is a run config plus a `sweep`
section. `sweep.axes` mirrors the config tree: `sweep.axes.dp.noise_multiplier =
(0.8, 1.5)` sweeps `dp.noise_multiplier`, `sweep.axes.seed = (0, 1)` the seed; the
configurations are the product of the axes, in the order written. One axis has no
field of its own: `sweep.axes.target_epsilon` sets `dp.noise_multiplier` to the
smallest one whose run ends at most at that epsilon (the run's own per-hospital
ledger, bisection; `calibrate_noise_multiplier`).

Each configuration runs through `simulation.train` into its own sub-workdir
(`<workdir>/runs/<name>`: config.json, metrics.jsonl, privacy.json, summary.json,
tensorboard/, ...), with the config a lone launch of it would have, so its record is
bit for bit that of `python launch.py` with those fields set. Configurations that
differ only in the round's traced hyperparameters (`TRACED_FIELDS`) form a group and
share one `Setup`: one federation, one set of compiled programs (the values enter
as arguments, `round.hyperparameters`). `sweep.execution` says how a group runs:
one after another on the shared programs ("sequential"), or `sweep.group_size` at a
time as one vmapped program ("vmap", fedsim/sweep_vmap.py); "auto" takes the one
measured faster on the backend (sequential on XLA:CPU, vmap on GPU/TPU).

Resume: launching the same sweep into the same workdir skips the configurations
whose summary.json exists and lets each unfinished one resume from its checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os

import ml_collections

from fedsim import canaries as canaries_lib
from fedsim import config as config_lib
from fedsim import io, privacy_plan, simulation, sweep_report, sweep_vmap
from fedsim import round as round_lib
from fedsim import workdir as workdir_lib
from fedsim.data import make_federated_data
from privacy import accountants, validation

SWEEP_FILE = "sweep.json"
RUNS = "runs"  # sub-workdirs of the configurations
CALIBRATED = "target_epsilon"  # the axis turned into dp.noise_multiplier
# The config fields of `round.hyperparameters`: traced in the compiled round, so
# configurations differing only in them share one Setup (test_sweep checks the list).
TRACED_FIELDS = ("client.learning_rate", "client.momentum", "client.prox_mu",
                 "server.learning_rate", "dp.noise_multiplier", "dp.clip_norm")


@dataclasses.dataclass(frozen=True)
class Configuration:
  """One point of the sweep: its axis values, its run config, its sub-workdir name."""

  index: int
  values: dict          # axis name -> value, in axis order
  config: ml_collections.ConfigDict  # a plain run config (no sweep section)
  name: str


def _leaves(tree, prefix: str = "") -> dict:
  """A (nested) ConfigDict as {"a.b": value} over its non-ConfigDict leaves."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_leaves(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def base_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The run config every configuration starts from: `config` without its sweep section."""
  base = copy.deepcopy(config)
  with base.unlocked():
    del base["sweep"]
  return base


OPTIONS = ("axes", "metric", "epsilon_bands", "selection_eta", "selection_mean", "execution",
           "group_size")
UTILITY = ("accuracy", "balanced_accuracy", "auroc", "worst_hospital_accuracy",
           "unseen_accuracy")


def check_options(sweep: ml_collections.ConfigDict) -> None:
  """The sweep section's fields besides the axes (ValueError naming the field)."""
  for key in sweep:
    validation.check(key in OPTIONS, f"sweep.{key}", sweep[key],
                     f"absent: a sweep section has only {list(OPTIONS)}")
  validation.check(sweep.metric in UTILITY, "sweep.metric", sweep.metric,
                   f"one of {list(UTILITY)}")
  edges = list(sweep.epsilon_bands)
  validation.check(all(a < b for a, b in zip([0.0, *edges], edges)),
                   "sweep.epsilon_bands", sweep.epsilon_bands,
                   "increasing epsilons > 0 (band edges)")
  validation.check(sweep.selection_eta > -1, "sweep.selection_eta", sweep.selection_eta,
                   "> -1 (1: geometric number of runs, 0: logarithmic)")
  validation.check(sweep.selection_mean == 0 or sweep.selection_mean > 1,
                   "sweep.selection_mean", sweep.selection_mean,
                   "0 (the number of configurations) or > 1: the expected number of runs")
  validation.check(sweep.execution in sweep_vmap.EXECUTIONS, "sweep.execution",
                   sweep.execution, f"one of {list(sweep_vmap.EXECUTIONS)}")
  validation.check(isinstance(sweep.group_size, int) and sweep.group_size >= 0,
                   "sweep.group_size", sweep.group_size,
                   "an int >= 0: configurations vmapped at once (0: a whole group)")


def axes(config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """`sweep.axes` as {dotted field: values}, checked against the base config.

  Raises:
    ValueError: one line naming the axis: no axis, a field the config lacks, an
      empty or repeated list of values, target_epsilon beside dp.noise_multiplier
      or without DP.
  """
  found = _leaves(config.sweep.axes)
  validation.check(bool(found), "sweep.axes", {}, "at least one axis, e.g. "
                   "sweep.axes.dp.noise_multiplier = (0.8, 1.5)")
  fields = _leaves(base_config(config))
  out = {}
  for name, values in found.items():
    where = f"sweep.axes.{name}"
    validation.check(name == CALIBRATED or name in fields, where, values,
                     f"an axis over a config field; the config has no field {name!r}")
    validation.check(isinstance(values, (tuple, list)) and len(values) > 0, where, values,
                     "a non-empty tuple of values")
    validation.check(len(set(map(repr, values))) == len(values), where, values,
                     "a tuple of distinct values")
    out[name] = tuple(values)
  if CALIBRATED in out:
    validation.check("dp.noise_multiplier" not in out, "sweep.axes.target_epsilon",
                     out[CALIBRATED], "absent when sweep.axes.dp.noise_multiplier is given "
                     "(it sets the noise multiplier)")
    validation.check(config.dp.level != "none", "sweep.axes.target_epsilon", out[CALIBRATED],
                     "used with dp.level != 'none'")
    for value in out[CALIBRATED]:
      validation.check(isinstance(value, (int, float)) and 0 < value < math.inf,
                       "sweep.axes.target_epsilon", value, "a tuple of numbers > 0")
  return out


def _name(index: int, values: dict) -> str:
  text = "_".join(f"{k}={v}" for k, v in values.items())
  return f"{index:03d}_{text}".replace(os.sep, "-")


def _set(config, field: str, value, where: str) -> None:
  *parents, leaf = field.split(".")
  node = config
  for part in parents:
    node = node[part]
  try:
    node[leaf] = value
  except TypeError as e:  # ml_collections refuses a value of another type
    raise ValueError(f"{where}={value!r} must be of the field's type ({e})") from None


def expand(config: ml_collections.ConfigDict) -> list[Configuration]:
  """The sweep's configurations, every one validated as a lone run would be.

  `target_epsilon` values are calibrated here (the federation of each group is built
  for its ledger). Raises ValueError (one line) before any training.
  """
  check_options(config.sweep)
  spec = axes(config)
  base = base_config(config)
  out = []
  for index, combo in enumerate(itertools.product(*spec.values())):
    values = dict(zip(spec, combo))
    run = copy.deepcopy(base)
    for field, value in values.items():
      if field != CALIBRATED:
        _set(run, field, value, f"sweep.axes.{field}")
    name = _name(index, values)
    try:
      config_lib.validate(run)
      validation.check(run.attack.kind == "none", "attack.kind", run.attack.kind,
                       "'none' in a sweep (an attack study runs alone: launch it once "
                       "per setting)")
      validation.check(run.task == "classification", "task", run.task,
                       "'classification' in a sweep (its table, plot and private selection "
                       "rank accuracy-type metrics; launch a segmentation study once per "
                       "setting)")
    except ValueError as e:
      raise ValueError(f"sweep configuration {name}: {e}") from None
    out.append(Configuration(index, values, run, name))
  if CALIBRATED in spec:
    _calibrate(out)
  return out


def group_key(config: ml_collections.ConfigDict) -> str:
  """What configurations sharing one Setup have in common: every untraced field.

  With secure aggregation every field: its encoding range and distributed noise are
  built from dp.clip_norm and dp.noise_multiplier as constants (aggregation.py).
  """
  fields = _leaves(config)
  shared = () if fields.get("secure_agg.enabled") else TRACED_FIELDS
  return io.dumps({k: v for k, v in fields.items() if k not in shared})


def groups(configurations: list[Configuration]) -> list[list[Configuration]]:
  """Configurations by `group_key`, in sweep order (each group: one Setup, one program)."""
  out: dict[str, list[Configuration]] = {}
  for c in configurations:
    out.setdefault(group_key(c.config), []).append(c)
  return list(out.values())


def _calibrate(configurations: list[Configuration]) -> None:
  """Sets dp.noise_multiplier of each configuration from its target_epsilon value."""
  for group in groups(configurations):
    fed = run_federation(group[0].config)
    for c in group:
      sigma = calibrate_noise_multiplier(c.config, fed, c.values[CALIBRATED])
      c.config.dp.noise_multiplier = sigma


def run_federation(config):
  """The federation a run of `config` trains on: with `audit.enabled`, its canaries
  join as one-image patients (they change the sampling rates the ledger charges)."""
  fed = make_federated_data(config)
  if not config.audit.enabled:
    return fed
  return canaries_lib.insert(fed, canaries_lib.make(config.audit, fed, config.seed))


def _max_epsilon(config, fed, sigma: float) -> float:
  trial = copy.deepcopy(config)
  trial.dp.noise_multiplier = sigma
  ledger = privacy_plan.make_plan(trial, fed, apply_fn=None).new_ledger()
  privacy_plan.replay_ledger(ledger, trial, trial.num_rounds)
  return ledger.max_epsilon()


def calibrate_noise_multiplier(config, fed, target_epsilon: float) -> float:
  """Smallest noise multiplier (within 0.1 %) whose run ends at epsilon <= target.

  The epsilon is the run's own: the max over its per-hospital ledger after
  `num_rounds` rounds of its cohorts (exact for every accountant and DP level).
  """
  return accountants.smallest_noise_multiplier(
      lambda sigma: _max_epsilon(config, fed, sigma), target_epsilon,
      field="sweep.axes.target_epsilon")


def share_setup(setup: round_lib.Setup, config: ml_collections.ConfigDict) -> round_lib.Setup:
  """`setup` for `config`, which differs from `setup.config` only in `TRACED_FIELDS`.

  The federation and compiled programs are reused (their hyperparameters are
  arguments); the config, the privacy plan (its ledger holds the noise multiplier)
  and the traced values are `config`'s.
  """
  if group_key(config) != group_key(setup.config):
    raise ValueError("share_setup: configs differ outside the traced hyperparameters")
  shared = copy.copy(setup)
  shared.config = config
  shared.plan = privacy_plan.make_plan(config, setup.fed, setup.apply_fn, flat=setup.flat)
  shared.privatize, shared.update_clip_norm = shared.plan.privatize, shared.plan.update_clip_norm
  shared.hparams = round_lib.hyperparameters(config)
  return shared


def run_dir(workdir: str, c: Configuration) -> str:
  return os.path.join(workdir, RUNS, c.name)


def finished(path: str, config) -> bool:
  """A configuration's run of this config completed in `path` (summary.json written)."""
  if not os.path.exists(os.path.join(path, workdir_lib.SUMMARY)):
    return False
  workdir_lib.check_run(path, config)  # another config's run is refused, not skipped
  return True


def check_sweep(workdir: str, config, *, overwrite: bool = False) -> None:
  """Refuses a workdir whose sweep.json holds another sweep, unless `overwrite`."""
  path = os.path.join(workdir, SWEEP_FILE)
  if overwrite or not os.path.exists(path):
    return
  try:
    with open(path) as f:
      stored = json.load(f).get("config")
  except (OSError, ValueError, AttributeError):
    stored = None
  if stored != workdir_lib.config_record(config):
    raise ValueError(f"--workdir={workdir!r} holds another sweep; use --overwrite to "
                     "replace it, or another --workdir")


def plan(config: ml_collections.ConfigDict, workdir: str, *,
         overwrite: bool = False) -> list[Configuration]:
  """Checks the sweep and its workdir; the configurations (nothing trained or written)."""
  workdir_lib.check_writable(workdir, create=False)
  check_sweep(workdir, config, overwrite=overwrite)
  configurations = expand(config)
  if not overwrite:
    for c in configurations:
      workdir_lib.check_run(run_dir(workdir, c), c.config)
  return configurations


def run(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
        overwrite: bool = False,
        configurations: list[Configuration] | None = None) -> tuple[list[dict], str]:
  """Runs every configuration (skipping finished ones), then writes the sweep's outputs.

  Returns the results table's rows (results.csv / results.jsonl in `workdir`) and
  the one-screen summary (summary.txt).
  """
  configurations = configurations or plan(config, workdir, overwrite=overwrite)
  workdir_lib.check_writable(workdir)
  io.write_json_atomic(os.path.join(workdir, SWEEP_FILE), {
      "config": workdir_lib.config_record(config), "versions": io.versions(),
      "configurations": [{"name": c.name, "values": c.values} for c in configurations]})
  mode = sweep_vmap.execution(config.sweep.execution)
  for group in groups(configurations):
    todo = [c for c in group
            if overwrite or not finished(run_dir(workdir, c), c.config)]
    if todo:
      _run_group(todo, workdir, mode=mode, group_size=config.sweep.group_size,
                 total=len(configurations), progress=progress, overwrite=overwrite)
  rows = sweep_report.rows(
      [(c.values, c.config, run_dir(workdir, c)) for c in configurations])
  return rows, sweep_report.write(workdir, rows, config.sweep)


def _run_group(todo: list[Configuration], workdir: str, *, mode: str, group_size: int,
               total: int, progress: bool, overwrite: bool) -> None:
  """The unfinished configurations of one group on one Setup: vmapped `group_size` at
  a time (`mode == "vmap"`, fedsim/sweep_vmap.py) or one after another."""
  setup = simulation.prepare(todo[0].config)
  reason = sweep_vmap.unsupported(setup) if mode == "vmap" else None
  if mode == "vmap" and reason is None and len(todo) > 1:
    size = group_size or len(todo)
    for start in range(0, len(todo), size):
      part = todo[start:start + size]
      if progress:
        print(f"[{part[0].index + 1}-{part[-1].index + 1}/{total}] vmapped: "
              + ", ".join(c.name for c in part))
      sweep_vmap.train_group([(share_setup(setup, c.config), run_dir(workdir, c))
                              for c in part], progress=progress, overwrite=overwrite)
    return
  for c in todo:
    if progress:
      why = f" (one after another: {reason})" if reason else ""
      print(f"[{c.index + 1}/{total}] {c.name}{why}")
    simulation.train(share_setup(setup, c.config), run_dir(workdir, c), progress=progress,
                     overwrite=overwrite)
