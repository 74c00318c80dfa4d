"""Tests for privacy/clipping.py, ghost.py and ghost_layers.py (tiny SmallCNN, CPU)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedsim.models import PatchConv, SmallCNN
from privacy import clipping, ghost, ghost_layers

M = 8
MASK = np.array([1, 1, 1, 0, 1, 1, 0, 1], bool)
GROUPS = np.array([0, 0, 1, 1, 2, 2, 2, 3], np.int32)  # patient of each image
NUM_GROUPS = 5  # one empty slot


def _loss_fn(model):
  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
  return loss_fn


def _np_params(model: nn.Module, x: np.ndarray, seed: int):
  """Random params drawn with numpy (no init compilation): LeCun-scaled
  kernels, small non-zero biases, scales near 1."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]

  def draw(path, s):
    name = jax.tree_util.keystr(path[-1:])
    z = rng.normal(size=s.shape).astype(np.float32)
    if "kernel" in name:
      return z / np.sqrt(np.prod(s.shape[:-1]))
    return (1.0 if "scale" in name else 0.0) + 0.1 * z
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _np_images(seed: int, shape, low: float, high: float) -> np.ndarray:
  """Gaussian images whose scale grows over the batch (spread-out norms)."""
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  return x * np.linspace(low, high, shape[0], dtype=np.float32).reshape(
      (-1,) + (1,) * (len(shape) - 1))


@functools.cache
def _setup(conv: str):
  """Model, params and a batch of 8 8x8x1 images (cached per conv impl)."""
  model = SmallCNN(num_classes=3, conv=conv)
  x = _np_images(1, (M, 8, 8, 1), 0.3, 3.0)
  batch = {"x": x, "y": np.arange(M, dtype=np.int32) % 3}
  return model, _np_params(model, x, 0), batch


def _clipped(conv: str, method: str, grouped: bool = False,
             microbatch_size: int | None = None, ghost_rows: int = 0):
  """Jitted clipped_grad_sum(params, batch, mask, groups, clip_norm)."""
  return _clipped_cached(conv, method, grouped, microbatch_size, ghost_rows)


@functools.cache  # one compilation per variant for the whole module
def _clipped_cached(conv, method, grouped, microbatch_size, ghost_rows):
  """`grouped`: False, True (patients by id) or "span" (GROUPS' runs are adjacent,
  at most 3 images: the flat layout's banded Gram pairs)."""
  loss_fn = _loss_fn(_setup(conv)[0])

  def fn(params, batch, mask, groups, clip_norm):
    return clipping.clipped_grad_sum(
        loss_fn, params, batch, mask, clip_norm=clip_norm,
        groups=groups if grouped else None,
        num_groups=NUM_GROUPS if grouped else None, method=method,
        microbatch_size=microbatch_size, unit_span=3 if grouped == "span" else 0,
        ghost_rows=ghost_rows)
  return jax.jit(fn)


@functools.cache
def _single_grad(conv: str):
  """Jitted gradient of ONE example's loss (batch of 1), the reference."""
  loss_fn = _loss_fn(_setup(conv)[0])
  return jax.jit(jax.grad(lambda p, x, y: loss_fn(
      p, {"x": x[None], "y": y[None]})[0]))


def _norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(v, np.float64)))
                           for v in jax.tree.leaves(tree))))


def _reference(conv, mask, clip_norm, groups=None):
  """Clip-and-sum one unit at a time in Python (float64 accumulation)."""
  _, params, batch = _setup(conv)
  grad = _single_grad(conv)
  per_ex = [jax.tree.map(np.asarray, grad(params, batch["x"][i],
                                          batch["y"][i])) for i in range(M)]
  units = {}
  for i in range(M):
    if mask[i] and (groups is None or groups[i] >= 0):
      key = i if groups is None else int(groups[i])
      units[key] = per_ex[i] if key not in units else jax.tree.map(
          np.add, units[key], per_ex[i])
  total = jax.tree.map(lambda v: np.zeros(v.shape, np.float64), params)
  norms = []
  for g in units.values():
    n = _norm(g)
    norms.append(n)
    clipped = jax.tree.map(lambda v, n=n: v * min(1.0, clip_norm / n), g)
    assert _norm(clipped) <= clip_norm * (1 + 1e-6)
    total = jax.tree.map(np.add, total, clipped)
  return total, np.array(norms)


def _median_clip(conv, groups=None) -> float:
  """A clip norm that clips some units and leaves others alone.

  Unit norms are read from the stats of the vmap path run on one unit at a
  time (no extra compilation); the reference test checks those stats.
  """
  _, params, batch = _setup(conv)
  fn = _clipped(conv, "vmap", groups is not None)
  ids = np.arange(M) if groups is None else groups
  norms = [float(fn(params, batch, MASK & (ids == u), GROUPS, 1e9)[1].mean_norm)
           for u in np.unique(ids[MASK])]
  return float(np.median(norms)) * 1.01


def _assert_trees_close(a, b, rtol=1e-4, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol)


@pytest.mark.parametrize("method", ["vmap", "ghost"])
@pytest.mark.parametrize("grouped", [False, True, "span"])
def test_matches_python_loop_reference(method, grouped):
  groups = GROUPS if grouped else None
  clip = _median_clip("patches", groups)
  want, norms = _reference("patches", MASK, clip, groups)
  _, params, batch = _setup("patches")
  got, stats = _clipped("patches", method, grouped)(params, batch, MASK,
                                                    GROUPS, clip)
  _assert_trees_close(got, want)
  assert int(stats.num_units) == len(norms)
  assert int(stats.num_clipped) == int(np.sum(norms > clip))
  assert 0 < int(stats.num_clipped) < len(norms)
  assert int(stats.num_nonfinite) == 0
  np.testing.assert_allclose(float(stats.mean_norm), norms.mean(), rtol=1e-4)


@pytest.mark.parametrize("grouped", [False, True, "span"])
def test_ghost_row_blocks_match_python_loop_reference(grouped):
  """Blocks of 3 rows (3, 3, 2; patients 1 and 2 cut by block edges) change nothing."""
  groups = GROUPS if grouped else None
  clip = _median_clip("patches", groups)
  want, norms = _reference("patches", MASK, clip, groups)
  _, params, batch = _setup("patches")
  got, stats = _clipped("patches", "ghost", grouped, ghost_rows=3)(
      params, batch, MASK, GROUPS, clip)
  _assert_trees_close(got, want)
  assert int(stats.num_units) == len(norms)
  assert int(stats.num_clipped) == int(np.sum(norms > clip))
  np.testing.assert_allclose(float(stats.mean_norm), norms.mean(), rtol=1e-4)


@pytest.mark.parametrize("method", ["vmap", "ghost"])
def test_each_clipped_unit_norm_at_most_clip_norm(method):
  """With one example valid at a time the sum is that example's clipped grad."""
  _, params, batch = _setup("patches")
  clip = _median_clip("patches")
  fn = _clipped("patches", method)
  for i in range(M):
    got, _ = fn(params, batch, np.arange(M) == i, GROUPS, clip)
    assert _norm(got) <= clip * (1 + 1e-5)


@pytest.mark.parametrize("conv,grouped", [("xla", False), ("patches", False),
                                          ("patches", True), ("patches", "span")])
def test_ghost_equals_vmap(conv, grouped):
  _, params, batch = _setup(conv)
  clip = _median_clip(conv, GROUPS if grouped else None)
  want, want_stats = _clipped(conv, "vmap", grouped)(params, batch, MASK,
                                                     GROUPS, clip)
  got, got_stats = _clipped(conv, "ghost", grouped)(params, batch, MASK,
                                                    GROUPS, clip)
  _assert_trees_close(got, want)
  assert 0 < int(want_stats.num_clipped) < int(want_stats.num_units)
  for a, b in zip(got_stats[:3], want_stats[:3]):
    assert int(a) == int(b)
  np.testing.assert_allclose(got_stats.mean_norm, want_stats.mean_norm,
                             rtol=1e-4)


@pytest.mark.parametrize("method", ["vmap", "ghost"])
@pytest.mark.parametrize("grouped", [False, True, "span"])
def test_masked_examples_have_no_effect(method, grouped):
  _, params, batch = _setup("patches")
  fn = _clipped("patches", method, grouped)
  groups = GROUPS.copy()
  mask = MASK.copy()
  if grouped:  # also an unmasked image whose patient id is -1 (padding)
    groups[0] = -1
  base = fn(params, batch, mask, groups, 1.0)
  x = np.array(batch["x"])
  x[~mask] = 1e30
  x[~mask, 0, 0, 0] = np.nan
  if grouped:
    x[0] = np.inf
  y = np.array(batch["y"])
  y[~mask] = 2
  changed = fn(params, {"x": x, "y": y}, mask, groups, 1.0)
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(changed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("method", ["vmap", "ghost"])
def test_patient_is_clipped_not_the_image(method):
  """A patient with 3 identical images contributes at most C, not 3C."""
  _, params, batch = _setup("patches")
  same = {"x": batch["x"].copy(), "y": batch["y"].copy()}
  same["x"][1:3] = batch["x"][0]
  same["y"][1:3] = batch["y"][0]
  groups = np.array([0, 0, 0, 1, 2, 3, 4, -1], np.int32)
  only = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)
  clip = 1e-3  # far below every gradient norm: everything is clipped
  per_patient, stats = _clipped("patches", method, True)(params, same, only,
                                                         groups, clip)
  per_image, _ = _clipped("patches", method)(params, same, only, groups, clip)
  assert int(stats.num_units) == 1
  assert _norm(per_patient) <= clip * (1 + 1e-5)
  np.testing.assert_allclose(_norm(per_patient), clip, rtol=1e-4)
  np.testing.assert_allclose(_norm(per_image), 3 * clip, rtol=1e-4)


@pytest.mark.parametrize("method", ["vmap", "ghost"])
@pytest.mark.parametrize("grouped", [False, True, "span"])
def test_nonfinite_unit_is_zeroed_and_counted(method, grouped):
  _, params, batch = _setup("patches")
  fn = _clipped("patches", method, grouped)
  bad = 4  # a valid image of patient 2 (which also has images 5 and 6)
  x = batch["x"].copy()
  x[bad, 2, 3, 0] = np.inf
  got, stats = fn(params, {"x": x, "y": batch["y"]}, MASK, GROUPS, 0.5)
  assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(got))
  assert int(stats.num_nonfinite) == 1
  dropped = MASK.copy()
  if grouped:
    dropped[GROUPS == GROUPS[bad]] = False
  else:
    dropped[bad] = False
  want, want_stats = fn(params, batch, dropped, GROUPS, 0.5)
  _assert_trees_close(got, want, rtol=1e-5)
  assert int(stats.num_units) == int(want_stats.num_units) + 1
  np.testing.assert_allclose(stats.mean_norm, want_stats.mean_norm, rtol=1e-5)


def test_empty_batch_plus_noise_is_pure_noise():
  _, params, batch = _setup("patches")
  total, stats = _clipped("patches", "ghost")(params, batch,
                                              np.zeros(M, bool), GROUPS, 1.0)
  assert int(stats.num_units) == 0 and float(stats.mean_norm) == 0.0
  for v in jax.tree.leaves(total):
    np.testing.assert_array_equal(np.asarray(v), 0.0)
  sigma, clip, expected_batch = 1.2, 1.5, 4.0
  priv = jax.jit(functools.partial(
      clipping.privatize, clip_norm=clip, noise_multiplier=sigma,
      expected_batch_size=expected_batch))
  key = jax.random.PRNGKey(7)
  out = priv(total, key)
  noise_only = priv(jax.tree.map(np.zeros_like, params), key)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(noise_only)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  z = np.concatenate([np.asarray(v, np.float64).ravel()
                      for v in jax.tree.leaves(out)])
  z = z * expected_batch / (sigma * clip)
  # sum z^2 ~ chi2(n); Laurent-Massart tails at x = 16: P < 2.3e-7.
  n = z.size
  assert np.isfinite(z).all()
  assert n - 8 * np.sqrt(n) <= np.sum(z * z) <= n + 8 * np.sqrt(n) + 32


def test_privatize_divides_by_expected_batch_size_only():
  tree = {"a": jnp.array([2.0, -4.0]), "b": jnp.ones((2, 2))}
  out = clipping.privatize(tree, jax.random.PRNGKey(0), clip_norm=1.0,
                           noise_multiplier=0.0, expected_batch_size=8)
  _assert_trees_close(out, jax.tree.map(lambda v: v / 8, tree), rtol=0)
  with pytest.raises(ValueError, match="expected_batch_size"):
    clipping.privatize(tree, jax.random.PRNGKey(0), clip_norm=1.0,
                       noise_multiplier=1.0, expected_batch_size=0)


def test_noise_std_and_independence():
  """Statistics of add_noise on 200k-entry leaves, with stated bounds.

  Each bound below fails with probability < 3e-7 when the code is right; the
  test as a whole fails falsely with probability < 1e-6.
  """
  n, std = 200_000, 2.5
  tree = {"a": jnp.full((n,), 3.0), "b": jnp.zeros((400, 500))}
  z = jax.tree.map(lambda x, y: (np.asarray(x, np.float64) - np.asarray(y))
                   / std, clipping.add_noise(tree, jax.random.PRNGKey(0), std),
                   tree)
  z2 = (np.asarray(clipping.add_noise(tree, jax.random.PRNGKey(1),
                                      std)["a"], np.float64) - 3.0) / std
  for v in (z["a"], z["b"].ravel()):
    # sum(v^2) ~ chi2(n) (mean known). Laurent & Massart (2000): each tail
    # beyond 2 sqrt(n x) (+ 2x above) has probability <= exp(-x); x = 16 gives
    # exp(-16) = 1.1e-7 per side.
    x = 16.0
    s = float(np.sum(v * v))
    assert n - 2 * np.sqrt(n * x) <= s <= n + 2 * np.sqrt(n * x) + 2 * x
    # sum(v) / sqrt(n) ~ N(0, 1); P(|.| > 6) = 2e-9.
    assert abs(float(np.sum(v))) / np.sqrt(n) < 6
  # Independent leaves / keys: sqrt(n) * corr is ~N(0, 1) (t with n-2 dof);
  # P(|.| > 6) ~ 2e-9 each.
  for u, w in ((z["a"], z["b"].ravel()), (z["a"], z2)):
    assert abs(np.corrcoef(u, w)[0, 1]) * np.sqrt(n) < 6


def test_clip_tree():
  tree = {"w": jnp.array([3.0, 4.0]), "b": jnp.zeros((2,))}
  clipped, norm = clipping.clip_tree(tree, 1.0)
  assert float(norm) == pytest.approx(5.0)
  assert _norm(clipped) == pytest.approx(1.0, rel=1e-6)
  same, _ = clipping.clip_tree(tree, 10.0)
  _assert_trees_close(same, tree, rtol=0)
  nan, norm = clipping.clip_tree({"w": jnp.array([jnp.nan, 1.0])}, 1.0)
  assert not np.isfinite(float(norm))
  np.testing.assert_array_equal(np.asarray(nan["w"]), [0.0, 0.0])


@pytest.mark.parametrize("method,grouped", [("vmap", False), ("vmap", True)])
def test_microbatches_equal_whole_batch(method, grouped):
  _, params, batch = _setup("patches")
  whole = _clipped("patches", method, grouped)(params, batch, MASK, GROUPS,
                                               0.7)
  sliced = _clipped("patches", method, grouped, 3)(params, batch, MASK, GROUPS,
                                                   0.7)
  _assert_trees_close(sliced, whole, rtol=1e-5)


@pytest.mark.parametrize("method", ["vmap", "ghost"])
def test_vmapped_over_hospitals_matches_each_hospital(method):
  model, _, batch = _setup("patches")
  h = 3
  each = [_np_params(model, batch["x"], seed) for seed in (3, 4, 5)]
  params = jax.tree.map(lambda *v: np.stack(v), *each)
  rng = np.random.default_rng(6)
  xs = rng.normal(size=(h,) + batch["x"].shape).astype(np.float32)
  ys = rng.integers(0, 3, (h, M)).astype(np.int32)
  masks = rng.random((h, M)) < 0.7
  clips = np.array([0.3, 1.0, 3.0], np.float32)  # traced, per hospital
  loss_fn = _loss_fn(model)

  def one(p, x, y, m, c):
    return clipping.clipped_grad_sum(loss_fn, p, {"x": x, "y": y}, m,
                                     clip_norm=c, method=method)
  together = jax.jit(jax.vmap(one))(params, xs, ys, masks, clips)
  for i in range(h):
    alone = _clipped("patches", method)(
        each[i], {"x": xs[i], "y": ys[i]}, masks[i], GROUPS, float(clips[i]))
    _assert_trees_close(jax.tree.map(lambda v, i=i: v[i], together), alone,
                        rtol=1e-5)


SLOT = 2  # patient slots: units are runs of SLOT examples
SLOT_MASK = np.array([1, 1, 1, 0, 0, 0, 0, 1], bool)  # full, half, empty, half


def _loss_and_metrics(model):
  """Per-example losses plus `[M]` aux values (for has_aux)."""
  loss_fn = _loss_fn(model)

  def fn(params, batch):
    losses = loss_fn(params, batch)
    return losses, {"loss": losses, "one": jnp.ones_like(losses)}
  return fn


@functools.cache
def _slotted(method: str, microbatch_size: int | None, ghost_rows: int = 0):
  model = _setup("patches")[0]

  def fn(params, batch, mask, clip_norm):
    return clipping.clipped_grad_sum(
        _loss_and_metrics(model), params, batch, mask, clip_norm=clip_norm,
        method=method, microbatch_size=microbatch_size, has_aux=True, unit_size=SLOT,
        ghost_rows=ghost_rows)
  return jax.jit(fn)


@pytest.mark.parametrize("method,microbatch_size,ghost_rows",
                         [("vmap", None, 0), ("ghost", None, 0), ("ghost", 3, 0),
                          ("ghost", None, 3)])  # blocks of whole slots: 2 rows
def test_unit_slots_match_python_loop_reference(method, microbatch_size, ghost_rows):
  """Runs of SLOT examples are one unit; masked slots and empty units add nothing."""
  slots = np.arange(M) // SLOT
  clip = _median_clip("patches", slots.astype(np.int32))
  want, norms = _reference("patches", SLOT_MASK, clip, slots)
  _, params, batch = _setup("patches")
  x = np.array(batch["x"])
  x[~SLOT_MASK] = np.nan  # padded slots' content must not matter
  got, stats, aux = _slotted(method, microbatch_size, ghost_rows)(
      params, {"x": x, "y": batch["y"]}, SLOT_MASK, clip)
  _assert_trees_close(got, want)
  assert int(stats.num_units) == len(norms) == 3
  assert int(stats.num_clipped) == int(np.sum(norms > clip))
  assert 0 < int(stats.num_clipped) < len(norms)
  np.testing.assert_allclose(float(stats.mean_norm), norms.mean(), rtol=1e-4)
  # aux sums run over the real examples, from the clipping pass's own forward
  losses = _loss_fn(_setup("patches")[0])(params, batch)
  np.testing.assert_allclose(float(aux["loss"]), float(np.sum(np.where(
      SLOT_MASK, losses, 0))), rtol=1e-5)
  assert float(aux["one"]) == SLOT_MASK.sum()


@pytest.mark.parametrize("method", ["vmap", "ghost"])
def test_example_aux_comes_from_the_same_pass(method):
  model, params, batch = _setup("patches")
  got, _, aux = jax.jit(lambda p, b: clipping.clipped_grad_sum(
      _loss_and_metrics(model), p, b, MASK, clip_norm=0.7, method=method,
      has_aux=True))(params, batch)
  want, _ = _clipped("patches", method)(params, batch, MASK, GROUPS, 0.7)
  _assert_trees_close(got, want, rtol=1e-5)
  assert float(aux["one"]) == MASK.sum()


class _NormNet(nn.Module):
  """Odd convs, GroupNorm, LayerNorm and a Dense layer used twice."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (3, 2), strides=(2, 1), padding=((1, 0), (0, 2)),
                kernel_dilation=(1, 2))(x)
    x = nn.Conv(4, (3, 3), padding="VALID", use_bias=False)(x)
    x = nn.relu(nn.GroupNorm(num_groups=2)(x))
    x = nn.Dense(8)(x.reshape(x.shape[0], -1))
    x = nn.relu(nn.LayerNorm()(x))
    shared = nn.Dense(8)  # weight sharing: its tokens from both calls add up
    x = shared(nn.relu(shared(x)))
    return nn.Dense(3)(x)


@pytest.mark.parametrize("form", ["gram", "explicit"])
def test_ghost_supports_groupnorm_layernorm_and_shared_layers(monkeypatch, form):
  # Force one form everywhere (the explicit one builds each conv's per-example gradient
  # offset by offset), with and without patient groups.
  monkeypatch.setattr(ghost, "_explicit_is_cheaper", lambda *_: form == "explicit")
  model = _NormNet()
  x = _np_images(2, (M, 6, 6, 1), 0.2, 4.0)
  batch = {"x": x, "y": np.arange(M, dtype=np.int32) % 3}
  params = _np_params(model, x, 1)

  @functools.partial(jax.jit, static_argnums=1)
  def both(params, method):
    kw = dict(clip_norm=2.0, method=method)
    return (clipping.clipped_grad_sum(_loss_fn(model), params, batch, MASK,
                                      **kw),
            clipping.clipped_grad_sum(_loss_fn(model), params, batch, MASK,
                                      groups=GROUPS, num_groups=NUM_GROUPS,
                                      **kw),
            clipping.clipped_grad_sum(_loss_fn(model), params, batch, MASK,  # banded Grams
                                      groups=GROUPS, num_groups=NUM_GROUPS,
                                      unit_span=3, **kw),
            clipping.clipped_grad_sum(_loss_fn(model), params, batch, SLOT_MASK,
                                      unit_size=SLOT, **{**kw, "clip_norm": 2.75}))
  want, got = both(params, "vmap"), both(params, "ghost")
  for (w, w_stats), (g, g_stats) in zip(want, got):
    _assert_trees_close(g, w, atol=1e-5)
    assert 0 < int(w_stats.num_clipped) < int(w_stats.num_units)
    assert int(g_stats.num_clipped) == int(w_stats.num_clipped)


class _Scaled(nn.Module):
  """Dense followed by a raw learned scalar (not a layer ghost knows)."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(x.reshape(x.shape[0], -1)) * self.param(
        "temperature", nn.initializers.ones, ())


def test_ghost_refuses_unsupported_params():
  model = _Scaled()
  x = np.ones((2, 4), np.float32)
  params = _np_params(model, x, 0)
  with pytest.raises(ValueError, match=r"temperature.*method='vmap'"):
    clipping.clipped_grad_sum(_loss_fn(model), params,
                              {"x": x, "y": jnp.zeros(2, jnp.int32)},
                              jnp.ones(2, bool), clip_norm=1.0, method="ghost")


def test_bad_arguments_raise():
  _, params, batch = _setup("patches")
  loss_fn = _loss_fn(_setup("patches")[0])
  with pytest.raises(ValueError, match="method"):
    clipping.clipped_grad_sum(loss_fn, params, batch, MASK, clip_norm=1.0,
                              method="fast")
  with pytest.raises(ValueError, match="clip_norm"):
    clipping.clipped_grad_sum(loss_fn, params, batch, MASK, clip_norm=-1.0)
  with pytest.raises(ValueError, match="num_groups"):
    clipping.clipped_grad_sum(loss_fn, params, batch, MASK, clip_norm=1.0,
                              groups=GROUPS)
  with pytest.raises(ValueError, match="ghost_rows=-1"):
    clipping.clipped_grad_sum(loss_fn, params, batch, MASK, clip_norm=1.0, method="ghost",
                              ghost_rows=-1)
  with pytest.raises(ValueError, match="unit_size=3"):
    clipping.clipped_grad_sum(loss_fn, params, batch, MASK, clip_norm=1.0, unit_size=3)
  with pytest.raises(ValueError, match="exclusive"):
    clipping.clipped_grad_sum(loss_fn, params, batch, MASK, clip_norm=1.0,
                              groups=GROUPS, num_groups=NUM_GROUPS, unit_size=2)


def test_fedsim_registers_its_patch_conv_for_ghost_clipping():
  """privacy/ never imports fedsim: fedsim.models registers PatchConv when it defines it."""
  assert PatchConv in ghost_layers.conv_layers()
  assert nn.Conv not in ghost_layers.conv_layers()  # Native layers need no registration.
