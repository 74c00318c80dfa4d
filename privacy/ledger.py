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

import functools
import importlib.metadata
import json
import os
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import numpy as np
from dp_accounting import dp_event as dpe

from privacy import accountants, events, subsampled_gaussian, validation
from privacy.accountants import PLD_DISCRETIZATION, RDP_ORDERS
from privacy.events import DpEvent

PRIVACY_UNITS = ("example", "patient", "hospital")
# Above this many hospitals, privacy.json leaves out what its other fields determine: each
# hospital's composed event (per_round_events[hospital_event_index], composition_counts
# times) and the per-hospital epsilons of intermediate snapshots (each keeps its max).
PER_HOSPITAL_DETAIL = 10_000


def _event_key(event: DpEvent) -> str:
  return json.dumps(events.event_to_dict(event), sort_keys=True)


class PrivacyLedger:
  """Per-hospital privacy ledger for one run (invariant 5: every hospital has its own).

  Example- and patient-level DP: hospital k's per-round event (q_k = expected batch / n_k,
  steps_k local steps) is composed once per round the hospital takes part in; hospitals
  that never took part have epsilon 0. Client-level DP (unit "hospital"): the per-round
  event includes the client sampling, so it is composed every recorded round and every
  hospital reports the same epsilon. A client-level round may be charged another noise
  multiplier than the configured one (`record_round(..., noise_multiplier=z_r)`: the
  distributed noise that survived a secure-aggregation round's dropouts); the rounds are then
  composed as a mix of per-round events (`round_event_index`), the same for every hospital.

  Epsilons are cached by (distinct per-round event, composition count): with RDP, a
  hospital at count c costs c * (RDP of its per-round event), computed once per distinct
  event for all hospitals at once; with PLD each distinct (event, count) is one PLD, the
  event's one-step PLD self-composed (steps * count) as `PLDAccountant` composes it, the
  pairs of an evaluation in threads (one per distinct event). The one-step PLDs (with their
  tail-bound MGFs) are kept per distinct event for the ledger's lifetime, not rebuilt per
  evaluation: memory is the sum of their dense PMFs
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
      hospital_event_index: np.ndarray | None = None,
  ):
    """Builds an empty ledger.

    Args:
      per_round_events: [hospitals] one event per hospital for one round it takes part in
        (client-level: the same event, one round of DP-FedAvg, for every hospital); with
        `hospital_event_index`, the distinct events only.
      delta: target delta.
      accountant: "rdp" or "pld".
      unit: privacy unit, one of `PRIVACY_UNITS`.
      pld_discretization: PLD value discretisation interval.
      hospital_event_index: optional [hospitals] index into `per_round_events` of each
        hospital's event (a million hospitals share a few events: no per-hospital list).
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
    if hospital_event_index is not None:
      self._index = self._index[np.asarray(hospital_event_index, np.int64)]
    relations = {accountants.check_supported(e, accountant) for e in self._events}
    if len(relations) > 1:
      raise ValueError(f"hospitals' events mix neighbouring relations: {sorted(relations)}")
    self.neighbouring = relations.pop()
    self._counts = np.zeros(len(self._index), np.int64)
    self._rounds = 0
    self._key_index = dict(position)
    # Client level: the event of one round at noise multiplier z (`for_client_level`), and
    # the distinct event each recorded round composed.
    self._round_event: Callable[[float], DpEvent] | None = None
    self._round_index: list[int] = []
    self._mix_cache: dict[tuple[int, ...], float] = {}
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
    sizes = np.full(rates.shape, -1) if dataset_sizes is None else np.asarray(dataset_sizes)
    validation.check(sizes.shape == rates.shape, "dataset_sizes", sizes.shape,
                     f"one per hospital ({rates.shape})")
    # One event per distinct (q, steps, size), in order of first hospital (vectorised:
    # hospitals of a million-hospital population share a few events).
    key = np.zeros(rates.shape, np.int64)
    for column in (rates, steps_k, sizes):  # each column's codes, as one integer per hospital
      values, codes = np.unique(column, return_inverse=True)
      key = key * len(values) + codes.reshape(-1)
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    per_round = [
        events.local_dp_sgd_event(sampling_rate=float(rates[h]), noise_multiplier=noise_multiplier,
                                  steps=int(steps_k[h]), truncated_batch_size=truncated_batch_size,
                                  dataset_size=None if dataset_sizes is None else int(sizes[h]))
        for h in first[order]
    ]
    return cls(per_round, hospital_event_index=rank[inverse.reshape(-1)], delta=delta,
               accountant=accountant, unit=unit,
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
      round_event = functools.partial(events.client_level_event, sampling_rate=sampling_rate,
                                      rounds=1)
    else:
      round_event = functools.partial(events.fixed_size_sampled_event, sample_size=cohort_size,
                                      population=num_hospitals, steps=1)
    ledger = cls([round_event(noise_multiplier=noise_multiplier)], delta=delta,
                 accountant=accountant, unit="hospital", pld_discretization=pld_discretization,
                 hospital_event_index=np.zeros(num_hospitals, np.int64))
    ledger._round_event = lambda z: round_event(noise_multiplier=z)
    return ledger

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

  def record_round(self, participating_hospital_mask: np.ndarray | None, *,
                   noise_multiplier: float | None = None) -> None:
    """Adds one round; `participating_hospital_mask` [hospitals] bool (ignored for client-level).

    `noise_multiplier`: client level only, the noise this round actually carried (None: the
    configured one), e.g. the distributed noise that survived secure aggregation's dropouts.
    """
    u = self._round_event_id(noise_multiplier)
    self._counts += self._increment(participating_hospital_mask)
    self._rounds += 1
    if self.unit == "hospital":
      self._round_index.append(u)

  def _round_event_id(self, noise_multiplier: float | None) -> int:
    """Index of the distinct client-level event of a round at `noise_multiplier` (added if new)."""
    if noise_multiplier is None:
      return 0
    validation.check(self._round_event is not None, "noise_multiplier", noise_multiplier,
                     "None (a round's own noise multiplier is for client-level ledgers, "
                     "PrivacyLedger.for_client_level)")
    key = _event_key(self._round_event(float(noise_multiplier)))
    if key not in self._key_index:
      self._key_index[key] = len(self._events)
      self._events.append(events.event_from_dict(json.loads(key)))
    return self._key_index[key]

  def _mix(self, extra_round: int | None = None) -> np.ndarray:
    """Client level: [distinct events] how many recorded rounds composed each."""
    rounds = self._round_index + ([] if extra_round is None else [extra_round])
    return np.bincount(np.asarray(rounds, np.int64), minlength=len(self._events))

  def _mix_epsilon(self, mix: np.ndarray) -> float:
    """Epsilon of composing `mix[u]` rounds of each distinct event u (client level)."""
    used = [int(u) for u in np.flatnonzero(mix)]
    if not used:
      return 0.0
    if len(used) == 1:  # one event: the cached (event, count), as for the other ledgers
      pair = (used[0], int(mix[used[0]]))
      if pair not in self._cache:
        self._fill_cache([pair])
      return self._cache[pair]
    key = tuple(mix.tolist())
    if key not in self._mix_cache:
      self._mix_cache[key] = self._composed_epsilon({u: int(mix[u]) for u in used})
    return self._mix_cache[key]

  def _composed_epsilon(self, rounds: dict[int, int]) -> float:
    if self.accountant == "rdp":
      self._fill_rdp()
      rdp = sum(c * self._rdp[u] for u, c in rounds.items())
      return float(subsampled_gaussian.epsilon_from_rdp(rdp[None], RDP_ORDERS, self.delta)[0])
    steps = {u: self._step(u) for u in rounds}
    if any(step is None for step, _ in steps.values()):
      return accountants.epsilon(self._mix_event(rounds), self.delta, "pld",
                                 pld_discretization=self.pld_discretization)
    plds = [step.self_compose(n * rounds[u]) for u, (step, n) in steps.items()]
    return float(subsampled_gaussian.epsilon_for_delta(
        functools.reduce(lambda a, b: a.compose(b), plds), self.delta))

  def _mix_event(self, rounds: dict[int, int]) -> DpEvent:
    """The composed DpEvent of `rounds[u]` rounds of each distinct event u."""
    parts = [events.hospital_event(self._events[u], c) for u, c in rounds.items()]
    return parts[0] if len(parts) == 1 else dpe.ComposedDpEvent(parts)

  @property
  def _mixed(self) -> bool:
    """Client level (`for_client_level`): rounds may carry their own noise multipliers."""
    return self._round_event is not None

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
    counts: dict[int, list[int]] = {}
    for u, c in pairs:
      counts.setdefault(u, []).append(c)

    def event_epsilons(u: int) -> list:  # one thread per event: its step is its own
      return [((u, c), self._pld_epsilon(u, c)) for c in counts[u]]

    # The FFTs and running sums release the GIL: an evaluation's pairs share the cores
    # (1.8x on 2 cores for the default run's 93 pairs; the run waits on them).
    with futures.ThreadPoolExecutor(min(len(counts), os.cpu_count() or 1)) as pool:
      for done in pool.map(event_epsilons, counts):
        self._cache.update(done)

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
    width = int(counts.max(initial=0)) + 1  # (event, count) as one integer: a 1-D unique
    keys, inverse = np.unique(self._index * width + counts, return_inverse=True)
    pairs = [(int(k) // width, int(k) % width) for k in keys]
    missing = [p for p in pairs if p[1] > 0 and p not in self._cache]
    if missing:
      self._fill_cache(missing)
    values = np.array([self._cache[p] if p[1] > 0 else 0.0 for p in pairs])
    return values[inverse.reshape(-1)]

  def epsilons(self) -> np.ndarray:
    """[hospitals] current epsilon of each hospital at `delta`."""
    if self._mixed:
      return np.full(self.num_hospitals, self._mix_epsilon(self._mix()))
    return self._epsilons_at(self._counts)

  def max_epsilon(self) -> float:
    """The run's guarantee: the largest per-hospital epsilon."""
    return float(self.epsilons().max())

  def epsilons_after(self, next_participation_mask: np.ndarray | None, *,
                     noise_multiplier: float | None = None) -> np.ndarray:
    """[hospitals] epsilons if the next round ran with this participation (and noise)."""
    if self._mixed:
      mix = self._mix(self._round_event_id(noise_multiplier))
      return np.full(self.num_hospitals, self._mix_epsilon(mix))
    self._round_event_id(noise_multiplier)  # refuses a noise multiplier here
    return self._epsilons_at(self._counts + self._increment(next_participation_mask))

  def would_exceed(self, target_epsilon: float, next_participation_mask: np.ndarray | None,
                   *, noise_multiplier: float | None = None) -> bool:
    """True when running the next round would take some hospital above `target_epsilon`."""
    return bool(self.epsilons_after(next_participation_mask,
                                    noise_multiplier=noise_multiplier).max() > target_epsilon)

  def hospital_events(self) -> list[DpEvent]:
    """[hospitals] each hospital's composed DpEvent so far."""
    if self._mixed:
      mix = self._mix()
      return [self._mix_event({int(u): int(mix[u]) for u in np.flatnonzero(mix)} or {0: 0})
              ] * self.num_hospitals
    return [events.hospital_event(self._events[u], int(c))
            for u, c in zip(self._index, self._counts)]

  def snapshot(self, round_index: int) -> np.ndarray:
    """Appends the current per-hospital epsilons to `history` and returns them."""
    eps = self.epsilons()
    detail = self.num_hospitals <= PER_HOSPITAL_DETAIL
    self.history.append({"round": int(round_index),
                         "epsilon": eps.tolist() if detail else None,
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
        **({"round_event_index": list(self._round_index)} if self._mixed else {}),
        "hospital_events": ([events.event_to_dict(e) for e in self.hospital_events()]
                            if self.num_hospitals <= PER_HOSPITAL_DETAIL else None),
        "epsilon": eps.tolist(),
        "max_epsilon": float(eps.max()),
        "history": list(self.history),
        "dp_accounting_version": importlib.metadata.version("dp-accounting"),
    }
