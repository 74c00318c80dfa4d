"""Ghost clipping, per layer type: what each supported layer contributes to a gradient.

Usable without fedsim. For one call of a supported layer, `describe` says how its input `x`
becomes the rows the layer's parameter gradients are made of, and `layer_terms` turns inputs
`x` and output gradients `g` into one term per params leaf (`privacy.ghost` takes the norms and
the clipped sum from these terms):

  * `nn.Dense`: tokens `a_t` = the input's positions (1 for a vector), kernel gradient
    `sum_t a_t g_t^T`;
  * `nn.Conv` and registered conv-like layers: tokens = the unfolded input patches, channels
    `(*kernel_size, in)` like an HWIO kernel;
  * bias of any of these: `sum_t g_t`;
  * `nn.GroupNorm` / `nn.LayerNorm` scale: `sum_t g_t * xhat_t`, `xhat` the normalised input.

A kernel term is kept as "tokens" `(A [M, T, K], G [M, T, F])`, every other term as a vector
`V [M, P]`. A layer class outside flax (e.g. a convolution lowered as patches and an einsum)
joins with `register_conv_layer`; this module never imports the code that defines it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import linear as flax_linear

_HIGHEST = jax.lax.Precision.HIGHEST
_NATIVE_LAYERS = (nn.Dense, nn.Conv, nn.GroupNorm, nn.LayerNorm)
_CONV_LAYERS: set[type] = set()


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


def conv_layers() -> frozenset[type]:
  """The conv-like classes registered so far (beyond `nn.Conv`)."""
  return frozenset(_CONV_LAYERS)


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """Static description of one intercepted layer call.

  Attributes:
    kind: "linear" (dense or conv: tokens a_t) or "norm" (scale / bias).
    leaves: (param name, index in the flat params) for params in the tree.
    prep: `x -> tokens [M, T, K]` for "linear", `x -> xhat [M, ..., C]` for
      "norm".
    to_leaf: maps the `[K, F]` kernel gradient to the kernel's shape.
    explicit: optional `(x, g) -> [M, K * F]` per-example kernel gradients straight
      from the input and the output gradient, without materialising the tokens
      (convolutions: one product per kernel offset).
  """

  kind: str
  leaves: tuple[tuple[str, int], ...]
  prep: Callable[[jax.Array], jax.Array]
  to_leaf: Callable[[jax.Array, tuple[int, ...]], jax.Array] | None = None
  explicit: Callable[[jax.Array, jax.Array], jax.Array] | None = None


def _unsupported(module: nn.Module, why: str) -> ValueError:
  return ValueError(
      f"method='ghost' cannot handle layer {'/'.join(module.path) or '<root>'}"
      f" ({type(module).__name__}): {why}; use method='vmap'")


def _dense_call(module: nn.Module, leaves) -> LayerCall:
  del module
  return LayerCall("linear", leaves,
               lambda x: x.reshape(x.shape[0], -1, x.shape[-1]),
               lambda kf, shape: kf.reshape(shape))


def _conv_call(module: nn.Module, x: jax.Array, leaves) -> LayerCall:
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

  def explicit(v: jax.Array, g: jax.Array) -> jax.Array:
    """`[M, prod(ks) * C * F]`: each offset's window contracted with g (no stacked
    patches: on XLA:CPU the stack cost as much as the products)."""
    if pre_pad is not None:
      v = pre_pad(v)
    windows = _windows(v, ks, strides, padding, rhs_dil)
    per_offset = [jnp.einsum("m...c,m...f->mcf", w, g, precision=_HIGHEST) for w in windows]
    return jnp.stack(per_offset, 1).reshape(v.shape[0], -1)

  # Measured on XLA:CPU (default model: 0.95 vs 1.10 s a DP round); GPUs keep the stacked
  # patches their figures were measured with.
  offsets = jax.default_backend() == "cpu" and not any(d != 1 for d in lhs_dil)
  return LayerCall("linear", leaves, prep, to_leaf, explicit if offsets else None)


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
  slices = _windows(x, ks, strides, padding, rhs_dil)
  return jnp.stack(slices, axis=-2).reshape(m, -1, len(slices) * c)


def _windows(x: jax.Array, ks: tuple[int, ...], strides: tuple[int, ...], padding,
             rhs_dil: tuple[int, ...]) -> list[jax.Array]:
  """The padded input under each kernel offset (in `(*ks)` order), `[M, *out, C]` each:
  strided slices, on XLA:CPU far cheaper than an identity-kernel convolution."""
  m, c = x.shape[0], x.shape[-1]
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
  return slices


def _norm_call(module: nn.Module, kwargs, leaves) -> LayerCall:
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
  return LayerCall("norm", leaves, lambda x: normalize.apply({}, x))


def describe(module: nn.Module, args, kwargs,
              leaf_index: dict[int, int]) -> LayerCall | None:
  """The LayerCall for an intercepted `__call__`, or None to leave it alone."""
  kind = type(module)
  if kind not in _NATIVE_LAYERS and kind not in _CONV_LAYERS:
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


def layer_terms(calls: list[LayerCall], inputs: list, gouts: list,
                leaves: list) -> dict[int, tuple]:
  """Per params leaf: ("tokens", A, G, to_leaf, explicit) or ("vec", V, to_leaf).

  `explicit`: None, or a thunk giving the `[M, K * F]` per-example kernel gradients
  without A (XLA drops A when only the thunk's result is used).

  Example m's rows depend only on example m's input and output gradient, so a
  non-finite example makes only its own rows (and so its own norm) non-finite.
  """
  terms: dict[int, tuple] = {}
  for call, x, g in zip(calls, inputs, gouts):
    m, f = g.shape[0], g.shape[-1]
    gt = g.reshape(m, -1, f)
    xhat = call.prep(x).reshape(m, -1, f) if call.kind == "norm" else None
    for name, idx in call.leaves:
      shape = leaves[idx].shape
      if name == "kernel" and call.kind == "linear":
        explicit = None if call.explicit is None else (
            lambda fn=call.explicit, x=x, g=g: fn(x, g))
        new = ("tokens", call.prep(x), gt,
               lambda kf, s=shape, fn=call.to_leaf: fn(kf, s), explicit)
      elif name == "bias" or (name == "scale" and call.kind == "norm"):
        v = gt.sum(1) if name == "bias" else jnp.sum(gt * xhat, axis=1)
        new = ("vec", v, lambda kf, s=shape: kf.reshape(s))
      else:
        raise ValueError(f"method='ghost': unknown parameter {name!r}")
      terms[idx] = _merge(terms.get(idx), new)
  return terms


def _merge(old: tuple | None, new: tuple) -> tuple:
  """Combines terms of one leaf used by several calls (shared weights)."""
  if old is None:
    return new
  if new[0] == "tokens":
    both = None if old[4] is None or new[4] is None else (
        lambda a=old[4], b=new[4]: a() + b())
    return ("tokens", jnp.concatenate([old[1], new[1]], 1),
            jnp.concatenate([old[2], new[2]], 1), old[3], both)
  return ("vec", old[1] + new[1], old[2])
