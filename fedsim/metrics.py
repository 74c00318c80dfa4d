"""Medical classification metrics on the host (numpy), padding-aware.

Every metric reads predicted class probabilities `probs [N, C]` and integer
labels `[N]`, with an optional boolean `mask [N]` marking real examples: a
masked-out (padded) example contributes nothing, whatever junk its probabilities
or label hold (invariant 2 of the design). Predictions are `argmax(probs)`
(the first class on ties).

Conventions, chosen to match scikit-learn where it defines the metric:

- Confusion matrices have true classes on rows and predicted classes on columns.
- Per-class quantities that are undefined (AUROC of a class with no positives
  or no negatives, sensitivity of a class with no positives, ...) are NaN, and
  macro averages are NaN-means over the classes where they are defined.
- An empty evaluation set (no unmasked example) gives NaN for every scalar.
- `classification_report` and `per_hospital` return JSON-ready Python values
  (NaN becomes None).

Metrics computed from a confusion matrix accept leading batch axes
(`cm [..., C, C]`), which is how `per_hospital` evaluates all hospitals at once.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "accuracy",
    "auroc_ovr",
    "balanced_accuracy",
    "classification_report",
    "confusion_matrix",
    "expected_calibration_error",
    "f1",
    "f1_per_class",
    "log_loss",
    "macro_auroc",
    "mcc",
    "per_hospital",
    "sensitivity_specificity",
]


# ----------------------------------------------------------------- validation


def _prepare(
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


def _safe_div(num: ArrayLike, den: ArrayLike) -> np.ndarray:
  """`num / den` elementwise, NaN where `den == 0`, without warnings."""
  num = np.asarray(num, dtype=np.float64)
  den = np.asarray(den, dtype=np.float64)
  out = np.full(np.broadcast(num, den).shape, np.nan)
  np.divide(num, den, out=out, where=den != 0)
  return out


def _nanmean(x: np.ndarray, axis: int = -1) -> np.ndarray:
  """`np.nanmean` that returns NaN for all-NaN slices without a warning."""
  valid = ~np.isnan(x)
  return _safe_div(np.where(valid, x, 0.0).sum(axis), valid.sum(axis))


# ---------------------------------------------------------- confusion matrix


def _confusion_matrix_batched(
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
  return _confusion_matrix_batched(labels, preds, mask, num_classes)


# ----------------------------------------------------------------------- AUROC


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


def _auroc_batched(
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
  return _safe_div(rank_sum - num_pos * (num_pos + 1) / 2, num_pos * num_neg)


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
  probs, labels, mask = _prepare(probs, labels, mask)
  if probs.ndim != 2:
    raise ValueError(f"probs must be [N, C], got {probs.shape}")
  return _auroc_batched(probs, labels, mask)


def macro_auroc(
    probs: ArrayLike, labels: ArrayLike, mask: Optional[ArrayLike] = None
) -> float:
  """Mean one-vs-rest AUROC over the classes where it is defined (else NaN)."""
  return float(_nanmean(auroc_ovr(probs, labels, mask)))


# -------------------------------------------------- confusion-matrix metrics


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
  return _safe_div(tp, true_count), _safe_div(tn, total - true_count)


def balanced_accuracy(cm: ArrayLike) -> np.ndarray:
  """Mean sensitivity over the classes present (scikit-learn's definition).

  Args:
    cm: `[..., C, C]` confusion matrix.

  Returns:
    `[...]` float64; NaN for an empty matrix.
  """
  sens, _ = sensitivity_specificity(cm)
  return _nanmean(sens)[()]


def mcc(cm: ArrayLike) -> np.ndarray:
  """Multiclass Matthews correlation coefficient (Gorodkin's R_K).

  With c = trace, s = total, t = row sums, p = column sums:
  `(c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t))`, and 0 when the denominator is 0
  (e.g. every prediction one class), as scikit-learn returns.

  Args:
    cm: `[..., C, C]` confusion matrix.

  Returns:
    `[...]` float64 in [-1, 1]; NaN for an empty matrix.
  """
  cm = np.asarray(cm, dtype=np.float64)
  t = cm.sum(-1)
  p = cm.sum(-2)
  c = np.trace(cm, axis1=-2, axis2=-1)
  s = cm.sum((-2, -1))
  cov_tp = c * s - (t * p).sum(-1)
  den = np.sqrt((s**2 - (p * p).sum(-1)) * (s**2 - (t * t).sum(-1)))
  value = np.where(den > 0, _safe_div(cov_tp, den), 0.0)
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
  return np.nan_to_num(_safe_div(2 * tp, den), nan=0.0)


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
  return _nanmean(np.where(present, f1_per_class(cm), np.nan))[()]


# ------------------------------------------------- probability-based metrics


def accuracy(
    probs: ArrayLike, labels: ArrayLike, mask: Optional[ArrayLike] = None
) -> float:
  """Fraction of unmasked examples whose argmax is the label (NaN if none)."""
  probs, labels, mask = _prepare(probs, labels, mask)
  correct = (probs.argmax(-1) == labels) & mask
  return float(_safe_div(correct.sum(), mask.sum()))


def log_loss(
    probs: ArrayLike, labels: ArrayLike, mask: Optional[ArrayLike] = None
) -> float:
  """Mean negative log-probability of the true class (natural log).

  Probabilities are clipped below at float64 machine epsilon, as scikit-learn
  does, so a confident mistake costs about 36 nats, not infinity.
  """
  probs, labels, mask = _prepare(probs, labels, mask)
  p_true = np.take_along_axis(probs, labels[..., None], -1)[..., 0]
  nll = -np.log(np.clip(p_true, np.finfo(np.float64).eps, None))
  return float(_safe_div(np.where(mask, nll, 0.0).sum(), mask.sum()))


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
  """
  if num_bins < 1:
    raise ValueError(f"num_bins={num_bins} must be >= 1")
  probs, labels, mask = _prepare(probs, labels, mask)
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
  return float(_safe_div(np.abs(acc_sum - conf_sum).sum(), count.sum()))


# ------------------------------------------------------------------- reports


def _json(x: Any) -> Any:
  """Numpy scalars / arrays to Python floats / lists, NaN to None."""
  if isinstance(x, dict):
    return {key: _json(value) for key, value in x.items()}
  if isinstance(x, np.ndarray):
    return [_json(v) for v in x.tolist()] if x.ndim else _json(x.item())
  if isinstance(x, (list, tuple)):
    return [_json(v) for v in x]
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return None if math.isnan(x) else float(x)
  return x


def classification_report(
    probs: ArrayLike,
    labels: ArrayLike,
    mask: Optional[ArrayLike] = None,
    class_names: Optional[Sequence[str]] = None,
) -> dict[str, Any]:
  """All metrics of one evaluation set as a JSON-ready dict (NaN -> None).

  Scalar keys use the names of `metrics.jsonl` / `summary.json`: `num_examples`,
  `accuracy`, `auroc` (macro one-vs-rest), `balanced_accuracy`, `mcc`, `f1`
  (macro), `ece`, `log_loss`. `per_class` holds lists aligned with
  `class_names`: `support`, `auroc`, `sensitivity`, `specificity`, `f1`.
  `confusion_matrix` is a nested list (true on rows).

  Args:
    probs: `[N, C]` predicted probabilities.
    labels: int `[N]` true classes.
    mask: optional bool `[N]`; False entries (padding) are ignored.
    class_names: C names; defaults to "0", "1", ...
  """
  probs, labels, mask = _prepare(probs, labels, mask)
  if probs.ndim != 2:
    raise ValueError(f"probs must be [N, C], got {probs.shape}")
  num_classes = probs.shape[-1]
  if class_names is None:
    class_names = [str(c) for c in range(num_classes)]
  if len(class_names) != num_classes:
    raise ValueError(
        f"{len(class_names)} class_names given for {num_classes} classes")
  cm = _confusion_matrix_batched(labels, probs.argmax(-1), mask, num_classes)
  per_class_auroc = _auroc_batched(probs, labels, mask)
  sens, spec = sensitivity_specificity(cm)
  return _json({
      "num_examples": int(mask.sum()),
      "accuracy": accuracy(probs, labels, mask),
      "auroc": _nanmean(per_class_auroc),
      "balanced_accuracy": balanced_accuracy(cm),
      "mcc": mcc(cm),
      "f1": f1(cm),
      "ece": expected_calibration_error(probs, labels, mask=mask),
      "log_loss": log_loss(probs, labels, mask),
      "per_class": {
          "class_names": list(class_names),
          "support": cm.sum(-1),
          "auroc": per_class_auroc,
          "sensitivity": sens,
          "specificity": spec,
          "f1": f1_per_class(cm),
      },
      "confusion_matrix": cm,
  })


def _summary(values: np.ndarray) -> dict[str, Any]:
  """Mean, worst (min, with its hospital index) and worst-10% mean.

  NaN entries (hospitals where the metric is undefined) are left out; the
  worst-10% mean averages the ceil(10%) lowest of the rest.
  """
  defined = np.flatnonzero(~np.isnan(values))
  if defined.size == 0:
    return {"mean": None, "worst": None, "worst_hospital": None,
            "worst10_mean": None, "num_hospitals": 0}
  ordered = defined[np.argsort(values[defined], kind="stable")]
  tail = ordered[:(defined.size + 9) // 10]  # ceil(10%), exact in integers
  return _json({
      "mean": values[defined].mean(),
      "worst": values[ordered[0]],
      "worst_hospital": int(ordered[0]),
      "worst10_mean": values[tail].mean(),
      "num_hospitals": int(defined.size),
  })


def per_hospital(
    probs: ArrayLike, labels: ArrayLike, mask: Optional[ArrayLike] = None
) -> dict[str, Any]:
  """Metrics of every hospital at once, with fairness summaries.

  Args:
    probs: `[K, N, C]` predicted probabilities of each hospital's (padded)
      test examples.
    labels: int `[K, N]` true classes.
    mask: bool `[K, N]`, True for real examples; None means all real.

  Returns:
    JSON-ready dict: `count` (`[K]` real examples), `accuracy`, `auroc` (macro
    one-vs-rest), `balanced_accuracy` (each `[K]`, None where undefined: no
    example, or for AUROC no class with both positives and negatives), and
    `summary[metric]` = {`mean`, `worst`, `worst_hospital`, `worst10_mean`,
    `num_hospitals`} over the hospitals where that metric is defined (each
    hospital weighs the same, whatever its size).
  """
  probs, labels, mask = _prepare(probs, labels, mask)
  if probs.ndim != 3:
    raise ValueError(f"probs must be [K, N, C], got {probs.shape}")
  num_classes = probs.shape[-1]
  preds = probs.argmax(-1)
  count = mask.sum(-1)
  metrics = {
      "accuracy": _safe_div(((preds == labels) & mask).sum(-1), count),
      "auroc": _nanmean(_auroc_batched(probs, labels, mask)),
      "balanced_accuracy": balanced_accuracy(
          _confusion_matrix_batched(labels, preds, mask, num_classes)),
  }
  out: dict[str, Any] = {"count": _json(count)}
  out.update({name: _json(values) for name, values in metrics.items()})
  out["summary"] = {name: _summary(values) for name, values in metrics.items()}
  return out
