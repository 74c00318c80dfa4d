"""The DICOM loader reads real DICOM files that pydicom writes here (Part 10 files with
an uncompressed or compressed transfer syntax), through the users' code path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLosslessSV1, generate_uid

from experiments import default
from fedsim import config as config_lib
from fedsim.data import build_federated_data, dicom, load_dataset

ROOT = Path(__file__).resolve().parents[3]


def write_dicom(path: Path, pixels: np.ndarray, *, patient: str = "P1", study: str = "",
                photometric: str = "MONOCHROME2", pixel_data: bytes | None = b"",
                **header) -> Path:
  """A Part 10 CT file holding `pixels` (uint16/int16 `[H, W]`, or uint8 `[H, W, 3]` RGB).

  `pixel_data` replaces the raw pixels (encapsulated bytes); None writes none.
  """
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = CTImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
  meta.TransferSyntaxUID = header.pop("transfer_syntax", ExplicitVRLittleEndian)
  ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
  ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
  ds.PatientID, ds.Modality = patient, "CT"
  ds.StudyInstanceUID = study or generate_uid(entropy_srcs=[patient])
  ds.SeriesInstanceUID = generate_uid(entropy_srcs=[patient, "series"])
  ds.Rows, ds.Columns = pixels.shape[:2]
  ds.PhotometricInterpretation = photometric
  ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
  if pixels.ndim == 3:
    ds.PlanarConfiguration = 0
  ds.BitsAllocated = ds.BitsStored = 8 * pixels.dtype.itemsize
  ds.HighBit = ds.BitsStored - 1
  ds.PixelRepresentation = int(np.issubdtype(pixels.dtype, np.signedinteger))
  for keyword, value in header.items():
    setattr(ds, keyword, value)
  if pixel_data is not None:
    ds.PixelData = pixel_data or pixels.tobytes()
  path.parent.mkdir(parents=True, exist_ok=True)
  ds.save_as(path, enforce_file_format=True)
  return path


def _config(path, **fields):
  data = default.get_config().data
  data.source, data.path, data.image_size = "dicom", str(path), 8
  for name, value in fields.items():
    data[name] = value
  return data


def _one_line(err) -> str:
  assert "\n" not in str(err.value)
  return str(err.value)


RAW = np.array([[0, 400, 500, 531], [532, 600, 730, 800],
                [1000, 1200, 1400, 2000], [100, 516, 515, 700]], np.int16)


def _expected(raw, *, slope, intercept, center, width):
  """DICOM PS3.3 C.11.2.1.2.1 LINEAR, by hand, to [0, 255]."""
  x = raw.astype(np.float64) * slope + intercept
  lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
  y = np.where(x <= lo, 0.0, np.where(x > hi, 1.0, (x - (center - 0.5)) / (width - 1) + 0.5))
  return np.rint(y * 255).astype(np.uint8)


def test_rescale_then_window_equal_a_hand_computation(tmp_path):
  # Slope 2, intercept -1024: HU = 2 raw - 1024; windows are multi-valued (first used).
  write_dicom(tmp_path / "a" / "x.dcm", RAW, RescaleSlope=2, RescaleIntercept=-1024,
              WindowCenter=[40, -600], WindowWidth=[400, 1500])
  image = dicom.load(_config(tmp_path, image_size=4)).images[0, ..., 0]
  want = _expected(RAW, slope=2, intercept=-1024, center=40, width=400)
  np.testing.assert_array_equal(image, want)
  assert want.min() == 0 and want.max() == 255 and 0 < want[3, 1] < 255  # all three pieces
  fixed = dicom.load(_config(tmp_path, image_size=4, window_center=-600.0,
                             window_width=1500.0)).images[0, ..., 0]
  np.testing.assert_array_equal(
      fixed, _expected(RAW, slope=2, intercept=-1024, center=-600, width=1500))
  np.testing.assert_allclose(  # the two other VOI LUT functions of C.11.2.1.3
      dicom.voi_window(np.array([-10.0, 0.0, 5.0]), center=0, width=20,
                       function="LINEAR_EXACT"), [0.0, 0.5, 0.75])
  np.testing.assert_allclose(
      dicom.voi_window(np.array([0.0, 5.0]), center=0, width=20, function="SIGMOID"),
      [0.5, 1 / (1 + np.exp(-1.0))])


def test_photometric_interpretation(tmp_path):
  raw = RAW.astype(np.uint16)
  write_dicom(tmp_path / "a" / "1.dcm", raw, photometric="MONOCHROME1")
  write_dicom(tmp_path / "a" / "2.dcm", raw, photometric="MONOCHROME2")
  rgb = np.stack([np.full((4, 4), 200), np.full((4, 4), 100), np.zeros((4, 4))], -1)
  write_dicom(tmp_path / "a" / "3.dcm", rgb.astype(np.uint8), photometric="RGB")
  images = dicom.load(_config(tmp_path, image_size=4)).images[..., 0].astype(int)
  # No window in the header: each image's own min..max; MONOCHROME1 is its negative.
  unit = (raw - raw.min()) / (raw.max() - raw.min())
  np.testing.assert_array_equal(images[1], np.rint(unit * 255))
  np.testing.assert_array_equal(images[0], np.rint((1 - unit) * 255))
  np.testing.assert_array_equal(images[2], np.rint(0.299 * 200 + 0.587 * 100))
  write_dicom(tmp_path / "a" / "4.dcm", raw, photometric="PALETTE COLOR")
  with pytest.raises(ValueError) as err:
    dicom.load(_config(tmp_path, image_size=4))
  assert "a/4.dcm" in _one_line(err) and "PALETTE COLOR" in str(err.value)


def _archive(root: Path, *, sites=("north", "south"), patients=6, slices=2) -> Path:
  """Two sites, `patients` patients each with `slices` 16x16 slices; folders are
  classes (a patient's slices share one)."""
  rng = np.random.default_rng(0)
  for s, site in enumerate(sites):
    for p in range(patients):
      label = ("normal", "lesion")[p % 2]
      for k in range(slices):
        pixels = rng.integers(0, 4096, (16, 16)).astype(np.uint16)
        write_dicom(root / label / f"{site}-{p}-{k}.dcm", pixels, patient=f"{s}{p:03d}",
                    InstitutionName=site, RescaleIntercept=-1024, RescaleSlope=1,
                    WindowCenter=1000, WindowWidth=2000)
  return root


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
  return _archive(tmp_path_factory.mktemp("dicom") / "archive")


def test_patients_and_sites_from_headers_give_patient_disjoint_splits(archive, monkeypatch):
  c = default.get_config()
  c.data = _config(archive, site_field="InstitutionName", partition="natural",
                   num_unseen=0, shift=0.0, val_fraction=0.2, test_fraction=0.3)
  ds = load_dataset(c.data, num_clients=2, seed=0)
  assert ds.class_names == ("lesion", "normal") and ds.images.shape == (24, 8, 8, 1)
  assert len(np.unique(ds.patient_ids)) == 12
  for p in np.unique(ds.patient_ids):  # a patient's slices: one id, one site, one label
    assert len(set(ds.sites[ds.patient_ids == p])) == 1
    assert np.sum(ds.patient_ids == p) == 2
  monkeypatch.setattr(dicom, "read_file", None)  # the second load reads the cache
  again = load_dataset(c.data, num_clients=2, seed=0)
  np.testing.assert_array_equal(again.sites, ds.sites)
  np.testing.assert_array_equal(again.images, ds.images)
  fed = build_federated_data(again, c.data, num_clients=2, seed=0)
  assert list(fed.hospitals["site"]) == ["north", "south"]
  seen = {}
  for name in ("train", "val", "test"):
    split = getattr(fed, name)
    for h in range(2):
      images = split.images[h, :split.counts[h]]
      for image in images:  # each image back to its patient through its pixels
        (i,) = np.flatnonzero((ds.images == image).all(axis=(1, 2, 3)))
        assert seen.setdefault(int(ds.patient_ids[i]), (name, h)) == (name, h)
        assert ds.sites[i] == ("north", "south")[h]
  assert len(seen) == 12


def test_labels_and_sites_from_a_csv(archive, tmp_path):
  ds = dicom.load(_config(archive, data_dir=str(tmp_path)))
  rows = "".join(f"{s}{p:03d},{'yes' if p < 2 else 'no'},{'AB'[s]}\n"
                 for s in range(2) for p in range(6))
  labels = tmp_path / "labels.csv"
  labels.write_text("PatientID,label,site\n" + rows)
  by_csv = dicom.load(_config(archive, labels_csv=str(labels), data_dir=str(tmp_path)))
  assert by_csv.class_names == ("no", "yes") and set(by_csv.sites) == {"A", "B"}
  np.testing.assert_array_equal(by_csv.patient_ids, ds.patient_ids)
  assert by_csv.labels.sum() == 8  # 2 sites x 2 patients x 2 slices
  labels.write_text("PatientID,path,label\n" + rows)
  with pytest.raises(ValueError) as err:  # two key columns: ambiguous
    dicom.load(_config(archive, labels_csv=str(labels)))
  assert "exactly one key column" in _one_line(err)
  labels.write_text("PatientID,label\n" + rows.replace("0000,yes", "0000,no")[10:])
  with pytest.raises(ValueError) as err:
    dicom.load(_config(archive, labels_csv=str(labels)))
  assert "no PatientID row for 2 of 24" in _one_line(err)


def test_folder_labels_refuse_what_is_not_a_class_folder(tmp_path):
  for patient in ("0007", "0012"):  # an archive export: PatientID/ folders, not classes
    write_dicom(tmp_path / patient / "study" / "1.dcm", RAW, patient=patient)
  with pytest.raises(ValueError) as err:
    dicom.load(_config(tmp_path, image_size=4))
  assert "named after PatientIDs, not classes" in _one_line(err)
  write_dicom(tmp_path / "loose.dcm", RAW)
  with pytest.raises(ValueError) as err:
    dicom.load(_config(tmp_path, image_size=4))
  assert "DICOM file loose.dcm lies directly in data.path" in _one_line(err)


def test_unreadable_files_are_refused_by_name_and_nothing_cached(archive, tmp_path):
  root = shutil.copytree(archive, tmp_path / "copy")
  cache_dir = tmp_path / "cache"
  good = (root / "normal" / "north-0-0.dcm").read_bytes()
  (root / "normal" / "zz-truncated.dcm").write_bytes(good[:-100])
  (root / "lesion" / "notes.txt").write_text("not an image")
  for name, part in [("lesion/notes.txt", "not a DICOM file"),
                     ("normal/zz-truncated.dcm", "cannot")]:
    with pytest.raises(ValueError) as err:  # the first refusal in path order
      dicom.load(_config(root, data_dir=str(cache_dir)))
    message = _one_line(err)
    assert f"DICOM file {name}: {part}" in message and "data.skip_unreadable=True" in message
    assert not cache_dir.exists()  # nothing half-cached
    (root / "lesion" / "notes.txt").unlink(missing_ok=True)
  (root / "lesion" / "notes.txt").write_text("not an image")
  ds = dicom.load(_config(root, data_dir=str(cache_dir), skip_unreadable=True))
  assert len(ds.images) == 24 and len(list(cache_dir.glob("*.npz"))) == 1


def test_no_pixel_data_and_compressed_without_decoder(tmp_path):
  report = write_dicom(tmp_path / "a" / "report.dcm", RAW, pixel_data=None)
  with pytest.raises(ValueError) as err:
    dicom.load(_config(tmp_path))
  assert "a/report.dcm: has no pixel data" in _one_line(err)
  report.unlink()
  if get_decoder(JPEGLosslessSV1).is_available:
    pytest.skip("a JPEG Lossless decoder is installed here")
  write_dicom(tmp_path / "a" / "jpeg.dcm", RAW, transfer_syntax=JPEGLosslessSV1,
              pixel_data=encapsulate([b"\xff\xd8\xff\xc3" + bytes(60)]))
  with pytest.raises(ValueError) as err:
    dicom.load(_config(tmp_path))
  message = _one_line(err)
  assert "a/jpeg.dcm: compressed as JPEG Lossless" in message
  assert "pylibjpeg" in message and "python-gdcm" in message


def test_dicom_fields_are_refused_for_other_sources():
  c = default.get_config()
  c.data.labels_csv = "labels.csv"
  with pytest.raises(ValueError, match="data.labels_csv='labels.csv' must be left unset"):
    config_lib.validate(c)
  c = default.get_config()
  c.data.source, c.data.path, c.data.window_width = "dicom", "x", 0.5
  with pytest.raises(ValueError, match=r"data.window_width=0.5 must be >= 1"):
    config_lib.validate(c)


def test_launch_trains_on_a_dicom_folder(archive, tmp_path):
  # Two hospitals, one per InstitutionName (the natural partition), 6 patients each.
  workdir = tmp_path / "run"
  args = ["--config.data.source=dicom", f"--config.data.path={archive}",
          f"--config.data.data_dir={tmp_path / 'cache'}",
          "--config.data.site_field=InstitutionName", "--config.data.partition=natural",
          "--config.num_clients=2", "--config.clients_per_round=2",
          "--config.num_rounds=1", "--config.data.num_unseen=0",
          "--config.data.image_size=8", "--config.data.val_fraction=0.2",
          "--config.data.test_fraction=0.3", "--config.client.batch_size=4",
          "--config.client.local_steps=1", "--config.dp.max_batch_size=0",
          "--config.dp.accountant=rdp", "--config.engine.unroll=1",
          "--config.model=cnn", f"--workdir={workdir}"]
  result = subprocess.run([sys.executable, "launch.py", "--noprogress", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr
  assert "rounds 1" in result.stdout
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["privacy_unit"] == "patient" and summary["num_clients"] == 2
  assert len(list((tmp_path / "cache").glob("dicom_archive-8px-*.npz"))) == 1
