"""Epsilon of DP-SGD / DP-FedAvg, the noise for a target epsilon, or a run's ledger.

  python -m privacy.compute_epsilon --sampling_rate=0.01 --noise_multiplier=4 \\
      --steps=10000 --delta=1e-5 [--accountant=rdp|pld]      # prints epsilon
  python -m privacy.compute_epsilon --sampling_rate=0.01 --target_epsilon=3 \\
      --steps=10000 --delta=1e-5                               # prints the noise multiplier
  python -m privacy.compute_epsilon --config=experiments/dp_sgd.py
      # prints the per-hospital ledger that run would get, then its max epsilon

The event is Poisson-sampled Gaussian steps (`events.local_dp_sgd_event`; with
--truncated_batch_size and --dataset_size, truncated Poisson batches, PLD only). For
client-level DP pass the client sampling rate and --steps=rounds. The last line printed is
the number alone, so scripts can read it. Invalid parameters print one line and exit 2.
"""

from __future__ import annotations

import sys
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from privacy import accountants, events, validation
from privacy import ledger as ledger_lib

_SAMPLING_RATE = flags.DEFINE_float("sampling_rate", None, "Poisson sampling rate q in (0, 1].")
_NOISE = flags.DEFINE_float("noise_multiplier", None, "Noise std / clip norm (sigma).")
_TARGET = flags.DEFINE_float("target_epsilon", None,
                             "Instead of --noise_multiplier: calibrate sigma to this epsilon.")
_STEPS = flags.DEFINE_integer("steps", None, "Number of sampled Gaussian steps (or rounds).")
_DELTA = flags.DEFINE_float("delta", 1e-5, "Target delta.")
_ACCOUNTANT = flags.DEFINE_string("accountant", "rdp", "rdp | pld.")
_TRUNCATED = flags.DEFINE_integer("truncated_batch_size", None,
                                  "Poisson batches truncated to this size (PLD only).")
_DATASET_SIZE = flags.DEFINE_integer("dataset_size", None,
                                     "Privacy units sampled from (with --truncated_batch_size).")
_PLD_DISCRETIZATION = flags.DEFINE_float("pld_discretization", accountants.PLD_DISCRETIZATION,
                                         "PLD value discretisation interval (default: "
                                         "dp-accounting's PLDAccountant default).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config: print the per-hospital ledger the run would get.")


def compute(
    *,
    sampling_rate: float | None,
    steps: int | None,
    delta: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    accountant: str = "rdp",
    truncated_batch_size: int | None = None,
    dataset_size: int | None = None,
    pld_discretization: float = accountants.PLD_DISCRETIZATION,
) -> tuple[str, float]:
  """Returns (description line, value): epsilon, or the calibrated noise multiplier."""
  if (noise_multiplier is None) == (target_epsilon is None):
    raise ValueError("give exactly one of --noise_multiplier and --target_epsilon")
  if sampling_rate is None or steps is None:
    raise ValueError("--sampling_rate and --steps are required (or give --config)")
  accountants.make_accountant(accountant)
  common = {"sampling_rate": sampling_rate, "steps": steps,
            "truncated_batch_size": truncated_batch_size, "dataset_size": dataset_size}
  setting = f"q={sampling_rate:g}, steps={steps}, delta={delta:g}, accountant={accountant}"
  if truncated_batch_size is not None:
    setting += f", truncated to {truncated_batch_size} of n={dataset_size}"
  if target_epsilon is not None:
    sigma = accountants.calibrate_noise_multiplier(
        target_epsilon=target_epsilon, delta=delta, accountant=accountant,
        pld_discretization=pld_discretization, **common)
    return f"noise_multiplier={sigma:.6g} for epsilon<={target_epsilon:g} ({setting})", sigma
  validation.validate_dp_params(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate,
                                delta=delta)
  event = events.local_dp_sgd_event(noise_multiplier=noise_multiplier, **common)
  eps = accountants.epsilon(event, delta, accountant, pld_discretization=pld_discretization)
  return f"epsilon={eps:.6g} at sigma={noise_multiplier:g} ({setting})", eps


def ledger_lines(ledger: ledger_lib.PrivacyLedger) -> list[str]:
  """Human-readable per-hospital ledger; the last line is the max epsilon alone."""
  eps, counts = ledger.epsilons(), ledger.composition_counts
  header = (f"privacy unit={ledger.unit}, delta={ledger.delta:g}, "
            f"accountant={ledger.accountant}, neighbouring={ledger.neighbouring}, "
            f"rounds={ledger.rounds_recorded}")
  lines = [header, "hospital  compositions  epsilon"]
  lines += [f"{k:8d}  {int(c):12d}  {e:.6g}" for k, (c, e) in enumerate(zip(counts, eps))]
  lines.append(f"max epsilon over {ledger.num_hospitals} hospitals: {eps.max():.6g}")
  lines.append(repr(float(eps.max())))
  return lines


def _config_lines(config: Any) -> list[str]:
  """Lines for --config: the ledger `fedsim.privacy_plan.ledger_preview(config)` returns."""
  try:
    from fedsim import privacy_plan  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    print(f"error: --config needs fedsim.privacy_plan.ledger_preview ({e})", file=sys.stderr)
    sys.exit(1)
  ledger = privacy_plan.ledger_preview(config)
  if ledger is None:
    return ["dp.level=none: this run has no privacy guarantee", "inf"]
  return ledger_lines(ledger)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
    sys.exit(2)
  try:
    if _CONFIG.value is not None:
      given = [f.name for f in (_SAMPLING_RATE, _NOISE, _TARGET, _STEPS) if f.value is not None]
      if given:
        raise ValueError(f"--config takes its parameters from the config, not --{given[0]}")
      lines = _config_lines(_CONFIG.value)
    else:
      text, value = compute(
          sampling_rate=_SAMPLING_RATE.value, steps=_STEPS.value, delta=_DELTA.value,
          noise_multiplier=_NOISE.value, target_epsilon=_TARGET.value,
          accountant=_ACCOUNTANT.value, truncated_batch_size=_TRUNCATED.value,
          dataset_size=_DATASET_SIZE.value, pld_discretization=_PLD_DISCRETIZATION.value)
      lines = [text, repr(float(value))]
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
