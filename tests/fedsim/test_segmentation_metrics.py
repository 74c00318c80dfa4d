"""Dice, IoU and Hausdorff-95 against hand-computed values, empty masks included."""

import numpy as np
import pytest

from fedsim.metrics import segmentation as seg

CLASSES = ("background", "liver", "lesion")


def _masks():
  """Three 6x6 images (hand-worked values in the comments)."""
  truth = np.zeros((3, 6, 6), int)
  pred = np.zeros((3, 6, 6), int)
  truth[0, 1:4, 1:4] = 1       # 9 liver pixels
  pred[0, 1:4, 1:5] = 1        # 12 predicted, 9 right: Dice 18/21, IoU 9/12
  truth[0, 2, 2] = 2           # a 1-pixel lesion, predicted nowhere: Dice 0, IoU 0
  # (truth liver is now 8 pixels, all inside the prediction: Dice 16/20, IoU 8/12)
  # image 1: both empty in both classes: Dice 1, IoU 1, HD95 0
  truth[2, 0:2, 0:2] = 1       # image 2: liver of 4 pixels, predicted empty: Dice 0
  pred[2, 4:6, 4:6] = 2        # a lesion claimed where there is none: Dice 0
  return pred, truth


def test_dice_and_iou_equal_hand_computed_values_with_empty_masks():
  pred, truth = _masks()
  dice, iou = seg.overlap(pred, truth, num_classes=3)
  np.testing.assert_allclose(dice, [[16 / 20, 0.0], [1.0, 1.0], [0.0, 0.0]])
  np.testing.assert_allclose(iou, [[8 / 12, 0.0], [1.0, 1.0], [0.0, 0.0]])


def test_hausdorff95_hand_values_and_empty_conventions():
  pred, truth = _masks()
  hd = seg.hausdorff95(pred, truth, num_classes=3)
  diagonal = np.hypot(6, 6)
  # Image 0, liver: the prediction's extra column (x=4) is 1 pixel from the truth's
  # surface (x=3); 3 of its 10 surface pixels are there, so its 95th percentile is 1;
  # truth -> prediction surface: the truth's surface lies on the prediction's except
  # (2, 3), 1 pixel away (1 of 8; 95th percentile 0.65). The larger: 1.
  assert hd[0, 0] == pytest.approx(1.0)
  assert hd[0, 1] == diagonal            # lesion in the truth only
  assert hd[1].tolist() == [0.0, 0.0]    # both empty
  assert hd[2].tolist() == [diagonal, diagonal]  # one empty each


def test_report_pools_real_images_only_and_hospitals_are_summarised():
  pred, truth = _masks()
  real = np.array([True, True, False])  # image 2 is padding
  report = seg.segmentation_report(pred, truth, real, class_names=CLASSES)
  assert report["count"] == 2
  assert report["dice_liver"] == pytest.approx((16 / 20 + 1.0) / 2)
  assert report["dice_lesion"] == pytest.approx((0.0 + 1.0) / 2)
  assert report["dice"] == pytest.approx(((0.8 + 0.0) / 2 + 1.0) / 2)  # images, then mean
  # Pooled pixels: liver 16 / (12 + 8) = 0.8; lesion 0 / (0 + 1) = 0.
  assert report["global_dice"] == pytest.approx((0.8 + 0.0) / 2)
  assert (report["global_dice_liver"], report["global_dice_lesion"]) == pytest.approx((0.8, 0))
  hospitals = seg.per_hospital(pred[None].repeat(2, 0),
                               truth[None].repeat(2, 0),
                               np.array([[True, True, False], [False, False, True]]),
                               class_names=CLASSES)
  assert hospitals["count"] == [2, 1]
  np.testing.assert_allclose(hospitals["dice"], [0.7, 0.0])
  summary = hospitals["summary"]["dice"]
  assert (summary["worst"], summary["worst_hospital"]) == (0.0, 1)
  empty = seg.segmentation_report(pred, truth, np.zeros(3, bool), class_names=CLASSES)
  assert empty["count"] == 0 and empty["dice"] is None
