"""Loaders read small files of their real formats through the users' code path.

MedMNIST: .npz files with the published keys. Image folder: a tiny Kermany chest
X-ray tree of JPEG/PNG files of varied sizes and modes. TFDS: real array_record
data sets prepared on disk by the registered TFDS builders with their download
replaced by a generator (no network, no TensorFlow).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from experiments import default
from fedsim.data import cache, image_folder, medmnist, tfds_source


def _data_config(path: Path | str, *, image_size: int = 28,
                 data_dir: Path | str = "") -> ml_collections.ConfigDict:
  config = default.get_config().data
  config.path = str(path)
  config.image_size = image_size
  config.data_dir = str(data_dir)
  return config


def _one_line(err: pytest.ExceptionInfo) -> str:
  message = str(err.value)
  assert "\n" not in message
  return message


# MedMNIST -------------------------------------------------------------------


def _medmnist_arrays(sizes=(5, 2, 3), *, hw=28, channels=0, num_classes=2):
  """MedMNIST-shaped splits; image i of the pool is constant grey/colour."""
  arrays, offset = {}, 0
  for split, n in zip(medmnist.SPLITS, sizes, strict=True):
    values = (np.arange(offset, offset + n) * 20 + 10).astype(np.uint8)
    shape = (n, hw, hw) + ((channels,) if channels else ())
    images = np.broadcast_to(values.reshape((n,) + (1,) * (len(shape) - 1)), shape)
    arrays[f"{split}_images"] = np.ascontiguousarray(images)
    arrays[f"{split}_labels"] = (np.arange(offset, offset + n) % num_classes
                                 ).astype(np.uint8)[:, None]
    offset += n
  return arrays


def test_medmnist_grayscale_pools_splits(tmp_path):
  path = tmp_path / "pneumoniamnist.npz"
  np.savez_compressed(path, **_medmnist_arrays())
  ds = medmnist.load(_data_config(path, image_size=28))
  assert ds.images.shape == (10, 28, 28, 1) and ds.images.dtype == np.uint8
  np.testing.assert_array_equal(ds.images[:, 0, 0, 0], np.arange(10) * 20 + 10)
  np.testing.assert_array_equal(ds.labels, np.arange(10) % 2)
  assert ds.labels.dtype == np.int32 and ds.patient_ids.dtype == np.int64
  np.testing.assert_array_equal(ds.patient_ids, np.arange(10))
  assert list(ds.source_split) == ["train"] * 5 + ["val"] * 2 + ["test"] * 3
  assert ds.class_names == ("normal", "pneumonia")
  assert (ds.name, ds.mean, ds.std) == ("pneumoniamnist", 0.5, 0.5)


def test_medmnist_rgb_larger_size_is_resized(tmp_path):
  path = tmp_path / "bloodmnist_64.npz"
  np.savez(path, **_medmnist_arrays((3, 1, 2), hw=64, channels=3, num_classes=8))
  ds = medmnist.load(_data_config(path, image_size=28))
  assert ds.images.shape == (6, 28, 28, 3) and ds.images.dtype == np.uint8
  np.testing.assert_array_equal(ds.images[:, 14, 14, 2], np.arange(6) * 20 + 10)
  assert ds.name == "bloodmnist" and ds.num_classes == 8
  assert ds.class_names[0] == "basophil" and ds.class_names[7] == "platelet"


def test_medmnist_unknown_set_gets_generic_class_names(tmp_path):
  path = tmp_path / "mystery_128.npz"
  np.savez(path, **_medmnist_arrays(num_classes=3))
  ds = medmnist.load(_data_config(path, image_size=14))
  assert ds.images.shape == (10, 14, 14, 1)
  assert ds.class_names == ("class_0", "class_1", "class_2")


def test_medmnist_wrong_keys(tmp_path):
  path = tmp_path / "pneumoniamnist.npz"
  arrays = _medmnist_arrays()
  arrays["x_train"] = arrays.pop("train_images")
  np.savez(path, **arrays)
  with pytest.raises(ValueError) as err:
    medmnist.load(_data_config(path))
  message = _one_line(err)
  assert "missing keys ['train_images']" in message
  assert "test_labels" in message and "zenodo" in message
  assert "10.5281/zenodo.10519652" in message


def test_medmnist_multilabel_refused(tmp_path):
  path = tmp_path / "chestmnist.npz"
  arrays = _medmnist_arrays()
  for split in medmnist.SPLITS:
    n = len(arrays[f"{split}_labels"])
    arrays[f"{split}_labels"] = np.zeros((n, 14), np.uint8)
  np.savez(path, **arrays)
  with pytest.raises(ValueError) as err:
    medmnist.load(_data_config(path))
  message = _one_line(err)
  assert "multi-label" in message and "not supported" in message
  assert "pneumoniamnist" in message


def test_medmnist_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    medmnist.load(_data_config(tmp_path / "pneumoniamnist.npz"))
  assert "pneumoniamnist.npz" in _one_line(err)


# Image folder (Kermany) ---------------------------------------------------


def _save(path: Path, mode: str, size: tuple[int, int], value: int) -> None:
  """A constant image whose grey level is `value`, in `mode`, saved by suffix."""
  path.parent.mkdir(parents=True, exist_ok=True)
  if mode == "I;16":
    image = Image.fromarray(np.full(size[::-1], value * 257, np.uint16))
  elif mode == "P":
    image = Image.new("L", size, value).convert("P")
  elif mode == "CMYK":
    image = Image.new("RGB", size, (value,) * 3).convert("CMYK")
  else:
    image = Image.new(mode, size, (value,) * len(mode))
  image.save(path)


# (split, folder, file name, mode, size, grey, label, patient key)
_KERMANY = [
    ("train", "NORMAL", "IM-0115-0001.jpeg", "RGB", (40, 30), 30, 0, "IM-0115"),
    ("train", "NORMAL", "IM-0115-0002.jpeg", "L", (50, 50), 50, 0, "IM-0115"),
    ("train", "NORMAL", "NORMAL2-IM-1427-0001.png", "I;16", (33, 47), 70, 0,
     "NORMAL2-IM-1427"),
    ("train", "PNEUMONIA", "person1_bacteria_1.jpeg", "RGB", (64, 48), 90, 1, "p1"),
    ("train", "PNEUMONIA", "person1_virus_6.png", "LA", (20, 25), 110, 2, "p1"),
    ("train", "PNEUMONIA", "person23_bacteria_100.png", "P", (37, 29), 130, 1, "p23"),
    ("test", "NORMAL", "IM-0200-0001.jpeg", "L", (29, 31), 150, 0, "IM-0200"),
    ("test", "PNEUMONIA", "person1_virus_7.jpeg", "L", (45, 45), 170, 2, "p1"),
    ("test", "PNEUMONIA", "person300_virus_1.jpeg", "CMYK", (32, 32), 190, 2, "p300"),
    ("val", "NORMAL", "NORMAL2-IM-1427-0002.jpeg", "L", (30, 30), 210, 0,
     "NORMAL2-IM-1427"),
    ("val", "PNEUMONIA", "person5_bacteria_9.jpeg", "RGB", (28, 40), 230, 1, "p5"),
]


@pytest.fixture
def kermany(tmp_path) -> Path:
  """A tiny Kermany tree, plus the junk real downloads carry."""
  root = tmp_path / "chest_xray"
  for split, folder, name, mode, size, grey, _, _ in _KERMANY:
    _save(root / split / folder / name, mode, size, grey)
  (root / "train" / "PNEUMONIA" / "._person1_bacteria_1.jpeg").write_bytes(b"\0junk")
  (root / "train" / ".DS_Store").write_bytes(b"junk")
  (root / "__MACOSX" / "train").mkdir(parents=True)
  return root


def _expected_order():
  """Files in the loader's order: split folders, class folders, names, sorted."""
  return sorted(_KERMANY, key=lambda row: (row[0], row[1], row[2]))


def test_kermany_three_classes_patients_and_splits(kermany):
  ds = image_folder.load(_data_config(kermany, image_size=16))
  rows = _expected_order()
  assert ds.images.shape == (len(rows), 16, 16, 1) and ds.images.dtype == np.uint8
  assert ds.class_names == ("normal", "bacterial", "viral")
  assert ds.name == "chest_xray_kermany" and (ds.mean, ds.std) == (0.5, 0.25)
  np.testing.assert_array_equal(ds.labels, [row[6] for row in rows])
  assert ds.labels.dtype == np.int32 and ds.patient_ids.dtype == np.int64
  assert list(ds.source_split) == [row[0] for row in rows]
  np.testing.assert_allclose(ds.images[:, 8, 8, 0], [row[5] for row in rows], atol=3)
  keys = [row[7] for row in rows]
  for i, j in np.ndindex(len(rows), len(rows)):
    assert (ds.patient_ids[i] == ds.patient_ids[j]) == (keys[i] == keys[j])
  assert sorted(set(ds.patient_ids.tolist())) == list(range(len(set(keys))))


def test_kermany_mapping_from_file_names():
  label = image_folder._kermany_label
  assert label(Path("IM-0115-0001.jpeg"), "NORMAL") == 0
  assert label(Path("person1_bacteria_1.jpeg"), "PNEUMONIA") == 1
  assert label(Path("person1_virus_6.jpeg"), "PNEUMONIA") == 2
  root = Path("/r")

  def key(name: str) -> str:
    return image_folder._patient_key(root / "train" / "X" / name, root)

  assert key("person123_bacteria_4.jpeg") == key("person123_virus_9.jpeg")
  assert key("person123_bacteria_4.jpeg") != key("person12_bacteria_4.jpeg")
  assert key("IM-0115-0001.jpeg") == "IM-0115"
  assert key("NORMAL2-IM-1427-0001.jpeg") == "NORMAL2-IM-1427"
  assert key("CNV-1016042-1.jpeg") == key("DRUSEN-1016042-3.jpeg")
  assert key("scan.png") != key("other.png")


def test_kermany_descends_into_chest_xray_folder(kermany):
  ds = image_folder.load(_data_config(kermany.parent, image_size=8))
  assert len(ds.labels) == len(_KERMANY) and ds.num_classes == 3


def test_generic_class_folders(tmp_path):
  root = tmp_path / "lesions"
  for i, folder in enumerate(["malignant", "benign", "benign"]):
    _save(root / folder / f"img{i}.png", "RGB", (20 + i, 10), 40 * (i + 1))
  ds = image_folder.load(_data_config(root, image_size=12))
  assert ds.class_names == ("benign", "malignant") and ds.name == "lesions"
  assert ds.images.shape == (3, 12, 12, 1)
  np.testing.assert_array_equal(ds.labels, [0, 0, 1])
  assert len(set(ds.patient_ids.tolist())) == 3 and ds.source_split is None


def test_cache_is_read_on_second_load(kermany, tmp_path, monkeypatch):
  config = _data_config(kermany, image_size=16, data_dir=tmp_path / "cache")
  first = image_folder.load(config)
  assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

  def fail(*args, **kwargs):
    raise AssertionError("decoded despite a valid cache")

  monkeypatch.setattr(image_folder, "_decode", fail)
  second = image_folder.load(config)
  for field in ("images", "labels", "patient_ids", "source_split"):
    np.testing.assert_array_equal(getattr(first, field), getattr(second, field))
  assert (second.class_names, second.name) == (first.class_names, first.name)
  assert (second.mean, second.std) == (first.mean, first.std)
  with pytest.raises(AssertionError):  # another size is another cache
    image_folder.load(_data_config(kermany, image_size=8, data_dir=tmp_path / "cache"))


def test_cache_default_folder_and_changed_files(kermany, monkeypatch):
  image_folder.load(_data_config(kermany, image_size=8))
  assert len(list((kermany / ".fedsim_cache").glob("*.npz"))) == 1
  image = kermany / "val" / "NORMAL" / "NORMAL2-IM-1427-0002.jpeg"
  os.utime(image, ns=(1, 1))
  calls = []
  real = image_folder._decode
  monkeypatch.setattr(image_folder, "_decode",
                      lambda *a, **k: calls.append(a) or real(*a, **k))
  image_folder.load(_data_config(kermany, image_size=8))
  assert len(calls) == len(_KERMANY)


def test_interrupted_cache_write_leaves_no_cache(kermany, tmp_path, monkeypatch):
  cache_dir = tmp_path / "cache"
  config = _data_config(kermany, image_size=16, data_dir=cache_dir)

  def interrupted(handle, arrays):
    handle.write(b"PK\x03\x04 half an archive")
    raise KeyboardInterrupt

  monkeypatch.setattr(cache, "_write", interrupted)
  with pytest.raises(KeyboardInterrupt):
    image_folder.load(config)
  assert list(cache_dir.iterdir()) == []
  monkeypatch.undo()
  ds = image_folder.load(config)
  assert len(ds.labels) == len(_KERMANY)
  assert len(list(cache_dir.glob("*.npz"))) == 1


def test_damaged_cache_is_rebuilt(kermany, tmp_path):
  config = _data_config(kermany, image_size=16, data_dir=tmp_path / "cache")
  image_folder.load(config)
  (path,) = (tmp_path / "cache").glob("*.npz")
  path.write_bytes(b"garbage")
  assert len(image_folder.load(config).labels) == len(_KERMANY)
  with np.load(path) as npz:
    assert npz["images"].shape[0] == len(_KERMANY)


def test_missing_folder(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    image_folder.load(_data_config(tmp_path / "nowhere"))
  message = _one_line(err)
  assert str(tmp_path / "nowhere") in message
  assert "{NORMAL,PNEUMONIA}" in message and "Mendeley Data" in message
  assert "Kermany et al. 2018" in message and "doi:10.17632/rscbjbr9sj.2" in message


def test_empty_class_folder(kermany):
  for image in (kermany / "test" / "NORMAL").iterdir():
    image.unlink()
  with pytest.raises(ValueError) as err:
    image_folder.load(_data_config(kermany))
  message = _one_line(err)
  assert f"Class folder {kermany / 'test' / 'NORMAL'} has no images" in message


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_corrupt_image(kermany, content):
  bad = kermany / "train" / "PNEUMONIA" / "person2_bacteria_3.jpeg"
  data = (kermany / "train" / "PNEUMONIA" / "person1_bacteria_1.jpeg").read_bytes()
  bad.write_bytes(b"not an image" if content == "garbage" else data[:len(data) // 2])
  with pytest.raises(ValueError) as err:
    image_folder.load(_data_config(kermany))
  assert f"Cannot decode image {bad}" in _one_line(err)


def test_pneumonia_file_without_type(kermany):
  _save(kermany / "train" / "PNEUMONIA" / "person9_unknown_1.jpeg", "L", (9, 9), 1)
  with pytest.raises(ValueError) as err:
    image_folder.load(_data_config(kermany))
  assert "person9_unknown_1.jpeg" in _one_line(err)


# TFDS ------------------------------------------------------------------------


def _png(rgb: tuple[int, int, int], size: tuple[int, int]) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", size, rgb).save(buffer, format="png")
  return buffer.getvalue()


def _prepare(name: str, splits: dict[str, list[tuple[bytes, int]]], data_dir: Path):
  """Prepares TFDS set `name` in array_record with its real builder and features.

  The registered builder class is kept (its `_info`: features, version, class
  names); only `_split_generators`, which would download, yields `splits`.
  """
  base = tfds.builder_cls(name)

  def split_generators(self, dl_manager):
    return {split: self._generate_examples(rows) for split, rows in splits.items()}

  def generate_examples(self, rows):
    for i, (image, label) in enumerate(rows):
      yield i, {"image": image, "label": label,
                **({"id": f"p{i}"} if name == "patch_camelyon" else {})}

  with tfds.core.registered.skip_registration():
    fake = type(base.__name__, (base,), {
        "name": name, "_split_generators": split_generators,
        "_generate_examples": generate_examples})
  fake(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


_MALARIA = [((10 * i, 100, 200 - 10 * i), (20 + 3 * i, 17 + i), i % 2) for i in range(5)]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> Path:
  data_dir = tmp_path_factory.mktemp("tfds")
  _prepare("malaria", {"train": [(_png(c, s), y) for c, s, y in _MALARIA]}, data_dir)
  camelyon = {split: [(_png((v, v, v), (96, 96)), v % 2) for v in values]
              for split, values in [("train", [10, 11, 12]), ("validation", [20]),
                                    ("test", [30, 31])]}
  _prepare("patch_camelyon", camelyon, data_dir)
  return data_dir


def test_tfds_malaria(tfds_dir):
  config = _data_config("malaria", image_size=16, data_dir=tfds_dir)
  ds = tfds_source.load(config)
  assert ds.images.shape == (5, 16, 16, 3) and ds.images.dtype == np.uint8
  # TFDS shuffles examples when it writes them: match them by colour.
  label_of = {c: y for c, _, y in _MALARIA}
  assert sorted(map(tuple, ds.images[:, 8, 8].tolist())) == sorted(label_of)
  assert [label_of[tuple(c)] for c in ds.images[:, 8, 8].tolist()] == ds.labels.tolist()
  assert (ds.images == ds.images[:, :1, :1]).all()  # constant images stay constant
  np.testing.assert_array_equal(ds.patient_ids, np.arange(5))
  assert ds.class_names == ("parasitized", "uninfected") and ds.name == "malaria"
  assert list(ds.source_split) == ["train"] * 5
  assert (ds.mean, ds.std) == (tfds_source.SETS["malaria"].mean,
                               tfds_source.SETS["malaria"].std)


def test_tfds_pools_splits_with_version(tfds_dir, monkeypatch):
  config = _data_config("patch_camelyon:2.0.0", image_size=8, data_dir=tfds_dir)
  ds = tfds_source.load(config)
  assert ds.images.shape == (6, 8, 8, 3)
  assert list(ds.source_split) == ["train"] * 3 + ["val"] + ["test"] * 2
  grey = ds.images[:, 0, 0, 0].tolist()  # TFDS shuffles within a split
  assert sorted(grey[:3]) == [10, 11, 12] and grey[3] == 20
  assert sorted(grey[4:]) == [30, 31]
  np.testing.assert_array_equal(ds.labels, np.array(grey) % 2)
  assert ds.class_names == ("normal", "metastatic")

  def fail(*args, **kwargs):
    raise AssertionError("read TFDS despite a valid cache")

  assert len(list((tfds_dir / ".fedsim_cache").glob("patch_camelyon-8px-*.npz"))) == 1
  monkeypatch.setattr(tfds, "data_source", fail)
  again = tfds_source.load(config)
  np.testing.assert_array_equal(again.images, ds.images)
  np.testing.assert_array_equal(again.source_split, ds.source_split)


@pytest.mark.parametrize("name", sorted(tfds_source.SETS))
def test_tfds_table_matches_registered_builders(name, tmp_path):
  table = tfds_source.SETS[name]
  features = tfds.builder(name, data_dir=str(tmp_path)).info.features
  assert features[table.image_key].shape[-1] == 3
  names = features[table.label_key].names
  assert len(names) == len(table.class_names)
  if names != [str(i) for i in range(len(names))]:  # patch_camelyon: unnamed
    assert tuple(names) == table.class_names


def test_tfds_not_prepared(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    tfds_source.load(_data_config("malaria", data_dir=tmp_path))
  message = _one_line(err)
  assert "not prepared" in message and str(tmp_path) in message
  assert "tfds build malaria" in message and "array_record" in message


def test_tfds_unsupported_name(tmp_path):
  with pytest.raises(ValueError) as err:
    tfds_source.load(_data_config("mnist", data_dir=tmp_path))
  message = _one_line(err)
  assert "'mnist'" in message and "malaria" in message and "patch_camelyon" in message
