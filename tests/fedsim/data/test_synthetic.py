"""Tests of the synthetic chest X-ray generator."""

import numpy as np
import pytest

from experiments import default
from fedsim import data as data_lib
from fedsim.data import shift, synthetic


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


def test_classes_follow_the_default_prevalence_per_patient():
  # ~1,600 patients: each class fraction has sd <= 0.0125, so 0.05 is 4 sd
  # (false-failure probability < 1e-4 per class for a fresh seed).
  d = synthetic.generate(num_examples=4000, image_size=8, seed=21)
  _, first = np.unique(d.patient_ids, return_index=True)
  frac = np.bincount(d.labels[first], minlength=3) / len(first)
  np.testing.assert_allclose(frac, synthetic.DEFAULT_PREVALENCE, atol=0.05)


def test_images_per_patient_are_uniform_on_one_to_four():
  # Documented: 1-4 images per patient, mean 2.5 (the last patient may be cut
  # short to hit num_examples exactly, so it is left out). ~1,600 patients: the
  # mean has sd 0.028 and each count's share sd 0.011; bounds are 4 sd or more.
  d = synthetic.generate(num_examples=4000, image_size=8, seed=22)
  _, counts = np.unique(d.patient_ids, return_counts=True)
  counts = counts[:-1]
  assert set(counts.tolist()) == set(range(1, synthetic.MAX_IMAGES_PER_PATIENT + 1))
  assert abs(counts.mean() - 2.5) < 0.12, counts.mean()
  np.testing.assert_allclose(np.bincount(counts, minlength=5)[1:] / len(counts), 0.25,
                             atol=0.05)


@pytest.mark.parametrize("size", [16, 28])
def test_same_seed_is_bit_identical_at_any_size_and_seeds_differ(size):
  a = synthetic.generate(num_examples=30, image_size=size, seed=9)
  b = synthetic.generate(num_examples=30, image_size=size, seed=9)
  c = synthetic.generate(num_examples=30, image_size=size, seed=10)
  assert a.images.tobytes() == b.images.tobytes()
  assert a.labels.tobytes() == b.labels.tobytes()
  assert a.patient_ids.tobytes() == b.patient_ids.tobytes()
  # Every image differs between seeds (fresh anatomy and detector noise), and so
  # do the labels and the patient structure.
  assert np.all(np.any(a.images != c.images, axis=(1, 2, 3)))
  assert not np.array_equal(a.labels, c.labels)
  assert not np.array_equal(a.patient_ids, c.patient_ids)


def test_chunked_rendering_does_not_change_the_images(monkeypatch):
  # Large requests are rendered in chunks; the chunk size is a memory knob only.
  whole = synthetic.generate(num_examples=25, image_size=16, seed=4)
  monkeypatch.setattr(synthetic, "_CHUNK_PIXELS", 7 * 16 * 16)  # chunks of 7 images
  chunked = synthetic.generate(num_examples=25, image_size=16, seed=4)
  np.testing.assert_array_equal(whole.images, chunked.images)


def test_lesion_parameters_follow_the_class():
  # Normal: no haze, at most a faint small nuisance shadow in about a quarter;
  # bacterial: a consolidation, no haze; viral: haze and a reticular net, no
  # consolidation. A fixed fraction of pneumonias is subtle (hard cases).
  rng = np.random.default_rng(0)
  labels = rng.choice(3, size=6000, p=synthetic.DEFAULT_PREVALENCE)
  q = synthetic._patient_params(rng, labels)
  normal, bacterial, viral = (labels == c for c in range(3))
  assert np.all(q["haze"][~viral] == 0) and np.all(q["reticular"][~viral] == 0)
  assert np.all(q["cons"][viral] == 0)
  assert np.all(q["haze"][viral] > 0) and np.all(q["cons"][bacterial] > 0)
  shadow = normal & (q["cons"] > 0)
  assert np.all(q["cons"][normal] <= 0.08) and np.all(q["cons_r"][shadow] < 0.12)
  assert np.all(q["cons_r"][bacterial] >= 0.2)
  # ~1,600 normal patients: the nuisance share has sd 0.011 (0.05 = 4.5 sd).
  assert abs(np.mean(q["cons"][normal] > 0) - synthetic.NUISANCE_FRACTION) < 0.05
  # Bilateral consolidation only in bacterial patients, in about BILATERAL_FRACTION.
  assert np.all(q["cons_other"][~bacterial] == 0)
  assert abs(np.mean(q["cons_other"][bacterial] > 0) - synthetic.BILATERAL_FRACTION) < 0.03
  # Subtle disease (severity <= 0.35 against >= 0.6 for plain cases) in about
  # HARD_FRACTION of the pneumonias: consolidation <= 0.35 * 0.38 = 0.133 (plain
  # >= 0.6 * 0.28 = 0.168), haze <= 0.35 * 0.24 = 0.084 (plain >= 0.6 * 0.16 = 0.096).
  subtle = np.concatenate([q["cons"][bacterial] < 0.15, q["haze"][viral] < 0.09])
  plain = np.concatenate([q["cons"][bacterial] > 0.165, q["haze"][viral] > 0.095])
  assert np.all(subtle | plain)  # nothing in between: two distinct groups
  assert abs(subtle.mean() - synthetic.HARD_FRACTION) < 0.025, subtle.mean()


def test_bacterial_films_are_one_sided_and_viral_films_hazy_on_both_sides():
  # Mean grey level of a box over each lung field (28x28): consolidation fills a
  # lobe of one lung, so bacterial films are lopsided; viral haze lightens both.
  d = synthetic.generate(num_examples=3000, image_size=28, seed=5)
  img = d.images[..., 0].astype(float)
  left, right = img[:, 7:20, 5:12].mean((1, 2)), img[:, 7:20, 16:23].mean((1, 2))
  lopsided = np.abs(left - right)
  lungs = (left + right) / 2
  by_class = lambda v: [np.median(v[d.labels == c]) for c in range(3)]
  asym, level = by_class(lopsided), by_class(lungs)
  assert asym[1] > asym[0] + 4 and asym[1] > asym[2] + 3, asym
  assert level[2] > level[0] + 20 and level[2] > level[1] + 10, level


def test_acquisition_shift_gives_each_hospital_its_own_image_statistics():
  # The same films through 12 hospitals' scanners: with shift > 0 the mean grey
  # level follows each scanner's brightness and the spread of grey levels its
  # contrast; with shift = 0 every hospital sees identical films.
  base = synthetic.generate(num_examples=48, image_size=16, seed=0).images
  stats, params = [], []
  for h in range(12):
    out, p = shift.acquisition_shift(base, hospital=h, seed=0, strength=1.0)
    stats.append((out.mean(), out.std()))
    params.append((p["brightness"], np.log(p["contrast"])))
    same, _ = shift.acquisition_shift(base, hospital=h, seed=0, strength=0.0)
    np.testing.assert_array_equal(same, base)
  stats, params = np.array(stats), np.array(params)
  assert stats[:, 0].std() > 5 and stats[:, 1].std() > 2, stats  # grey levels
  assert len(np.unique(stats[:, 0].round(3))) == 12
  assert np.corrcoef(stats[:, 0], params[:, 0])[0, 1] > 0.8
  assert np.corrcoef(stats[:, 1], params[:, 1])[0, 1] > 0.8


@pytest.mark.parametrize("strength", [0.0, 1.0])
def test_hospitals_of_a_federation_differ_in_image_statistics_only_with_shift(strength):
  # iid hospitals of one pooled set (~70 training images each): without shift
  # their mean grey levels differ by sampling alone (sd ~1.5 levels, bound 3.5);
  # a shift of strength 1 adds each scanner's brightness (sd 12.75 levels: the
  # sd over 12 hospitals falls below 5 with probability ~1e-3).
  c = default.get_config()
  c.num_clients, c.data.num_unseen, c.data.examples_per_client = 12, 0, 100
  c.data.image_size, c.data.partition, c.data.shift = 16, "iid", strength
  fed = data_lib.make_federated_data(c)
  means = [fed.train.images[k, :n].mean() for k, n in enumerate(fed.train.counts)]
  if strength == 0:
    assert np.std(means) < 3.5, means
  else:
    assert np.std(means) > 5, means
