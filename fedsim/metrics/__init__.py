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
  (NaN becomes None, by `fedsim.io.to_json`).

Metrics computed from a confusion matrix accept leading batch axes
(`cm [..., C, C]`), which is how `per_hospital` evaluates all hospitals at once.

Modules: `confusion` (confusion matrix and the metrics read from it), `auroc`,
`probability` (accuracy, log loss, calibration), `reports` (all of them for one
set, and per hospital). Every public name is importable from `fedsim.metrics`.
Segmentation (Dice, IoU, Hausdorff-95 on masks, per hospital) is in
`fedsim.metrics.segmentation`.
"""

from fedsim.metrics.auroc import auroc_ovr, macro_auroc
from fedsim.metrics.confusion import (
  balanced_accuracy,
  confusion_matrix,
  f1,
  f1_per_class,
  mcc,
  sensitivity_specificity,
)
from fedsim.metrics.probability import accuracy, expected_calibration_error, log_loss
from fedsim.metrics.reports import classification_report, per_hospital

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
