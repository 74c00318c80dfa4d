"""The block program: padding is invisible, vmapped equals sequential, compiles once."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedsim import aggregation, blocks, models, server
from fedsim import client as client_lib
from fedsim.data.base import ClientArrays

H = 12


def make_arrays(counts, max_examples, seed=0):
  rng = np.random.default_rng(seed)
  k = len(counts)
  images = rng.integers(0, 256, (k, max_examples, H, H, 1), dtype=np.uint8)
  labels = rng.integers(0, 3, (k, max_examples)).astype(np.int32)
  mask = np.arange(max_examples)[None] < np.asarray(counts)[:, None]
  patients = np.where(mask, np.arange(max_examples)[None] // 2, -1).astype(np.int32)
  images[~mask] = 0
  labels[~mask] = 0
  return ClientArrays(images, labels, patients, np.asarray(counts, np.int32),
                      np.asarray([(c + 1) // 2 for c in counts], np.int32))


def pad_examples(arrays: ClientArrays, extra: int) -> ClientArrays:
  """More padding slots per client, filled with junk that must be ignored."""
  k = arrays.num_clients
  junk = lambda a, fill: np.concatenate(
      [a, np.full((k, extra) + a.shape[2:], fill, a.dtype)], axis=1)
  return dataclasses.replace(arrays, images=junk(arrays.images, 255),
                             labels=junk(arrays.labels, 2),
                             patients=junk(arrays.patients, -1))


@pytest.fixture(scope="module")
def setup():
  model = models.make_model("cnn", num_classes=3, conv="xla")
  params = model.init(jax.random.key(0), jnp.zeros((1, H, H, 1)))
  hparams = {"client_lr": jnp.float32(0.1), "client_momentum": jnp.float32(0.9),
             "prox_mu": jnp.float32(0.0)}
  return model.apply, params, hparams


def build(apply_fn, max_examples, *, chunk=2, epochs=1, batch=4, optimizer="sgd"):
  schedule = client_lib.LocalSchedule(max_examples=max_examples, batch_size=batch,
                                      epochs=epochs)
  update = client_lib.make_client_update(
      apply_fn, client_lib.mean_gradient(apply_fn), schedule=schedule,
      optimizer=optimizer, mean=0.5, std=0.25)
  return update, blocks.make_block_fn(update, weighting="examples", chunk=chunk)


def run_block(block_fn, params, arrays, ids, valid, hparams, seed=1):
  data = blocks.client_data(arrays.take(np.asarray(ids)))
  data = data._replace(count=np.where(valid, data.count, 0))
  keys = blocks.client_keys(jax.random.key(seed), np.asarray(ids))
  return block_fn(params, data, jnp.asarray(valid), keys, hparams)


def assert_trees_close(a, b, **tol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tol), a, b)


def test_padded_clients_and_examples_change_nothing(setup):
  apply_fn, params, hparams = setup
  arrays = make_arrays([10, 7, 12], 12)
  _, block_fn = build(apply_fn, 12, chunk=3)
  base = run_block(block_fn, params, arrays, [0, 1, 2], [True] * 3, hparams)
  # Two padded clients (ids of real clients, marked invalid) and 5 padded examples.
  padded = pad_examples(arrays, 5)
  _, block_fn_padded = build(apply_fn, 17, chunk=5)
  more = run_block(block_fn_padded, params, padded, [0, 1, 2, 1, 0],
                   [True, True, True, False, False], hparams)
  assert_trees_close(base.delta_sum, more.delta_sum, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(base.weight_sum, more.weight_sum)
  for key in ("loss_sum", "correct", "examples", "clients"):
    np.testing.assert_allclose(base.metrics[key], more.metrics[key], rtol=1e-5)
  assert float(base.metrics["examples"]) == 29.0  # every real example seen once


def test_block_equals_sequential_clients(setup):
  apply_fn, params, hparams = setup
  arrays = make_arrays([9, 12, 5, 12], 12, seed=3)
  update, block_fn = build(apply_fn, 12, chunk=2, epochs=2, optimizer="momentum")
  ids = np.arange(4)
  result = run_block(block_fn, params, arrays, ids, [True] * 4, hparams)
  keys = blocks.client_keys(jax.random.key(1), ids)
  data = blocks.client_data(arrays)
  one = jax.jit(update)
  expected = None
  for k in range(4):
    delta, _ = one(params, jax.tree.map(lambda a: a[k], data), keys[k], hparams)
    term = jax.tree.map(lambda d: arrays.counts[k] * d, delta)
    expected = term if expected is None else jax.tree.map(jnp.add, expected, term)
  assert_trees_close(result.delta_sum, expected, rtol=1e-4, atol=1e-6)
  assert float(result.weight_sum) == arrays.counts.sum()


def test_chunk_width_does_not_change_the_round(setup):
  apply_fn, params, hparams = setup
  arrays = make_arrays([9, 12, 5, 12], 12, seed=4)
  results = [run_block(build(apply_fn, 12, chunk=c)[1], params, arrays, np.arange(4),
                       [True] * 4, hparams) for c in (1, 2, 4)]
  for other in results[1:]:
    assert_trees_close(results[0].delta_sum, other.delta_sum, rtol=1e-4, atol=1e-6)


def test_prox_term_pulls_towards_global(setup):
  apply_fn, params, hparams = setup
  arrays = make_arrays([12, 12], 12, seed=6)
  _, block_fn = build(apply_fn, 12, epochs=3)
  norm = lambda r: float(optax.global_norm(r.delta_sum))
  free = run_block(block_fn, params, arrays, [0, 1], [True, True], hparams)
  prox = run_block(block_fn, params, arrays, [0, 1], [True, True],
                   {**hparams, "prox_mu": jnp.float32(5.0)})
  assert norm(prox) < norm(free)


def test_block_program_compiles_once(setup):
  apply_fn, params, hparams = setup
  arrays = make_arrays([9, 12, 5, 12, 7], 12, seed=7)
  _, block_fn = build(apply_fn, 12, chunk=2)
  for ids, valid in ([[0, 1, 2, 3], [True] * 4], [[4, 0, 0, 0], [True, False, False, False]]):
    run_block(block_fn, params, arrays, ids, valid, hparams)
  assert block_fn.compiled._cache_size() == 1


def test_fedavg_one_client_one_full_batch_step_is_centralised_sgd(setup):
  apply_fn, params, hparams = setup
  arrays = make_arrays([8], 8, seed=5)
  _, block_fn = build(apply_fn, 8, chunk=1, batch=8)
  result = run_block(block_fn, params, arrays, [0], [True], hparams)
  mean_delta, apply = aggregation.weighted_mean(result.delta_sum, result.weight_sum)
  opt = server.server_optimizer("fedavg")
  state = server.init_state(opt, None, params, 1.0)
  new_params = server.server_update(opt, state, mean_delta, learning_rate=1.0,
                                    apply=apply).params

  x = client_lib.normalize(jnp.asarray(arrays.images[0]), 0.5, 0.25)
  y = jnp.asarray(arrays.labels[0])
  grad = jax.grad(lambda p: client_lib.cross_entropy(apply_fn(p, x), y).mean())(params)
  central = jax.tree.map(lambda p, g: p - 0.1 * g, params, grad)
  assert_trees_close(new_params, central, rtol=1e-4, atol=1e-6)
