"""Adaptive clipping for client-level DP (Andrew et al. 2021, arXiv:1905.03871).

Usable without fedsim. The clip norm S tracks the `gamma` quantile of the
clients' update norms instead of being tuned by hand. Every round each client
also reports `b_k = 1[||delta_k|| <= S]`; the server releases a noisy count of
them and moves S geometrically toward the quantile:

  b_bar = clamp((sum_k (b_k - 1/2) + N(0, sigma_b^2)) / E + 1/2, 0, 1)
  S    <- S * exp(-eta * (b_bar - gamma))

with E the PUBLIC expected cohort. Centering `b_k - 1/2` makes adding or
removing one client change the count by at most 1/2 (sensitivity 1/2), so the
count is a Gaussian mechanism with noise multiplier `2 sigma_b`.

Privacy: the delta sum (sensitivity S, noise `z_delta S`) and the count are
released together from the same cohort, i.e. one Gaussian mechanism on the
concatenated vector with multiplier `(z_delta^-2 + (2 sigma_b)^-2)^(-1/2)`.
Choosing `z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)` makes that exactly z, so the
round is accounted as the usual Poisson-subsampled Gaussian(z) and the ledger
does not change. The new S is post-processing of that release.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def default_count_stddev(expected_cohort: float) -> float:
  """sigma_b = E / 20, the paper's default (noise ~5% of the cohort on the fraction)."""
  return expected_cohort / 20.0


def delta_noise_multiplier(noise_multiplier, count_stddev: float):
  """The delta's noise multiplier z_delta that keeps the round's total at z.

  `z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)` (0 when z = 0: no privacy to split).
  A Python float is checked and computed in float64; a traced `jax.Array` z (a
  hyperparameter inside the compiled round) in its own dtype, unchecked (the
  config was validated with the float).

  Raises:
    ValueError: if z < 0, sigma_b < 0, or 2 sigma_b <= z (the count alone would
      spend more than the whole budget, z_delta undefined).
  """
  split = lambda z, sqrt: 1.0 / sqrt(z ** -2 - (2 * count_stddev) ** -2)
  if isinstance(noise_multiplier, jax.Array):
    z = noise_multiplier
    return jnp.where(z > 0, split(jnp.where(z > 0, z, 1.0), jnp.sqrt), 0.0)
  z, sb = float(noise_multiplier), float(count_stddev)
  if z < 0 or sb < 0:
    raise ValueError(f"noise_multiplier={z} and count_stddev={sb} must be >= 0")
  if z == 0:
    return 0.0
  if not 2 * sb > z:
    raise ValueError(f"count_stddev={sb} must be > noise_multiplier / 2 = {z / 2:g} "
                     "(2 * count_stddev <= noise_multiplier leaves no noise for the delta)")
  return split(z, math.sqrt)


def total_noise_multiplier(delta_multiplier: float, count_stddev: float) -> float:
  """The noise multiplier of the joint release: `(z_delta^-2 + (2 sigma_b)^-2)^(-1/2)`."""
  if delta_multiplier == 0 or count_stddev == 0:
    return 0.0
  return 1.0 / math.sqrt(delta_multiplier ** -2 + (2 * count_stddev) ** -2)


def noisy_unclipped_fraction(unclipped_count, cohort_size, key: jax.Array, *,
                             count_stddev, expected_cohort) -> jax.Array:
  """b_bar: the private fraction of clients with norm <= S, clamped to [0, 1].

  Only the centered sum `unclipped_count - cohort_size / 2 = sum_k (b_k - 1/2)`
  (sensitivity 1/2) is noised and released; the divisor is the public E.
  """
  centered = jnp.asarray(unclipped_count, jnp.float32) - 0.5 * jnp.asarray(
      cohort_size, jnp.float32)
  noise = count_stddev * jax.random.normal(key, (), jnp.float32)
  return jnp.clip((centered + noise) / expected_cohort + 0.5, 0.0, 1.0)


def update_clip_norm(clip_norm, unclipped_count, cohort_size, key: jax.Array, *,
                     target_quantile, learning_rate, count_stddev,
                     expected_cohort) -> jax.Array:
  """The next round's clip norm `S * exp(-eta * (b_bar - gamma))` (float32 scalar).

  Pure and jit-safe. Too many clients under S (b_bar > gamma) shrinks S, too
  many clipped grows it; a step changes S by at most a factor exp(eta).

  Args:
    clip_norm: S used this round.
    unclipped_count: sum over the cohort of `1[||delta_k|| <= S]`.
    cohort_size: realised cohort size (enters only through the centered sum).
    key: PRNG key of the count noise (never the delta noise's key).
    target_quantile: gamma in (0, 1).
    learning_rate: eta >= 0 (0 keeps S fixed).
    count_stddev: sigma_b, std of the noise on the count.
    expected_cohort: E = q * N, public.
  """
  b_bar = noisy_unclipped_fraction(unclipped_count, cohort_size, key,
                                   count_stddev=count_stddev,
                                   expected_cohort=expected_cohort)
  step = jnp.exp(-learning_rate * (b_bar - target_quantile))
  return (jnp.asarray(clip_norm, jnp.float32) * step).astype(jnp.float32)
