"""Evaluation of the global model: vmapped over hospitals, medical metrics on host.

Predictions for a split are computed by one jitted program vmapped over a chunk of
hospitals (the same chunking as training, so memory stays bounded); the host turns
the probabilities into pooled metrics (loss, accuracy, macro AUROC, balanced
accuracy, MCC, ...) and per-hospital summaries (mean, worst, worst 10%).
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from fedsim import metrics
from fedsim.client import normalize
from fedsim.data.base import ClientArrays


def make_predict_fn(apply_fn: Callable, *, mean: float, std: float) -> Callable:
  """`predict(params, images [c, N, H, W, C] uint8) -> probs [c, N, classes]`."""

  @jax.jit
  def predict(params, images):
    def one(x):
      return jax.nn.softmax(apply_fn(params, normalize(x, mean, std)), axis=-1)
    return jax.vmap(one)(images)

  return predict


def predict_split(predict: Callable, params, split: ClientArrays, chunk: int) -> np.ndarray:
  """Probabilities for every hospital of `split`, `[K, N, classes]` (host numpy)."""
  k = split.num_clients
  out = []
  for start in range(0, k, chunk):
    ids = np.arange(start, start + chunk)
    ids = np.where(ids < k, ids, 0)  # pad the last chunk, dropped below
    out.append(predict(params, split.images[ids]))
  return np.concatenate([np.asarray(p) for p in out])[:k]


def evaluate_split(predict: Callable, params, split: ClientArrays, *, chunk: int,
                   class_names=None) -> dict:
  """Pooled and per-hospital metrics of one split.

  Returns a dict with the pooled report (`loss`, `accuracy`, `auroc`,
  `balanced_accuracy`, `mcc`, `f1`, `ece`, per-class sensitivity/specificity, ...)
  and `per_hospital` (lists and summaries).
  """
  probs = predict_split(predict, params, split, chunk)
  mask = split.mask
  report = metrics.classification_report(
      probs.reshape(-1, probs.shape[-1]), split.labels.reshape(-1),
      mask.reshape(-1), class_names=class_names)
  report["loss"] = report.pop("log_loss")
  report["per_hospital"] = metrics.per_hospital(probs, split.labels, mask)
  return report


def scalar_summary(report: dict, prefix: str = "") -> dict:
  """The scalar figures of a split report, flat (for metrics.jsonl and the bar)."""
  keys = ("loss", "accuracy", "auroc", "balanced_accuracy", "mcc", "f1", "ece")
  out = {prefix + k: report[k] for k in keys}
  summary = report["per_hospital"]["summary"]["accuracy"]
  out[prefix + "mean_hospital_accuracy"] = summary["mean"]
  out[prefix + "worst_hospital_accuracy"] = summary["worst"]
  out[prefix + "worst10_hospital_accuracy"] = summary["worst10_mean"]
  return out
