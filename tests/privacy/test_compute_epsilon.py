"""Tests for the privacy.compute_epsilon CLI: the last line is the library's number."""

import importlib.util
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant

from privacy import accountants, compute_epsilon, events, ledger

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(*flags):
  return subprocess.run([sys.executable, "-m", "privacy.compute_epsilon", *flags], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=False)


def test_cli_epsilon_last_line_is_library_value():
  out = _run("--sampling_rate=0.01", "--noise_multiplier=4", "--steps=10000", "--delta=1e-5")
  assert out.returncode == 0, out.stderr
  event = events.local_dp_sgd_event(sampling_rate=0.01, noise_multiplier=4.0, steps=10000)
  assert float(out.stdout.strip().splitlines()[-1]) == accountants.epsilon(event, 1e-5)


def test_cli_pld_epsilon_is_the_librarys_default_pld():
  """Issue 10, item 4: the CLI's PLD epsilon is `PLDAccountant()`'s (it printed 0.960)."""
  out = _run("--sampling_rate=0.01", "--noise_multiplier=4", "--steps=10000", "--delta=1e-5",
             "--accountant=pld")
  assert out.returncode == 0, out.stderr
  event = events.local_dp_sgd_event(sampling_rate=0.01, noise_multiplier=4.0, steps=10000)
  library = pld_privacy_accountant.PLDAccountant().compose(event).get_epsilon(1e-5)
  assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(library, rel=1e-9)
  assert "epsilon=0.946999 " in out.stdout


def test_cli_target_epsilon_prints_calibrated_sigma():
  out = _run("--sampling_rate=0.01", "--target_epsilon=3", "--steps=100", "--delta=1e-5")
  assert out.returncode == 0, out.stderr
  sigma = float(out.stdout.strip().splitlines()[-1])
  assert sigma == accountants.calibrate_noise_multiplier(
      target_epsilon=3.0, sampling_rate=0.01, steps=100, delta=1e-5)


@pytest.mark.parametrize("flags,message", [
    (["--noise_multiplier=-1"], "dp.noise_multiplier=-1.0 must be >= 0"),
    (["--noise_multiplier=1", "--truncated_batch_size=4", "--dataset_size=100"],
     "dp.accountant='rdp' must be 'pld' for truncated Poisson batches"),
])
def test_cli_invalid_params_one_line_exit_2(flags, message):
  out = _run("--sampling_rate=0.01", "--steps=10", "--delta=1e-5", *flags)
  assert out.returncode == 2
  assert out.stderr.strip().count("\n") == 0 and message in out.stderr
  assert "Traceback" not in out.stderr and out.stdout == ""


@pytest.mark.parametrize("kwargs,message", [
    (dict(noise_multiplier=1.0, accountant="moments"),
     r"dp.accountant='moments' must be one of \['rdp', 'pld'\]"),
    (dict(noise_multiplier=1.0, target_epsilon=2.0), "exactly one of"),
    (dict(target_epsilon=2.0, sampling_rate=1.5), r"sampling_rate=1.5 must be in \(0, 1\]"),
    (dict(noise_multiplier=1.0, delta=2.0), r"dp.delta=2.0 must be in \(0, 1\)"),
    (dict(noise_multiplier=1.0, steps=None), "--sampling_rate and --steps are required"),
])
def test_compute_validation_messages(kwargs, message):
  params = dict(sampling_rate=0.01, steps=10, delta=1e-5) | kwargs
  with pytest.raises(ValueError, match=message):
    compute_epsilon.compute(**params)


def test_compute_pld_matches_library():
  text, eps = compute_epsilon.compute(sampling_rate=0.02, steps=50, delta=1e-5,
                                      noise_multiplier=1.0, accountant="pld",
                                      pld_discretization=1e-3)
  event = events.local_dp_sgd_event(sampling_rate=0.02, noise_multiplier=1.0, steps=50)
  assert eps == accountants.epsilon(event, 1e-5, "pld", pld_discretization=1e-3)
  assert "accountant=pld" in text


def test_compute_truncated_with_pld():
  _, eps = compute_epsilon.compute(sampling_rate=0.1, steps=4, delta=1e-5, noise_multiplier=1.0,
                                   accountant="pld", truncated_batch_size=15, dataset_size=100,
                                   pld_discretization=1e-3)
  assert 0 < eps < np.inf


def test_ledger_lines_last_line_is_max_epsilon():
  record = ledger.PrivacyLedger.for_local_dp_sgd(
      sampling_rates=[0.1, 0.2, 0.5], steps=[10, 5, 2], noise_multiplier=1.0, delta=1e-5)
  record.record_round(np.array([True, True, False]))
  lines = compute_epsilon.ledger_lines(record)
  assert len(lines) == 3 + 4
  assert float(lines[-1]) == record.max_epsilon()


@pytest.mark.skipif(importlib.util.find_spec("fedsim.privacy_plan") is None,
                    reason="fedsim.privacy_plan.ledger_preview not written yet")
def test_cli_config_prints_ledger():
  out = _run(f"--config={ROOT / 'experiments' / 'default.py'}", "--config.dp.level=example")
  assert out.returncode == 0, out.stderr
  float(out.stdout.strip().splitlines()[-1])
