"""Vmapped sweep groups: the configurations of one group trained by one compiled round.

Configurations of a sweep group (fedsim/sweep.py) share a `Setup`: one federation
and one set of programs whose shape-preserving hyperparameters (learning rates,
momentum, proximal term, noise multiplier, clip norm) are traced arguments. Here
the group advances in lockstep, round by round, with a leading configuration axis
`[k, ...]` on everything that differs: server state (params, optimiser state, clip
norm, EMA) and hyperparameters. The seed is a group key field (it draws the
synthetic images, the partition and the canaries), so a group's cohorts and keys
are one: each round's blocks are gathered once. Each block call is the engine's
own block program (`blocks.make_block_fn`) under `jax.vmap`, the server stages are
`round.finish_round` under `jax.vmap`; nothing re-implements a stage. On the host
each configuration keeps its own ledger, evaluation, metrics, checkpoints and
record, written by the same functions as `simulation.train`; its `wall_seconds`
is the group's.

Against a lone run (docs/sweeps.md): the same inputs, keys and operations in
batched programs. Bit for bit on XLA:CPU when a round is one block and the server
is FedAvg/FedAvgM without EMA; otherwise within float tolerance (the batched
programs round the running block total and Adam's or the EMA's arithmetic in
the last bit; ~1e-6 relative on the figures measured). Ledgers are always exact.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from fedsim import blocks, io, keys, sampling, simulation, tensorboard
from fedsim import round as round_lib

EXECUTIONS = ("auto", "vmap", "sequential")
# What `sweep.execution = "auto"` runs per backend, from benchmarks/sweep_throughput.py
# (docs/sweeps.md): on XLA:CPU a vmapped group was slower than the same configurations
# one after another (convolutions whose weights differ batch poorly there, as clients do);
# GPU and TPU vmap (wide batches are what they are built for; the lead's GPU run decides).
AUTO = {"cpu": "sequential", "gpu": "vmap", "tpu": "vmap"}


def execution(choice: str, backend: Optional[str] = None) -> str:
  """`sweep.execution` resolved for `backend` (default: JAX's): "vmap" or "sequential"."""
  if choice != "auto":
    return choice
  return AUTO.get(backend or jax.default_backend(), "vmap")


def unsupported(setup: round_lib.Setup) -> Optional[str]:
  """Why the group of `setup` cannot run vmapped (None: it can)."""
  if setup.secure_agg is not None:
    return "secure aggregation builds its encoding from the group's constants"
  if setup.strategy.devices > 1:
    return "the client axis is sharded over devices"
  if setup.config.dp.target_epsilon > 0:
    return "dp.target_epsilon may stop each run at another round"
  if setup.flat:
    return ("DP-SGD batches are gathered at each block's own size (engine.dp_gather="
            "'bucketed', the CPU default; 'fixed' vmaps)")
  return None


@dataclasses.dataclass
class _Run:
  """One configuration's host side: its Setup, sub-workdir, writers, ledger, figures."""

  setup: round_lib.Setup
  path: str
  writer: io.MetricWriter
  events: tensorboard.ScalarWriter
  ledger: object
  state: object  # its ServerState until the group is stacked
  done: int
  scalars: dict = dataclasses.field(default_factory=dict)
  report: dict = dataclasses.field(default_factory=dict)


def _open(setup: round_lib.Setup, path: str, overwrite: bool) -> _Run:
  """Opens (or resumes) one run's record exactly as `simulation.train` does."""
  done, writer, events, ledger, state = simulation.open_record(setup, path,
                                                               overwrite=overwrite)
  return _Run(setup, path, writer, events, ledger, state, done)


def _stack(trees):
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _take(tree, i: int):
  return jax.tree.map(lambda leaf: leaf[i], tree)


def train_group(entries: list[tuple[round_lib.Setup, str]], *, progress: bool = True,
                overwrite: bool = False) -> list[dict]:
  """Trains the runs of `entries` (shared Setups of one group, sub-workdirs) vmapped.

  Runs that resume from different rounds advance as separate lockstep groups.
  Returns each run's summary, in order.
  """
  runs = [_open(setup, path, overwrite) for setup, path in entries]
  by_done: dict[int, list[_Run]] = {}
  for run in runs:
    by_done.setdefault(run.done, []).append(run)
  summaries = {}
  for members in by_done.values():
    for run, summary in zip(members, _lockstep(members, progress=progress)):
      summaries[run.path] = summary
  return [summaries[run.path] for run in runs]


def _lockstep(runs: list[_Run], *, progress: bool) -> list[dict]:
  """Rounds `done + 1 .. num_rounds` of every run in `runs`, one vmapped round each.

  The group shares its seed (a group key field), hence its cohorts and keys; they
  are broadcast to the configuration axis all the same: unbatched operands change
  how XLA lowers the vmapped convolutions, and the figures in the last bits.
  """
  setup, config = runs[0].setup, runs[0].setup.config  # the group's shared programs
  block_fn = setup.block_fn
  # zeros + the first block's sums; then running total + each further block's sums
  # (the total's buffers reused, as in a lone run)
  first_block = jax.jit(jax.vmap(block_fn))
  next_block = jax.jit(jax.vmap(block_fn.compiled), donate_argnums=0)
  k = len(runs)
  repeat = lambda tree: jax.tree.map(
      lambda x: jnp.broadcast_to(x, (k,) + jnp.shape(x)), tree)
  state = _stack([run.state for run in runs])
  hparams = _stack([run.setup.hparams for run in runs])
  start = time.perf_counter()
  bar = tqdm(range(runs[0].done + 1, config.num_rounds + 1), disable=not progress,
             desc=f"rounds ({len(runs)} configurations vmapped)", dynamic_ncols=True,
             initial=runs[0].done, total=config.num_rounds)
  for r in bar:
    cohort = round_lib.sample_cohort(config, r)
    round_keys = repeat(keys.round_keys(config.seed, r))
    round_hparams = {**hparams, "clip_norm": state.clip_norm}
    sums = None
    for block in blocks.gather(setup.fed.train, cohort, setup.strategy.block):
      args = (*repeat((block.data, block.valid, blocks.client_keys(
          round_keys.clients[0], block.ids))), round_hparams)
      sums = (first_block(state.params, *args) if sums is None
              else next_block(sums, state.params, *args))
    finish = lambda s, m, rk, h: round_lib.finish_round(setup, s, m, rk, h, r)
    new_state, model = jax.vmap(finish)(state, sums, round_keys, round_hparams)
    participating = sampling.participation_mask(config.num_clients, cohort)
    for i, run in enumerate(runs):
      out = round_lib.RoundOutput(cohort, participating, _take(sums, i), state.clip_norm[i],
                                  _take(model, i))
      logged = simulation.after_round(run.setup, run.path, run.writer, run.events, run.ledger,
                                      r, out, _take(new_state, i), start)
      if logged is not None:
        run.scalars, run.report = logged
    state = new_state
  bar.close()
  summaries = []
  for i, run in enumerate(runs):
    final = _take(state, i)
    if not run.scalars and int(final.round):  # resumed after its last round
      run.scalars, run.report = simulation.evaluate(run.setup, final.params)
    summaries.append(simulation.finish_record(run.setup, run.path, run.writer, final,
                                              run.ledger, run.scalars, run.report, None,
                                              time.perf_counter() - start))
  return summaries
