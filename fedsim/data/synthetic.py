"""Synthetic paediatric chest X-rays in three classes: normal, bacterial, viral.

A deterministic, vectorised numpy generator that stands in for the pneumonia data
when no real data is at hand (tests, default config, benchmarks). Each image is a
frontal chest film: dark air outside the body, a soft-tissue thorax, two darker
lung fields crossed by bright rib bands, a heart shadow and fine lung texture.

The class signs are large and spatially consistent, the way they look on a film
(and the way a small CNN can pick them up through clipped, noised gradients):

* normal: clear, symmetric lungs; a quarter carry a small faint nuisance shadow
  (a vessel, a nipple shadow).
* bacterial: lobar consolidation: one dense, nearly uniform opacity filling a
  lobe of ONE lung (random side, upper / middle / lower zone), so the two lungs
  differ strongly in density.
* viral: interstitial pneumonia: BOTH lungs hazier than normal, most in the
  perihilar zones, with a reticular (net-like) texture; symmetric.

Hard cases keep the task below perfect: `HARD_FRACTION` of the pneumonia patients
have subtle disease (a faint lesion that is easily read as normal), bacterial
consolidation is bilateral in `BILATERAL_FRACTION` of the bacterial patients (it
then resembles viral haze) and viral haze is lopsided in some viral patients.
Anatomy, exposure and detector noise vary per patient and per image, and
`fedsim/data/shift.py` adds each hospital's scanner on top.

What a small CNN reaches, centralised and non-private (`python -m
benchmarks.synthetic_ceiling`: the default federation's 10 seen hospitals pooled,
9,793 training images at 28x28, batch 64, balanced accuracy on their 2,753 test
images; 2-core CPU): the tanh CNN with momentum 0.9, lr 0.02 passes 0.90 after
~125 steps, 0.93 after 200 and levels off at 0.95-0.96 (1,500 steps); plain SGD,
lr 0.1, passes 0.90 after ~175 steps, less smoothly. The majority class alone gives
0.49 accuracy (balanced: 0.33). At 16x16 the same runs reach about 0.89 in 300 steps.

Patients have 1-4 images (mean 2.5): the same anatomy, label and lesion, with a
fresh small jitter (shift, scale, exposure) and fresh detector noise per image.
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
MEAN = 0.339
STD = 0.218
# Fractions of hard cases (see the module docstring).
HARD_FRACTION = 0.06        # pneumonia patients with subtle disease
BILATERAL_FRACTION = 0.05   # bacterial patients whose consolidation is in both lungs
NUISANCE_FRACTION = 0.25    # normal patients with a faint nuisance shadow

MAX_IMAGES_PER_PATIENT = 4
_GRID = 7  # control points per side of the smooth random fields
_CHUNK_PIXELS = 1 << 16  # pixels rendered at once (cache-sized: 2x faster than 1 << 20)


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
  return render_patients(rng, _images_per_patient(rng, num_examples),
                         image_size=image_size, prevalence=prevalence)


def render_patients(rng: np.random.Generator, counts: np.ndarray, *, image_size: int,
                    prevalence: np.ndarray) -> ImageDataset:
  """Patients with `counts` `[P]` images each (>= 1), drawn from `rng` (`generate`'s body).

  Labels follow `prevalence` (a probability vector); patient ids are `0..P-1`. Used by
  `generate` and by the on-demand population (fedsim/data/population.py), which fixes
  each hospital's patients itself.
  """
  num_examples, num_patients = int(np.sum(counts)), len(counts)
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
  counts = rng.integers(1, MAX_IMAGES_PER_PATIENT + 1, size=num_examples)
  total = np.cumsum(counts)
  last = int(np.searchsorted(total, num_examples))
  counts = counts[:last + 1].copy()
  counts[-1] -= total[last] - num_examples
  return counts


def _patient_params(rng: np.random.Generator, labels: np.ndarray) -> dict:
  """Per-patient anatomy and disease parameters, each an array `[P]` or `[P, G, G]`.

  Every draw is made for every patient (then masked by class), so the random
  stream, and hence the images, depend only on the seed and the patient count.
  """
  p = len(labels)
  u = lambda lo, hi: rng.uniform(lo, hi, size=p).astype(np.float32)
  n = lambda sd: (sd * rng.standard_normal(p)).astype(np.float32)
  f = lambda a: np.asarray(a, np.float32)
  normal, bacterial, viral = labels == 0, labels == 1, labels == 2
  anatomy = dict(
      body=0.55 + n(0.04), lung=0.20 + n(0.02), lung_dx=0.42 + n(0.025),
      lung_y=-0.05 + n(0.03), lung_rx=0.30 + n(0.02), lung_ry=0.55 + n(0.03),
      heart=0.22 + n(0.03), rib_amp=0.06 + n(0.015), rib_freq=u(3.5, 4.5),
      rib_phase=u(0, 2 * np.pi), rib_bend=u(0.3, 0.7), texture_amp=u(0.015, 0.035),
      texture=rng.standard_normal((p, _GRID, _GRID)).astype(np.float32),
      patches=rng.standard_normal((p, _GRID, _GRID)).astype(np.float32))
  # Severity: most pneumonias are plain to see, HARD_FRACTION are subtle.
  hard = rng.random(p) < HARD_FRACTION
  severity = np.where(hard, u(0.08, 0.35), u(0.6, 1.0))
  # Bacterial: a flat-topped blob in one lobe of one lung (bilateral in a few);
  # normal: a small faint nuisance shadow in NUISANCE_FRACTION of them.
  side = np.where(rng.random(p) < 0.5, -1.0, 1.0).astype(np.float32)
  lobe = rng.integers(-1, 2, size=p).astype(np.float32)  # upper, middle, lower zone
  nuisance = normal & (rng.random(p) < NUISANCE_FRACTION)
  bilateral = bacterial & (rng.random(p) < BILATERAL_FRACTION)
  cons = dict(
      cons=f(np.where(bacterial, severity * u(0.28, 0.38),
                      np.where(nuisance, u(0.03, 0.08), 0.0))),
      cons_x=side * (anatomy["lung_dx"] + u(-0.25, 0.25) * anatomy["lung_rx"]),
      cons_y=anatomy["lung_y"] + (0.45 * lobe + u(-0.12, 0.12)) * anatomy["lung_ry"],
      cons_r=f(np.where(nuisance, u(0.07, 0.11), u(0.22, 0.32))),
      cons_other=f(np.where(bilateral, u(0.6, 1.0), 0.0)))
  # Viral: bilateral perihilar haze with a reticular net; lopsided in a few.
  haze = dict(
      haze=f(np.where(viral, severity * u(0.16, 0.24), 0.0)),
      reticular=f(np.where(viral, severity * u(0.08, 0.12), 0.0)),
      haze_tilt=f(np.where(viral, np.clip(n(0.25), -0.8, 0.8), 0.0)),
      net_freq=u(13.0, 17.0), net_angle=u(0.5, 1.1),
      net_phase=u(0, 2 * np.pi), net_phase2=u(0, 2 * np.pi))
  return dict(anatomy, **cons, **haze)


def _image_params(rng: np.random.Generator, n: int) -> dict:
  """Per-image jitter and acquisition noise, each `[N]`."""
  f = lambda a: a.astype(np.float32)
  return dict(shift_x=f(rng.normal(0, 0.03, n)), shift_y=f(rng.normal(0, 0.03, n)),
              zoom=f(1 + rng.normal(0, 0.02, n)), gain=f(1 + rng.normal(0, 0.03, n)),
              noise=f(rng.uniform(0.02, 0.045, n)))


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
                    _col(q["lung_ry"]), 2 * soft) * (1 - heart) for s in (-1, 1)]
  # Ribs: bright bands curving down towards the sides, only seen over the lungs.
  freq = np.pi * _col(q["rib_freq"])
  ribs = 0.5 + 0.5 * _cos_sum(2 * freq * y + 2 * _col(q["rib_phase"]),
                              2 * freq * _col(q["rib_bend"]) * x ** 2)
  fields = _smooth_field(np.stack([q["texture"], q["patches"]], 1).reshape(
      2 * n, _GRID, _GRID), np.repeat(xs, 2, 0), np.repeat(ys, 2, 0)).reshape(
          n, 2, size, size)
  lung = lungs[0] + lungs[1]
  inside = _col(q["rib_amp"]) * ribs + _col(q["texture_amp"]) * fields[:, 0]
  img = 0.05 + body * (_col(q["body"]) - 0.05 + 0.3 * _col(q["heart"]) * heart)
  img += lung * (inside - (_col(q["body"]) - _col(q["lung"])))
  img += _consolidation(q, lungs, x, y, fields[:, 1])
  img += _interstitial(q, lungs, x, y, fields[:, 1])
  img *= _col(q["gain"])
  img += _col(q["noise"]) * rng.standard_normal((n, size, size), dtype=np.float32)
  return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def _consolidation(q: dict, lungs: list, x: np.ndarray, y: np.ndarray,
                   patches: np.ndarray) -> np.ndarray:
  """Lobar consolidation `[N, S, S]`: a dense, flat-topped blob confined to the lung.

  The blob sits in the lung on the side of `cons_x`; with `cons_other > 0` its
  mirror image (weight `cons_other`) fills the same zone of the other lung.
  """
  right = _col((q["cons_x"] > 0).astype(np.float32))
  other = _col(q["cons_other"])
  mirrored = np.where(other > 0, np.abs(x) * np.sign(_col(q["cons_x"])), x)
  r2 = (((mirrored - _col(q["cons_x"])) ** 2 + (y - _col(q["cons_y"])) ** 2)
        / _col(q["cons_r"]) ** 2)
  blob = np.exp(-r2 * r2)  # flat top, soft edge
  same = right * lungs[1] + (1 - right) * lungs[0]
  where = same + other * (lungs[0] + lungs[1] - same)
  return _col(q["cons"]) * blob * where * (1 + 0.15 * patches)


def _interstitial(q: dict, lungs: list, x: np.ndarray, y: np.ndarray,
                  patches: np.ndarray) -> np.ndarray:
  """Viral pattern `[N, S, S]`: perihilar haze and a reticular net in both lungs."""
  f, a = _col(q["net_freq"]), _col(q["net_angle"])
  fy, fx = f * np.sin(a), f * np.cos(a)
  net = 0.5 + 0.25 * (_cos_sum(fy * y + _col(q["net_phase"]), fx * x)
                      + _cos_sum(-fy * y + _col(q["net_phase2"]), fx * x))
  tilt = _col(q["haze_tilt"])
  sides = (1 + tilt) * lungs[0] + (1 - tilt) * lungs[1]
  perihilar = 0.7 + 0.6 * np.exp(-np.abs(x) / 0.45)
  density = _col(q["haze"]) * perihilar * (0.8 + 0.3 * patches) + _col(q["reticular"]) * net
  return density * sides
