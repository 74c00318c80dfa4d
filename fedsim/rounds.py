"""One federated round as compiled blocks of vmapped client chunks.

A round's cohort is cut into fixed-size blocks (the last one masked); each block
is one call of the same jitted program, which scans over chunks of the block and
vmaps `client_update` over the clients of a chunk, keeping only the weighted sum
of deltas and the sum of metrics. The host adds the block sums and the server
steps once. Shapes never depend on the
cohort drawn, so a run compiles the chunk program once, whatever the cohort size
(fixed or Poisson) and however many rounds it runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedsim import sampling, server
from fedsim.client import ClientData
from fedsim.data.base import ClientArrays
from fedsim.sharding import AXIS

PyTree = Any


class ChunkResult(NamedTuple):
  """Sums over one chunk's real clients."""

  delta_sum: PyTree     # sum_k w_k * transform(delta_k)
  weight_sum: jax.Array  # sum_k w_k
  metrics: dict         # per-client metric sums, summed over clients


def client_data(arrays: ClientArrays) -> ClientData:
  """Host `ClientArrays` (leading client axis) -> a `ClientData` of arrays."""
  return ClientData(arrays.images, arrays.labels, arrays.patients, arrays.counts,
                    arrays.num_patients)


def make_block_fn(client_update: Callable, *, weighting: str, chunk: int,
                  delta_transform: Optional[Callable] = None,
                  mesh: Optional[jax.sharding.Mesh] = None) -> Callable:
  """Builds `block_fn(params, data, valid, keys, hparams, total=None) -> ChunkResult`.

  A block is `b` clients (a multiple of `chunk`): one jitted call that scans over
  the block's chunks in-graph and vmaps `client_update` over the `chunk` clients
  of each, carrying only the running sums (memory is one chunk's, whatever `b`).
  `chunk=1` runs clients one at a time in-graph; `chunk=b` vmaps the whole block.

  Args:
    client_update: `(params, ClientData, key, hparams) -> (delta, metrics)`.
    weighting: aggregation weighting, see `server.WEIGHTINGS`.
    chunk: clients vmapped at once.
    delta_transform: optional `(delta, hparams) -> (delta, stats)` applied to
      each client's delta before the sum (client-level DP clips here); its
      stats are summed with the metrics.
    mesh: a 1-D `sharding.AXIS` mesh to split the block's clients over
      (`jax.shard_map`: each device runs `chunk / devices` clients, the sums
      are `psum`-ed). Manual partitioning, not GSPMD: XLA's automatic
      partitioning zeroed per-example convolution weight gradients of all but
      one device (jax 0.10.2, XLA:CPU; a vmap over clients of vmap(grad) of
      lax.conv).

  `data` is a `ClientData` with a leading block axis `[b, ...]`, `valid` bool
  `[b]` marks real clients (padded ones contribute exactly zero), `keys` `[b]`.
  The running `total` over a round's blocks is added in the same jitted call (one
  dispatch per block; `block_fn.compiled` is that jitted function).
  """

  def one_client(params, data, key, hparams):
    delta, metrics = client_update(params, data, key, hparams)
    if delta_transform is not None:
      delta, stats = delta_transform(delta, hparams)
      metrics = {**metrics, **stats}
    return delta, metrics

  def chunk_sums(params, data, valid, keys, hparams) -> ChunkResult:
    deltas, metrics = jax.vmap(one_client, in_axes=(None, 0, 0, None))(
        params, data, keys, hparams)
    weights = server.client_weights(data.count, valid, weighting)
    metrics = {k: jnp.sum(jnp.where(valid, v, 0.0)) for k, v in metrics.items()}
    metrics["clients"] = jnp.sum(valid.astype(jnp.float32))
    return ChunkResult(server.weighted_sum(deltas, weights), jnp.sum(weights),
                       metrics)

  local_chunk = chunk // mesh.size if mesh is not None else chunk

  def local_block_sums(params, data: ClientData, valid, keys, hparams) -> ChunkResult:
    split = lambda a: a.reshape((-1, local_chunk) + a.shape[1:])
    chunks = jax.tree.map(split, (data, valid, keys))
    if chunks[1].shape[0] == 1:
      return chunk_sums(params, *jax.tree.map(lambda a: a[0], chunks), hparams)

    def body(total, xs):
      result = chunk_sums(params, *xs, hparams)
      return jax.tree.map(jnp.add, total, result), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        chunk_sums, params, *jax.tree.map(lambda a: a[0], chunks), hparams))
    return jax.lax.scan(body, zeros, chunks)[0]

  if mesh is None:
    block_sums = local_block_sums
  else:
    spec, split_clients = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(AXIS)
    block_sums = jax.shard_map(
        lambda *args: jax.lax.psum(local_block_sums(*args), AXIS), mesh=mesh,
        in_specs=(spec, split_clients, split_clients, split_clients, spec), out_specs=spec,
        check_vma=False)  # local steps make replicated params per-client (varying) carries

  @jax.jit
  def accumulate(total, params, data, valid, keys, hparams) -> ChunkResult:
    return jax.tree.map(jnp.add, total, block_sums(params, data, valid, keys, hparams))

  def block_fn(params, data: ClientData, valid, keys, hparams,
               total: Optional[ChunkResult] = None) -> ChunkResult:
    """`total` + this block's sums, in one call (zeros when `total` is None)."""
    if total is None:
      total = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
          block_sums, params, data, valid, keys, hparams))
    return accumulate(total, params, data, valid, keys, hparams)

  block_fn.compiled = accumulate
  return block_fn


@jax.jit
def client_keys(round_key: jax.Array, ids: jax.Array) -> jax.Array:
  """Per-client keys `fold_in(round_key, client_id)`: independent across clients."""
  return jax.vmap(lambda i: jax.random.fold_in(round_key, i))(ids)


def run_cohort(block_fn: Callable, params: PyTree, train: ClientArrays,
               cohort: np.ndarray, *, block: int, round_key: jax.Array,
               hparams: dict, put: Callable = jax.device_put) -> ChunkResult:
  """Runs every block of `cohort` and adds their sums (host loop over blocks).

  Only the cohort's clients are gathered from host memory, one block at a time;
  the next block is gathered and transferred while the current one computes
  (JAX dispatch is asynchronous). A fixed cohort is usually one block; a
  Poisson cohort larger than the block runs as several calls of the same program.
  """
  blocks = sampling.chunk_ids(cohort, block)
  if not blocks:  # empty Poisson cohort: one all-padding block, all sums zero
    blocks = [(np.zeros(block, np.int64), np.zeros(block, bool))]
  keys = client_keys(round_key, np.concatenate([ids for ids, _ in blocks]))
  total = None
  for b, (ids, valid) in enumerate(blocks):
    arrays = train.take(ids)
    arrays = dataclasses.replace(arrays, counts=np.where(valid, arrays.counts, 0))
    total = block_fn(params, put(client_data(arrays)), put(valid),
                     put(keys[b * block:(b + 1) * block]), hparams, total)
  return total
