"""Tests of the synthetic chest X-ray generator."""

import numpy as np
import pytest

from fedsim.data import synthetic


def test_same_seed_same_images_other_seed_other_images():
  a = synthetic.generate(num_examples=40, seed=3)
  b = synthetic.generate(num_examples=40, seed=3)
  c = synthetic.generate(num_examples=40, seed=4)
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.labels, b.labels)
  np.testing.assert_array_equal(a.patient_ids, b.patient_ids)
  assert not np.array_equal(a.images, c.images)


@pytest.mark.parametrize("size", [20, 28, 32])
def test_shapes_and_dtypes(size):
  d = synthetic.generate(num_examples=37, image_size=size, seed=0)
  assert d.images.shape == (37, size, size, 1)
  assert d.images.dtype == np.uint8
  assert d.labels.dtype == np.int32 and d.labels.shape == (37,)
  assert d.patient_ids.dtype == np.int64 and d.patient_ids.shape == (37,)
  assert d.class_names == ("normal", "bacterial", "viral")
  assert d.name == "synthetic_cxr"
  assert (d.mean, d.std) == (synthetic.MEAN, synthetic.STD)
  assert d.images.std() > 10  # not a blank image


def test_all_three_classes_present_with_default_prevalence():
  d = synthetic.generate(num_examples=300, seed=1)
  frac = np.bincount(d.labels, minlength=3) / len(d.labels)
  assert np.all(frac > 0.1), frac


def test_prevalence_argument_controls_classes():
  only_normal = synthetic.generate(num_examples=50, seed=0, prevalence=(1, 0, 0))
  assert np.all(only_normal.labels == 0)
  no_normal = synthetic.generate(num_examples=50, seed=0, prevalence=(0, 1, 1))
  assert np.all(no_normal.labels > 0)


@pytest.mark.parametrize("n", [1, 2, 7, 101])
def test_patients_have_one_to_four_consecutive_images_with_one_label(n):
  d = synthetic.generate(num_examples=n, seed=n)
  ids, counts = np.unique(d.patient_ids, return_counts=True)
  assert counts.sum() == n
  assert counts.min() >= 1 and counts.max() <= 4
  assert np.all(np.diff(d.patient_ids) >= 0)  # each patient's images are consecutive
  for p in ids:
    assert len(np.unique(d.labels[d.patient_ids == p])) == 1


def test_images_of_one_patient_are_similar_but_not_identical():
  d = synthetic.generate(num_examples=200, seed=2)
  ids, counts = np.unique(d.patient_ids, return_counts=True)
  p = ids[counts >= 2][0]
  a, b = d.images[d.patient_ids == p][:2].astype(float)
  other = d.images[d.patient_ids != p][0].astype(float)
  assert not np.array_equal(a, b)
  assert np.abs(a - b).mean() < np.abs(a - other).mean()


def test_lesions_brighten_the_lungs_on_average():
  # Consolidation and interstitial opacity add density inside the lungs, so the
  # class-mean images of both pneumonia classes are brighter than normal.
  d = synthetic.generate(num_examples=1500, seed=5)
  mean = [d.images[d.labels == c].mean() for c in range(3)]
  assert mean[1] > mean[0] + 1 and mean[2] > mean[0] + 1, mean


def test_published_pixel_statistics_match_the_generator():
  d = synthetic.generate(num_examples=2000, seed=11)
  x = d.images / 255.0
  assert abs(x.mean() - synthetic.MEAN) < 0.01
  assert abs(x.std() - synthetic.STD) < 0.01


@pytest.mark.parametrize("kwargs", [dict(num_examples=0), dict(num_examples=5, image_size=4),
                                    dict(num_examples=5, prevalence=(1, 1))])
def test_bad_arguments_raise(kwargs):
  with pytest.raises(ValueError):
    synthetic.generate(**kwargs)
