"""Tests of the federation builder, the acquisition shift and the source dispatch."""

import dataclasses

import numpy as np
import pytest

from experiments import default
from fedsim import data as data_lib
from fedsim.data import federated, shift, synthetic

NUM_CLIENTS, NUM_UNSEEN = 4, 2


def _config(**data_overrides):
  c = default.get_config()
  c.num_clients = NUM_CLIENTS
  c.data.num_unseen = NUM_UNSEEN
  c.data.examples_per_client = 40
  c.data.image_size = 16
  for k, v in data_overrides.items():
    c.data[k] = v
  return c


def _indexed_dataset(num_examples=240, seed=0):
  """Synthetic data whose first two pixels encode the example index (to trace it)."""
  d = synthetic.generate(num_examples=num_examples, image_size=16, seed=seed)
  images = d.images.copy()
  index = np.arange(num_examples)
  images[:, 0, 0, 0], images[:, 0, 1, 0] = index // 256, index % 256
  return dataclasses.replace(d, images=images)


def _traced(arrays):
  """Original example index of every real example, per client: list of int arrays."""
  return [256 * arrays.images[k, :n, 0, 0, 0].astype(int) + arrays.images[k, :n, 0, 1, 0]
          for k, n in enumerate(arrays.counts)]


@pytest.fixture(scope="module")
def fed():
  c = _config(shift=1.0)
  return data_lib.make_federated_data(c)


@pytest.fixture(scope="module", params=["iid", "dirichlet", "quantity"])
def traced(request):
  c = _config(shift=0.0, partition=request.param)
  d = _indexed_dataset()
  return d, federated.build_federated_data(d, c.data, num_clients=NUM_CLIENTS, seed=0)


def test_shapes_dtypes_and_counts(fed):
  n = (NUM_CLIENTS + NUM_UNSEEN) * 40
  assert fed.num_clients == NUM_CLIENTS and fed.unseen.num_clients == NUM_UNSEEN
  assert fed.image_shape == (16, 16, 1) and fed.name == "synthetic_cxr"
  assert (fed.mean, fed.std) == (synthetic.MEAN, synthetic.STD)
  total = 0
  for arrays in (fed.train, fed.val, fed.test, fed.unseen):
    assert arrays.images.dtype == np.uint8
    for field in ("labels", "patients", "counts", "num_patients"):
      assert getattr(arrays, field).dtype == np.int32, field
    assert arrays.max_examples == arrays.counts.max()
    total += arrays.counts.sum()
  assert total == n
  assert fed.val.counts.min() >= 1 and fed.test.counts.min() >= 1


def test_padding_is_zero_and_patients_minus_one_beyond_counts(fed):
  for arrays in (fed.train, fed.val, fed.test, fed.unseen):
    pad = ~arrays.mask
    assert pad.any()  # hospitals differ in size, so some padding exists
    assert np.all(arrays.images[pad] == 0)
    assert np.all(arrays.labels[pad] == 0)
    assert np.all(arrays.patients[pad] == -1)
    np.testing.assert_array_equal(arrays.mask.sum(1), arrays.counts)
    for k, n in enumerate(arrays.counts):
      local = arrays.patients[k, :n]
      # local patient indices are exactly 0..p-1
      np.testing.assert_array_equal(np.unique(local), np.arange(arrays.num_patients[k]))


def test_every_example_lands_exactly_once(traced):
  d, f = traced
  seen = np.concatenate([i for a in (f.train, f.val, f.test, f.unseen) for i in _traced(a)])
  np.testing.assert_array_equal(np.sort(seen), np.arange(len(d.labels)))
  for a in (f.train, f.val, f.test, f.unseen):  # labels travel with images
    for k, idx in enumerate(_traced(a)):
      np.testing.assert_array_equal(a.labels[k, :len(idx)], d.labels[idx])


def test_patients_disjoint_across_hospitals_splits_and_unseen(traced):
  d, f = traced
  owner = {}
  for split in ("train", "val", "test", "unseen"):
    arrays = getattr(f, split)
    for k, idx in enumerate(_traced(arrays)):
      for p in np.unique(d.patient_ids[idx]):
        assert owner.setdefault(p, (split, k)) == (split, k), (p, owner[p], split, k)
      # the local index of a patient is the same for all its images
      local = arrays.patients[k, :len(idx)]
      for p in np.unique(d.patient_ids[idx]):
        assert len(np.unique(local[d.patient_ids[idx] == p])) == 1


def test_hospital_metadata(fed):
  h = fed.hospitals
  num_hospitals = NUM_CLIENTS + NUM_UNSEEN
  for key in ("site", "contrast", "brightness", "noise", "blur", "num_examples",
              "num_patients", "num_train_examples", "unseen"):
    assert h[key].shape == (num_hospitals,), key
  assert h["prevalence"].shape == (num_hospitals, 3)
  np.testing.assert_allclose(h["prevalence"].sum(1), 1)
  np.testing.assert_array_equal(h["num_train_examples"][:NUM_CLIENTS], fed.train.counts)
  assert np.all(h["num_train_examples"][NUM_CLIENTS:] == 0)
  np.testing.assert_array_equal(h["unseen"], np.arange(num_hospitals) >= NUM_CLIENTS)
  np.testing.assert_array_equal(h["num_examples"][NUM_CLIENTS:], fed.unseen.counts)
  assert len(np.unique(h["contrast"])) == num_hospitals  # each hospital its own scanner


def test_build_is_deterministic(fed):
  again = data_lib.make_federated_data(_config(shift=1.0))
  for split in ("train", "val", "test", "unseen"):
    np.testing.assert_array_equal(getattr(fed, split).images, getattr(again, split).images)
    np.testing.assert_array_equal(getattr(fed, split).patients, getattr(again, split).patients)


def test_shift_is_deterministic_per_hospital_and_identity_at_strength_zero():
  images = np.random.default_rng(0).integers(0, 256, (5, 12, 12, 3), dtype=np.uint8)
  a, pa = shift.acquisition_shift(images, hospital=3, seed=7, strength=1.0)
  b, pb = shift.acquisition_shift(images, hospital=3, seed=7, strength=1.0)
  c, _ = shift.acquisition_shift(images, hospital=4, seed=7, strength=1.0)
  assert a.shape == images.shape and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert pa == pb
  assert not np.array_equal(a, images) and not np.array_equal(a, c)
  same, params = shift.acquisition_shift(images, hospital=3, seed=7, strength=0.0)
  np.testing.assert_array_equal(same, images)
  assert params == dict(contrast=1.0, brightness=0.0, noise=0.0, blur=0.0)


def test_shift_strength_scales_the_effect():
  images = synthetic.generate(num_examples=20, image_size=16, seed=0).images
  diff = [np.abs(shift.acquisition_shift(images, hospital=1, seed=0, strength=s)[0]
                 .astype(float) - images).mean() for s in (0.25, 2.0)]
  assert diff[0] < diff[1]


def test_shift_at_strength_zero_gives_the_unshifted_federation():
  c = _config(shift=0.0)
  d = _indexed_dataset()
  f = federated.build_federated_data(d, c.data, num_clients=NUM_CLIENTS, seed=0)
  for k, idx in enumerate(_traced(f.train)):
    np.testing.assert_array_equal(f.train.images[k, :len(idx)], d.images[idx])


def test_natural_partition_from_site_csv(tmp_path):
  d = _indexed_dataset()
  ids = np.unique(d.patient_ids)
  site = {p: ["north", "south", "east", "west", "mid", "far"][i % 6] for i, p in enumerate(ids)}
  csv = tmp_path / "sites.csv"
  csv.write_text("patient_id,site\n" + "".join(f"{p},{site[p]}\n" for p in ids))
  c = _config(shift=0.0, partition="natural", site_csv=str(csv))
  f = federated.build_federated_data(d, c.data, num_clients=NUM_CLIENTS, seed=0)
  names = np.array(sorted(set(site.values())))
  np.testing.assert_array_equal(f.hospitals["site"], names)
  for k, idx in enumerate(_traced(f.train)):
    assert {site[p] for p in d.patient_ids[idx]} == {names[k]}
  csv.write_text("patient_id,site\n" + "".join(f"{p},a\n" for p in ids[1:]))
  with pytest.raises(ValueError, match="no site for 1 patients"):
    federated.build_federated_data(d, c.data, num_clients=NUM_CLIENTS, seed=0)


def test_natural_partition_without_sites_is_a_clear_error():
  c = _config(partition="natural")
  with pytest.raises(ValueError, match="needs sites"):
    federated.build_federated_data(_indexed_dataset(), c.data, num_clients=NUM_CLIENTS, seed=0)


@pytest.mark.parametrize("field,value,match", [
    ("partition", "bogus", "data.partition='bogus'"),
    ("val_fraction", 0.9, "data.val_fraction"),
    ("num_unseen", -1, "data.num_unseen"),
    ("shift", -1.0, "data.shift"),
])
def test_bad_data_config_is_rejected(field, value, match):
  c = _config(**{field: value})
  with pytest.raises(ValueError, match=match):
    federated.build_federated_data(_indexed_dataset(), c.data, num_clients=NUM_CLIENTS, seed=0)


def test_load_dataset_sizes_synthetic_for_the_federation_and_rejects_unknown_sources():
  c = _config()
  d = data_lib.load_dataset(c.data, num_clients=NUM_CLIENTS, seed=0)
  assert d.images.shape == ((NUM_CLIENTS + NUM_UNSEEN) * 40, 16, 16, 1)
  c.data.source = "nope"
  allowed = r"data.source='nope'.*image_folder.*medmnist.*synthetic.*tfds"
  with pytest.raises(ValueError, match=allowed):
    data_lib.load_dataset(c.data, num_clients=NUM_CLIENTS, seed=0)


def test_no_unseen_hospitals_gives_none():
  c = _config(num_unseen=0)
  f = data_lib.make_federated_data(c)
  assert f.unseen is None and f.num_clients == NUM_CLIENTS
