"""Timed rows: one round of the engine, of a Python loop of clients, of centralised SGD.

Each row builds a `one_round(round_index)` function and `time_rounds` times it:

- engine: `round.round_step` itself, every stage of a round as `simulation.train`
  runs it (cohort, gather, client updates, transform, aggregate, privatize, server
  update), without the host work around it (ledger, evaluation, writing).
- loop: the same round with hospitals run one by one from Python, one jitted call
  per hospital of the engine's own stage functions (`client.make_client_update`, the
  plan's transform, `aggregation.client_weights` / `aggregate`, `blocks.client_keys`
  under `keys.round_keys`), on per-client data put on the device before timing.
- central: non-private SGD over the federation's examples in one place, the same
  model and normalisation: what the hardware does without federation or privacy.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import workload
from fedsim import aggregation, blocks, keys, models
from fedsim import client as client_lib
from fedsim import round as round_lib

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = {"seconds": 0.0, "count": 0}  # XLA compilations seen by the listener


def _on_duration(event: str, duration: float, **kwargs) -> None:
  del kwargs
  if event == COMPILE_EVENT:
    _compiles["seconds"] += duration
    _compiles["count"] += 1


def listen_for_compiles() -> None:
  """Counts XLA compilations (and their seconds) from here on; call once per process."""
  jax.monitoring.register_event_duration_secs_listener(_on_duration)


def time_rounds(one_round: Callable[[int], Any], *, reps: int, warmup: int = 1,
                stat: str = "min") -> dict:
  """`warmup` untimed rounds (the first compiles), then `reps` timed ones (1-based).

  `round_s` is the minimum (`stat="min"`) or the median of the timed rounds.

  `compile_s` is the first round minus the median timed one; `xla_compile_s` and
  `xla_compiles` are XLA's own figures for the warm-up, and `recompiles_while_timed`
  (which should be 0) counts compilations during the timed rounds.
  """
  return time_rounds_interleaved({"row": one_round}, reps=reps, warmup=warmup,
                                 stat=stat)["row"]


def time_rounds_interleaved(rounds: dict[str, Callable[[int], Any]], *, reps: int,
                            warmup: int = 1, stat: str = "min") -> dict[str, dict]:
  """`time_rounds` of several rows: each row's warm-up in turn, then the timed rounds
  in rotation (a, b, c, a, b, c, ...), so a drift of the machine's speed moves every
  row alike and the ratios between rows hold. Returns `time_rounds`' dict per row."""
  warm, compiled, times, recompiles = {}, {}, {}, {}
  for name, one_round in rounds.items():
    before = dict(_compiles)
    warm[name] = []
    for r in range(1, warmup + 1):
      start = time.perf_counter()
      one_round(r)
      warm[name].append(time.perf_counter() - start)
    compiled[name] = (_compiles["seconds"] - before["seconds"],
                      _compiles["count"] - before["count"])
    times[name], recompiles[name] = [], 0
  for r in range(warmup + 1, warmup + reps + 1):
    for name, one_round in rounds.items():
      count, start = _compiles["count"], time.perf_counter()
      one_round(r)
      times[name].append(time.perf_counter() - start)
      recompiles[name] += _compiles["count"] - count
  out = {}
  for name, row_times in times.items():
    median = statistics.median(row_times)
    out[name] = {
        "round_s": min(row_times) if stat == "min" else median,
        "round_s_min": min(row_times), "round_s_median": median, "times_s": row_times,
        "first_round_s": warm[name][0], "compile_s": max(0.0, warm[name][0] - median),
        "xla_compile_s": compiled[name][0], "xla_compiles": compiled[name][1],
        "recompiles_while_timed": recompiles[name],
    }
  return out


def engine_round_fn(setup: round_lib.Setup) -> Callable[[int], Any]:
  """Round `r` is `round.round_step(setup, state, r)`, the state carried over rounds."""
  state = round_lib.init_state(setup)

  def one_round(r: int):
    nonlocal state
    state, _ = round_lib.round_step(setup, state, r)
    return jax.block_until_ready(state)

  return one_round


def loop_round_fn(setup: round_lib.Setup) -> Callable[[int], Any]:
  """The engine's round with hospitals run one by one: one jitted call per hospital.

  The call is stages 3-5 for one client (its update, the plan's transform, its
  weighted contribution) added to the running sums, metrics included, so nothing the
  engine computes is dead code here. Cohort and keys are the engine's (the loop and
  the engine compute the same round); per-client data is on the device before timing.
  """
  config, fed, plan = setup.config, setup.fed, setup.plan
  one_client = blocks.client_stages(setup.client_update, plan.transform)

  def client_sums(params, data, client_id, clients_key, hparams) -> blocks.RoundSums:
    key = blocks.client_keys(clients_key, client_id[None])[0]
    delta, metrics = one_client(params, data, key, hparams)
    weights = aggregation.client_weights(data.count[None], jnp.ones(1, bool), plan.weighting)
    delta_sum = aggregation.aggregate(jax.tree.map(lambda d: d[None], delta), weights)
    return blocks.RoundSums(delta_sum, jnp.sum(weights),
                            {**metrics, "clients": jnp.float32(1.0)})

  @jax.jit
  def step(total, params, data, client_id, clients_key, hparams) -> blocks.RoundSums:
    return jax.tree.map(jnp.add, total,
                        client_sums(params, data, client_id, clients_key, hparams))

  data = blocks.client_data(fed.train)
  per_client = [jax.device_put(jax.tree.map(lambda a, k=k: a[k], data))
                for k in range(fed.num_clients)]
  client_ids = [jax.device_put(np.int32(k)) for k in range(fed.num_clients)]
  state = round_lib.init_state(setup)
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(
      client_sums, state.params, per_client[0], client_ids[0],
      keys.round_keys(config.seed, 1).clients, setup.hparams))

  def one_round(r: int):
    nonlocal state
    cohort = round_lib.sample_cohort(config, r)
    round_keys = keys.round_keys(config.seed, r)
    hparams = {**setup.hparams, "clip_norm": state.clip_norm}
    total = zeros
    for k in cohort:
      total = step(total, state.params, per_client[k], client_ids[k], round_keys.clients,
                   hparams)
    state, _ = round_lib.finish_round(setup, state, total, round_keys, hparams, r)
    return jax.block_until_ready(state)

  return one_round


def central_round_fn(s: workload.Settings, conv: str,
                     batch_size: int) -> tuple[Callable[[int], Any], dict]:
  """Centralised non-private SGD over the federation's examples: jitted batch steps.

  The examples are split into `round(examples / batch_size)` equal batches already
  on the device (a remainder, if any, is dropped and `examples_computed` says so).
  """
  fed = workload.federation(s.hospitals, s.examples, s.image_size, s.classes, s.seed)
  model = models.make_model("cnn", num_classes=s.classes, conv=conv)
  params = model.init(keys.init_key(s.seed), jnp.zeros((1,) + fed.image_shape))
  opt = optax.sgd(s.lr)
  opt_state = opt.init(params)
  n = s.examples_per_round
  steps = max(1, round(n / batch_size))
  batch = n // steps
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


@functools.cache
def _nonprivate_round(s: workload.Settings) -> Callable[[int], Any]:
  """The non-private default engine's round, built and compiled once per run: every DP
  engine row times its rounds in rotation with it."""
  return engine_round_fn(workload.build_setup(s, hospitals=s.hospitals))


def run_timed_row(row: workload.Row, s: workload.Settings) -> dict:
  """Builds and times one engine / loop / central row; returns its JSON row."""
  if row.kind == "central":
    one_round, info = central_round_fn(s, row.conv, row.batch)
  else:
    setup = workload.build_setup(s, hospitals=s.hospitals, chunk=row.chunk, block=row.block,
                                 conv=row.conv, dp=row.dp, clipping=row.clipping)
    st = setup.strategy
    info = {"conv": st.conv, "unroll": st.unroll, "dp": row.dp,
            "privacy_unit": setup.plan.unit, "local_steps": setup.schedule.num_steps}
    if row.dp == "example":
      info.update(clipping=row.clipping, dp_max_batch_size=setup.config.dp.max_batch_size)
    if row.kind == "engine":
      calls = -(-s.hospitals // st.block)
      info.update(chunk=st.chunk, block=st.block, calls_per_round=calls,
                  clients_computed=calls * st.block)
      one_round = engine_round_fn(setup)
    else:
      info.update(calls_per_round=s.hospitals, clients_computed=s.hospitals)
      one_round = loop_round_fn(setup)
  if row.kind == "engine" and row.dp != "none":
    # The non-private default engine's rounds in rotation with this row's: the ratio
    # between them holds when the machine's speed drifts between rows.
    both = time_rounds_interleaved({"row": one_round, "nonprivate": _nonprivate_round(s)},
                                   reps=s.reps, warmup=s.warmup, stat=s.stat)
    timing = {**both["row"], "nonprivate_round_s_in_rotation": both["nonprivate"]["round_s"]}
  else:
    timing = time_rounds(one_round, reps=s.reps, warmup=s.warmup, stat=s.stat)
  return {"kind": row.kind, **info, **timing,
          "examples_per_s": s.examples_per_round / timing["round_s"]}
