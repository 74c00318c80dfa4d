"""Per-example / per-patient gradient clipping and Gaussian noise for DP-SGD.

Usable without fedsim. Everything here is a pure function of arrays with fixed
shapes, safe under `jit`, `vmap` (over hospitals) and `lax.scan` (over local
steps): no Python branching on traced values, no host callbacks.

Privacy unit: by default each example; with `groups` (patient ids) all the
examples of one patient are summed first and the patient's gradient is clipped
as one unit. Invalid (masked or padded) examples are zeroed at the input and
have zero weight, so their content changes nothing. A unit whose gradient is
not finite (NaN, inf, or a norm that overflows float32) is dropped and counted;
it never reaches the sum.

The DP-SGD step is then, per hospital and local step::

  grad_sum, stats = clipped_grad_sum(loss_fn, params, batch, mask, clip_norm=C)
  update = privatize(grad_sum, key, clip_norm=C, noise_multiplier=sigma,
                     expected_batch_size=q * n)

Methods: "vmap" materialises per-example gradients (reference; any model);
"ghost" computes per-unit norms from layer inputs and output gradients and
book-keeps the clipped sum (see privacy/ghost.py for the layers it supports).
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from privacy import ghost
from privacy.ghost import LossFn, PyTree

METHODS = ("vmap", "ghost")
_TINY = 1e-12  # keeps C / (norm + tiny) finite for a zero gradient


class ClipStats(NamedTuple):
  """What clipping did to one batch (all scalars; sum over batches by hand).

  Attributes:
    num_units: int32, real (unmasked) privacy units in the batch.
    num_clipped: int32, finite units whose norm exceeded clip_norm.
    num_nonfinite: int32, real units dropped for a non-finite gradient.
    mean_norm: float32, mean unclipped norm over the finite real units
      (`num_units - num_nonfinite` of them; 0 when there are none).
  """

  num_units: jax.Array
  num_clipped: jax.Array
  num_nonfinite: jax.Array
  mean_norm: jax.Array


class _Counts(NamedTuple):
  """Additive form of ClipStats (summed over microbatches)."""

  num_units: jax.Array
  num_clipped: jax.Array
  num_nonfinite: jax.Array
  norm_sum: jax.Array


def _is_concrete_number(x: Any) -> bool:
  return isinstance(x, numbers.Number) or (
      isinstance(x, (np.ndarray, np.generic)) and np.ndim(x) == 0)


def _check_positive(name: str, value: Any, *, allow_zero: bool = False):
  """Validates a hyperparameter when it is a concrete number (not traced)."""
  if _is_concrete_number(value):
    v = float(value)
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
      raise ValueError(
          f"{name}={value} must be {'>= 0' if allow_zero else '> 0'}")


def global_norm(tree: PyTree) -> jax.Array:
  """L2 norm of all leaves of `tree` together, as a float32 scalar."""
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in leaves))


def clip_tree(tree: PyTree, clip_norm: float | jax.Array
              ) -> tuple[PyTree, jax.Array]:
  """Scales `tree` so its whole L2 norm is at most `clip_norm`.

  Used for client-level DP (clip each hospital's delta). A tree with a
  non-finite norm is replaced by zeros (so a diverged client cannot poison the
  sum); the caller can count those with `~jnp.isfinite(norm)`.

  >>> clipped, norm = clip_tree({"w": jnp.array([3.0, 4.0])}, 1.0)
  >>> [round(float(v), 4) for v in clipped["w"]], float(norm)
  ([0.6, 0.8], 5.0)

  Args:
    tree: a pytree of float arrays.
    clip_norm: C > 0.

  Returns:
    `(clipped, norm)`: the tree times `min(1, C / (norm + tiny))`, and the
    norm before clipping (float32 scalar).
  """
  _check_positive("clip_norm", clip_norm)
  norm = global_norm(tree)
  ok = jnp.isfinite(norm)
  factor = jnp.where(ok, jnp.minimum(1.0, clip_norm / (norm + _TINY)), 0.0)
  clipped = jax.tree.map(
      lambda x: jnp.where(ok, x * factor.astype(x.dtype), 0).astype(x.dtype),
      tree)
  return clipped, norm


def add_noise(tree: PyTree, key: jax.Array, stddev: float | jax.Array
              ) -> PyTree:
  """Adds independent N(0, stddev^2) noise to every entry of every leaf.

  Args:
    tree: a pytree of float arrays.
    key: a PRNG key; split into one key per leaf in `jax.tree.leaves` order.
    stddev: the noise standard deviation (may be traced).

  Returns:
    A pytree like `tree`.
  """
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  noisy = [x + (stddev * jax.random.normal(k, x.shape, jnp.float32)).astype(
      x.dtype) for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, noisy)


def privatize(grad_sum: PyTree, key: jax.Array, *,
              clip_norm: float | jax.Array,
              noise_multiplier: float | jax.Array,
              expected_batch_size: float | jax.Array) -> PyTree:
  """The Gaussian mechanism on a clipped sum, then the mean over the batch.

  Returns `(grad_sum + N(0, (noise_multiplier * clip_norm)^2)) /
  expected_batch_size`. The sum goes in exactly as `clipped_grad_sum` made it
  (nothing scales it before the noise), and the divisor is the PUBLIC expected
  number of units per batch (sampling rate x population; patients for
  per-patient DP), never the realised count, which is private.

  Args:
    grad_sum: the clipped sum (pytree).
    key: PRNG key for this hospital and step.
    clip_norm: C, the clipping bound used for `grad_sum`.
    noise_multiplier: sigma >= 0.
    expected_batch_size: public expected batch size (> 0).

  Returns:
    The noisy mean gradient, a pytree like `grad_sum`.
  """
  _check_positive("clip_norm", clip_norm)
  _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
  _check_positive("expected_batch_size", expected_batch_size)
  noisy = add_noise(grad_sum, key, noise_multiplier * clip_norm)
  return jax.tree.map(lambda x: (x / expected_batch_size).astype(x.dtype),
                      noisy)


def _clip_factors(sq_norms: jax.Array, unit_valid: jax.Array,
                  unit_finite: jax.Array, clip_norm
                  ) -> tuple[jax.Array, jax.Array, _Counts]:
  """Clip factors `[U]` (0 for dropped units), the kept mask and counts."""
  norms = jnp.sqrt(sq_norms.astype(jnp.float32))
  ok = unit_valid & unit_finite & jnp.isfinite(norms)
  factors = jnp.where(ok, jnp.minimum(1.0, clip_norm / (norms + _TINY)), 0.0)
  counts = _Counts(
      num_units=jnp.sum(unit_valid, dtype=jnp.int32),
      num_clipped=jnp.sum(ok & (norms > clip_norm), dtype=jnp.int32),
      num_nonfinite=jnp.sum(unit_valid & ~ok, dtype=jnp.int32),
      norm_sum=jnp.sum(jnp.where(ok, norms, 0.0)))
  return factors, ok, counts


def _zero_invalid(batch: PyTree, valid: jax.Array) -> PyTree:
  """Replaces invalid examples by zeros (their content must not matter)."""
  def zero(x):
    v = valid.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(v, x, jnp.zeros((), x.dtype))
  return jax.tree.map(zero, batch)


def _per_example_grads(loss_fn: LossFn, params: PyTree, batch: PyTree,
                       has_aux: bool = False) -> PyTree:
  """Per-example gradients, leaves `[M, *param_shape]` (and the aux `[M]` if has_aux)."""
  def one(example):
    single = jax.tree.map(lambda x: x[None], example)
    if not has_aux:
      return jax.grad(lambda p: loss_fn(p, single)[0])(params)

    def loss(p):
      losses, aux = loss_fn(p, single)
      return losses[0], jax.tree.map(lambda a: a[0], aux)
    return jax.grad(loss, has_aux=True)(params)
  return jax.vmap(one)(batch)


def _weighted_sum(factors: jax.Array, ok: jax.Array, grads: PyTree) -> PyTree:
  """`sum_u factors[u] * grads[u]`, dropped units removed by `where`."""
  def one(g):
    g = jnp.where(ok.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0)
    return jnp.tensordot(factors.astype(g.dtype), g, axes=1,
                         precision=jax.lax.Precision.HIGHEST)
  return jax.tree.map(one, grads)


def _sq_norms(grads: PyTree) -> jax.Array:
  return sum(jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1),
                     axis=1) for g in jax.tree.leaves(grads))


def _example_core_vmap(loss_fn, params, batch, valid, clip_norm, has_aux=False):
  grads, aux = _per_example_grads(loss_fn, params, batch, has_aux), {}
  if has_aux:
    grads, aux = grads
    aux = jax.tree.map(lambda a: jnp.sum(jnp.where(valid, a, 0)), aux)
  factors, ok, counts = _clip_factors(_sq_norms(grads), valid, True, clip_norm)
  return _weighted_sum(factors, ok, grads), counts, aux


def _example_core_ghost(loss_fn, params, batch, valid, clip_norm, has_aux=False, rows=0):
  terms = ghost.record(loss_fn, params, batch, valid, has_aux=has_aux, rows=rows)
  factors, _, counts = _clip_factors(terms.unit_sq_norms, valid,
                                     terms.example_finite, clip_norm)
  aux = jax.tree.map(lambda a: jnp.sum(jnp.where(valid, a, 0)), terms.aux or {})
  return terms.weighted_grad(factors), counts, aux


def _unit_loss(loss_fn, has_aux):
  """Loss of units `(batch [U, k, ...], valid [U, k])` -> per-unit sums `[U]`.

  A unit's loss (and aux) is the sum over its valid examples; padded slots of a
  unit add exactly nothing.
  """
  def unit_loss(params, units):
    batch, valid = units
    u, k = valid.shape
    out = loss_fn(params, jax.tree.map(lambda x: x.reshape((u * k,) + x.shape[2:]), batch))
    losses, aux = out if has_aux else (out, {})
    per_unit = lambda a: jnp.sum(jnp.where(valid, a.reshape(u, k), 0), axis=1)
    losses, aux = per_unit(losses), jax.tree.map(per_unit, aux)
    return (losses, aux) if has_aux else losses
  return unit_loss


def _unit_core_vmap(loss_fn, params, units, valid, clip_norm, has_aux=False):
  """`vmap(grad)` over units of `k` slots: `units = (batch [U, k, ...], valid [U, k])`."""
  return _example_core_vmap(_unit_loss(loss_fn, has_aux), params, units, valid,
                            clip_norm, has_aux)


def _unit_core_ghost(loss_fn, params, units, valid, clip_norm, has_aux=False, rows=0):
  """Ghost norms per unit of `k` slots, from one per-example forward and backward."""
  batch, slot_valid = units
  u, k = slot_valid.shape
  flat = jax.tree.map(lambda x: x.reshape((u * k,) + x.shape[2:]), batch)
  flat_valid = slot_valid.reshape(-1)
  terms = ghost.record(loss_fn, params, flat, flat_valid, unit_size=k, has_aux=has_aux,
                       rows=rows and max(rows // k, 1) * k)
  factors, _, counts = _clip_factors(terms.unit_sq_norms, valid,
                                     terms.example_finite, clip_norm)
  aux = jax.tree.map(lambda a: jnp.sum(jnp.where(flat_valid, a, 0)), terms.aux or {})
  return terms.weighted_grad(factors), counts, aux


def _microbatched(core, params, batch, extras: tuple, fills: tuple,
                  size: int):
  """Sums `core(params, batch_slice, *extras_slices)` over microbatches.

  Args:
    core: returns a pytree of arrays that add up over microbatches.
    params: passed through.
    batch: pytree of `[M, ...]` arrays.
    extras: `[M]` arrays (valid mask, segment ids) sliced like the batch.
    fills: padding value of each extra (padding must be dropped by `core`).
    size: examples per microbatch; the last one is padded.

  Returns:
    The sum of `core` over the microbatches.
  """
  m = extras[0].shape[0]
  n = -(-m // size)
  pad = n * size - m

  def split(x, fill=0):
    if pad:
      x = jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], fill, x.dtype)])
    return x.reshape((n, size) + x.shape[1:])

  def step(carry, xs):
    return jax.tree.map(jnp.add, carry, core(params, *xs)), None

  first = [jax.tree.map(lambda x: x[:size], batch)] + [e[:size] for e in extras]
  zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(core, params, *first))
  xs = [jax.tree.map(split, batch)] + [split(e, f)
                                       for e, f in zip(extras, fills)]
  return jax.lax.scan(step, zero, xs)[0]


def _unit_grads_vmap(loss_fn, params, batch, valid, seg, num_groups,
                     microbatch_size, has_aux=False):
  """Per-patient gradient sums, leaves `[num_groups, ...]` (and aux sums)."""
  def core(p, b, v, s):
    grads, aux = _per_example_grads(loss_fn, p, b, has_aux), {}
    if has_aux:
      grads, aux = grads
      aux = jax.tree.map(lambda a: jnp.sum(jnp.where(v, a, 0)), aux)
    return jax.tree.map(
        lambda g: jax.ops.segment_sum(
            jnp.where(v.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0), s,
            num_groups + 1)[:num_groups], grads), aux
  if microbatch_size is None:
    return core(params, batch, valid, seg)
  return _microbatched(core, params, batch, (valid, seg), (False, num_groups),
                       microbatch_size)


def _grouped(loss_fn, params, batch, valid, groups, num_groups, clip_norm,
             method, microbatch_size, has_aux=False, unit_span=0, ghost_rows=0):
  """Clipped sum over patients (units = groups), and the aux sums."""
  seg = jnp.where(valid, groups, num_groups).astype(jnp.int32)
  members = jax.ops.segment_sum(valid.astype(jnp.int32), seg,
                                num_groups + 1)[:num_groups]
  unit_valid = members > 0
  if method == "vmap":
    unit_grads, aux = _unit_grads_vmap(loss_fn, params, batch, valid, seg,
                                       num_groups, microbatch_size, has_aux)
    factors, ok, counts = _clip_factors(_sq_norms(unit_grads), unit_valid,
                                        True, clip_norm)
    return _weighted_sum(factors, ok, unit_grads), counts, aux
  terms = ghost.record(loss_fn, params, batch, valid, seg, num_groups,
                       unit_span=unit_span, has_aux=has_aux, rows=ghost_rows)
  bad = jax.ops.segment_sum((~terms.example_finite).astype(jnp.int32), seg,
                            num_groups + 1)[:num_groups]
  factors, _, counts = _clip_factors(terms.unit_sq_norms, unit_valid, bad == 0,
                                     clip_norm)
  weights = jnp.where(valid, factors[jnp.clip(seg, 0, num_groups - 1)], 0.0)
  aux = jax.tree.map(lambda a: jnp.sum(jnp.where(valid, a, 0)), terms.aux or {})
  return terms.weighted_grad(weights), counts, aux


def clipped_grad_sum(
    per_example_loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    mask: jax.Array,
    *,
    clip_norm: float | jax.Array,
    groups: jax.Array | None = None,
    num_groups: int | None = None,
    method: str = "vmap",
    microbatch_size: int | None = None,
    has_aux: bool = False,
    unit_size: int = 1,
    unit_span: int = 0,
    ghost_rows: int = 0,
) -> tuple[PyTree, ClipStats] | tuple[PyTree, ClipStats, PyTree]:
  """Sum over privacy units of gradients clipped to L2 norm `clip_norm`.

  Each unit's gradient (over the whole params pytree) is multiplied by
  `min(1, C / (norm + tiny))` and the results are summed; non-finite units are
  dropped (and counted). No noise here: see `privatize`.

  Args:
    per_example_loss_fn: `(params, batch) -> [M]` per-example losses; example
      i's loss may depend only on example i. For method="ghost" it must
      evaluate Flax linen modules whose supported layers hold every params
      leaf (see privacy/ghost.py); any callable works with "vmap".
    params: pytree of float arrays.
    batch: pytree of arrays with leading axis M, e.g. `{"x": [M, H, W, C],
      "y": [M]}`.
    mask: bool or 0/1 `[M]`; False for padding or unsampled examples.
    clip_norm: C > 0 (may be traced, e.g. a sweep axis).
    groups: optional int `[M]` patient of each example in
      `[0, num_groups)`, -1 for padding: the unit is then the patient (the
      sum of its examples' gradients is clipped). Ids outside the range are
      dropped like padding.
    num_groups: static number of patient slots (required with `groups`).
    method: "vmap" (per-example gradients via `vmap(grad)`) or "ghost" (norms
      without per-example gradients, then a book-kept weighted sum).
    microbatch_size: compute `microbatch_size` examples (units, with
      `unit_size`) at a time under `lax.scan` to bound memory (same result).
      With `groups` and "vmap" a `[num_groups, *params]` accumulator is kept;
      not supported with `groups` and "ghost".
    has_aux: the loss function returns `(losses [M], aux)`, aux a dict of `[M]`
      per-example values (e.g. loss and correctness for metrics, from the same
      forward pass); their sums over the real examples are returned too.
    unit_size: the unit is a run of `unit_size` consecutive examples (patient
      slots: M a multiple of it, the slot's unused examples masked); a unit is
      real when any of its examples is. Faster than `groups` (no id matching);
      not combinable with it.
    unit_span: with `groups`, each unit's examples are adjacent rows, at most
      `unit_span` of them (the flat layout of `privacy.sampling`): ghost norms
      pair each example with its `unit_span - 1` successors only, not all `M`.
      0: units anywhere in the batch.
    ghost_rows: method="ghost": run its passes over this many examples at a time
      (unrolled, the same result; `ghost.record(rows=...)`): on XLA:CPU 16 rows
      stay in cache and beat the whole batch. 0: the whole batch at once. For
      speed; `microbatch_size` (a rolled loop) is the one that bounds memory.

  Returns:
    `(grad_sum, stats)`: the clipped sum (pytree like params) and ClipStats;
    `(grad_sum, stats, aux_sums)` with `has_aux`.

  Raises:
    ValueError: for bad arguments, or layers "ghost" cannot handle.
  """
  if method not in METHODS:
    raise ValueError(f"method={method!r} must be one of {METHODS}")
  _check_positive("clip_norm", clip_norm)
  mask = jnp.asarray(mask)
  if mask.ndim != 1:
    raise ValueError(f"mask must be [M], got shape {mask.shape}")
  m = mask.shape[0]
  for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
    if jnp.ndim(x) == 0 or jnp.shape(x)[0] != m:
      raise ValueError(f"batch{jax.tree_util.keystr(path)} has shape "
                       f"{jnp.shape(x)}, expected leading axis M={m}")
  if microbatch_size is not None and (
      not isinstance(microbatch_size, int) or microbatch_size < 1):
    raise ValueError(f"microbatch_size={microbatch_size} must be an int >= 1")
  valid = mask.astype(bool)
  if not isinstance(unit_span, int) or unit_span < 0 or (unit_span and groups is None):
    raise ValueError(f"unit_span={unit_span} must be an int >= 0, and > 0 only with groups")
  if not isinstance(ghost_rows, int) or ghost_rows < 0:
    raise ValueError(f"ghost_rows={ghost_rows} must be an int >= 0")
  if not isinstance(unit_size, int) or unit_size < 1 or m % unit_size:
    raise ValueError(f"unit_size={unit_size} must be an int >= 1 dividing M={m}")
  if unit_size > 1 and groups is not None:
    raise ValueError("unit_size > 1 and groups are exclusive (two ways to name units)")
  if groups is not None:
    if not isinstance(num_groups, int) or num_groups < 1:
      raise ValueError(f"num_groups={num_groups} must be an int >= 1 "
                       "when groups are given")
    groups = jnp.asarray(groups)
    if groups.shape != (m,) or not jnp.issubdtype(groups.dtype, jnp.integer):
      raise ValueError(f"groups must be int [M={m}], got {groups.dtype} "
                       f"{groups.shape}")
    if method == "ghost" and microbatch_size is not None:
      raise ValueError("microbatch_size is not supported with groups and "
                       "method='ghost' (ghost already avoids per-example "
                       "gradients); set microbatch_size=None")
    valid = valid & (groups >= 0) & (groups < num_groups)
  batch = _zero_invalid(batch, valid)

  aux = {}
  if groups is not None:
    total, counts, aux = _grouped(per_example_loss_fn, params, batch, valid,
                                  groups, num_groups, clip_norm, method,
                                  microbatch_size, has_aux, unit_span, ghost_rows)
  else:
    if unit_size > 1:
      unit_core = {"vmap": _unit_core_vmap, "ghost": _unit_core_ghost}[method]
      slots = valid.reshape(-1, unit_size)
      batch = (jax.tree.map(lambda x: x.reshape((-1, unit_size) + x.shape[1:]), batch),
               slots)
      valid = jnp.any(slots, axis=1)
    else:
      unit_core = {"vmap": _example_core_vmap, "ghost": _example_core_ghost}[method]

    if method == "ghost":
      unit_core = functools.partial(unit_core, rows=ghost_rows)

    def core(p, b, v):
      return unit_core(per_example_loss_fn, p, b, v, clip_norm, has_aux)
    if microbatch_size is None:
      total, counts, aux = core(params, batch, valid)
    else:
      total, counts, aux = _microbatched(core, params, batch, (valid,), (False,),
                                         microbatch_size)
  finite = counts.num_units - counts.num_nonfinite
  stats = ClipStats(counts.num_units, counts.num_clipped, counts.num_nonfinite,
                    counts.norm_sum / jnp.maximum(finite, 1).astype(
                        jnp.float32))
  return (total, stats, aux) if has_aux else (total, stats)
