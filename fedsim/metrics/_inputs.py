"""Input checks and NaN-safe arithmetic shared by the metrics (numpy, host)."""

from __future__ import annotations

from typing import Optional

import numpy as np
from numpy.typing import ArrayLike


def prepare(
    probs: ArrayLike, labels: ArrayLike, mask: Optional[ArrayLike]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Validates and sanitises `probs [..., N, C]`, `labels [..., N]`, `mask`.

  Padded entries get uniform probabilities and label 0, so later arithmetic
  never sees their junk (NaN, -1 labels, ...); every metric still weights them
  by the mask.

  Returns:
    `(probs float64 [..., N, C], labels int64 [..., N], mask bool [..., N])`.
  """
  probs = np.asarray(probs, dtype=np.float64)
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  if probs.ndim < 2:
    raise ValueError(f"probs must be [..., N, C], got shape {probs.shape}")
  if labels.shape != probs.shape[:-1]:
    raise ValueError(
        f"labels shape {labels.shape} must equal probs shape without the class "
        f"axis {probs.shape[:-1]}")
  if mask is None:
    mask = np.ones(labels.shape, dtype=bool)
  else:
    mask = np.asarray(mask).astype(bool)
    if mask.shape != labels.shape:
      raise ValueError(
          f"mask shape {mask.shape} must equal labels shape {labels.shape}")
  num_classes = probs.shape[-1]
  labels = np.where(mask, labels, 0).astype(np.int64)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
        f"labels of unmasked examples must lie in [0, {num_classes}), got "
        f"range [{labels.min()}, {labels.max()}]")
  probs = np.where(mask[..., None], probs, 1.0 / num_classes)
  if not np.all(np.isfinite(probs)):
    raise ValueError("probs of unmasked examples must be finite")
  return probs, labels, mask


def safe_div(num: ArrayLike, den: ArrayLike) -> np.ndarray:
  """`num / den` elementwise, NaN where `den == 0`, without warnings."""
  num = np.asarray(num, dtype=np.float64)
  den = np.asarray(den, dtype=np.float64)
  out = np.full(np.broadcast(num, den).shape, np.nan)
  np.divide(num, den, out=out, where=den != 0)
  return out


def nanmean(x: np.ndarray, axis: int = -1) -> np.ndarray:
  """`np.nanmean` that returns NaN for all-NaN slices without a warning."""
  valid = ~np.isnan(x)
  return safe_div(np.where(valid, x, 0.0).sum(axis), valid.sum(axis))
