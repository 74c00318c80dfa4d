"""Tests of the hospital partitioners and the patient-disjoint splits."""

import numpy as np
import pytest

from fedsim import partition


def _toy(num_patients=200, num_classes=3, seed=0):
  """Patients with 1-4 examples each (ids shuffled, not consecutive) and one label."""
  rng = np.random.default_rng(seed)
  per_patient = rng.integers(1, 5, size=num_patients)
  patient_ids = np.repeat(rng.permutation(10 * num_patients)[:num_patients] + 7,
                          per_patient)
  labels = np.repeat(rng.integers(0, num_classes, size=num_patients), per_patient)
  order = rng.permutation(len(labels))
  return patient_ids[order], labels[order]


def _patients_per_hospital(hospital, patient_ids, num_hospitals):
  return np.array([len(np.unique(patient_ids[hospital == h])) for h in range(num_hospitals)])


def _assert_patient_disjoint(groups, patient_ids):
  """Every patient's examples all carry the same group."""
  for p in np.unique(patient_ids):
    assert len(np.unique(groups[patient_ids == p])) == 1, p


OPTIONS = {"iid": {}, "dirichlet": dict(alpha=0.3), "quantity": dict(power=1.5)}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_partition_covers_every_example_once_and_keeps_patients_whole(name):
  patient_ids, labels = _toy()
  hospital = partition.partition(name, patient_ids, labels, num_hospitals=10,
                                 rng=np.random.default_rng(1), **OPTIONS[name])
  assert hospital.shape == labels.shape and hospital.dtype == np.int32
  assert hospital.min() >= 0 and hospital.max() < 10
  _assert_patient_disjoint(hospital, patient_ids)
  assert _patients_per_hospital(hospital, patient_ids, 10).min() >= partition.MIN_PATIENTS


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_partition_is_deterministic_given_the_rng_seed(name):
  patient_ids, labels = _toy()
  def run(seed):
    return partition.partition(name, patient_ids, labels, num_hospitals=7,
                               rng=np.random.default_rng(seed), **OPTIONS[name])
  np.testing.assert_array_equal(run(3), run(3))
  assert not np.array_equal(run(3), run(4))


def test_iid_sizes_differ_by_at_most_one_patient():
  patient_ids, labels = _toy(num_patients=103)
  hospital = partition.iid(patient_ids, labels, num_hospitals=10, rng=np.random.default_rng(0))
  sizes = _patients_per_hospital(hospital, patient_ids, 10)
  assert sizes.sum() == 103 and sizes.max() - sizes.min() <= 1


def _mean_label_skew(hospital, labels, num_hospitals):
  """Mean total-variation distance of hospital label distributions from the global one."""
  glob = np.bincount(labels, minlength=3) / len(labels)
  tv = [0.5 * np.abs(np.bincount(labels[hospital == h], minlength=3)
                     / (hospital == h).sum() - glob).sum() for h in range(num_hospitals)]
  return float(np.mean(tv))


def test_small_dirichlet_alpha_skews_labels_more_than_large_alpha():
  patient_ids, labels = _toy(num_patients=600)
  skew = {}
  for alpha in (0.1, 100.0):
    hospital = partition.dirichlet(patient_ids, labels, num_hospitals=10, alpha=alpha,
                                   rng=np.random.default_rng(0))
    skew[alpha] = _mean_label_skew(hospital, labels, 10)
  assert skew[0.1] > 0.3 > 0.1 > skew[100.0], skew


def test_quantity_skew_grows_with_power():
  patient_ids, labels = _toy(num_patients=500)
  spread = {}
  for power in (0.0, 1.0, 2.0):
    hospital = partition.quantity(patient_ids, labels, num_hospitals=10, power=power,
                                  rng=np.random.default_rng(0))
    sizes = _patients_per_hospital(hospital, patient_ids, 10)
    assert sizes.sum() == 500 and sizes.min() >= partition.MIN_PATIENTS
    spread[power] = sizes.max() / sizes.min()
  assert spread[0.0] <= 51 / 49  # equal sizes up to rounding
  assert spread[0.0] < spread[1.0] < spread[2.0], spread
  assert spread[2.0] > 20


def test_natural_follows_sites_in_sorted_order():
  patient_ids, labels = _toy(num_patients=60)
  site_of_patient = {p: [30, 10, 20][i % 3] for i, p in enumerate(np.unique(patient_ids))}
  sites = np.array([site_of_patient[p] for p in patient_ids])
  hospital = partition.natural(patient_ids, labels, sites=sites, num_hospitals=3)
  np.testing.assert_array_equal(partition.natural_sites(patient_ids, sites), [10, 20, 30])
  np.testing.assert_array_equal(np.array([10, 20, 30])[hospital], sites)


def test_natural_rejects_wrong_hospital_count_and_tiny_sites():
  patient_ids, labels = _toy(num_patients=30)
  sites = (patient_ids % 2).astype(np.int32)
  with pytest.raises(ValueError, match="found 2 sites"):
    partition.natural(patient_ids, labels, sites=sites, num_hospitals=3)
  sites_tiny = np.where(patient_ids == patient_ids[0], 5, sites)
  with pytest.raises(ValueError, match=r"sites \[5\]"):
    partition.natural(patient_ids, labels, sites=sites_tiny)
  with pytest.raises(ValueError, match="needs sites"):
    partition.natural(patient_ids, labels, sites=None)


def test_unknown_partition_name_lists_allowed_names():
  allowed = r"data.partition='bogus'.*dirichlet.*iid.*natural.*quantity"
  with pytest.raises(ValueError, match=allowed):
    partition.get_partitioner("bogus")


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_too_few_patients_for_the_minimum_raises(name):
  patient_ids, labels = _toy(num_patients=8)
  with pytest.raises(ValueError, match="cannot give 3 hospitals"):
    partition.partition(name, patient_ids, labels, num_hospitals=3,
                        rng=np.random.default_rng(0), **OPTIONS[name])


def test_dirichlet_tops_up_starved_hospitals():
  # alpha=0.01 puts each class in about one hospital; the rest must be topped up.
  patient_ids, labels = _toy(num_patients=100)
  hospital = partition.dirichlet(patient_ids, labels, num_hospitals=20, alpha=0.01,
                                 rng=np.random.default_rng(0))
  assert _patients_per_hospital(hospital, patient_ids, 20).min() >= partition.MIN_PATIENTS


@pytest.mark.parametrize("num_patients", [3, 4, 5, 9, 30])
def test_split_patients_is_disjoint_and_every_split_gets_a_patient(num_patients):
  patient_ids, _ = _toy(num_patients=num_patients, seed=num_patients)
  split = partition.split_patients(patient_ids, (0.7, 0.1, 0.2), np.random.default_rng(0))
  assert split.shape == patient_ids.shape
  _assert_patient_disjoint(split, patient_ids)
  per_split = _patients_per_hospital(split, patient_ids, 3)
  assert per_split.sum() == num_patients and per_split.min() >= 1


def test_split_patients_follows_fractions_and_serves_largest_first_when_short():
  patient_ids, _ = _toy(num_patients=100)
  split = partition.split_patients(patient_ids, (0.7, 0.1, 0.2), np.random.default_rng(0))
  np.testing.assert_array_equal(_patients_per_hospital(split, patient_ids, 3), [70, 10, 20])
  two, _ = _toy(num_patients=2)
  split = partition.split_patients(two, (0.7, 0.1, 0.2), np.random.default_rng(0))
  np.testing.assert_array_equal(_patients_per_hospital(split, two, 3), [1, 0, 1])
  zero_val = partition.split_patients(patient_ids, (0.8, 0.0, 0.2), np.random.default_rng(0))
  assert not np.any(zero_val == 1)


def test_split_patients_rejects_bad_fractions():
  with pytest.raises(ValueError, match="sum to 1"):
    partition.split_patients(np.arange(5), (0.5, 0.2), np.random.default_rng(0))


def test_prevalence_partition_equal_sizes_skewed_mix():
  from fedsim import partition as p
  rng = np.random.default_rng(0)
  labels = rng.choice(3, size=600, p=[0.3, 0.45, 0.25])
  patients = np.arange(600)
  skewed = p.prevalence(patients, labels, num_hospitals=10, rng=np.random.default_rng(1),
                        alpha=0.3)
  mild = p.prevalence(patients, labels, num_hospitals=10, rng=np.random.default_rng(1),
                      alpha=100.0)
  for hospital in (skewed, mild):
    sizes = np.bincount(hospital, minlength=10)
    assert sizes.sum() == 600 and sizes.max() - sizes.min() <= 1
  def spread(hospital):
    mix = np.stack([np.bincount(labels[hospital == h], minlength=3) / 60 for h in range(10)])
    return np.abs(mix - mix.mean(0)).sum(1).mean()
  assert spread(skewed) > 2 * spread(mild)
