"""Round throughput: the engine against a Python loop of clients and centralised training.

Workload W1 (shared/DESIGN.md, "Performance"): 100 hospitals x 64 random uint8 images
28x28x1, 3 classes, the small CNN, one local epoch at batch 16 (4 local steps), client SGD
lr 0.1, FedAvg. One run measures, on one device:

  engine/{conv}/c{chunk}/b{block}  one round as `simulation.train` runs it: a
      `simulation.Setup` (rounds.make_block_fn) with `engine.client_chunk=chunk`,
      `engine.client_block=block`, `engine.conv=conv`, then rounds.run_cohort,
      plan.finalize and the server step. `b{chunk}` is a Python loop of jitted vmapped
      chunk calls, `b{cohort}` one call per round with the chunks scanned in-graph (a block
      that is not a multiple of the chunk is padded up to one: see `clients_computed`).
  loop/{conv}          the same client function (`make_client_update`, same schedule and
      unroll) jitted with its weighted accumulation and called once per hospital from
      Python, on per-client data sliced onto the device before timing.
  central/{conv}/b{batch}  centralised non-private SGD on the same examples: jitted steps of
      each `--central_batch` (4 x 1,600 on W1; also 100 x 64, because on XLA:CPU the large
      batch is not the fastest way through the same examples), batches already on device.
  dp_example_{clip}/engine|loop  example-level DP-SGD exactly as `privacy_plan.make_plan`
      builds it (Poisson sampling with expected batch 16, clip 1, noise multiplier 1,
      clipping "vmap" or "ghost"), in the engine at the default strategy and in the loop.
  dp_client/engine|loop  client-level DP (`clip_delta` on each delta, server noise once per
      round; cohort sampling rate 1, so every hospital trains as in W1).
  memory/{hospitals}   peak RSS (and device peak bytes where jax reports them) of a fresh
      process that builds the federation and runs two rounds at the default strategy.

Round seconds exclude the accountant, evaluation and metric writing. Each timed row runs
`--warmup` rounds (the first compiles; `compile_s` = first round - median round,
`xla_compile_s` = XLA's own compile time from jax.monitoring), then `--reps` rounds;
`round_s` is their minimum (`--stat=median` for the median; both are written). The default
engine row (`strategy.resolve` without overrides) always runs: every ratio refers to it.

  python -m benchmarks.round_throughput                # everything (tens of minutes on CPU)
  python -m benchmarks.round_throughput --quick        # smoke test (~2 min on 2 CPU cores)
  python -m benchmarks.round_throughput --rows='engine/*,loop/*,central/*' --conv=patches
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python -m benchmarks.round_throughput

Prints one JSON object on stdout (also written to --out), a markdown table on stderr, and
plots round seconds per chunk size to a PNG beside the JSON.
"""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import functools
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from experiments import default as default_experiment
from fedsim import client as client_lib
from fedsim import config as config_lib
from fedsim import models, rounds, server, simulation, strategy
from fedsim.data.base import ClientArrays, FederatedData

_HOSPITALS = flags.DEFINE_integer("hospitals", 100, "Hospitals in the federation (all train).")
_EXAMPLES = flags.DEFINE_integer("examples_per_client", 64, "Images per hospital.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 28, "Image side (1 channel).")
_CLASSES = flags.DEFINE_integer("num_classes", 3, "Classes.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Local batch (expected batch for DP-SGD).")
_EPOCHS = flags.DEFINE_integer("local_epochs", 1, "Local epochs.")
_LR = flags.DEFINE_float("learning_rate", 0.1, "Client (and centralised) SGD learning rate.")
_CHUNKS = flags.DEFINE_list("chunks", ["1", "4", "16", "100"],
                            "Client chunk sizes of the engine rows (capped at the cohort).")
_CONV = flags.DEFINE_list("conv", ["xla", "patches"], "Convolution lowerings to measure.")
_UNROLL = flags.DEFINE_integer("unroll", 0, "Local-step unroll (0: the backend's default).")
_REPS = flags.DEFINE_integer("reps", 3, "Timed rounds per row, after the warm-up.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed rounds per row (the first compiles).")
_STAT = flags.DEFINE_enum("stat", "min", ["min", "median"], "Statistic of the timed rounds.")
_CENTRAL_BATCH = flags.DEFINE_list(
    "central_batch", ["1600", "64"], "Centralised batch sizes; the first is the reference of "
    "the `*_over_central` ratios (`*_over_central_best`: the fastest centralised row).")
_DP_CLIPPING = flags.DEFINE_list("dp_clipping", ["vmap", "ghost"],
                                 "Example-level DP clipping methods (dp.clipping).")
_NOISE = flags.DEFINE_float("noise_multiplier", 1.0, "dp.noise_multiplier.")
_CLIP = flags.DEFINE_float("clip_norm", 1.0, "dp.clip_norm (per example, or per delta).")
_DP_GATHER = flags.DEFINE_integer(
    "dp_max_batch_size", 0, "dp.max_batch_size: 0 exact Poisson (a mask over every local "
    "example each step), > 0 a truncated gather of that many examples per step.")
_DP_MICRO = flags.DEFINE_integer("dp_microbatch_size", 0, "dp.microbatch_size (0: none).")
_MEM_SIZES = flags.DEFINE_list("memory_sizes", ["25", "50", "100", "200"],
                               "Hospital counts of the memory rows (a fresh process each).")
_MEM_CHUNK = flags.DEFINE_integer(
    "memory_chunk", 0, "engine.client_chunk (= client_block) of the memory rows; 0: the "
    "default strategy; larger than the cohort: the whole cohort vmapped.")
_ROWS = flags.DEFINE_list(
    "rows", ["*"], "Rows to run: fnmatch patterns, e.g. 'engine/xla/*,loop/*,dp_client/*,"
    "memory/*'. Groups: engine, loop, central, dp_example_vmap, dp_example_ghost, "
    "dp_client, memory.")
_OUT = flags.DEFINE_string(
    "out", "", "JSON path; default benchmarks/results/round_throughput_<backend>[_quick].json.")
_PLOT = flags.DEFINE_bool("plot", True, "Write the PNG (the JSON path with .png).")
_QUICK = flags.DEFINE_bool(
    "quick", False, "Smoke test of every code path, not a measurement: 8 hospitals x 32 "
    "images (2 local steps, so compiles are shorter), 1 rep, chunks 4, conv xla, memory "
    "sizes 8,16 (each unless given explicitly).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random data, params and keys.")
_MEMORY_CHILD = flags.DEFINE_integer("memory_child", 0, "Internal: run one memory row.")

REPO = pathlib.Path(__file__).resolve().parent.parent
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = {"seconds": 0.0, "count": 0}  # XLA compilations seen by the listener


def _on_duration(event: str, duration: float, **kwargs) -> None:
  del kwargs
  if event == COMPILE_EVENT:
    _compiles["seconds"] += duration
    _compiles["count"] += 1


def log(*args) -> None:
  print(*args, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Settings:
  """The resolved flags of one run (after --quick)."""

  hospitals: int
  examples: int
  image_size: int
  classes: int
  batch_size: int
  epochs: int
  lr: float
  chunks: tuple[int, ...]
  convs: tuple[str, ...]
  unroll: int
  reps: int
  warmup: int
  stat: str
  central_batches: tuple[int, ...]
  dp_clipping: tuple[str, ...]
  memory_sizes: tuple[int, ...]
  patterns: tuple[str, ...]
  quick: bool
  seed: int

  @property
  def examples_per_round(self) -> int:
    return self.hospitals * self.examples


def settings_from_flags() -> Settings:
  """Flags -> Settings; --quick changes the defaults of the flags not given."""
  quick = _QUICK.value
  pick = lambda flag, small: small if quick and not flag.present else flag.value
  return Settings(
      hospitals=pick(_HOSPITALS, 8), examples=pick(_EXAMPLES, 32),
      image_size=_IMAGE_SIZE.value, classes=_CLASSES.value, batch_size=_BATCH.value,
      epochs=_EPOCHS.value, lr=_LR.value, chunks=tuple(int(c) for c in pick(_CHUNKS, ["4"])),
      convs=tuple(pick(_CONV, ["xla"])), unroll=_UNROLL.value, reps=pick(_REPS, 1),
      warmup=max(1, _WARMUP.value), stat=_STAT.value,
      central_batches=tuple(int(b) for b in _CENTRAL_BATCH.value),
      dp_clipping=tuple(_DP_CLIPPING.value),
      memory_sizes=tuple(int(k) for k in pick(_MEM_SIZES, ["8", "16"])),
      patterns=tuple(_ROWS.value), quick=quick, seed=_SEED.value)


# ------------------------------------------------------------------------------ workload


@functools.lru_cache(maxsize=None)
def federation(hospitals: int, examples: int, image_size: int, classes: int,
               seed: int) -> FederatedData:
  """W1's federation: random uint8 images `[hospitals, examples, H, W, 1]`, random labels,
  every hospital full (no padding), one patient per image."""
  rng = np.random.default_rng(seed)
  shape = (hospitals, examples, image_size, image_size, 1)
  arrays = ClientArrays(
      images=rng.integers(0, 256, shape, dtype=np.uint8),
      labels=rng.integers(0, classes, (hospitals, examples)).astype(np.int32),
      patients=np.tile(np.arange(examples, dtype=np.int32), (hospitals, 1)),
      counts=np.full(hospitals, examples, np.int32),
      num_patients=np.full(hospitals, examples, np.int32))
  names = tuple(f"class{i}" for i in range(classes))
  return FederatedData(train=arrays, val=arrays, test=arrays, unseen=None,
                       class_names=names, name="w1_random", mean=0.5, std=0.25)


def make_config(s: Settings, *, hospitals: int, chunk: int = 0, block: int = 0,
                conv: str = "auto", dp: str = "none", clipping: str = "vmap"):
  """experiments/default.py changed to W1 and one engine / privacy choice (validated)."""
  c = default_experiment.get_config()
  c.seed = s.seed
  c.num_clients = c.clients_per_round = hospitals
  c.client_sampling_rate = 1.0 if dp == "client" else 0.0  # DP-FedAvg: Poisson cohorts
  c.model = "cnn"
  c.data.image_size, c.data.num_unseen = s.image_size, 0
  c.client.local_epochs, c.client.batch_size = s.epochs, s.batch_size
  c.client.local_steps = 0  # W1: epochs, not the default config's fixed DP steps
  c.client.optimizer, c.client.learning_rate = "sgd", s.lr
  c.server.optimizer, c.server.learning_rate = "fedavg", 1.0
  c.dp.level, c.dp.clipping = dp, clipping
  c.dp.noise_multiplier, c.dp.clip_norm = _NOISE.value, _CLIP.value
  c.dp.max_batch_size, c.dp.microbatch_size = _DP_GATHER.value, _DP_MICRO.value
  c.engine.client_chunk, c.engine.client_block = chunk, block
  c.engine.conv, c.engine.unroll = conv, s.unroll
  config_lib.validate(c)
  return c


def default_strategy(s: Settings, hospitals: Optional[int] = None) -> strategy.Strategy:
  """`strategy.resolve` without engine overrides (but --unroll), as a run would get it."""
  hospitals = hospitals or s.hospitals
  config = make_config(s, hospitals=hospitals)
  steps = client_lib.LocalSchedule(max_examples=s.examples, batch_size=s.batch_size,
                                   epochs=s.epochs).num_steps
  return strategy.resolve(config.engine, cohort_size=hospitals, num_steps=steps)


def build_setup(s: Settings, *, hospitals: int, **config_kwargs):
  """A `simulation.Setup` (the engine exactly as a run builds it) and initial params."""
  config = make_config(s, hospitals=hospitals, **config_kwargs)
  fed = federation(hospitals, s.examples, s.image_size, s.classes, s.seed)
  setup = simulation.Setup(config, fed)
  return setup, setup.init_params(jax.random.key(s.seed))


# ------------------------------------------------------------------------------ rounds


def engine_round_fn(setup: simulation.Setup, params) -> Callable[[int], Any]:
  """One round of `simulation.train`: run_cohort, finalize, server step (no accounting)."""
  opt_state = setup.server_opt.init(params)
  cohort = np.arange(setup.config.num_clients)
  seed_key = jax.random.key(setup.config.seed)

  def one_round(r: int):
    round_key = jax.random.fold_in(seed_key, r)
    result = rounds.run_cohort(setup.block_fn, params, setup.fed.train, cohort,
                               block=setup.strategy.block,
                               round_key=jax.random.fold_in(round_key, 0),
                               hparams=setup.hparams)
    mean_delta = setup.plan.finalize(result, jax.random.fold_in(round_key, 1), setup.hparams)
    new_params, _ = setup.server_step(params, opt_state, mean_delta)
    return jax.block_until_ready(new_params)

  return one_round


def loop_round_fn(setup: simulation.Setup, params) -> Callable[[int], Any]:
  """The same round with hospitals run one by one: one jitted client call per hospital.

  The client function is `make_client_update` with the Setup's gradient, sampler and
  schedule (so the same unroll), then the plan's delta transform and the weighted
  accumulation, metrics included (so nothing the engine computes is dead code here).
  Per-client data and keys are put on the device before timing.
  """
  plan, fed = setup.plan, setup.fed
  client_update = client_lib.make_client_update(
      setup.apply_fn, plan.grad_fn, schedule=setup.schedule,
      optimizer=setup.config.client.optimizer, mean=fed.mean, std=fed.std,
      sampler=plan.sampler)

  def client_sums(params, data, key, hparams) -> rounds.ChunkResult:
    delta, metrics = client_update(params, data, key, hparams)
    if plan.delta_transform is not None:
      delta, stats = plan.delta_transform(delta, hparams)
      metrics = {**metrics, **stats}
    w = server.client_weights(data.count, jnp.bool_(True), plan.weighting)
    return rounds.ChunkResult(jax.tree.map(lambda d: w * d, delta), w, metrics)

  @jax.jit
  def step(total, params, data, key, hparams) -> rounds.ChunkResult:
    return jax.tree.map(jnp.add, total, client_sums(params, data, key, hparams))

  data = rounds.client_data(fed.train)
  per_client = [jax.device_put(jax.tree.map(lambda a, k=k: a[k], data))
                for k in range(fed.num_clients)]
  seed_key = jax.random.key(setup.config.seed)
  keys = rounds.client_keys(seed_key, np.arange(fed.num_clients))  # same every round:
  keys = [keys[k] for k in range(fed.num_clients)]                  # timing ignores values
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(
      client_sums, params, per_client[0], keys[0], setup.hparams))
  opt_state = setup.server_opt.init(params)

  def one_round(r: int):
    total = zeros
    for k in range(fed.num_clients):
      total = step(total, params, per_client[k], keys[k], setup.hparams)
    round_key = jax.random.fold_in(seed_key, r)
    mean_delta = plan.finalize(total, jax.random.fold_in(round_key, 1), setup.hparams)
    new_params, _ = setup.server_step(params, opt_state, mean_delta)
    return jax.block_until_ready(new_params)

  return one_round


def central_round_fn(s: Settings, conv: str,
                     batch_size: int) -> tuple[Callable[[int], Any], dict]:
  """Centralised non-private SGD over the federation's examples: jitted batch steps."""
  fed = federation(s.hospitals, s.examples, s.image_size, s.classes, s.seed)
  model = models.make_model("cnn", num_classes=s.classes, conv=conv)
  params = model.init(jax.random.key(s.seed), jnp.zeros((1,) + fed.image_shape))
  opt = optax.sgd(s.lr)
  opt_state = opt.init(params)
  n = s.examples_per_round
  steps = max(1, round(n / batch_size))
  batch = n // steps  # W1: 4 x 1600; the remainder (if any) is dropped and reported
  images = fed.train.images.reshape((n,) + fed.image_shape)[:steps * batch]
  labels = fed.train.labels.reshape(n)[:steps * batch]
  batches = [(jax.device_put(images[i * batch:(i + 1) * batch]),
              jax.device_put(labels[i * batch:(i + 1) * batch])) for i in range(steps)]

  @jax.jit
  def train_step(params, opt_state, x, y):
    def loss(p):
      logits = model.apply(p, client_lib.normalize(x, fed.mean, fed.std))
      return jnp.mean(client_lib.cross_entropy(logits, y))
    updates, opt_state = opt.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def one_round(r: int):
    del r
    p, o = params, opt_state
    for x, y in batches:
      p, o = train_step(p, o, x, y)
    return jax.block_until_ready(p)

  return one_round, {"conv": conv, "calls_per_round": steps, "batch": batch,
                     "examples_computed": steps * batch}


def time_rounds(one_round: Callable[[int], Any], s: Settings) -> dict:
  """Warm-up rounds (compilation) then `s.reps` timed rounds of `one_round`."""
  before = dict(_compiles)
  warm = []
  for r in range(s.warmup):
    start = time.perf_counter()
    one_round(r)
    warm.append(time.perf_counter() - start)
  after_warmup = dict(_compiles)
  times = []
  for r in range(s.reps):
    start = time.perf_counter()
    one_round(s.warmup + r)
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  return {
      "round_s": min(times) if s.stat == "min" else median,
      "round_s_min": min(times), "round_s_median": median, "times_s": times,
      "first_round_s": warm[0], "compile_s": max(0.0, warm[0] - median),
      "xla_compile_s": after_warmup["seconds"] - before["seconds"],
      "xla_compiles": after_warmup["count"] - before["count"],
      "recompiles_while_timed": _compiles["count"] - after_warmup["count"],
  }


# ------------------------------------------------------------------------------ rows


@dataclasses.dataclass(frozen=True)
class Row:
  """One measurement. `chunk`/`block`/`conv` 0/"auto": the default strategy."""

  name: str
  kind: str  # engine | loop | central | memory
  conv: str = "auto"
  chunk: int = 0
  block: int = 0
  dp: str = "none"
  clipping: str = "vmap"
  hospitals: int = 0  # memory rows
  batch: int = 0      # central rows


def engine_row(conv: str, chunk: int, block: int) -> Row:
  return Row(f"engine/{conv}/c{chunk}/b{block}", "engine", conv, chunk, block)


def plan_rows(s: Settings, default: strategy.Strategy) -> list[Row]:
  """Every row the flags ask for; the default engine row first, always."""
  k = s.hospitals
  rows = [engine_row(default.conv, default.chunk, default.block)]
  for conv in s.convs:
    for chunk in sorted({min(c, k) for c in s.chunks}):
      rows += [engine_row(conv, chunk, b) for b in sorted({chunk, k})]
  rows += [Row(f"loop/{conv}", "loop", conv, 1, 1) for conv in s.convs]
  rows += [Row(f"central/{conv}/b{b}", "central", conv, batch=b)
           for b in s.central_batches for conv in s.convs]
  for clip in s.dp_clipping:
    rows += [Row(f"dp_example_{clip}/{kind}", kind, dp="example", clipping=clip)
             for kind in ("engine", "loop")]
  rows += [Row(f"dp_client/{kind}", kind, dp="client") for kind in ("engine", "loop")]
  rows += [Row(f"memory/{h}", "memory", hospitals=h) for h in s.memory_sizes]
  unique = list(dict.fromkeys(rows))
  chosen = [r for r in unique[1:] if any(fnmatch.fnmatch(r.name, p) for p in s.patterns)]
  return [unique[0]] + [r for r in chosen if r.name != unique[0].name]


def run_timed_row(row: Row, s: Settings) -> dict:
  """Builds and times one engine / loop / central row."""
  if row.kind == "central":
    one_round, info = central_round_fn(s, row.conv, row.batch)
  else:
    setup, params = build_setup(s, hospitals=s.hospitals, chunk=row.chunk, block=row.block,
                                conv=row.conv, dp=row.dp, clipping=row.clipping)
    st = setup.strategy
    info = {"conv": st.conv, "unroll": st.unroll, "dp": row.dp,
            "privacy_unit": setup.plan.unit, "local_steps": setup.schedule.num_steps}
    if row.dp == "example":
      info.update(clipping=row.clipping, dp_max_batch_size=setup.config.dp.max_batch_size)
    if row.kind == "engine":
      blocks = -(-s.hospitals // st.block)
      info.update(chunk=st.chunk, block=st.block, calls_per_round=blocks,
                  clients_computed=blocks * st.block)
      one_round = engine_round_fn(setup, params)
    else:
      info.update(calls_per_round=s.hospitals, clients_computed=s.hospitals)
      one_round = loop_round_fn(setup, params)
  timing = time_rounds(one_round, s)
  return {"kind": row.kind, **info, **timing,
          "examples_per_s": s.examples_per_round / timing["round_s"]}


def rss_mb() -> Optional[float]:
  """Current resident set size in MB (Linux), else None."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
  except (OSError, ValueError):
    return None


def peak_rss_mb() -> float:
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KiB


def memory_child(s: Settings, hospitals: int) -> dict:
  """In a fresh process: build the federation and run two engine rounds; report memory."""
  chunk = _MEM_CHUNK.value
  rss_start = rss_mb()
  setup, params = build_setup(s, hospitals=hospitals, chunk=chunk, block=chunk)
  one_round = engine_round_fn(setup, params)
  rss_ready, peak_ready = rss_mb(), peak_rss_mb()
  timing = time_rounds(one_round, dataclasses.replace(s, warmup=1, reps=1))
  stats = jax.devices()[0].memory_stats() or {}
  train = setup.fed.train
  return {
      "hospitals": hospitals, "chunk": setup.strategy.chunk, "block": setup.strategy.block,
      "conv": setup.strategy.conv, "host_data_mb": sum(
          getattr(train, f.name).nbytes for f in dataclasses.fields(train)) / 2**20,
      "rss_at_start_mb": rss_start, "rss_after_setup_mb": rss_ready,
      "peak_rss_before_round_mb": peak_ready, "peak_rss_mb": peak_rss_mb(),
      "rss_after_rounds_mb": rss_mb(),
      "device_peak_bytes_in_use": stats.get("peak_bytes_in_use"),
      "device_bytes_limit": stats.get("bytes_limit"),
      "first_round_s": timing["first_round_s"], "round_s": timing["round_s"],
  }


def run_memory_row(row: Row, s: Settings) -> dict:
  """Runs `memory_child` for `row.hospitals` in a fresh interpreter (same env, XLA_FLAGS)."""
  passed = {"examples_per_client": s.examples, "image_size": s.image_size,
            "num_classes": s.classes, "batch_size": s.batch_size, "local_epochs": s.epochs,
            "learning_rate": s.lr, "unroll": s.unroll, "memory_chunk": _MEM_CHUNK.value,
            "seed": s.seed, "memory_child": row.hospitals}
  cmd = [sys.executable, "-m", "benchmarks.round_throughput"] + [
      f"--{k}={v}" for k, v in passed.items()]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
  if proc.returncode != 0:
    raise RuntimeError(f"memory child failed ({proc.returncode}): {proc.stderr[-2000:]}")
  return {"kind": "memory", **json.loads(proc.stdout.strip().splitlines()[-1])}


def run_rows(rows: list[Row], s: Settings,
             after_row: Callable[[dict], None] = lambda results: None) -> dict:
  """Runs every row in order; a failing row records its error and the run goes on.

  `after_row(results so far)` runs after each row (the partial report is saved there).
  """
  results = {}
  for i, row in enumerate(rows):
    log(f"[{i + 1}/{len(rows)}] {row.name} ...")
    start = time.perf_counter()
    try:
      run = run_memory_row if row.kind == "memory" else run_timed_row
      results[row.name] = run(row, s)
    except Exception as e:  # noqa: BLE001  (a benchmark reports failures, it goes on)
      results[row.name] = {"kind": row.kind, "error": f"{type(e).__name__}: {e}"}
      log(traceback.format_exc())
    r = results[row.name]
    summary = (f"error: {r['error']}" if "error" in r else
               f"peak RSS {r['peak_rss_mb']:.0f} MB" if row.kind == "memory" else
               f"round {r['round_s']:.3f} s, compile {r['compile_s']:.1f} s")
    log(f"    {summary}  ({time.perf_counter() - start:.1f} s)")
    after_row(results)
  return results


# ------------------------------------------------------------------------------ report


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
    out[prefix] = {"engine_round_s": eng, "loop_round_s": dp_loop,
                   "engine_over_nonprivate_engine": _ratio(eng, default),
                   "engine_over_central": _ratio(eng, central),
                   "engine_over_central_best": _ratio(eng, central_best),
                   "engine_over_dp_loop": _ratio(eng, dp_loop),
                   "dp_loop_over_nonprivate_loop": _ratio(dp_loop, loop)}
  return out


def environment(s: Settings) -> dict:
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
      "versions": {"python": platform.python_version(), "jax": jax.__version__,
                   "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
                   "flax": flax.__version__, "optax": optax.__version__,
                   "numpy": np.__version__},
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "jax_env": {k: v for k, v in os.environ.items()
                  if k.startswith(("JAX_", "XLA_PYTHON", "TF_CPP"))},
      "workload": {"hospitals": s.hospitals, "examples_per_client": s.examples,
                   "image_shape": [s.image_size, s.image_size, 1], "num_classes": s.classes,
                   "model": "cnn (SmallCNN)", "local_epochs": s.epochs,
                   "batch_size": s.batch_size, "client_optimizer": "sgd",
                   "client_lr": s.lr, "server": "fedavg",
                   "examples_per_round": s.examples_per_round,
                   "dp": {"noise_multiplier": _NOISE.value, "clip_norm": _CLIP.value,
                          "max_batch_size": _DP_GATHER.value,
                          "microbatch_size": _DP_MICRO.value}},
      "settings": {"reps": s.reps, "warmup": s.warmup, "stat": s.stat, "unroll": s.unroll,
                   "chunks": list(s.chunks), "conv": list(s.convs), "rows": list(s.patterns),
                   "central_batch": list(s.central_batches), "quick": s.quick},
  }


def _jaxlib_version() -> Optional[str]:
  try:
    import jaxlib
    return jaxlib.__version__
  except ImportError:
    return None


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
                   f"{_fmt(r['engine_over_nonprivate_engine'], '.2f')}, / centralised "
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


def output_path(s: Settings) -> pathlib.Path:
  if _OUT.value:
    return pathlib.Path(_OUT.value)
  suffix = "_quick" if s.quick else ""
  return REPO / "benchmarks" / "results" / f"round_throughput_{jax.default_backend()}{suffix}.json"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  jax.monitoring.register_event_duration_secs_listener(_on_duration)
  s = settings_from_flags()
  if _MEMORY_CHILD.value:
    print(json.dumps(memory_child(s, _MEMORY_CHILD.value)))
    return
  start, load_start = time.perf_counter(), os.getloadavg()
  default = default_strategy(s)
  rows = plan_rows(s, default)
  out = output_path(s)
  out.parent.mkdir(parents=True, exist_ok=True)
  log(f"{len(rows)} rows on {jax.devices()[0].device_kind} ({jax.default_backend()}); "
      f"default strategy {default}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

  def report(results: dict, complete: bool) -> dict:
    return {"benchmark": "round_throughput", "complete": complete,
            "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "argv": sys.argv[1:], **environment(s),
            "default_strategy": dataclasses.asdict(default),
            "rows": results, "ratios": ratios(results, rows[0].name, s.central_batches[0]),
            "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
            "wall_s": time.perf_counter() - start}

  def save(results: dict, complete: bool = False) -> dict:
    data = report(results, complete)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, out)  # a partial report (complete: false) survives an interrupted run
    return data

  final = save(run_rows(rows, s, after_row=save), complete=True)
  if _PLOT.value:
    plot(final, out.with_suffix(".png"))
  log("\n" + markdown(final) + "\n")
  log(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if _PLOT.value else ""))
  print(json.dumps(final))


if __name__ == "__main__":
  app.run(main)
