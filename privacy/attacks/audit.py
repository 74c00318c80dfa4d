"""Empirical epsilon lower bounds from canary scores (privacy auditing).

A run inserts m canaries, each included with probability 1/2 (the randomised
inclusion of Steinke, Nasr and Jagielski 2023), and scores each one after
training (higher: "more likely included"). Guessing "included" for the k
highest scores, c of them right, falsifies an (epsilon, delta)-DP claim when
so many right guesses would be too unlikely under it:

* `epsilon_one_run`: Steinke et al. 2023, "Privacy auditing with one (1)
  training run" (arXiv:2305.08846), Theorem 7 with one-sided guesses.
* `epsilon_one_run_fdp`: Mahloujifar et al. 2024, "Auditing f-differential
  privacy in one run" (arXiv:2410.22235), with the Gaussian trade-off function
  whose (epsilon, delta) is the claim (their `audit_rh_with_cap`); tighter.
* `epsilon_clopper_pearson`: repeated runs (one canary per run, in or out),
  Clopper-Pearson intervals on TPR and FPR (Jagielski et al. 2020).

Each holds with probability >= 1 - `significance` over the run's randomness
(Bonferroni over the thresholds tried by `audit_scores`). The formulas follow
jax-privacy 2.0.0 (`jax_privacy/auditing.py`), which is not a dependency here
(it needs pydantic); tests/privacy/test_audit.py checks values against it.
Pure numpy/scipy: usable without fedsim.
"""

from __future__ import annotations

import functools

import dp_accounting
import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats

METHODS = ("one_run", "one_run_fdp")


def one_run_p_value(m: int, n_guess: int, n_correct: int, epsilon: float,
                    delta: float) -> float:
  """P-value of `n_correct` right out of `n_guess` guesses among `m` canaries
  under an (epsilon, delta)-DP claim (Steinke et al. 2023, Theorem 7)."""
  q = scipy.special.expit(epsilon)
  beta = scipy.stats.binom.sf(n_correct - 1, n_guess, q)
  if delta == 0:
    return float(beta)
  i = np.arange(1, n_correct + 1)
  alpha = np.max((scipy.stats.binom.sf(n_correct - i - 1, n_guess, q) - beta) / i,
                 initial=0.0)
  return float(min(beta + alpha * delta * 2 * m, 1.0))


def _largest_rejected(objective, epsilon_low: float) -> float:
  """The epsilon where `objective` (positive: claim falsified) turns <= 0."""
  if objective(epsilon_low) <= 0:
    return epsilon_low
  high = max(1.0, 2 * epsilon_low)
  while objective(high) > 0:
    epsilon_low, high = high, 2 * high
  return float(scipy.optimize.brentq(objective, epsilon_low, high, xtol=1e-6))


def epsilon_one_run(m: int, n_guess: int, n_correct: int, *, significance: float,
                    delta: float, epsilon_low: float = 0.0) -> float:
  """Largest epsilon whose (epsilon, delta) claim these guesses falsify (Steinke et
  al. 2023); `epsilon_low` if none above it is falsified."""
  if one_run_p_value(m, n_guess, n_correct, epsilon_low, 0.0) > significance:
    return epsilon_low  # not even pure DP at epsilon_low is rejected
  return _largest_rejected(
      lambda e: significance - one_run_p_value(m, n_guess, n_correct, e, delta),
      epsilon_low)


@functools.lru_cache(maxsize=4096)
def _gaussian_tradeoff_inverse(epsilon: float, delta: float):
  """x -> Phi(Phi^-1(x) - mu) for the Gaussian mechanism that is exactly (epsilon, delta)."""
  sigma = dp_accounting.get_sigma_gaussian(epsilon, delta)
  if sigma == 0:
    return lambda x: float(x == 1.0)
  return lambda x: scipy.stats.norm.cdf(scipy.stats.norm.ppf(x) - 1 / sigma)


def epsilon_one_run_fdp(m: int, n_guess: int, n_correct: int, *, significance: float,
                        delta: float, epsilon_low: float = 0.0) -> float:
  """Largest epsilon whose Gaussian f-DP claim at (epsilon, delta) these guesses
  falsify (Mahloujifar et al. 2024, recursion `audit_rh_with_cap`)."""

  def objective(epsilon):
    inverse = _gaussian_tradeoff_inverse(float(epsilon), delta)
    r = significance * n_correct / m
    h = significance * (n_guess - n_correct) / m
    for i in range(n_correct - 1, -1, -1):
      h_new = max(h, inverse(r))
      if h_new == h:
        break  # neither h nor r changes any more
      r, h = min(r + i / (n_guess - i) * (h_new - h), 1.0), h_new
    return r + h - n_guess / m

  return _largest_rejected(objective, epsilon_low)


def _upper_hull(points: np.ndarray) -> np.ndarray:
  """Indices of the vertices of the concave upper hull of `points` `[N, 2]` (sorted by x)."""
  index = np.arange(len(points))
  while len(index) > 2:
    d = np.diff(points[index], axis=0)
    dominated = d[:-1, 1] * d[1:, 0] - d[1:, 1] * d[:-1, 0] <= 0
    if not dominated.any():
      break
    index = index[np.r_[True, ~dominated, True]]
  return index


def _hull_counts(in_scores: np.ndarray, out_scores: np.ndarray):
  """(missed included, rejected excluded) `[T]` for the rule "included iff score >= t",
  at the thresholds t on the upper hull of those counts: every other rule is
  dominated by a mix of two of these (as jax-privacy's `_pareto_frontier`)."""
  thresholds = np.append(np.union1d(in_scores, out_scores), np.inf)
  missed = np.searchsorted(np.sort(in_scores), thresholds, side="left")
  rejected = np.searchsorted(np.sort(out_scores), thresholds, side="left")
  keep = _upper_hull(np.stack([missed, rejected], axis=1))
  return missed[keep], rejected[keep]


def audit_scores(in_scores, out_scores, *, significance: float = 0.05, delta: float,
                 method: str = "one_run") -> float:
  """Epsilon lower bound from one run's canary scores (higher: guessed included).

  Every threshold on the hull of the ROC points (guess "included" above it) is
  tried at significance / (number of them), Bonferroni, as jax-privacy does.

  Args:
    in_scores: `[m_in]` scores of the canaries that were included.
    out_scores: `[m_out]` scores of those that were not.
    significance: probability that the bound exceeds the true epsilon, in (0, 1).
    delta: the delta of the claim, in [0, 1).
    method: one of METHODS.
  """
  if method not in METHODS:
    raise ValueError(f"method={method!r} must be one of {list(METHODS)}")
  if not 0 < significance < 1:
    raise ValueError(f"significance={significance} must be in (0, 1)")
  if not 0 <= delta < 1:
    raise ValueError(f"delta={delta} must be in [0, 1)")
  in_scores, out_scores = np.asarray(in_scores, float), np.asarray(out_scores, float)
  if in_scores.size == 0 or out_scores.size == 0:
    raise ValueError("audit_scores needs included and excluded canaries, got "
                     f"{in_scores.size} and {out_scores.size}")
  m = in_scores.size + out_scores.size
  bound = epsilon_one_run if method == "one_run" else epsilon_one_run_fdp
  missed, rejected = _hull_counts(in_scores, out_scores)
  n_correct = in_scores.size - missed
  n_guess = n_correct + out_scores.size - rejected
  alpha = significance / len(n_guess)
  best = 0.0
  # Highest precision first: later thresholds are mostly ruled out without a search.
  for k, c in sorted(zip(n_guess, n_correct), key=lambda kc: -kc[1] / max(kc[0], 1)):
    if k == 0 or c / k <= scipy.special.expit(best):
      continue  # cannot beat the best bound so far
    best = max(best, bound(m, int(k), int(c), significance=alpha, delta=delta,
                           epsilon_low=best))
  return best


def clopper_pearson_upper(k, n: int, significance: float) -> np.ndarray:
  """One-sided upper confidence bound on a binomial rate from k successes in n."""
  k = np.asarray(k)
  return np.where(k < n, scipy.stats.beta.ppf(1 - significance, k + 1, n - k), 1.0)


def epsilon_clopper_pearson(in_scores, out_scores, *, significance: float = 0.05,
                            delta: float = 0.0) -> float:
  """Epsilon lower bound over repeated runs (one score per run, canary in or out).

  At each threshold t: TPR >= 1 - CP-upper(FN) and FPR <= CP-upper(FP), each at
  significance / 2, Bonferroni over the hull's thresholds; epsilon >= log((TPR - delta)
  / FPR) (Jagielski et al. 2020; jax-privacy `epsilon_clopper_pearson`).
  """
  if not 0 < significance < 0.5:
    raise ValueError(f"significance={significance} must be in (0, 0.5)")
  in_scores, out_scores = np.asarray(in_scores, float), np.asarray(out_scores, float)
  missed, rejected = _hull_counts(in_scores, out_scores)
  alpha = significance / len(missed) / 2
  tpr_low = 1 - clopper_pearson_upper(missed, in_scores.size, alpha)
  fpr_high = clopper_pearson_upper(out_scores.size - rejected, out_scores.size, alpha)
  valid = tpr_low > delta
  if not valid.any():
    return 0.0
  return float(max(0.0, np.max(np.log(tpr_low[valid] - delta) - np.log(fpr_high[valid]))))
