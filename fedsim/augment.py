"""In-graph data augmentation: random crop, horizontal flip and small rotation.

`augment(key, x, mask)` transforms a normalised float batch `[B, H, W, C]` inside
the compiled local step, so every client, step and image draws its own
transformation and nothing leaves the device. The three transformations are
composed into one bilinear resampling per image:

  out = rotate(flip(crop(x)))
    crop:   pad by `crop_padding` with edge values, cut an `[H, W]` window at a
            random offset (an integer shift in `[-p, p]^2`, edges replicated)
    flip:   mirror left-right with probability 1/2
    rotate: turn by an angle uniform in `[-max, max]` degrees about the image
            centre, bilinear, edge values outside the image

The crop and the flip move pixels by whole positions, so they are exact; with
the rotation off (or drawn as 0) the resampling weights are exactly 0 and 1, and
the output equals the cropped and flipped input bit for bit.

Randomness: image i's draws come from `fold_in(key, i)` only, so they do not
depend on the batch size, and a padded example never changes the transformation
of a real one (invariant 2 of shared/DESIGN.md). Augmentation acts on one image
at a time, before per-example (or per-patient) gradients are taken, so it is a
part of the example and DP clipping still bounds each unit's contribution.

Chest X-rays and flips: a left-right flip of a frontal chest radiograph puts the
heart, aortic arch and gastric bubble on the wrong side, an image that almost
never occurs (situs inversus, about 1 in 10,000) and which the model would learn
to call normal. Laterality markers ("L"/"R") are mirrored as well. Hence flips
should be off for chest X-rays (the pneumonia and MedMNIST chest configs set
`flip=False`); they are harmless and useful for rotation-invariant images such as
histology patches or blood-smear cells, where the default `flip=True` suits.

  x = augment(jax.random.key(0), x, mask, crop_padding=2, flip=False,
              max_rotation_degrees=10.0)
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from fedsim import keys


def augment(key: jax.Array, x: jax.Array, mask: Optional[jax.Array] = None, *,
            crop_padding: int = 2, flip: bool = True,
            max_rotation_degrees: float = 10.0) -> jax.Array:
  """Randomly crops, flips and rotates each image of a batch, independently.

  Args:
    key: PRNG key of this batch (e.g. of one client's local step).
    x: float `[B, H, W, C]` images (normalised or not; edges are replicated, so
      no constant fill value is assumed).
    mask: optional bool `[B]`; images where it is False are returned unchanged.
    crop_padding: static int >= 0, the largest shift of the random crop in
      pixels (0: no crop).
    flip: static bool, mirror left-right with probability 1/2 (see the module
      docstring before turning it on for chest X-rays).
    max_rotation_degrees: static float >= 0, rotation angles are uniform in
      `[-max, max]` degrees (0: no rotation).

  Returns:
    The augmented batch, same shape and dtype as `x`.

  Raises:
    ValueError: for a non-float or non-`[B, H, W, C]` batch, or negative
      `crop_padding` / `max_rotation_degrees`.
  """
  _check(x, crop_padding, max_rotation_degrees)
  if crop_padding == 0 and not flip and max_rotation_degrees == 0:
    return x
  max_angle = math.radians(max_rotation_degrees)

  def one(i, image):
    k = jax.random.fold_in(key, i)
    shift = jax.random.randint(jax.random.fold_in(k, keys.CROP), (2,), -crop_padding,
                               crop_padding + 1)
    flipped = flip & jax.random.bernoulli(jax.random.fold_in(k, keys.FLIP))
    angle = max_angle * jax.random.uniform(jax.random.fold_in(k, keys.ROTATE),
                                           minval=-1.0, maxval=1.0)
    return transform(image, angle=angle, flip=flipped, shift=shift,
                     rotate=max_rotation_degrees > 0)

  out = jax.vmap(one)(jnp.arange(x.shape[0]), x)
  if mask is not None:
    out = jnp.where(jnp.reshape(mask, (-1, 1, 1, 1)), out, x)
  return out


def transform(image: jax.Array, *, angle: jax.Array, flip: jax.Array,
              shift: jax.Array, rotate: bool = True) -> jax.Array:
  """`rotate(flip(crop(image)))` for given parameters, one bilinear resampling.

  Args:
    image: float `[H, W, C]`.
    angle: rotation in radians (scalar; positive turns the content clockwise
      as displayed, with rows pointing down).
    flip: bool scalar, mirror left-right.
    shift: int `[2]` crop offset `(dy, dx)`: output pixel `(i, j)` of the crop is
      input pixel `(i + dy, j + dx)`, clamped to the image (edge padding).
    rotate: static; False skips the rotation arithmetic (then `angle` is unused).

  Returns:
    `[H, W, C]`, same dtype as `image`.
  """
  h, w = image.shape[:2]
  rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32),
                            jnp.arange(w, dtype=jnp.float32), indexing="ij")
  if rotate:  # source point of each output pixel in the flipped crop
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    rows, cols = (cy + cos * (rows - cy) - sin * (cols - cx),
                  cx + sin * (rows - cy) + cos * (cols - cx))

  def pixel(r, c):
    """Input pixels at flipped-crop positions `(r, c)`, edges replicated twice."""
    r, c = jnp.clip(r, 0, h - 1), jnp.clip(c, 0, w - 1)  # rotation's edge mode
    c = jnp.where(flip, w - 1 - c, c)
    r, c = jnp.clip(r + shift[0], 0, h - 1), jnp.clip(c + shift[1], 0, w - 1)
    return image[r, c].astype(jnp.float32)

  if not rotate:  # whole-pixel moves only: a gather, no interpolation
    return pixel(rows.astype(jnp.int32), cols.astype(jnp.int32)).astype(image.dtype)
  r0, c0 = jnp.floor(rows), jnp.floor(cols)
  wr, wc = rows - r0, cols - c0
  r0, c0 = r0.astype(jnp.int32), c0.astype(jnp.int32)
  wr, wc = wr[..., None], wc[..., None]
  out = ((1 - wr) * ((1 - wc) * pixel(r0, c0) + wc * pixel(r0, c0 + 1))
         + wr * ((1 - wc) * pixel(r0 + 1, c0) + wc * pixel(r0 + 1, c0 + 1)))
  return out.astype(image.dtype)


def _check(x: jax.Array, crop_padding: int, max_rotation_degrees: float) -> None:
  if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"augment expects float images [B, H, W, C], got {x.dtype} "
                     f"{tuple(x.shape)}")
  if not isinstance(crop_padding, int) or crop_padding < 0:
    raise ValueError(f"crop_padding={crop_padding!r} must be an integer >= 0")
  if not max_rotation_degrees >= 0:
    raise ValueError(f"max_rotation_degrees={max_rotation_degrees!r} must be >= 0")
