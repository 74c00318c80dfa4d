"""Fast paths for many subsampled Gaussian steps: vectorised RDP and cached one-step PLDs.

Usable without fedsim. A `privacy.ledger.PrivacyLedger` accounts hundreds of hospitals whose
sampling rates all differ. Calling an accountant once per hospital would rebuild the same
quantities again and again, so for the events DP-SGD and DP-FedAvg produce (SelfComposed^k of a
Poisson-subsampled or truncated Poisson-subsampled Gaussian step) this module computes

* the RDP of one Poisson-subsampled Gaussian step for E (q, sigma) pairs at once, with the same
  terms and stopping rules as dp_accounting (tested to agree to 1e-9), and epsilon from RDP for
  many rows at once;
* the one-step PLD that dp_accounting's `PLDAccountant` would build, cached, so that a step is
  built once and self-composed for every hospital and count.

None of it changes a number: each function returns what dp_accounting returns for the same event.

Example:

  >>> rdp = poisson_gaussian_rdp(np.array([1.0]), np.array([2.0]), [2.0, 4.0])
  >>> rdp.tolist()  # q = 1: the Gaussian's alpha / (2 sigma^2)
  [[0.25, 0.5]]
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import dp_accounting
import numpy as np
from dp_accounting import dp_event as dpe
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import special

DpEvent = dpe.DpEvent


def _unwrap_self_composed(event: DpEvent) -> tuple[DpEvent, int]:
  """(inner event, total count) of SelfComposed^k(... SelfComposed(inner))."""
  count = 1
  while isinstance(event, dpe.SelfComposedDpEvent):
    count *= event.count
    event = event.event
  return event, count


def poisson_gaussian_params(event: DpEvent) -> tuple[float, float, int] | None:
  """(q, sigma, count) when `event` is SelfComposed^k(PoissonSampled(q, Gaussian(sigma))).

  None for any other event (the ledger then asks dp_accounting directly).

  >>> step = dpe.PoissonSampledDpEvent(0.1, dpe.GaussianDpEvent(1.5))
  >>> poisson_gaussian_params(dpe.SelfComposedDpEvent(dpe.SelfComposedDpEvent(step, 4), 3))
  (0.1, 1.5, 12)
  """
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


def step_pld(
    event: DpEvent, discretization: float
) -> tuple[privacy_loss_distribution.PrivacyLossDistribution | None, int]:
  """(cached one-step PLD, steps) for SelfComposed^k of one noisy step, else (None, 0).

  The step is a Poisson-subsampled or truncated Poisson-subsampled Gaussian with noise > 0,
  under add-or-remove-one; `pld.self_compose(steps)` is then the event's PLD, as
  `PLDAccountant(value_discretization_interval=discretization)` would compose it.
  """
  poisson = poisson_gaussian_params(event)
  if poisson is not None:
    q, sigma, steps = poisson
    return (_poisson_gaussian_pld(q, sigma, discretization), steps) if sigma > 0 else (None, 0)
  event, steps = _unwrap_self_composed(event)
  if isinstance(event, dpe.TruncatedSubsampledGaussianDpEvent) and event.noise_multiplier > 0:
    return _truncated_gaussian_pld(
        int(event.dataset_size), float(event.sampling_probability),
        int(event.truncated_batch_size), float(event.noise_multiplier), discretization), steps
  return None, 0
