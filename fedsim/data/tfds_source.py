"""TFDS medical image sets through `tfds.data_source` (array_record; no TensorFlow).

`data.path` names the set (optionally with a version, `malaria:1.0.0`) and
`data.data_dir` the TFDS data folder (empty: TFDS's default, `~/tensorflow_datasets`
or `$TFDS_DATA_DIR`). The set must already be prepared there in array_record
format, e.g. on a machine with internet and TensorFlow:

  tfds build malaria --data_dir=DIR --file_format=array_record

Supported sets (`SETS`): patch_camelyon (lymph-node metastasis patches, 96x96 RGB),
colorectal_histology (Kather 2016 tissue tiles, 150x150 RGB), malaria (thin blood
smear cells, variable size RGB). Every available split is pooled (publisher split
in `source_split`), images are resized to `image_size` (bilinear) keeping their
native channels, and decoded arrays are cached in `<data_dir>/.fedsim_cache`
(see `cache`), keyed by version, image size and the prepared files.

None of these sets carries patient or slide ids in TFDS, so every image is its
own patient: patient-level privacy here equals example-level privacy (patches of
one patch_camelyon slide are in truth correlated). Normalisation uses fixed public
constants (the ImageNet mean/std averaged over RGB), never the pooled data.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from fedsim.data import cache
from fedsim.data.base import ImageDataset
from fedsim.data.image_folder import decode_image

_IMAGENET_MEAN = 0.449  # mean of (0.485, 0.456, 0.406)
_IMAGENET_STD = 0.226   # mean of (0.229, 0.224, 0.225)
_CHUNK = 512
_CACHE_VERSION = "tfds-v1"
_SPLIT_NAMES = {"validation": "val", "valid": "val"}
_SPLIT_ORDER = ("train", "validation", "val", "test")


@dataclasses.dataclass(frozen=True)
class TfdsSet:
  """How to read one TFDS set: feature keys, class names, normalisation."""
  image_key: str
  label_key: str
  class_names: tuple[str, ...]
  mean: float = _IMAGENET_MEAN
  std: float = _IMAGENET_STD


SETS: dict[str, TfdsSet] = {
    "patch_camelyon": TfdsSet("image", "label", ("normal", "metastatic")),
    "colorectal_histology": TfdsSet(
        "image", "label", ("tumor", "stroma", "complex", "lympho", "debris",
                           "mucosa", "adipose", "empty")),
    "malaria": TfdsSet("image", "label", ("parasitized", "uninfected")),
}


def load(data_config: Any) -> ImageDataset:
  """Loads the TFDS set `data_config.path` from `data_config.data_dir`.

  Args:
    data_config: the `data` ConfigDict; reads `path` (`name` or `name:version`),
      `data_dir` and `image_size`.

  Returns:
    Images uint8 `[N, image_size, image_size, C]` (native C, 3 for the sets
    above), labels int32 `[N]`, patient ids `arange(N)` (int64), `source_split`,
    the class names and fixed mean/std of `SETS[name]`.

  Raises:
    FileNotFoundError: the set is not prepared in the data folder.
    ValueError: unsupported name, unreadable version or format, bad features.
  """
  spec = str(data_config.path or "").strip()
  name = spec.split(":")[0]
  if name not in SETS:
    raise ValueError(f"data.path={spec!r} is not a supported TFDS set; supported: "
                     f"{sorted(SETS)} (optionally name:version)")
  size = int(data_config.image_size)
  if size < 1:
    raise ValueError(f"data.image_size={data_config.image_size} must be >= 1")
  data_dir = str(data_config.data_dir or "") or None
  table = SETS[name]
  builder = _builder(spec, data_dir)
  channels = _check_features(builder, spec, table)
  data_path = Path(os.fspath(builder.data_path))
  files = sorted(p for p in data_path.iterdir() if p.is_file())
  key = cache.fingerprint(cache.file_entries(files, data_path), _CACHE_VERSION,
                          spec, str(builder.version), size)
  path = cache.cache_file(data_path.parents[1] / ".fedsim_cache", name, size, key)
  dataset = cache.load_dataset(path, mean=table.mean, std=table.std)
  if dataset is None:
    dataset = _read(spec, data_dir, table, name=name, size=size, channels=channels)
    cache.save_dataset(path, dataset)
  return dataset


def _builder(spec: str, data_dir: str | None) -> Any:
  """The prepared TFDS builder of `spec`; clear errors when it is not there."""
  where = data_dir or "the default TFDS data dir"
  try:
    builder = tfds.builder(spec, data_dir=data_dir)
  except (AssertionError, ValueError) as err:
    raise ValueError(f"Cannot open TFDS set {spec!r} in {where}: {err}") from None
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"TFDS set {spec!r} is not prepared in {where} (looked for "
        f"{builder.data_path}). This machine cannot download it: prepare it where "
        f"there is internet and TensorFlow with `tfds build {spec.split(':')[0]} "
        "--data_dir=DIR --file_format=array_record`, copy DIR here and set "
        "data.data_dir=DIR.")
  return builder


def _check_features(builder: Any, spec: str, table: TfdsSet) -> int:
  """Checks the prepared features against `table`; returns the image channels."""
  features = builder.info.features
  for key in (table.image_key, table.label_key):
    if key not in features:
      raise ValueError(f"TFDS set {spec!r} has no feature {key!r} "
                       f"(features: {sorted(features.keys())})")
  num_classes = features[table.label_key].num_classes
  if num_classes != len(table.class_names):
    raise ValueError(f"TFDS set {spec!r} has {num_classes} classes, expected "
                     f"{len(table.class_names)} {list(table.class_names)}")
  channels = features[table.image_key].shape[-1] or 3
  if channels not in (1, 3):
    raise ValueError(f"TFDS set {spec!r}: images have {channels} channels, "
                     "expected 1 or 3")
  return channels


def _read(spec: str, data_dir: str | None, table: TfdsSet, *, name: str,
          size: int, channels: int) -> ImageDataset:
  """Decodes and resizes every split of the set into one pooled data set."""
  try:
    sources = tfds.data_source(
        spec, data_dir=data_dir, download=False,
        decoders={table.image_key: tfds.decode.SkipDecoding()})
  except NotImplementedError as err:
    raise ValueError(
        f"TFDS set {spec!r} is not stored in a random-access format: rebuild it "
        f"with `tfds build {name} --file_format=array_record` ({err})") from None
  images, labels, splits = [], [], []
  for split in sorted(sources, key=_split_rank):
    x, y = _read_split(sources[split], table, size=size, channels=channels)
    images.append(x)
    labels.append(y)
    splits.append(np.full(len(y), _SPLIT_NAMES.get(split, split)))
  label = np.concatenate(labels)
  return ImageDataset(
      images=np.concatenate(images), labels=label,
      patient_ids=np.arange(len(label), dtype=np.int64),
      class_names=table.class_names, name=name, mean=table.mean, std=table.std,
      source_split=np.concatenate(splits))


def _split_rank(split: str) -> tuple[int, str]:
  order = _SPLIT_ORDER.index(split) if split in _SPLIT_ORDER else len(_SPLIT_ORDER)
  return order, split


def _read_split(source: Sequence[dict], table: TfdsSet, *, size: int,
                channels: int) -> tuple[np.ndarray, np.ndarray]:
  """uint8 `[n, size, size, channels]` and int32 `[n]` of one split."""
  mode = "RGB" if channels == 3 else "L"

  def decode(data: bytes) -> np.ndarray:
    return decode_image(io.BytesIO(data), size=size, mode=mode)

  images = np.empty((len(source), size, size, channels), np.uint8)
  labels = np.empty(len(source), np.int32)
  workers = min(32, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    for start in range(0, len(source), _CHUNK):
      index = list(range(start, min(start + _CHUNK, len(source))))
      records = source.__getitems__(index)
      decoded = pool.map(decode, [r[table.image_key] for r in records])
      images[start:start + len(index)] = np.stack(list(decoded)).reshape(
          len(index), size, size, channels)
      labels[start:start + len(index)] = [int(r[table.label_key]) for r in records]
  return images, labels
