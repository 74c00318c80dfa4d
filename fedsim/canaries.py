"""Canaries of a privacy audit (`audit.enabled`): inserted, trained on, scored, audited.

`audit.num_canaries` canaries go to `audit.num_hospitals` hospitals (drawn from
the seed); each is included in its hospital's training split with probability
1/2, independently (Steinke, Nasr and Jagielski 2023). A canary is data like any
other: one patient with one image, sampled, clipped, noised and accounted with
the hospital's other units (the ledger is built from the data with the canaries
in it). Two threat models (`audit.kind`):

* `input`: the canary is an out-of-distribution image (uniform noise) with a
  random label; the adversary sees the final model and scores a canary by minus
  its loss (black box).
* `gradient`: the canary's clipped gradient is C times a fixed random direction
  (sparse: `DIRECTION_SUPPORT` coordinates with random signs), whatever the
  model (white box, as in Nasr et al. 2023); the adversary sees every update and
  scores a canary by the inner product of the total update theta_T - theta_0
  with minus its direction (the sum of the per-round inner products). Marked in
  the data by the label -1 - index; DP-SGD never sees it as an example
  (`with_gradient_canaries` adds its term to the noised gradient, which is the
  same as adding it before the noise).

`audit_run` turns the scores into epsilon lower bounds (privacy/attacks/audit.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fedsim import client as client_lib
from fedsim import keys
from fedsim.data.base import ClientArrays, FederatedData
from privacy.attacks import audit

KINDS = ("input", "gradient")
DIRECTION_SUPPORT = 256  # coordinates of a gradient canary's direction


@dataclasses.dataclass(frozen=True)
class Canaries:
  """The canaries of a run (host numpy).

  Attributes:
    kind: one of KINDS.
    hospitals: int `[m]` the hospital of each canary.
    included: bool `[m]` whether it is in its hospital's training split.
    images: uint8 `[m, H, W, C]`.
    labels: int32 `[m]` (gradient canaries: -1 - index).
    seed: the run's seed (directions derive from it).
  """

  kind: str
  hospitals: np.ndarray
  included: np.ndarray
  images: np.ndarray
  labels: np.ndarray
  seed: int


def make(audit_config, fed: FederatedData, seed: int) -> Canaries:
  """Draws the canaries of a run from (seed, AUDIT): hospitals, inclusion, content."""
  rng = np.random.default_rng([seed, keys.AUDIT])
  m = audit_config.num_canaries
  chosen = rng.choice(fed.num_clients, size=audit_config.num_hospitals, replace=False)
  included = rng.random(m) < 0.5
  images = rng.integers(0, 256, size=(m,) + fed.image_shape, dtype=np.uint8)
  if audit_config.kind == "gradient":
    labels = -1 - np.arange(m, dtype=np.int32)
  else:
    labels = rng.integers(0, fed.num_classes, size=m).astype(np.int32)
  return Canaries(audit_config.kind, np.sort(chosen)[np.arange(m) % len(chosen)],
                  included, images, labels, seed)


def insert(fed: FederatedData, canaries: Canaries) -> FederatedData:
  """`fed` with each included canary appended to its hospital's training split as
  a new patient (the split is re-padded if a hospital outgrows it)."""
  train = fed.train
  add = np.bincount(canaries.hospitals[canaries.included], minlength=train.num_clients)
  width = max(train.max_examples, int((train.counts + add).max()))
  pad = lambda a, value: np.concatenate(
      [a, np.full((a.shape[0], width - a.shape[1]) + a.shape[2:], value, a.dtype)], axis=1)
  images, labels, patients = pad(train.images, 0), pad(train.labels, 0), pad(train.patients, -1)
  counts, num_patients = train.counts.copy(), train.num_patients.copy()
  for i in np.flatnonzero(canaries.included):
    k = canaries.hospitals[i]
    images[k, counts[k]], labels[k, counts[k]] = canaries.images[i], canaries.labels[i]
    patients[k, counts[k]] = num_patients[k]
    counts[k] += 1
    num_patients[k] += 1
  return dataclasses.replace(fed, train=ClientArrays(images, labels, patients, counts,
                                                     num_patients))


def directions(canaries: Canaries, num_params: int) -> tuple[jax.Array, jax.Array]:
  """Unit directions of the gradient canaries: coordinates int32 `[m, s]` and values
  `[m, s]` (random signs / sqrt(s)), fixed by the seed."""
  m, s = len(canaries.labels), min(DIRECTION_SUPPORT, num_params)
  rng = np.random.default_rng([canaries.seed, keys.AUDIT, 1])
  index = np.stack([rng.choice(num_params, size=s, replace=False) for _ in range(m)])
  values = rng.choice([-1.0, 1.0], size=(m, s)) / np.sqrt(s)
  return jnp.asarray(index, jnp.int32), jnp.asarray(values, jnp.float32)


def with_gradient_canaries(grad_fn: client_lib.GradientFn, canaries: Canaries,
                           params_like) -> client_lib.GradientFn:
  """DP-SGD's gradient with each sampled gradient canary's C * direction added to the
  clipped sum (after the noise: the same distribution), divided by expected units."""
  num_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params_like))
  index, values = directions(canaries, num_params)
  m = len(canaries.labels)

  def wrapped(params, batch: client_lib.Batch, key, hparams):
    canary = batch.mask & (batch.y < 0)
    inner = batch._replace(y=jnp.where(canary, 0, batch.y), mask=batch.mask & ~canary)
    grad, stats = grad_fn(params, inner, key, hparams)
    counts = jnp.zeros(m, jnp.float32).at[jnp.where(canary, -1 - batch.y, m)].add(
        1.0, mode="drop")
    flat, unravel = ravel_pytree(grad)
    scale = hparams["clip_norm"] / hparams["expected_units"]
    flat = flat.at[index.reshape(-1)].add((scale * counts[:, None] * values).reshape(-1))
    return unravel(flat), stats

  return wrapped


def scores(setup, canaries: Canaries, initial_params, params) -> np.ndarray:
  """Each canary's score `[m]`, higher meaning "included" (see the module docstring)."""
  if canaries.kind == "gradient":
    update = ravel_pytree(params)[0] - ravel_pytree(initial_params)[0]
    index, values = directions(canaries, update.size)
    return -np.asarray(jnp.sum(update[index] * values, axis=1))
  x = client_lib.normalize(jnp.asarray(canaries.images), setup.fed.mean, setup.fed.std)
  logits = setup.apply_fn(params, x)
  return -np.asarray(client_lib.cross_entropy(logits, jnp.asarray(canaries.labels)))


def audit_run(setup, canaries: Canaries, initial_params, params, *, significance: float,
              delta: float) -> dict:
  """The audit's summary fields: epsilon lower bounds (Steinke et al.; f-DP) and counts."""
  s = scores(setup, canaries, initial_params, params)
  inside, outside = s[canaries.included], s[~canaries.included]
  bound = lambda method: audit.audit_scores(inside, outside, significance=significance,
                                            delta=delta, method=method)
  return {"audit_epsilon_lower_bound": bound("one_run"),
          "audit_epsilon_lower_bound_fdp": bound("one_run_fdp"),
          "audit": {"kind": canaries.kind, "num_canaries": len(s),
                    "included": int(canaries.included.sum()),
                    "hospitals": sorted({int(h) for h in canaries.hospitals}),
                    "significance": significance, "delta": delta}}
