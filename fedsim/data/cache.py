"""On-disk cache of decoded image data sets, written atomically.

Decoding thousands of JPEG/PNG files takes minutes; the decoded, resized arrays
take seconds to read back. A cache file is named after the data set, the image
size and a fingerprint of the source files (paths, sizes, modification times), so
a changed file, an added file or another image size never reads a stale cache.

A cache file is written to a temporary name in the same folder and renamed into
place (`os.replace`, atomic on POSIX and Windows), so an interrupted run leaves
either no cache or a complete one: never a file that looks complete and is not.

  key = fingerprint([(relpath, size, mtime_ns), ...], image_size, "v1")
  path = cache_file(cache_dir, "chest_xray_kermany", 64, key)
  dataset = load_dataset(path, mean=0.5, std=0.25)       # None on a miss
  save_dataset(path, dataset)                            # atomic
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from fedsim.data.base import ImageDataset

_log = logging.getLogger(__name__)

_REQUIRED = ("images", "labels", "patient_ids", "class_names", "name")


def fingerprint(entries: Iterable[Any], *extra: Any) -> str:
  """A hex digest of `entries` (e.g. `(relpath, size, mtime_ns)` tuples) and `extra`."""
  digest = hashlib.sha256()
  for item in (*extra, *entries):
    digest.update(repr(item).encode())
    digest.update(b"\n")
  return digest.hexdigest()


def file_entries(paths: Iterable[Path], root: Path) -> list[tuple[str, int, int]]:
  """`(path relative to root, size, mtime_ns)` of each file, for `fingerprint`."""
  entries = []
  for path in paths:
    stat = path.stat()
    entries.append((path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
  return entries


def cache_dir(data_config: Any, default: Path) -> Path:
  """`data_config.data_dir` when set, else `default`."""
  data_dir = str(data_config.data_dir or "")
  return Path(data_dir).expanduser() if data_dir else default


def cache_file(directory: Path, name: str, image_size: int, key: str) -> Path:
  """The cache path for data set `name` at `image_size` with fingerprint `key`."""
  return directory / f"{name}-{image_size}px-{key[:16]}.npz"


def load_dataset(path: Path, *, mean: float, std: float) -> ImageDataset | None:
  """The cached data set at `path`, or None when absent or unreadable.

  Args:
    path: a file written by `save_dataset`.
    mean: normalisation mean to attach (constants live in the loaders, not the
      cache).
    std: normalisation std to attach.

  Returns:
    The data set, or None (a damaged cache is logged and ignored, so the caller
    rebuilds and overwrites it).
  """
  if not path.is_file():
    return None
  try:
    with np.load(path, allow_pickle=False) as npz:
      arrays = {key: npz[key] for key in npz.files}
    missing = [key for key in _REQUIRED if key not in arrays]
    if missing:
      raise KeyError(f"missing arrays {missing}")
    return ImageDataset(
        images=arrays["images"], labels=arrays["labels"],
        patient_ids=arrays["patient_ids"],
        class_names=tuple(str(c) for c in arrays["class_names"]),
        name=str(arrays["name"]), mean=mean, std=std,
        sites=arrays.get("sites"), source_split=arrays.get("source_split"))
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
    _log.warning("Ignoring unreadable cache %s (%s); rebuilding it.", path, err)
    return None


def save_dataset(path: Path, dataset: ImageDataset) -> None:
  """Writes `dataset` to `path` atomically; logs and skips when it cannot.

  A folder that cannot be written (read-only data mount, full disk) costs only
  the cache: the data set is already in memory. Any other interruption
  (KeyboardInterrupt included) removes the temporary file and propagates.
  """
  arrays = {
      "images": dataset.images, "labels": dataset.labels,
      "patient_ids": dataset.patient_ids,
      "class_names": np.asarray(dataset.class_names, dtype=str),
      "name": np.asarray(dataset.name, dtype=str),
  }
  if dataset.source_split is not None:
    arrays["source_split"] = np.asarray(dataset.source_split, dtype=str)
  if dataset.sites is not None:
    arrays["sites"] = np.asarray(dataset.sites)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, arrays)
  except OSError as err:
    _log.warning("Could not write cache %s (%s); continuing without it.", path, err)


def _atomic_write(path: Path, arrays: dict[str, np.ndarray]) -> None:
  """Writes `arrays` to a temporary file beside `path`, then renames it."""
  handle = tempfile.NamedTemporaryFile(
      dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
  try:
    with handle:
      _write(handle, arrays)
      handle.flush()
      os.fsync(handle.fileno())
    os.replace(handle.name, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(handle.name)
    raise


def _write(handle: BinaryIO, arrays: dict[str, np.ndarray]) -> None:
  """Serialises `arrays` as an uncompressed .npz into `handle`."""
  np.savez(handle, **arrays)
