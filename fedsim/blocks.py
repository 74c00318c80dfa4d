"""The compiled program of a round: blocks of clients, scanned in chunks, vmapped.

A round's cohort is cut into fixed-size blocks (the last one masked); each block
is one call of the same jitted program, which scans over chunks of the block and
vmaps the client stages over the clients of a chunk, keeping only the sums:

  client_update -> transform (per client: DP clipping; secure-aggregation encoding)
  -> aggregate (weighted sum over the chunk; fedsim/aggregation.py)

Shapes never depend on the cohort drawn, so a run compiles the block program
once, whatever the cohort size (fixed or Poisson) and however many rounds it runs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedsim import aggregation, sampling
from fedsim import client as client_lib
from fedsim.client import ClientData
from fedsim.data.base import ClientArrays
from fedsim.sharding import AXIS

PyTree = Any


class RoundSums(NamedTuple):
  """Sums over a round's (or a chunk's) real clients."""

  delta_sum: PyTree      # aggregate of the transformed deltas
  weight_sum: jax.Array  # sum_k w_k
  metrics: dict          # per-client metric sums, summed over clients (+ "clients")


class Block(NamedTuple):
  """One block of a cohort, gathered from host memory: `[b, ...]` leaves."""

  data: ClientData
  valid: np.ndarray  # bool [b]: real clients (padded ones have count 0)
  ids: np.ndarray    # int [b]: hospital ids (0 on padding)


def client_data(arrays: ClientArrays) -> ClientData:
  """Host `ClientArrays` (leading client axis) -> a `ClientData` of arrays."""
  return ClientData(arrays.images, arrays.labels, arrays.patients, arrays.counts,
                    arrays.num_patients)


def gather(train: ClientArrays, cohort: np.ndarray, block: int,
           rows: slice = slice(None)) -> Iterator[Block]:
  """The cohort's clients, `block` at a time (only they leave host memory).

  The last block is padded with invalid clients of count 0; an empty (Poisson)
  cohort gives one all-padding block, so the round still has a sum (of zeros).
  `rows`: only these rows of each block (one process's share of a block laid
  out over several processes' devices).
  """
  blocks = sampling.chunk_ids(cohort, block) or [(np.zeros(block, np.int64),
                                                  np.zeros(block, bool))]
  for ids, valid in blocks:
    ids, valid = ids[rows], valid[rows]
    arrays = train.take(ids)
    arrays = dataclasses.replace(arrays, counts=np.where(valid, arrays.counts, 0))
    yield Block(client_data(arrays), valid, ids)


@jax.jit
def client_keys(round_key: jax.Array, ids: jax.Array) -> jax.Array:
  """Per-client keys `fold_in(round_key, client_id)`: independent across clients."""
  return jax.vmap(lambda i: jax.random.fold_in(round_key, i))(ids)


def client_stages(client_update: Callable, transform: Optional[Callable] = None) -> Callable:
  """One client's stages before aggregation: `(params, data, key, hparams) -> (delta, metrics)`.

  The client update, then the optional per-client transform, whose stats join the
  metrics. The block program vmaps it; the loop benchmark calls it per client.
  """

  def one_client(params, data, key, hparams):
    delta, metrics = client_update(params, data, key, hparams)
    if transform is not None:
      delta, stats = transform(delta, hparams)
      metrics = {**metrics, **stats}
    return delta, metrics

  return one_client


def make_block_fn(client_update: Callable, *, weighting: str, chunk: int,
                  transform: Optional[Callable] = None,
                  aggregate: Callable = aggregation.aggregate,
                  mesh: Optional[jax.sharding.Mesh] = None) -> Callable:
  """Builds `block_fn(params, data, valid, keys, hparams, total=None) -> RoundSums`.

  A block is `b` clients (a multiple of `chunk`): one jitted call that scans over
  the block's chunks in-graph and vmaps the client stages over the `chunk`
  clients of each, carrying only the running sums (memory is one chunk's,
  whatever `b`). `chunk=1` runs clients one at a time in-graph; `chunk=b` vmaps
  the whole block.

  Args:
    client_update: `(params, ClientData, key, hparams) -> (delta, metrics)`.
    weighting: aggregation weighting, see `aggregation.WEIGHTINGS`.
    chunk: clients vmapped at once.
    transform: optional per-client `(delta, hparams) -> (delta, stats)` before
      aggregation (client-level DP clips here); its stats join the metrics.
    aggregate: `(deltas [chunk, ...], weights [chunk]) -> chunk sum`; chunk sums
      add up over the block and the round. When `block_fn` is given per-client
      `inputs` (secure aggregation), `(deltas, weights, inputs [chunk]) -> sums`.
    mesh: a 1-D `sharding.AXIS` mesh to split the block's clients over
      (`jax.shard_map`: each device runs `chunk / devices` clients, the sums
      are `psum`-ed). Manual partitioning, not GSPMD: XLA's automatic
      partitioning zeroed per-example convolution weight gradients of all but
      one device (jax 0.10.2, XLA:CPU; docs/spmd_per_example_conv_repro.py).

  `data` is a `ClientData` with a leading block axis `[b, ...]`, `valid` bool
  `[b]` marks real clients (padded ones contribute exactly zero), `keys` `[b]`,
  `inputs` None or a pytree of `[b, ...]` leaves handed to `aggregate`.
  The running `total` over a round's blocks is added in the same jitted call (one
  dispatch per block; `block_fn.compiled` is that jitted function).
  """

  one_client = client_stages(client_update, transform)

  def chunk_sums(params, hparams, data, valid, keys, inputs) -> RoundSums:
    deltas, metrics = jax.vmap(one_client, in_axes=(None, 0, 0, None))(
        params, data, keys, hparams)
    weights = aggregation.client_weights(data.count, valid, weighting)
    metrics = {k: jnp.sum(jnp.where(valid, v, 0.0)) for k, v in metrics.items()}
    metrics["clients"] = jnp.sum(valid.astype(jnp.float32))
    delta_sum = aggregate(deltas, weights) if inputs is None else aggregate(
        deltas, weights, inputs)
    return RoundSums(delta_sum, jnp.sum(weights), metrics)

  local_chunk = chunk // mesh.size if mesh is not None else chunk

  def local_block_sums(params, data: ClientData, valid, keys, hparams, inputs) -> RoundSums:
    split = lambda a: a.reshape((-1, local_chunk) + a.shape[1:])
    chunks = jax.tree.map(split, (data, valid, keys, inputs))
    first = jax.tree.map(lambda a: a[0], chunks)
    if chunks[1].shape[0] == 1:
      return chunk_sums(params, hparams, *first)

    def body(total, xs):
      result = chunk_sums(params, hparams, *xs)
      return jax.tree.map(jnp.add, total, result), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(chunk_sums, params, hparams, *first))
    return jax.lax.scan(body, zeros, chunks)[0]

  if mesh is None:
    block_sums = local_block_sums
  else:
    spec, split_clients = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(AXIS)
    block_sums = jax.shard_map(
        lambda *args: jax.lax.psum(local_block_sums(*args), AXIS), mesh=mesh,
        in_specs=(spec, split_clients, split_clients, split_clients, spec, split_clients),
        out_specs=spec,
        check_vma=False)  # local steps make replicated params per-client (varying) carries

  # The running total is overwritten by each block: its buffers are donated.
  @functools.partial(jax.jit, donate_argnums=0)
  def accumulate(total, params, data, valid, keys, hparams, inputs=None) -> RoundSums:
    return jax.tree.map(jnp.add, total, block_sums(params, data, valid, keys, hparams, inputs))

  shapes = {}  # the sums' shapes per argument signature: traced once, not every round

  def block_fn(params, data: ClientData, valid, keys, hparams,
               total: Optional[RoundSums] = None, inputs=None) -> RoundSums:
    """`total` + this block's sums, in one call (zeros when `total` is None)."""
    if total is None:
      args = (params, data, valid, keys, hparams, inputs)
      signature = (jax.tree.structure(args), tuple(
          (np.shape(x), str(getattr(x, "dtype", type(x)))) for x in jax.tree.leaves(args)))
      if signature not in shapes:
        shapes[signature] = jax.eval_shape(block_sums, *args)
      total = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[signature])
    return accumulate(total, params, data, valid, keys, hparams, inputs)

  block_fn.compiled = accumulate
  return block_fn


def gather_rows(kept: int, limit: int) -> int:
  """The rows a block gathers for `kept` examples: the next size of a half-octave
  grid (1, 2, 3, 4, 6, 8, 12, 16, 24, ...), at most `limit`.

  Few sizes (each is one compilation), at most 1.5x the rows needed.
  """
  power = 1 << max(kept - 1, 0).bit_length()  # the next power of two >= kept
  rows = power * 3 // 4 if power >= 4 and power * 3 // 4 >= kept else power
  return min(rows, limit)


def bucketed_block_fn(block_program: Callable, sampler, schedule) -> Callable:
  """A block function that gathers each block's DP-SGD batches in as few rows as hold
  them (`strategy.dp_gather = "bucketed"`).

  The block's kept examples per local step are counted first (`block_fn.kept`:
  `client.batch_sizes`, the same draws, read on the host), then the block runs
  `block_program(sampler with gather=rows)`, compiled once per size of `gather_rows`.
  Only the rows change: the same examples are kept, so the result equals the fixed
  layout's up to float rounding, and the accounting is untouched.

  Args:
    block_program: `sampler -> block_fn` (`make_block_fn` over that sampler's clients).
    sampler: the plan's `PoissonSampler` in the flat layout (`gather` = the most
      rows any step can need).
    schedule: the clients' `LocalSchedule`.
  """
  batch_sizes = jax.vmap(functools.partial(client_lib.batch_sizes, sampler, schedule))
  kept_in_block = jax.jit(lambda data, keys: jnp.max(batch_sizes(data, keys), initial=0))
  programs = {}

  def program_for(kept: int) -> Callable:
    """The block program whose steps gather `kept` examples (compiled once per size)."""
    rows = gather_rows(kept, sampler.gather)
    if rows not in programs:
      programs[rows] = block_program(dataclasses.replace(sampler, gather=rows))
    return programs[rows]

  def block_fn(params, data: ClientData, valid, keys, hparams,
               total: Optional[RoundSums] = None, inputs=None,
               kept: Optional[int] = None) -> RoundSums:
    """`kept`: this block's `block_fn.kept(data, keys)` if read already (one device ->
    host read for many blocks, as `round.client_updates` does), else read here."""
    if kept is None:
      kept = int(jax.device_get(kept_in_block(data, keys)))
    return program_for(kept)(params, data, valid, keys, hparams, total, inputs)

  block_fn.kept = kept_in_block  # (data, keys) -> the most examples any active step keeps
  block_fn.program_for = program_for
  block_fn.programs = programs  # gather rows -> block program
  return block_fn
