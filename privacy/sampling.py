"""The samplers the DpEvents describe: Poisson (exact or truncated) over privacy units.

Usable without fedsim. At each DP-SGD step every unit (an example, or a patient with
all their images) of a local data set joins the batch independently with rate
`poisson_rate(count, batch_size)`; the accountant charges exactly that rate
(`privacy.events.local_dp_sgd_event`), so the sampling that runs is the sampling
that is accounted. All functions are pure and jittable, with fixed shapes.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

UNITS = ("example", "patient")


def poisson_rate(count, batch_size: int):
  """Per-step Poisson rate `min(1, batch_size / count)` of a data set (np or jax).

  The expected batch is `batch_size` units; the accountant uses this function too.

  >>> import numpy as np
  >>> poisson_rate(np.array([400, 100, 0]), 100).tolist()
  [0.25, 1.0, 1.0]
  """
  return batch_size / (count * 1.0 + (count == 0)).clip(batch_size, None)


def index_uniform(key: jax.Array, n: int) -> jax.Array:
  """`[n]` uniforms where entry i depends only on (key, i), not on n.

  Padding a data set with more entries therefore leaves the draws of its real
  entries, and so its batches, unchanged (padding is invisible).
  """
  return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(
      jnp.arange(n))


class Draw(NamedTuple):
  """One step's batch: which local examples, in which privacy unit.

  Attributes:
    index: int `[G]` local example of each batch row.
    mask: bool `[G]`, the rows that are in the batch.
    unit: int `[G]` rank of the row's unit in the batch (-1 where masked); rows
      of one unit are adjacent in the flat layout.
    truncated: bool `[]`, more units were sampled than `max_units`.
  """

  index: jax.Array
  mask: jax.Array
  unit: jax.Array
  truncated: jax.Array


@dataclasses.dataclass(frozen=True)
class PoissonSampler:
  """Poisson sampling of privacy units at each local step (DP-SGD).

  Each unit is in a step's batch independently with the given rate. With
  `max_units == 0` every sampled unit is kept (exact Poisson,
  `PoissonSampledDpEvent`). With `max_units > 0` at most that many units are kept,
  a uniformly random subset of the sampled ones, always whole patients (truncated
  Poisson, `TruncatedSubsampledGaussianDpEvent` over units; `draw` reports when
  it truncated).

  Layouts (where the kept examples go; none changes which are kept):
    * mask (`gather == 0`, `max_units == 0`): the whole local set, a mask over it;
    * slots (`gather == 0`, `max_units > 0`): `[max_units * unit_images]` rows,
      patient r's images at `r * unit_images + j` (`unit_images`: the most images
      any patient has), so a patient is a run of slots (examples: one slot each);
    * flat (`gather > 0`): the kept examples first, a unit's examples adjacent, in
      `gather` rows. `gather` must hold every kept example (the engine picks it
      from `batch_sizes` of the same draws), else the excess is cut unaccounted.
  """

  unit: str = "example"  # "example" | "patient"
  max_units: int = 0     # 0: exact, the whole local set
  unit_images: int = 1   # most images of one unit (1 for examples)
  gather: int = 0        # > 0: flat layout in this many rows

  def __post_init__(self):
    if self.unit not in UNITS:
      raise ValueError(f"unit={self.unit!r} must be one of {list(UNITS)}")

  @property
  def batch_slots(self) -> int:
    """Gathered examples per step (0: the whole local set)."""
    return self.gather or self.max_units * self.unit_images

  def expected_units(self, count: jax.Array, num_patients: jax.Array,
                     rate: jax.Array) -> jax.Array:
    """Public expected units per step, the DP-SGD divisor (>= 1, also when padded)."""
    units = count if self.unit == "example" else num_patients
    return jnp.maximum(rate * units, 1.0)

  def draw(self, key: jax.Array, patients: jax.Array, real: jax.Array,
           rate: jax.Array) -> Draw:
    """One step's batch in this sampler's layout.

    Args:
      key: this step's sampling key.
      patients: int `[N]` patient id of each local example (-1 on padding).
      real: bool `[N]`, the real (not padded) examples.
      rate: the Poisson rate of this data set.
    """
    n = real.shape[0]
    u_key, order_key = jax.random.split(key)
    u, v = index_uniform(u_key, n), index_uniform(order_key, n)
    unit = patients if self.unit == "patient" else jnp.arange(n)
    if self.unit == "patient":  # one draw per patient slot, shared by its images
      slot = jnp.clip(patients, 0, n - 1)
      u, v = u[slot], v[slot]
    selected = (u < rate) & real
    if not (self.max_units or self.gather):
      return Draw(jnp.arange(n), selected, jnp.where(selected, unit, -1), jnp.bool_(False))
    # Sampled units first, in a random order; a unit's images stay adjacent.
    order = jnp.lexsort((unit, jnp.where(selected, v, 2.0 + v)))
    chosen, ids = selected[order], unit[order]
    boundary = jnp.concatenate([jnp.ones((1,), bool), ids[1:] != ids[:-1]])
    rank = jnp.cumsum(boundary & chosen) - 1
    keep = chosen & (rank < self.max_units) if self.max_units else chosen
    truncated = jnp.sum(boundary & chosen) > self.max_units if self.max_units else False
    if self.gather or self.unit == "example":  # kept examples are a prefix of `order`
      size = self.batch_slots
      pad = lambda x, fill: jnp.pad(x[:size], (0, max(0, size - n)), constant_values=fill)
      return Draw(pad(order, 0), pad(keep, False), pad(jnp.where(keep, rank, -1), -1),
                  jnp.asarray(truncated, bool))
    # Patient slots: kept patient r's j-th image goes to slot r * unit_images + j.
    position = jnp.arange(n)
    start = jax.lax.cummax(jnp.where(boundary, position, 0))
    size = self.batch_slots
    slot = jnp.where(keep, rank * self.unit_images + position - start, size)
    index = jnp.zeros(size, order.dtype).at[slot].set(order, mode="drop")
    mask = jnp.zeros(size, bool).at[slot].set(True, mode="drop")
    unit_of = jnp.full(size, -1, rank.dtype).at[slot].set(rank, mode="drop")
    return Draw(index, mask, unit_of, truncated)
