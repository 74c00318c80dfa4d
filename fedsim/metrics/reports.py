"""All metrics of an evaluation set, pooled (`classification_report`) and per hospital
(`per_hospital`, with fairness summaries), as JSON-ready dicts (NaN -> None)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
from numpy.typing import ArrayLike

from fedsim.io import to_json
from fedsim.metrics._inputs import nanmean, prepare, safe_div
from fedsim.metrics.auroc import batched_auroc
from fedsim.metrics.confusion import (
  balanced_accuracy,
  batched_confusion_matrix,
  f1,
  f1_per_class,
  mcc,
  sensitivity_specificity,
)
from fedsim.metrics.probability import accuracy, expected_calibration_error, log_loss


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
  probs, labels, mask = prepare(probs, labels, mask)
  if probs.ndim != 2:
    raise ValueError(f"probs must be [N, C], got {probs.shape}")
  num_classes = probs.shape[-1]
  if class_names is None:
    class_names = [str(c) for c in range(num_classes)]
  if len(class_names) != num_classes:
    raise ValueError(
        f"{len(class_names)} class_names given for {num_classes} classes")
  cm = batched_confusion_matrix(labels, probs.argmax(-1), mask, num_classes)
  per_class_auroc = batched_auroc(probs, labels, mask)
  sens, spec = sensitivity_specificity(cm)
  return to_json({
      "num_examples": int(mask.sum()),
      "accuracy": accuracy(probs, labels, mask),
      "auroc": nanmean(per_class_auroc),
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
  return to_json({
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

  Example:
    >>> probs = np.array([[[.9, .1], [.3, .7]], [[.6, .4], [0., 1.]]])
    >>> labels, mask = np.array([[0, 0], [1, 0]]), np.array([[1, 1], [1, 0]], bool)
    >>> out = per_hospital(probs, labels, mask)  # hospital 1's second example is padding
    >>> out["count"], out["accuracy"], out["summary"]["accuracy"]["worst_hospital"]
    ([2, 1], [0.5, 0.0], 1)
  """
  probs, labels, mask = prepare(probs, labels, mask)
  if probs.ndim != 3:
    raise ValueError(f"probs must be [K, N, C], got {probs.shape}")
  num_classes = probs.shape[-1]
  preds = probs.argmax(-1)
  count = mask.sum(-1)
  metrics = {
      "accuracy": safe_div(((preds == labels) & mask).sum(-1), count),
      "auroc": nanmean(batched_auroc(probs, labels, mask)),
      "balanced_accuracy": balanced_accuracy(
          batched_confusion_matrix(labels, preds, mask, num_classes)),
  }
  out: dict[str, Any] = {"count": to_json(count)}
  out.update({name: to_json(values) for name, values in metrics.items()})
  out["summary"] = {name: _summary(values) for name, values in metrics.items()}
  return out
