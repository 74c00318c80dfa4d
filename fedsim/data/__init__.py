"""Data: loaders (one module per source), the synthetic generator, federation.

  load_dataset(config.data, ...)   -> ImageDataset (pooled, host numpy)
  build_federated_data(...)        -> FederatedData (hospitals, padded)
  make_federated_data(config)      -> both, from the whole run config
"""

from __future__ import annotations

import importlib

from fedsim.data import synthetic, synthetic_segmentation
from fedsim.data.base import ClientArrays, FederatedData, ImageDataset
from fedsim.data.federated import build_federated_data

# data.source -> module of fedsim.data with a `load(data_config) -> ImageDataset`.
# "synthetic" is built in (its size depends on the federation, see load_dataset).
SOURCES = {"synthetic": "synthetic", "medmnist": "medmnist",
           "image_folder": "image_folder", "tfds": "tfds_source", "dicom": "dicom",
           "nifti": "nifti"}


def load_dataset(data_config, *, num_clients: int, seed: int,
                 task: str = "classification") -> ImageDataset:
  """Loads the pooled data set named by `data_config.source`.

  Args:
    data_config: the `data` ConfigDict.
    num_clients: seen hospitals (synthetic data is sized for the federation:
      `(num_clients + num_unseen) * examples_per_client` images).
    seed: run seed (synthetic images are drawn from it).
    task: "classification" or "segmentation": which synthetic generator (chest
      X-rays with classes, or abdominal CT slices with liver and lesion masks).

  Returns:
    The pooled `ImageDataset`; real sources are imported only when asked for.
  """
  source = data_config.source
  if source not in SOURCES:
    raise ValueError(f"data.source={source!r} is not one of {sorted(SOURCES)}")
  if source == "synthetic":
    num_hospitals = num_clients + data_config.num_unseen
    if task == "segmentation":
      return synthetic_segmentation.generate(
          num_examples=num_hospitals * data_config.examples_per_client,
          image_size=data_config.image_size, seed=seed)
    return synthetic.generate(
        num_examples=num_hospitals * data_config.examples_per_client,
        image_size=data_config.image_size, seed=seed)
  module = importlib.import_module(f"fedsim.data.{SOURCES[source]}")
  return module.load(data_config)


def make_federated_data(config) -> FederatedData:
  """The federation of a whole run config (fields num_clients, seed, task, data)."""
  if config.data.population == "on_demand":  # synthetic hospitals drawn when sampled
    from fedsim.data import population  # pylint: disable=import-outside-toplevel
    return population.on_demand_federation(config)
  dataset = load_dataset(config.data, num_clients=config.num_clients, seed=config.seed,
                         task=config.task)
  return build_federated_data(dataset, config.data, num_clients=config.num_clients,
                              seed=config.seed)


__all__ = ["ClientArrays", "FederatedData", "ImageDataset", "SOURCES",
           "build_federated_data", "load_dataset", "make_federated_data"]
