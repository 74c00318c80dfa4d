"""What a run writes: config.json, metrics.jsonl/csv, summary.json, curves.png.

This module is the one JSON writer of the project, with one rule for values JSON
has no room for: NaN, +inf and -inf become `null`, wherever they sit (nested in
dicts, lists, numpy or JAX arrays). `to_json` applies the rule; `dumps` and
`write_json_atomic` apply it and then write strict JSON (`allow_nan=False`), so a
file we write can be read by any JSON parser.

Whole files are written atomically (a temporary file in the same folder, fsync,
then a rename): a crash never leaves a file that looks complete but is not.
`summary.json` is written last this way: its presence means the run completed.
Metrics rows go through `MetricWriter` (`write_scalars(step, dict)`), with JSONL
and CSV behind it.
"""

from __future__ import annotations

import csv
import io as _io
import itertools
import json
import math
import os
import platform
from importlib import metadata
from typing import Any, Iterable

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
  """Plain-Python copy of `value`: numpy / JAX scalars and arrays become numbers and
  lists, tuples become lists, dict keys strings, and NaN, +inf, -inf become None.

  Example:
    >>> to_json({"acc": np.float32(0.5), "eps": (np.inf, -np.inf),
    ...          "loss": np.array([1.0, np.nan]), 3: np.int64(7)})
    {'acc': 0.5, 'eps': [None, None], 'loss': [1.0, None], '3': 7}
  """
  if isinstance(value, dict):
    return {str(k): to_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_json(v) for v in value]
  if hasattr(value, "tolist"):  # numpy and JAX arrays and scalars
    return to_json(value.tolist())
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def dumps(value: Any, *, indent: int | None = None) -> str:
  """`value` as strict JSON text, after `to_json` (so NaN and inf are `null`).

  Example:
    >>> dumps({"epsilon": float("nan"), "rounds": np.int32(3)})
    '{"epsilon": null, "rounds": 3}'
  """
  return json.dumps(to_json(value), indent=indent, allow_nan=False)


def write_atomic(path: str, data: str | bytes | Iterable[str | bytes]) -> None:
  """Writes `data` to `path` through `path + ".tmp"`, fsync and a rename.

  Either the whole new content is at `path` afterwards or `path` is as it was; the
  temporary file is removed on any failure.
  """
  tmp = f"{path}.tmp"
  try:
    with open(tmp, "wb") as f:
      for chunk in [data] if isinstance(data, (str, bytes)) else data:  # or an iterable
        f.write(chunk.encode() if isinstance(chunk, str) else chunk)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json_atomic(path: str, payload: Any) -> None:
  """Writes `payload` as strict JSON (see `dumps`) to `path`, atomically.

  A value JSON cannot hold raises `TypeError` and leaves `path` as it was. The text
  is streamed to the temporary file, never held whole (a million hospitals' privacy
  record would take 300 MB as one indented string); it equals `dumps(payload, indent=2)`.
  """
  encoder = json.JSONEncoder(indent=2, allow_nan=False)
  write_atomic(path, itertools.chain(encoder.iterencode(to_json(payload)), ["\n"]))


def read_jsonl(path: str) -> list[dict]:
  """The rows of a JSONL file; an unparsable last line (a write cut short) is dropped."""
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i < len(lines) - 1:
        raise
  return rows


class MetricWriter:
  """Appends one row per evaluated round to metrics.jsonl and rewrites metrics.csv.

  Rows pass through `to_json` (NaN and inf -> null in JSONL, an empty cell in CSV);
  `history` holds them for the plot.
  """

  def __init__(self, workdir: str):
    self.jsonl = os.path.join(workdir, "metrics.jsonl")
    self.csv = os.path.join(workdir, "metrics.csv")
    self.history: list[dict] = []

  def truncate(self, step: int) -> None:
    """Keeps the rows of rounds <= `step` (a resumed run rewrites what follows)."""
    rows = read_jsonl(self.jsonl) if os.path.exists(self.jsonl) else []
    self.history = [row for row in rows if row["round"] <= step]
    write_atomic(self.jsonl, "".join(dumps(row) + "\n" for row in self.history))
    self._write_csv()

  def write_scalars(self, step: int, scalars: dict) -> None:
    """Appends the row `{"round": step, **scalars}`."""
    row = to_json({"round": step, **scalars})
    line = dumps(row) + "\n"
    self.history.append(row)
    with open(self.jsonl, "a") as f:
      f.write(line)
    self._write_csv()

  def _write_csv(self) -> None:
    fields = list(dict.fromkeys(k for row in self.history for k in row))
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(self.history)
    write_atomic(self.csv, buffer.getvalue())


def plot_curves(history: list[dict], path: str) -> None:
  """loss / accuracy / AUROC over rounds as a PNG; for DP runs also epsilon over rounds
  and the privacy-utility path (accuracy and AUROC against the epsilon spent)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  value = lambda row, key: np.nan if row.get(key) is None else row[key]
  private = any(row.get("epsilon") is not None for row in history)
  seg = "dice" in history[0]  # task=segmentation
  utility = ("dice", "iou") if seg else ("accuracy", "auroc")
  panels = [("loss", "test loss"), ("dice", "test Dice"), ("hd95", "Hausdorff-95 (px)")] if seg \
      else [("loss", "test loss"), ("accuracy", "test accuracy"), ("auroc", "macro AUROC")]
  if private:
    panels += [("epsilon", "epsilon (max over hospitals)"), (None, "privacy-utility")]
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
  rounds = [row["round"] for row in history]
  for ax, (key, title) in zip(np.atleast_1d(axes), panels):
    if key is None:  # utility against the epsilon spent so far
      eps = [value(row, "epsilon") for row in history]
      for metric, marker in zip(utility, "os", strict=True):
        ax.plot(eps, [value(row, metric) for row in history], marker=marker, ms=3,
                label=metric)
      ax.set_xlabel("epsilon")
      ax.legend(fontsize=8)
    else:
      ax.plot(rounds, [value(row, key) for row in history], marker="o", ms=3,
              label="seen hospitals")
      if key == utility[0] and f"unseen_{key}" in history[0]:
        ax.plot(rounds, [value(row, f"unseen_{key}") for row in history], marker="s",
                ms=3, label="unseen hospitals")
        ax.legend(fontsize=8)
      ax.set_xlabel("round")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  png = _io.BytesIO()
  fig.savefig(png, format="png", dpi=110)
  plt.close(fig)
  write_atomic(path, png.getvalue())
