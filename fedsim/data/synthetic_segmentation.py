"""Synthetic abdominal CT slices with liver and lesion masks (segmentation's default data).

A deterministic, vectorised numpy generator that stands in for the Medical
Segmentation Decathlon's liver task (fedsim/data/nifti.py) when no real data is at
hand. Each image is an axial slice: air outside an elliptical body, a darker fat
rim, soft tissue, a bright vertebra and aorta, a spleen-like organ as bright as the
liver on the other side (so intensity alone does not segment), and the liver on the
image's left (the patient's right, radiological view). Lesions are hypodense
spheres inside the liver (`LESION_RADIUS`); about `LESION_FRACTION` of patients
have 1-2.

Patients are short stacks of contiguous slices (3-6, `SLICE_STEP` apart in a
normalised cranio-caudal coordinate `z` in [-1, 1]): the liver's cross-section
grows and shrinks with `z` like an ellipsoid, and a lesion appears on the slices
its sphere crosses, so the slices of one patient are strongly correlated (the
reason patient-level privacy matters). Masks come from the same geometry as the
images (0 background, 1 liver, 2 lesion). Per-hospital acquisition shift (contrast,
brightness, blur, noise) is added by the federation (fedsim/data/shift.py).
"""

from __future__ import annotations

import numpy as np

from fedsim.data.base import ImageDataset

CLASS_NAMES = ("background", "liver", "lesion")
NAME = "synthetic_liver_ct"
# Pixel statistics of pixel/255 for this generator, measured once on 20k 32x32
# slices (a public constant of the generator, not of any data).
MEAN = 0.211
STD = 0.226
LESION_FRACTION = 0.8
# Sphere radii in half the field of view (~20 cm): 3-6 cm, the larger tumours of the
# Decathlon's liver task; smaller ones would be a pixel or two at 32 px.
LESION_RADIUS = (0.16, 0.28)
MIN_SLICES, MAX_SLICES = 3, 6
SLICE_STEP = 0.12
_AIR, _FAT, _TISSUE, _LIVER, _SPLEEN, _BONE, _LESION = 0.03, 0.30, 0.45, 0.60, 0.60, 0.92, 0.38


def generate(*, num_examples: int, image_size: int = 32, seed: int = 0) -> ImageDataset:
  """Generates `num_examples` slices of synthetic abdominal CT with masks.

  Args:
    num_examples: slices N (>= 1); the last patient may have fewer than 3.
    image_size: side S of the square slices (>= 8).
    seed: the same seed gives the same slices, bit for bit.

  Returns:
    An `ImageDataset` with uint8 images `[N, S, S, 1]`, int32 masks `[N, S, S]`
    in {0, 1, 2}, int64 patient ids (a patient's slices consecutive, in z order).
  """
  if num_examples < 1:
    raise ValueError(f"num_examples={num_examples} must be >= 1")
  if image_size < 8:
    raise ValueError(f"image_size={image_size} must be >= 8")
  rng = np.random.default_rng(seed)
  counts = rng.integers(MIN_SLICES, MAX_SLICES + 1, size=num_examples)
  counts = counts[:int(np.searchsorted(np.cumsum(counts), num_examples)) + 1]
  counts[-1] -= counts.sum() - num_examples
  owner = np.repeat(np.arange(len(counts)), counts)
  p = {k: v[owner] for k, v in _patient_params(rng, counts).items()}
  first = np.concatenate([[0], np.cumsum(counts)[:-1]])
  p["z"] = p["z0"] + SLICE_STEP * (np.arange(num_examples) - first[owner])
  images, masks = _render(rng, p, image_size)
  return ImageDataset(images=images[..., None], labels=masks,
                      patient_ids=owner.astype(np.int64), class_names=CLASS_NAMES,
                      name=NAME, mean=MEAN, std=STD)


def _patient_params(rng: np.random.Generator, counts: np.ndarray) -> dict:
  """Anatomy of each patient (arrays of length num_patients)."""
  n = len(counts)
  u = lambda lo, hi, size=n: rng.uniform(lo, hi, size)
  lesions = (rng.uniform(size=n) < LESION_FRACTION)[:, None] & (
      np.arange(2)[None, :] < rng.integers(1, 3, n)[:, None])
  span = SLICE_STEP * (counts - 1)
  return dict(
      z0=rng.uniform(-0.85, 0.85 - span), body_rx=u(0.78, 0.92), body_ry=u(0.55, 0.68),
      liver_cx=u(-0.42, -0.28), liver_cy=u(-0.12, 0.02), liver_rx=u(0.34, 0.46),
      liver_ry=u(0.34, 0.46), liver_angle=u(-0.5, 0.5), spleen_cx=u(0.42, 0.55),
      spleen_cy=u(0.05, 0.2), lesion=lesions,
      # lesion centres relative to the liver's centre and radii, z, radius
      lesion_dx=u(-0.5, 0.5, (n, 2)), lesion_dy=u(-0.5, 0.5, (n, 2)),
      lesion_z=u(-0.5, 0.5, (n, 2)), lesion_r=u(*LESION_RADIUS, (n, 2)),
      exposure=u(0.95, 1.05))


def _ellipse(x, y, cx, cy, rx, ry, angle=0.0):
  """Squared normalised radius of each pixel in an ellipse (< 1 inside)."""
  c, s = np.cos(angle), np.sin(angle)
  dx, dy = x - cx, y - cy
  return ((c * dx + s * dy) / rx) ** 2 + ((-s * dx + c * dy) / ry) ** 2


def _render(rng: np.random.Generator, p: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Images uint8 `[N, S, S]` and masks int32 `[N, S, S]` of per-slice params `p`."""
  col = lambda a: np.asarray(a, np.float32)[:, None, None]
  grid = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
  y, x = np.meshgrid(grid, grid, indexing="ij")
  x, y = x[None], y[None]
  soft = lambda r2, width=0.08: 1 / (1 + np.exp(np.minimum((r2 - 1) / width, 50)))  # soft edge
  body = _ellipse(x, y, 0.0, 0.05, col(p["body_rx"]), col(p["body_ry"]))
  img = _AIR + (_FAT - _AIR) * soft(body) + (_TISSUE - _FAT) * soft(body / 0.85 ** 2)
  img = img + (_BONE - _TISSUE) * soft(_ellipse(x, y, 0.0, 0.45, 0.11, 0.11))
  img = img + (_BONE - _TISSUE) * 0.8 * soft(_ellipse(x, y, 0.0, 0.25, 0.06, 0.06))
  spleen = _ellipse(x, y, col(p["spleen_cx"]), col(p["spleen_cy"]), 0.14, 0.2)
  img = img + (_SPLEEN - _TISSUE) * soft(spleen)
  scale = np.sqrt(np.clip(1 - p["z"] ** 2, 0.05, 1))  # ellipsoid cross-section
  liver = _ellipse(x, y, col(p["liver_cx"]), col(p["liver_cy"]),
                   col(p["liver_rx"] * scale), col(p["liver_ry"] * scale),
                   col(p["liver_angle"]))
  img = img + (_LIVER - _TISSUE) * soft(liver)
  in_lesion = np.zeros_like(liver, dtype=bool)
  for j in range(2):
    half = p["lesion_r"][:, j] ** 2 - (p["z"] - p["lesion_z"][:, j]) ** 2
    radius = np.sqrt(np.clip(half, 1e-6, None)) * (p["lesion"][:, j] & (half > 0))
    cx = p["liver_cx"] + p["lesion_dx"][:, j] * p["liver_rx"] * scale
    cy = p["liver_cy"] + p["lesion_dy"][:, j] * p["liver_ry"] * scale
    r2 = _ellipse(x, y, col(cx), col(cy), col(radius + 1e-6), col(radius + 1e-6))
    img = img + (_LESION - _LIVER) * soft(r2, 0.15) * soft(liver)
    in_lesion |= r2 < 1
  mask = np.where(liver < 1, 1, 0)
  mask = np.where(in_lesion & (mask == 1), 2, mask).astype(np.int32)
  img = img * col(p["exposure"]) + 0.025 * rng.standard_normal(img.shape)
  return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8), mask
