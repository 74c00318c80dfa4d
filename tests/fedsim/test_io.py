"""Tests for fedsim.io: the one JSON rule, atomic writes, metric rows, the plot."""

import csv
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from fedsim import io


def test_to_json_nan_and_inf_become_none_at_any_depth():
  value = {
      "a": np.float32(np.nan),
      "b": [1.5, float("inf"), (np.float64(-np.inf), 2)],
      "c": {"d": np.array([[1.0, np.nan], [np.inf, -0.5]])},
      "e": jnp.array([np.nan, 3.0]),
      "f": jnp.float32(np.inf),
      "g": np.int64(7),
      "h": np.bool_(True),
      4: "four",
  }
  assert io.to_json(value) == {
      "a": None,
      "b": [1.5, None, [None, 2]],
      "c": {"d": [[1.0, None], [None, -0.5]]},
      "e": [None, 3.0],
      "f": None,
      "g": 7,
      "h": True,
      "4": "four",
  }


def test_to_json_gives_plain_python_types():
  out = io.to_json({"x": np.float32(0.25), "n": np.int32(3), "j": jnp.int32(2),
                    "flag": np.bool_(False)})
  assert [type(out[k]) for k in ("x", "n", "j", "flag")] == [float, int, int, bool]
  assert out["x"] == 0.25


def test_dumps_is_strict_json():
  text = io.dumps({"eps": np.array([np.nan, np.inf, 1.0])})
  assert text == '{"eps": [null, null, 1.0]}'
  assert json.loads(text, parse_constant=pytest.fail) == {"eps": [None, None, 1.0]}


def test_write_json_atomic_applies_the_rule_and_leaves_no_tmp(tmp_path):
  path = tmp_path / "summary.json"
  io.write_json_atomic(str(path), {"epsilon": np.float64(np.inf), "rounds": np.int64(3)})
  assert json.loads(path.read_text()) == {"epsilon": None, "rounds": 3}
  assert os.listdir(tmp_path) == ["summary.json"]


def test_unserialisable_payload_leaves_old_file_and_no_tmp(tmp_path):
  path = tmp_path / "summary.json"
  io.write_json_atomic(str(path), {"rounds": 1})
  with pytest.raises(TypeError):
    io.write_json_atomic(str(path), {"rounds": 2, "oops": object()})
  assert json.loads(path.read_text()) == {"rounds": 1}
  assert os.listdir(tmp_path) == ["summary.json"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failure_mid_write_leaves_no_file_that_looks_complete(tmp_path, monkeypatch, failing):
  def fail(*args):
    raise OSError("disk full")
  monkeypatch.setattr(io.os, failing, fail)
  path = tmp_path / "summary.json"
  with pytest.raises(OSError, match="disk full"):
    io.write_json_atomic(str(path), {"rounds": 5})
  assert os.listdir(tmp_path) == []


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_metric_writer_rows_and_csv(tmp_path):
  writer = io.MetricWriter(str(tmp_path))
  writer.write_scalars(1, {"loss": np.float32(0.5), "epsilon": None})
  writer.write_scalars(2, {"loss": np.nan, "epsilon": np.float64(1.25), "auroc": 0.75})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line) for line in lines] == [
      {"round": 1, "loss": 0.5, "epsilon": None},
      {"round": 2, "loss": None, "epsilon": 1.25, "auroc": 0.75}]
  assert _read_csv(tmp_path / "metrics.csv") == [
      {"round": "1", "loss": "0.5", "epsilon": "", "auroc": ""},
      {"round": "2", "loss": "", "epsilon": "1.25", "auroc": "0.75"}]
  assert writer.history[1]["loss"] is None


def test_metric_writer_truncate_keeps_rows_up_to_step(tmp_path):
  writer = io.MetricWriter(str(tmp_path))
  for r in (2, 4, 6):
    writer.write_scalars(r, {"loss": r / 10, **({"extra": 1.0} if r == 6 else {})})
  resumed = io.MetricWriter(str(tmp_path))
  resumed.truncate(4)
  assert [row["round"] for row in resumed.history] == [2, 4]
  jsonl = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["round"] for line in jsonl] == [2, 4]
  rows = _read_csv(tmp_path / "metrics.csv")
  assert [row["round"] for row in rows] == ["2", "4"]
  assert list(rows[0]) == ["round", "loss"]  # round 6's extra column went with it
  resumed.write_scalars(5, {"loss": 0.3})
  assert [row["round"] for row in _read_csv(tmp_path / "metrics.csv")] == ["2", "4", "5"]


def test_metric_writer_truncate_drops_a_last_line_cut_short(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"round": 1, "loss": 0.5}\n{"round": 2, "lo')
  writer = io.MetricWriter(str(tmp_path))
  writer.truncate(10)
  assert writer.history == [{"round": 1, "loss": 0.5}]


def test_metric_writer_truncate_without_rows(tmp_path):
  writer = io.MetricWriter(str(tmp_path))
  writer.truncate(3)
  assert writer.history == []
  assert (tmp_path / "metrics.jsonl").read_text() == ""


@pytest.mark.parametrize("private", [False, True])
def test_plot_curves_writes_a_png(tmp_path, private):
  history = [{"round": r, "loss": 1.0 / r, "accuracy": 0.3 + 0.1 * r, "auroc": None,
              "unseen_accuracy": 0.4, "epsilon": (0.5 * r if private else None)}
             for r in (1, 2, 3)]
  path = tmp_path / "curves.png"
  io.plot_curves(history, str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert os.listdir(tmp_path) == ["curves.png"]


def test_versions_names_the_packages_a_result_depends_on():
  out = io.versions()
  assert set(out) == {"python", *io.PACKAGES}
  assert out["numpy"] == np.__version__
