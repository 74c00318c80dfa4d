"""Reconstruction quality: PSNR and SSIM of images `[..., H, W, C]` in `[0, data_range]`.

SSIM follows Wang et al. 2004: local means, variances and covariance under an
11 x 11 Gaussian window (sigma 1.5, truncated at 3.5 sigma, normalised), "valid"
positions only (as scikit-image's `structural_similarity(gaussian_weights=True,
use_sample_covariance=False)`), C1 = (0.01 L)^2, C2 = (0.03 L)^2, averaged over
positions and channels.

>>> import numpy as np
>>> x = np.zeros((16, 16, 1), np.float32)
>>> round(float(psnr(x, x + 0.1)), 4)  # MSE 0.01 on a unit range
20.0
>>> float(ssim(x, x))
1.0
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from privacy import validation

K1, K2 = 0.01, 0.03


def psnr(x: jax.Array, y: jax.Array, *, data_range: float = 1.0) -> jax.Array:
  """Peak signal-to-noise ratio in dB per image `[...]` (inf for identical images)."""
  mse = jnp.mean(jnp.square(jnp.asarray(x, jnp.float32) - y), axis=(-3, -2, -1))
  return 10.0 * jnp.log10(data_range**2 / mse)


def gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> jax.Array:
  """The normalised 1-D Gaussian window `[2 * int(truncate * sigma + 0.5) + 1]`."""
  radius = int(truncate * sigma + 0.5)
  r = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  w = jnp.exp(-0.5 * (r / sigma) ** 2)
  return w / jnp.sum(w)


def _filter(images: jax.Array, window: jax.Array) -> jax.Array:
  """Separable 'valid' filtering of `[N, H, W, C]` with the window, channel by channel."""
  k = window.shape[0]
  c = images.shape[-1]
  spec = ("NHWC", "HWIO", "NHWC")
  rows = jnp.tile(window.reshape(k, 1, 1, 1), (1, 1, 1, c))
  out = jax.lax.conv_general_dilated(images, rows, (1, 1), "VALID",
                                     dimension_numbers=spec, feature_group_count=c)
  return jax.lax.conv_general_dilated(out, rows.reshape(1, k, 1, c), (1, 1), "VALID",
                                      dimension_numbers=spec, feature_group_count=c)


def ssim(x: jax.Array, y: jax.Array, *, data_range: float = 1.0,
         sigma: float = 1.5) -> jax.Array:
  """Mean structural similarity per image `[...]` of `[..., H, W, C]` pairs.

  Raises ValueError when the images are smaller than the window (11 px at sigma 1.5).
  """
  x, y = jnp.broadcast_arrays(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  window = gaussian_window(sigma)
  size = window.shape[0]
  height, width = x.shape[-3:-1]
  validation.check(min(height, width) >= size, "image size", (height, width),
                   f">= the SSIM window ({size} px at sigma={sigma})")
  batch = x.shape[:-3]
  x, y = x.reshape((-1,) + x.shape[-3:]), y.reshape((-1,) + y.shape[-3:])
  f = lambda v: _filter(v, window)
  mx, my = f(x), f(y)
  vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
  c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
  s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
  return jnp.mean(s, axis=(-3, -2, -1)).reshape(batch)
