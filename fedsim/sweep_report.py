"""What a sweep leaves besides its runs: the results table, the plot, the summary.

Every row is read from a configuration's own record (summary.json, privacy.json), so
a resumed sweep writes the same table as an uninterrupted one:

  results.csv, results.jsonl   one row per configuration: every axis value, epsilon,
                               delta, accuracy, balanced accuracy, AUROC, worst-hospital
                               and unseen accuracy, rounds, wall seconds, its sub-workdir
  privacy_utility.png          `sweep.metric` against epsilon, one curve per setting of
                               the axes other than the noise (and the seed: averaged)
  summary.txt                  the best configuration per epsilon band, with the epsilon
                               of releasing it after a private selection (Papernot &
                               Steinke random stopping, privacy/selection.py)
"""

from __future__ import annotations

import csv
import io as _io
import json
import math
import os

import numpy as np

from fedsim import io
from privacy import accountants, selection

METRICS = ("epsilon", "delta", "accuracy", "balanced_accuracy", "auroc",
           "worst_hospital_accuracy", "unseen_accuracy", "rounds", "wall_seconds")
NOISE_AXES = ("dp.noise_multiplier", "target_epsilon")  # along a privacy-utility curve
CALIBRATED = "dp.noise_multiplier (calibrated)"


def rows(entries) -> list[dict]:
  """Table rows from `(axis values, run config, sub-workdir)` of each configuration."""
  out = []
  for values, config, path in entries:
    with open(os.path.join(path, "summary.json")) as f:
      summary = json.load(f)
    row = {"run": os.path.basename(path), **values}
    if "target_epsilon" in values:
      row[CALIBRATED] = config.dp.noise_multiplier
    row.update({k: summary.get(k) for k in METRICS})
    out.append(io.to_json(row))
  return out


def write_table(workdir: str, table: list[dict]) -> None:
  io.write_atomic(os.path.join(workdir, "results.jsonl"),
                  "".join(io.dumps(row) + "\n" for row in table))
  buffer = _io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(table[0]))
  writer.writeheader()
  writer.writerows(table)
  io.write_atomic(os.path.join(workdir, "results.csv"), buffer.getvalue())


def _setting(row: dict, axis_names: list[str]) -> str:
  shown = [f"{k}={row[k]}" for k in axis_names if k not in NOISE_AXES and k != "seed"]
  return ", ".join(shown) or "all"


def _save(fig, path: str) -> None:
  """Writes `fig` to `path` as a PNG, atomically, and closes it."""
  import matplotlib.pyplot as plt
  fig.tight_layout()
  png = _io.BytesIO()
  fig.savefig(png, format="png", dpi=110)
  plt.close(fig)
  io.write_atomic(path, png.getvalue())


def plot(path: str, table: list[dict], axis_names: list[str], metric: str) -> None:
  """`metric` against epsilon, one curve per setting (mean over seeds), log epsilon; a
  sweep of one axis that leaves the privacy parameters alone (e.g. secure-aggregation bits)
  gets `metric` against that axis instead."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  others = [k for k in axis_names if k != "seed"]
  if len(others) == 1 and others[0] not in NOISE_AXES:
    xs = sorted({row[others[0]] for row in table})
    ys = [np.mean([row[metric] for row in table if row[others[0]] == x]) for x in xs]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(xs, ys, marker="o")
    ax.set(xlabel=others[0], ylabel=f"{metric} (test hospitals)",
           title=f"{metric} against {others[0]}")
    ax.grid(alpha=0.3)
    _save(fig, path)
    return
  curves: dict[str, dict] = {}
  for row in table:
    if row["epsilon"] is None or row[metric] is None:
      continue
    noise = tuple(row[k] for k in axis_names if k in NOISE_AXES)
    point = curves.setdefault(_setting(row, axis_names), {}).setdefault(noise, [])
    point.append((row["epsilon"], row[metric]))
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for label, points in curves.items():
    xy = sorted(tuple(np.mean(np.array(p), axis=0)) for p in points.values())
    ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=label)
  for row in table:  # non-private configurations: a level, no epsilon
    if row["epsilon"] is None and row[metric] is not None:
      ax.axhline(row[metric], ls="--", lw=1, color="gray")
  ax.set_xscale("log")
  ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
  ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.set_xlabel("epsilon (max over hospitals, delta %g)" % (
      next((r["delta"] for r in table if r["delta"]), 0) or 0))
  ax.set_ylabel(f"{metric} (test hospitals)")
  seeds = len({row["seed"] for row in table}) if "seed" in axis_names else 1
  ax.set_title("privacy-utility" + (f" (mean over {seeds} seeds)" if seeds > 1 else ""))
  ax.grid(alpha=0.3, which="both")
  if curves:
    ax.legend(fontsize=8)
  _save(fig, path)


def bands(edges) -> list[tuple[float, float]]:
  """(lo, hi] epsilon bands from increasing edges, the last open-ended."""
  edges = [0.0, *edges, math.inf]
  return list(zip(edges[:-1], edges[1:]))


def selection_epsilon(workdir: str, members: list[dict], eta: float, mean: float):
  """Epsilon of releasing the best of `members` by random stopping; None without RDP.

  The base algorithm picks one of `members` uniformly at random, so its RDP is the
  largest of theirs; E[K] = `mean`, or the number of members when `mean` is 0.
  """
  curves = []
  for row in members:
    with open(os.path.join(workdir, "runs", row["run"], "privacy.json")) as f:
      curve = selection.record_rdp(json.load(f))
    if curve is None:
      return None
    curves.append(curve)
  mean = mean or len(members)
  if mean <= 1:  # one candidate, chosen without looking: no selection to pay for
    mean = 1 + 1e-9
  return selection.selection_epsilon(np.array(accountants.RDP_ORDERS), np.max(curves, axis=0),
                                     members[0]["delta"], eta=eta, mean_repetitions=mean)


def summary_text(workdir: str, table: list[dict], sweep_config) -> str:
  """One screen: per epsilon band, the best configuration by `sweep.metric`."""
  metric = sweep_config.metric
  fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
  delta = next((r["delta"] for r in table if r["delta"] is not None), None)
  lines = [f"sweep of {len(table)} configurations: {workdir}/results.csv, "
           "privacy_utility.png, runs/<name>/",
           f"best {metric} per epsilon band (eps: max over hospitals, delta {delta:g}; sel. eps:"
           if delta is not None else f"best {metric} (no DP; sel. eps:",
           "  the band's best released after a private selection, docs/private_selection.md)",
           f"{'band':>12}  {'n':>3}  {metric[:12]:>12}  {'accuracy':>8}  {'AUROC':>6}  "
           f"{'eps':>7}  {'sel. eps':>8}  configuration"]
  groups = [("no DP", [r for r in table if r["epsilon"] is None])]
  groups += [(f"({lo:g}, {hi:g}]", [r for r in table if r["epsilon"] is not None
                                     and lo < r["epsilon"] <= hi])
             for lo, hi in bands(sweep_config.epsilon_bands)]
  for label, members in groups:
    scored = [r for r in members if r[metric] is not None]
    if not scored:
      continue
    best = max(scored, key=lambda r: r[metric])
    sel = None
    if label != "no DP":
      sel = selection_epsilon(workdir, members, sweep_config.selection_eta,
                              sweep_config.selection_mean)
    lines.append(f"{label:>12}  {len(members):>3}  {fmt(best[metric]):>12}  "
                 f"{fmt(best['accuracy']):>8}  {fmt(best['auroc']):>6}  "
                 f"{fmt(best['epsilon']):>7}  {fmt(sel):>8}  {best['run']}")
  lines.append("(choosing by test-hospital figures is for reading a sweep, not a private "
               "release)")
  return "\n".join(lines)


def write(workdir: str, table: list[dict], sweep_config) -> str:
  """Writes results.csv/jsonl, privacy_utility.png and summary.txt; returns the summary."""
  axis_names = [k for k in table[0] if k not in METRICS and k not in ("run", CALIBRATED)]
  write_table(workdir, table)
  plot(os.path.join(workdir, "privacy_utility.png"), table, axis_names, sweep_config.metric)
  text = summary_text(workdir, table, sweep_config)
  io.write_atomic(os.path.join(workdir, "summary.txt"), text + "\n")
  return text
