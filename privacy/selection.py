"""Privacy of choosing the best of several DP runs: Papernot & Steinke's random stopping.

Usable without fedsim. Choosing the best configuration of a sweep on private data is
itself a release about the data. Papernot and Steinke (ICLR 2022, "Hyperparameter
tuning with Renyi differential privacy", Theorem 2) bound it for this procedure A:
draw K from the truncated negative binomial distribution D(eta, gamma),

  P[K = k] = (1 - gamma)^k / (gamma^-eta - 1) * prod_{l=0}^{k-1} (l + eta) / (l + 1),  k >= 1

(eta = 1: geometric, P[K = k] = gamma (1 - gamma)^(k-1); eta -> 0: logarithmic), run
the base algorithm Q (pick a configuration at random, train it with fresh randomness,
score it) K times independently, release the best run. If Q is (lambda, eps(lambda))-RDP
for all lambda > 1, A is (lambda, eps'(lambda))-RDP with

  eps'(lambda) = eps(lambda) + (1 + eta) (1 - 1/lam_hat) eps(lam_hat)
                 + (1 + eta) log(1/gamma) / lam_hat + log(E[K]) / (lambda - 1)

for every lam_hat >= 1 (the term with eps(lam_hat) vanishes at lam_hat = 1). Here
lam_hat is minimised over {1} and the RDP orders, and eps' is converted to
(epsilon, delta) as every RDP epsilon of this project is
(`subsampled_gaussian.epsilon_from_rdp`, dp-accounting's conversion). docs/private_selection.md
states the analysis and what the procedure requires.

Example (a Gaussian mechanism, sigma = 4, selected with E[K] = 10, geometric):
  >>> orders = np.array(accountants.RDP_ORDERS)
  >>> rdp = orders / (2 * 4.0**2)
  >>> one = float(subsampled_gaussian.epsilon_from_rdp(rdp[None], orders, 1e-5)[0])
  >>> both = selection_epsilon(orders, rdp, 1e-5, eta=1.0, mean_repetitions=10)
  >>> round(one, 3), round(both, 3)
  (1.013, 2.154)
"""

from __future__ import annotations

import math

import numpy as np

from privacy import accountants, events, subsampled_gaussian, validation


def expected_repetitions(eta: float, gamma: float) -> float:
  """E[K] of the truncated negative binomial D(eta, gamma)."""
  if eta == 0:
    return (1 / gamma - 1) / math.log(1 / gamma)
  return eta * (1 - gamma) / (gamma * (1 - gamma**eta))


def _check(eta: float, mean_repetitions: float) -> None:
  validation.check(eta > -1, "selection eta", eta, "> -1 (1: geometric, 0: logarithmic)")
  validation.check(mean_repetitions > 1, "selection mean_repetitions", mean_repetitions,
                   "> 1 (the expected number of runs K)")


def gamma_for_mean(eta: float, mean_repetitions: float) -> float:
  """The gamma in (0, 1) with E[K] = `mean_repetitions` (E[K] falls as gamma grows).

  >>> round(gamma_for_mean(1.0, 10.0), 12)  # geometric: E[K] = 1 / gamma
  0.1
  """
  _check(eta, mean_repetitions)
  lo, hi = 1e-300, 1.0 - 1e-15
  for _ in range(200):  # bisection in log space over (0, 1)
    mid = math.sqrt(lo * hi) if hi < 0.5 else (lo + hi) / 2
    if expected_repetitions(eta, mid) > mean_repetitions:
      lo = mid
    else:
      hi = mid
  return hi


def repetition_pmf(k: np.ndarray, eta: float, gamma: float) -> np.ndarray:
  """P[K = k] of D(eta, gamma) for integers k >= 1 (the procedure's stopping law)."""
  k = np.asarray(k, np.int64)
  ks = np.arange(1, int(k.max()) + 1)
  if eta == 0:  # logarithmic: (1 - gamma)^k / (k log(1/gamma))
    log_p = ks * math.log1p(-gamma) - np.log(ks) - math.log(math.log(1 / gamma))
  else:  # for eta < 0 the first factor and gamma^-eta - 1 are both negative
    log_ratio = np.log(np.abs(ks - 1 + eta)) - np.log(ks)
    log_p = ks * math.log1p(-gamma) + np.cumsum(log_ratio) - math.log(abs(gamma**-eta - 1))
  return np.exp(log_p)[k - 1]


def rdp_after_selection(orders, rdp, *, eta: float, gamma: float) -> np.ndarray:
  """[orders] Theorem 2's RDP of the selected run, from the base algorithm's RDP [orders]."""
  orders, rdp = np.asarray(orders, np.float64), np.asarray(rdp, np.float64)
  candidates = np.concatenate([
      [(1 + eta) * math.log(1 / gamma)],  # lam_hat = 1
      (1 + eta) * (1 - 1 / orders) * rdp + (1 + eta) * math.log(1 / gamma) / orders])
  mean = expected_repetitions(eta, gamma)
  return rdp + candidates.min() + math.log(mean) / (orders - 1)


def selection_epsilon(orders, rdp, delta: float, *, eta: float,
                      mean_repetitions: float) -> float:
  """Epsilon at `delta` of the best of K ~ D(eta, gamma) runs, E[K] = `mean_repetitions`."""
  gamma = gamma_for_mean(eta, mean_repetitions)
  selected = rdp_after_selection(orders, rdp, eta=eta, gamma=gamma)
  return float(subsampled_gaussian.epsilon_from_rdp(selected[None], orders, delta)[0])


def record_rdp(record: dict) -> np.ndarray | None:
  """[RDP_ORDERS] the largest RDP over the hospitals of a privacy record (privacy.json).

  The record's composed per-hospital DpEvents, in RDP whatever accountant the run
  reported with: Poisson-subsampled Gaussian steps by the ledger's vectorised formula
  (`subsampled_gaussian.poisson_gaussian_rdp`, equal to dp-accounting's), any other
  event by dp-accounting's RDP accountant. None when that cannot account an event
  (truncated Poisson batches have no RDP bound here).
  """
  orders = accountants.RDP_ORDERS
  curves = []
  for data in {repr(d): d for d in record["hospital_events"]}.values():
    event = events.event_from_dict(data)
    params = subsampled_gaussian.poisson_gaussian_params(event)
    if params is not None:
      q, sigma, count = params
      curves.append(count * subsampled_gaussian.poisson_gaussian_rdp([q], [sigma], orders)[0])
      continue
    acct = accountants.make_accountant("rdp", neighbouring=record["neighbouring_relation"])
    if not acct.supports(event):
      return None
    curves.append(np.asarray(acct.compose(event).rdp, np.float64))
  return np.max(curves, axis=0)
