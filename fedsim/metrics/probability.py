"""Metrics of the predicted probabilities themselves: accuracy, log loss, calibration."""

from __future__ import annotations

from typing import Optional

import numpy as np
from numpy.typing import ArrayLike

from fedsim.metrics._inputs import prepare, safe_div


def accuracy(
    probs: ArrayLike, labels: ArrayLike, mask: Optional[ArrayLike] = None
) -> float:
  """Fraction of unmasked examples whose argmax is the label (NaN if none).

  Example:
    >>> probs = np.array([[.9, .1], [.2, .8], [.6, .4]])
    >>> accuracy(probs, np.array([0, 1, 1]), mask=np.array([True, True, False]))
    1.0
  """
  probs, labels, mask = prepare(probs, labels, mask)
  correct = (probs.argmax(-1) == labels) & mask
  return float(safe_div(correct.sum(), mask.sum()))


def log_loss(
    probs: ArrayLike, labels: ArrayLike, mask: Optional[ArrayLike] = None
) -> float:
  """Mean negative log-probability of the true class (natural log).

  Probabilities are clipped below at float64 machine epsilon, as scikit-learn
  does, so a confident mistake costs about 36 nats, not infinity.
  """
  probs, labels, mask = prepare(probs, labels, mask)
  p_true = np.take_along_axis(probs, labels[..., None], -1)[..., 0]
  nll = -np.log(np.clip(p_true, np.finfo(np.float64).eps, None))
  return float(safe_div(np.where(mask, nll, 0.0).sum(), mask.sum()))


def expected_calibration_error(
    probs: ArrayLike,
    labels: ArrayLike,
    num_bins: int = 15,
    mask: Optional[ArrayLike] = None,
) -> float:
  """Top-label expected calibration error with equal-width confidence bins.

  ECE = sum_b (n_b / N) |accuracy_b - mean confidence_b|, where the confidence
  is the top probability and bin b covers `((b - 1) / B, b / B]` (bin 1 also
  takes a confidence of exactly 0).

  Args:
    probs: `[N, C]` predicted probabilities.
    labels: int `[N]` true classes.
    num_bins: B, number of equal-width bins on [0, 1].
    mask: optional bool `[N]`; False entries are ignored.

  Returns:
    ECE in [0, 1]; NaN when no example is unmasked.

  Example:
    >>> probs = np.array([[.8, .2], [.6, .4]])  # mean confidence .7, accuracy .5
    >>> round(expected_calibration_error(probs, np.array([0, 1]), num_bins=1), 6)
    0.2
  """
  if num_bins < 1:
    raise ValueError(f"num_bins={num_bins} must be >= 1")
  probs, labels, mask = prepare(probs, labels, mask)
  confidence = probs.max(-1)
  correct = (probs.argmax(-1) == labels).astype(np.float64)
  bins = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0,
                 num_bins - 1)
  weights = mask.astype(np.float64)
  count = np.bincount(bins.ravel(), weights.ravel(), minlength=num_bins)
  conf_sum = np.bincount(bins.ravel(), (weights * confidence).ravel(),
                         minlength=num_bins)
  acc_sum = np.bincount(bins.ravel(), (weights * correct).ravel(),
                        minlength=num_bins)
  return float(safe_div(np.abs(acc_sum - conf_sum).sum(), count.sum()))
