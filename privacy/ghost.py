"""Ghost clipping: per-unit gradient norms without per-example gradients.

The gradient of a linear layer `y_t = W^T a_t + b` (tokens t: 1 for a dense
layer on a vector, the spatial positions of a convolution, whose `a_t` are the
unfolded input patches) for one example is `sum_t a_t g_t^T`, where
`g_t = dL/dy_t`. Its squared Frobenius norm is either

  * Gram form: `sum_{t,t'} (a_t . a_t') (g_t . g_t')`, cost `T^2 (K + F)`
    (for T = 1 the rank-one identity `|a|^2 |g|^2`), or
  * explicit form: `|sum_t a_t g_t^T|^2`, cost `T K F`;

we take whichever costs fewer FLOPs per layer (the "mixed ghost norm" of the
book-keeping method, Bu et al. 2022; Li et al. 2021 for the Gram form). Biases
use `sum_t g_t`; GroupNorm / LayerNorm scales use `sum_t g_t * xhat_t` with
`xhat` the normalised input. For a privacy unit made of several examples
(a patient), the Gram form gains the cross-example terms of the unit and the
explicit form sums the unit's per-example matrices before the norm.

Layer inputs `a` and output gradients `g` come from ONE forward and ONE
backward pass that differentiates only with respect to zero "probes" added to
each layer's output (found with `flax.linen.intercept_methods`). The clipped
sum is then assembled from the same `a` and `g` ("book-keeping"): for each
layer `sum_i w_i a_i^T g_i` with `w_i` the clip factor of example i's unit, so
there is no second backward pass. An example's rows depend on that example
alone, so a non-finite activation or output gradient makes only its own unit's
norm non-finite; such a unit is masked out (`where`, not a zero weight: `0 * inf`
is NaN) of the weighted sum, and of the other units' norms when units are
matched by id. Nothing scans the activations for non-finite values (on XLA:CPU
that scan and the masking of every activation cost a third of the step). With
`rows`, the passes and the per-row products run over blocks of rows one after
another (cache-sized on XLA:CPU) and only the norms and the weighted sum see
the whole batch, so a block edge may cut a unit.

privacy/ghost_layers.py says which layers are supported and what each one
contributes (tokens, vectors); this module runs the two passes, takes the
per-unit norms and assembles the clipped sum.

Requirements on the loss (checked where possible, else documented):
  * it evaluates Flax linen modules (`model.apply`) and its params reach the
    loss ONLY through supported layers called with the batch as the leading
    axis: `nn.Dense`, `nn.Conv` (feature_group_count 1, no mask), registered
    conv-like layers (`ghost_layers.register_conv_layer`, e.g. fedsim's
    `PatchConv`), `nn.GroupNorm` and `nn.LayerNorm`
    (per-example statistics, last-axis features). Every params leaf must be a
    parameter of such a layer, else a ValueError says to use method="vmap".
    A params leaf also used outside these layers (e.g. a weight-decay term
    inside the per-example loss) cannot be detected and gives wrong norms.
  * examples do not interact (no BatchNorm, no batch-level statistics).
  * the loss does not transform params before `apply` (casts, tree edits):
    leaves are matched to layers by identity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from privacy import ghost_layers
from privacy.ghost_layers import LayerCall

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

_HIGHEST = jax.lax.Precision.HIGHEST


def _forward(params: PyTree, batch: PyTree, probes, calls: list[LayerCall],
             out_shapes: list, loss_fn: LossFn):
  """Per-example losses with probes added to every supported layer output.

  Returns:
    `(loss_fn's output, inputs)`, `inputs[k]` the k-th intercepted layer's input.
  """
  leaf_index = {id(v): i for i, v in enumerate(jax.tree.leaves(params))}
  inputs = []

  def interceptor(next_fun, args, kwargs, context):
    call = None
    if context.method_name == "__call__":
      call = ghost_layers.describe(context.module, args, kwargs, leaf_index)
    if call is None:
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    calls.append(call)
    inputs.append(args[0])
    if probes is None:
      out_shapes.append(jax.ShapeDtypeStruct(y.shape, y.dtype))
      return y
    return y + probes[len(inputs) - 1]

  with nn.intercept_methods(interceptor):
    losses = loss_fn(params, batch)
  return losses, inputs


class GhostTerms:
  """Per-unit squared norms and a weighted-sum builder for one batch.

  Each params leaf's per-example gradient is kept as either "tokens"
  `sum_t A[m, t]^T G[m, t]` (`A [M, T, K]`, `G [M, T, F]`, Gram form) or an
  explicit vector `V [M, P]` (for convolutions built offset by offset, A unused).

  Attributes:
    example_finite: bool `[M]` (`[U]` with `unit_size`), False where an
      example's (a unit's) gradient is not finite (its own squared norm is
      not: a non-finite activation or output gradient, or an overflow).
    unit_sq_norms: float `[U]` (or `[M]` without units) squared gradient norm
      of each unit over all params; finite for every unit whose examples are.
    aux: the loss function's aux output from the same forward pass (None
      without `has_aux`).
  """

  def __init__(self, leaves: list, treedef, terms: dict,
               example_finite: jax.Array, unit_sq_norms: jax.Array, aux=None):
    self._leaves = leaves
    self._treedef = treedef
    self._terms = terms
    self.example_finite = example_finite
    self.unit_sq_norms = unit_sq_norms
    self.aux = aux

  def weighted_grad(self, weights: jax.Array) -> PyTree:
    """`sum_m weights[m] * grad_m` over the finite examples, as a params pytree.

    Args:
      weights: `[M]` float (`[U]`, one per unit, with `unit_size`), zero for
        examples that must not contribute.

    Returns:
      A pytree shaped like params.
    """
    finite = self.example_finite
    out = []
    for idx, leaf in enumerate(self._leaves):
      term = self._terms[idx]
      if term[0] == "tokens":
        a, g, to_leaf = term[1:4]
        keep = finite[:, None, None]
        kf = jnp.einsum("mtk,mtf->kf", jnp.where(keep, a, 0),
                        jnp.where(keep, g * weights[:, None, None], 0),
                        precision=_HIGHEST)
      else:
        _, v, to_leaf = term
        kf = jnp.einsum("m,mp->p", weights, jnp.where(finite[:, None], v, 0),
                        precision=_HIGHEST)
      out.append(to_leaf(kf).astype(leaf.dtype))
    return jax.tree.unflatten(self._treedef, out)


def _explicit_is_cheaper(m: int, t: int, k: int, f: int, pairs: int) -> bool:
  """Per-example `[K, F]` matrices (T K F) vs Gram (T^2 (K + F) per example pair).

  `pairs`: Gram pairs per example (1 ungrouped; M grouped by id, every two
  examples; the span of adjacent units, an example and its successors).
  """
  return t * k * f < t * t * (k + f) * pairs


def _choose_forms(terms: dict, pairs: int) -> dict:
  """Per leaf, the cheaper of the Gram form (tokens) and per-row `[K, F]` matrices (vec).

  `pairs`: Gram pairs per row (see `_explicit_is_cheaper`).
  """
  forms = {}
  for idx, term in terms.items():
    if term[0] == "tokens":
      a, g, to_leaf, explicit = term[1:]
      (m, t, k), f = a.shape, g.shape[-1]
      if _explicit_is_cheaper(m, t, k, f, pairs):
        e = explicit() if explicit is not None else jnp.einsum(
            "mtk,mtf->mkf", a, g, precision=_HIGHEST).reshape(m, k * f)
        term = ("vec", e, lambda v, k=k, f=f, fn=to_leaf: fn(v.reshape(k, f)))
    forms[idx] = term
  return forms


def _finalize(forms: dict, segment_ids, num_units, unit_span: int = 0
              ) -> tuple[jax.Array, jax.Array]:
  """Squared norms per unit and finiteness from the chosen forms (`_choose_forms`).

  Returns `(unit_sq_norms, finite)`: `finite` per row of the terms
  (example, or unit with `unit_size`). Without `segment_ids` a row is a unit,
  so its norm alone says whether it is finite. With them, an example's own
  squared norm (the diagonal of the Gram pairs, or its row's) flags it, and its
  rows are masked out before they are summed into any unit's norm.
  """
  if segment_ids is None:
    total = sum(_gram_sq(t[1], t[2]) if t[0] == "tokens" else jnp.sum(t[1] * t[1], -1)
                for t in forms.values())
    return total, jnp.isfinite(total)
  if unit_span:
    pairs = {idx: _band_pairs(t[1], t[2], unit_span) for idx, t in forms.items()
             if t[0] == "tokens"}
    own = sum(p[0] for p in pairs.values())
  else:
    pairs = {idx: _gram_pairs(t[1], t[2]) for idx, t in forms.items() if t[0] == "tokens"}
    own = sum(jnp.diagonal(p) for p in pairs.values())
  own = own + sum(jnp.sum(t[1] * t[1], -1) for t in forms.values() if t[0] == "vec")
  finite = jnp.isfinite(own)
  unit_pair_sum = _band_unit_sum if unit_span else _unit_pair_sum
  total = 0.0
  for idx, term in forms.items():
    if term[0] == "tokens":
      total = total + unit_pair_sum(pairs[idx], finite, segment_ids, num_units)
    else:
      v = jnp.where(finite[:, None], term[1], 0)
      v = jax.ops.segment_sum(v, segment_ids, num_units + 1)[:num_units]
      total = total + jnp.sum(v * v, axis=-1)
  return total, finite


def _gram_dot(a: jax.Array, g: jax.Array, b: jax.Array, h: jax.Array) -> jax.Array:
  """`[M]`: `<sum_t a[m,t] g[m,t]^T, sum_s b[m,s] h[m,s]^T>` via Gram matrices."""
  ab = jnp.einsum("mtk,msk->mts", a, b, precision=_HIGHEST)
  gh = jnp.einsum("mtf,msf->mts", g, h, precision=_HIGHEST)
  return jnp.sum(ab * gh, axis=(1, 2))


def _gram_sq(a: jax.Array, g: jax.Array) -> jax.Array:
  """Squared norms `[M]` of `sum_t a[m,t] g[m,t]^T`."""
  return _gram_dot(a, g, a, g)


def _gram_pairs(a: jax.Array, g: jax.Array) -> jax.Array:
  """`[M, M]`: `<grad_i, grad_j>` of every two examples' `sum_t a g^T`."""
  aa = jnp.einsum("itk,jsk->ijts", a, a, precision=_HIGHEST)
  gg = jnp.einsum("itf,jsf->ijts", g, g, precision=_HIGHEST)
  return jnp.sum(aa * gg, axis=(2, 3))


def _shift(x: jax.Array, d: int) -> jax.Array:
  """`x[i + d]` at row i, zeros past the end."""
  return jnp.pad(x[d:], [(0, d)] + [(0, 0)] * (x.ndim - 1))


def _band_pairs(a: jax.Array, g: jax.Array, span: int) -> jax.Array:
  """`[span, M]`: row d holds `<grad_i, grad_{i+d}>` (0 past the end)."""
  return jnp.stack([_gram_dot(a, g, _shift(a, d), _shift(g, d)) for d in range(span)])


def _band_unit_sum(band: jax.Array, finite: jax.Array, segment_ids, num_units
                   ) -> jax.Array:
  """Per-unit squared norms from banded pairs of adjacent examples of one unit."""
  span = band.shape[0]
  ok = jnp.stack([finite & _shift(finite, d) & (segment_ids == _shift(segment_ids, d))
                  for d in range(span)])
  weight = jnp.where(jnp.arange(span) == 0, 1.0, 2.0)[:, None]  # i<j pairs count twice
  per_example = jnp.sum(jnp.where(ok, band * weight, 0), axis=0)
  return jax.ops.segment_sum(per_example, segment_ids, num_units + 1)[:num_units]


def _unit_pair_sum(pair: jax.Array, finite: jax.Array, segment_ids, num_units
                   ) -> jax.Array:
  """Per-unit squared norms from example pairs, non-finite examples left out."""
  pair = jnp.where(finite[:, None] & finite[None, :], pair, 0)
  onehot = (segment_ids[:, None] == jnp.arange(num_units)).astype(pair.dtype)
  return jnp.einsum("iu,ij,ju->u", onehot, pair, onehot, precision=_HIGHEST)


def _to_units(term: tuple, unit_size: int) -> tuple:
  """An example-level term as a unit-level one: units are runs of `unit_size` examples.

  A unit's gradient is the sum of its examples': tokens concatenate (`[U, k T, K]`),
  vectors add (`[U, P]`).
  """
  def units(x):
    return x.reshape((x.shape[0] // unit_size, -1) + x.shape[2:])
  if term[0] == "tokens":
    explicit = None if term[4] is None else (
        lambda fn=term[4]: fn().reshape(term[1].shape[0] // unit_size, unit_size, -1).sum(1))
    return ("tokens", units(term[1]), units(term[2]), term[3], explicit)
  v = term[1]
  return ("vec", v.reshape((v.shape[0] // unit_size, unit_size) + v.shape[1:]).sum(1),
          term[2])


def record(loss_fn: LossFn, params: PyTree, batch: PyTree, valid: jax.Array,
           segment_ids: jax.Array | None = None,
           num_units: int | None = None, *, unit_size: int = 1,
           unit_span: int = 0, has_aux: bool = False, rows: int = 0) -> GhostTerms:
  """One forward and one activation-only backward pass, book-kept per layer.

  Args:
    loss_fn: `(params, batch) -> [M]` per-example losses (see module doc), or
      `(losses [M], aux)` with `has_aux`.
    params: the params pytree `loss_fn` takes.
    batch: pytree of `[M, ...]` arrays (invalid examples already zeroed).
    valid: bool `[M]`; invalid examples get zero output gradients.
    segment_ids: optional int `[M]` unit of each example (`num_units` for
      none); without it every example is its own unit.
    num_units: static number of units U (with `segment_ids`).
    unit_size: units are consecutive runs of this many examples (patient
      slots; `M` a multiple of it): norms, finiteness and the weighted sum are
      per unit, as cheap as per example. Not with `segment_ids`.
    unit_span: with `segment_ids`, a unit's examples are adjacent, at most this
      many: Gram pairs are taken within that band only (0: all pairs).
    has_aux: keep the loss function's aux (e.g. metrics from this forward pass)
      as `GhostTerms.aux`.
    rows: > 0: the passes and the per-row products run over this many rows at a
      time (a multiple of `unit_size`; the last block may be shorter), one block
      after another, and only the norms and the sum see the whole batch. The
      same result; on XLA:CPU blocks of 16-32 rows stay in cache (faster than
      the whole batch), though XLA:CPU does not reuse their memory.

  Returns:
    The GhostTerms of this batch.

  Raises:
    ValueError: when a params leaf is not a parameter of a supported layer.
  """
  m = valid.shape[0]
  block = m if not rows or rows >= m else rows
  if block % unit_size:
    raise ValueError(f"rows={rows} must be a multiple of unit_size={unit_size}")
  leaves, treedef = jax.tree.flatten(params)
  pairs = 1 if segment_ids is None else unit_span or m
  forms, auxes = [], []
  for start in range(0, m, block):  # unrolled: XLA:CPU runs a rolled loop of convolutions 5x slower
    piece = jax.tree.map(lambda x: x[start:start + block], (batch, valid))
    terms, aux = _block_terms(loss_fn, params, leaves, *piece, has_aux)
    if unit_size > 1:
      terms = {idx: _to_units(term, unit_size) for idx, term in terms.items()}
    forms.append(_choose_forms(terms, pairs))
    auxes.append(aux)
  forms = _concatenate(forms)
  aux = jax.tree.map(lambda *xs: jnp.concatenate(xs), *auxes)
  sq_norms, finite = _finalize(forms, segment_ids, num_units, unit_span)
  return GhostTerms(leaves, treedef, forms, finite, sq_norms, aux)


def _concatenate(blocks: list[dict]) -> dict:
  """The terms of consecutive row blocks as the terms of all their rows."""
  if len(blocks) == 1:
    return blocks[0]
  out = {}
  for idx, term in blocks[0].items():
    joined = lambda j: jnp.concatenate([b[idx][j] for b in blocks])
    out[idx] = (("tokens", joined(1), joined(2), term[3], None) if term[0] == "tokens"
                else ("vec", joined(1), term[2]))
  return out


def _block_terms(loss_fn: LossFn, params: PyTree, leaves: list, batch: PyTree,
                 valid: jax.Array, has_aux: bool) -> tuple[dict, Any]:
  """One forward and one probe backward pass over `batch`: its layer terms and aux."""
  calls: list[LayerCall] = []
  shapes: list = []
  jax.eval_shape(lambda p, b: _forward(p, b, None, calls, shapes, loss_fn),
                 params, batch)
  _check_coverage(params, calls)
  probes = [jnp.zeros(s.shape, s.dtype) for s in shapes]
  calls.clear()

  def fwd(p, pr):
    out, inputs = _forward(p, batch, pr, calls, [], loss_fn)
    losses, aux = out if has_aux else (out, None)
    return losses, (inputs, aux)
  losses, vjp_fn, (inputs, aux) = jax.vjp(fwd, params, probes, has_aux=True)
  if len(calls) != len(probes):
    raise ValueError("per_example_loss_fn must call the same layers each time")
  _, gouts = vjp_fn(valid.astype(losses.dtype))

  for x, g in zip(inputs, gouts):
    if x.shape[:1] != valid.shape or g.shape[:1] != valid.shape:
      raise ValueError(
          f"method='ghost' needs every layer to see the batch on axis 0; a "
          f"layer got input {x.shape} / output {g.shape} for a batch of "
          f"{valid.shape[0]}; use method='vmap'")
  return ghost_layers.layer_terms(calls, inputs, gouts, leaves), aux


def _check_coverage(params: PyTree, calls: list[LayerCall]):
  """Raises unless every params leaf is a parameter of an intercepted layer."""
  covered = {idx for call in calls for _, idx in call.leaves}
  missing = [jax.tree_util.keystr(p) for i, (p, _) in enumerate(
      jax.tree_util.tree_flatten_with_path(params)[0]) if i not in covered]
  if missing:
    raise ValueError(
        f"method='ghost' cannot compute per-example norms for params "
        f"{missing}: they are not parameters of nn.Dense / nn.Conv / "
        f"registered conv / nn.GroupNorm / nn.LayerNorm layers called on the "
        f"batch inside per_example_loss_fn; use method='vmap'")
