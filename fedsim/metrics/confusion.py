"""Confusion matrices and the metrics read from them: sensitivity, specificity,
balanced accuracy, MCC, F1.

Matrices have true classes on rows and predicted classes on columns
(scikit-learn's orientation); every metric here accepts leading batch axes
(`cm [..., C, C]`), which is how `per_hospital` evaluates all hospitals at once.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from numpy.typing import ArrayLike

from fedsim.metrics._inputs import nanmean, safe_div


def batched_confusion_matrix(
    labels: np.ndarray, preds: np.ndarray, mask: np.ndarray, num_classes: int
) -> np.ndarray:
  """Confusion matrices `[..., C, C]` of sanitised `[..., N]` arrays."""
  batch_shape = labels.shape[:-1]
  batch = int(np.prod(batch_shape, dtype=np.int64))
  cell = labels * num_classes + preds
  flat = (np.arange(batch).reshape(batch_shape + (1,)) * num_classes**2 + cell)
  counts = np.bincount(
      flat[mask], minlength=batch * num_classes**2).astype(np.int64)
  return counts.reshape(batch_shape + (num_classes, num_classes))


def confusion_matrix(
    labels: ArrayLike,
    preds: ArrayLike,
    num_classes: int,
    mask: Optional[ArrayLike] = None,
) -> np.ndarray:
  """Counts of (true class, predicted class) pairs.

  Args:
    labels: int `[N]` true classes.
    preds: int `[N]` predicted classes.
    num_classes: C.
    mask: optional bool `[N]`; False entries (padding) are not counted.

  Returns:
    int64 `[C, C]`, `cm[i, j]` = number of unmasked examples of true class i
    predicted as j (scikit-learn's orientation).

  Example:
    >>> confusion_matrix(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 2)
    array([[1, 1],
           [0, 2]])
  """
  labels = np.asarray(labels)
  preds = np.asarray(preds)
  if labels.ndim != 1 or preds.shape != labels.shape:
    raise ValueError(
        f"labels and preds must both be [N], got {labels.shape}, {preds.shape}")
  mask = (np.ones(labels.shape, bool) if mask is None
          else np.asarray(mask).astype(bool))
  if mask.shape != labels.shape:
    raise ValueError(f"mask shape {mask.shape} must be {labels.shape}")
  labels = np.where(mask, labels, 0).astype(np.int64)
  preds = np.where(mask, preds, 0).astype(np.int64)
  for name, x in (("labels", labels), ("preds", preds)):
    if x.size and (x.min() < 0 or x.max() >= num_classes):
      raise ValueError(f"{name} must lie in [0, {num_classes})")
  return batched_confusion_matrix(labels, preds, mask, num_classes)


def sensitivity_specificity(cm: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
  """One-vs-rest sensitivity (recall) and specificity of each class.

  Args:
    cm: `[..., C, C]` confusion matrix (true on rows, predicted on columns).

  Returns:
    `(sensitivity [..., C], specificity [..., C])`: TP / (TP + FN) and
    TN / (TN + FP); NaN for a class with no positives (sensitivity) or no
    negatives (specificity).
  """
  cm = np.asarray(cm, dtype=np.float64)
  tp = np.diagonal(cm, axis1=-2, axis2=-1)
  true_count = cm.sum(-1)
  pred_count = cm.sum(-2)
  total = cm.sum((-2, -1))[..., None]
  tn = total - true_count - pred_count + tp
  return safe_div(tp, true_count), safe_div(tn, total - true_count)


def balanced_accuracy(cm: ArrayLike) -> np.ndarray:
  """Mean sensitivity over the classes present (scikit-learn's definition).

  Args:
    cm: `[..., C, C]` confusion matrix.

  Returns:
    `[...]` float64; NaN for an empty matrix.

  Example:
    >>> float(balanced_accuracy(np.array([[1, 1], [0, 2]])))  # mean(1/2, 2/2)
    0.75
  """
  sens, _ = sensitivity_specificity(cm)
  return nanmean(sens)[()]


def mcc(cm: ArrayLike) -> np.ndarray:
  """Multiclass Matthews correlation coefficient (Gorodkin's R_K).

  With c = trace, s = total, t = row sums, p = column sums:
  `(c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t))`, and 0 when the denominator is 0
  (e.g. every prediction one class), as scikit-learn returns.

  Args:
    cm: `[..., C, C]` confusion matrix.

  Returns:
    `[...]` float64 in [-1, 1]; NaN for an empty matrix.

  Example:
    >>> round(float(mcc(np.array([[1, 1], [0, 2]]))), 4)  # (3*4 - 8) / sqrt(6*8)
    0.5774
  """
  cm = np.asarray(cm, dtype=np.float64)
  t = cm.sum(-1)
  p = cm.sum(-2)
  c = np.trace(cm, axis1=-2, axis2=-1)
  s = cm.sum((-2, -1))
  cov_tp = c * s - (t * p).sum(-1)
  den = np.sqrt((s**2 - (p * p).sum(-1)) * (s**2 - (t * t).sum(-1)))
  value = np.where(den > 0, safe_div(cov_tp, den), 0.0)
  return np.where(s > 0, value, np.nan)[()]


def f1_per_class(cm: ArrayLike) -> np.ndarray:
  """Per-class F1 = 2 TP / (2 TP + FP + FN), 0 where undefined.

  Args:
    cm: `[..., C, C]` confusion matrix.

  Returns:
    `[..., C]` float64; a class never true and never predicted gets 0
    (scikit-learn's `zero_division=0`).
  """
  cm = np.asarray(cm, dtype=np.float64)
  tp = np.diagonal(cm, axis1=-2, axis2=-1)
  den = cm.sum(-1) + cm.sum(-2)  # 2 TP + FN + FP
  return np.nan_to_num(safe_div(2 * tp, den), nan=0.0)


def f1(cm: ArrayLike) -> np.ndarray:
  """Macro F1 over the classes that occur as a label or a prediction.

  Matches `sklearn.metrics.f1_score(y, y_hat, average="macro",
  zero_division=0)`, whose default label set leaves out classes absent from
  both `y` and `y_hat`.

  Args:
    cm: `[..., C, C]` confusion matrix.

  Returns:
    `[...]` float64; NaN for an empty matrix.
  """
  cm = np.asarray(cm, dtype=np.float64)
  present = (cm.sum(-1) + cm.sum(-2)) > 0
  return nanmean(np.where(present, f1_per_class(cm), np.nan))[()]
