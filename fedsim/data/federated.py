"""From one pooled `ImageDataset` to a padded `FederatedData` of hospitals.

  partition patients into num_clients + data.num_unseen hospitals
  -> per hospital: acquisition shift (its own scanner)
  -> seen hospitals: patient-disjoint train / val / test; unseen: evaluation only
  -> pad every split to [clients, max_examples, H, W, C] with counts and patient ids

Randomness: the partition draws from `(seed, 1)`, hospital h's split from
`(seed, 2, h)`, its scanner from `(seed, h)` (see `shift.py`), so the same
config and seed always give the same federation.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Sequence

import numpy as np

from fedsim import partition as partition_lib
from fedsim.data import shift as shift_lib
from fedsim.data.base import ClientArrays, FederatedData, ImageDataset

_PARTITION_STREAM, _SPLIT_STREAM = 1, 2


def build_federated_data(dataset: ImageDataset, data_config, *, num_clients: int,
                         seed: int) -> FederatedData:
  """Splits `dataset` into hospitals, shifts, splits and pads them.

  Args:
    dataset: the pooled images.
    data_config: the `data` ConfigDict (partition, alpha, quantity_power,
      site_csv, num_unseen, val_fraction, test_fraction, shift).
    num_clients: seen (training) hospitals; `data_config.num_unseen` more are
      held out.
    seed: run seed.

  Returns:
    A `FederatedData` whose `hospitals` metadata lists seen hospitals, then unseen.
  """
  fractions = _validate(data_config, num_clients)
  num_hospitals = num_clients + data_config.num_unseen
  hospital, sites = assign_hospitals(dataset, data_config, num_hospitals=num_hospitals,
                                     seed=seed)
  splits = {name: [] for name in ("train", "val", "test", "unseen")}
  meta = []
  for h in range(num_hospitals):
    local = dataset.subset(np.flatnonzero(hospital == h))
    images, params = shift_lib.acquisition_shift(
        local.images, hospital=h, seed=seed, strength=data_config.shift)
    local = dataclasses.replace(local, images=images)
    if h < num_clients:
      rng = np.random.default_rng([seed, _SPLIT_STREAM, h])
      which = partition_lib.split_patients(local.patient_ids, fractions, rng)
      for k, name in enumerate(("train", "val", "test")):
        splits[name].append(local.subset(np.flatnonzero(which == k)))
    else:
      splits["unseen"].append(local)
    meta.append(_hospital_meta(local, params, dataset.num_classes))
  hospitals = _stack_meta(meta, sites, num_clients,
                          [len(s.labels) for s in splits["train"]])
  return FederatedData(
      train=pad_clients(splits["train"]), val=pad_clients(splits["val"]),
      test=pad_clients(splits["test"]),
      unseen=pad_clients(splits["unseen"]) if splits["unseen"] else None,
      class_names=dataset.class_names, name=dataset.name, mean=dataset.mean,
      std=dataset.std, hospitals=hospitals)


def assign_hospitals(dataset: ImageDataset, data_config, *, num_hospitals: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Runs the configured partitioner.

  Returns:
    `(hospital [N] int32, site [num_hospitals])`: the hospital of each example and
    the site of each hospital (natural partition: the site value; otherwise the
    hospital index).
  """
  name = data_config.partition
  rng = np.random.default_rng([seed, _PARTITION_STREAM])
  options = {}
  site_of_hospital = np.arange(num_hospitals)
  if name in ("dirichlet", "prevalence"):
    options = dict(alpha=data_config.alpha)
  elif name == "quantity":
    options = dict(power=data_config.quantity_power)
  elif name == "natural":
    sites = example_sites(dataset, data_config.site_csv)
    options = dict(sites=sites)
    site_of_hospital = partition_lib.natural_sites(dataset.patient_ids, sites)
  hospital = partition_lib.partition(name, dataset.patient_ids, dataset.image_labels,
                                     num_hospitals=num_hospitals, rng=rng, **options)
  return hospital, site_of_hospital


def example_sites(dataset: ImageDataset, site_csv: str) -> np.ndarray:
  """Site of each example: from `site_csv` (patient_id,site) if set, else `dataset.sites`."""
  if not site_csv:
    if dataset.sites is None:
      raise ValueError("data.partition='natural' needs sites: the data set has none; "
                       "set data.site_csv to a CSV with columns patient_id,site")
    return np.asarray(dataset.sites)
  table = read_site_csv(site_csv)
  missing = sorted(set(np.unique(dataset.patient_ids).tolist()) - set(table))
  if missing:
    raise ValueError(f"data.site_csv={site_csv!r} has no site for {len(missing)} "
                     f"patients, e.g. {missing[:5]}")
  return np.array([table[p] for p in dataset.patient_ids.tolist()])


def read_site_csv(path: str) -> dict:
  """Reads `patient_id,site` rows into {int patient id: site (int if all are)}."""
  if not os.path.isfile(path):
    raise ValueError(f"data.site_csv={path!r} is not a file")
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    if not {"patient_id", "site"} <= set(reader.fieldnames or ()):
      raise ValueError(f"data.site_csv={path!r} needs columns patient_id,site, "
                       f"has {reader.fieldnames}")
    rows = [(r["patient_id"].strip(), r["site"].strip()) for r in reader]
  try:
    ids = [int(p) for p, _ in rows]
  except ValueError as e:
    raise ValueError(f"data.site_csv={path!r}: patient_id must be an integer ({e})") from None
  sites = [s for _, s in rows]
  if all(s.lstrip("-").isdigit() for s in sites):
    sites = [int(s) for s in sites]
  table = {}
  for p, s in zip(ids, sites, strict=True):
    if table.setdefault(p, s) != s:
      raise ValueError(f"data.site_csv={path!r}: patient {p} has two sites")
  return table


def pad_clients(clients: Sequence[ImageDataset]) -> ClientArrays:
  """Stacks hospitals' examples into fixed shapes (zeros / -1 beyond the counts).

  Args:
    clients: one `ImageDataset` per hospital (same image shape, possibly empty).

  Returns:
    `ClientArrays` with `max_examples = max(1, largest count)`; patients are
    re-indexed `0..p-1` within each hospital (rank of the patient id).
  """
  counts = np.array([len(c.labels) for c in clients], np.int32)
  width = max(1, int(counts.max()))
  shape = clients[0].image_shape
  images = np.zeros((len(clients), width) + shape, np.uint8)
  labels = np.zeros((len(clients), width) + clients[0].labels.shape[1:], np.int32)
  patients = np.full((len(clients), width), -1, np.int32)
  num_patients = np.zeros(len(clients), np.int32)
  for k, c in enumerate(clients):
    n = counts[k]
    ids, local = partition_lib.patient_index(c.patient_ids)
    images[k, :n], labels[k, :n], patients[k, :n] = c.images, c.labels, local
    num_patients[k] = len(ids)
  return ClientArrays(images=images, labels=labels, patients=patients, counts=counts,
                      num_patients=num_patients)


def _validate(data_config, num_clients: int) -> tuple[float, float, float]:
  """Checks the fields used here; returns the (train, val, test) fractions."""
  if num_clients < 1:
    raise ValueError(f"num_clients={num_clients} must be >= 1")
  if data_config.num_unseen < 0:
    raise ValueError(f"data.num_unseen={data_config.num_unseen} must be >= 0")
  partition_lib.get_partitioner(data_config.partition)
  val, test = data_config.val_fraction, data_config.test_fraction
  if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
    raise ValueError(f"data.val_fraction={val} and data.test_fraction={test} must be "
                     ">= 0 with a sum < 1")
  if not data_config.shift >= 0:
    raise ValueError(f"data.shift={data_config.shift} must be >= 0")
  return (1 - val - test, val, test)


def _hospital_meta(local: ImageDataset, params: dict, num_classes: int) -> dict:
  """One hospital's metadata: shift parameters, prevalence, sizes."""
  counts = np.bincount(local.image_labels, minlength=num_classes)
  return dict(params, prevalence=counts / max(1, counts.sum()),
              num_examples=len(local.labels),
              num_patients=len(np.unique(local.patient_ids)))


def _stack_meta(meta: list, sites: np.ndarray, num_clients: int,
                train_counts: list) -> dict:
  """Per-hospital metadata as arrays of length num_hospitals (seen, then unseen)."""
  num_hospitals = len(meta)
  out = {k: np.array([m[k] for m in meta]) for k in meta[0]}
  out["site"] = np.asarray(sites)
  out["unseen"] = np.arange(num_hospitals) >= num_clients
  out["num_train_examples"] = np.zeros(num_hospitals, np.int64)
  out["num_train_examples"][:num_clients] = train_counts
  return out
