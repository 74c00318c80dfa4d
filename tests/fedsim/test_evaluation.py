"""Tests for fedsim.evaluation: predictions per hospital, padding, pooled and per-hospital
metrics, on a fake model whose predictions are written in the images."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from fedsim import evaluation
from fedsim.data.base import ClientArrays

# The fake model predicts class k for an image whose pixels are all 100 * k.
CENTRES = jnp.array([0.0, 100.0, 200.0]) / 255.0


def _apply(params, x):
  """`x [N, H, W, 1]` in [0, 1] -> logits [N, 3], peaked at the nearest centre."""
  return -params["sharpness"] * (x[:, 0, 0, 0][:, None] - CENTRES) ** 2


PARAMS = {"sharpness": jnp.float32(1e5)}


def _split(predicted, labels, counts):
  """Hospitals whose image j shows class `predicted[k][j]`; padding beyond `counts`."""
  predicted, labels = np.asarray(predicted), np.asarray(labels, np.int32)
  images = np.broadcast_to((100 * predicted).astype(np.uint8)[..., None, None, None],
                           predicted.shape + (2, 2, 1)).copy()
  counts = np.asarray(counts, np.int32)
  patients = np.where(np.arange(predicted.shape[1]) < counts[:, None],
                      np.arange(predicted.shape[1]), -1).astype(np.int32)
  return ClientArrays(images=images, labels=labels, patients=patients, counts=counts,
                      num_patients=counts.copy())


# Hospital 0: predicted [0, 1, 2], labels [0, 1, 1] -> 2 of 3 right; its 4th entry is padding.
# Hospital 1: predicted [1, 1], labels [1, 0] -> 1 of 2 right; entries 3 and 4 are padding.
# Hospital 2: predicted [2, 2, 0, 0], labels [2, 2, 0, 1] -> 3 of 4 right.
PREDICTED = [[0, 1, 2, 2], [1, 1, 0, 0], [2, 2, 0, 0]]
LABELS = [[0, 1, 1, 0], [1, 0, 0, 0], [2, 2, 0, 1]]
COUNTS = [3, 2, 4]


@pytest.fixture(scope="module")
def predict():
  return evaluation.make_predict_fn(_apply, mean=0.0, std=1.0)


def test_make_predict_fn_normalises_then_softmaxes():
  # One logit = the normalised pixel: 255 -> (1 - 0.5) / 0.25 = 2, so p = softmax([2, 0]).
  apply = lambda params, x: jnp.stack([params * x[:, 0, 0, 0], jnp.zeros(x.shape[0])], -1)
  predict = evaluation.make_predict_fn(apply, mean=0.5, std=0.25)
  images = np.full((2, 3, 2, 2, 1), 255, np.uint8)
  probs = np.asarray(predict(jnp.float32(1.0), images))
  assert probs.shape == (2, 3, 2)
  np.testing.assert_allclose(probs[..., 0], math.exp(2) / (math.exp(2) + 1), rtol=1e-6)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_predict_split_every_hospital_once_in_fixed_shape_chunks(predict, chunk):
  split = _split(PREDICTED, LABELS, COUNTS)
  shapes = []

  def recording_predict(params, images):
    shapes.append(images.shape)
    return predict(params, images)

  probs = evaluation.predict_split(recording_predict, PARAMS, split, chunk)
  assert probs.shape == (3, 4, 3)
  np.testing.assert_array_equal(probs.argmax(-1), PREDICTED)
  assert set(shapes) == {(chunk, 4, 2, 2, 1)}  # the last chunk is padded, not shorter
  assert len(shapes) == -(-3 // chunk)


def test_evaluate_split_hand_checked(predict):
  report = evaluation.evaluate_split(predict, PARAMS, _split(PREDICTED, LABELS, COUNTS),
                                     chunk=2, class_names=("normal", "bacterial", "viral"))
  assert report["num_examples"] == 9
  assert report["accuracy"] == pytest.approx(6 / 9)
  # Pooled (true, predicted) pairs: hospital 0 (0,0) (1,1) (1,2); hospital 1 (1,1) (0,1);
  # hospital 2 (2,2) (2,2) (0,0) (1,0).
  assert report["confusion_matrix"] == [[2, 1, 0], [1, 2, 1], [0, 0, 2]]
  assert report["per_class"]["class_names"] == ["normal", "bacterial", "viral"]
  # Right answers have p = 1 (loss 0); the 3 wrong ones p ~ exp(-15000), clipped at float64
  # eps: loss = 3 * -ln(eps) / 9.
  assert report["loss"] == pytest.approx(-math.log(np.finfo(np.float64).eps) / 3)
  per_hospital = report["per_hospital"]
  assert per_hospital["count"] == COUNTS
  assert per_hospital["accuracy"] == pytest.approx([2 / 3, 1 / 2, 3 / 4])
  assert per_hospital["summary"]["accuracy"]["worst"] == pytest.approx(0.5)
  assert per_hospital["summary"]["accuracy"]["worst_hospital"] == 1


def test_padding_contributes_nothing(predict):
  clean = _split(PREDICTED, LABELS, COUNTS)
  junk = _split(PREDICTED, LABELS, COUNTS)
  pad = ~clean.mask
  junk.images[pad] = 255  # a confident prediction of class 2
  junk.labels[pad] = 1    # always wrong for it
  reports = [evaluation.evaluate_split(predict, PARAMS, split, chunk=2)
             for split in (clean, junk)]
  assert reports[0] == reports[1]


@pytest.mark.parametrize("chunk", [2, 4])
def test_padded_hospitals_contribute_nothing(predict, chunk):
  # 3 hospitals in chunks of 2 or 4: the last chunk is filled with copies of hospital 0,
  # which must not count twice.
  split = _split(PREDICTED, LABELS, COUNTS)
  one_call = evaluation.evaluate_split(predict, PARAMS, split, chunk=3)
  assert evaluation.evaluate_split(predict, PARAMS, split, chunk=chunk) == one_call
  assert one_call["num_examples"] == sum(COUNTS)


def test_hospital_without_examples_is_left_out_of_summaries(predict):
  split = _split(PREDICTED, LABELS, [3, 0, 4])
  report = evaluation.evaluate_split(predict, PARAMS, split, chunk=3)
  assert report["per_hospital"]["accuracy"] == pytest.approx([2 / 3, None, 3 / 4])
  assert report["per_hospital"]["summary"]["accuracy"]["num_hospitals"] == 2
  assert report["accuracy"] == pytest.approx(5 / 7)


def test_scalar_summary_flattens_with_prefix(predict):
  report = evaluation.evaluate_split(predict, PARAMS, _split(PREDICTED, LABELS, COUNTS),
                                     chunk=3)
  scalars = evaluation.scalar_summary(report, prefix="unseen_")
  summary = report["per_hospital"]["summary"]["accuracy"]
  assert scalars == {
      "unseen_loss": report["loss"], "unseen_accuracy": report["accuracy"],
      "unseen_auroc": report["auroc"], "unseen_balanced_accuracy": report["balanced_accuracy"],
      "unseen_mcc": report["mcc"], "unseen_f1": report["f1"], "unseen_ece": report["ece"],
      "unseen_mean_hospital_accuracy": summary["mean"],
      "unseen_worst_hospital_accuracy": summary["worst"],
      "unseen_worst10_hospital_accuracy": summary["worst10_mean"]}
  assert scalars["unseen_worst_hospital_accuracy"] == pytest.approx(0.5)

