"""Fast paths for many subsampled Gaussian steps: vectorised RDP and cached one-step PLDs.

Usable without fedsim. A `privacy.ledger.PrivacyLedger` accounts hundreds of hospitals whose
sampling rates all differ. Calling an accountant once per hospital would rebuild the same
quantities again and again, so for the events DP-SGD and DP-FedAvg produce (SelfComposed^k of a
Poisson-subsampled or truncated Poisson-subsampled Gaussian step) this module computes

* the RDP of one Poisson-subsampled Gaussian step for E (q, sigma) pairs at once, with the same
  terms and stopping rules as dp_accounting (tested to agree to 1e-9), and epsilon from RDP for
  many rows at once;
* the one-step PLD that dp_accounting's `PLDAccountant` would build, cached, so that a step is
  built once and self-composed for every hospital and count. It is built the library's way
  (`from_gaussian_mechanism` / `from_truncated_subsampled_gaussian_mechanism`: pessimistic,
  connect-the-dots, log mass truncation bound -50) with the privacy loss inverted on the whole
  epsilon grid at once instead of one grid point at a time in Python, which is what makes the
  library's default interval (1e-4) slow to build (about 1.5 s for a truncated step, 0.1 s here).

None of it changes a number: each function returns what dp_accounting returns for the same event
(the PLDs to floating-point rounding; tested).

Example:

  >>> rdp = poisson_gaussian_rdp(np.array([1.0]), np.array([2.0]), [2.0, 4.0])
  >>> rdp.tolist()  # q = 1: the Gaussian's alpha / (2 sigma^2)
  [[0.25, 0.5]]
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from dp_accounting import dp_event as dpe
from dp_accounting.pld import pld_pmf, privacy_loss_distribution, privacy_loss_mechanism
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import fft, special, stats

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


_Adjacency = privacy_loss_mechanism.AdjacencyType
_PLD = privacy_loss_distribution.PrivacyLossDistribution


class _GridGaussianPrivacyLoss(privacy_loss_mechanism.GaussianPrivacyLoss):
  """dp_accounting's `GaussianPrivacyLoss` with `get_delta_for_epsilon` vectorised over epsilons.

  The library inverts the privacy loss with one Python call per epsilon (a connect-the-dots
  PLD at interval 1e-4 asks for 10^4 to 10^5 of them); here the same formulas
  (`_inverse_privacy_loss_add`, `_remove`, `_replace` and `common.log_a_times_exp_b_plus_c`,
  `log_sinh`, `asinh_exp`) run on arrays, operation for operation, so the deltas agree with
  the library's to floating-point rounding.
  """

  def _inverse_privacy_loss_array(self, privacy_loss: np.ndarray) -> np.ndarray:
    """`inverse_privacy_loss` of each element (only where the library would call it)."""
    s, var, q = self.sensitivity, self._standard_deviation**2, self.sampling_prob
    pl = np.asarray(privacy_loss, np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
      if self.adjacency_type == _Adjacency.REPLACE:
        return self._inverse_replace_array(pl)
      if q == 1.0:
        without = pl
      else:
        # log(a exp(b) + c) with a = 1/q > 0 and c = 1 - 1/q < 0, as the library computes it.
        a, c = 1 / q, 1 - 1 / q
        b = -pl if self.adjacency_type == _Adjacency.ADD else pl
        d = b + np.log(a)
        log_sum = np.where(b == 0, np.log(a + c), d + np.log1p(-np.exp(np.log(-c) - d)))
        bound = -math.log(1 - q) if self.adjacency_type == _Adjacency.ADD else math.log(1 - q)
        at_bound = np.abs(pl - bound) <= 1e-9 * np.maximum(np.abs(pl), abs(bound))  # isclose
        if self.adjacency_type == _Adjacency.ADD:
          without = np.where(at_bound, np.inf, -log_sum)
        else:
          without = np.where(at_bound, -np.inf, log_sum)
      x = -0.5 * s - without * var / s
      return s + x if self.adjacency_type == _Adjacency.ADD else x

  def _inverse_replace_array(self, pl: np.ndarray) -> np.ndarray:
    s, sd, q = self.sensitivity, self._standard_deviation, self.sampling_prob
    if q == 1.0:
      return np.where(pl == 0, 0.0, -pl * sd**2 / s / 2)
    half = np.abs(pl) / 2
    log_alpha = 0.5 * (s / sd) ** 2 + math.log1p(-q) - math.log(q)
    log_sinh = np.where(half == 0, 0.0, half + np.log1p(-np.exp(-2 * half)) - math.log(2))
    log_term = log_alpha + log_sinh
    sign = np.where(pl >= 0, 1.0, -1.0)
    asinh_term = -sign * np.logaddexp(0.5 * np.logaddexp(0, 2 * log_term), log_term)
    return np.where(pl == 0, 0.0, sd**2 / s * (asinh_term - pl / 2))

  def get_delta_for_epsilon(self, epsilon):
    """The library's `AdditiveNoisePrivacyLoss.get_delta_for_epsilon`, inverted on arrays."""
    is_scalar = isinstance(epsilon, (int, float))
    epsilons = np.array([epsilon]) if is_scalar else np.asarray(epsilon)
    deltas = np.zeros_like(epsilons, dtype=float)
    if self.sampling_prob == 1.0 or self.adjacency_type == _Adjacency.REPLACE:
      inverse = np.full_like(epsilons, True, dtype=bool)
    elif self.adjacency_type == _Adjacency.ADD:
      inverse = epsilons < -math.log1p(-self.sampling_prob)
    else:
      inverse = epsilons > math.log1p(-self.sampling_prob)
      deltas[~inverse] = -np.expm1(epsilons[~inverse])
    x = self._inverse_privacy_loss_array(epsilons[inverse])
    deltas[inverse] = self.mu_upper_cdf(x) - np.exp(epsilons[inverse] + self.mu_lower_log_cdf(x))
    deltas = np.clip(deltas, 0, 1)
    return float(deltas[0]) if is_scalar else deltas


def _gaussian_pmf(sigma: float, q: float, adjacency: _Adjacency,
                  discretization: float) -> pld_pmf.PLDPmf:
  """The library's `_create_pld_pmf_from_monotone_privacy_loss` (pessimistic, connect the dots)."""
  loss = _GridGaussianPrivacyLoss(sigma, sampling_prob=q, adjacency_type=adjacency)
  bounds = loss.connect_dots_bounds()
  lower = math.floor(bounds.epsilon_lower / discretization)
  upper = math.ceil(bounds.epsilon_upper / discretization)
  deltas = loss.get_delta_for_epsilon(np.arange(lower, upper + 1) * discretization)
  return pld_pmf.create_pmf_pessimistic_connect_dots_fixed_gap(discretization, lower, upper,
                                                               deltas)


def gaussian_pld(sigma: float, q: float, discretization: float, *,
                 replace_one: bool = False) -> privacy_loss_distribution.PrivacyLossDistribution:
  """`privacy_loss_distribution.from_gaussian_mechanism(sigma, sampling_prob=q, ...)`, faster.

  Same defaults as the library (sensitivity 1, pessimistic, connect the dots, log mass
  truncation bound -50); add-or-remove-one, or replace-one with `replace_one`.
  """
  if replace_one:
    return _PLD(_gaussian_pmf(sigma, q, _Adjacency.REPLACE, discretization))
  remove = _gaussian_pmf(sigma, q, _Adjacency.REMOVE, discretization)
  if q == 1.0:
    return _PLD(remove)
  return _PLD(remove, _gaussian_pmf(sigma, q, _Adjacency.ADD, discretization))


def truncated_gaussian_pld(
    n: int, q: float, batch: int, sigma: float, discretization: float
) -> privacy_loss_distribution.PrivacyLossDistribution:
  """`from_truncated_subsampled_gaussian_mechanism` (add-or-remove-one), faster.

  The library's construction: the untruncated step mixed with a sensitivity-2 (replace-one)
  step at the probability that the batch is truncated given the unit was sampled.
  """
  untruncated = gaussian_pld(sigma, q, discretization)
  truncation = stats.binom.sf(batch - 1, n - 1, q)
  if truncation == 0.0:
    return untruncated
  conditional_q = stats.binom.sf(batch, n, q) * batch / truncation / n
  doubled = gaussian_pld(sigma / 2, conditional_q, discretization, replace_one=True)
  return doubled.compute_mixture(untruncated, truncation)


# Orders at which the library bounds a self-convolution's tails (Chernoff), times len(probs):
# `common.compute_self_convolve_bounds`'s default.
_CHERNOFF_ORDERS = np.concatenate((np.arange(-20, 0), np.arange(1, 21)))
_LOG_MGF_CHUNK_ELEMENTS = 1 << 22  # [orders, losses] block per pass: 32 MB of float64.


def self_convolve_log_mgfs(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(orders [40], log MGFs [40]) that `common.compute_self_convolve_bounds` computes.

  The library calls `scipy.special.logsumexp(np.arange(n) * order, b=probs)` once per order in
  Python; here the same steps (shift by the largest exponent with non-zero weight, set that term
  aside, sum the rest, `log1p(s / m) + log(m) + max`) run on [orders, n] blocks, so the values
  are scipy's to floating-point rounding (equal in the tests). They depend on `probs` only, so a
  caller composing the same PMF many times (`ComposableStep`) computes them once.
  """
  probs = np.asarray(probs, np.float64)
  n = probs.shape[0]
  orders = _CHERNOFF_ORDERS / n
  nonzero = np.flatnonzero(probs)
  if nonzero.size == 0 or (probs < 0).any() or not np.isfinite(probs).all():
    return orders, np.array([special.logsumexp(np.arange(n) * o, b=probs) for o in orders])
  index = np.arange(n)
  log_mgfs = np.empty(orders.shape[0])
  step = max(1, _LOG_MGF_CHUNK_ELEMENTS // n)
  for start in range(0, orders.shape[0], step):
    o = orders[start:start + step]
    i_max = np.where(o > 0, nonzero[-1], nonzero[0])  # argmax of i * o where probs != 0.
    a_max = i_max * o
    terms = probs * np.exp(index[None, :] * o[:, None] - a_max[:, None])
    terms[np.arange(o.shape[0]), i_max] = 0.0  # scipy adds the largest term separately.
    m = probs[i_max]
    total = terms.sum(axis=1)
    total = np.where(total == 0, total, total / m)
    log_mgfs[start:start + step] = np.log1p(total) + np.log(m) + a_max
  return orders, log_mgfs


def self_convolve_bounds(
    probs: np.ndarray, num_times: int, tail_mass_truncation: float,
    log_mgfs: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[int, int]:
  """`common.compute_self_convolve_bounds(probs, num_times, tail_mass_truncation)`, vectorised.

  Same Chernoff bounds at the same orders; `log_mgfs` is `self_convolve_log_mgfs(probs)` when
  the caller has it already.
  """
  upper = (len(probs) - 1) * num_times
  lower = 0
  if tail_mass_truncation == 0:
    return lower, upper
  orders, values = self_convolve_log_mgfs(probs) if log_mgfs is None else log_mgfs
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    bounds = (num_times * values + math.log(2 / tail_mass_truncation)) / orders
  finite = np.isfinite(bounds)
  above, below = finite & (orders > 0), finite & (orders < 0)
  if above.any():
    upper = min(upper, math.ceil(bounds[above].min()))
  if below.any():
    lower = max(lower, math.floor(bounds[below].max()))
  return lower, upper


def _self_compose_pmf(pmf: pld_pmf.PLDPmf, num_times: int, tail_mass_truncation: float,
                      log_mgfs: tuple[np.ndarray, np.ndarray] | None = None) -> pld_pmf.PLDPmf:
  """`pmf.self_compose(num_times, tail_mass_truncation)` with the bounds vectorised.

  For a `DensePLDPmf`, the library's `DensePLDPmf.self_compose` and `common.self_convolve`
  step for step (same FFT length, same roll and truncation); other PMFs go to the library.
  """
  if not isinstance(pmf, pld_pmf.DensePLDPmf):
    return pmf.self_compose(num_times, tail_mass_truncation)
  if num_times <= 0:
    raise ValueError(f"num_times should be >= 1, num_times={num_times}")
  # pylint: disable=protected-access
  probs = pmf._probs
  lower, upper = self_convolve_bounds(probs, num_times, tail_mass_truncation, log_mgfs)
  output_len = upper - lower + 1
  fast_len = fft.next_fast_len(max(output_len, len(probs)))
  convolved = np.real(fft.ifft(fft.fft(probs, fast_len) ** num_times))
  composed = np.array(np.roll(convolved, -lower)[:output_len])
  inf_prob = tail_mass_truncation - math.expm1(num_times * math.log1p(-pmf._infinity_mass))
  return pld_pmf.DensePLDPmf(pmf._discretization, pmf._lower_loss * num_times + lower, composed,
                             inf_prob, pmf._pessimistic_estimate)
  # pylint: enable=protected-access


def self_compose(pld: privacy_loss_distribution.PrivacyLossDistribution, num_times: int,
                 tail_mass_truncation: float = 1e-15
                 ) -> privacy_loss_distribution.PrivacyLossDistribution:
  """`pld.self_compose(num_times, tail_mass_truncation)`: the library's PLD, bounds vectorised."""
  return ComposableStep(pld).self_compose(num_times, tail_mass_truncation)


class ComposableStep:
  """A one-step PLD to self-compose many times (each hospital's count, each evaluation).

  `self_compose(k)` is `pld.self_compose(k)` (see `_self_compose_pmf`); the log MGFs behind
  the truncation bounds depend only on the step, so they are computed once (40 floats a PMF).
  """

  def __init__(self, pld: privacy_loss_distribution.PrivacyLossDistribution):
    self.pld = pld
    self._log_mgfs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

  def _mgfs(self, which: int, pmf: pld_pmf.PLDPmf):
    if not isinstance(pmf, pld_pmf.DensePLDPmf):
      return None
    if which not in self._log_mgfs:
      self._log_mgfs[which] = self_convolve_log_mgfs(pmf._probs)  # pylint: disable=protected-access
    return self._log_mgfs[which]

  @property
  def nbytes(self) -> int:
    """Bytes held by the step's dense PMFs (the add PMF counted once when symmetric)."""
    pmfs = {id(p): p for p in (self.pld._pmf_remove, self.pld._pmf_add)}  # pylint: disable=protected-access
    return sum(p._probs.nbytes for p in pmfs.values()  # pylint: disable=protected-access
               if isinstance(p, pld_pmf.DensePLDPmf))

  def self_compose(self, num_times: int, tail_mass_truncation: float = 1e-15
                   ) -> privacy_loss_distribution.PrivacyLossDistribution:
    """The library's `PrivacyLossDistribution.self_compose` of the step."""
    pld = self.pld
    remove = pld._pmf_remove  # pylint: disable=protected-access
    pmf_remove = _self_compose_pmf(remove, num_times, tail_mass_truncation,
                                   self._mgfs(0, remove))
    if pld._symmetric:  # pylint: disable=protected-access
      return _PLD(pmf_remove)
    add = pld._pmf_add  # pylint: disable=protected-access
    return _PLD(pmf_remove, _self_compose_pmf(add, num_times, tail_mass_truncation,
                                              self._mgfs(1, add)))


@functools.lru_cache(maxsize=64)  # At 1e-4: < 0.1 MB (sigma 4, q 0.01) to ~2 MB (sigma 1, q 0.1).
def _poisson_gaussian_pld(
    q: float, sigma: float, discretization: float
) -> privacy_loss_distribution.PrivacyLossDistribution:
  """The one-step PLD `PLDAccountant` builds for PoissonSampled(q, Gaussian(sigma)) (add/remove).

  Cached so that a ledger composes it c times per hospital count instead of rebuilding it.
  """
  return gaussian_pld(sigma, q, discretization)


@functools.lru_cache(maxsize=32)  # At 1e-4: ~3-6 MB each.
def _truncated_gaussian_pld(
    n: int, q: float, batch: int, sigma: float, discretization: float
) -> privacy_loss_distribution.PrivacyLossDistribution:
  """The one-step PLD `PLDAccountant` builds for a TruncatedSubsampledGaussianDpEvent (cached)."""
  return truncated_gaussian_pld(n, q, batch, sigma, discretization)


def _step_spec(event: DpEvent) -> tuple[str, tuple, int] | None:
  """("poisson", (q, sigma), steps) or ("truncated", (n, q, batch, sigma), steps), else None."""
  poisson = poisson_gaussian_params(event)
  if poisson is not None:
    q, sigma, steps = poisson
    return ("poisson", (q, sigma), steps) if q > 0 and sigma > 0 else None
  event, steps = _unwrap_self_composed(event)
  if (isinstance(event, dpe.TruncatedSubsampledGaussianDpEvent) and event.noise_multiplier > 0
      and event.sampling_probability > 0 and event.truncated_batch_size > 0
      and event.dataset_size > 0):
    return ("truncated", (int(event.dataset_size), float(event.sampling_probability),
                          int(event.truncated_batch_size), float(event.noise_multiplier)), steps)
  return None


def step_pld(
    event: DpEvent, discretization: float, *, cached: bool = True
) -> tuple[privacy_loss_distribution.PrivacyLossDistribution | None, int]:
  """(one-step PLD, steps) for SelfComposed^k of one noisy step, else (None, 0).

  The step is a Poisson-subsampled or truncated Poisson-subsampled Gaussian with noise > 0 and
  a sampling rate > 0, under add-or-remove-one; `pld.self_compose(steps)` is then the event's
  PLD, as `PLDAccountant(value_discretization_interval=discretization)` would compose it.
  Anything else (no noise, nothing sampled, other events) is left to the library: (None, 0).
  With `cached` (the accountant's path) the step comes from a small module-wide LRU cache;
  without, it is built afresh (a `PrivacyLedger` keeps its own, one per distinct event).
  """
  spec = _step_spec(event)
  if spec is None:
    return None, 0
  kind, args, steps = spec
  if kind == "poisson":
    build = _poisson_gaussian_pld if cached else _poisson_gaussian_pld.__wrapped__
  else:
    build = _truncated_gaussian_pld if cached else _truncated_gaussian_pld.__wrapped__
  return build(*args, discretization), steps


def _pmf_epsilon_for_delta(pmf: pld_pmf.PLDPmf, delta: float) -> float:
  """`pmf.get_epsilon_for_delta(delta)`, with the library's loop over losses run on arrays.

  `DensePLDPmf` walks its losses from the largest down in Python (about 0.1 s for a composed
  step at interval 1e-4); here the same running sums (`np.cumsum` adds in the loop's order)
  and the same stopping rules are evaluated at once. Other PMFs go to the library.
  """
  if not isinstance(pmf, pld_pmf.DensePLDPmf):
    return pmf.get_epsilon_for_delta(delta)
  # pylint: disable=protected-access
  infinity_mass, probs, d = pmf._infinity_mass, np.flip(pmf._probs), pmf._discretization
  upper_loss = (pmf._lower_loss + len(probs) - 1) * d
  # pylint: enable=protected-access
  if infinity_mass > delta:
    return math.inf
  steps = np.full(len(probs), -d)
  steps[0] = upper_loss
  losses = np.cumsum(steps)  # itertools.count(upper_loss, -d): repeated addition.
  mass_upper = np.cumsum(np.concatenate(([infinity_mass], probs)))  # [K + 1], before loss k.
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    mass_lower = np.cumsum(np.concatenate(([0.0], np.exp(-losses) * probs)))
    at_or_above = np.log((mass_upper[:-1] - delta) / mass_lower[:-1]) >= losses
  stop = (mass_upper[:-1] > delta) & (mass_lower[:-1] > 0) & at_or_above
  # Mass so large that exp(-loss) underflowed to 0: the library returns that loss.
  underflow = (mass_upper[1:] >= delta) & (mass_lower[1:] == 0)
  first_stop = int(np.argmax(stop)) if stop.any() else len(probs)
  first_underflow = int(np.argmax(underflow)) if underflow.any() else len(probs)
  if first_underflow < first_stop:
    return max(0.0, float(losses[first_underflow]))
  upper, lower = mass_upper[first_stop], mass_lower[first_stop]
  if upper <= lower + delta:
    return 0.0
  return math.log((upper - delta) / lower)


def epsilon_for_delta(pld: privacy_loss_distribution.PrivacyLossDistribution,
                      delta: float) -> float:
  """`pld.get_epsilon_for_delta(delta)`, the same number faster (see `_pmf_epsilon_for_delta`).

  The larger of the remove and add PMFs' epsilons, as the library takes it.
  """
  pmfs = [pld._pmf_remove, pld._pmf_add]  # pylint: disable=protected-access
  return max(_pmf_epsilon_for_delta(pmf, delta) for pmf in pmfs)
