"""NIfTI loader: the Medical Segmentation Decathlon's volumes as 2-D slices with masks.

The Decathlon (Antonelli et al. 2022, http://medicaldecathlon.com/) publishes each
task as a folder such as Task03_Liver:

  root/imagesTr/liver_0.nii.gz ... liver_130.nii.gz   CT volumes (Hounsfield units)
  root/labelsTr/liver_0.nii.gz ...                    masks: 0 background, 1 liver, 2 tumour
  root/dataset.json                                   (optional) class names

Each volume is one patient (id: the number in its file name). It is reoriented to
RAS (`nibabel.as_closest_canonical`) and cut into axial slices (the third axis),
shown the radiological way (anterior up, the patient's right on the left). Only
slices that show a labelled structure are kept, at most
`data.max_slices_per_patient` of them, evenly spaced (0: all). CT values are
windowed to the abdominal window (level 40 HU, width 400 HU) and scaled to uint8;
a slice is resized to `data.image_size` squared, bilinearly, and its mask with
nearest neighbour, so masks keep their classes and stay aligned with the images.
The federation splits patients, never slices (fedsim/partition.py), so a patient's
slices share one hospital and one split. Decoded slices are cached like the
image-folder loader's (fedsim/data/cache.py). macOS "._" files in the published
archive are ignored.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from fedsim.data import cache
from fedsim.data.base import ImageDataset

WINDOW_LEVEL, WINDOW_WIDTH = 40.0, 400.0  # abdominal CT window, Hounsfield units
MEAN = 0.3   # rough constants of windowed abdominal CT slices (public, not from the data)
STD = 0.3
_CACHE_VERSION = "nifti-v1"
_HELP = ("expected a Medical Segmentation Decathlon task folder (e.g. Task03_Liver, "
         "published at http://medicaldecathlon.com/) with imagesTr/*.nii.gz and "
         "labelsTr/*.nii.gz")


def load(data_config: Any) -> ImageDataset:
  """Loads the Decathlon task folder at `data_config.path` as 2-D slices.

  Args:
    data_config: the `data` ConfigDict; reads `path`, `image_size`,
      `max_slices_per_patient` and `data_dir` (cache folder; default
      `<path>/.fedsim_cache`).

  Returns:
    uint8 slices `[N, S, S, 1]`, int32 masks `[N, S, S]`, int64 patient ids (the
    volume of each slice).

  Raises:
    FileNotFoundError: the folder or its imagesTr / labelsTr is missing.
    ValueError: an image without its label volume, mismatched shapes, not 3-D.
  """
  root = Path(str(data_config.path or "")).expanduser()
  if not root.is_dir():
    raise FileNotFoundError(f"data.path={str(root)!r} is not a folder: {_HELP}")
  pairs = _pairs(root)
  size, cap = int(data_config.image_size), int(data_config.max_slices_per_patient)
  files = [p for pair in pairs for p in pair[1:]]
  key = cache.fingerprint(cache.file_entries(files, root), _CACHE_VERSION, size, cap)
  name = f"msd_{root.name.lower()}"
  path = cache.cache_file(cache.cache_dir(data_config, root / ".fedsim_cache"), name,
                          size, key)
  dataset = cache.load_dataset(path, mean=MEAN, std=STD)
  if dataset is None:
    dataset = _decode_all(pairs, size, cap, _class_names(root, pairs), name)
    cache.save_dataset(path, dataset)
  return dataset


def _pairs(root: Path) -> list[tuple[int, Path, Path]]:
  """(patient id, image file, label file) of every volume, sorted by id."""
  images, labels = root / "imagesTr", root / "labelsTr"
  for folder in (images, labels):
    if not folder.is_dir():
      raise FileNotFoundError(f"data.path={str(root)!r} has no {folder.name}/: {_HELP}")
  found = sorted(p for p in images.iterdir()
                 if p.name.endswith((".nii", ".nii.gz")) and not p.name.startswith("."))
  if not found:
    raise FileNotFoundError(f"data.path={str(root)!r}: imagesTr/ holds no .nii(.gz): {_HELP}")
  pairs = []
  for rank, image in enumerate(found):
    label = labels / image.name
    if not label.is_file():
      raise ValueError(f"data.path: {image} has no label volume {label}")
    digits = re.findall(r"\d+", image.name.split(".")[0])
    pairs.append((int(digits[-1]) if digits else rank, image, label))
  ids = [p[0] for p in pairs]
  if len(set(ids)) != len(ids):  # numbers do not identify the volumes: use the ranks
    pairs = [(rank, image, label) for rank, (_, image, label) in enumerate(pairs)]
  return sorted(pairs)


def _class_names(root: Path, pairs) -> tuple[str, ...]:
  """Class names from dataset.json's "labels", else background + class_<k>."""
  meta = root / "dataset.json"
  if meta.is_file():
    labels = json.loads(meta.read_text()).get("labels", {})
    if labels:
      return tuple(str(labels[k]) for k in sorted(labels, key=int))
  import nibabel as nib
  top = max(int(np.max(nib.load(str(label)).dataobj)) for _, _, label in pairs)
  return ("background",) + tuple(f"class_{k}" for k in range(1, top + 1))


def _decode_all(pairs, size: int, cap: int, class_names, name: str) -> ImageDataset:
  """Every kept slice of every volume, resized."""
  images, masks, owners = [], [], []
  for patient, image_file, label_file in tqdm(pairs, desc="NIfTI volumes", leave=False):
    x, y = volume_slices(image_file, label_file, size=size, max_slices=cap)
    images.append(x)
    masks.append(y)
    owners.append(np.full(len(x), patient, np.int64))
  labels = np.concatenate(masks)
  if labels.max(initial=0) >= len(class_names):
    raise ValueError(f"data.path: mask value {labels.max()} has no class name in "
                     f"{list(class_names)}")
  return ImageDataset(images=np.concatenate(images)[..., None], labels=labels,
                      patient_ids=np.concatenate(owners), class_names=class_names,
                      name=name, mean=MEAN, std=STD)


def volume_slices(image_file: Path, label_file: Path, *, size: int,
                  max_slices: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """One volume's kept axial slices: uint8 `[n, size, size]`, int32 masks likewise."""
  import nibabel as nib  # only this source needs it
  image = nib.as_closest_canonical(nib.load(str(image_file)))
  label = nib.as_closest_canonical(nib.load(str(label_file)))
  if image.ndim != 3 or image.shape != label.shape:
    raise ValueError(f"data.path: {image_file} {image.shape} and {label_file} "
                     f"{label.shape} must be 3-D volumes of one shape")
  hu = image.get_fdata(dtype=np.float32)
  mask = np.rint(np.asarray(label.dataobj)).astype(np.int32)
  keep = np.flatnonzero(mask.any(axis=(0, 1)))
  if max_slices and len(keep) > max_slices:
    keep = keep[np.round(np.linspace(0, len(keep) - 1, max_slices)).astype(int)]
  low = WINDOW_LEVEL - WINDOW_WIDTH / 2
  out_x = np.empty((len(keep), size, size), np.uint8)
  out_y = np.empty((len(keep), size, size), np.int32)
  for i, z in enumerate(keep):  # RAS voxels -> rows anterior-up, columns patient's right first
    window = np.clip((hu[::-1, ::-1, z].T - low) / WINDOW_WIDTH, 0, 1)
    resized = Image.fromarray(np.ascontiguousarray(window)).resize(
        (size, size), Image.BILINEAR)
    out_x[i] = np.round(np.asarray(resized) * 255)
    out_y[i] = np.asarray(Image.fromarray(
        np.ascontiguousarray(mask[::-1, ::-1, z].T.astype(np.uint8))).resize(
            (size, size), Image.NEAREST))
  return out_x, out_y
