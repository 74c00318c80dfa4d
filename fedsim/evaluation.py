"""Evaluation of the global model: vmapped over hospitals, medical metrics on host.

Predictions for a split are computed by one jitted program vmapped over a chunk of
hospitals (the same chunking as training, so memory stays bounded); the host turns
the probabilities into pooled metrics (loss, accuracy, macro AUROC, balanced
accuracy, MCC, ...) and per-hospital summaries (mean, worst, worst 10%).
Segmentation splits (masks `[K, N, H, W]`) are reduced per chunk on the device to
predicted masks and per-image losses; the host computes Dice, IoU and
Hausdorff-95 (fedsim/metrics/segmentation.py).
"""

from __future__ import annotations

import io
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedsim import metrics
from fedsim.client import example_loss, normalize
from fedsim.data.base import ClientArrays
from fedsim.metrics import segmentation


def make_predict_fn(apply_fn: Callable, *, mean: float, std: float) -> Callable:
  """`predict(params, images [c, N, H, W, C] uint8) -> probs [c, N, classes]`
  (segmentation: `[c, N, H, W, classes]`)."""

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


@jax.jit
def _masks_and_losses(probs: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Predicted masks `[c, N, H, W]` and per-image training losses `[c, N]` from
  probabilities `[c, N, H, W, K]` (log-probabilities are logits up to a constant)."""
  loss = jax.vmap(example_loss)(jnp.log(jnp.maximum(probs, 1e-30)), labels)
  return jnp.argmax(probs, -1).astype(jnp.uint8), loss


def segment_split(predict: Callable, params, split: ClientArrays,
                  chunk: int) -> tuple[np.ndarray, np.ndarray]:
  """Predicted masks `[K, N, H, W]` and per-image losses `[K, N]` of every hospital."""
  k, preds, losses = split.num_clients, [], []
  for start in range(0, k, chunk):
    ids = np.arange(start, start + chunk)
    ids = np.where(ids < k, ids, 0)  # pad the last chunk, dropped below
    pred, loss = _masks_and_losses(predict(params, split.images[ids]), split.labels[ids])
    preds.append(np.asarray(pred))
    losses.append(np.asarray(loss))
  return np.concatenate(preds)[:k], np.concatenate(losses)[:k]


def evaluate_split(predict: Callable, params, split: ClientArrays, *, chunk: int,
                   class_names=None) -> dict:
  """Pooled and per-hospital metrics of one split.

  Returns a dict with the pooled report (`loss`, `accuracy`, `auroc`,
  `balanced_accuracy`, `mcc`, `f1`, `ece`, per-class sensitivity/specificity, ...;
  segmentation: `loss`, `dice`, `iou`, `hd95`, `global_dice`, per class) and
  `per_hospital` (lists and summaries).
  """
  if split.labels.ndim == 4:  # segmentation masks [K, N, H, W]
    pred, loss = segment_split(predict, params, split, chunk)
    mask = split.mask
    report = segmentation.segmentation_report(
        pred.reshape(-1, *pred.shape[2:]), split.labels.reshape(-1, *pred.shape[2:]),
        mask.reshape(-1), class_names=class_names)
    report["loss"] = float(loss[mask].mean()) if mask.any() else None
    report["per_hospital"] = segmentation.per_hospital(pred, split.labels, mask,
                                                       class_names=class_names)
    return report
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
  if "dice" in report:
    out = {prefix + k: report[k] for k in ("loss", "dice", "iou", "hd95", "global_dice")}
    summary = report["per_hospital"]["summary"]["dice"]
    out[prefix + "mean_hospital_dice"] = summary["mean"]
    out[prefix + "worst_hospital_dice"] = summary["worst"]
    out[prefix + "worst10_hospital_dice"] = summary["worst10_mean"]
    out.update({prefix + k: v for k, v in report.items() if k.startswith("dice_")})
    return out
  keys = ("loss", "accuracy", "auroc", "balanced_accuracy", "mcc", "f1", "ece")
  out = {prefix + k: report[k] for k in keys}
  summary = report["per_hospital"]["summary"]["accuracy"]
  out[prefix + "mean_hospital_accuracy"] = summary["mean"]
  out[prefix + "worst_hospital_accuracy"] = summary["worst"]
  out[prefix + "worst10_hospital_accuracy"] = summary["worst10_mean"]
  return out


def plot_segmentations(predict: Callable, params, split: ClientArrays, path: str, *,
                       class_names, chunk: int, num_slices: int = 8) -> None:
  """Writes a PNG of test slices, true masks and predicted masks side by side.

  The slices: of the first `num_slices` hospitals, each one's two with the most
  lesion (last class), then organ, pixels; first every hospital's best, then
  their second best. Predicted in chunks of `chunk` hospitals, as `evaluate_split`.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.colors import ListedColormap

  from fedsim.io import write_atomic

  split = split.take(np.arange(min(split.num_clients, num_slices)))
  pred, _ = segment_split(predict, params, split, chunk)
  k, mask = len(class_names), split.mask
  best = []
  for h in np.flatnonzero(split.counts > 0):
    area = (split.labels[h] == k - 1).sum((1, 2)) * 1000 + (split.labels[h] > 0).sum((1, 2))
    order = np.argsort(-np.where(mask[h], area, -1), kind="stable")
    best.append([(h, int(i)) for i in order[:2] if mask[h, i]])
  picks = [b[rank] for rank in range(2) for b in best if len(b) > rank][:num_slices]
  colours = ListedColormap([(0, 0, 0, 0), (0.1, 0.8, 0.2, 0.5), (0.9, 0.1, 0.1, 0.8),
                            (0.2, 0.4, 1.0, 0.8)][:k])
  fig, axes = plt.subplots(3, len(picks), figsize=(1.6 * len(picks), 5.0), squeeze=False)
  for col, (h, i) in enumerate(picks):
    dice, _ = segmentation.overlap(pred[h, i][None], split.labels[h, i][None], num_classes=k)
    for row, (overlay, title) in enumerate(((None, f"hospital {h}"),
                                            (split.labels[h, i], "truth"),
                                            (pred[h, i], f"Dice {dice.mean():.2f}"))):
      ax = axes[row, col]
      ax.imshow(split.images[h, i, ..., 0], cmap="gray", vmin=0, vmax=255)
      if overlay is not None:
        ax.imshow(overlay, cmap=colours, vmin=0, vmax=k - 1, interpolation="nearest")
      ax.set_title(title, fontsize=8)
      ax.axis("off")
  fig.suptitle("test slices; truth and prediction: " + ", ".join(
      f"{n} ({c})" for n, c in zip(class_names[1:], ("green", "red", "blue"), strict=False)),
      fontsize=9)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=110)
  plt.close(fig)
  write_atomic(path, png.getvalue())
