"""The two data containers every loader and partitioner agrees on.

`ImageDataset` is what a loader returns: one pooled set of images with labels and
patient ids (host numpy). `FederatedData` is what the simulation consumes: the
pooled set split into hospitals and padded to fixed shapes, so that one compiled
program serves every client and every round.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  """A pooled image data set on the host.

  Attributes:
    images: uint8 `[N, H, W, C]` (raw pixel values; normalised in-graph).
    labels: int32 `[N]` class indices in `[0, num_classes)`, or for segmentation
      int32 masks `[N, H, W]` (a class per pixel, aligned with `images`).
    patient_ids: int64 `[N]`; images of one patient share an id. Loaders without
      patient information give every image its own id.
    class_names: one name per class.
    name: data set name, e.g. "synthetic_cxr", "pneumoniamnist".
    mean: fixed normalisation mean of pixel/255 (public constant, never computed
      from the pooled private training data).
    std: fixed normalisation std of pixel/255.
    sites: optional int32 `[N]` acquisition site of each image (for the natural
      partition).
    source_split: optional `[N]` str array with the split the publisher assigned
      ("train", "val", "test"); informational, the federation re-splits by patient.
  """

  images: np.ndarray
  labels: np.ndarray
  patient_ids: np.ndarray
  class_names: tuple[str, ...]
  name: str
  mean: float = 0.5
  std: float = 0.25
  sites: Optional[np.ndarray] = None
  source_split: Optional[np.ndarray] = None

  def __post_init__(self):
    n = len(self.images)
    if self.images.ndim != 4 or self.images.dtype != np.uint8:
      raise ValueError(
          f"ImageDataset.images must be uint8 [N, H, W, C], got {self.images.dtype} "
          f"{self.images.shape}")
    for field in ("labels", "patient_ids", "sites", "source_split"):
      value = getattr(self, field)
      if value is not None and len(value) != n:
        raise ValueError(f"ImageDataset.{field} has {len(value)} entries, images has {n}")
    if self.labels.ndim not in (1, 3) or (
        self.labels.ndim == 3 and self.labels.shape[1:] != self.images.shape[1:3]):
      raise ValueError(f"ImageDataset.labels must be [N] classes or [N, H, W] masks for "
                       f"images {self.images.shape}, got {self.labels.shape}")

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.images.shape[1:])

  @property
  def image_labels(self) -> np.ndarray:
    """One class per image `[N]` (for partitioning and prevalence): the label, or for
    a mask the largest class present (e.g. 2 = "has a lesion")."""
    return self.labels.reshape(len(self.labels), -1).max(axis=1, initial=0)

  def subset(self, index: np.ndarray) -> "ImageDataset":
    """The examples at `index` (same metadata)."""
    take = lambda a: None if a is None else a[index]
    return dataclasses.replace(
        self, images=self.images[index], labels=self.labels[index],
        patient_ids=self.patient_ids[index], sites=take(self.sites),
        source_split=take(self.source_split))


@dataclasses.dataclass(frozen=True)
class ClientArrays:
  """One split of every hospital, padded to a common length.

  Attributes:
    images: uint8 `[clients, max_examples, H, W, C]`; padding is zeros.
    labels: int32 `[clients, max_examples]` (segmentation: masks `[clients,
      max_examples, H, W]`); padding is 0.
    patients: int32 `[clients, max_examples]` patient index local to the hospital,
      in `[0, num_patients[k])`; padding is -1.
    counts: int32 `[clients]` real examples per hospital.
    num_patients: int32 `[clients]` distinct patients per hospital.
  """

  images: np.ndarray
  labels: np.ndarray
  patients: np.ndarray
  counts: np.ndarray
  num_patients: np.ndarray

  @property
  def num_clients(self) -> int:
    return self.images.shape[0]

  @property
  def max_examples(self) -> int:
    return self.images.shape[1]

  @property
  def max_patient_images(self) -> int:
    """Most images any one patient has (1 for an empty split)."""
    ids = self.patients + self.num_patients.max() * np.arange(self.num_clients)[:, None]
    return int(np.bincount(ids[self.patients >= 0]).max(initial=1))

  @property
  def mask(self) -> np.ndarray:
    """bool `[clients, max_examples]`, True on real examples."""
    return np.arange(self.max_examples)[None, :] < self.counts[:, None]

  def take(self, clients: np.ndarray) -> "ClientArrays":
    """The hospitals at `clients` (host gather, e.g. one round's cohort)."""
    return ClientArrays(*(getattr(self, f.name)[clients]
                          for f in dataclasses.fields(self)))


@dataclasses.dataclass(frozen=True)
class FederatedData:
  """A federation of hospitals, ready for the simulation.

  Attributes:
    train, val, test: the seen hospitals' patient-disjoint splits.
    unseen: every example of the held-out hospitals (evaluated only), or None.
    class_names, name, mean, std: as in `ImageDataset`.
    hospitals: per-hospital metadata (seen then unseen), e.g. "site", "contrast",
      "brightness", "noise", "blur", "prevalence"; arrays of length
      `num_clients + num_unseen` (prevalence: `[hospitals, num_classes]`).
  """

  train: ClientArrays
  val: ClientArrays
  test: ClientArrays
  unseen: Optional[ClientArrays]
  class_names: tuple[str, ...]
  name: str
  mean: float
  std: float
  hospitals: dict = dataclasses.field(default_factory=dict)

  @property
  def num_clients(self) -> int:
    return self.train.num_clients

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train.images.shape[2:])
