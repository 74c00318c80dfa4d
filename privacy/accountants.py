"""Accountants: epsilon of a DpEvent, and the noise multiplier for a target epsilon.

Usable without fedsim. An accountant (RDP by default, PLD on request) turns a DpEvent from
`privacy.events` into epsilon at a given delta (shared/DESIGN.md, invariant 4: results say the
unit, epsilon, delta and accountant).

Neighbouring relations, per privacy unit (example, patient, or hospital):

* Poisson sampling (`PoissonSampledDpEvent`, `TruncatedSubsampledGaussianDpEvent`): add or
  remove one unit. Both accountants support it (the truncated event: PLD only).
* Fixed-size sampling without replacement (`SampledWithoutReplacementDpEvent`): replace one
  unit (the population size is public). RDP only.

The relation is read off the event, so an event and its accounting cannot drift apart.

Example:

  >>> from privacy import events
  >>> event = events.local_dp_sgd_event(sampling_rate=0.01, noise_multiplier=1.0, steps=100)
  >>> round(epsilon(event, 1e-5), 3)
  1.214
"""

from __future__ import annotations

import math
from collections.abc import Callable

import attr
import dp_accounting
from dp_accounting import dp_event as dpe
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from privacy import events, subsampled_gaussian, validation

DpEvent = dpe.DpEvent

ACCOUNTANTS = ("rdp", "pld")
ADD_OR_REMOVE_ONE = "add_or_remove_one"
REPLACE_ONE = "replace_one"

# dp_accounting's default orders (1.1..10.9 by 0.1, 11..63, 128..1024) plus a few integer
# orders between 64 and 1024, which matter for small epsilons at small sampling rates.
RDP_ORDERS: tuple[float, ...] = tuple(
    sorted(set(rdp_privacy_accountant.DEFAULT_RDP_ORDERS) | {64, 80, 96, 112, 160, 192, 384, 768})
)
# PLD value discretisation: dp-accounting's `PLDAccountant` default, so that our PLD epsilons
# are the library's. PLDs are pessimistic (an upper bound) at any interval, but coarser is
# looser, and most so where one step's privacy loss is small: at 1e-3, q=0.01, 10,000 steps,
# delta=1e-5 gave epsilon 0.960 (sigma=4) and 0.372 (sigma=10) against 0.947 and 0.343 at
# 1e-4. The one-step PLDs are built on the whole grid at once (`subsampled_gaussian`), so
# 1e-4 costs about 0.1 s a step.
PLD_DISCRETIZATION = 1e-4
CALIBRATION_RTOL = 1e-3

_RELATIONS = {
    ADD_OR_REMOVE_ONE: dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    REPLACE_ONE: dp_accounting.NeighboringRelation.REPLACE_ONE,
}


def _contains(event: DpEvent, event_type: type | tuple[type, ...]) -> bool:
  if isinstance(event, event_type):
    return True
  children = [getattr(event, f.name) for f in attr.fields(type(event))]
  flat = [c for child in children for c in (child if isinstance(child, list) else [child])]
  return any(_contains(c, event_type) for c in flat if isinstance(c, DpEvent))


def neighbouring_relation(event: DpEvent) -> str:
  """The neighbouring relation an event is accounted under (see module docstring).

  >>> neighbouring_relation(events.fixed_size_sampled_event(
  ...     sample_size=10, population=100, noise_multiplier=1.0, steps=5))
  'replace_one'
  """
  wor = _contains(event, dpe.SampledWithoutReplacementDpEvent)
  if wor and _contains(event, (dpe.PoissonSampledDpEvent, dpe.TruncatedSubsampledGaussianDpEvent)):
    raise ValueError(
        "an event mixing Poisson sampling (add/remove one) and fixed-size sampling "
        "(replace one) has no single neighbouring relation to account it under"
    )
  return REPLACE_ONE if wor else ADD_OR_REMOVE_ONE


class _PLDAccountant(pld_privacy_accountant.PLDAccountant):
  """dp_accounting's `PLDAccountant`, taking one-step subsampled Gaussian PLDs from a cache.

  For (truncated) Poisson-subsampled Gaussian steps under add-or-remove-one it composes
  `subsampled_gaussian.step_pld` (the library's PLD, built faster and cached) exactly as the
  library does (`self_compose(count)`, with the tail bounds vectorised, then compose); every
  other event goes to the library.
  `get_epsilon` is the library's search over the composed PLD, run on arrays. Epsilon is
  therefore the library's at the same interval, but a calibration that evaluates dozens of
  noise multipliers, or a CLI call at the default interval, stays fast.
  """

  def _maybe_compose(self, event: DpEvent, count: int, do_compose: bool):
    if do_compose and self.neighboring_relation == _RELATIONS[ADD_OR_REMOVE_ONE]:
      step, steps = subsampled_gaussian.step_pld(event, self._value_discretization_interval)
      if step is not None:
        self._pld = self._pld.compose(subsampled_gaussian.self_compose(step, steps * count))
        return None
    return super()._maybe_compose(event, count, do_compose)

  def get_epsilon(self, target_delta: float) -> float:
    if self._contains_non_dp_event:
      return math.inf
    return subsampled_gaussian.epsilon_for_delta(self._pld, target_delta)


def make_accountant(
    name: str,
    *,
    neighbouring: str = ADD_OR_REMOVE_ONE,
    pld_discretization: float = PLD_DISCRETIZATION,
) -> dp_accounting.PrivacyAccountant:
  """A fresh accountant: "rdp" (`RDP_ORDERS`) or "pld" (discretisation `pld_discretization`).

  >>> make_accountant("moments")
  Traceback (most recent call last):
  ...
  ValueError: dp.accountant='moments' must be one of ['rdp', 'pld']
  """
  validation.check(neighbouring in _RELATIONS, "neighbouring", neighbouring,
                   f"one of {list(_RELATIONS)}")
  validation.check(name in ACCOUNTANTS, "dp.accountant", name, f"one of {list(ACCOUNTANTS)}")
  relation = _RELATIONS[neighbouring]
  if name == "rdp":
    return dp_accounting.rdp.RdpAccountant(orders=RDP_ORDERS, neighboring_relation=relation)
  return _PLDAccountant(relation, value_discretization_interval=pld_discretization)


def check_supported(event: DpEvent, accountant: str) -> str:
  """Raises a ValueError saying which accountant to use; returns the neighbouring relation.

  >>> truncated = events.local_dp_sgd_event(sampling_rate=0.1, noise_multiplier=1.0, steps=5,
  ...                                       truncated_batch_size=15, dataset_size=100)
  >>> check_supported(truncated, "rdp")  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  ValueError: dp.accountant='rdp' must be 'pld' for truncated Poisson batches (...)
  """
  truncated = _contains(event, dpe.TruncatedSubsampledGaussianDpEvent)
  validation.check(accountant != "rdp" or not truncated, "dp.accountant", accountant,
                   "'pld' for truncated Poisson batches (TruncatedSubsampledGaussianDpEvent, "
                   "supported only by the PLD accountant)")
  fixed_size = _contains(event, dpe.SampledWithoutReplacementDpEvent)
  validation.check(accountant != "pld" or not fixed_size, "dp.accountant", accountant,
                   "'rdp' for fixed-size sampling without replacement "
                   "(SampledWithoutReplacementDpEvent, supported only by the RDP accountant)")
  relation = neighbouring_relation(event)
  validation.check(make_accountant(accountant, neighbouring=relation).supports(event),
                   "dp.accountant", accountant, f"an accountant that supports the event {event}")
  return relation


def epsilon(
    event: DpEvent,
    delta: float,
    accountant: str = "rdp",
    *,
    pld_discretization: float = PLD_DISCRETIZATION,
) -> float:
  """Epsilon of `event` at `delta`, under the event's neighbouring relation.

  >>> event = events.client_level_event(sampling_rate=1.0, noise_multiplier=0.0, rounds=1)
  >>> epsilon(event, 1e-5)  # no noise: no privacy
  inf
  """
  delta = validation.check_delta(delta)
  relation = check_supported(event, accountant)
  acct = make_accountant(accountant, neighbouring=relation, pld_discretization=pld_discretization)
  return float(acct.compose(event).get_epsilon(delta))


def _bracket(eps_at: Callable[[float], float], target: float,
             field: str = "dp.target_epsilon") -> tuple[float, float]:
  """[lo, hi] with eps(lo) > target >= eps(hi), searching by doubling / halving from 1."""
  hi = 1.0
  while eps_at(hi) > target:
    hi *= 2
    validation.check(hi <= 2.0**30, field, target,
                     "reachable with a noise multiplier <= 2^30")
  lo = hi / 2
  while eps_at(lo) <= target:
    hi, lo = lo, lo / 2
    if lo < 1e-6:
      return 0.0, hi
  return lo, hi


def smallest_noise_multiplier(eps_at: Callable[[float], float], target_epsilon: float, *,
                              field: str = "dp.target_epsilon") -> float:
  """Smallest sigma (within `CALIBRATION_RTOL`) with `eps_at(sigma) <= target_epsilon`.

  For epsilons that are not one event's (e.g. a run's maximum over its hospitals'
  ledgers): bracket by doubling / halving from 1, then bisect; `eps_at` must not
  increase with sigma.

  >>> round(smallest_noise_multiplier(lambda s: 4 / s, 2.0), 2)
  2.0
  """
  lo, hi = _bracket(eps_at, target_epsilon, field)
  while lo and hi - lo > CALIBRATION_RTOL * hi:
    mid = (lo + hi) / 2
    lo, hi = (lo, mid) if eps_at(mid) <= target_epsilon else (mid, hi)
  return float(hi)


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    truncated_batch_size: int | None = None,
    dataset_size: int | None = None,
    pld_discretization: float = PLD_DISCRETIZATION,
) -> float:
  """Smallest noise multiplier whose epsilon is <= `target_epsilon` (within 0.1 %).

  The event is `events.local_dp_sgd_event(...)`; for client-level DP pass the client sampling
  rate and `steps=rounds` (the same event). The returned sigma meets the target; any sigma more
  than `CALIBRATION_RTOL` (relative) below it does not.

  >>> sigma = calibrate_noise_multiplier(target_epsilon=2.0, sampling_rate=0.01, steps=100,
  ...                                    delta=1e-5)
  >>> event = events.local_dp_sgd_event(sampling_rate=0.01, noise_multiplier=sigma, steps=100)
  >>> 0.99 * 2.0 < epsilon(event, 1e-5) <= 2.0
  True
  """
  validation.check(0 < target_epsilon < math.inf, "dp.target_epsilon", target_epsilon,
                   "> 0 and finite")
  delta = validation.check_delta(delta)
  validation.check_count("steps", steps, minimum=1)

  def make_event(sigma: float) -> DpEvent:
    return events.local_dp_sgd_event(
        sampling_rate=sampling_rate, noise_multiplier=sigma, steps=steps,
        truncated_batch_size=truncated_batch_size, dataset_size=dataset_size,
    )

  relation = check_supported(make_event(1.0), accountant)

  def fresh_accountant() -> dp_accounting.PrivacyAccountant:
    return make_accountant(accountant, neighbouring=relation,
                           pld_discretization=pld_discretization)

  def eps_at(sigma: float) -> float:
    return float(fresh_accountant().compose(make_event(sigma)).get_epsilon(delta))

  lo, hi = _bracket(eps_at, target_epsilon)
  if lo == 0.0:
    return hi
  return float(dp_accounting.calibrate_dp_mechanism(
      fresh_accountant, make_event, target_epsilon, delta,
      bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi),
      tol=CALIBRATION_RTOL * lo,
  ))
