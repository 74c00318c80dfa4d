"""Privacy accounting for federated DP: DpEvents, epsilon, calibration, ledgers.

Usable without fedsim. The DpEvent is the privacy record (shared/DESIGN.md, invariants 1, 4
and 5): small pure functions build the event that matches the sampling that runs, an
accountant (RDP by default, PLD on request) turns it into epsilon at a given delta, and a
`PrivacyLedger` keeps one composed event and one epsilon per hospital for a whole run.

Neighbouring relations, per privacy unit (example, patient, or hospital):

* Poisson sampling (`PoissonSampledDpEvent`, `TruncatedSubsampledGaussianDpEvent`): add or
  remove one unit. Both accountants support it.
* Fixed-size sampling without replacement (`SampledWithoutReplacementDpEvent`): replace one
  unit (the population size is public). RDP only.

The relation is read off the event, so an event and its accounting cannot drift apart.

Example:

  >>> event = local_dp_sgd_event(sampling_rate=0.01, noise_multiplier=1.0, steps=100)
  >>> round(epsilon(event, 1e-5), 3)
  1.214
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attr
import dp_accounting
import numpy as np
from dp_accounting import dp_event as dpe
from dp_accounting.pld import pld_privacy_accountant, privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import special

DpEvent = dpe.DpEvent

ACCOUNTANTS = ("rdp", "pld")
PRIVACY_UNITS = ("example", "patient", "hospital")
ADD_OR_REMOVE_ONE = "add_or_remove_one"
REPLACE_ONE = "replace_one"

# dp_accounting's default orders (1.1..10.9 by 0.1, 11..63, 128..1024) plus a few integer
# orders between 64 and 1024, which matter for small epsilons at small sampling rates.
RDP_ORDERS: tuple[float, ...] = tuple(
    sorted(set(rdp_privacy_accountant.DEFAULT_RDP_ORDERS) | {64, 80, 96, 112, 160, 192, 384, 768})
)
# PLD value discretisation. dp-accounting's PLDs are pessimistic (an upper bound) at any
# interval; 1e-3 moved epsilon by < 1e-5 relative against 1e-4 (truncated n=1000,
# q=0.2, B=240, sigma=1.5, 40 steps) and builds a step's PLD 8x faster (0.2 s).
PLD_DISCRETIZATION = 1e-3
CALIBRATION_RTOL = 1e-3

_RELATIONS = {
    ADD_OR_REMOVE_ONE: dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    REPLACE_ONE: dp_accounting.NeighboringRelation.REPLACE_ONE,
}


# ----------------------------------------------------------------------------- validation


def _fmt(value: Any) -> str:
  return f"{value:g}" if isinstance(value, float) else str(value)


def _check_noise(noise_multiplier: float) -> float:
  if not noise_multiplier >= 0:  # Also rejects NaN.
    raise ValueError(f"dp.noise_multiplier={_fmt(noise_multiplier)} must be >= 0")
  return float(noise_multiplier)


def _check_sampling_rate(sampling_rate: float) -> float:
  if not 0 < sampling_rate <= 1:
    raise ValueError(
        f"sampling rate q={_fmt(sampling_rate)} must be in (0, 1] "
        "(expected batch or cohort size / privacy units)"
    )
  return float(sampling_rate)


def _check_delta(delta: float) -> float:
  if not 0 < delta < 1:
    raise ValueError(f"dp.delta={_fmt(delta)} must be in (0, 1)")
  return float(delta)


def _check_count(name: str, value: int, minimum: int = 0) -> int:
  if isinstance(value, bool) or int(value) != value or value < minimum:
    raise ValueError(f"{name}={_fmt(value)} must be an integer >= {minimum}")
  return int(value)


def validate_dp_params(
    *,
    noise_multiplier: float,
    sampling_rate: float,
    delta: float,
    clip_norm: float | None = None,
    population: int | None = None,
) -> None:
  """Checks DP parameters before any compute; raises one ValueError naming the field.

  Args:
    noise_multiplier: noise std / clip norm (`dp.noise_multiplier`), >= 0.
    sampling_rate: Poisson sampling rate q of privacy units, in (0, 1].
    delta: target delta (`dp.delta`), in (0, 1) and < 1/population.
    clip_norm: `dp.clip_norm`, > 0 when given.
    population: number of privacy units n the sampling draws from (examples or patients of
      a hospital, or hospitals for client-level DP), when known.

  Raises:
    ValueError: e.g. "dp.noise_multiplier=-1 must be >= 0".
  """
  _check_noise(noise_multiplier)
  _check_sampling_rate(sampling_rate)
  _check_delta(delta)
  if population is not None:
    _check_count("population n", population, minimum=1)
    if not delta < 1 / population:
      raise ValueError(
          f"dp.delta={_fmt(delta)} must be < 1/n = {1 / population:g} "
          f"for n={population} privacy units"
      )
  if clip_norm is not None and not clip_norm > 0:
    raise ValueError(f"dp.clip_norm={_fmt(clip_norm)} must be > 0")


# ------------------------------------------------------------------------- event builders


def _self_composed(event: DpEvent, count: int) -> DpEvent:
  """`count` repetitions of `event`; zero repetitions cost nothing (NoOp)."""
  if count == 0:
    return dpe.NoOpDpEvent()
  return dpe.SelfComposedDpEvent(event, count)


def local_dp_sgd_event(
    *,
    sampling_rate: float,
    noise_multiplier: float,
    steps: int,
    truncated_batch_size: int | None = None,
    dataset_size: int | None = None,
) -> DpEvent:
  """One hospital's DP-SGD local steps in ONE round.

  Each step Poisson-samples the hospital's privacy units (examples or patients) with rate
  q = expected batch / n_k, sums their clipped gradients and adds N(0, (sigma * C)^2).
  Neighbouring relation: add or remove one unit of this hospital.

  Args:
    sampling_rate: q_k in (0, 1].
    noise_multiplier: sigma >= 0.
    steps: local steps in the round, >= 0.
    truncated_batch_size: when the Poisson batch is truncated to at most this many units
      (a random subset is kept), the event is `TruncatedSubsampledGaussianDpEvent`, which
      only the PLD accountant supports.
    dataset_size: n_k, required with `truncated_batch_size` (ignored otherwise).

  Returns:
    SelfComposed(PoissonSampled(q, Gaussian(sigma)), steps), or
    SelfComposed(TruncatedSubsampledGaussian(n_k, q, B, sigma), steps).
  """
  q = _check_sampling_rate(sampling_rate)
  sigma = _check_noise(noise_multiplier)
  steps = _check_count("steps", steps)
  if truncated_batch_size is None:
    step = dpe.PoissonSampledDpEvent(q, dpe.GaussianDpEvent(sigma))
  else:
    if dataset_size is None:
      raise ValueError("dataset_size is required with truncated_batch_size")
    step = dpe.TruncatedSubsampledGaussianDpEvent(
        dataset_size=_check_count("dataset_size", dataset_size, minimum=1),
        sampling_probability=q,
        truncated_batch_size=_check_count("truncated_batch_size", truncated_batch_size, 1),
        noise_multiplier=sigma,
    )
  return _self_composed(step, steps)


def hospital_event(per_round_event: DpEvent, rounds_participated: int) -> DpEvent:
  """Composition of a hospital's per-round event over the rounds it took part in.

  Valid for example- and patient-level DP, where a hospital's units are touched only in
  rounds it takes part in and the cohort is drawn independently of the data. Same
  neighbouring relation as `per_round_event`. Zero rounds gives `NoOpDpEvent` (epsilon 0).
  """
  return _self_composed(per_round_event, _check_count("rounds_participated", rounds_participated))


def client_level_event(*, sampling_rate: float, noise_multiplier: float, rounds: int) -> DpEvent:
  """DP-FedAvg with Poisson client sampling, over `rounds` rounds.

  Each round every hospital joins the cohort independently with q = expected cohort /
  hospitals; the server adds N(0, (sigma * S)^2) once to the sum of client deltas clipped to
  S. Neighbouring relation: add or remove one hospital (all of its data).
  """
  step = dpe.PoissonSampledDpEvent(
      _check_sampling_rate(sampling_rate), dpe.GaussianDpEvent(_check_noise(noise_multiplier))
  )
  return _self_composed(step, _check_count("rounds", rounds))


def fixed_size_sampled_event(
    *, sample_size: int, population: int, noise_multiplier: float, steps: int
) -> DpEvent:
  """Fixed-size sampling without replacement (e.g. a fixed cohort of `clients_per_round`).

  Each step draws `sample_size` of `population` units uniformly without replacement, sums
  their clipped contributions (norm <= C) and adds N(0, (sigma * C)^2). Neighbouring
  relation: replace one unit (n public). Replacing a unit moves the sum by up to 2C, so the
  Gaussian's noise-to-sensitivity ratio is sigma / 2. RDP only (dp.accountant=rdp).
  """
  population = _check_count("population", population, minimum=1)
  sample_size = _check_count("sample_size", sample_size, minimum=1)
  if sample_size > population:
    raise ValueError(f"sample_size={sample_size} must be <= population={population}")
  step = dpe.SampledWithoutReplacementDpEvent(
      population, sample_size, dpe.GaussianDpEvent(_check_noise(noise_multiplier) / 2)
  )
  return _self_composed(step, _check_count("steps", steps))


# ------------------------------------------------------------------------------ accountants


def _contains(event: DpEvent, event_type: type | tuple[type, ...]) -> bool:
  if isinstance(event, event_type):
    return True
  children = [getattr(event, f.name) for f in attr.fields(type(event))]
  flat = [c for child in children for c in (child if isinstance(child, list) else [child])]
  return any(_contains(c, event_type) for c in flat if isinstance(c, DpEvent))


def neighbouring_relation(event: DpEvent) -> str:
  """The neighbouring relation an event is accounted under (see module docstring)."""
  wor = _contains(event, dpe.SampledWithoutReplacementDpEvent)
  if wor and _contains(event, (dpe.PoissonSampledDpEvent, dpe.TruncatedSubsampledGaussianDpEvent)):
    raise ValueError(
        "an event mixing Poisson sampling (add/remove one) and fixed-size sampling "
        "(replace one) has no single neighbouring relation to account it under"
    )
  return REPLACE_ONE if wor else ADD_OR_REMOVE_ONE


def make_accountant(
    name: str,
    *,
    neighbouring: str = ADD_OR_REMOVE_ONE,
    pld_discretization: float = PLD_DISCRETIZATION,
) -> dp_accounting.PrivacyAccountant:
  """A fresh accountant: "rdp" (`RDP_ORDERS`) or "pld" (discretisation `pld_discretization`)."""
  if neighbouring not in _RELATIONS:
    raise ValueError(f"neighbouring={neighbouring!r} is not one of: {', '.join(_RELATIONS)}")
  relation = _RELATIONS[neighbouring]
  if name == "rdp":
    return dp_accounting.rdp.RdpAccountant(orders=RDP_ORDERS, neighboring_relation=relation)
  if name == "pld":
    return pld_privacy_accountant.PLDAccountant(
        relation, value_discretization_interval=pld_discretization
    )
  raise ValueError(f"dp.accountant={name!r} is not one of: {', '.join(ACCOUNTANTS)}")


def check_supported(event: DpEvent, accountant: str) -> str:
  """Raises a ValueError saying which accountant to use; returns the neighbouring relation."""
  if accountant == "rdp" and _contains(event, dpe.TruncatedSubsampledGaussianDpEvent):
    raise ValueError(
        "truncated Poisson batches (TruncatedSubsampledGaussianDpEvent) are supported only by "
        "the PLD accountant: use dp.accountant=pld"
    )
  if accountant == "pld" and _contains(event, dpe.SampledWithoutReplacementDpEvent):
    raise ValueError(
        "fixed-size sampling without replacement (SampledWithoutReplacementDpEvent) is "
        "supported only by the RDP accountant: use dp.accountant=rdp"
    )
  relation = neighbouring_relation(event)
  if not make_accountant(accountant, neighbouring=relation).supports(event):
    raise ValueError(f"dp.accountant={accountant} does not support the event {event}")
  return relation


def epsilon(
    event: DpEvent,
    delta: float,
    accountant: str = "rdp",
    *,
    pld_discretization: float = PLD_DISCRETIZATION,
) -> float:
  """Epsilon of `event` at `delta`, under the event's neighbouring relation."""
  delta = _check_delta(delta)
  relation = check_supported(event, accountant)
  acct = make_accountant(accountant, neighbouring=relation, pld_discretization=pld_discretization)
  return float(acct.compose(event).get_epsilon(delta))


def _bracket(eps_at: Callable[[float], float], target: float) -> tuple[float, float]:
  """[lo, hi] with eps(lo) > target >= eps(hi), searching by doubling / halving from 1."""
  hi = 1.0
  while eps_at(hi) > target:
    hi *= 2
    if hi > 2.0**30:
      raise ValueError(f"target_epsilon={_fmt(target)} is not reachable with sigma <= 2^30")
  lo = hi / 2
  while eps_at(lo) <= target:
    hi, lo = lo, lo / 2
    if lo < 1e-6:
      return 0.0, hi
  return lo, hi


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

  The event is `local_dp_sgd_event(...)`; for client-level DP pass the client sampling rate
  and `steps=rounds` (the same event). The returned sigma meets the target; any sigma more
  than `CALIBRATION_RTOL` (relative) below it does not.
  """
  if not 0 < target_epsilon < math.inf:
    raise ValueError(f"dp.target_epsilon={_fmt(target_epsilon)} must be > 0 and finite")
  delta = _check_delta(delta)
  _check_count("steps", steps, minimum=1)

  def make_event(sigma: float) -> DpEvent:
    return local_dp_sgd_event(
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


# ---------------------------------------------------------------------------- serialisation


def _to_jsonable(value: Any) -> Any:
  if isinstance(value, DpEvent):
    return event_to_dict(value)
  if isinstance(value, (list, tuple)):
    return [_to_jsonable(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def event_to_dict(event: DpEvent) -> dict[str, Any]:
  """A JSON-serialisable dict of a DpEvent (the fields of dp_accounting's `to_named_tuple`)."""
  out = {"module_name": type(event).__module__, "class_name": type(event).__name__}
  for field in attr.fields(type(event)):
    out[field.name] = _to_jsonable(getattr(event, field.name))
  return out


def _from_jsonable(value: Any) -> Any:
  if isinstance(value, Mapping) and "class_name" in value:
    return event_from_dict(value)
  if isinstance(value, list):
    return [_from_jsonable(v) for v in value]
  return value


def event_from_dict(data: Mapping[str, Any]) -> DpEvent:
  """Inverse of `event_to_dict`; only classes from dp_accounting are instantiated."""
  module_name = data["module_name"]
  if not module_name.startswith("dp_accounting."):
    raise ValueError(f"not a dp_accounting event module: {module_name!r}")
  cls = getattr(importlib.import_module(module_name), data["class_name"])
  if not (isinstance(cls, type) and issubclass(cls, DpEvent)):
    raise TypeError(f"{module_name}.{data['class_name']} is not a DpEvent")
  kwargs = {k: _from_jsonable(v) for k, v in data.items() if k not in ("module_name", "class_name")}
  return cls(**kwargs)


def _event_key(event: DpEvent) -> str:
  return json.dumps(event_to_dict(event), sort_keys=True)


def _json_float(x: float) -> float | str:
  """Finite floats as is; inf / nan as strings, so the output is strict JSON."""
  return float(x) if math.isfinite(x) else str(float(x))


# ---------------------------------------------------------- vectorised RDP (ledger fast path)


def _unwrap_self_composed(event: DpEvent) -> tuple[DpEvent, int]:
  """(inner event, total count) of SelfComposed^k(... SelfComposed(inner))."""
  count = 1
  while isinstance(event, dpe.SelfComposedDpEvent):
    count *= event.count
    event = event.event
  return event, count


def _poisson_gaussian_params(event: DpEvent) -> tuple[float, float, int] | None:
  """(q, sigma, count) when `event` is SelfComposed^k(PoissonSampled(q, Gaussian(sigma)))."""
  event, count = _unwrap_self_composed(event)
  if isinstance(event, dpe.PoissonSampledDpEvent) and isinstance(event.event, dpe.GaussianDpEvent):
    return float(event.sampling_probability), float(event.event.noise_multiplier), count
  return None


def _log_a_int(q: np.ndarray, sigma: np.ndarray, alpha: int) -> np.ndarray:
  """log A_alpha for integer alpha, vectorised over [E] (q, sigma); 0 < q < 1, sigma > 0."""
  i = np.arange(alpha + 1, dtype=np.float64)
  log_comb = special.gammaln(alpha + 1) - special.gammaln(i + 1) - special.gammaln(alpha - i + 1)
  terms = (log_comb + i * np.log(q)[:, None] + (alpha - i) * np.log1p(-q)[:, None]
           + (i * i - i) / (2 * sigma[:, None] ** 2))
  return special.logsumexp(terms, axis=1)


def _log_erfc(x: np.ndarray) -> np.ndarray:
  return math.log(2) + special.log_ndtr(-x * 2**0.5)


def _log_a_frac(q: np.ndarray, sigma: np.ndarray, alphas: np.ndarray) -> np.ndarray:
  """log A_alpha [E, F] for fractional orders: dp_accounting's series, run on arrays.

  Same terms, same stopping rule and the same 1000-term cap (inf when not converged, which
  excludes the order) as `rdp_privacy_accountant._compute_log_a_frac`. The (q, sigma, alpha)
  triples are flattened and finished ones dropped, so cost follows the slowest-converging.
  """
  grid = np.broadcast_arrays(alphas[None, :], q[:, None], sigma[:, None])
  a, q, s = (x.reshape(-1) for x in grid)
  active = np.arange(a.shape[0])
  z0 = s**2 * np.log(1 / q - 1) + 0.5
  logq, log1mq, inv2s2, rs = np.log(q), np.log1p(-q), 1 / (2 * s**2), 1 / (math.sqrt(2) * s)
  log_a0, log_a1 = np.full(a.shape, -np.inf), np.full(a.shape, -np.inf)
  last0, last1 = np.full(a.shape, -np.inf), np.full(a.shape, -np.inf)
  result = np.full(a.shape, np.inf)
  for i in range(rdp_privacy_accountant._MAX_STEPS_LOG_A_FRAC):  # pylint: disable=protected-access
    k, ak = active, a[active]
    log_coef = special.gammaln(ak + 1) - special.gammaln(i + 1) - special.gammaln(ak - i + 1)
    j = ak - i
    s0 = (log_coef + i * logq[k] + j * log1mq[k] + (i * i - i) * inv2s2[k]
          + math.log(0.5) + _log_erfc((i - z0[k]) * rs[k]))
    s1 = (log_coef + j * logq[k] + i * log1mq[k] + (j * j - j) * inv2s2[k]
          + math.log(0.5) + _log_erfc((z0[k] - j) * rs[k]))
    log_a0[k], log_a1[k] = np.logaddexp(log_a0[k], s0), np.logaddexp(log_a1[k], s1)
    total = np.logaddexp(log_a0[k], log_a1[k])
    stop = (s0 < last0[k]) & (s1 < last1[k]) & (np.maximum(s0, s1) < total - 30)
    result[k[stop]] = total[stop]
    last0[k], last1[k] = s0, s1
    active = k[~stop]
    if active.size == 0:
      break
  return result.reshape(sigma.shape[0], alphas.shape[0])


def poisson_gaussian_rdp(q: np.ndarray, sigma: np.ndarray, orders: Sequence[float]) -> np.ndarray:
  """RDP [E, O] of one Poisson-subsampled Gaussian step for E (q, sigma) pairs at once.

  Agrees with dp_accounting's `_compute_rdp_poisson_subsampled_gaussian` (tested to 1e-9);
  used by `PrivacyLedger` so hundreds of hospitals with distinct sampling rates stay fast.
  """
  q, sigma = np.asarray(q, np.float64), np.asarray(sigma, np.float64)
  orders = np.asarray(orders, np.float64)
  out = np.zeros((q.shape[0], orders.shape[0]))
  out[(q > 0) & (sigma == 0)] = np.inf
  full = (q == 1) & (sigma > 0)
  out[full] = orders[None, :] / (2 * sigma[full, None] ** 2)
  reg = (q > 0) & (q < 1) & (sigma > 0)
  if reg.any():
    is_int = orders == np.floor(orders)
    block = np.empty((int(reg.sum()), orders.shape[0]))
    for k in np.flatnonzero(is_int):
      block[:, k] = _log_a_int(q[reg], sigma[reg], int(orders[k])) / (orders[k] - 1)
    if (~is_int).any():
      frac = orders[~is_int]
      block[:, ~is_int] = _log_a_frac(q[reg], sigma[reg], frac) / (frac - 1)
    out[reg] = block
  return out


def epsilon_from_rdp(rdp: np.ndarray, orders: Sequence[float], delta: float) -> np.ndarray:
  """Vectorised `rdp_privacy_accountant.compute_epsilon` over rows of `rdp` [N, O] -> [N]."""
  a = np.asarray(orders, np.float64)[None, :]
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    eps = np.where(a > 1.01, rdp + np.log1p(-1 / a) - np.log(delta * a) / (a - 1), np.inf)
    eps = np.where(delta**2 + np.expm1(-rdp) > 0, 0.0, eps)
  eps = np.where(rdp < 0, 0.0, eps)
  return np.maximum(0.0, eps.min(axis=1))


@functools.lru_cache(maxsize=64)  # About 1-2 MB each at the default discretisation.
def _poisson_gaussian_pld(
    q: float, sigma: float, discretization: float
) -> privacy_loss_distribution.PrivacyLossDistribution:
  """The one-step PLD `PLDAccountant` builds for PoissonSampled(q, Gaussian(sigma)) (add/remove).

  Building it is the slow part of PLD accounting (about 1 s at 1e-4); cached so that a
  ledger composes it c times per hospital count instead of rebuilding it every time.
  """
  return privacy_loss_distribution.from_gaussian_mechanism(
      standard_deviation=sigma, sampling_prob=q, value_discretization_interval=discretization,
      neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)


@functools.lru_cache(maxsize=256)
def _truncated_gaussian_pld(
    n: int, q: float, batch: int, sigma: float, discretization: float
) -> privacy_loss_distribution.PrivacyLossDistribution:
  """The one-step PLD `PLDAccountant` builds for a TruncatedSubsampledGaussianDpEvent (cached)."""
  return privacy_loss_distribution.from_truncated_subsampled_gaussian_mechanism(
      dataset_size=n, sampling_probability=q, truncated_batch_size=batch,
      noise_multiplier=sigma, value_discretization_interval=discretization,
      neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)


def _step_pld(event: DpEvent, discretization: float):
  """(cached one-step PLD, steps) for SelfComposed^k of one noisy step, else (None, 0)."""
  poisson = _poisson_gaussian_params(event)
  if poisson is not None:
    q, sigma, steps = poisson
    return (_poisson_gaussian_pld(q, sigma, discretization), steps) if sigma > 0 else (None, 0)
  event, steps = _unwrap_self_composed(event)
  if isinstance(event, dpe.TruncatedSubsampledGaussianDpEvent) and event.noise_multiplier > 0:
    return _truncated_gaussian_pld(
        int(event.dataset_size), float(event.sampling_probability),
        int(event.truncated_batch_size), float(event.noise_multiplier), discretization), steps
  return None, 0


# ----------------------------------------------------------------------------------- ledger


class PrivacyLedger:
  """Per-hospital privacy ledger for one run (invariant 5: every hospital has its own).

  Example- and patient-level DP: hospital k's per-round event (q_k = expected batch / n_k,
  steps_k local steps) is composed once per round the hospital takes part in; hospitals
  that never took part have epsilon 0. Client-level DP (unit "hospital"): the per-round
  event includes the client sampling, so it is composed every recorded round and every
  hospital reports the same epsilon.

  Epsilons are cached by (distinct per-round event, composition count): with RDP, a
  hospital at count c costs c * (RDP of its per-round event), computed once per distinct
  event for all hospitals at once; with PLD each distinct (event, count) is one PLD.
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
    if unit not in PRIVACY_UNITS:
      raise ValueError(f"privacy unit {unit!r} is not one of: {', '.join(PRIVACY_UNITS)}")
    if not per_round_events:
      raise ValueError("a ledger needs at least one hospital")
    self.delta = _check_delta(delta)
    make_accountant(accountant)  # Rejects unknown names early.
    self.accountant, self.unit, self.pld_discretization = accountant, unit, pld_discretization
    keys = [_event_key(e) for e in per_round_events]
    unique = dict.fromkeys(keys)
    self._events = [event_from_dict(json.loads(k)) for k in unique]
    position = {k: u for u, k in enumerate(unique)}
    self._index = np.array([position[k] for k in keys], np.int64)
    relations = {check_supported(e, accountant) for e in self._events}
    if len(relations) > 1:
      raise ValueError(f"hospitals' events mix neighbouring relations: {sorted(relations)}")
    self.neighbouring = relations.pop()
    self._counts = np.zeros(len(keys), np.int64)
    self._rounds = 0
    self._cache: dict[tuple[int, int], float] = {}
    self._rdp: dict[int, np.ndarray] = {}
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
    events = [
        local_dp_sgd_event(sampling_rate=float(q), noise_multiplier=noise_multiplier,
                           steps=int(t), truncated_batch_size=truncated_batch_size,
                           dataset_size=None if n is None else int(n))
        for q, t, n in zip(rates, steps_k, sizes, strict=True)
    ]
    return cls(events, delta=delta, accountant=accountant, unit=unit,
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
    num_hospitals = _check_count("num_clients", num_hospitals, minimum=1)
    if cohort_size is None:
      event = client_level_event(sampling_rate=sampling_rate, noise_multiplier=noise_multiplier,
                                 rounds=1)
    else:
      event = fixed_size_sampled_event(sample_size=cohort_size, population=num_hospitals,
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
    if mask.shape != self._counts.shape:
      raise ValueError(f"participation mask shape {mask.shape} != ({self.num_hospitals},)")
    return mask.astype(bool).astype(np.int64)

  def record_round(self, participating_hospital_mask: np.ndarray | None) -> None:
    """Adds one round; `participating_hospital_mask` [hospitals] bool (ignored for client-level)."""
    self._counts += self._increment(participating_hospital_mask)
    self._rounds += 1

  def _fill_rdp(self) -> None:
    """RDP of every distinct per-round event, in one vectorised pass (once per ledger)."""
    todo = [u for u in range(len(self._events)) if u not in self._rdp]
    fast = [(u, p) for u in todo if (p := _poisson_gaussian_params(self._events[u])) is not None]
    if fast:
      q, sigma, count = (np.array(x) for x in zip(*(p for _, p in fast)))
      rdp = poisson_gaussian_rdp(q, sigma, RDP_ORDERS) * count[:, None]
      self._rdp.update({u: rdp[i] for i, (u, _) in enumerate(fast)})
    for u in set(todo) - {u for u, _ in fast}:
      acct = make_accountant("rdp", neighbouring=self.neighbouring)
      self._rdp[u] = acct.compose(self._events[u]).rdp

  def _fill_cache(self, pairs: list[tuple[int, int]]) -> None:
    if self.accountant == "rdp":
      self._fill_rdp()
      rdp = np.stack([c * self._rdp[u] for u, c in pairs])
      eps = epsilon_from_rdp(rdp, RDP_ORDERS, self.delta)
      self._cache.update({pair: float(e) for pair, e in zip(pairs, eps)})
      return
    for u, c in pairs:
      self._cache[(u, c)] = self._pld_epsilon(u, c)

  def _pld_epsilon(self, u: int, count: int) -> float:
    step, steps = _step_pld(self._events[u], self.pld_discretization)
    if step is None:
      return epsilon(hospital_event(self._events[u], count), self.delta, "pld",
                     pld_discretization=self.pld_discretization)
    return float(step.self_compose(steps * count).get_epsilon_for_delta(self.delta))

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
    return [hospital_event(self._events[u], int(c)) for u, c in zip(self._index, self._counts)]

  def snapshot(self, round_index: int) -> np.ndarray:
    """Appends the current per-hospital epsilons to `history` and returns them."""
    eps = self.epsilons()
    self.history.append({"round": int(round_index), "epsilon": [_json_float(e) for e in eps],
                         "max_epsilon": _json_float(eps.max())})
    return eps

  def to_json(self) -> dict[str, Any]:
    """The privacy record (privacy.json): a JSON-serialisable dict."""
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
        "per_round_events": [event_to_dict(e) for e in self._events],
        "hospital_event_index": self._index.tolist(),
        "composition_counts": self._counts.tolist(),
        "hospital_events": [event_to_dict(e) for e in self.hospital_events()],
        "epsilon": [_json_float(e) for e in eps],
        "max_epsilon": _json_float(eps.max()),
        "history": list(self.history),
        "dp_accounting_version": importlib.metadata.version("dp-accounting"),
    }
