"""A population of synthetic hospitals generated when sampled (`data.population=on_demand`).

A million hospitals do not fit in host memory as images, but a round only needs its
cohort's. Here hospital h exists as a rule, not as arrays: its patients (images per
patient, which split each patient is in) follow from a counter-based hash of
(seed, h, patient slot), so every hospital's size is known for the privacy ledger
without drawing a pixel (vectorised over all hospitals at start-up, in chunks); its
images, labels and scanner come from `np.random.default_rng([seed, STREAM, h])`,
drawn by `take` when the hospital is in a cohort and dropped after the round. The
same (seed, h) always gives the same hospital, whichever cohort it is drawn with, so
runs stay reproducible and resumable.

Host memory is the cohort's block of images plus ~10 bytes per hospital (sizes and
patient counts, which the ledger needs). Evaluation uses a fixed sample of
`data.eval_hospitals` seen hospitals (their val and test patients) and the
`data.num_unseen` held-out ones, materialised once.

What a hospital is: `data.examples_per_client` images of patients with 1-4 images
each (uniform, mean 2.5, as `synthetic.generate`), each patient in train / val /
test with probabilities (1 - val - test, val, test) (the first patient always
trains), the case mix `synthetic.DEFAULT_PREVALENCE` (`data.partition=iid`) or
Dirichlet(alpha * classes * that mix) per hospital (`prevalence`, as
fedsim/partition.py's), and its own scanner (`shift.acquisition_shift`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedsim import partition as partition_lib
from fedsim.data import shift as shift_lib
from fedsim.data import synthetic
from fedsim.data.base import ClientArrays, FederatedData

STREAM = 16  # numpy stream of a hospital's images (federated.py uses 1 and 2)
PARTITIONS = ("iid", "prevalence")
TRAIN, VAL, TEST = 0, 1, 2
_EVAL_STREAM = 1
_LAYOUT_CHUNK = 1 << 16  # hospitals laid out at once (a few MB of uint64)
_M1, _M2, _GOLDEN = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB),
                     np.uint64(0x9E3779B97F4A7C15))


def _mix(z: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: uint64 -> uint64, a bijection that scrambles every bit."""
  with np.errstate(over="ignore"):
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def layout(seed: int, hospitals: np.ndarray, *, examples: int,
           fractions: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
  """Patients of each hospital: `(sizes, split)`, int32 `[len(hospitals), examples]`.

  Slot j of hospital h is a patient with `sizes[h, j]` images (0: no patient) in
  split `split[h, j]` (TRAIN, VAL, TEST); sizes sum to `examples`. A pure function
  of (seed, h): the same whichever hospitals are laid out together.
  """
  h = np.asarray(hospitals, np.uint64)[:, None]
  j = np.arange(examples, dtype=np.uint64)[None, :]
  z = _mix(_mix(_mix(np.uint64(seed)) ^ h) ^ j)
  sizes = (1 + (z & np.uint64(3))).astype(np.int32)
  start = np.cumsum(sizes, axis=1) - sizes
  sizes = np.clip(examples - start, 0, sizes).astype(np.int32)
  u = (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
  split = np.where(u < fractions[0], TRAIN, np.where(u < fractions[0] + fractions[1], VAL,
                                                     TEST)).astype(np.int32)
  split[:, 0] = TRAIN
  return sizes, split


@dataclasses.dataclass(frozen=True)
class Population:
  """The rule every hospital follows (see the module docstring); hospital ids are global:
  `0..num_clients-1` seen, then `num_unseen` held out."""

  seed: int
  examples: int
  fractions: tuple[float, float, float]
  image_size: int
  alpha: float
  skewed: bool
  shift: float

  def hospital(self, h: int) -> tuple[synthetic.ImageDataset, np.ndarray]:
    """Hospital h's images and the split of each image (`[n]`, TRAIN / VAL / TEST)."""
    sizes, split = layout(self.seed, np.array([h]), examples=self.examples,
                          fractions=self.fractions)
    real = sizes[0] > 0
    rng = np.random.default_rng([self.seed, STREAM, h])
    prevalence = np.asarray(synthetic.DEFAULT_PREVALENCE, np.float64)
    if self.skewed:
      prevalence = rng.dirichlet(self.alpha * len(prevalence) * prevalence)
    data = synthetic.render_patients(rng, sizes[0][real], image_size=self.image_size,
                                     prevalence=prevalence)
    images, _ = shift_lib.acquisition_shift(data.images, hospital=h, seed=self.seed,
                                            strength=self.shift)
    return dataclasses.replace(data, images=images), split[0][real][data.patient_ids]

  def clients(self, hospitals: np.ndarray, splits: tuple[int, ...], width: int) -> ClientArrays:
    """The `splits` of `hospitals`, padded to `width` examples (as `pad_clients` pads)."""
    shape = (self.image_size, self.image_size, 1)
    images = np.zeros((len(hospitals), width) + shape, np.uint8)
    labels = np.zeros((len(hospitals), width), np.int32)
    patients = np.full((len(hospitals), width), -1, np.int32)
    counts = np.zeros(len(hospitals), np.int32)
    num_patients = np.zeros(len(hospitals), np.int32)
    for k, h in enumerate(hospitals):
      data, split = self.hospital(int(h))
      keep = np.flatnonzero(np.isin(split, splits))
      n = counts[k] = len(keep)
      ids, local = partition_lib.patient_index(data.patient_ids[keep])
      images[k, :n], labels[k, :n], patients[k, :n] = data.images[keep], data.labels[keep], local
      num_patients[k] = len(ids)
    return ClientArrays(images, labels, patients, counts, num_patients)


class _Unmaterialised:
  """The shape of an array that is never built (an on-demand split's images)."""

  def __init__(self, shape: tuple[int, ...], dtype):
    self.shape, self.dtype, self.ndim = shape, np.dtype(dtype), len(shape)

  def __getitem__(self, index):
    raise TypeError("an on-demand population's images exist only for a cohort: "
                    "use OnDemandClients.take(ids)")


class OnDemandClients:
  """The seen hospitals' training splits, as `ClientArrays` offers them to a round.

  `counts`, `num_patients` and `max_patient_images` are known for every hospital
  (from `layout`); `take(ids)` draws the images of just those hospitals.
  """

  def __init__(self, population: Population, num_clients: int):
    self.population = population
    counts = np.zeros(num_clients, np.int32)
    num_patients = np.zeros(num_clients, np.int32)
    largest = 1
    for start in range(0, num_clients, _LAYOUT_CHUNK):
      ids = np.arange(start, min(start + _LAYOUT_CHUNK, num_clients))
      sizes, split = layout(population.seed, ids, examples=population.examples,
                            fractions=population.fractions)
      train = np.where(split == TRAIN, sizes, 0)
      counts[ids] = train.sum(1)
      num_patients[ids] = (train > 0).sum(1)
      largest = max(largest, int(train.max()))
    self.counts, self.num_patients, self.max_patient_images = counts, num_patients, largest
    shape = (population.image_size, population.image_size, 1)
    self.images = _Unmaterialised((num_clients, self.max_examples) + shape, np.uint8)

  @property
  def num_clients(self) -> int:
    return len(self.counts)

  @property
  def max_examples(self) -> int:
    return max(1, int(self.counts.max()))

  @property
  def mask(self) -> np.ndarray:
    raise TypeError("an on-demand population has no [clients, examples] mask: use take(ids)")

  def take(self, clients: np.ndarray) -> ClientArrays:
    """The training splits of hospitals `clients`, drawn now (a round's block)."""
    return self.population.clients(np.asarray(clients), (TRAIN,), self.max_examples)


def evaluated_hospitals(seed: int, num_clients: int, count: int) -> np.ndarray:
  """The fixed sample of seen hospitals whose val and test patients are evaluated."""
  rng = np.random.default_rng([seed, STREAM, _EVAL_STREAM])
  return np.sort(rng.choice(num_clients, size=min(count, num_clients), replace=False))


def on_demand_federation(config) -> FederatedData:
  """The `FederatedData` of `data.population=on_demand` (validated config)."""
  d = config.data
  population = Population(
      seed=config.seed, examples=d.examples_per_client,
      fractions=(1 - d.val_fraction - d.test_fraction, d.val_fraction, d.test_fraction),
      image_size=d.image_size, alpha=d.alpha, skewed=d.partition == "prevalence",
      shift=d.shift)
  train = OnDemandClients(population, config.num_clients)
  sample = evaluated_hospitals(config.seed, config.num_clients, d.eval_hospitals)
  split = lambda ids, splits: population.clients(ids, splits, d.examples_per_client)
  unseen = config.num_clients + np.arange(d.num_unseen)
  total = config.num_clients + d.num_unseen
  return FederatedData(
      train=train, val=split(sample, (VAL,)), test=split(sample, (TEST,)),
      unseen=split(unseen, (TRAIN, VAL, TEST)) if d.num_unseen else None,
      class_names=synthetic.CLASS_NAMES, name=synthetic.NAME, mean=synthetic.MEAN,
      std=synthetic.STD,
      hospitals={"unseen": np.arange(total) >= config.num_clients,
                 "num_train_examples": np.concatenate(
                     [train.counts, np.zeros(d.num_unseen, np.int32)])})
