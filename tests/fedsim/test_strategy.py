"""Tests for fedsim.strategy.resolve: backend defaults, overrides, rounding."""

import jax
import pytest

from experiments import default
from fedsim import strategy
from fedsim.strategy import Strategy


def _engine(**overrides):
  engine = default.get_config().engine
  engine.update(overrides)
  return engine


def _resolve(backend="cpu", cohort_size=10, num_steps=5, devices=1, **overrides):
  return strategy.resolve(_engine(**overrides), cohort_size=cohort_size, num_steps=num_steps,
                          backend=backend, devices=devices)


def test_cpu_default_one_client_per_call_all_steps_unrolled():
  assert _resolve("cpu") == Strategy(chunk=1, block=1, conv="xla", unroll=5, devices=1,
                                     dp_gather="bucketed", ghost_rows=32)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_accelerator_default_whole_cohort_in_one_vmapped_call(backend):
  assert _resolve(backend) == Strategy(chunk=10, block=10, conv="xla", unroll=1, devices=1)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_accelerator_default_scans_large_cohorts_in_even_chunks_of_at_most_1000(backend):
  s = _resolve(backend, cohort_size=4321)
  assert (s.chunk, s.block) == (865, 4325)  # one call, 5 chunks, 4 padded clients
  s = _resolve(backend, cohort_size=10_000)
  assert (s.chunk, s.block) == (1000, 10_000)


def test_unknown_backend_gets_the_accelerator_default():
  assert _resolve("some_new_backend") == _resolve("gpu")


def test_overrides_apply():
  s = _resolve("cpu", client_chunk=3, client_block=6, conv="patches", unroll=2,
               dp_gather="fixed", ghost_rows=16)
  assert s == Strategy(chunk=3, block=6, conv="patches", unroll=2, devices=1, ghost_rows=16)


@pytest.mark.parametrize("chunk,block,expected_block", [
    (4, 0, 4),    # cpu default block 1 < chunk: raised to one chunk
    (4, 6, 8),    # rounded up to a multiple of the chunk
    (3, 9, 9),    # already a multiple
    (4, 100, 12),  # block capped at the cohort (10), then rounded up to a multiple of 4
])
def test_block_is_a_multiple_of_chunk(chunk, block, expected_block):
  s = _resolve("cpu", client_chunk=chunk, client_block=block)
  assert (s.chunk, s.block) == (chunk, expected_block)
  assert s.block % s.chunk == 0


def test_chunk_and_unroll_are_capped():
  s = _resolve("cpu", cohort_size=3, num_steps=4, client_chunk=8, unroll=16)
  assert (s.chunk, s.block, s.unroll) == (3, 3, 4)


def test_empty_cohort_and_no_steps_still_give_a_valid_strategy():
  s = _resolve("gpu", cohort_size=0, num_steps=0)
  assert (s.chunk, s.block, s.unroll) == (1, 1, 1)


@pytest.mark.parametrize("backend,cohort,expected", [
    ("gpu", 10, 12),  # whole cohort 10 -> rounded up to a multiple of 4 devices
    ("gpu", 8, 8),
    ("cpu", 10, 4),   # one client a call -> at least one client per device
])
def test_devices_round_the_block_to_a_multiple_of_the_device_count(backend, cohort, expected):
  s = _resolve(backend, cohort_size=cohort, devices=4)
  assert (s.chunk, s.block, s.devices) == (expected, expected, 4)


def test_devices_default_follows_shard_clients():
  on = strategy.resolve(_engine(shard_clients=True), cohort_size=10, num_steps=5,
                        backend="cpu")
  off = strategy.resolve(_engine(shard_clients=False), cohort_size=10, num_steps=5,
                         backend="cpu")
  assert on.devices == jax.local_device_count()
  assert off.devices == 1


def test_backend_defaults_to_jax_default_backend():
  s = strategy.resolve(_engine(), cohort_size=10, num_steps=5, devices=1)
  assert s == _resolve(jax.default_backend())
