"""DP-SGD inside a hospital: the gradient of one private local step.

`dp_sgd_gradient(...)` returns a `client.GradientFn` that clips the gradient of
each privacy unit (an example, or a patient with all their images) to C, sums,
adds N(0, (sigma C)^2) once (privacy/clipping.py `privatize`) and divides by the
expected units of the step. The batch it sees was drawn by the Poisson sampler
(privacy/sampling.py) inside `client_update`; fedsim/privacy_plan.py builds both,
and the DpEvent that describes them, from one config.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fedsim import client as client_lib
from privacy import clipping


def batch_groups(patients: jax.Array, mask: jax.Array) -> jax.Array:
  """Patient ids renumbered within the batch `[M]` -> `[0, M)`, -1 where masked.

  Keeps the per-patient buffers at the batch size, not the hospital's patients.
  """
  m = patients.shape[0]
  _, inverse = jnp.unique(patients, size=m, fill_value=-1, return_inverse=True)
  return jnp.where(mask, inverse.reshape(m), -1)


def dp_sgd_gradient(apply_fn: Callable, *, unit: str, method: str,
                    microbatch_size: int, patient_slots: int = 0,
                    patient_span: int = 0, ghost_rows: int = 0) -> client_lib.GradientFn:
  """DP-SGD step gradient: clip per unit, sum, noise, divide by expected units.

  Patients, by the sampler's layout (privacy/sampling.py): `patient_slots > 0`,
  slots of that many images, so a patient is a run of slots
  (`clipping.clipped_grad_sum(unit_size=...)`); `patient_span > 0`, the flat
  layout, a patient's images adjacent (at most that many) and named by
  `batch.units`; otherwise patients are found by id anywhere in the batch. The
  step's metrics (loss, accuracy) come from the clipping pass's own forward.
  `ghost_rows`: ghost clipping over row blocks of this size (the same result).
  """

  def per_example_loss_and_metrics(params, batch):
    """Losses, plus each example's masked loss and hit for the metrics (one forward)."""
    logits = apply_fn(params, batch["x"])
    losses = client_lib.example_loss(logits, batch["y"])
    return losses, {"loss_sum": jnp.where(batch["w"], losses, 0.0),
                    "correct": jnp.where(batch["w"], client_lib.example_hits(logits, batch["y"]),
                                         0.0)}

  def units_of(batch: client_lib.Batch) -> dict:
    """How `clipped_grad_sum` finds the privacy units of this batch's layout."""
    if unit == "example" or patient_slots:
      return {"unit_size": patient_slots or 1}
    if not patient_span:  # patients by id anywhere in the batch
      return {"groups": batch_groups(batch.patients, batch.mask),
              "num_groups": batch.mask.shape[0]}
    if batch.units is None:
      raise ValueError("the flat patient layout needs batch.units (the sampler's Draw.unit)")
    return {"groups": jnp.where(batch.mask, batch.units, -1),
            "num_groups": batch.mask.shape[0], "unit_span": patient_span}

  def grad_fn(params, batch: client_lib.Batch, key, hparams):
    grad_sum, stats, metrics = clipping.clipped_grad_sum(
        per_example_loss_and_metrics, params,
        {"x": batch.x, "y": batch.y, "w": batch.mask}, batch.mask,
        clip_norm=hparams["clip_norm"], method=method,
        microbatch_size=microbatch_size or None, has_aux=True, ghost_rows=ghost_rows,
        **units_of(batch))
    grad = clipping.privatize(
        grad_sum, key, clip_norm=hparams["clip_norm"],
        noise_multiplier=hparams["noise_multiplier"],
        expected_batch_size=hparams["expected_units"])
    return grad, {**metrics,
                  "num_units": stats.num_units.astype(jnp.float32),
                  "num_clipped": stats.num_clipped.astype(jnp.float32),
                  "num_nonfinite": stats.num_nonfinite.astype(jnp.float32)}

  return grad_fn
