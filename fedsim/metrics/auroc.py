"""One-vs-rest AUROC (Mann-Whitney ranks, ties counted one half), padding-aware."""

from __future__ import annotations

from typing import Optional

import numpy as np
from numpy.typing import ArrayLike

from fedsim.metrics._inputs import nanmean, prepare, safe_div


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks along the last axis, ties sharing their average rank."""
  n = x.shape[-1]
  order = np.argsort(x, axis=-1, kind="stable")
  xs = np.take_along_axis(x, order, axis=-1)
  idx = np.broadcast_to(np.arange(n), x.shape)
  starts = np.ones(x.shape, dtype=bool)
  starts[..., 1:] = xs[..., 1:] != xs[..., :-1]
  ends = np.ones(x.shape, dtype=bool)
  ends[..., :-1] = starts[..., 1:]
  first = np.maximum.accumulate(np.where(starts, idx, 0), axis=-1)
  last = np.flip(np.minimum.accumulate(
      np.flip(np.where(ends, idx, n - 1), -1), axis=-1), -1)
  ranks = np.empty(x.shape, dtype=np.float64)
  np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=-1)
  return ranks


def batched_auroc(
    probs: np.ndarray, labels: np.ndarray, mask: np.ndarray
) -> np.ndarray:
  """One-vs-rest AUROC `[..., C]` of sanitised `[..., N, C]` inputs.

  Mann-Whitney: AUROC_c = (R_c - P_c (P_c + 1) / 2) / (P_c * Q_c), with R_c the
  sum of the (average) ranks of class c's scores over its positives, among the
  unmasked examples; P_c, Q_c the numbers of positives and negatives. Padded
  entries get score +inf, so they rank after every real one and leave the real
  ranks untouched.
  """
  num_classes = probs.shape[-1]
  scores = np.where(mask[..., None], probs, np.inf)
  ranks = _average_ranks(np.swapaxes(scores, -1, -2))  # [..., C, N]
  positive = (labels[..., None, :] == np.arange(num_classes)[:, None]) & (
      mask[..., None, :])  # [..., C, N]
  num_pos = positive.sum(-1).astype(np.float64)
  num_neg = mask.sum(-1, keepdims=True) - num_pos
  rank_sum = np.where(positive, ranks, 0.0).sum(-1)
  return safe_div(rank_sum - num_pos * (num_pos + 1) / 2, num_pos * num_neg)


def auroc_ovr(
    probs: ArrayLike, labels: ArrayLike, mask: Optional[ArrayLike] = None
) -> np.ndarray:
  """One-vs-rest AUROC of each class, ties counted as one half.

  Args:
    probs: `[N, C]` predicted class probabilities (any score works: only the
      order within each column matters).
    labels: int `[N]` true classes.
    mask: optional bool `[N]`; False entries are ignored.

  Returns:
    float64 `[C]`; NaN for a class with no positives or no negatives among the
    unmasked examples.

  Example:
    >>> probs = np.array([[.7, .3], [.4, .6], [.4, .6], [.2, .8]])
    >>> auroc_ovr(probs, np.array([0, 0, 1, 1]))  # one tie counts 1/2
    array([0.875, 0.875])
  """
  probs, labels, mask = prepare(probs, labels, mask)
  if probs.ndim != 2:
    raise ValueError(f"probs must be [N, C], got {probs.shape}")
  return batched_auroc(probs, labels, mask)


def macro_auroc(
    probs: ArrayLike, labels: ArrayLike, mask: Optional[ArrayLike] = None
) -> float:
  """Mean one-vs-rest AUROC over the classes where it is defined (else NaN)."""
  return float(nanmean(auroc_ovr(probs, labels, mask)))
