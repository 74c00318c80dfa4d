r"""Round time and peak memory against the cohort and the population (issue 16, item 4).

  python -m benchmarks.scale          # CPU defaults: < 5 min on an idle 2-core CPU
  python -m benchmarks.scale --cohorts=100,1000,10000,100000 \
      --populations=1000,100000,1000000,10000000 --out=benchmarks/results/scale_gpu.json

Two sweeps, each row in a fresh child process (peak RSS only grows within a process):

- cohorts (`--cohorts`) drawn from a population of `--cohort_population` hospitals:
  round time should grow linearly with the cohort;
- populations (`--populations`) at a cohort of `--population_cohort`: host memory
  should stay flat (the population exists only as `data.population=on_demand`'s rule
  plus a few bytes per hospital for the ledger).

Hospitals are tiny (`--examples` synthetic 12x12 images, one local DP-SGD step at
example level, RDP ledger). A row builds the run (`simulation.prepare`), then runs
`--warmup` + `--reps` rounds of the training loop's round (`round.round_step` with
donated state, the ledger charged; no evaluation) and reports: the median timed round,
the seconds of it spent drawing the cohort's hospitals on the host (`take`), setup
seconds, peak host RSS and RSS after setup (MB), the device's peak bytes in use
(`memory_stats`, None on CPU), the strategy, and compilations while timed (should be 0).
Writes JSON (`--out`, default benchmarks/results/scale_<backend>.json) and a PNG beside it.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parent.parent
_COHORTS = flags.DEFINE_list("cohorts", ["100", "1000", "10000"], "Cohort sizes (sweep 1).")
_COHORT_POPULATION = flags.DEFINE_integer("cohort_population", 100_000,
                                          "Population the cohorts of sweep 1 come from.")
_POPULATIONS = flags.DEFINE_list("populations", ["1000", "10000", "100000", "1000000"],
                                 "Population sizes (sweep 2).")
_POPULATION_COHORT = flags.DEFINE_integer("population_cohort", 100, "Cohort of sweep 2.")
_EXAMPLES = flags.DEFINE_integer("examples", 8, "Synthetic images per hospital (all splits).")
_BLOCK = flags.DEFINE_integer(
    "block", 100, "engine.client_block: hospitals per jitted call (0: chosen per backend; "
    "the CPU strategy picks 1, a dispatch per hospital).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed rounds first (the first compiles).")
_REPS = flags.DEFINE_integer("reps", 2, "Timed rounds per row (the median is reported).")
_OUT = flags.DEFINE_string("out", "", "Output JSON (default benchmarks/results/"
                           "scale_<backend>.json); the PNG goes beside it.")
_CHILD = flags.DEFINE_string("child", "", "Internal: run one row (population,cohort).")


def row_config(population: int, cohort: int):
  """The run of one row: `population` tiny on-demand hospitals, `cohort` per round."""
  from experiments import default  # pylint: disable=import-outside-toplevel
  c = default.get_config()
  c.num_clients, c.clients_per_round = population, cohort
  c.data.population, c.data.eval_hospitals, c.data.num_unseen = "on_demand", 8, 0
  c.data.image_size, c.data.examples_per_client, c.data.partition = 12, _EXAMPLES.value, "iid"
  c.model, c.client.batch_size, c.client.local_steps = "cnn", 4, 1
  c.dp.level, c.dp.accountant, c.dp.max_batch_size = "example", "rdp", 0
  c.engine.client_block = _BLOCK.value
  return c


def child(population: int, cohort: int) -> dict:
  """In the child process: build the row's run, time its rounds, report memory."""
  import jax  # pylint: disable=import-outside-toplevel

  from benchmarks import memory, timing  # pylint: disable=import-outside-toplevel
  from fedsim import round as round_lib  # pylint: disable=import-outside-toplevel
  from fedsim import simulation  # pylint: disable=import-outside-toplevel
  timing.listen_for_compiles()
  start = time.perf_counter()
  setup = simulation.prepare(row_config(population, cohort))
  ledger = setup.plan.new_ledger()
  setup_s, rss_setup = time.perf_counter() - start, memory.rss_mb()
  drawing = [0.0]
  take = setup.fed.train.take

  def timed_take(ids):
    t = time.perf_counter()
    out = take(ids)
    drawing[0] += time.perf_counter() - t
    return out

  setup.fed.train.take = timed_take
  state = round_lib.init_state(setup)
  times, draws, compiles = [], [], None
  for r in range(1, _WARMUP.value + _REPS.value + 1):
    if r == _WARMUP.value + 1:
      compiles = dict(timing._compiles)  # pylint: disable=protected-access
    drawing[0], t = 0.0, time.perf_counter()
    state, out = round_lib.round_step(setup, state, r, donate=True)
    ledger.record_round(out.participating)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t)
    draws.append(drawing[0])
  stats = jax.devices()[0].memory_stats() or {}
  return {
      "population": population, "cohort": cohort, "setup_s": setup_s,
      "round_s": statistics.median(times[_WARMUP.value:]),
      "draw_s": statistics.median(draws[_WARMUP.value:]),
      "first_round_s": times[0], "times_s": times,
      "peak_host_mb": memory.peak_rss_mb(), "host_after_setup_mb": rss_setup,
      "device_peak_mb": stats["peak_bytes_in_use"] / 2**20
      if "peak_bytes_in_use" in stats else None,
      "recompiles_while_timed":
          timing._compiles["count"] - compiles["count"],  # pylint: disable=protected-access
      "strategy": {"chunk": setup.strategy.chunk, "block": setup.strategy.block,
                   "devices": setup.strategy.devices},
      "epsilon": ledger.max_epsilon(),
  }


def run_row(population: int, cohort: int) -> dict:
  """One row in a fresh interpreter (same environment and flags)."""
  args = [sys.executable, "-m", "benchmarks.scale", f"--child={population},{cohort}",
          f"--examples={_EXAMPLES.value}", f"--block={_BLOCK.value}",
          f"--warmup={_WARMUP.value}", f"--reps={_REPS.value}"]
  done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, check=False)
  if done.returncode:
    return {"population": population, "cohort": cohort, "error": done.stderr[-2000:]}
  return json.loads(done.stdout.strip().splitlines()[-1])


def environment() -> dict:
  """Device, versions, flags and machine load the numbers came from."""
  import jax  # pylint: disable=import-outside-toplevel

  from fedsim import io  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  return {"device_kind": dev.device_kind, "backend": jax.default_backend(),
          "num_devices": jax.device_count(), "cpu_count": os.cpu_count(),
          "load_average": os.getloadavg(), "versions": io.versions(),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def plot(report: dict, path: pathlib.Path) -> None:
  """Round time against the cohort; peak host memory against the population."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  rows = [r for r in report["cohorts"] if "error" not in r]
  x = [r["cohort"] for r in rows]
  left.loglog(x, [r["round_s"] for r in rows], "o-", label="round")
  left.loglog(x, [r["draw_s"] for r in rows], "s--", label="drawing the cohort's data (host)")
  if rows:
    per = rows[0]["round_s"] / rows[0]["cohort"]
    left.loglog(x, [per * c for c in x], ":", color="grey", label="linear in the cohort")
  left.set(xlabel=f"hospitals per round (population {report['cohort_population']:,})",
           ylabel="seconds per round", title="Round time against the cohort")
  left.legend(fontsize=8)
  rows = [r for r in report["populations"] if "error" not in r]
  x = [r["population"] for r in rows]
  right.semilogx(x, [r["peak_host_mb"] for r in rows], "o-", label="peak host RSS")
  right.semilogx(x, [r["host_after_setup_mb"] for r in rows], "s--", label="RSS after setup")
  if any(r["device_peak_mb"] for r in rows):
    right.semilogx(x, [r["device_peak_mb"] for r in rows], "^-", label="device peak")
  right.set_ylim(bottom=0)
  right.set(xlabel=f"hospitals in the population (cohort {report['population_cohort']})",
            ylabel="MB", title="Memory against the population")
  right.legend(fontsize=8)
  env = report["environment"]
  fig.suptitle(f"{env['device_kind']} ({env['backend']}), {report['examples']} images of "
               f"12x12 a hospital, example-level DP-SGD", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  if _CHILD.value:
    population, cohort = (int(v) for v in _CHILD.value.split(","))
    print(json.dumps(child(population, cohort)))
    return
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  env = environment()
  out = pathlib.Path(_OUT.value or REPO / "benchmarks" / "results" /
                     f"scale_{env['backend']}.json")
  rows = [("cohorts", _COHORT_POPULATION.value, int(c)) for c in _COHORTS.value]
  rows += [("populations", int(p), _POPULATION_COHORT.value) for p in _POPULATIONS.value]
  report = {"environment": env, "examples": _EXAMPLES.value, "warmup": _WARMUP.value,
            "reps": _REPS.value, "cohort_population": _COHORT_POPULATION.value,
            "population_cohort": _POPULATION_COHORT.value, "cohorts": [], "populations": []}
  for sweep, population, cohort in tqdm(rows, desc="rows"):
    row = run_row(population, cohort)
    report[sweep].append(row)
    tqdm.write(json.dumps({k: v for k, v in row.items() if k != "times_s"})[:400])
  report["environment"]["load_average_after"] = os.getloadavg()
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2) + "\n")
  plot(report, out.with_suffix(".png"))
  print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
  app.run(main)
