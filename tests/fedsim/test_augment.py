"""In-graph augmentation: exact whole-pixel moves, per-image keys, vmap and jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedsim import augment as augment_lib
from fedsim.augment import transform

# Jitted once per shape and setting: eager vmap dispatches op by op and is slow.
augment = jax.jit(augment_lib.augment,
                  static_argnames=("crop_padding", "flip", "max_rotation_degrees"))


def _images(b=16, h=28, w=28, c=1, seed=0):
  """Smooth random images (blurred noise), values roughly in [-2, 2]."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, h + 4, w + 4, c))
  x = sum(x[:, i:i + h, j:j + w] for i in range(5) for j in range(5)) / 5.0
  return jnp.asarray(x, jnp.float32)


def _shifted(image, dy, dx):
  """numpy reference of the crop: edge-pad, then the window at offset (dy, dx)."""
  h, w = image.shape[:2]
  p = max(abs(dy), abs(dx))
  padded = np.pad(image, ((p, p), (p, p), (0, 0)), mode="edge")
  return padded[p + dy:p + dy + h, p + dx:p + dx + w]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shape_and_dtype_are_kept(dtype):
  x = _images(b=4, h=12, w=10, c=3).astype(dtype)
  y = augment(jax.random.key(0), x)
  assert y.shape == x.shape and y.dtype == x.dtype


def test_all_augmentations_off_is_identity():
  x = _images()
  y = augment(jax.random.key(0), x, crop_padding=0, flip=False, max_rotation_degrees=0.0)
  np.testing.assert_array_equal(y, x)


def test_rotation_by_zero_is_identity_bit_for_bit():
  x = _images(b=2, h=9, w=7, c=2)
  for image in x:
    y = transform(image, angle=jnp.float32(0.0), flip=False, shift=jnp.array([0, 0]))
    np.testing.assert_array_equal(y, image)


def test_quarter_turn_matches_rot90_clockwise():
  image = jnp.arange(36.0).reshape(6, 6, 1)
  y = transform(image, angle=jnp.float32(np.pi / 2), flip=False, shift=jnp.array([0, 0]))
  np.testing.assert_allclose(y[..., 0], np.rot90(np.asarray(image[..., 0]), -1), atol=1e-4)


def test_deterministic_per_key_and_different_across_keys():
  x = _images()
  a = augment(jax.random.key(1), x)
  b = augment(jax.random.key(1), x)
  c = augment(jax.random.key(2), x)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_images_draw_independently_and_ignore_batch_size():
  x = _images(b=8)
  x_same = jnp.broadcast_to(x[:1], x.shape)
  y = augment(jax.random.key(3), x_same)
  assert len({np.asarray(im).tobytes() for im in y}) > 1  # not one draw for all
  head = augment(jax.random.key(3), x[:5])
  np.testing.assert_array_equal(head, augment(jax.random.key(3), x)[:5])


def test_flip_only_mirrors_each_image_or_keeps_it():
  x = _images(b=64)
  y = np.asarray(augment(jax.random.key(0), x, crop_padding=0, flip=True,
                         max_rotation_degrees=0.0))
  x = np.asarray(x)
  flipped = [np.array_equal(yi, xi[:, ::-1]) for xi, yi in zip(x, y, strict=True)]
  kept = [np.array_equal(yi, xi) for xi, yi in zip(x, y, strict=True)]
  assert all(f or k for f, k in zip(flipped, kept, strict=True))
  assert any(flipped) and any(kept)  # all 64 alike: probability 2**-63


def test_crop_is_an_edge_padded_shift_within_the_padding():
  x = np.asarray(_images(b=32))
  y = np.asarray(augment(jax.random.key(0), jnp.asarray(x), crop_padding=2, flip=False,
                         max_rotation_degrees=0.0))
  shifts = []
  for xi, yi in zip(x, y, strict=True):
    found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
             if np.array_equal(yi, _shifted(xi, dy, dx))]
    assert found, "output is not a crop of the edge-padded image"
    shifts.append(found[0])
  assert len(set(shifts)) > 3


def test_mask_leaves_masked_images_unchanged():
  x = _images(b=6)
  mask = jnp.array([True, False, True, False, False, True])
  y = augment(jax.random.key(0), x, mask)
  for i in np.flatnonzero(~np.asarray(mask)):
    np.testing.assert_array_equal(y[i], x[i])
  assert not np.allclose(y[0], x[0])


def test_vmap_over_clients_with_their_keys_and_jit_agree():
  x = jnp.stack([_images(b=4, seed=s) for s in range(3)])  # [clients, B, H, W, C]
  keys = jax.random.split(jax.random.key(7), 3)
  fn = lambda k, xs: augment_lib.augment(k, xs, crop_padding=2, flip=True,
                                         max_rotation_degrees=10.0)
  jitted = jax.jit(jax.vmap(fn))(keys, x)
  for c in range(3):
    np.testing.assert_allclose(jitted[c], jax.jit(fn)(keys[c], x[c]), atol=1e-5)
  assert not np.allclose(jitted[0], jitted[1])


def test_eager_and_jit_agree():
  x = _images(b=2, h=6, w=6)
  key = jax.random.key(4)
  np.testing.assert_allclose(augment_lib.augment(key, x), augment(key, x), atol=1e-5)


def test_pixel_statistics_are_roughly_preserved():
  x = _images(b=64)
  y = augment(jax.random.key(0), x, crop_padding=2, flip=True, max_rotation_degrees=10.0)
  assert abs(float(y.mean() - x.mean())) < 0.05 * float(x.std())
  assert abs(float(y.std() / x.std()) - 1.0) < 0.1
  assert bool(jnp.all(jnp.isfinite(y)))
  assert float(y.min()) >= float(x.min()) and float(y.max()) <= float(x.max())


@pytest.mark.parametrize("kwargs", [dict(crop_padding=-1), dict(crop_padding=1.5),
                                    dict(max_rotation_degrees=-3.0)])
def test_bad_parameters_are_refused(kwargs):
  with pytest.raises(ValueError):
    augment_lib.augment(jax.random.key(0), _images(b=2), **kwargs)


def test_integer_images_are_refused():
  with pytest.raises(ValueError, match="float images"):
    augment_lib.augment(jax.random.key(0), jnp.zeros((2, 8, 8, 1), jnp.uint8))
