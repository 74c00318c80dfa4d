"""Per-hospital privacy ledger of a federated run (shared/DESIGN.md, invariant 5).

Usable without fedsim. Hospitals differ in size, so their sampling rates and epsilons differ:
a `PrivacyLedger` keeps one per-round DpEvent per hospital, counts the rounds each one took
part in, and reports epsilon per hospital (and the maximum, the run's guarantee) at any round.
`to_json` is the privacy record (privacy.json) with the serialised events.

Numbers are plain Python floats (inf for a mechanism without noise); how non-finite values
are written is the JSON writer's rule, not the ledger's.

Example:

  >>> ledger = PrivacyLedger.for_local_dp_sgd(sampling_rates=[0.1, 0.5], steps=10,
  ...                                         noise_multiplier=1.0, delta=1e-5)
  >>> ledger.record_round(np.array([True, False]))  # hospital 1 sat this round out
  >>> ledger.composition_counts.tolist(), [round(e, 3) for e in ledger.epsilons().tolist()]
  ([1, 0], [3.442, 0.0])
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from privacy import accountants, events, subsampled_gaussian, validation
from privacy.accountants import PLD_DISCRETIZATION, RDP_ORDERS
from privacy.events import DpEvent

PRIVACY_UNITS = ("example", "patient", "hospital")


def _event_key(event: DpEvent) -> str:
  return json.dumps(events.event_to_dict(event), sort_keys=True)


class PrivacyLedger:
  """Per-hospital privacy ledger for one run (invariant 5: every hospital has its own).

  Example- and patient-level DP: hospital k's per-round event (q_k = expected batch / n_k,
  steps_k local steps) is composed once per round the hospital takes part in; hospitals
  that never took part have epsilon 0. Client-level DP (unit "hospital"): the per-round
  event includes the client sampling, so it is composed every recorded round and every
  hospital reports the same epsilon.

  Epsilons are cached by (distinct per-round event, composition count): with RDP, a
  hospital at count c costs c * (RDP of its per-round event), computed once per distinct
  event for all hospitals at once; with PLD each distinct (event, count) is one PLD, the
  event's one-step PLD self-composed (steps * count) as `PLDAccountant` composes it. The
  one-step PLDs (with their tail-bound MGFs) are kept per distinct event for the ledger's
  lifetime, not rebuilt per evaluation: memory is the sum of their dense PMFs
  (`pld_step_bytes`), about 3.6 MB per event for experiments/default.py's truncated steps at
  interval 1e-4 (100 hospitals, 62 distinct events: 223 MB; at most ~6 MB an event).
  """

  def __init__(
      self,
      per_round_events: Sequence[DpEvent],
      *,
      delta: float,
      accountant: str = "rdp",
      unit: str = "example",
      pld_discretization: float = PLD_DISCRETIZATION,
  ):
    """Builds an empty ledger.

    Args:
      per_round_events: [hospitals] one event per hospital for one round it takes part in
        (client-level: the same event, one round of DP-FedAvg, for every hospital).
      delta: target delta.
      accountant: "rdp" or "pld".
      unit: privacy unit, one of `PRIVACY_UNITS`.
      pld_discretization: PLD value discretisation interval.
    """
    validation.check(unit in PRIVACY_UNITS, "unit", unit, f"one of {list(PRIVACY_UNITS)}")
    validation.check(len(per_round_events) > 0, "per_round_events", per_round_events,
                     "non-empty (one event per hospital)")
    self.delta = validation.check_delta(delta)
    accountants.make_accountant(accountant)  # Rejects unknown names early.
    self.accountant, self.unit, self.pld_discretization = accountant, unit, pld_discretization
    keys = [_event_key(e) for e in per_round_events]
    unique = dict.fromkeys(keys)
    self._events = [events.event_from_dict(json.loads(k)) for k in unique]
    position = {k: u for u, k in enumerate(unique)}
    self._index = np.array([position[k] for k in keys], np.int64)
    relations = {accountants.check_supported(e, accountant) for e in self._events}
    if len(relations) > 1:
      raise ValueError(f"hospitals' events mix neighbouring relations: {sorted(relations)}")
    self.neighbouring = relations.pop()
    self._counts = np.zeros(len(keys), np.int64)
    self._rounds = 0
    self._cache: dict[tuple[int, int], float] = {}
    self._rdp: dict[int, np.ndarray] = {}
    self._steps: dict[int, tuple[subsampled_gaussian.ComposableStep | None, int]] = {}
    self.history: list[dict[str, Any]] = []

  @classmethod
  def for_local_dp_sgd(
      cls,
      *,
      sampling_rates: Sequence[float],
      steps: int | Sequence[int],
      noise_multiplier: float,
      delta: float,
      accountant: str = "rdp",
      unit: str = "example",
      truncated_batch_size: int | None = None,
      dataset_sizes: Sequence[int] | None = None,
      pld_discretization: float = PLD_DISCRETIZATION,
  ) -> PrivacyLedger:
    """Example/patient-level ledger from per-hospital q_k [H] and local steps (int or [H])."""
    rates = np.asarray(sampling_rates, np.float64).reshape(-1)
    steps_k = np.broadcast_to(np.asarray(steps), rates.shape)
    sizes = [None] * len(rates) if dataset_sizes is None else list(dataset_sizes)
    per_round = [
        events.local_dp_sgd_event(sampling_rate=float(q), noise_multiplier=noise_multiplier,
                                  steps=int(t), truncated_batch_size=truncated_batch_size,
                                  dataset_size=None if n is None else int(n))
        for q, t, n in zip(rates, steps_k, sizes, strict=True)
    ]
    return cls(per_round, delta=delta, accountant=accountant, unit=unit,
               pld_discretization=pld_discretization)

  @classmethod
  def for_client_level(
      cls,
      *,
      num_hospitals: int,
      noise_multiplier: float,
      delta: float,
      sampling_rate: float | None = None,
      cohort_size: int | None = None,
      accountant: str = "rdp",
      pld_discretization: float = PLD_DISCRETIZATION,
  ) -> PrivacyLedger:
    """Client-level (DP-FedAvg) ledger: Poisson cohorts (`sampling_rate`) or fixed-size ones."""
    if (sampling_rate is None) == (cohort_size is None):
      raise ValueError("give exactly one of sampling_rate (Poisson) and cohort_size (fixed)")
    num_hospitals = validation.check_count("num_clients", num_hospitals, minimum=1)
    if cohort_size is None:
      event = events.client_level_event(sampling_rate=sampling_rate,
                                        noise_multiplier=noise_multiplier, rounds=1)
    else:
      event = events.fixed_size_sampled_event(sample_size=cohort_size, population=num_hospitals,
                                              noise_multiplier=noise_multiplier, steps=1)
    return cls([event] * num_hospitals, delta=delta, accountant=accountant, unit="hospital",
               pld_discretization=pld_discretization)

  @property
  def num_hospitals(self) -> int:
    return int(self._index.shape[0])

  @property
  def rounds_recorded(self) -> int:
    return self._rounds

  @property
  def composition_counts(self) -> np.ndarray:
    """[hospitals] how many times each hospital's per-round event has been composed."""
    return self._counts.copy()

  def _increment(self, mask: np.ndarray | None) -> np.ndarray:
    if self.unit == "hospital":
      return np.ones_like(self._counts)
    mask = np.asarray(mask)
    validation.check(mask.shape == self._counts.shape, "participation_mask.shape", mask.shape,
                     f"({self.num_hospitals},): one entry per hospital")
    return mask.astype(bool).astype(np.int64)

  def record_round(self, participating_hospital_mask: np.ndarray | None) -> None:
    """Adds one round; `participating_hospital_mask` [hospitals] bool (ignored for client-level)."""
    self._counts += self._increment(participating_hospital_mask)
    self._rounds += 1

  def _fill_rdp(self) -> None:
    """RDP of every distinct per-round event, in one vectorised pass (once per ledger)."""
    todo = [u for u in range(len(self._events)) if u not in self._rdp]
    fast = [(u, p) for u in todo
            if (p := subsampled_gaussian.poisson_gaussian_params(self._events[u])) is not None]
    if fast:
      q, sigma, count = (np.array(x) for x in zip(*(p for _, p in fast)))
      rdp = subsampled_gaussian.poisson_gaussian_rdp(q, sigma, RDP_ORDERS) * count[:, None]
      self._rdp.update({u: rdp[i] for i, (u, _) in enumerate(fast)})
    for u in set(todo) - {u for u, _ in fast}:
      acct = accountants.make_accountant("rdp", neighbouring=self.neighbouring)
      self._rdp[u] = acct.compose(self._events[u]).rdp

  def _fill_cache(self, pairs: list[tuple[int, int]]) -> None:
    if self.accountant == "rdp":
      self._fill_rdp()
      rdp = np.stack([c * self._rdp[u] for u, c in pairs])
      eps = subsampled_gaussian.epsilon_from_rdp(rdp, RDP_ORDERS, self.delta)
      self._cache.update({pair: float(e) for pair, e in zip(pairs, eps)})
      return
    for u, c in pairs:
      self._cache[(u, c)] = self._pld_epsilon(u, c)

  def _step(self, u: int) -> tuple[subsampled_gaussian.ComposableStep | None, int]:
    """(one-step PLD of distinct event u, steps per round), built once per ledger."""
    if u not in self._steps:
      pld, steps = subsampled_gaussian.step_pld(self._events[u], self.pld_discretization,
                                                cached=False)
      self._steps[u] = (None if pld is None else subsampled_gaussian.ComposableStep(pld), steps)
    return self._steps[u]

  @property
  def pld_step_bytes(self) -> int:
    """Bytes held by the ledger's cached one-step PLDs (PLD accountant; 0 before any)."""
    return sum(step.nbytes for step, _ in self._steps.values() if step is not None)

  def _pld_epsilon(self, u: int, count: int) -> float:
    step, steps = self._step(u)
    if step is None:
      return accountants.epsilon(events.hospital_event(self._events[u], count), self.delta,
                                 "pld", pld_discretization=self.pld_discretization)
    return float(subsampled_gaussian.epsilon_for_delta(step.self_compose(steps * count),
                                                       self.delta))

  def _epsilons_at(self, counts: np.ndarray) -> np.ndarray:
    pairs, inverse = np.unique(np.stack([self._index, counts], axis=1), axis=0,
                               return_inverse=True)
    pairs = [(int(u), int(c)) for u, c in pairs]
    missing = [p for p in pairs if p[1] > 0 and p not in self._cache]
    if missing:
      self._fill_cache(missing)
    values = np.array([self._cache[p] if p[1] > 0 else 0.0 for p in pairs])
    return values[inverse.reshape(-1)]

  def epsilons(self) -> np.ndarray:
    """[hospitals] current epsilon of each hospital at `delta`."""
    return self._epsilons_at(self._counts)

  def max_epsilon(self) -> float:
    """The run's guarantee: the largest per-hospital epsilon."""
    return float(self.epsilons().max())

  def epsilons_after(self, next_participation_mask: np.ndarray | None) -> np.ndarray:
    """[hospitals] epsilons if the next round ran with this participation."""
    return self._epsilons_at(self._counts + self._increment(next_participation_mask))

  def would_exceed(self, target_epsilon: float,
                   next_participation_mask: np.ndarray | None) -> bool:
    """True when running the next round would take some hospital above `target_epsilon`."""
    return bool(self.epsilons_after(next_participation_mask).max() > target_epsilon)

  def hospital_events(self) -> list[DpEvent]:
    """[hospitals] each hospital's composed DpEvent so far."""
    return [events.hospital_event(self._events[u], int(c))
            for u, c in zip(self._index, self._counts)]

  def snapshot(self, round_index: int) -> np.ndarray:
    """Appends the current per-hospital epsilons to `history` and returns them."""
    eps = self.epsilons()
    self.history.append({"round": int(round_index), "epsilon": [float(e) for e in eps],
                         "max_epsilon": float(eps.max())})
    return eps

  def to_json(self) -> dict[str, Any]:
    """The privacy record (privacy.json): plain Python values (dicts, lists, str, int, float).

    Epsilons are floats, `inf` for a mechanism without noise: strict JSON has no inf, and
    mapping it (to null) is the writer's rule, the same for every file a run writes.
    """
    eps = self.epsilons()
    return {
        "unit": self.unit,
        "delta": self.delta,
        "accountant": self.accountant,
        "neighbouring_relation": self.neighbouring,
        "accountant_options": ({"rdp_orders": list(RDP_ORDERS)} if self.accountant == "rdp"
                               else {"value_discretization_interval": self.pld_discretization}),
        "composition": "every_round" if self.unit == "hospital" else "rounds_participated",
        "num_hospitals": self.num_hospitals,
        "rounds_recorded": self._rounds,
        "per_round_events": [events.event_to_dict(e) for e in self._events],
        "hospital_event_index": self._index.tolist(),
        "composition_counts": self._counts.tolist(),
        "hospital_events": [events.event_to_dict(e) for e in self.hospital_events()],
        "epsilon": [float(e) for e in eps],
        "max_epsilon": float(eps.max()),
        "history": list(self.history),
        "dp_accounting_version": importlib.metadata.version("dp-accounting"),
    }
