"""MedMNIST v2 / MedMNIST+ loader: one `.npz` file per data set and size.

The files published at zenodo (doi:10.5281/zenodo.10519652, medmnist.com), e.g.
`pneumoniamnist.npz` (28x28) or `pneumoniamnist_64.npz` (64, 128, 224), hold
`train_images`, `train_labels`, `val_images`, `val_labels`, `test_images`,
`test_labels`: uint8 images `[N, H, W]` (grayscale) or `[N, H, W, 3]` (RGB) and
labels `[N, 1]`. The three splits are pooled (the federation re-splits by
patient) and the publisher's split is kept in `source_split`.

MedMNIST has no patient ids: every image is its own patient, so patient-level
privacy here equals example-level privacy (for sets where one patient has many
images, e.g. OCT or pneumonia, this overstates the protection of a patient).

Multi-label sets (chestmnist: labels `[N, 14]`) and 3D sets (`*mnist3d`) are
refused. Class names come from the MedMNIST v2 label table below; unknown sets
get "class_0", "class_1", ... Normalisation is the fixed mean 0.5 / std 0.5 of
the MedMNIST authors' examples, never statistics of the pooled data.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fedsim.data.base import ImageDataset

MEAN = 0.5   # the MedMNIST examples' Normalize(mean=[.5], std=[.5])
STD = 0.5
SPLITS = ("train", "val", "test")
EXPECTED_KEYS = tuple(f"{s}_{k}" for s in SPLITS for k in ("images", "labels"))
_CHUNK = 1024  # images decompressed and resized at a time

_ORGAN = ("bladder", "femur-left", "femur-right", "heart", "kidney-left",
          "kidney-right", "liver", "lung-left", "lung-right", "pancreas", "spleen")
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "pathmnist": (
        "adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
        "normal colon mucosa", "cancer-associated stroma",
        "colorectal adenocarcinoma epithelium"),
    "dermamnist": (
        "actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
        "benign keratosis-like lesions", "dermatofibroma", "melanoma",
        "melanocytic nevi", "vascular lesions"),
    "octmnist": ("choroidal neovascularization", "diabetic macular edema", "drusen",
                 "normal"),
    "pneumoniamnist": ("normal", "pneumonia"),
    "retinamnist": ("0", "1", "2", "3", "4"),
    "breastmnist": ("malignant", "normal, benign"),
    "bloodmnist": (
        "basophil", "eosinophil", "erythroblast",
        "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
        "lymphocyte", "monocyte", "neutrophil", "platelet"),
    "tissuemnist": (
        "Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
        "Glomerular endothelial cells", "Interstitial endothelial cells",
        "Leukocytes", "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb"),
    "organamnist": _ORGAN,
    "organcmnist": _ORGAN,
    "organsmnist": _ORGAN,
}

_SOURCE = "MedMNIST is published at zenodo doi:10.5281/zenodo.10519652 (medmnist.com)"
_NAME = re.compile(r"^(?P<name>.+?)(?:_(?P<size>\d+))?$")


def load(data_config: Any) -> ImageDataset:
  """Loads the MedMNIST `.npz` at `data_config.path`, resized to `image_size`.

  Args:
    data_config: the `data` ConfigDict; reads `path` and `image_size`.

  Returns:
    Images uint8 `[N, image_size, image_size, C]` (C = 1 or 3, native), labels
    int32 `[N]`, patient ids `arange(N)` (int64), `source_split`, MedMNIST
    class names, mean 0.5 and std 0.5.

  Raises:
    FileNotFoundError: no file at `data.path`.
    ValueError: wrong keys, multi-label or 3D data, bad shapes or labels.
  """
  path = _resolve(str(data_config.path or ""))
  size = int(data_config.image_size)
  if size < 1:
    raise ValueError(f"data.image_size={data_config.image_size} must be >= 1")
  name = _NAME.match(path.stem.lower()).group("name")
  with _open(path) as npz:
    _check_keys(npz.files, path)
    labels = [_labels(npz[f"{s}_labels"], path, s) for s in SPLITS]
    images = [_read_images(npz, f"{s}_images", size, path) for s in SPLITS]
  _check_counts(images, labels, path)
  label = np.concatenate(labels)
  return ImageDataset(
      images=np.concatenate(images), labels=label,
      patient_ids=np.arange(len(label), dtype=np.int64),
      class_names=_class_names(name, label, path), name=name, mean=MEAN, std=STD,
      source_split=np.repeat(np.array(SPLITS), [len(x) for x in labels]))


def _resolve(path: str) -> Path:
  """The .npz file named by `data.path`, with a clear error when it is not."""
  if not path:
    raise ValueError(f"data.path is empty: name a MedMNIST .npz file, e.g. "
                     f"~/.medmnist/pneumoniamnist.npz. {_SOURCE}.")
  file = Path(path).expanduser()
  if file.is_dir():
    found = sorted(p.name for p in file.glob("*.npz"))
    raise ValueError(f"data.path={path} is a folder; name one MedMNIST .npz file in "
                     f"it (found: {', '.join(found) or 'none'}). {_SOURCE}.")
  if not file.is_file():
    raise FileNotFoundError(f"MedMNIST file {file} not found (expected e.g. "
                            f"pneumoniamnist.npz or pneumoniamnist_64.npz). {_SOURCE}.")
  return file


def _open(path: Path) -> Any:
  """The `np.lib.npyio.NpzFile` at `path` (closed by the caller's `with`)."""
  try:
    npz = np.load(path, allow_pickle=False)
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
    raise ValueError(f"{path} is not a readable .npz file ({err}). {_SOURCE}.") from None
  if not isinstance(npz, np.lib.npyio.NpzFile):
    raise ValueError(f"{path} holds a single array, not a MedMNIST .npz with keys "
                     f"{list(EXPECTED_KEYS)}. {_SOURCE}.")
  return npz


def _check_keys(keys: list[str], path: Path) -> None:
  missing = [k for k in EXPECTED_KEYS if k not in keys]
  if missing:
    raise ValueError(
        f"{path.name} is not a MedMNIST file: missing keys {missing}; expected "
        f"{list(EXPECTED_KEYS)}, found {sorted(keys)}. {_SOURCE}.")


def _labels(labels: np.ndarray, path: Path, split: str) -> np.ndarray:
  """int32 `[N]` from `[N, 1]` (or `[N]`); multi-label `[N, K]` is refused."""
  if labels.ndim == 2 and labels.shape[1] > 1:
    raise ValueError(
        f"{path.name} is multi-label ({split}_labels {list(labels.shape)}, e.g. "
        "chestmnist's 14 findings): multi-label classification is not supported. "
        "Use a single-label set such as pneumoniamnist.")
  if labels.ndim > 2 or (labels.ndim == 2 and labels.shape[1] != 1):
    raise ValueError(f"{path.name}: {split}_labels has shape {list(labels.shape)}, "
                     "expected [N, 1]")
  labels = labels.reshape(-1)
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{path.name}: {split}_labels is {labels.dtype}, expected integers")
  if len(labels) and labels.min() < 0:
    raise ValueError(f"{path.name}: {split}_labels has negative labels")
  return labels.astype(np.int32)


def _read_images(npz: Any, key: str, size: int, path: Path) -> np.ndarray:
  """uint8 `[N, size, size, C]`, resized chunk by chunk to bound memory."""
  chunks = [_resize(chunk, size) for chunk in _iter_rows(npz, key, path)]
  if not chunks:
    return np.zeros((0, size, size, 1), np.uint8)
  return np.concatenate(chunks)


def _iter_rows(npz: Any, key: str, path: Path) -> Iterator[np.ndarray]:
  """Chunks of `key`'s rows, streamed out of the (compressed) zip member.

  Members of an .npz cannot be memory-mapped, so rows are read a chunk at a time
  from the zip stream; a 224x224 set never sits in memory at full size.
  """
  with npz.zip.open(f"{key}.npy") as stream:
    shape, dtype = _npy_header(stream, key)
    _check_images(shape, dtype, path, key)
    row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
    for start in range(0, shape[0], _CHUNK):
      rows = min(_CHUNK, shape[0] - start)
      data = stream.read(rows * row_bytes)
      if len(data) != rows * row_bytes:
        raise ValueError(f"{path.name}: {key} is truncated")
      yield np.frombuffer(data, dtype).reshape((rows, *shape[1:]))


def _npy_header(stream: Any, key: str) -> tuple[tuple[int, ...], np.dtype]:
  """Shape and dtype from an .npy header (C order only, as numpy writes)."""
  version = np.lib.format.read_magic(stream)
  read = {(1, 0): np.lib.format.read_array_header_1_0,
          (2, 0): np.lib.format.read_array_header_2_0}.get(version)
  if read is None:
    raise ValueError(f"{key}: unsupported .npy format version {version}")
  shape, fortran_order, dtype = read(stream)
  if fortran_order:
    raise ValueError(f"{key}: Fortran-ordered arrays are not supported")
  return shape, dtype


def _check_images(shape: tuple[int, ...], dtype: np.dtype, path: Path,
                  key: str) -> None:
  """Images must be uint8 `[N, H, W]` or `[N, H, W, 1|3]`; 3D sets are refused."""
  if len(shape) == 4 and shape[3] not in (1, 3):
    raise ValueError(f"{path.name}: {key} has shape {list(shape)}: 3D MedMNIST "
                     "volumes are not supported; use a 2D set such as pneumoniamnist.")
  if len(shape) not in (3, 4) or dtype != np.uint8:
    raise ValueError(f"{path.name}: {key} is {dtype} {list(shape)}, expected uint8 "
                     "[N, H, W] or [N, H, W, 3]")


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  """`[n, H, W(, C)]` uint8 -> `[n, size, size, C]`, PIL bilinear when needed."""
  if images.ndim == 3:
    images = images[..., None]
  if images.shape[1:3] == (size, size):
    return images
  out = np.empty((len(images), size, size, images.shape[3]), np.uint8)
  for i, image in enumerate(images):
    pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
    resized = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
    out[i] = resized.reshape(size, size, -1)
  return out


def _check_counts(images: list[np.ndarray], labels: list[np.ndarray],
                  path: Path) -> None:
  for split, x, y in zip(SPLITS, images, labels, strict=True):
    if len(x) != len(y):
      raise ValueError(f"{path.name}: {split}_images has {len(x)} images but "
                       f"{split}_labels has {len(y)} labels")
  channels = {x.shape[3] for x in images if len(x)}
  if len(channels) > 1:
    raise ValueError(f"{path.name}: splits differ in channels {sorted(channels)}")


def _class_names(name: str, labels: np.ndarray, path: Path) -> tuple[str, ...]:
  """The MedMNIST label names of `name`, else "class_i" up to the largest label."""
  top = int(labels.max()) + 1 if len(labels) else 0
  names = CLASS_NAMES.get(name)
  if names is None:
    return tuple(f"class_{i}" for i in range(top))
  if top > len(names):
    raise ValueError(f"{path.name}: label {top - 1} out of range for {name}'s "
                     f"{len(names)} classes {list(names)}")
  return names
