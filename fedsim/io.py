"""What a run writes: config.json, metrics.jsonl/csv, summary.json, curves.png.

One writer interface (`write_scalars(step, dict)`) with JSONL and CSV behind it.
`summary.json` is written last and atomically (temporary file, then rename): its
presence means the run completed.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
from importlib import metadata
from typing import Any

import numpy as np

PACKAGES = ("jax", "jaxlib", "flax", "optax", "dp-accounting", "numpy")


def versions() -> dict:
  """Python and the versions of the packages a result depends on."""
  out = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  return out


def to_json(value: Any) -> Any:
  """Numpy / JAX scalars and arrays -> plain Python; NaN and inf -> None."""
  if isinstance(value, dict):
    return {str(k): to_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_json(v) for v in value]
  if hasattr(value, "tolist"):
    return to_json(value.tolist())
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def write_json_atomic(path: str, payload: Any) -> None:
  """Writes JSON to `path` via a temporary file and a rename."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(to_json(payload), f, indent=2, allow_nan=False)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class MetricWriter:
  """Appends one row per evaluated round to metrics.jsonl and metrics.csv."""

  def __init__(self, workdir: str):
    self.jsonl = os.path.join(workdir, "metrics.jsonl")
    self.csv = os.path.join(workdir, "metrics.csv")
    self.history: list[dict] = []

  def truncate(self, step: int) -> None:
    """Keeps the rows of rounds <= `step` (a resumed run rewrites what follows)."""
    rows = []
    if os.path.exists(self.jsonl):
      with open(self.jsonl) as f:
        rows = [row for line in f if line.strip()
                and (row := json.loads(line))["round"] <= step]
    self.history = rows
    with open(self.jsonl, "w") as f:
      f.writelines(json.dumps(row, allow_nan=False) + "\n" for row in rows)
    self._write_csv()

  def write_scalars(self, step: int, scalars: dict) -> None:
    row = to_json({"round": step, **scalars})
    self.history.append(row)
    with open(self.jsonl, "a") as f:
      f.write(json.dumps(row, allow_nan=False) + "\n")
    self._write_csv()

  def _write_csv(self) -> None:
    fields = list(dict.fromkeys(k for row in self.history for k in row))
    with open(self.csv, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=fields)
      writer.writeheader()
      writer.writerows(self.history)


def plot_curves(history: list[dict], path: str) -> None:
  """loss / accuracy / AUROC over rounds as a PNG; for DP runs also epsilon over rounds
  and the privacy-utility path (accuracy and AUROC against the epsilon spent)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  value = lambda row, key: np.nan if row.get(key) is None else row[key]
  private = any(row.get("epsilon") is not None for row in history)
  panels = [("loss", "test loss"), ("accuracy", "test accuracy"), ("auroc", "macro AUROC")]
  if private:
    panels += [("epsilon", "epsilon (max over hospitals)"), (None, "privacy-utility")]
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
  rounds = [row["round"] for row in history]
  for ax, (key, title) in zip(np.atleast_1d(axes), panels):
    if key is None:  # utility against the epsilon spent so far
      eps = [value(row, "epsilon") for row in history]
      for metric, marker in (("accuracy", "o"), ("auroc", "s")):
        ax.plot(eps, [value(row, metric) for row in history], marker=marker, ms=3,
                label=metric)
      ax.set_xlabel("epsilon")
      ax.legend(fontsize=8)
    else:
      ax.plot(rounds, [value(row, key) for row in history], marker="o", ms=3,
              label="seen hospitals")
      if key == "accuracy" and "unseen_accuracy" in history[0]:
        ax.plot(rounds, [value(row, "unseen_accuracy") for row in history], marker="s",
                ms=3, label="unseen hospitals")
        ax.legend(fontsize=8)
      ax.set_xlabel("round")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
