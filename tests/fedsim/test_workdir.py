"""Tests for fedsim.workdir: writability, and when a run may start, resume or is refused."""

import json
import os

import numpy as np
import pytest

from fedsim import workdir as workdir_lib

RESULTS = ("summary.json", "metrics.jsonl", "metrics.csv", "privacy.json", "report.json",
           "curves.png")


def _finished_run(workdir, config):
  """A workdir as a completed run of `config` leaves it."""
  assert workdir_lib.open_run(workdir, config) == 0
  for name in RESULTS:
    with open(os.path.join(workdir, name), "w") as f:
      f.write("{}")
  os.makedirs(os.path.join(workdir, "checkpoints", "1"))


def _assert_one_line_error(excinfo, *parts):
  message = str(excinfo.value)
  assert "\n" not in message
  for part in parts:
    assert part in message, message


# ---------------------------------------------------------------- writability


def test_checkpoint_dir(workdir):
  assert workdir_lib.checkpoint_dir(workdir) == os.path.join(workdir, "checkpoints")


def test_check_writable_creates_nested_folders(tmp_path):
  path = str(tmp_path / "a" / "b" / "c")
  workdir_lib.check_writable(path)
  assert os.path.isdir(path)
  assert os.listdir(path) == []  # the write test leaves nothing behind


def test_check_writable_refuses_a_file(tmp_path):
  path = tmp_path / "run"
  path.write_text("not a folder")
  with pytest.raises(ValueError) as excinfo:
    workdir_lib.check_writable(str(path))
  _assert_one_line_error(excinfo, f"--workdir={str(path)!r}", "is a file")


def test_check_writable_refuses_a_path_under_a_file(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(ValueError) as excinfo:
    workdir_lib.check_writable(str(blocker / "run" / "x"))
  _assert_one_line_error(excinfo, "--workdir=", "cannot be created", f"{str(blocker)!r} is a file")


def test_check_writable_refuses_an_empty_name():
  with pytest.raises(ValueError, match="--workdir='' is empty"):
    workdir_lib.check_writable("")


def test_check_writable_without_create_writes_nothing(tmp_path):
  path = tmp_path / "a" / "b"
  workdir_lib.check_writable(str(path), create=False)
  assert os.listdir(tmp_path) == []
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(ValueError, match=r"cannot be created: .*file' is a file"):
    workdir_lib.check_writable(str(blocker / "x" / "y"), create=False)
  path.mkdir(parents=True)
  workdir_lib.check_writable(str(path), create=False)  # an existing folder: probed
  assert os.listdir(path) == []


def test_check_writable_relative_path_under_a_file(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "runs").write_text("")
  for create in (True, False):
    with pytest.raises(ValueError, match=r"^--workdir='runs/x' cannot be created: 'runs' is a"):
      workdir_lib.check_writable("runs/x", create=create)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_check_writable_reports_permission_denied(tmp_path):
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  try:
    with pytest.raises(ValueError) as excinfo:
      workdir_lib.check_writable(str(locked))
    _assert_one_line_error(excinfo, "--workdir=", "permission denied")
    with pytest.raises(ValueError) as excinfo:
      workdir_lib.check_writable(str(locked / "sub"))
    _assert_one_line_error(excinfo, "cannot be created", "permission denied")
    with pytest.raises(ValueError, match="cannot be created: permission denied"):
      workdir_lib.check_writable(str(locked / "sub"), create=False)
  finally:
    locked.chmod(0o700)


# ------------------------------------------------------------------- open_run


def test_fresh_start_writes_config_json(workdir, config):
  assert workdir_lib.open_run(workdir, config) == 0
  with open(os.path.join(workdir, "config.json")) as f:
    record = json.load(f)
  assert record["config"] == workdir_lib.config_record(config)
  assert record["config"]["num_clients"] == config.num_clients
  assert {"python", "jax", "flax", "optax", "dp-accounting"} <= set(record["versions"])
  assert record["backend"] in ("cpu", "gpu", "tpu")
  assert record["devices"] and all(isinstance(d, str) for d in record["devices"])
  assert sorted(os.listdir(workdir)) == ["config.json"]


def test_same_config_finished_starts_again_fresh(workdir, config):
  _finished_run(workdir, config)
  assert workdir_lib.open_run(workdir, config) == 0
  assert sorted(os.listdir(workdir)) == ["config.json"]


def test_same_config_unfinished_without_checkpoint_starts_fresh(workdir, config):
  assert workdir_lib.open_run(workdir, config) == 0
  (open(os.path.join(workdir, "metrics.jsonl"), "w")).close()
  assert workdir_lib.open_run(workdir, config) == 0
  assert sorted(os.listdir(workdir)) == ["config.json"]


def test_different_finished_config_is_refused_and_left_untouched(workdir, config):
  _finished_run(workdir, config)
  before = {name: os.path.getmtime(os.path.join(workdir, name))
            for name in (*RESULTS, "config.json")}
  other = config.copy_and_resolve_references()
  other.num_rounds = 5
  other.dp.level = "none"
  with pytest.raises(ValueError) as excinfo:
    workdir_lib.open_run(workdir, other)
  _assert_one_line_error(
      excinfo, f"--workdir={workdir!r} holds a run of a different config",
      f"num_rounds: {config.num_rounds} -> 5", "dp.level: 'patient' -> 'none'",
      "use --overwrite to replace it, or another --workdir")
  assert before == {name: os.path.getmtime(os.path.join(workdir, name)) for name in before}
  assert os.path.isdir(os.path.join(workdir, "checkpoints"))


def test_different_unfinished_config_is_refused(workdir, config):
  assert workdir_lib.open_run(workdir, config) == 0
  other = config.copy_and_resolve_references()
  other.seed = 1
  with pytest.raises(ValueError, match=r"different config \(seed: 0 -> 1\)"):
    workdir_lib.open_run(workdir, other)


def test_refusal_lists_a_few_differences(workdir, config):
  assert workdir_lib.open_run(workdir, config) == 0
  other = config.copy_and_resolve_references()
  other.seed, other.num_rounds, other.eval_every, other.model = 1, 9, 3, "resnet18"
  other.dp.delta = 1e-6
  with pytest.raises(ValueError) as excinfo:
    workdir_lib.open_run(workdir, other)
  message = str(excinfo.value)
  assert message.count(" -> ") == 3
  assert "and 2 more" in message


def test_refusal_names_a_field_the_old_config_lacked(workdir, config):
  assert workdir_lib.open_run(workdir, config) == 0
  other = config.copy_and_resolve_references()
  with other.unlocked():
    other.client.new_field = 2
  with pytest.raises(ValueError, match=r"client\.new_field: \(absent\) -> 2"):
    workdir_lib.open_run(workdir, other)


def test_overwrite_replaces_a_different_config(workdir, config):
  _finished_run(workdir, config)
  other = config.copy_and_resolve_references()
  other.num_rounds = 5
  assert workdir_lib.open_run(workdir, other, overwrite=True) == 0
  assert sorted(os.listdir(workdir)) == ["config.json"]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["config"]["num_rounds"] == 5


def test_results_without_config_json_are_refused(workdir, config):
  os.makedirs(workdir)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    f.write("{}")
  with pytest.raises(ValueError, match="without a readable config.json.*--overwrite"):
    workdir_lib.open_run(workdir, config)
  assert os.path.exists(os.path.join(workdir, "summary.json"))
  assert workdir_lib.open_run(workdir, config, overwrite=True) == 0


def test_check_run_writes_nothing(workdir, config):
  _finished_run(workdir, config)
  other = config.copy_and_resolve_references()
  other.seed = 3
  with pytest.raises(ValueError):
    workdir_lib.check_run(workdir, other)
  workdir_lib.check_run(workdir, config)
  workdir_lib.check_run(workdir, other, overwrite=True)
  assert sorted(os.listdir(workdir)) == sorted([*RESULTS, "checkpoints", "config.json"])


def test_open_run_refuses_an_unwritable_workdir(tmp_path, config):
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(ValueError, match="--workdir=.*is a file"):
    workdir_lib.open_run(str(blocker), config)


# --------------------------------------------------------------------- resume


def _checkpointed_run(workdir, config, steps):
  from fedsim import checkpoint
  assert workdir_lib.open_run(workdir, config) == 0
  for step in steps:
    checkpoint.save(workdir_lib.checkpoint_dir(workdir), step, {"w": np.zeros(2)})
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write('{"round": 1}\n')


def test_unfinished_same_config_resumes_from_latest_checkpoint(workdir, config):
  _checkpointed_run(workdir, config, steps=(2, 4))
  assert workdir_lib.open_run(workdir, config) == 4
  assert os.path.exists(os.path.join(workdir, "metrics.jsonl"))  # kept for the resume
  # Finished: no resume, a fresh start.
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    f.write("{}")
  assert workdir_lib.resume_round(workdir, config) == 0


def test_overwrite_does_not_resume(workdir, config):
  _checkpointed_run(workdir, config, steps=(2,))
  assert workdir_lib.open_run(workdir, config, overwrite=True) == 0
  assert sorted(os.listdir(workdir)) == ["config.json"]
