"""One privacy plan per run: sampler, clipping, noise and DpEvent built together.

`make_plan(config, fed, ...)` returns everything the round needs to be private at
the configured level, from the same config fields and the same functions, so the
mechanism that runs and the mechanism that is accounted cannot drift apart
(invariant 1 of shared/DESIGN.md):

- `none`: shuffled local epochs, mean gradients, weighted FedAvg.
- `example` / `patient`: DP-SGD in every hospital. Each local step Poisson-samples
  units with rate `client.poisson_rate(n_k, batch_size)`, clips each unit's
  gradient to C, adds N(0, (sigma C)^2) to the sum and divides by the expected
  units per step. Each hospital's ledger composes `active_steps(n_k)` Poisson
  subsampled Gaussians per round in which it took part.
- `client`: DP-FedAvg. Poisson cohorts with rate q, each delta clipped to S
  (`dp.clip_norm`), N(0, (sigma S)^2) once per round on the sum, division by the
  expected cohort `q * num_clients`; one ledger entry per round for everyone.
  With `dp.adaptive_clip`, S follows a private quantile of the delta norms
  (privacy/adaptive_clipping.py); the ledger is the same.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedsim import client as client_lib
from fedsim import models
from fedsim.data.base import FederatedData
from privacy import accounting, adaptive_clipping, clipping

UNITS = {"none": None, "example": "example", "patient": "patient", "client": "hospital"}


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
  """What the round loop needs from the privacy configuration.

  Attributes:
    unit: privacy unit (None, "example", "patient", "hospital").
    grad_fn: the `client.GradientFn` of a local step.
    sampler: `client.PoissonSampler` for DP-SGD, None for shuffled epochs.
    weighting: aggregation weighting of client deltas.
    delta_transform: per-client `(delta, hparams) -> (delta, stats)` or None.
    finalize: `(round sums, key, hparams) -> mean delta` (None: skip the step).
    ledger: `privacy.accounting.PrivacyLedger` or None.
    update_hparams: `(round sums, key, hparams) -> hparams` of the next round
      (adaptive clipping moves `clip_norm`), or None.
  """

  unit: Optional[str]
  grad_fn: Callable
  sampler: Optional[client_lib.PoissonSampler]
  weighting: str
  delta_transform: Optional[Callable]
  finalize: Callable
  ledger: Any
  update_hparams: Optional[Callable] = None

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


def weighted_mean(result, key, hparams):
  """Plain FedAvg: sum of weighted deltas / sum of weights; None if no client."""
  del key, hparams
  total = float(result.weight_sum)
  if total == 0.0:
    return None
  return jax.tree.map(lambda d: d / total, result.delta_sum)


def batch_groups(patients: jax.Array, mask: jax.Array) -> jax.Array:
  """Patient ids renumbered within the batch `[M]` -> `[0, M)`, -1 where masked.

  Keeps the per-patient buffers at the batch size, not the hospital's patients.
  """
  m = patients.shape[0]
  _, inverse = jnp.unique(patients, size=m, fill_value=-1, return_inverse=True)
  return jnp.where(mask, inverse.reshape(m), -1)


def dp_sgd_gradient(apply_fn: Callable, *, unit: str, method: str,
                    microbatch_size: int, patient_slots: int = 0) -> client_lib.GradientFn:
  """DP-SGD step gradient: clip per unit, sum, noise, divide by expected units.

  `patient_slots > 0`: the batch holds patients in slots of that many images
  (the truncated patient sampler's layout), so each patient is one lane of
  `vmap(grad)` whatever `method` says (ghost clipping over the slot groups
  measured slower: 7.7 vs 6.5 s a default round on a 2-core CPU); otherwise
  patients are found by id anywhere in the batch.
  """

  def per_example_loss(params, batch):
    return client_lib.cross_entropy(apply_fn(params, batch["x"]), batch["y"])

  def with_metrics(logits, y, w):
    """Losses, plus each unit's loss and correct count for the metrics (one forward)."""
    losses = client_lib.cross_entropy(logits, y)
    hits = (jnp.argmax(logits, -1) == y) & w
    return losses, {"loss_sum": jnp.where(w, losses, 0.0), "correct": hits.astype(jnp.float32)}

  def per_patient_loss(params, batch):  # batch leaves [M, slots, ...]
    m, k = batch["y"].shape
    logits = apply_fn(params, batch["x"].reshape((m * k,) + batch["x"].shape[2:]))
    losses, aux = with_metrics(logits, batch["y"].reshape(-1), batch["w"].reshape(-1))
    per_unit = lambda v: jnp.sum(v.reshape(m, k), axis=1)
    return per_unit(aux["loss_sum"]), jax.tree.map(per_unit, aux)

  def per_example_loss_and_metrics(params, batch):
    return with_metrics(apply_fn(params, batch["x"]), batch["y"], batch["w"])

  def clipped_sum(params, batch: client_lib.Batch, clip_norm):
    """(clipped grad sum, ClipStats, metric sums or None when a forward is still owed)."""
    microbatch = microbatch_size or None
    if unit == "patient" and patient_slots:
      shape = (-1, patient_slots)
      slots = {"x": batch.x.reshape(shape + batch.x.shape[1:]),
               "y": batch.y.reshape(shape), "w": batch.mask.reshape(shape)}
      return clipping.clipped_grad_sum(
          per_patient_loss, params, slots, jnp.any(slots["w"], axis=1),
          clip_norm=clip_norm, method="vmap", microbatch_size=microbatch, has_aux=True)
    if unit == "example" and method == "vmap":
      return clipping.clipped_grad_sum(
          per_example_loss_and_metrics, params,
          {"x": batch.x, "y": batch.y, "w": batch.mask}, batch.mask,
          clip_norm=clip_norm, method="vmap", microbatch_size=microbatch, has_aux=True)
    patient = unit == "patient"
    return clipping.clipped_grad_sum(
        per_example_loss, params, {"x": batch.x, "y": batch.y}, batch.mask,
        clip_norm=clip_norm,
        groups=batch_groups(batch.patients, batch.mask) if patient else None,
        num_groups=batch.mask.shape[0] if patient else None,
        method=method, microbatch_size=microbatch) + (None,)

  def grad_fn(params, batch: client_lib.Batch, key, hparams):
    grad_sum, stats, metrics = clipped_sum(params, batch, hparams["clip_norm"])
    grad = clipping.privatize(
        grad_sum, key, clip_norm=hparams["clip_norm"],
        noise_multiplier=hparams["noise_multiplier"],
        expected_batch_size=hparams["expected_units"])
    if metrics is None:  # ghost / grouped paths: one more forward pass, for metrics only
      logits = apply_fn(params, batch.x)
      w = batch.mask.astype(jnp.float32)
      loss_sum = jnp.sum(w * client_lib.cross_entropy(logits, batch.y))
      metrics = client_lib.batch_stats(loss_sum, logits, batch)
    return grad, {**metrics,
                  "num_units": stats.num_units.astype(jnp.float32),
                  "num_clipped": stats.num_clipped.astype(jnp.float32),
                  "num_nonfinite": stats.num_nonfinite.astype(jnp.float32)}

  return grad_fn


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


def make_plan(config, fed: FederatedData, apply_fn: Callable) -> PrivacyPlan:
  """The privacy plan of `config` for the federation `fed` (validates first)."""
  level = config.dp.level
  if level == "none":
    return PrivacyPlan(None, client_lib.mean_gradient(apply_fn), None,
                       config.server.weighting, None, weighted_mean, None)
  if level == "client":
    return _client_level_plan(config, fed, apply_fn)
  return _local_plan(config, fed, apply_fn, level)


def local_sampling(config, fed: FederatedData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-hospital (Poisson rate, local steps per round, units) of DP-SGD.

  The same `client.poisson_rate` / `client.active_steps` the clients run with.
  """
  counts = fed.train.counts
  schedule = client_lib.schedule_from_config(config.client, fed.train.max_examples)
  rates = client_lib.poisson_rate(counts, schedule.batch_size)
  steps = client_lib.active_steps(counts, schedule)
  units = counts if config.dp.level == "example" else fed.train.num_patients
  return rates.astype(np.float64), steps.astype(np.int64), units


def _local_plan(config, fed, apply_fn, level) -> PrivacyPlan:
  rates, steps, units = local_sampling(config, fed)
  accounting.validate_dp_params(
      noise_multiplier=config.dp.noise_multiplier, sampling_rate=float(rates.max()),
      delta=config.dp.delta, clip_norm=config.dp.clip_norm, population=int(units.max()))
  max_units = config.dp.max_batch_size
  truncated = 0 < max_units < int(units.max())
  if level == "patient" and config.dp.clipping == "ghost" and config.dp.microbatch_size:
    raise ValueError("dp.microbatch_size must be 0 with dp.clipping='ghost' and "
                     "dp.level='patient' (ghost clipping of patients is not microbatched)")
  ledger = accounting.PrivacyLedger.for_local_dp_sgd(
      sampling_rates=rates, steps=steps, noise_multiplier=config.dp.noise_multiplier,
      delta=config.dp.delta, accountant=config.dp.accountant, unit=level,
      truncated_batch_size=max_units if truncated else None,
      dataset_sizes=units if truncated else None)
  sampler = client_lib.PoissonSampler(
      unit=level, max_units=max_units if truncated else 0,
      unit_images=fed.train.max_patient_images if level == "patient" else 1)
  slotted = level == "patient" and truncated
  grad_fn = dp_sgd_gradient(apply_fn, unit=level, method=config.dp.clipping,
                            microbatch_size=config.dp.microbatch_size,
                            patient_slots=sampler.unit_images if slotted else 0)
  return PrivacyPlan(level, grad_fn, sampler, config.server.weighting, None,
                     weighted_mean, ledger)


def _client_level_plan(config, fed, apply_fn) -> PrivacyPlan:
  q = config.client_sampling_rate
  if q <= 0:
    raise ValueError(
        "client_sampling_rate=0.0 must be in (0, 1] for dp.level='client' "
        "(DP-FedAvg is accounted for Poisson cohorts)")
  accounting.validate_dp_params(
      noise_multiplier=config.dp.noise_multiplier, sampling_rate=q,
      delta=config.dp.delta, clip_norm=config.dp.clip_norm,
      population=config.num_clients)
  ledger = accounting.PrivacyLedger.for_client_level(
      num_hospitals=config.num_clients, noise_multiplier=config.dp.noise_multiplier,
      delta=config.dp.delta, sampling_rate=q, accountant=config.dp.accountant)
  expected = q * config.num_clients
  adaptive = config.dp.adaptive_clip
  count_stddev = adaptive_clip_count_stddev(config) if adaptive else 0.0

  def finalize(result, key, hparams):
    z = hparams["noise_multiplier"]
    if adaptive:  # the count takes its share of the budget (total stays z)
      z = adaptive_clipping.delta_noise_multiplier(z, count_stddev)
    return clipping.privatize(
        result.delta_sum, key, clip_norm=hparams["clip_norm"],
        noise_multiplier=z, expected_batch_size=expected)

  def update_hparams(result, key, hparams):
    clip_norm = adaptive_clipping.update_clip_norm(
        hparams["clip_norm"], result.metrics["delta_unclipped"], result.metrics["clients"],
        key, target_quantile=config.dp.target_quantile,
        learning_rate=config.dp.clip_learning_rate, count_stddev=count_stddev,
        expected_cohort=expected)
    return {**hparams, "clip_norm": clip_norm}

  return PrivacyPlan("hospital", client_lib.mean_gradient(apply_fn), None, "uniform",
                     clip_delta, finalize, ledger, update_hparams if adaptive else None)


def adaptive_clip_count_stddev(config) -> float:
  """sigma_b of `dp.adaptive_clip` (default E / 20); ValueError if 2 sigma_b <= z."""
  expected = config.client_sampling_rate * config.num_clients
  stddev = (config.dp.clipped_count_stddev
            or adaptive_clipping.default_count_stddev(expected))
  z = config.dp.noise_multiplier
  if z > 0 and not 2 * stddev > z:
    raise ValueError(
        f"dp.clipped_count_stddev={config.dp.clipped_count_stddev} (sigma_b={stddev:g}) "
        f"must be > dp.noise_multiplier / 2 = {z / 2:g} for dp.adaptive_clip=True "
        "(set it explicitly, or raise client_sampling_rate * num_clients)")
  return stddev


def ledger_preview(config):
  """The per-hospital ledger a run of `config` would end with (None without DP).

  Builds the federation and replays the run's cohorts (they depend only on
  seed and round), so it is exact unless `dp.target_epsilon` stops the run early.
  """
  from fedsim import config as config_lib  # pylint: disable=import-outside-toplevel
  from fedsim import sampling
  from fedsim.data import make_federated_data
  config_lib.validate(config)
  if config.dp.level == "none":
    return None
  fed = make_federated_data(config)
  plan = make_plan(config, fed, apply_fn=None)
  for r in range(1, config.num_rounds + 1):
    plan.ledger.record_round(sampling.participation_mask(
        config.num_clients, sampling.cohort_for_round(config, r)))
  plan.ledger.snapshot(config.num_rounds)
  return plan.ledger
