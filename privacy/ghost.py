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
there is no second backward pass, and an example with non-finite activations
or gradients is zeroed before any contraction (a reweighted backward pass
would turn its `0 * inf` into NaN for everybody).

Requirements on the loss (checked where possible, else documented):
  * it evaluates Flax linen modules (`model.apply`) and its params reach the
    loss ONLY through supported layers called with the batch as the leading
    axis: `nn.Dense`, `nn.Conv` (feature_group_count 1, no mask), registered
    conv-like layers (fedsim's `PatchConv`), `nn.GroupNorm` and `nn.LayerNorm`
    (per-example statistics, last-axis features). Every params leaf must be a
    parameter of such a layer, else a ValueError says to use method="vmap".
    A params leaf also used outside these layers (e.g. a weight-decay term
    inside the per-example loss) cannot be detected and gives wrong norms.
  * examples do not interact (no BatchNorm, no batch-level statistics).
  * the loss does not transform params before `apply` (casts, tree edits):
    leaves are matched to layers by identity.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import linear as flax_linear

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

_HIGHEST = jax.lax.Precision.HIGHEST
_CONV_LAYERS: set[type] = set()
_defaults_loaded = False


def register_conv_layer(cls: type) -> type:
  """Lets ghost clipping treat `cls` like `nn.Conv` (usable as a decorator).

  The class must compute exactly `lax.conv(x, kernel) + bias` on its first
  positional argument `[batch, *spatial, in]`, with params `kernel`
  `[*kernel_size, in, out]` and optional `bias` `[out]`, and attributes
  `kernel_size`, `strides`, `padding` (and optionally `input_dilation`,
  `kernel_dilation`) meaning what they mean for `nn.Conv`.

  Args:
    cls: the Flax module class.

  Returns:
    `cls`, unchanged.
  """
  _CONV_LAYERS.add(cls)
  return cls


def _conv_layers() -> set[type]:
  """Registered conv-like classes; fedsim's PatchConv when fedsim is there."""
  global _defaults_loaded
  if not _defaults_loaded:
    _defaults_loaded = True
    try:
      from fedsim.models import PatchConv  # pylint: disable=g-import-not-at-top
    except ImportError:
      pass
    else:
      _CONV_LAYERS.add(PatchConv)
  return _CONV_LAYERS


@dataclasses.dataclass(frozen=True)
class _Call:
  """Static description of one intercepted layer call.

  Attributes:
    kind: "linear" (dense or conv: tokens a_t) or "norm" (scale / bias).
    leaves: (param name, index in the flat params) for params in the tree.
    prep: `x -> tokens [M, T, K]` for "linear", `x -> xhat [M, ..., C]` for
      "norm".
    to_leaf: maps the `[K, F]` kernel gradient to the kernel's shape.
  """

  kind: str
  leaves: tuple[tuple[str, int], ...]
  prep: Callable[[jax.Array], jax.Array]
  to_leaf: Callable[[jax.Array, tuple[int, ...]], jax.Array] | None = None


def _unsupported(module: nn.Module, why: str) -> ValueError:
  return ValueError(
      f"method='ghost' cannot handle layer {'/'.join(module.path) or '<root>'}"
      f" ({type(module).__name__}): {why}; use method='vmap'")


def _dense_call(module: nn.Module, leaves) -> _Call:
  del module
  return _Call("linear", leaves,
               lambda x: x.reshape(x.shape[0], -1, x.shape[-1]),
               lambda kf, shape: kf.reshape(shape))


def _conv_call(module: nn.Module, x: jax.Array, leaves) -> _Call:
  """Unfolded-patch description of an nn.Conv / conv-like call."""
  ks = module.kernel_size
  ks = (ks,) if isinstance(ks, int) else tuple(ks)
  n = len(ks)
  if x.ndim != n + 2:
    raise _unsupported(module, f"input {x.shape} needs exactly one batch axis")
  if getattr(module, "feature_group_count", 1) != 1:
    raise _unsupported(module, "feature_group_count != 1")
  if getattr(module, "mask", None) is not None:
    raise _unsupported(module, "masked kernels")
  if n > 3:
    raise _unsupported(module, f"{n}-d convolution")

  def bcast(v):
    v = 1 if v is None else v
    return (v,) * n if isinstance(v, int) else tuple(v)

  strides = bcast(getattr(module, "strides", 1))
  lhs_dil = bcast(getattr(module, "input_dilation", 1))
  rhs_dil = bcast(getattr(module, "kernel_dilation", 1))
  padding = flax_linear.canonicalize_padding(module.padding, n)
  pre_pad = None
  if padding in ("CIRCULAR", "REFLECT"):  # as nn.Conv does it
    dil = [(k - 1) * d + 1 for k, d in zip(ks, rhs_dil)]
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dil] + [(0, 0)]
    mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
    pre_pad, padding = (lambda v: jnp.pad(v, pads, mode=mode)), "VALID"
  elif padding == "CAUSAL":
    pads = [(0, 0), (rhs_dil[0] * (ks[0] - 1), 0), (0, 0)]
    pre_pad, padding = (lambda v: jnp.pad(v, pads)), "VALID"
  def prep(v: jax.Array) -> jax.Array:
    if pre_pad is not None:
      v = pre_pad(v)
    return _patches(v, ks, strides, padding, lhs_dil, rhs_dil)

  def to_leaf(kf: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return kf.reshape(shape)  # patch channels are (*kernel_size, in): HWIO

  return _Call("linear", leaves, prep, to_leaf)


def _patches(x: jax.Array, ks: tuple[int, ...], strides: tuple[int, ...],
             padding, lhs_dil: tuple[int, ...], rhs_dil: tuple[int, ...]
             ) -> jax.Array:
  """Unfolded conv patches `[M, T, prod(ks) * C]`, channels `(*ks, C)`.

  Strided slices of the padded input: on XLA:CPU far cheaper than
  `lax.conv_general_dilated_patches` (an identity-kernel convolution), which
  is kept for input dilation only.
  """
  m, c, n = x.shape[0], x.shape[-1], len(ks)
  if any(d != 1 for d in lhs_dil):
    spatial = "DHW"[3 - n:]
    dn = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
    p = jax.lax.conv_general_dilated_patches(
        x, ks, strides, padding, lhs_dilation=lhs_dil, rhs_dilation=rhs_dil,
        dimension_numbers=dn, precision=_HIGHEST)
    p = p.reshape(p.shape[:-1] + (c, -1))  # (C, *ks) -> (*ks, C)
    return jnp.swapaxes(p, -1, -2).reshape(m, -1, p.shape[-1] * c)
  window = tuple((k - 1) * d + 1 for k, d in zip(ks, rhs_dil))
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(x.shape[1:-1], window, strides, padding)
  x = jax.lax.pad(x, jnp.zeros((), x.dtype),
                  [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in padding] +
                  [(0, 0, 0)])
  out = [(size - w) // s + 1 for size, w, s in zip(x.shape[1:-1], window,
                                                     strides)]
  slices = []
  for offset in itertools.product(*(range(k) for k in ks)):
    start = [o * d for o, d in zip(offset, rhs_dil)]
    limit = [b + (o - 1) * s + 1 for b, o, s in zip(start, out, strides)]
    slices.append(jax.lax.slice(x, [0] + start + [0], [m] + limit + [c],
                                (1,) + tuple(strides) + (1,)))
  return jnp.stack(slices, axis=-2).reshape(m, -1, len(slices) * c)


def _norm_call(module: nn.Module, kwargs, leaves) -> _Call:
  """Scale / bias description of a GroupNorm or LayerNorm call."""
  if getattr(module, "axis_name", None) is not None:
    raise _unsupported(module, "cross-device statistics (axis_name)")
  if kwargs.get("mask") is not None:
    raise _unsupported(module, "a normalisation mask")
  if isinstance(module, nn.GroupNorm):
    if module.reduction_axes is not None:
      raise _unsupported(module, "custom reduction_axes")
  elif (module.reduction_axes not in (-1, (-1,))
        or module.feature_axes not in (-1, (-1,))):
    raise _unsupported(module, "reduction/feature axes other than -1")
  normalize = module.clone(parent=None, use_scale=False, use_bias=False)
  return _Call("norm", leaves, lambda x: normalize.apply({}, x))


def _describe(module: nn.Module, args, kwargs,
              leaf_index: dict[int, int]) -> _Call | None:
  """The _Call for an intercepted `__call__`, or None to leave it alone."""
  kind = type(module)
  if kind not in (nn.Dense, nn.Conv, nn.GroupNorm, nn.LayerNorm) and (
      kind not in _conv_layers()):
    return None
  own = module.variables.get("params", {})
  leaves = tuple((name, leaf_index[id(v)]) for name, v in own.items()
                 if id(v) in leaf_index)
  if not leaves:
    return None  # parameters not being differentiated
  if not args:
    raise _unsupported(module, "input passed by keyword")
  if any(getattr(module, a, None) is not None for a in (
      "dot_general", "dot_general_cls", "conv_general_dilated",
      "conv_general_dilated_cls")):
    raise _unsupported(module, "a custom dot_general / conv_general_dilated")
  if kind is nn.Dense:
    return _dense_call(module, leaves)
  if kind in (nn.GroupNorm, nn.LayerNorm):
    return _norm_call(module, kwargs, leaves)
  return _conv_call(module, args[0], leaves)


def _forward(params: PyTree, batch: PyTree, probes, calls: list[_Call],
             out_shapes: list, loss_fn: LossFn):
  """Per-example losses with probes added to every supported layer output.

  Returns:
    `(losses [M], inputs)`, `inputs[k]` the k-th intercepted layer's input.
  """
  leaf_index = {id(v): i for i, v in enumerate(jax.tree.leaves(params))}
  inputs = []

  def interceptor(next_fun, args, kwargs, context):
    call = None
    if context.method_name == "__call__":
      call = _describe(context.module, args, kwargs, leaf_index)
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


def _all_finite(x: jax.Array) -> jax.Array:
  return jnp.all(jnp.isfinite(x).reshape(x.shape[0], -1), axis=1)


class GhostTerms:
  """Per-unit squared norms and a weighted-sum builder for one batch.

  Each params leaf's per-example gradient is kept as either "tokens"
  `sum_t A[m, t]^T G[m, t]` (`A [M, T, K]`, `G [M, T, F]`, Gram form) or an
  explicit vector `V [M, P]`. Every array is finite: examples with non-finite
  activations or output gradients are zeroed (see `example_finite`).

  Attributes:
    example_finite: bool `[M]`, False where an example's layer inputs or
      output gradients are not all finite.
    unit_sq_norms: float `[U]` (or `[M]` without units) squared gradient norm
      of each unit over all params.
  """

  def __init__(self, leaves: list, treedef, terms: dict,
               example_finite: jax.Array, unit_sq_norms: jax.Array):
    self._leaves = leaves
    self._treedef = treedef
    self._terms = terms
    self.example_finite = example_finite
    self.unit_sq_norms = unit_sq_norms

  def weighted_grad(self, weights: jax.Array) -> PyTree:
    """`sum_m weights[m] * grad_m` as a params pytree.

    Args:
      weights: `[M]` float, zero for examples that must not contribute.

    Returns:
      A pytree shaped like params.
    """
    out = []
    for idx, leaf in enumerate(self._leaves):
      term = self._terms[idx]
      if term[0] == "tokens":
        _, a, g, to_leaf = term
        kf = jnp.einsum("mtk,mtf->kf", a, g * weights[:, None, None],
                        precision=_HIGHEST)
      else:
        _, v, to_leaf = term
        kf = jnp.einsum("m,mp->p", weights, v, precision=_HIGHEST)
      out.append(to_leaf(kf).astype(leaf.dtype))
    return jax.tree.unflatten(self._treedef, out)


def _explicit_is_cheaper(m: int, t: int, k: int, f: int, grouped: bool
                         ) -> bool:
  """Per-example `[K, F]` matrices (T K F) vs Gram (T^2 (K + F), x M grouped).

  Grouped Grams pair every two examples (only same-unit pairs count).
  """
  return t * k * f < t * t * (k + f) * (m if grouped else 1)


def _finalize(terms: dict, segment_ids, num_units) -> tuple[dict, jax.Array]:
  """Picks the cheaper form per leaf and sums squared norms per unit."""
  total = 0.0
  out = {}
  for idx, term in terms.items():
    if term[0] == "tokens":
      _, a, g, to_leaf = term
      (m, t, k), f = a.shape, g.shape[-1]
      if _explicit_is_cheaper(m, t, k, f, segment_ids is not None):
        e = jnp.einsum("mtk,mtf->mkf", a, g,
                       precision=_HIGHEST).reshape(m, k * f)
        term = ("vec", e, lambda v, k=k, f=f, fn=to_leaf: fn(v.reshape(k, f)))
      else:
        total = total + _gram_sq(a, g, segment_ids, num_units)
    if term[0] == "vec":
      total = total + _vec_sq(term[1], segment_ids, num_units)
    out[idx] = term
  return out, total


def _vec_sq(v: jax.Array, segment_ids, num_units) -> jax.Array:
  if segment_ids is not None:
    v = jax.ops.segment_sum(v, segment_ids, num_units + 1)[:num_units]
  return jnp.sum(v * v, axis=-1)


def _gram_sq(a: jax.Array, g: jax.Array, segment_ids, num_units) -> jax.Array:
  """Squared norms of `sum_{m in unit, t} a[m,t] g[m,t]^T` via Gram matrices."""
  if segment_ids is None:
    aa = jnp.einsum("mtk,msk->mts", a, a, precision=_HIGHEST)
    gg = jnp.einsum("mtf,msf->mts", g, g, precision=_HIGHEST)
    return jnp.sum(aa * gg, axis=(1, 2))
  aa = jnp.einsum("itk,jsk->ijts", a, a, precision=_HIGHEST)
  gg = jnp.einsum("itf,jsf->ijts", g, g, precision=_HIGHEST)
  pair = jnp.sum(aa * gg, axis=(2, 3))  # [M, M]
  onehot = (segment_ids[:, None] == jnp.arange(num_units)).astype(pair.dtype)
  return jnp.einsum("iu,ij,ju->u", onehot, pair, onehot, precision=_HIGHEST)


def record(loss_fn: LossFn, params: PyTree, batch: PyTree, valid: jax.Array,
           segment_ids: jax.Array | None = None,
           num_units: int | None = None) -> GhostTerms:
  """One forward and one activation-only backward pass, book-kept per layer.

  Args:
    loss_fn: `(params, batch) -> [M]` per-example losses (see module doc).
    params: the params pytree `loss_fn` takes.
    batch: pytree of `[M, ...]` arrays (invalid examples already zeroed).
    valid: bool `[M]`; invalid examples get zero output gradients.
    segment_ids: optional int `[M]` unit of each example (`num_units` for
      none); without it every example is its own unit.
    num_units: static number of units U (with `segment_ids`).

  Returns:
    The GhostTerms of this batch.

  Raises:
    ValueError: when a params leaf is not a parameter of a supported layer.
  """
  calls: list[_Call] = []
  shapes: list = []
  jax.eval_shape(lambda p, b: _forward(p, b, None, calls, shapes, loss_fn),
                 params, batch)
  _check_coverage(params, calls)
  probes = [jnp.zeros(s.shape, s.dtype) for s in shapes]
  calls.clear()

  def fwd(p, pr):
    return _forward(p, batch, pr, calls, [], loss_fn)
  losses, vjp_fn, inputs = jax.vjp(fwd, params, probes, has_aux=True)
  if len(calls) != len(probes):
    raise ValueError("per_example_loss_fn must call the same layers each time")
  _, gouts = vjp_fn(valid.astype(losses.dtype))

  finite = jnp.ones(valid.shape, bool)
  for x, g in zip(inputs, gouts):
    if x.shape[:1] != valid.shape or g.shape[:1] != valid.shape:
      raise ValueError(
          f"method='ghost' needs every layer to see the batch on axis 0; a "
          f"layer got input {x.shape} / output {g.shape} for a batch of "
          f"{valid.shape[0]}; use method='vmap'")
    finite = finite & _all_finite(x) & _all_finite(g)

  leaves, treedef = jax.tree.flatten(params)
  terms = _layer_terms(calls, inputs, gouts, finite, leaves)
  terms, sq_norms = _finalize(terms, segment_ids, num_units)
  return GhostTerms(leaves, treedef, terms, finite, sq_norms)


def _layer_terms(calls: list[_Call], inputs: list, gouts: list,
                 finite: jax.Array, leaves: list) -> dict[int, tuple]:
  """Per params leaf: ("tokens", A, G, to_leaf) or ("vec", V, to_leaf).

  Non-finite examples are zeroed first, so every term is finite.
  """
  def keep(x):
    return jnp.where(finite.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)

  terms: dict[int, tuple] = {}
  for call, x, g in zip(calls, inputs, gouts):
    x, g = keep(x), keep(g)
    m, f = g.shape[0], g.shape[-1]
    gt = g.reshape(m, -1, f)
    xhat = call.prep(x).reshape(m, -1, f) if call.kind == "norm" else None
    for name, idx in call.leaves:
      shape = leaves[idx].shape
      if name == "kernel" and call.kind == "linear":
        new = ("tokens", call.prep(x), gt,
               lambda kf, s=shape, fn=call.to_leaf: fn(kf, s))
      elif name == "bias" or (name == "scale" and call.kind == "norm"):
        v = gt.sum(1) if name == "bias" else jnp.sum(gt * xhat, axis=1)
        new = ("vec", v, lambda kf, s=shape: kf.reshape(s))
      else:
        raise ValueError(f"method='ghost': unknown parameter {name!r}")
      terms[idx] = _merge(terms.get(idx), new)
  return terms


def _check_coverage(params: PyTree, calls: list[_Call]):
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


def _merge(old: tuple | None, new: tuple) -> tuple:
  """Combines terms of one leaf used by several calls (shared weights)."""
  if old is None:
    return new
  if new[0] == "tokens":
    return ("tokens", jnp.concatenate([old[1], new[1]], 1),
            jnp.concatenate([old[2], new[2]], 1), old[3])
  return ("vec", old[1] + new[1], old[2])
