"""The report of a round-throughput run: ratios, the JSON record, the tables, the plot.

The JSON record (`build`) holds the device, versions, XLA_FLAGS, the workload, every row
and `ratios`; it is written with `fedsim.io.write_json_atomic` (the project's one JSON
writer: NaN and inf become null) after every row, `"complete": false` until the end, so
an interrupted run keeps what it measured. `markdown` renders it as the README tables,
`plot` as round seconds per chunk size.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib
import platform
import sys
from typing import Optional

import jax

from benchmarks import workload
from fedsim import io, strategy

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def log(*args) -> None:
  """Progress and tables go to stderr (stdout carries the JSON)."""
  print(*args, file=sys.stderr, flush=True)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
  return a / b if a is not None and b else None


def ratios(results: dict, default_name: str, central_batch: int) -> dict:
  """Time ratios (`x_over_y` = how many times longer x takes than y).

  `central` is the fastest centralised row at the reference batch `central_batch` (the
  first --central_batch), `central_best` the fastest centralised row of all.
  """
  t = lambda name: results.get(name, {}).get("round_s")
  default = t(default_name)
  loop = t(f"loop/{results.get(default_name, {}).get('conv', 'xla')}")
  timed = {n: r for n, r in results.items() if "round_s" in r}
  fastest = lambda rows: min(rows, key=lambda n: rows[n]["round_s"]) if rows else None
  centrals = {n: r for n, r in timed.items() if r["kind"] == "central"}
  ref_name = fastest({n: r for n, r in centrals.items()
                      if n.endswith(f"/b{central_batch}")})
  best_name = fastest(centrals)
  central, central_best = t(ref_name), t(best_name)
  out = {"engine_default": default_name, "engine_default_round_s": default,
         "central": ref_name, "central_best": best_name,
         "engine_default_over_loop": _ratio(default, loop),
         "engine_default_over_central": _ratio(default, central),
         "engine_default_over_central_best": _ratio(default, central_best),
         "loop_over_central": _ratio(loop, central),
         "loop_over_central_best": _ratio(loop, central_best)}
  engines = {n: r for n, r in timed.items() if n.startswith("engine/")}
  if engines:
    best = fastest(engines)
    b = engines[best]
    out["best_engine"] = {"row": best, "chunk": b["chunk"], "block": b["block"],
                          "conv": b["conv"], "round_s": b["round_s"],
                          "default_over_best": _ratio(default, b["round_s"]),
                          "best_over_loop": _ratio(b["round_s"], loop),
                          "best_over_central": _ratio(b["round_s"], central),
                          "best_over_central_best": _ratio(b["round_s"], central_best)}
  for prefix in sorted({n.split("/")[0] for n in results if n.startswith("dp_")}):
    eng, dp_loop = t(f"{prefix}/engine"), t(f"{prefix}/loop")
    rotation = results.get(f"{prefix}/engine", {}).get("nonprivate_round_s_in_rotation")
    out[prefix] = {"engine_round_s": eng, "loop_round_s": dp_loop,
                   "engine_over_nonprivate_engine": _ratio(eng, default),
                   "engine_over_nonprivate_in_rotation": _ratio(eng, rotation),
                   "engine_over_central": _ratio(eng, central),
                   "engine_over_central_best": _ratio(eng, central_best),
                   "engine_over_dp_loop": _ratio(eng, dp_loop),
                   "dp_loop_over_nonprivate_loop": _ratio(dp_loop, loop)}
  return out


def environment(s: workload.Settings) -> dict:
  """Device, versions and flags the numbers came from."""
  cpu_model = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu_model = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  dev = jax.devices()[0]
  return {
      "device": {"device_kind": dev.device_kind, "backend": jax.default_backend(),
                 "num_devices": jax.device_count(), "cpu_model": cpu_model,
                 "cpu_count": os.cpu_count(),
                 "cpus_usable": len(os.sched_getaffinity(0))
                 if hasattr(os, "sched_getaffinity") else None,
                 "platform": platform.platform()},
      "versions": io.versions(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "jax_env": {k: v for k, v in os.environ.items()
                  if k.startswith(("JAX_", "XLA_PYTHON", "TF_CPP"))},
      "workload": {"hospitals": s.hospitals, "examples_per_client": s.examples,
                   "image_shape": [s.image_size, s.image_size, 1], "num_classes": s.classes,
                   "model": "cnn (SmallCNN)", "local_epochs": s.epochs,
                   "batch_size": s.batch_size, "client_optimizer": "sgd",
                   "client_lr": s.lr, "server": "fedavg",
                   "examples_per_round": s.examples_per_round,
                   "dp": {"noise_multiplier": s.noise_multiplier, "clip_norm": s.clip_norm,
                          "max_batch_size": s.dp_max_batch_size,
                          "microbatch_size": s.dp_microbatch_size}},
      "settings": {"reps": s.reps, "warmup": s.warmup, "stat": s.stat, "unroll": s.unroll,
                   "chunks": list(s.chunks), "conv": list(s.convs), "rows": list(s.patterns),
                   "central_batch": list(s.central_batches), "quick": s.quick},
  }


def _fmt(x: Optional[float], spec: str = ".3f") -> str:
  return "n/a" if x is None else format(x, spec)


def markdown(report: dict) -> str:
  """The human-readable tables (README-ready)."""
  rows, ratio = report["rows"], report["ratios"]
  default = rows.get(ratio["engine_default"], {}).get("round_s")
  dev = report["device"]
  lines = [f"Device: {dev['device_kind']} ({dev['backend']}, {dev['cpus_usable']} CPUs "
           f"usable, {dev['cpu_model']}); jax {report['versions']['jax']}; "
           f"XLA_FLAGS={report['xla_flags']!r}; {report['settings']['stat']} of "
           f"{report['settings']['reps']} rounds.", "",
           "| row | chunk | block | calls | clients | conv | round s | examples/s | compile s "
           "| x default |", "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
  for name, r in rows.items():
    if r["kind"] == "memory":
      continue
    if "error" in r:
      lines.append(f"| {name} | | | | | | error: {r['error'][:60]} | | | |")
      continue
    mark = " (default)" if name == ratio["engine_default"] else ""
    lines.append(
        f"| {name}{mark} | {r.get('chunk', '')} | {r.get('block', '')} | "
        f"{r.get('calls_per_round', '')} | {r.get('clients_computed', '')} | {r['conv']} | "
        f"{r['round_s']:.3f} | {r['examples_per_s']:,.0f} | {r['compile_s']:.1f} | "
        f"{_fmt(_ratio(r['round_s'], default), '.2f')} |")
  lines += ["", f"engine (default) / loop: {_fmt(ratio['engine_default_over_loop'], '.2f')};"
            f"  engine (default) / centralised ({ratio['central']}): "
            f"{_fmt(ratio['engine_default_over_central'], '.2f')}, / fastest centralised "
            f"({ratio['central_best']}): {_fmt(ratio['engine_default_over_central_best'], '.2f')};"
            f"  loop / centralised: {_fmt(ratio['loop_over_central'], '.2f')}"]
  if "best_engine" in ratio:
    b = ratio["best_engine"]
    lines.append(f"best engine row: {b['row']} ({b['round_s']:.3f} s; default / best "
                 f"{_fmt(b['default_over_best'], '.2f')})")
  for key, r in ratio.items():
    if key.startswith("dp_"):
      lines.append(f"{key} engine: / non-private engine "
                   f"{_fmt(r['engine_over_nonprivate_engine'], '.2f')} (in rotation with "
                   f"it: {_fmt(r['engine_over_nonprivate_in_rotation'], '.2f')}), / centralised "
                   f"{_fmt(r['engine_over_central'], '.2f')} (fastest "
                   f"{_fmt(r['engine_over_central_best'], '.2f')}), / same DP client in a "
                   f"Python loop {_fmt(r['engine_over_dp_loop'], '.2f')}")
  memory = [(n, r) for n, r in rows.items() if r["kind"] == "memory"]
  if memory:
    lines += ["", "| hospitals | chunk | block | host data MB | peak RSS MB | "
              "RSS after setup MB | device peak MB | round s |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in memory:
      if "error" in r:
        lines.append(f"| {name} | error: {r['error'][:60]} | | | | | | |")
        continue
      dpk = r["device_peak_bytes_in_use"]
      lines.append(f"| {r['hospitals']} | {r['chunk']} | {r['block']} | "
                   f"{r['host_data_mb']:.1f} | {r['peak_rss_mb']:.0f} | "
                   f"{_fmt(r['rss_after_setup_mb'], '.0f')} | "
                   f"{_fmt(dpk / 2**20 if dpk else None, '.0f')} | {r['round_s']:.3f} |")
  return "\n".join(lines)


def plot(report: dict, path: pathlib.Path) -> None:
  """Round seconds per chunk size; the loop and centralised rows as horizontal lines."""
  import matplotlib
  import matplotlib.ticker
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows, work = report["rows"], report["workload"]
  engines = [r for n, r in rows.items() if n.startswith("engine/") and "round_s" in r]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  colors = {}
  for conv in sorted({r["conv"] for r in engines}):
    for mode, keep in (("block = chunk", lambda r: r["block"] == r["chunk"]),
                       ("block = cohort", lambda r: r["calls_per_round"] == 1)):
      pts = sorted((r["chunk"], r["round_s"]) for r in engines if r["conv"] == conv and keep(r))
      if pts:
        xs, ys = zip(*pts, strict=True)
        line, = ax.plot(xs, ys, marker="o", linestyle="-" if "chunk" in mode else "--",
                        color=colors.get(conv), label=f"engine {conv}, {mode}")
        colors.setdefault(conv, line.get_color())
  for name, r in rows.items():
    if "round_s" in r and r["kind"] in ("loop", "central") and r.get("dp", "none") == "none":
      loop = r["kind"] == "loop"
      ax.axhline(r["round_s"], linestyle=":" if loop else "-.",
                 color=colors.get(r["conv"], "grey") if loop else "black",
                 alpha=1.0 if loop or r["conv"] == "xla" else 0.5,
                 label=f"{name} ({r['round_s']:.2f} s)")
  default = rows.get(report["ratios"]["engine_default"], {})
  if "round_s" in default:
    ax.plot([default["chunk"]], [default["round_s"]], marker="*", markersize=14,
            color="black", linestyle="none", label="default strategy")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  chunks = sorted({r["chunk"] for r in engines})
  ax.set_xticks(chunks, [str(c) for c in chunks])
  ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
  ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
  ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
  ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.set_xlabel("clients vmapped at once (chunk)")
  ax.set_ylabel("seconds per round")
  dev = report["device"]
  ax.set_title(f"one round, {work['hospitals']} hospitals x {work['examples_per_client']} "
               f"images, on {dev['device_kind']} ({dev['backend']})", fontsize=10)
  ax.legend(fontsize=7)
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def output_path(out: str, s: workload.Settings) -> pathlib.Path:
  """`out`, or benchmarks/results/round_throughput_<backend>[_quick].json."""
  if out:
    return pathlib.Path(out)
  suffix = "_quick" if s.quick else ""
  return RESULTS / f"round_throughput_{jax.default_backend()}{suffix}.json"


def build(s: workload.Settings, results: dict, *, default: strategy.Strategy,
          default_row: str, complete: bool, load_start: tuple, wall_s: float) -> dict:
  """The JSON record of a run from its rows so far (`complete` once every row ran)."""
  return {"benchmark": "round_throughput", "complete": complete,
          "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          "argv": sys.argv[1:], **environment(s),
          "default_strategy": dataclasses.asdict(default),
          "rows": results, "ratios": ratios(results, default_row, s.central_batches[0]),
          "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
          "wall_s": wall_s}


def save(path: pathlib.Path, report: dict) -> None:
  """Writes `report` to `path` atomically (a crash leaves the previous version)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  io.write_json_atomic(str(path), report)
