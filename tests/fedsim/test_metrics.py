"""Tests for fedsim.metrics: hand-worked examples, degenerate cases, sklearn."""

import json
import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from fedsim import metrics

# The hand-worked example used throughout (3 classes, 6 examples):
#
#   ex  probs              label  argmax
#   0   [0.7, 0.2, 0.1]    0      0
#   1   [0.5, 0.3, 0.2]    0      0
#   2   [0.2, 0.6, 0.2]    1      1
#   3   [0.5, 0.4, 0.1]    1      0   (wrong)
#   4   [0.1, 0.3, 0.6]    2      2
#   5   [0.3, 0.5, 0.2]    2      1   (wrong)
PROBS = np.array([
    [0.7, 0.2, 0.1],
    [0.5, 0.3, 0.2],
    [0.2, 0.6, 0.2],
    [0.5, 0.4, 0.1],
    [0.1, 0.3, 0.6],
    [0.3, 0.5, 0.2],
])
LABELS = np.array([0, 0, 1, 1, 2, 2])
PREDS = np.array([0, 0, 1, 0, 2, 1])

# Rows true, columns predicted.
CM = np.array([
    [2, 0, 0],
    [1, 1, 0],
    [0, 1, 1],
])

# AUROC, counting positive-vs-negative pairs (a tie counts 1/2):
#   class 0: pos {.7, .5}, neg {.2, .5, .1, .3}: .7 beats 4; .5 beats 3 and
#            ties 1 -> 3.5; (4 + 3.5) / 8 = 0.9375.
#            (Ranks: .1->1 .2->2 .3->3 .5,.5->4.5 .7->6; (6 + 4.5 - 3) / 8.)
#   class 1: pos {.6, .4}, neg {.2, .3, .3, .5}: 4 + 3 = 7 -> 7 / 8 = 0.875.
#   class 2: pos {.6, .2}, neg {.1, .2, .2, .1}: 4 + (2 + 2 * .5) = 7 -> 0.875.
AUROC = np.array([0.9375, 0.875, 0.875])
MACRO_AUROC = (0.9375 + 0.875 + 0.875) / 3  # 0.8958333


def _example_report():
  return metrics.classification_report(PROBS, LABELS)


# ------------------------------------------------------- hand-worked numbers


def test_confusion_matrix():
  np.testing.assert_array_equal(metrics.confusion_matrix(LABELS, PREDS, 3), CM)


def test_confusion_matrix_mask_drops_entries():
  labels = np.concatenate([LABELS, [-1, 5]])  # junk labels in padding
  preds = np.concatenate([PREDS, [9, 2]])
  mask = np.array([True] * 6 + [False, False])
  np.testing.assert_array_equal(
      metrics.confusion_matrix(labels, preds, 3, mask), CM)


def test_auroc_hand_example():
  np.testing.assert_allclose(metrics.auroc_ovr(PROBS, LABELS), AUROC)
  assert metrics.macro_auroc(PROBS, LABELS) == pytest.approx(MACRO_AUROC)


def test_sensitivity_specificity_hand_example():
  # sens = TP / (TP + FN), from the rows: [2/2, 1/2, 1/2].
  # spec = TN / (TN + FP): each class has 4 negatives;
  #   class 0: FP = 1 (ex 3) -> 3/4; class 1: FP = 1 (ex 5) -> 3/4;
  #   class 2: FP = 0 -> 4/4.
  sens, spec = metrics.sensitivity_specificity(CM)
  np.testing.assert_allclose(sens, [1.0, 0.5, 0.5])
  np.testing.assert_allclose(spec, [0.75, 0.75, 1.0])


def test_balanced_accuracy_hand_example():
  # mean(1, 1/2, 1/2) = 2/3.
  assert metrics.balanced_accuracy(CM) == pytest.approx(2 / 3)


def test_mcc_hand_example():
  # c = trace = 4, s = 6, t (rows) = [2, 2, 2], p (columns) = [3, 2, 1].
  # num = c*s - t.p = 24 - (6 + 4 + 2) = 12.
  # den = sqrt((s^2 - p.p)(s^2 - t.t)) = sqrt((36 - 14)(36 - 12)) = sqrt(528).
  assert metrics.mcc(CM) == pytest.approx(12 / math.sqrt(528))  # 0.522233


def test_f1_hand_example():
  # F1 = 2TP / (2TP + FP + FN):
  #   class 0: 4 / (4 + 1 + 0) = 0.8; class 1: 2 / (2 + 1 + 1) = 0.5;
  #   class 2: 2 / (2 + 0 + 1) = 2/3. Macro = (0.8 + 0.5 + 2/3) / 3 = 0.655556.
  np.testing.assert_allclose(metrics.f1_per_class(CM), [0.8, 0.5, 2 / 3])
  assert metrics.f1(CM) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_accuracy_and_log_loss_hand_example():
  # 4 of 6 correct.
  assert metrics.accuracy(PROBS, LABELS) == pytest.approx(4 / 6)
  # p(true class) = .7 .5 .6 .4 .6 .2; product = 0.01008;
  # -ln(0.01008) / 6 = 4.597203 / 6 = 0.766200.
  assert metrics.log_loss(PROBS, LABELS) == pytest.approx(
      -math.log(0.01008) / 6)


def test_ece_hand_example():
  # Top confidences (correct?): .7 (y) .5 (y) .6 (y) .5 (n) .6 (y) .5 (n).
  # 15 bins of width 1/15 put .5, .6 and .7 in three different bins:
  #   .7 x1 acc 1     -> 1/6 * |1 - .7|   = 0.05
  #   .5 x3 acc 1/3   -> 3/6 * |1/3 - .5| = 0.083333
  #   .6 x2 acc 1     -> 2/6 * |1 - .6|   = 0.133333      total 0.266667
  assert metrics.expected_calibration_error(PROBS, LABELS) == pytest.approx(
      0.05 + 0.5 / 6 + 0.8 / 6)
  # One bin: |accuracy - mean confidence| = |4/6 - 3.4/6| = 0.1.
  assert metrics.expected_calibration_error(
      PROBS, LABELS, num_bins=1) == pytest.approx(0.1)


def test_ece_bins_are_closed_on_the_right():
  # Two bins (0, .5], (.5, 1]. Confidence .5 (correct) joins .4 (wrong) in
  # bin 1: acc 1/2, conf .45 -> ECE = |.5 - .45| = 0.05 (not 0.45).
  probs = np.array([[0.5, 0.3, 0.2], [0.4, 0.3, 0.3]])
  labels = np.array([0, 1])
  assert metrics.expected_calibration_error(
      probs, labels, num_bins=2) == pytest.approx(0.05)


def test_perfect_and_reversed_scores():
  probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])
  labels = np.array([0, 0, 1, 1])
  np.testing.assert_allclose(metrics.auroc_ovr(probs, labels), [1.0, 1.0])
  np.testing.assert_allclose(
      metrics.auroc_ovr(probs[:, ::-1], labels), [0.0, 0.0])


# ----------------------------------------------------------- degenerate cases


def test_constant_scores_give_auroc_one_half():
  # Every score tied: each positive ties every negative -> 1/2 per pair.
  probs = np.full((5, 3), 1 / 3)
  labels = np.array([0, 1, 2, 0, 1])
  np.testing.assert_allclose(metrics.auroc_ovr(probs, labels), [0.5] * 3)


def test_absent_class_gives_nan_and_macro_over_the_rest():
  # Class 2 never occurs: no positives -> AUROC NaN, sensitivity NaN.
  # Drop the class-2 rows of the hand example (ex 0-3):
  #   class 0: pos {.7, .5}, neg {.2, .5}: 2 + (1 + .5) = 3.5 / 4 = 0.875.
  #   class 1: pos {.6, .4}, neg {.2, .3}: 4 / 4 = 1.
  probs, labels = PROBS[:4], LABELS[:4]
  auroc = metrics.auroc_ovr(probs, labels)
  np.testing.assert_allclose(auroc[:2], [0.875, 1.0])
  assert np.isnan(auroc[2])
  assert metrics.macro_auroc(probs, labels) == pytest.approx(0.9375)
  cm = metrics.confusion_matrix(labels, probs.argmax(1), 3)
  sens, spec = metrics.sensitivity_specificity(cm)
  assert np.isnan(sens[2]) and spec[2] == 1.0
  # Balanced accuracy over the classes present: (2/2 + 1/2) / 2.
  assert metrics.balanced_accuracy(cm) == pytest.approx(0.75)
  report = metrics.classification_report(probs, labels)
  assert report["per_class"]["auroc"][2] is None
  assert report["per_class"]["sensitivity"][2] is None


def test_only_one_class_present_gives_nan_macro_auroc():
  probs = np.array([[0.6, 0.4], [0.3, 0.7]])
  labels = np.array([0, 0])
  assert np.all(np.isnan(metrics.auroc_ovr(probs, labels)))
  assert math.isnan(metrics.macro_auroc(probs, labels))


def test_all_predictions_one_class_gives_mcc_zero():
  # Every example predicted class 0: p = [5, 0], s^2 - p.p = 25 - 25 = 0.
  cm = np.array([[3, 0], [2, 0]])
  assert metrics.mcc(cm) == 0.0
  assert skm.matthews_corrcoef([0, 0, 0, 1, 1], [0] * 5) == 0.0
  # The class never predicted has F1 0 (zero_division=0): (2*3/(6+2) + 0) / 2.
  assert metrics.f1(cm) == pytest.approx(0.375)


def test_empty_set_gives_nan():
  probs = np.zeros((0, 3))
  labels = np.zeros((0,), np.int32)
  assert math.isnan(metrics.accuracy(probs, labels))
  assert math.isnan(metrics.log_loss(probs, labels))
  assert math.isnan(metrics.expected_calibration_error(probs, labels))
  assert math.isnan(metrics.macro_auroc(probs, labels))
  report = metrics.classification_report(probs, labels)
  assert report["num_examples"] == 0
  assert report["accuracy"] is None and report["mcc"] is None
  json.dumps(report, allow_nan=False)


def test_masked_padding_changes_nothing():
  # Padded junk: NaN / huge probabilities, out-of-range and negative labels,
  # interleaved with the real examples.
  junk_probs = np.array([[np.nan, 0.0, 1.0], [1e9, -3.0, 0.0], [0, 1, 0]])
  junk_labels = np.array([-1, 7, 1])
  probs = np.concatenate([PROBS[:3], junk_probs, PROBS[3:]])
  labels = np.concatenate([LABELS[:3], junk_labels, LABELS[3:]])
  mask = np.array([True] * 3 + [False] * 3 + [True] * 3)
  assert metrics.classification_report(probs, labels, mask) == (
      _example_report())
  np.testing.assert_allclose(metrics.auroc_ovr(probs, labels, mask), AUROC)
  assert metrics.expected_calibration_error(
      probs, labels, mask=mask) == pytest.approx(
          metrics.expected_calibration_error(PROBS, LABELS))


def test_classification_report_is_json_and_complete():
  report = metrics.classification_report(
      PROBS, LABELS, class_names=("normal", "bacterial", "viral"))
  json.dumps(report, allow_nan=False)
  assert report["num_examples"] == 6
  assert report["accuracy"] == pytest.approx(4 / 6)
  assert report["auroc"] == pytest.approx(MACRO_AUROC)
  assert report["balanced_accuracy"] == pytest.approx(2 / 3)
  assert report["mcc"] == pytest.approx(12 / math.sqrt(528))
  assert report["f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
  assert report["confusion_matrix"] == CM.tolist()
  per_class = report["per_class"]
  assert per_class["class_names"] == ["normal", "bacterial", "viral"]
  assert per_class["support"] == [2, 2, 2]
  np.testing.assert_allclose(per_class["auroc"], AUROC)
  for value in (report["accuracy"], report["ece"], report["log_loss"]):
    assert type(value) is float


def test_validation_errors():
  with pytest.raises(ValueError, match="labels"):
    metrics.accuracy(PROBS, np.array([0, 1, 2, 3, 0, 0]))
  with pytest.raises(ValueError, match="shape"):
    metrics.auroc_ovr(PROBS, LABELS[:5])
  with pytest.raises(ValueError, match="finite"):
    metrics.auroc_ovr(np.full((2, 2), np.nan), np.array([0, 1]))
  with pytest.raises(ValueError, match="num_bins"):
    metrics.expected_calibration_error(PROBS, LABELS, num_bins=0)


# -------------------------------------------------------------- per hospital


def test_per_hospital_hand_example():
  # Hospital 0: the hand example padded to 8; hospital 1: empty;
  # hospital 2: two class-0 examples predicted 0 and 1 (acc 1/2, balanced
  # acc 1/2, AUROC undefined: no negatives of class 0, no positives else).
  probs = np.full((3, 8, 3), np.nan)
  labels = np.full((3, 8), -1)
  mask = np.zeros((3, 8), bool)
  probs[0, :6], labels[0, :6], mask[0, :6] = PROBS, LABELS, True
  probs[2, :2] = [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1]]
  labels[2, :2], mask[2, :2] = 0, True
  out = metrics.per_hospital(probs, labels, mask)
  json.dumps(out, allow_nan=False)
  assert out["count"] == [6, 0, 2]
  assert out["accuracy"] == pytest.approx([4 / 6, None, 0.5])
  assert out["balanced_accuracy"] == pytest.approx([2 / 3, None, 0.5])
  assert out["auroc"] == pytest.approx([MACRO_AUROC, None, None])
  # Accuracy over hospitals 0 and 2: mean (2/3 + 1/2) / 2; worst hospital 2;
  # worst-10% takes ceil(0.2) = 1 hospital.
  assert out["summary"]["accuracy"] == pytest.approx({
      "mean": 7 / 12, "worst": 0.5, "worst_hospital": 2,
      "worst10_mean": 0.5, "num_hospitals": 2})
  assert out["summary"]["auroc"] == pytest.approx({
      "mean": MACRO_AUROC, "worst": MACRO_AUROC, "worst_hospital": 0,
      "worst10_mean": MACRO_AUROC, "num_hospitals": 1})


def test_per_hospital_worst_ten_percent():
  # 30 hospitals, hospital k holds k+1 examples of which the first is wrong
  # -> accuracy k / (k + 1). ceil(10% of 30) = 3 lowest: 0, 1/2, 2/3.
  k, n = 30, 32
  probs = np.tile([0.9, 0.1], (k, n, 1))
  labels = np.zeros((k, n), int)
  labels[:, 0] = 1
  mask = np.arange(n)[None, :] <= np.arange(k)[:, None]
  summary = metrics.per_hospital(probs, labels, mask)["summary"]["accuracy"]
  assert summary["worst10_mean"] == pytest.approx((0 + 1 / 2 + 2 / 3) / 3)
  assert summary["worst"] == 0.0 and summary["worst_hospital"] == 0
  assert summary["mean"] == pytest.approx(np.mean(np.arange(k) / (
      np.arange(k) + 1)))


def _random_problem(rng, n, c, tie_decimals=None):
  logits = rng.normal(size=(n, c)) * 2
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  if tie_decimals is not None:
    probs = np.round(probs, tie_decimals)
  labels = rng.integers(0, c, size=n)
  return probs, labels


def test_per_hospital_matches_classification_report():
  rng = np.random.default_rng(0)
  k, n, c = 12, 40, 3
  probs, labels = _random_problem(rng, k * n, c, tie_decimals=1)
  probs, labels = probs.reshape(k, n, c), labels.reshape(k, n)
  mask = np.arange(n)[None, :] < rng.integers(0, n + 1, size=(k, 1))
  mask[0] = False  # one empty hospital
  out = metrics.per_hospital(probs, labels, mask)
  for h in range(k):
    report = metrics.classification_report(probs[h], labels[h], mask[h])
    assert out["count"][h] == report["num_examples"]
    for name in ("accuracy", "auroc", "balanced_accuracy"):
      assert out[name][h] == pytest.approx(report[name])


def test_per_hospital_large_matches_sklearn():
  # Vectorised over 100 hospitals at once (its speed belongs in benchmarks/): every
  # hospital's figures equal scikit-learn's on that hospital's real examples alone.
  rng = np.random.default_rng(1)
  k, n, c = 100, 50, 3
  probs, labels = _random_problem(rng, k * n, c, tie_decimals=2)
  probs, labels = probs.reshape(k, n, c), labels.reshape(k, n)
  mask = rng.random((k, n)) < 0.9
  out = metrics.per_hospital(probs, labels, mask)
  for h in range(k):
    y, p = labels[h][mask[h]], probs[h][mask[h]]
    assert out["count"][h] == len(y)
    assert out["accuracy"][h] == pytest.approx(skm.accuracy_score(y, p.argmax(1)))
    assert out["balanced_accuracy"][h] == pytest.approx(
        skm.balanced_accuracy_score(y, p.argmax(1)))
    aurocs = [skm.roc_auc_score(y == j, p[:, j]) for j in range(c)
              if 0 < (y == j).sum() < len(y)]
    assert out["auroc"][h] == pytest.approx(np.mean(aurocs))
  accuracy = np.array(out["accuracy"])
  assert out["summary"]["accuracy"] == pytest.approx({
      "mean": accuracy.mean(), "worst": accuracy.min(),
      "worst_hospital": int(accuracy.argmin()),
      "worst10_mean": np.sort(accuracy)[:10].mean(), "num_hospitals": k})


# ------------------------------------------------------- sklearn cross-checks


@pytest.mark.parametrize("seed", range(6))
def test_against_sklearn(seed):
  rng = np.random.default_rng(seed)
  c = 4
  probs, labels = _random_problem(rng, 120, c, tie_decimals=seed % 3 + 1)
  probs = probs / probs.sum(-1, keepdims=True)
  if seed % 2:
    labels = np.where(labels == 3, 0, labels)  # class 3 absent from labels
  mask = rng.random(120) < 0.8
  y, p = labels[mask], probs[mask]
  y_hat = p.argmax(1)

  cm = metrics.confusion_matrix(labels, probs.argmax(1), c, mask)
  np.testing.assert_array_equal(
      cm, skm.confusion_matrix(y, y_hat, labels=range(c)))

  auroc = metrics.auroc_ovr(probs, labels, mask)
  for k in range(c):
    if 0 < (y == k).sum() < len(y):
      assert auroc[k] == pytest.approx(skm.roc_auc_score(y == k, p[:, k]))
    else:
      assert np.isnan(auroc[k])

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
    expected_bacc = skm.balanced_accuracy_score(y, y_hat)
  assert metrics.balanced_accuracy(cm) == pytest.approx(expected_bacc)
  assert metrics.mcc(cm) == pytest.approx(skm.matthews_corrcoef(y, y_hat))
  assert metrics.f1(cm) == pytest.approx(
      skm.f1_score(y, y_hat, average="macro", zero_division=0))
  np.testing.assert_allclose(
      metrics.f1_per_class(cm),
      skm.f1_score(y, y_hat, labels=range(c), average=None, zero_division=0))
  assert metrics.accuracy(probs, labels, mask) == pytest.approx(
      skm.accuracy_score(y, y_hat))
  assert metrics.log_loss(probs, labels, mask) == pytest.approx(
      skm.log_loss(y, p, labels=range(c)))
  sens, _ = metrics.sensitivity_specificity(cm)
  present = (y[:, None] == np.arange(c)).any(0)
  np.testing.assert_allclose(
      sens[present],
      skm.recall_score(y, y_hat, labels=np.arange(c)[present], average=None))
