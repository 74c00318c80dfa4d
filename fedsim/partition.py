"""Hospital partitioners: which hospital holds each patient.

Every partitioner assigns whole PATIENTS (never single images) to hospitals, so
all images of a patient live in one hospital and patient-level privacy is
meaningful. Each returns an int32 array `[N]`: the hospital of each example.
Every hospital gets at least `min_patients` patients, or the call stops with a
`ValueError` saying why that is impossible.

  iid        patients shuffled and dealt out evenly.
  dirichlet  label skew: per class, Dirichlet(alpha) proportions over hospitals
             (Hsu et al. 2019 / Wang et al. 2020); small alpha, strong skew.
  quantity   size skew: the k-th largest hospital holds a share ~ k^-power
             (power 0: equal sizes), ranks shuffled over hospitals.
  natural    one hospital per acquisition site, in sorted site order.

`split_patients` then splits one hospital's patients into train / val / test.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

MIN_PATIENTS = 3  # per hospital: enough for one train, one val and one test patient


def patient_index(patient_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Distinct patients and, for each example, its patient's position.

  Args:
    patient_ids: `[N]` patient id of each example.

  Returns:
    `(unique_ids [P], inverse [N])` with `unique_ids[inverse] == patient_ids`.
  """
  unique, inverse = np.unique(np.asarray(patient_ids), return_inverse=True)
  return unique, inverse.reshape(-1)


def patient_mode(inverse: np.ndarray, values: np.ndarray) -> np.ndarray:
  """The most frequent value of each patient's examples (ties: the smallest).

  Args:
    inverse: `[N]` patient position of each example (from `patient_index`).
    values: `[N]` non-negative ints (labels, site codes).

  Returns:
    `[P]` one value per patient.
  """
  values = np.asarray(values, np.int64)
  table = np.zeros((inverse.max() + 1, values.max() + 1), np.int64)
  np.add.at(table, (inverse, values), 1)
  return table.argmax(1)


def iid(patient_ids: np.ndarray, labels: np.ndarray, *, num_hospitals: int,
        rng: np.random.Generator, min_patients: int = MIN_PATIENTS) -> np.ndarray:
  """Shuffles patients and deals them out evenly (sizes differ by at most one)."""
  del labels  # unused: iid ignores labels
  _, inverse = patient_index(patient_ids)
  num_patients = inverse.max() + 1
  _check_enough(num_patients, num_hospitals, min_patients)
  sizes = np.full(num_hospitals, num_patients // num_hospitals)
  sizes[:num_patients % num_hospitals] += 1
  return _deal(rng.permutation(num_patients), sizes, inverse)


def dirichlet(patient_ids: np.ndarray, labels: np.ndarray, *, num_hospitals: int,
              rng: np.random.Generator, alpha: float,
              min_patients: int = MIN_PATIENTS) -> np.ndarray:
  """Label skew: each class's patients go to hospitals in Dirichlet(alpha) shares.

  A patient's class is its most frequent label. Hospitals left with fewer than
  `min_patients` patients are topped up with random patients of the largest ones.
  """
  if not alpha > 0:
    raise ValueError(f"data.alpha={alpha} must be > 0 for the dirichlet partition")
  _, inverse = patient_index(patient_ids)
  patient_labels = patient_mode(inverse, labels)
  _check_enough(len(patient_labels), num_hospitals, min_patients)
  hospital = np.empty(len(patient_labels), np.int64)
  for c in np.unique(patient_labels):
    members = rng.permutation(np.flatnonzero(patient_labels == c))
    shares = rng.dirichlet(np.full(num_hospitals, float(alpha)))
    cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
    for h, part in enumerate(np.split(members, cuts)):
      hospital[part] = h
  hospital = _top_up(hospital, num_hospitals, min_patients, rng)
  return hospital[inverse].astype(np.int32)


def prevalence(patient_ids: np.ndarray, labels: np.ndarray, *, num_hospitals: int,
               rng: np.random.Generator, alpha: float,
               min_patients: int = MIN_PATIENTS) -> np.ndarray:
  """Label skew at equal sizes: hospital h's case mix ~ Dirichlet(alpha * global mix).

  Every hospital gets the same number of patients (within one), drawn by its own
  prevalence of each class while that class lasts; this models sites that
  differ in case mix but not in size (e.g. a children's hospital that sees more
  viral pneumonia), and keeps per-hospital DP sampling rates equal.
  """
  if not alpha > 0:
    raise ValueError(f"data.alpha={alpha} must be > 0 for the prevalence partition")
  _, inverse = patient_index(patient_ids)
  patient_labels = patient_mode(inverse, labels)
  num_patients = len(patient_labels)
  _check_enough(num_patients, num_hospitals, min_patients)
  classes, counts = np.unique(patient_labels, return_counts=True)
  pools = [list(rng.permutation(np.flatnonzero(patient_labels == c))) for c in classes]
  quota = np.full(num_hospitals, num_patients // num_hospitals)
  quota[: num_patients % num_hospitals] += 1
  mix = rng.dirichlet(alpha * len(classes) * counts / num_patients, size=num_hospitals)
  hospital = np.empty(num_patients, np.int64)
  for h in rng.permutation(num_hospitals):
    for _ in range(quota[h]):
      left = np.array([len(pool) for pool in pools], float)
      weights = mix[h] * (left > 0)
      weights = weights if weights.sum() > 0 else left
      c = rng.choice(len(pools), p=weights / weights.sum())
      hospital[pools[c].pop()] = h
  return hospital[inverse].astype(np.int32)


def quantity(patient_ids: np.ndarray, labels: np.ndarray, *, num_hospitals: int,
             rng: np.random.Generator, power: float,
             min_patients: int = MIN_PATIENTS) -> np.ndarray:
  """Size skew: the k-th largest hospital gets a share of patients ~ k^-power.

  Each hospital first gets `min_patients`; the rest are shared by the power law
  (largest remainders), ranks are shuffled over hospitals, patients are random.
  """
  del labels  # unused: sizes only
  if not power >= 0:
    raise ValueError(f"data.quantity_power={power} must be >= 0")
  _, inverse = patient_index(patient_ids)
  num_patients = inverse.max() + 1
  _check_enough(num_patients, num_hospitals, min_patients)
  weights = np.arange(1, num_hospitals + 1, dtype=np.float64) ** -float(power)
  extra = _largest_remainder(num_patients - num_hospitals * min_patients,
                             weights / weights.sum())
  sizes = (min_patients + extra)[rng.permutation(num_hospitals)]
  return _deal(rng.permutation(num_patients), sizes, inverse)


def natural_sites(patient_ids: np.ndarray, sites: np.ndarray) -> np.ndarray:
  """The sorted distinct sites of the patients (hospital k is site `[k]`)."""
  _, inverse = patient_index(patient_ids)
  values, codes = _site_codes(sites)
  return values[np.unique(patient_mode(inverse, codes))]


def natural(patient_ids: np.ndarray, labels: np.ndarray, *, sites: np.ndarray,
            num_hospitals: Optional[int] = None,
            rng: Optional[np.random.Generator] = None,
            min_patients: int = MIN_PATIENTS) -> np.ndarray:
  """One hospital per acquisition site (sorted site order).

  A patient seen at several sites goes to its most frequent one.

  Args:
    patient_ids, labels: `[N]` per example.
    sites: `[N]` non-negative int site of each example.
    num_hospitals: if given, must equal the number of distinct sites.
    rng: unused (the partition is fixed by the sites); accepted for a common call.
    min_patients: minimum patients per site.
  """
  del labels, rng  # unused: the sites decide
  _, inverse = patient_index(patient_ids)
  values, codes = _site_codes(sites)
  patient_sites = patient_mode(inverse, codes)
  distinct, hospital = np.unique(patient_sites, return_inverse=True)
  if num_hospitals is not None and num_hospitals != len(distinct):
    raise ValueError(
        f"data.partition='natural' found {len(distinct)} sites but "
        f"{num_hospitals} hospitals were asked for (num_clients + data.num_unseen)")
  sizes = np.bincount(hospital, minlength=len(distinct))
  if sizes.min() < min_patients:
    small = values[distinct[sizes < min_patients]]
    raise ValueError(f"data.partition='natural': sites {small.tolist()} have fewer "
                     f"than {min_patients} patients")
  return hospital.reshape(-1)[inverse].astype(np.int32)


PARTITIONERS: dict[str, Callable[..., np.ndarray]] = {
    "iid": iid, "dirichlet": dirichlet, "prevalence": prevalence, "quantity": quantity,
    "natural": natural}


def get_partitioner(name: str) -> Callable[..., np.ndarray]:
  """The partitioner registered as `name`; ValueError listing the allowed names."""
  if name not in PARTITIONERS:
    raise ValueError(f"data.partition={name!r} is not one of {sorted(PARTITIONERS)}")
  return PARTITIONERS[name]


def partition(name: str, patient_ids: np.ndarray, labels: np.ndarray, *,
              num_hospitals: int, rng: np.random.Generator,
              min_patients: int = MIN_PATIENTS, **options) -> np.ndarray:
  """Runs the partitioner `name`; `options` are its own (alpha, power, sites)."""
  return get_partitioner(name)(patient_ids, labels, num_hospitals=num_hospitals,
                               rng=rng, min_patients=min_patients, **options)


def split_patients(patient_ids: np.ndarray, fractions: Sequence[float],
                   rng: np.random.Generator) -> np.ndarray:
  """Splits one hospital's patients into disjoint splits (e.g. train/val/test).

  Patient counts follow `fractions` (largest remainders); when there are at least
  as many patients as splits with a positive fraction, each of those gets at
  least one patient. With fewer, the largest fractions are served first.

  Args:
    patient_ids: `[n]` patient id of each of the hospital's examples.
    fractions: one non-negative fraction per split, summing to 1.
    rng: draws which patients go where.

  Returns:
    int32 `[n]`: the split index of each example.
  """
  f = np.asarray(fractions, np.float64)
  if f.ndim != 1 or np.any(f < 0) or abs(f.sum() - 1) > 1e-6:
    raise ValueError(f"split fractions {list(fractions)} must be >= 0 and sum to 1")
  _, inverse = patient_index(patient_ids)
  num_patients = inverse.max() + 1 if len(inverse) else 0
  sizes = _split_sizes(num_patients, f)
  split_of = np.empty(num_patients, np.int32)
  split_of[rng.permutation(num_patients)] = np.repeat(np.arange(len(f)), sizes)
  return split_of[inverse]


def _split_sizes(num_patients: int, fractions: np.ndarray) -> np.ndarray:
  """Patients per split; every positive fraction gets one when there are enough."""
  order = np.argsort(-fractions, kind="stable")
  positive = int((fractions > 0).sum())
  if num_patients < positive:
    sizes = np.zeros(len(fractions), np.int64)
    sizes[order[:num_patients]] = 1
    return sizes
  sizes = _largest_remainder(num_patients, fractions)
  for s in np.flatnonzero((fractions > 0) & (sizes == 0)):
    sizes[sizes.argmax()] -= 1
    sizes[s] = 1
  return sizes


def _largest_remainder(total: int, shares: np.ndarray) -> np.ndarray:
  """Integers summing to `total`, proportional to `shares` (Hamilton's method)."""
  raw = total * shares / shares.sum()
  sizes = np.floor(raw).astype(np.int64)
  short = total - sizes.sum()
  sizes[np.argsort(-(raw - sizes), kind="stable")[:short]] += 1
  return sizes


def _check_enough(num_patients: int, num_hospitals: int, min_patients: int) -> None:
  if num_hospitals < 1:
    raise ValueError(f"number of hospitals {num_hospitals} must be >= 1")
  if num_patients < num_hospitals * min_patients:
    raise ValueError(
        f"{num_patients} patients cannot give {num_hospitals} hospitals at least "
        f"{min_patients} patients each; use more data or fewer hospitals")


def _deal(patients: np.ndarray, sizes: np.ndarray, inverse: np.ndarray) -> np.ndarray:
  """Hospital of each example when `patients` (in order) fill hospitals of `sizes`."""
  hospital = np.empty(len(patients), np.int64)
  hospital[patients] = np.repeat(np.arange(len(sizes)), sizes)
  return hospital[inverse].astype(np.int32)


def _top_up(hospital: np.ndarray, num_hospitals: int, min_patients: int,
            rng: np.random.Generator) -> np.ndarray:
  """Moves random patients from the largest hospitals to those below the minimum."""
  hospital = hospital.copy()
  sizes = np.bincount(hospital, minlength=num_hospitals)
  while sizes.min() < min_patients:
    small, large = sizes.argmin(), sizes.argmax()
    moved = rng.choice(np.flatnonzero(hospital == large))
    hospital[moved] = small
    sizes[small] += 1
    sizes[large] -= 1
  return hospital


def _site_codes(sites: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Distinct site values and each example's code in `[0, num_sites)`."""
  if sites is None:
    raise ValueError("data.partition='natural' needs sites: the data set has none "
                     "and data.site_csv is empty")
  values, codes = np.unique(np.asarray(sites), return_inverse=True)
  return values, codes.reshape(-1)
