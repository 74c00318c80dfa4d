"""Image-folder loader: the Kermany paediatric chest X-ray layout, or one folder per class.

Kermany et al. (2018) chest X-rays, as published at Mendeley Data and on Kaggle
("chest_xray"):

  root/{train,test,val}/{NORMAL,PNEUMONIA}/*.jpeg

becomes three classes, the task of the published federated pneumonia studies:
`normal` (NORMAL folder), `bacterial` and `viral` (PNEUMONIA folder; the file name
says which: `person1_bacteria_1.jpeg`, `person1_virus_6.jpeg`). Patients come
from the file names: `person123_...` is patient "person123"; a NORMAL file
`IM-0115-0001.jpeg` belongs to "IM-0115", `NORMAL2-IM-1427-0001.jpeg` to
"NORMAL2-IM-1427"; Kermany OCT names `CNV-1016042-1.jpeg` to patient 1016042.
Other names make each image its own patient. Patient keys become int64 ids by
their sorted order, so the same files give the same ids on every machine.

Without split folders, `root/<class_name>/*` is read with one class per folder
(sorted folder names). Other class folders under split folders (e.g. the OCT set:
CNV, DME, DRUSEN, NORMAL) are read the same way.

Every image becomes grayscale `[image_size, image_size, 1]` uint8 (bilinear
resize of the whole image, no crop). Decoded arrays are cached as .npz in
`data.data_dir` (or `root/.fedsim_cache`), keyed by image size and a fingerprint
of the file list and modification times; the second load reads the cache.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
from PIL import Image

from fedsim.data import cache
from fedsim.data.base import ImageDataset

MEAN = 0.5   # fixed constants for pixel/255, never computed from the data
STD = 0.25
KERMANY_CLASSES = ("normal", "bacterial", "viral")
KERMANY_NAME = "chest_xray_kermany"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff")
_SPLITS = {"train": "train", "test": "test", "val": "val", "validation": "val"}
_CACHE_VERSION = "image_folder-v1"

_LAYOUT_HELP = (
    "Expected root/{train,test,val}/{NORMAL,PNEUMONIA}/*.jpeg (Kermany chest X-rays, "
    "published at Mendeley Data as \"Labeled Optical Coherence Tomography (OCT) and "
    "Chest X-Ray Images for Classification\", Kermany et al. 2018, "
    "doi:10.17632/rscbjbr9sj.2) or root/<class_name>/<images>.")

_PERSON = re.compile(r"^person(\d+)_", re.IGNORECASE)
_NORMAL_IM = re.compile(r"^(.*IM-\d+)-\d+$", re.IGNORECASE)
_OCT = re.compile(r"^[A-Za-z]+-(\d+)-\d+$")


def load(data_config: Any) -> ImageDataset:
  """Loads the image folder at `data_config.path`.

  Args:
    data_config: the `data` ConfigDict; reads `path`, `image_size` and
      `data_dir` (cache folder; default `<path>/.fedsim_cache`).

  Returns:
    Grayscale images `[N, image_size, image_size, 1]` uint8, labels int32 `[N]`,
    patient ids int64 `[N]`, `source_split` ("train", "test", "val") for the
    split layout (None otherwise), mean 0.5 and std 0.25 (fixed).

  Raises:
    FileNotFoundError: the folder does not exist.
    ValueError: bad layout, empty class folder, unreadable image, bad image size.
  """
  root = _resolve_root(str(data_config.path or ""))
  size = _image_size(data_config.image_size)
  listing = _list_files(root)
  key = cache.fingerprint(cache.file_entries((f.path for f in listing.files), root),
                          _CACHE_VERSION, size)
  path = cache.cache_file(
      cache.cache_dir(data_config, root / ".fedsim_cache"), listing.name, size, key)
  dataset = cache.load_dataset(path, mean=MEAN, std=STD)
  if dataset is None:
    dataset = _decode_all(listing, size)
    cache.save_dataset(path, dataset)
  return dataset


class _File(NamedTuple):
  """One image file with its label, patient key and publisher split."""
  path: Path
  label: int
  patient: str
  split: str | None


@dataclasses.dataclass(frozen=True)
class _Listing:
  """The files of one data set, with its name and class names."""
  files: list[_File]
  name: str
  class_names: tuple[str, ...]


def _resolve_root(path: str) -> Path:
  """The data root; descends into a single `chest_xray` folder when present."""
  if not path:
    raise ValueError(f"data.path is empty: name the image folder. {_LAYOUT_HELP}")
  root = Path(path).expanduser()
  if not root.is_dir():
    raise FileNotFoundError(f"Image folder {root} not found. {_LAYOUT_HELP}")
  nested = root / "chest_xray"
  if not _split_dirs(root) and nested.is_dir() and _split_dirs(nested):
    return nested
  return root


def _image_size(value: Any) -> int:
  size = int(value)
  if size < 1:
    raise ValueError(f"data.image_size={value} must be >= 1")
  return size


def _subdirs(folder: Path) -> list[Path]:
  """Visible subfolders, sorted by name (skips `.fedsim_cache`, `__MACOSX`)."""
  return sorted(p for p in folder.iterdir()
                if p.is_dir() and not p.name.startswith((".", "__")))


def _split_dirs(root: Path) -> list[Path]:
  return [p for p in _subdirs(root) if p.name.lower() in _SPLITS]


def _list_files(root: Path) -> _Listing:
  """Every image under `root` with its label, patient key and split."""
  splits = _split_dirs(root)
  groups = ([(_SPLITS[s.name.lower()], _subdirs(s)) for s in splits] if splits
            else [(None, _subdirs(root))])
  folder_names = sorted({d.name for _, dirs in groups for d in dirs})
  if not folder_names:
    raise ValueError(f"No class folders under {root}. {_LAYOUT_HELP}")
  kermany = {n.lower() for n in folder_names} == {"normal", "pneumonia"}
  class_names = KERMANY_CLASSES if kermany else tuple(folder_names)
  files = []
  for split, class_dirs in groups:
    for class_dir in class_dirs:
      for path in _images_in(class_dir):
        label = (_kermany_label(path, class_dir.name) if kermany
                 else folder_names.index(class_dir.name))
        files.append(_File(path, label, _patient_key(path, root), split))
  name = KERMANY_NAME if kermany else root.name
  return _Listing(files, name, class_names)


def _images_in(class_dir: Path) -> list[Path]:
  """The image files of one class folder; an empty folder is an error."""
  paths = sorted(p for p in class_dir.iterdir()
                 if p.is_file() and not p.name.startswith(".")
                 and p.suffix.lower() in IMAGE_SUFFIXES)
  if not paths:
    raise ValueError(
        f"Class folder {class_dir} has no images ({', '.join(IMAGE_SUFFIXES)}). "
        f"{_LAYOUT_HELP}")
  return paths


def _kermany_label(path: Path, folder: str) -> int:
  """normal 0, bacterial 1, viral 2: folder NORMAL, else from the file name."""
  if folder.lower() == "normal":
    return 0
  name = path.name.lower()
  if "bacteria" in name:
    return 1
  if "virus" in name:
    return 2
  raise ValueError(
      f"Cannot tell bacterial from viral pneumonia for {path}: Kermany PNEUMONIA "
      "file names contain 'bacteria' or 'virus' (e.g. person1_bacteria_1.jpeg).")


def _patient_key(path: Path, root: Path) -> str:
  """The patient a file belongs to, from its name (else the file itself)."""
  stem = path.stem
  if match := _PERSON.match(stem):
    return f"person{int(match.group(1))}"
  if match := _NORMAL_IM.match(stem):
    return match.group(1)
  if match := _OCT.match(stem):
    return f"oct-{int(match.group(1))}"
  return "file:" + path.relative_to(root).as_posix()


def _decode_all(listing: _Listing, size: int) -> ImageDataset:
  """Decodes every file (threads: PIL releases the GIL) into one data set."""
  files = listing.files
  workers = min(32, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    images = list(pool.map(lambda f: _decode(f.path, size), files))
  keys = np.array([f.patient for f in files])
  _, patient_ids = np.unique(keys, return_inverse=True)
  splits = [f.split for f in files]
  return ImageDataset(
      images=np.stack(images)[..., None],
      labels=np.array([f.label for f in files], dtype=np.int32),
      patient_ids=patient_ids.astype(np.int64).reshape(-1),
      class_names=listing.class_names, name=listing.name, mean=MEAN, std=STD,
      source_split=None if splits[0] is None else np.array(splits))


def _decode(path: Path, size: int) -> np.ndarray:
  """One image file as grayscale uint8 `[size, size]`."""
  return decode_image(path, size=size, mode="L")


def decode_image(source: Path | BinaryIO, *, size: int, mode: str) -> np.ndarray:
  """Decodes an image file (path or file object) and resizes it, bilinear.

  Args:
    source: a path or a binary file object holding JPEG, PNG, BMP or TIFF bytes.
    size: output height and width.
    mode: "L" (grayscale) or "RGB".

  Returns:
    uint8 `[size, size]` for "L", `[size, size, 3]` for "RGB".

  Raises:
    ValueError: naming the file, when it cannot be decoded.
  """
  try:
    with Image.open(source) as image:
      image.draft(mode, (size, size))  # JPEG: decode at a reduced scale, fast
      image = _to_mode(image, mode)
      image = image.resize((size, size), Image.Resampling.BILINEAR)
      return np.asarray(image, dtype=np.uint8)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
    raise ValueError(f"Cannot decode image {_describe(source)}: {err}") from None


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
  """Converts to `mode`; 16-bit and float grayscale are rescaled, not clipped."""
  if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    pixels = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") else max(pixels.max(), 1.0)
    image = Image.fromarray(np.clip(pixels / top * 255.0, 0, 255).astype(np.uint8))
  return image if image.mode == mode else image.convert(mode)


def _describe(source: Path | BinaryIO) -> str:
  return str(source) if isinstance(source, (str, os.PathLike)) else (
      getattr(source, "name", None) or "<bytes>")
