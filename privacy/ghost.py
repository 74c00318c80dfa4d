"""Ghost clipping: per-unit gradient norms without per-example gradients.

The gradient of a linear layer `y_t = W^T a_t + b` (tokens t: 1 for a dense layer
on a vector, the spatial positions of a convolution, whose `a_t` are the
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
from typing import Any, Callable

import flax.linen as nn
from flax.linen import linear as flax_linear
import jax
import jax.numpy as jnp
import numpy as np

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
  spatial = "DHW"[3 - n:]
  dn = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")

  def prep(v: jax.Array) -> jax.Array:
    if pre_pad is not None:
      v = pre_pad(v)
    p = jax.lax.conv_general_dilated_patches(
        v, ks, strides, padding, lhs_dilation=lhs_dil, rhs_dilation=rhs_dil,
        dimension_numbers=dn, precision=_HIGHEST)
    return p.reshape(p.shape[0], -1, p.shape[-1])

  def to_leaf(kf: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    # Patch channels are ordered (in, *kernel_size); kernels (*kernel_size, in).
    cin = kf.shape[0] // int(np.prod(ks))
    return jnp.moveaxis(kf.reshape((cin,) + ks + (kf.shape[1],)), 0, n).reshape(
        shape)

  return _Call("linear", leaves, prep, to_leaf)


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
  """Per-leaf (tokens or vector) terms of the per-example gradients.

  Built by `record`; every array is finite (non-finite examples zeroed, see
  `example_finite`). Each leaf's per-example gradient is either
  `sum_t A[m, t]^T G[m, t]` ("tokens", `A [M, T, K]`, `G [M, T, F]`) or a
  vector `V [M, P]`.
  """

  def __init__(self, leaves: list, treedef, terms: dict,
               example_finite: jax.Array):
    self._leaves = leaves
    self._treedef = treedef
    self._terms = terms
    self.example_finite = example_finite  # bool [M]

  def _explicit(self, m: int, t: int, k: int, f: int,
                num_units: int | None) -> bool:
    """True when per-example [K, F] matrices cost fewer FLOPs than Grams."""
    gram = t * t * (k + f) * (1 if num_units is None else m)
    return t * k * f < gram

  def unit_sq_norms(self, segment_ids: jax.Array | None,
                    num_units: int | None) -> jax.Array:
    """Squared gradient norm of every unit.

    Args:
      segment_ids: int `[M]` unit of each example (`num_units` = dropped), or
        None for one unit per example.
      num_units: the number of units U (static), None with `segment_ids`.

    Returns:
      `[U]` (or `[M]`) squared L2 norms over all params.
    """
    total = 0.0
    for idx, term in self._terms.items():
      if term[0] == "tokens":
        _, a, g, _ = term
        m, t, k = a.shape
        f = g.shape[-1]
        if self._explicit(m, t, k, f, num_units):
          e = jnp.einsum("mtk,mtf->mkf", a, g, precision=_HIGHEST)
          # Keep the explicit matrices: weighted_grad then sums them.
          self._terms[idx] = ("vec", e.reshape(m, -1),
                              lambda v, k=k, f=f, fn=term[3]: fn(v.reshape(k, f)))
          total = total + _vec_sq(e.reshape(m, -1), segment_ids, num_units)
        else:
          total = total + _gram_sq(a, g, segment_ids, num_units)
      else:
        total = total + _vec_sq(term[1], segment_ids, num_units)
    return total

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


def record(loss_fn: LossFn, params: PyTree, batch: PyTree,
           valid: jax.Array) -> GhostTerms:
  """One forward and one activation-only backward pass, book-kept per layer.

  Args:
    loss_fn: `(params, batch) -> [M]` per-example losses (see module doc).
    params: the params pytree `loss_fn` takes.
    batch: pytree of `[M, ...]` arrays (invalid examples already zeroed).
    valid: bool `[M]`; invalid examples get zero output gradients.

  Returns:
    The GhostTerms of this batch.

  Raises:
    ValueError: when a params leaf is not a parameter of a supported layer.
  """
  calls: list[_Call] = []
  shapes: list = []
  jax.eval_shape(lambda p, b: _forward(p, b, None, calls, shapes, loss_fn),
                 params, batch)
  probes = [jnp.zeros(s.shape, s.dtype) for s in shapes]
  calls.clear()
  fwd = lambda p, pr: _forward(p, batch, pr, calls, [], loss_fn)
  losses, vjp_fn, inputs = jax.vjp(fwd, params, probes, has_aux=True)
  if len(calls) != len(probes):
    raise ValueError("per_example_loss_fn must call the same layers each time")
  _, gouts = vjp_fn(valid.astype(losses.dtype))

  finite = jnp.ones(valid.shape, bool)
  for x, g in zip(inputs, gouts):
    finite = finite & _all_finite(x) & _all_finite(g)
  keep = lambda x: jnp.where(finite.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)

  leaves, treedef = jax.tree.flatten(params)
  terms: dict[int, tuple] = {}
  for call, x, g in zip(calls, inputs, gouts):
    x, g = keep(x), keep(g)
    m, f = g.shape[0], g.shape[-1]
    gt = g.reshape(m, -1, f)
    xhat = call.prep(x).reshape(m, -1, f) if call.kind == "norm" else None
    for name, idx in call.leaves:
      shape = leaves[idx].shape
      if name == "kernel":
        new = ("tokens", call.prep(x), gt,
               lambda kf, s=shape, fn=call.to_leaf: fn(kf, s))
      elif name in ("bias", "scale"):
        v = gt.sum(1) if name == "bias" else jnp.sum(gt * xhat, axis=1)
        new = ("vec", v, lambda kf, s=shape: kf.reshape(s))
      else:
        raise ValueError(f"method='ghost': unknown parameter {name!r}")
      terms[idx] = _merge(terms.get(idx), new)

  missing = [jax.tree_util.keystr(p) for i, (p, _) in enumerate(
      jax.tree_util.tree_flatten_with_path(params)[0]) if i not in terms]
  if missing:
    raise ValueError(
        f"method='ghost' cannot compute per-example norms for params "
        f"{missing}: they are not parameters of nn.Dense / nn.Conv / "
        f"registered conv / nn.GroupNorm / nn.LayerNorm layers called on the "
        f"batch inside per_example_loss_fn; use method='vmap'")
  return GhostTerms(leaves, treedef, terms, finite)


def _merge(old: tuple | None, new: tuple) -> tuple:
  """Combines terms of one leaf used by several calls (shared weights)."""
  if old is None:
    return new
  if new[0] == "tokens":
    return ("tokens", jnp.concatenate([old[1], new[1]], 1),
            jnp.concatenate([old[2], new[2]], 1), old[3])
  return ("vec", old[1] + new[1], old[2])
