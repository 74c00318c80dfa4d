"""The Decathlon NIfTI loader on tiny volumes written with nibabel."""

import json

import ml_collections
import nibabel as nib
import numpy as np
import pytest

from fedsim.data import build_federated_data, nifti

# Volume v: x 24 voxels, y 16, z 3 + v slices, of which v + 1 show the organ.
NUM_VOLUMES = 3
HU = {0: -160.0, 1: 40.0, 2: 240.0}  # window bottom, middle, top -> 0, 128, 255


def _volume(v: int) -> tuple[np.ndarray, np.ndarray]:
  """Blocky masks (liver block, tumour block) whose HU encode the class; the air
  in the patient's right-most voxels (x = 21..23) encodes the volume (asymmetric:
  a transposed or flipped slice would misplace it)."""
  z = 3 + v
  mask = np.zeros((24, 16, z), np.int16)
  mask[4:16, 4:12, 1:2 + v] = 1
  mask[8:12, 6:10, 1] = 2
  hu = np.vectorize(HU.get)(mask).astype(np.float32)
  hu[-3:, :, :] = -160.0 + 40.0 * v   # RAS: the highest x is the patient's right
  return hu, mask


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("Task03_Liver")
  (root / "imagesTr").mkdir()
  (root / "labelsTr").mkdir()
  for v in range(NUM_VOLUMES):
    hu, mask = _volume(v)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(root / "imagesTr" / f"liver_{v + 10}.nii.gz"))
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(root / "labelsTr" / f"liver_{v + 10}.nii.gz"))
  (root / "imagesTr" / "._liver_10.nii.gz").write_bytes(b"macOS resource fork")
  (root / "dataset.json").write_text(json.dumps(
      {"labels": {"0": "background", "1": "liver", "2": "cancer"}}))
  return root


def _config(path, size=16, cap=0):
  return ml_collections.ConfigDict(dict(path=str(path), image_size=size,
                                        max_slices_per_patient=cap, data_dir=""))


def test_slices_keep_their_patient_and_orientation(task_dir):
  d = nifti.load(_config(task_dir, size=16))
  # Only slices showing the organ: volume v has v + 1; ids from the file names.
  np.testing.assert_array_equal(d.patient_ids, np.repeat([10, 11, 12], [1, 2, 3]))
  assert d.class_names == ("background", "liver", "cancer")
  assert d.images.shape == (6, 16, 16, 1) and d.labels.shape == (6, 16, 16)
  # Every slice's left-most column holds its own volume's air value (the patient's
  # right on the image's left: radiological view): no slice changed patient.
  expected = np.round(np.clip((-160 + 40 * (d.patient_ids - 10) + 160) / 400, 0, 1) * 255)
  np.testing.assert_allclose(d.images[:, 8, 0, 0], expected, atol=1)
  assert (d.labels[d.patient_ids == 10] == 2).any()  # the tumour slice is volume 10's


def test_masks_stay_aligned_with_images_after_resize(task_dir):
  d = nifti.load(_config(task_dir, size=12))
  expected = np.round((np.array([HU[k] for k in range(3)]) + 160) / 400 * 255)
  # Away from region borders (3x3 neighbourhood of one class) the bilinear image
  # shows the class its nearest-neighbour mask says.
  for img, mask in zip(d.images[..., 0].astype(float), d.labels, strict=True):
    for i in range(1, 11):
      for j in range(3, 11):  # columns 0-1 hold the volume's air marker
        block = mask[i - 1:i + 2, j - 1:j + 2]
        if (block == block[0, 0]).all():
          assert abs(img[i, j] - expected[mask[i, j]]) <= 2, (i, j, mask[i, j])
  assert set(np.unique(d.labels)) == {0, 1, 2}  # nearest neighbour: no new classes


def test_slices_per_patient_cap_and_patient_disjoint_federation(task_dir):
  d = nifti.load(_config(task_dir, size=8, cap=2))
  np.testing.assert_array_equal(np.bincount(d.patient_ids)[10:], [1, 2, 2])
  data_config = ml_collections.ConfigDict(dict(
      partition="iid", alpha=1.0, quantity_power=1.5, site_csv="", num_unseen=0,
      val_fraction=0.0, test_fraction=0.3, shift=0.0))
  fed = build_federated_data(d, data_config, num_clients=1, seed=0)
  # Whole patients per split: the split sizes are sums of patients' slice counts.
  assert fed.train.labels.shape[2:] == (8, 8)
  assert {int(fed.train.counts[0]), int(fed.test.counts[0])} in ({1, 4}, {2, 3})


def test_missing_folder_names_the_publisher(tmp_path):
  with pytest.raises(FileNotFoundError, match="medicaldecathlon.com"):
    nifti.load(_config(tmp_path / "Task03_Liver"))
  with pytest.raises(FileNotFoundError, match="imagesTr"):
    nifti.load(_config(tmp_path))
