"""Segmentation metrics on the host (numpy, scipy): Dice, IoU, Hausdorff-95, per hospital.

Masks are int class maps `[..., H, W]` (0 = background); every metric is computed
per image and per foreground class, then averaged over the foreground classes
(and, pooled, over the real images). Padded images (mask False) count nowhere.

Empty-mask conventions (a class absent from an image is the usual case for
lesions, so they decide the numbers):

- Dice and IoU are 1 when prediction and truth are both empty (nothing to find,
  nothing claimed) and 0 when exactly one of them is empty.
- Hausdorff-95 (pixels) is 0 when both are empty and the image diagonal (the
  largest distance possible in the image) when exactly one is empty.

`global_dice` pools every pixel of the set before dividing (LiTS's "Dice
global"): it is not lifted by the empty-empty convention.

  >>> truth = np.array([[[0, 1], [1, 1]]])           # one 2x2 image, 3 liver pixels
  >>> pred = np.array([[[0, 1], [0, 1]]])            # 2 predicted, both right
  >>> d, i = overlap(pred, truth, num_classes=2)
  >>> float(d[0, 0]), float(i[0, 0])                 # 2*2/(2+3), 2/3
  (0.8, 0.6666666666666666)
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
from scipy import ndimage

from fedsim.io import to_json
from fedsim.metrics.reports import _summary


def _one_hot(masks: np.ndarray, num_classes: int) -> np.ndarray:
  """bool `[N, K-1, H, W]`: one plane per foreground class."""
  return masks[:, None] == np.arange(1, num_classes)[None, :, None, None]


def overlap(pred: np.ndarray, truth: np.ndarray, *,
            num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """Dice and IoU of each image and foreground class, each `[N, num_classes - 1]`."""
  p, t = _one_hot(pred, num_classes), _one_hot(truth, num_classes)
  inter = (p & t).sum((2, 3)).astype(np.float64)
  sizes = p.sum((2, 3)) + t.sum((2, 3)).astype(np.float64)
  empty = sizes == 0
  dice = np.where(empty, 1.0, 2 * inter / np.maximum(sizes, 1))
  iou = np.where(empty, 1.0, inter / np.maximum(sizes - inter, 1))
  return dice, iou


def _surface(plane: np.ndarray) -> np.ndarray:
  """The boundary pixels of a binary mask (the image border counts as outside)."""
  return plane & ~ndimage.binary_erosion(plane, border_value=0)


def hausdorff95(pred: np.ndarray, truth: np.ndarray, *, num_classes: int) -> np.ndarray:
  """Symmetric 95th-percentile Hausdorff distance in pixels, `[N, num_classes - 1]`.

  The larger of the two directed 95th percentiles of surface-to-surface distance
  (as MONAI computes it); empty masks as in the module docstring.
  """
  p, t = _one_hot(pred, num_classes), _one_hot(truth, num_classes)
  diagonal = float(np.hypot(*pred.shape[-2:]))
  out = np.zeros(p.shape[:2])
  for n, k in np.ndindex(*p.shape[:2]):
    a, b = p[n, k], t[n, k]
    if not a.any() and not b.any():
      continue
    if not a.any() or not b.any():
      out[n, k] = diagonal
      continue
    sa, sb = _surface(a), _surface(b)
    to_b = ndimage.distance_transform_edt(~sb)[sa]
    to_a = ndimage.distance_transform_edt(~sa)[sb]
    out[n, k] = max(np.percentile(to_b, 95), np.percentile(to_a, 95))
  return out


def segmentation_report(pred: np.ndarray, truth: np.ndarray, mask: Optional[np.ndarray]
                        = None, *, class_names: Sequence[str]) -> dict[str, Any]:
  """Pooled figures of a set of predicted masks.

  Args:
    pred, truth: int `[N, H, W]` class maps.
    mask: bool `[N]`, True on real images (None: all real).
    class_names: one per class, background first.

  Returns:
    JSON-ready dict: `dice`, `iou`, `hd95` (means over images and foreground
    classes), `global_dice`, per class `dice_<name>`, `iou_<name>`, `hd95_<name>`,
    `global_dice_<name>`, and `count`; None (NaN) for an empty set.
  """
  keep = np.ones(len(pred), bool) if mask is None else np.asarray(mask, bool)
  pred, truth = np.asarray(pred)[keep], np.asarray(truth)[keep]
  k = len(class_names)
  dice, iou = overlap(pred, truth, num_classes=k)
  hd = hausdorff95(pred, truth, num_classes=k)
  p, t = _one_hot(pred, k), _one_hot(truth, k)
  inter, sizes = (p & t).sum((0, 2, 3)), p.sum((0, 2, 3)) + t.sum((0, 2, 3))
  pooled = np.where(sizes == 0, 1.0, 2 * inter / np.maximum(sizes, 1))
  mean = lambda a, axis=None: np.mean(a, axis=axis) if len(a) else np.full(k - 1, np.nan)
  out = {"count": int(len(pred)), "dice": np.mean(mean(dice, 0)),
         "iou": np.mean(mean(iou, 0)), "hd95": np.mean(mean(hd, 0)),
         "global_dice": np.mean(pooled)}
  for j, name in enumerate(class_names[1:]):
    out.update({f"dice_{name}": mean(dice, 0)[j], f"iou_{name}": mean(iou, 0)[j],
                f"hd95_{name}": mean(hd, 0)[j], f"global_dice_{name}": pooled[j]})
  return to_json(out)


def per_hospital(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray, *,
                 class_names: Sequence[str]) -> dict[str, Any]:
  """Every hospital's `dice`, `iou`, `hd95` (`[K]` lists, None for a hospital with no
  image) and `summary[dice|iou]` = {mean, worst, worst_hospital, worst10_mean,
  num_hospitals}, each hospital weighing the same.

  Args: pred, truth int `[K, N, H, W]`; mask bool `[K, N]`.
  """
  reports = [segmentation_report(pred[h], truth[h], mask[h], class_names=class_names)
             for h in range(len(pred))]
  values = {m: np.array([np.nan if r[m] is None else r[m] for r in reports])
            for m in ("dice", "iou", "hd95")}
  out: dict[str, Any] = {"count": [r["count"] for r in reports]}
  out.update({m: to_json(v) for m, v in values.items()})
  out["summary"] = {m: _summary(values[m]) for m in ("dice", "iou")}
  return out
