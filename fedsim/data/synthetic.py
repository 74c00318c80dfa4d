"""Synthetic paediatric chest X-rays in three classes: normal, bacterial, viral.

A deterministic, vectorised numpy generator that stands in for the pneumonia data
when no real data is at hand (tests, default config, benchmarks). Each image is a
frontal chest film: dark air outside the body, a soft-tissue thorax, two darker
lung fields crossed by bright rib bands, a heart shadow and lung texture.

* normal: clear lungs (sometimes a faint nuisance shadow).
* bacterial: one localised dense consolidation in one lung (random side, lobe,
  size and density; some are faint).
* viral: diffuse, bilateral, patchy and streaky perihilar opacity (random
  density; some are faint or lopsided).

Lesion densities overlap with the anatomy and noise (some lesions are faint, some
normal films carry a faint shadow), so a small CNN learns the task well but not
perfectly: the conv16-pool-conv32-pool-dense64-dense3 CNN trained centrally with
Adam on 6,000 images (28x28) reaches about 82% test accuracy after 12 epochs (85%
with 24,000 images); the majority class alone gives 47%.

Patients have 1-4 images: the same anatomy, label and lesion, with a fresh small
jitter (shift, scale, exposure) and fresh detector noise per image.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from fedsim.data.base import ImageDataset

CLASS_NAMES = ("normal", "bacterial", "viral")
NAME = "synthetic_cxr"
# Class proportions of the Kermany et al. paediatric chest X-ray set (1583 normal,
# 2780 bacterial, 1493 viral images).
DEFAULT_PREVALENCE = (0.27, 0.47, 0.26)
# Pixel statistics of pixel/255 for this generator at the default prevalence,
# measured once on 100k 28x28 images (a public constant of the generator, not of
# any data; larger sizes differ by about 0.01).
MEAN = 0.342
STD = 0.220

_MAX_IMAGES_PER_PATIENT = 4
_GRID = 7  # control points per side of the smooth random fields
_CHUNK_PIXELS = 1 << 20  # pixels rendered at once (keeps temporaries in cache)


def generate(*, num_examples: int, image_size: int = 28, seed: int = 0,
             prevalence: Optional[Sequence[float]] = None) -> ImageDataset:
  """Generates `num_examples` synthetic chest X-rays.

  Args:
    num_examples: number of images N (>= 1).
    image_size: side S of the square images (>= 8).
    seed: the same seed gives the same images, bit for bit.
    prevalence: class proportions (normal, bacterial, viral) of the patients;
      default `DEFAULT_PREVALENCE`.

  Returns:
    An `ImageDataset` with uint8 images `[N, S, S, 1]`, int32 labels, int64
    patient ids (consecutive images of one patient), `mean=MEAN`, `std=STD`.
  """
  prevalence = _check_args(num_examples, image_size, prevalence)
  rng = np.random.default_rng(seed)
  counts = _images_per_patient(rng, num_examples)
  num_patients = len(counts)
  labels = rng.choice(len(CLASS_NAMES), size=num_patients, p=prevalence)
  patient = _patient_params(rng, labels)
  owner = np.repeat(np.arange(num_patients), counts)
  per_image = {k: v[owner] for k, v in patient.items()}
  per_image.update(_image_params(rng, num_examples))
  chunk = max(1, _CHUNK_PIXELS // image_size ** 2)
  images = np.concatenate([
      _render(rng, {k: v[i:i + chunk] for k, v in per_image.items()}, image_size)
      for i in range(0, num_examples, chunk)])
  return ImageDataset(
      images=images[..., None],
      labels=labels[owner].astype(np.int32),
      patient_ids=owner.astype(np.int64),
      class_names=CLASS_NAMES, name=NAME, mean=MEAN, std=STD)


def _check_args(num_examples: int, image_size: int,
                prevalence: Optional[Sequence[float]]) -> np.ndarray:
  """Validates the arguments; returns the prevalence as a probability vector."""
  if num_examples < 1:
    raise ValueError(f"num_examples={num_examples} must be >= 1")
  if image_size < 8:
    raise ValueError(f"image_size={image_size} must be >= 8")
  p = np.asarray(DEFAULT_PREVALENCE if prevalence is None else prevalence, np.float64)
  if p.shape != (len(CLASS_NAMES),) or np.any(p < 0) or p.sum() <= 0:
    raise ValueError(f"prevalence={prevalence} must be {len(CLASS_NAMES)} "
                     "non-negative weights with a positive sum")
  return p / p.sum()


def _images_per_patient(rng: np.random.Generator, num_examples: int) -> np.ndarray:
  """Images of each patient (1-4, mean 2.5), summing exactly to `num_examples`."""
  counts = rng.integers(1, _MAX_IMAGES_PER_PATIENT + 1, size=num_examples)
  total = np.cumsum(counts)
  last = int(np.searchsorted(total, num_examples))
  counts = counts[:last + 1].copy()
  counts[-1] -= total[last] - num_examples
  return counts


def _patient_params(rng: np.random.Generator, labels: np.ndarray) -> dict:
  """Per-patient anatomy and lesion parameters, each an array `[P]` or `[P, ...]`."""
  p = len(labels)
  u = lambda lo, hi, shape=(): rng.uniform(lo, hi, size=(p,) + shape).astype(np.float32)
  n = lambda sd: (sd * rng.standard_normal(p)).astype(np.float32)
  bacterial, viral = labels == 1, labels == 2
  side = np.where(rng.random(p) < 0.5, -1.0, 1.0).astype(np.float32)
  params = dict(
      body=0.55 + n(0.05), lung=0.22 + n(0.04), lung_dx=0.42 + n(0.03),
      lung_y=-0.05 + n(0.04), lung_rx=0.30 + n(0.025), lung_ry=0.55 + n(0.04),
      heart=0.22 + n(0.03), rib_amp=0.09 + n(0.02), rib_freq=u(3.5, 4.5),
      rib_phase=u(0, 2 * np.pi), rib_bend=u(0.3, 0.7), texture_amp=u(0.02, 0.05),
      texture=rng.standard_normal((p, _GRID, _GRID)).astype(np.float32),
      patches=rng.standard_normal((p, _GRID, _GRID)).astype(np.float32))
  # Bacterial: one blob inside one lung; normal: a faint nuisance shadow 30% of
  # the time (vessel, nipple shadow); viral: none.
  blob = np.where(bacterial, u(0.08, 0.50),
                  np.where(labels == 0, (rng.random(p) < 0.3) * u(0.0, 0.08), 0.0))
  params.update(
      blob=blob.astype(np.float32),
      blob_x=side * (params["lung_dx"] + u(-0.6, 0.6) * params["lung_rx"]),
      blob_y=params["lung_y"] + u(-0.6, 0.6) * params["lung_ry"],
      blob_r=u(0.10, 0.24))
  # Viral: diffuse bilateral opacity; a few are lopsided (one lung denser).
  params.update(
      diffuse=np.where(viral, u(0.08, 0.40), 0.0).astype(np.float32),
      diffuse_tilt=np.where(viral, n(0.35), 0.0).astype(np.float32),
      streak_freq=u(10.0, 18.0), streak_angle=u(0, np.pi),
      streak_phase=u(0, 2 * np.pi))
  return params


def _image_params(rng: np.random.Generator, n: int) -> dict:
  """Per-image jitter and acquisition noise, each `[N]`."""
  f = lambda a: a.astype(np.float32)
  return dict(shift_x=f(rng.normal(0, 0.03, n)), shift_y=f(rng.normal(0, 0.03, n)),
              zoom=f(1 + rng.normal(0, 0.02, n)), gain=f(1 + rng.normal(0, 0.04, n)),
              noise=f(rng.uniform(0.03, 0.06, n)))


def _smooth_field(grid: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
  """Bilinear interpolation of `grid` `[N, G, G]` at coordinates in [-1, 1].

  Args:
    grid: control values on a regular G x G lattice spanning [-1, 1]^2.
    xs: `[N, S]` column coordinates; ys: `[N, S]` row coordinates.

  Returns:
    `[N, S, S]` field, smooth and separable (two batched matmuls).
  """
  g = grid.shape[-1]
  knots = np.linspace(-1, 1, g, dtype=np.float32)
  step = knots[1] - knots[0]
  tent = lambda c: np.maximum(0, 1 - np.abs(c[..., None] - knots) / step)
  return tent(ys) @ grid @ np.swapaxes(tent(xs), 1, 2)


def _col(a: np.ndarray) -> np.ndarray:
  """Per-image parameters `[N]` as `[N, 1, 1]`, to broadcast over pixels."""
  return a[:, None, None]


def _ellipse(x, y, cx, cy, rx, ry, softness):
  """Soft indicator of an ellipse, a linear ramp about `softness` wide at the edge.

  Args:
    x: `[N, 1, S]` column coordinates; y: `[N, S, 1]` row coordinates.
    cx, cy, rx, ry: centre and radii, scalars or `[N, 1, 1]`.
    softness: edge half-width in units of the radius.

  Returns:
    `[N, S, S]` values in [0, 1] (1 inside).
  """
  quad = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
  return np.clip((1 - quad) / (4 * softness) + 0.5, 0, 1)


def _cos_sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """cos(a + b) for `a` `[N, S, 1]` and `b` `[N, 1, S]`, separably (no [N, S, S] cos)."""
  return np.cos(a) * np.cos(b) - np.sin(a) * np.sin(b)


def _render(rng: np.random.Generator, q: dict, size: int) -> np.ndarray:
  """Draws images from per-image parameters; returns uint8 `[N, S, S]`."""
  n = len(q["zoom"])
  base = np.linspace(-1, 1, size, dtype=np.float32)
  xs = (base[None, :] - q["shift_x"][:, None]) / q["zoom"][:, None]
  ys = (base[None, :] - q["shift_y"][:, None]) / q["zoom"][:, None]
  x, y = xs[:, None, :], ys[:, :, None]
  soft = max(1.0 / size, 0.01)  # edges about one pixel wide at any size
  body = _ellipse(x, y, 0, 0.1, 0.92, 1.05, soft)
  heart = _ellipse(x, y, 0.12, 0.32, 0.26, 0.22, 2 * soft)
  lungs = [_ellipse(x, y, s * _col(q["lung_dx"]), _col(q["lung_y"]), _col(q["lung_rx"]),
                    _col(q["lung_ry"]), 2 * soft) for s in (-1, 1)]
  lung = (lungs[0] + lungs[1]) * (1 - heart)
  # Ribs: bright bands curving down towards the sides, only seen over the lungs.
  freq = np.pi * _col(q["rib_freq"])
  ribs = 0.5 + 0.5 * _cos_sum(2 * freq * y + 2 * _col(q["rib_phase"]),
                              2 * freq * _col(q["rib_bend"]) * x ** 2)
  fields = _smooth_field(np.stack([q["texture"], q["patches"]], 1).reshape(
      2 * n, _GRID, _GRID), np.repeat(xs, 2, 0), np.repeat(ys, 2, 0)).reshape(
          n, 2, size, size)
  inside = (_col(q["rib_amp"]) * ribs + _col(q["texture_amp"]) * fields[:, 0]
            + _consolidation(q, x, y, fields[:, 1])
            + _diffuse(q, lungs, x, y, fields[:, 1]))
  img = 0.05 + body * (_col(q["body"]) - 0.05 + 0.3 * _col(q["heart"]) * heart)
  img += lung * (inside - (_col(q["body"]) - _col(q["lung"])))
  img *= _col(q["gain"])
  img += _col(q["noise"]) * rng.standard_normal((n, size, size), dtype=np.float32)
  return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def _consolidation(q: dict, x: np.ndarray, y: np.ndarray,
                   patches: np.ndarray) -> np.ndarray:
  """Bacterial lobar consolidation: a dense, irregular blob `[N, S, S]`."""
  r2 = 2 * _col(q["blob_r"]) ** 2
  gx = np.exp(-(x - _col(q["blob_x"])) ** 2 / r2)
  gy = _col(q["blob"]) * np.exp(-(y - _col(q["blob_y"])) ** 2 / r2)
  return gy * gx * (1 + 0.3 * patches)


def _diffuse(q: dict, lungs: list, x: np.ndarray, y: np.ndarray,
             patches: np.ndarray) -> np.ndarray:
  """Viral interstitial pattern: patchy, streaky, perihilar, both lungs `[N, S, S]`."""
  theta = _col(q["streak_angle"])
  freq = _col(q["streak_freq"])
  streaks = 0.5 + 0.5 * _cos_sum(freq * np.sin(theta) * y + _col(q["streak_phase"]),
                                 freq * np.cos(theta) * x)
  tilt = _col(q["diffuse_tilt"])
  hilum = _col(q["diffuse"]) * (0.5 + np.exp(-np.abs(x) / 0.6))
  sides = np.clip((1 + tilt) * lungs[0] + (1 - tilt) * lungs[1], 0, 2)
  return np.clip(0.6 + 0.6 * patches, 0, 1.5) * streaks * hilum * sides
