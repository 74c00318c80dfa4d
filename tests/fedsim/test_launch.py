"""End-to-end tests of launch.py as a user runs it (a subprocess from the repository root).

Command-line mistakes must stop with one `error:` line and no traceback, before any
compute; a finished run of one config must not be replaced by another without
`--overwrite`.

Tests marked WIRING depend on `simulation.train(..., overwrite=...)` calling
`workdir.open_run` (fedsim/simulation.py); the refusal itself happens in launch.py
before the simulation starts.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A run of a few seconds: 4 hospitals of 12x12 images, one round of one local step, the
# default config's model.
TINY = ["--config.num_clients=4", "--config.clients_per_round=2", "--config.num_rounds=1",
        "--config.data.examples_per_client=24", "--config.data.image_size=12",
        "--config.data.num_unseen=1", "--config.client.batch_size=8",
        "--config.client.local_steps=1", "--config.dp.max_batch_size=0",
        "--config.dp.accountant=rdp", "--config.engine.unroll=1"]


def launch(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "launch.py", "--noprogress", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(result: subprocess.CompletedProcess, *parts: str) -> str:
  """The run failed with exactly one `error:` line on stderr (containing `parts`)."""
  assert result.returncode != 0, result.stdout
  assert "Traceback" not in result.stderr, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, result.stderr
  for part in parts:
    assert part in errors[0], errors[0]
  return errors[0]


@pytest.mark.parametrize("overrides", [[], ["--config.seed=1"]])
def test_missing_config_file(tmp_path, overrides):
  # With an override, ml_collections used to load the file during flag definition.
  workdir = tmp_path / "run"
  result = launch("--config=experiments/does_not_exist.py", *overrides,
                  f"--workdir={workdir}")
  assert_one_error_line(result, "--config=", "does_not_exist.py", "no such file")
  assert not workdir.exists()


def test_unknown_config_field(tmp_path):
  result = launch("--config.dp.no_such_field=1", f"--workdir={tmp_path / 'run'}")
  assert_one_error_line(result, "--config.dp.no_such_field", "no_such_field")


def test_workdir_under_a_regular_file(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  result = launch(*TINY, f"--workdir={blocker / 'run'}")
  assert_one_error_line(result, "--workdir=", "is a file")
  assert blocker.read_text() == ""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """The workdir of a completed tiny run (default config's DP level: patient)."""
  workdir = tmp_path_factory.mktemp("launch") / "finished"
  result = launch(*TINY, f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr
  assert "rounds 1" in result.stdout and "accuracy" in result.stdout
  return workdir


def test_tiny_run_leaves_a_complete_record(finished_run):  # WIRING
  summary = json.loads((finished_run / "summary.json").read_text())
  assert summary["rounds"] == 1 and summary["privacy_unit"] == "patient"
  assert 0.0 <= summary["accuracy"] <= 1.0
  config = json.loads((finished_run / "config.json").read_text())["config"]
  assert config["num_clients"] == 4 and config["model"] == "cnn_tanh"
  for name in ("metrics.jsonl", "metrics.csv", "privacy.json", "report.json", "curves.png"):
    assert (finished_run / name).exists(), name


def test_different_config_is_refused_and_the_old_run_kept(finished_run):
  summary = finished_run / "summary.json"
  before = (summary.read_bytes(), summary.stat().st_mtime_ns)
  result = launch(*TINY, "--config.dp.level=none", f"--workdir={finished_run}")
  assert_one_error_line(result, "different config", "dp.level: 'patient' -> 'none'",
                        "--overwrite")
  assert (summary.read_bytes(), summary.stat().st_mtime_ns) == before


def test_overwrite_replaces_a_different_config(finished_run, tmp_path):  # WIRING
  workdir = tmp_path / "copy"
  shutil.copytree(finished_run, workdir)
  result = launch(*TINY, "--config.dp.level=none", "--overwrite", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr
  assert "privacy: none" in result.stdout
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["epsilon"] is None and summary["accountant"] is None
  assert not (workdir / "privacy.json").exists()  # the old run's privacy record is gone
  config = json.loads((workdir / "config.json").read_text())["config"]
  assert config["dp"]["level"] == "none"
