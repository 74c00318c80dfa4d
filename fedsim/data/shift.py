"""Per-hospital acquisition shift: each hospital's scanner images a little differently.

A hospital's shift (contrast, brightness, blur, detector noise) is drawn from
`(seed, hospital)` alone, so one hospital always gets the same scanner, whatever
its images and whichever other hospitals exist. `strength` scales every effect
(0: the identity, bit for bit). Works on any uint8 `[n, H, W, C]` images.
"""

from __future__ import annotations

import numpy as np

# Spread of each effect at strength 1 (pixel values in [0, 1]).
_CONTRAST_LOG_SD = 0.15   # contrast factor exp(N(0, sd))
_BRIGHTNESS_SD = 0.05     # added offset
_NOISE_MAX = 0.04         # Gaussian detector noise std ~ U(0, max)
_BLUR_MAX = 0.8           # Gaussian blur sigma ~ U(0, max) pixels at 28x28 (scales with size)
_STREAM = 0x5C4A          # separates these draws from other users of (seed, hospital)


def shift_params(*, hospital: int, seed: int, strength: float,
                 image_size: int = 28) -> dict[str, float]:
  """The scanner of `hospital`: contrast, brightness, noise std, blur sigma (pixels)."""
  if not strength >= 0:
    raise ValueError(f"data.shift={strength} must be >= 0")
  rng = np.random.default_rng([_STREAM, int(seed), int(hospital)])
  draws = rng.standard_normal(2), rng.uniform(size=2)
  return dict(
      contrast=float(np.exp(strength * _CONTRAST_LOG_SD * draws[0][0])),
      brightness=float(strength * _BRIGHTNESS_SD * draws[0][1]),
      noise=float(strength * _NOISE_MAX * draws[1][0]),
      blur=float(strength * _BLUR_MAX * draws[1][1] * image_size / 28))


def acquisition_shift(images: np.ndarray, *, hospital: int, seed: int,
                      strength: float) -> tuple[np.ndarray, dict[str, float]]:
  """Applies hospital `hospital`'s scanner to its images.

  Order: blur, contrast about mid-grey, brightness, noise, clip, round.

  Args:
    images: uint8 `[n, H, W, C]`.
    hospital: hospital index (global, seen or unseen).
    seed: run seed.
    strength: scale of every effect; 0 returns the images unchanged.

  Returns:
    `(shifted uint8 [n, H, W, C], params)` where params holds "contrast",
    "brightness", "noise" and "blur" (floats; identity: 1, 0, 0, 0).
  """
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 [n, H, W, C], got {images.dtype} {images.shape}")
  params = shift_params(hospital=hospital, seed=seed, strength=strength,
                        image_size=images.shape[1])
  if strength == 0 or len(images) == 0:
    return images.copy(), params
  x = images.astype(np.float32) / 255
  x = _blur(x, params["blur"])
  x = (x - 0.5) * params["contrast"] + 0.5 + params["brightness"]
  noise_rng = np.random.default_rng([_STREAM, int(seed), int(hospital), 1])
  x += params["noise"] * noise_rng.standard_normal(x.shape, dtype=np.float32)
  return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8), params


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur of `[n, H, W, C]`, renormalised at the borders."""
  if sigma < 1e-3:
    return x
  return _blur_axis(_blur_axis(x, sigma, axis=1), sigma, axis=2)


def _blur_axis(x: np.ndarray, sigma: float, *, axis: int) -> np.ndarray:
  """1-D Gaussian (truncated at 3 sigma) along `axis` by shifted adds (no BLAS)."""
  size = x.shape[axis]
  radius = min(size - 1, int(np.ceil(3 * sigma)))
  out = np.zeros_like(x)
  norm = np.zeros(size, np.float32)
  index = lambda sl: (slice(None),) * axis + (sl,)
  for d in range(-radius, radius + 1):
    w = np.float32(np.exp(-0.5 * (d / sigma) ** 2))
    dst = slice(max(0, -d), size - max(0, d))  # out[i] += w * x[i + d]
    src = slice(max(0, d), size - max(0, -d))
    out[index(dst)] += w * x[index(src)]
    norm[dst] += w
  shape = [1] * x.ndim
  shape[axis] = size
  return out / norm.reshape(shape)
