"""DICOM loader: a folder of DICOM files, as hospitals' archives hold them.

Every file under `data.path` (any depth; hidden files and folders, `DICOMDIR` and
the CSVs named by `data.labels_csv` and `data.site_csv` excepted) must be a
single-frame DICOM image.
Each becomes one grayscale `[image_size, image_size, 1]` uint8 image:

  stored values -> modality LUT (Rescale Slope / Intercept, or a Modality LUT Sequence)
  -> VOI window to [0, 1]: Window Center / Width of the header (first value when
     several; VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID, DICOM PS3.3
     C.11.2.1.2), or the fixed `data.window_center` / `data.window_width` (LINEAR)
     when `data.window_width > 0`, or, without either, the image's own min..max
  -> MONOCHROME1 inverted (its low values are white); RGB / YBR to grey (ITU-R 601)
  -> bilinear resize of the whole image to `data.image_size` square, x255, rounded.

Labels: with `data.labels_csv`, a CSV with a `label` column and exactly one key
column: `path` (relative to `data.path`), `SOPInstanceUID`, `StudyInstanceUID` or
`PatientID`; an optional `site` column gives the natural partition. Without it the
first sub-folder under `data.path` names the class (`root/<class>/**/file`).
Patients: PatientID (with IssuerOfPatientID when present; a file without one is
its study's patient, StudyInstanceUID). Sites: the header field `data.site_field`
(e.g. InstitutionName) or the CSV's `site` column.

A file that is not DICOM, has no pixel data, is multi-frame, or is compressed with
no decoder installed stops the load with one line naming it and the fix
(`data.skip_unreadable=True` skips such files with a warning). The decoded set is
cached like the image folder's (`cache.py`): written atomically after every file
was read, keyed by the files, the CSV and every option that changes the arrays.
"""

from __future__ import annotations

import concurrent.futures
import csv
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut, get_decoder
from tqdm.auto import tqdm

from fedsim.data import cache
from fedsim.data.base import ImageDataset

MEAN = 0.5   # fixed constants for pixel/255, never computed from the data
STD = 0.25
KEY_COLUMNS = ("path", "SOPInstanceUID", "StudyInstanceUID", "PatientID")
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
_CACHE_VERSION = "dicom-v1"
_SKIP = "or set data.skip_unreadable=True to skip such files"
_GREY = ("MONOCHROME1", "MONOCHROME2")
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as PIL's "L"

_log = logging.getLogger(__name__)


class Unreadable(ValueError):
  """A file the loader cannot turn into an image (skipped with data.skip_unreadable)."""


class _Slice(NamedTuple):
  """One decoded file: image and the header fields the federation needs."""
  image: np.ndarray   # uint8 [size, size]
  path: str           # relative to the root, posix
  sop: str
  study: str
  patient: str        # PatientID; "" when the header has none
  issuer: str         # IssuerOfPatientID; "" when the header has none
  site: str           # "" unless data.site_field is set


class _Labels(NamedTuple):
  """A labels CSV: its key column and key -> label (and -> site when given)."""
  key: str
  labels: dict[str, str]
  sites: dict[str, str] | None


def load(data_config: Any) -> ImageDataset:
  """Loads the DICOM folder at `data_config.path`.

  Args:
    data_config: the `data` ConfigDict; reads `path`, `image_size`, `data_dir`
      (cache folder; default `<path>/.fedsim_cache`), `labels_csv`, `site_field`,
      `window_center`, `window_width` and `skip_unreadable`.

  Returns:
    Images uint8 `[N, image_size, image_size, 1]`, labels int32 `[N]`, patient ids
    int64 `[N]` (sorted order of the patient keys), `sites` (str `[N]`) when a site
    field or site column is given, mean 0.5 and std 0.25 (fixed).

  Raises:
    FileNotFoundError: the folder does not exist.
    ValueError: one line naming the file or field at fault.
  """
  root = _resolve_root(str(data_config.path or ""))
  size = int(data_config.image_size)
  site_field = str(data_config.site_field or "")
  if site_field and pydicom.datadict.tag_for_keyword(site_field) is None:
    raise ValueError(f"data.site_field={site_field!r} is not a DICOM keyword "
                     "(e.g. InstitutionName, StationName)")
  labels_csv = str(data_config.labels_csv or "")
  table = _read_labels_csv(labels_csv) if labels_csv else None
  if site_field and table is not None and table.sites is not None:
    raise ValueError(f"data.site_field={site_field!r} and the site column of "
                     f"data.labels_csv={labels_csv!r} both give sites: keep one")
  window = ((float(data_config.window_center), float(data_config.window_width))
            if data_config.window_width > 0 else None)
  skip = bool(data_config.skip_unreadable)
  paths = _list_files(root, exclude=[Path(p) for p in (labels_csv, str(data_config.site_csv))
                                     if p])
  if table is None:  # class folders, checked before minutes of decoding
    for path in paths:
      _class_folder(path.relative_to(root).as_posix(), root)
  extra = cache.file_entries([Path(labels_csv)], Path(labels_csv).parent) if table else []
  key = cache.fingerprint(cache.file_entries(paths, root), _CACHE_VERSION, size,
                          window, site_field, skip, labels_csv, *extra)
  path = cache.cache_file(cache.cache_dir(data_config, root / ".fedsim_cache"),
                          f"dicom_{root.name}", size, key)
  dataset = cache.load_dataset(path, mean=MEAN, std=STD)
  if dataset is None:
    slices = _read_all(paths, root, size=size, window=window, site_field=site_field,
                       skip=skip)
    dataset = _assemble(slices, root, table, labels_csv)
    cache.save_dataset(path, dataset)
  return dataset


def _resolve_root(path: str) -> Path:
  if not path:
    raise ValueError("data.path is empty: name the folder of DICOM files")
  root = Path(path).expanduser()
  if root.is_file():
    raise ValueError(f"data.path={path} is a file; name the folder of DICOM files")
  if not root.is_dir():
    raise FileNotFoundError(f"DICOM folder {root} not found (data.path)")
  return root


def _list_files(root: Path, *, exclude: list[Path]) -> list[Path]:
  """Every file under `root` but `exclude`, sorted; hidden paths and DICOMDIR skipped."""
  skip = {p.resolve() for p in exclude}
  paths = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
    for name in files:
      path = Path(folder) / name
      if name.startswith(".") or name.upper() == "DICOMDIR" or path.resolve() in skip:
        continue
      paths.append(path)
  if not paths:
    raise ValueError(f"No files under the DICOM folder {root} (data.path)")
  return sorted(paths, key=lambda p: p.relative_to(root).as_posix())


def _read_all(paths: list[Path], root: Path, *, size: int, window, site_field: str,
              skip: bool) -> list[_Slice]:
  """Decodes every file in threads; the first refusal (path order) stops unless `skip`."""
  def read(path):
    try:
      return read_file(path, root, size=size, window=window, site_field=site_field)
    except Unreadable as err:
      return err

  workers = min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    results = list(tqdm(pool.map(read, paths), total=len(paths), desc="reading DICOM",
                        disable=None, leave=False))
  refused = [r for r in results if isinstance(r, Unreadable)]
  if refused and not skip:
    raise refused[0]
  slices = [r for r in results if isinstance(r, _Slice)]
  if refused:
    _log.warning("Skipped %d of %d files under %s (data.skip_unreadable), e.g. %s",
                 len(refused), len(paths), root, refused[0])
  if not slices:
    raise ValueError(f"None of the {len(paths)} files under {root} is a readable DICOM "
                     f"image, e.g. {refused[0]}")
  return slices


def read_file(path: Path, root: Path, *, size: int, window=None,
              site_field: str = "") -> _Slice:
  """One DICOM file as a grey uint8 `[size, size]` image with its header keys.

  Args:
    path: the file.
    root: the data folder (file names in messages and keys are relative to it).
    size: output height and width.
    window: `(center, width)` overriding the header's window (LINEAR), or None.
    site_field: header keyword holding the site, or "" for none.

  Raises:
    Unreadable: one line naming the file, the problem and the fix.
  """
  rel = path.relative_to(root).as_posix()
  fail = lambda why, fix=_SKIP: Unreadable(f"DICOM file {rel}: {why}; {fix}")
  try:
    ds = pydicom.dcmread(path)
  except pydicom.errors.InvalidDicomError:
    raise fail("not a DICOM file (no 'DICM' marker)", f"remove it {_SKIP}") from None
  except Exception as err:  # truncated or damaged: pydicom raises many kinds
    raise fail(f"cannot be read ({type(err).__name__}: {err})",
               f"replace or remove it {_SKIP}") from None
  if "PixelData" not in ds:
    sop_class = ds.get("SOPClassUID")
    raise fail(f"has no pixel data (SOP class {getattr(sop_class, 'name', 'unknown')}: "
               "not an image, or a truncated file)", f"remove it {_SKIP}")
  if int(ds.get("NumberOfFrames", 1) or 1) > 1:
    raise fail(f"is multi-frame ({ds.NumberOfFrames} frames): only single-frame "
               "images are read")
  _check_decoder(ds, fail)
  try:
    pixels = ds.pixel_array
  except Exception as err:  # decoders raise many kinds
    raise fail(f"cannot decode its pixel data ({type(err).__name__}: {err})") from None
  grey = _to_unit(pixels, ds, window, fail)
  site = ""
  if site_field:
    site = str(ds.get(site_field, "") or "").strip()
    if not site:
      raise fail(f"has no value for data.site_field={site_field!r}",
                 "fill it in or give sites in data.labels_csv's site column")
  text = lambda field: str(ds.get(field, "") or "").strip()
  return _Slice(image=_resize(grey, size), path=rel, sop=text("SOPInstanceUID"),
                study=text("StudyInstanceUID"), patient=text("PatientID"),
                issuer=text("IssuerOfPatientID"), site=site)


def _check_decoder(ds: Any, fail) -> None:
  """Refuses a compressed transfer syntax whose decoder is not installed."""
  uid = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
  if uid is None or not uid.is_compressed:
    return
  try:
    decoder = get_decoder(uid)
  except NotImplementedError:
    raise fail(f"transfer syntax {uid} has no decoder in pydicom") from None
  if not decoder.is_available:
    options = "; ".join(decoder.missing_dependencies)
    raise fail(f"compressed as {uid.name} ({uid}) and no decoder is installed",
               f"install one ({options}; gdcm is pip's python-gdcm) {_SKIP}")


def _to_unit(pixels: np.ndarray, ds: Any, window, fail) -> np.ndarray:
  """float64 `[H, W]` in [0, 1]: modality LUT, VOI window, MONOCHROME1 inverted."""
  kind = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
  if kind == "RGB" or kind.startswith("YBR"):  # pydicom converts YBR to RGB
    top = float(2 ** int(ds.get("BitsStored", 8)) - 1)
    return (np.asarray(pixels, np.float64) @ _LUMA) / top
  if kind not in _GREY:
    raise fail(f"photometric interpretation {kind} is not read (MONOCHROME1, "
               "MONOCHROME2, RGB, YBR_*)")
  values = np.asarray(apply_modality_lut(pixels, ds), np.float64)
  if window is not None:
    unit = voi_window(values, center=window[0], width=window[1], function="LINEAR")
  elif "WindowCenter" in ds and "WindowWidth" in ds:
    center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function not in VOI_FUNCTIONS:
      raise fail(f"VOI LUT Function {function} is not one of {list(VOI_FUNCTIONS)}",
                 f"set data.window_center/width {_SKIP}")
    if not (width >= 1 if function == "LINEAR" else width > 0):
      raise fail(f"Window Width {width} is invalid for {function}",
                 f"set data.window_center/width {_SKIP}")
    unit = voi_window(values, center=center, width=width, function=function)
  else:
    low, high = values.min(), values.max()
    unit = (values - low) / (high - low) if high > low else np.zeros_like(values)
  return 1.0 - unit if kind == "MONOCHROME1" else unit


def _first(value: Any) -> float:
  """The first of a possibly multi-valued number."""
  if isinstance(value, Sequence) and not isinstance(value, str):
    value = value[0]
  return float(value)


def voi_window(values: np.ndarray, *, center: float, width: float,
               function: str = "LINEAR") -> np.ndarray:
  """The VOI window of DICOM PS3.3 C.11.2.1.2 with output range [0, 1].

  LINEAR (width >= 1): 0 for x <= c - 0.5 - (w - 1) / 2, 1 for x > c - 0.5 + (w - 1) / 2,
  else (x - (c - 0.5)) / (w - 1) + 0.5. LINEAR_EXACT (w > 0): (x - c) / w + 0.5,
  clipped. SIGMOID (w > 0): 1 / (1 + exp(-4 (x - c) / w)).
  """
  values = np.asarray(values, np.float64)
  if function == "LINEAR":
    if width == 1:
      return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
  if function == "LINEAR_EXACT":
    return np.clip((values - center) / width + 0.5, 0.0, 1.0)
  if function == "SIGMOID":
    return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
  raise ValueError(f"VOI LUT function {function!r} is not one of {list(VOI_FUNCTIONS)}")


def _resize(unit: np.ndarray, size: int) -> np.ndarray:
  """[0, 1] `[H, W]` -> uint8 `[size, size]`: bilinear on floats, then x255 rounded."""
  if unit.shape != (size, size):
    image = Image.fromarray(unit.astype(np.float32), mode="F")
    unit = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))
  return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


def _read_labels_csv(path: str) -> _Labels:
  """The labels CSV: one key column of KEY_COLUMNS, `label`, optional `site`."""
  if not os.path.isfile(path):
    raise ValueError(f"data.labels_csv={path!r} is not a file")
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    columns = reader.fieldnames or []
    rows = list(reader)
  keys = [c for c in KEY_COLUMNS if c in columns]
  if len(keys) != 1 or "label" not in columns:
    raise ValueError(
        f"data.labels_csv={path!r} needs a label column and exactly one key column of "
        f"{list(KEY_COLUMNS)}; it has {columns}")
  key = keys[0]
  labels, sites = {}, ({} if "site" in columns else None)
  for row in rows:
    k, label = (row[key] or "").strip(), (row["label"] or "").strip()
    if not k or not label:
      raise ValueError(f"data.labels_csv={path!r}: a row has an empty {key} or label")
    if labels.setdefault(k, label) != label:
      raise ValueError(f"data.labels_csv={path!r}: {key} {k} has two labels "
                       f"({labels[k]!r}, {label!r})")
    if sites is not None and sites.setdefault(k, row["site"].strip()) != row["site"].strip():
      raise ValueError(f"data.labels_csv={path!r}: {key} {k} has two sites")
  return _Labels(key, labels, sites)


def _assemble(slices: list[_Slice], root: Path, table: _Labels | None,
              labels_csv: str) -> ImageDataset:
  """Labels, patient ids and sites for the decoded slices."""
  if table is None:
    names = [_class_folder(s.path, root) for s in slices]
    sites = [s.site for s in slices] if slices[0].site else None
    _refuse_patient_folders(names, slices, root)
  else:
    keys = [_key_of(s, table.key) for s in slices]
    missing = [k for k in keys if k not in table.labels]
    if missing:
      raise ValueError(f"data.labels_csv={labels_csv!r} has no {table.key} row for "
                       f"{len(missing)} of {len(keys)} DICOM files, e.g. {missing[0]!r}")
    names = [table.labels[k] for k in keys]
    sites = ([table.sites[k] for k in keys] if table.sites is not None
             else [s.site for s in slices] if slices[0].site else None)
  numeric = all(n.lstrip("-").isdigit() for n in names)
  class_names = sorted(set(names), key=int if numeric else None)
  index = {n: i for i, n in enumerate(class_names)}
  patients = _patient_keys(slices, root)
  _, patient_ids = np.unique(np.array(patients), return_inverse=True)
  return ImageDataset(
      images=np.stack([s.image for s in slices])[..., None],
      labels=np.array([index[n] for n in names], dtype=np.int32),
      patient_ids=patient_ids.astype(np.int64).reshape(-1),
      class_names=tuple(class_names), name=root.name, mean=MEAN, std=STD,
      sites=None if sites is None else np.array(sites))


def _key_of(s: _Slice, column: str) -> str:
  return {"path": s.path, "SOPInstanceUID": s.sop, "StudyInstanceUID": s.study,
          "PatientID": s.patient}[column]


def _class_folder(rel: str, root: Path) -> str:
  """The class of the file at `rel` (posix, relative to `root`): its first folder."""
  parts = rel.split("/")
  if len(parts) < 2:
    raise ValueError(f"DICOM file {rel} lies directly in data.path={root}: put files "
                     "in <class>/ sub-folders or give labels in data.labels_csv")
  return parts[0]


def _refuse_patient_folders(names: list[str], slices: list[_Slice], root: Path) -> None:
  """Folder labels that are really PatientIDs (an archive's layout) are refused."""
  folders = set(names)
  if len(folders) > 1 and folders <= {s.patient for s in slices}:
    raise ValueError(f"The sub-folders of data.path={root} are named after PatientIDs, "
                     "not classes: give labels in data.labels_csv")


def _patient_keys(slices: list[_Slice], root: Path) -> list[str]:
  """PatientID (issuer-qualified); a file without one is its study's patient."""
  keys = [f"patient:{s.issuer}\x1f{s.patient}" if s.patient else f"study:{s.study}"
          for s in slices]
  without = sum(not s.patient for s in slices)
  if without:
    _log.warning("%d DICOM files under %s have no PatientID; each is taken as its "
                 "study's (StudyInstanceUID) patient", without, root)
  return keys
