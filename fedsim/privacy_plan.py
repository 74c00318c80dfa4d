"""One privacy plan per run: sampler, clipping, noise and ledger built together.

`make_plan(config, fed, apply_fn)` returns everything the round needs to be
private at the configured level, from the same config fields and the same
functions, so the mechanism that runs and the mechanism that is accounted cannot
drift apart (invariant 1 of shared/DESIGN.md):

- `none`: shuffled local epochs, mean gradients, weighted FedAvg.
- `example` / `patient`: DP-SGD in every hospital (fedsim/dp_sgd.py). Each local
  step Poisson-samples units with rate `poisson_rate(n_k, batch_size)`
  (privacy/sampling.py), clips each unit's gradient to C, adds N(0, (sigma C)^2)
  to the sum and divides by the expected units per step. Each hospital's ledger
  composes `active_steps(n_k)` Poisson subsampled Gaussians per round in which
  it took part.
- `client`: DP-FedAvg. Poisson cohorts with rate q, each delta clipped to S
  (`transform`), N(0, (sigma S)^2) once per round on the sum, division by the
  expected cohort `q * num_clients` (`privatize`); one ledger entry per round for
  everyone. With `dp.adaptive_clip`, S follows a private quantile of the delta
  norms (privacy/adaptive_clipping.py); the ledger is the same.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np

from fedsim import aggregation, dp_sgd, models, sampling
from fedsim import client as client_lib
from fedsim import config as config_lib
from fedsim.data.base import FederatedData
from privacy import adaptive_clipping, clipping, validation
from privacy import ledger as ledger_lib
from privacy.sampling import PoissonSampler, poisson_rate

UNITS = {"none": None, "example": "example", "patient": "patient", "client": "hospital"}


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
  """What the round needs from the privacy configuration (immutable: one plan, many runs).

  Attributes:
    unit: privacy unit (None, "example", "patient", "hospital").
    grad_fn: the `client.GradientFn` of a local step.
    sampler: the Poisson sampler of DP-SGD, None for shuffled epochs.
    weighting: aggregation weighting of client deltas.
    transform: per-client `(delta, hparams) -> (delta, stats)` or None.
    privatize: `(round sums, key, hparams) -> (mean delta, apply)`: the server's
      mean delta (noised for client-level DP) and whether to step at all.
    update_clip_norm: `(round sums, key, hparams) -> clip norm` of the next round
      (adaptive clipping), or None.
    new_ledger: `() -> privacy.ledger.PrivacyLedger`, a fresh ledger per run;
      None without DP.
  """

  unit: Optional[str]
  grad_fn: Callable
  sampler: Optional[PoissonSampler]
  weighting: str
  transform: Optional[Callable]
  privatize: Callable
  update_clip_norm: Optional[Callable] = None
  new_ledger: Optional[Callable] = None

  def round_stats(self, sums: dict) -> dict:
    """Human-readable privacy statistics from one round's metric sums."""
    out = {}
    if "num_units" in sums:
      out["clipped_fraction"] = sums["num_clipped"] / max(sums["num_units"], 1.0)
      out["nonfinite_units"] = sums["num_nonfinite"]
    if "truncated_steps" in sums:
      out["truncated_fraction"] = sums["truncated_steps"] / max(sums["steps"], 1.0)
    if "delta_clipped" in sums:
      out["clipped_fraction"] = sums["delta_clipped"] / max(sums["clients"], 1.0)
    return out


def plain_mean(sums, key, hparams):
  """Non-private server mean: `aggregation.weighted_mean` of the round's sums."""
  del key, hparams
  return aggregation.weighted_mean(sums.delta_sum, sums.weight_sum)


def clip_delta(delta, hparams):
  """Client-level DP: each hospital's delta clipped to S = hparams["clip_norm"].

  Stats: `delta_clipped` = 1[norm > S] and `delta_unclipped` = 1[norm <= S] (the
  b_k of adaptive clipping; both 0 for a non-finite delta).
  """
  clipped, norm = clipping.clip_tree(delta, hparams["clip_norm"])
  return clipped, {"delta_clipped": (norm > hparams["clip_norm"]).astype(jnp.float32),
                   "delta_unclipped": (norm <= hparams["clip_norm"]).astype(jnp.float32)}


def check_model(variables, level: str) -> None:
  """Refuses models with batch statistics for DP (they leak across examples)."""
  if level != "none" and models.has_batch_norm(variables):
    raise ValueError(f"dp.level={level!r} needs a model without BatchNorm "
                     "(batch statistics mix examples); use GroupNorm")


def make_plan(config, fed: FederatedData, apply_fn: Optional[Callable], *,
              flat: bool = False, ghost_rows: int = 0) -> PrivacyPlan:
  """The privacy plan of `config` for the federation `fed` (validates first).

  `apply_fn=None` builds a plan for accounting only (its grad_fn is unusable).
  `flat=True`: DP-SGD batches in the sampler's flat layout (the engine then sets
  its `gather` per block, `engine.dp_gather='bucketed'`); the same sampling and
  DpEvent as the default layouts. `ghost_rows`: ghost clipping's row blocks
  (`clipping.clipped_grad_sum`; the engine's `Strategy.ghost_rows`), the same result.
  """
  level = config.dp.level
  if level == "none":
    return PrivacyPlan(None, client_lib.mean_gradient(apply_fn), None,
                       config.server.weighting, None, plain_mean)
  if level == "client":
    return _client_level_plan(config, apply_fn)
  return _local_plan(config, fed, apply_fn, level, flat, ghost_rows)


def local_sampling(config, fed: FederatedData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-hospital (Poisson rate, local steps per round, units) of DP-SGD.

  The same `poisson_rate` / `client.active_steps` the clients run with.
  """
  counts = fed.train.counts
  schedule = client_lib.schedule_from_config(config.client, fed.train.max_examples)
  rates = poisson_rate(counts, schedule.batch_size)
  steps = client_lib.active_steps(counts, schedule)
  units = counts if config.dp.level == "example" else fed.train.num_patients
  return rates.astype(np.float64), steps.astype(np.int64), units


def _local_plan(config, fed, apply_fn, level, flat: bool = False,
                ghost_rows: int = 0) -> PrivacyPlan:
  rates, steps, units = local_sampling(config, fed)
  validation.validate_dp_params(
      noise_multiplier=config.dp.noise_multiplier, sampling_rate=float(rates.max()),
      delta=config.dp.delta, clip_norm=config.dp.clip_norm, population=int(units.max()))
  max_units = config.dp.max_batch_size
  truncated = 0 < max_units < int(units.max())
  if (level == "patient" and not truncated and config.dp.clipping == "ghost"
      and config.dp.microbatch_size):
    raise ValueError("dp.microbatch_size must be 0 with dp.clipping='ghost', "
                     "dp.level='patient' and no dp.max_batch_size (ghost clipping of "
                     "patients found by id is not microbatched)")
  new_ledger = lambda: ledger_lib.PrivacyLedger.for_local_dp_sgd(
      sampling_rates=rates, steps=steps, noise_multiplier=config.dp.noise_multiplier,
      delta=config.dp.delta, accountant=config.dp.accountant, unit=level,
      truncated_batch_size=max_units if truncated else None,
      dataset_sizes=units if truncated else None)
  new_ledger()  # refuses an event the accountant cannot handle, before any compute
  sampler = PoissonSampler(
      unit=level, max_units=max_units if truncated else 0,
      unit_images=fed.train.max_patient_images if level == "patient" else 1)
  if flat:  # at most every kept unit's images (the engine gathers fewer rows)
    sampler = dataclasses.replace(sampler, gather=sampler.batch_slots or fed.train.max_examples)
  patient = level == "patient"
  grad_fn = dp_sgd.dp_sgd_gradient(
      apply_fn, unit=level, method=config.dp.clipping,
      microbatch_size=config.dp.microbatch_size, ghost_rows=ghost_rows,
      patient_slots=sampler.unit_images if patient and truncated and not flat else 0,
      patient_span=sampler.unit_images if patient and flat else 0)
  return PrivacyPlan(level, grad_fn, sampler, config.server.weighting, None, plain_mean,
                     new_ledger=new_ledger)


def _client_level_plan(config, apply_fn) -> PrivacyPlan:
  q = config.client_sampling_rate
  if q <= 0:
    raise ValueError(
        "client_sampling_rate=0.0 must be in (0, 1] for dp.level='client' "
        "(DP-FedAvg is accounted for Poisson cohorts)")
  validation.validate_dp_params(
      noise_multiplier=config.dp.noise_multiplier, sampling_rate=q,
      delta=config.dp.delta, clip_norm=config.dp.clip_norm,
      population=config.num_clients)
  new_ledger = lambda: ledger_lib.PrivacyLedger.for_client_level(
      num_hospitals=config.num_clients, noise_multiplier=config.dp.noise_multiplier,
      delta=config.dp.delta, sampling_rate=q, accountant=config.dp.accountant)
  new_ledger()
  expected = q * config.num_clients
  adaptive = config.dp.adaptive_clip
  count_stddev = config_lib.adaptive_clip_count_stddev(config) if adaptive else 0.0

  def privatize(sums, key, hparams):
    """N(0, (z S)^2) once on the sum of clipped deltas, / the expected cohort."""
    z = hparams["noise_multiplier"]
    if adaptive:  # the count takes its share of the budget (total stays z)
      z = adaptive_clipping.delta_noise_multiplier(z, count_stddev)
    return clipping.privatize(
        sums.delta_sum, key, clip_norm=hparams["clip_norm"],
        noise_multiplier=z, expected_batch_size=expected), jnp.bool_(True)

  def update_clip_norm(sums, key, hparams):
    return adaptive_clipping.update_clip_norm(
        hparams["clip_norm"], sums.metrics["delta_unclipped"], sums.metrics["clients"],
        key, target_quantile=config.dp.target_quantile,
        learning_rate=config.dp.clip_learning_rate, count_stddev=count_stddev,
        expected_cohort=expected)

  return PrivacyPlan("hospital", client_lib.mean_gradient(apply_fn), None, "uniform",
                     clip_delta, privatize, update_clip_norm if adaptive else None,
                     new_ledger)


def replay_ledger(ledger, config, last_round: int, *, snapshot_rounds=()) -> None:
  """Charges `ledger` for rounds 1..`last_round` of a run of `config`.

  Cohorts (and secure aggregation's dropouts, whose surviving distributed noise a
  round is charged) depend only on (seed, round), so the charges are exactly those
  of the run; a snapshot is taken after each round in `snapshot_rounds`.
  """
  for r in range(1, last_round + 1):
    ledger.record_round(sampling.participation(config, r),
                        noise_multiplier=aggregation.charged_noise_multiplier(config, r))
    if r in snapshot_rounds:
      ledger.snapshot(r)


def ledger_preview(config):
  """The per-hospital ledger a run of `config` would end with (None without DP).

  Builds the run's federation (canaries included) and replays its cohorts; exact unless
  `dp.target_epsilon` stops the run early.
  """
  from fedsim import simulation  # pylint: disable=import-outside-toplevel (imports this)
  config_lib.validate(config)
  if config.dp.level == "none":
    return None
  ledger = make_plan(config, simulation.federate(config)[0], apply_fn=None).new_ledger()
  replay_ledger(ledger, config, config.num_rounds, snapshot_rounds={config.num_rounds})
  return ledger
