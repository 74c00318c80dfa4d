"""The training loop's round: no device-to-host read outside evaluated rounds, no
recompilation after the first round, and donated buffers that leave results unchanged."""

import contextlib

import jax
import numpy as np
import pytest
from jax._src.array import ArrayImpl

from fedsim import round as round_lib
from fedsim import simulation

_EVENTS: list[str] = []
_LISTENING = [False]


def _on_event(name, *args, **kwargs):
  del args, kwargs
  if _LISTENING[0] and ("compile" in name or "trace" in name):
    _EVENTS.append(name)


jax.monitoring.register_event_duration_secs_listener(_on_event)


_READS_ALLOWED = [True]


@contextlib.contextmanager
def no_host_reads(monkeypatch):
  """Any device-to-host read of a `jax.Array` raises (but inside `_allowing_reads`).

  `jax.transfer_guard_device_to_host` does this on accelerators; on the CPU a read is
  no transfer and the guard stays silent, so every read path (`float`, `np.asarray`,
  `tolist`, `device_get`) is caught where they all meet, `ArrayImpl._value`.
  """
  value = ArrayImpl._value

  def guarded(self):
    if not _READS_ALLOWED[0]:
      raise RuntimeError(f"disallowed device-to-host read of a {self.dtype}{list(self.shape)}")
    return value.fget(self)

  monkeypatch.setattr(ArrayImpl, "_value", property(guarded))
  _READS_ALLOWED[0] = False
  try:
    with jax.transfer_guard_device_to_host("disallow"):
      yield
  finally:
    _READS_ALLOWED[0] = True


def _allowing_reads(fn):
  """`fn` run with device-to-host reads allowed (evaluation, logging, checkpoints)."""
  def wrapped(*args, **kwargs):
    before = _READS_ALLOWED[0]
    _READS_ALLOWED[0] = True
    try:
      with jax.transfer_guard_device_to_host("allow"):
        return fn(*args, **kwargs)
    finally:
      _READS_ALLOWED[0] = before
  return wrapped


def test_rounds_read_nothing_back_and_compile_once(config, workdir, monkeypatch):
  """Patient-level DP-SGD, ledger charged every round; 5 rounds, rounds 2 and 4 evaluated.

  (Client-level DP with Poisson cohorts and adaptive clipping was checked the same way
  by hand; it is left out to keep the suite short.)"""
  config.num_rounds, config.eval_every, config.checkpoint_every = 5, 2, 0
  for name in ("evaluate", "round_scalars", "save_state", "finish_record"):
    monkeypatch.setattr(simulation, name, _allowing_reads(getattr(simulation, name)))
  compiles = {}
  step = round_lib.round_step

  def counted_step(setup, state, r, **kwargs):
    _EVENTS.clear()
    _LISTENING[0] = True
    try:
      return step(setup, state, r, **kwargs)
    finally:
      _LISTENING[0] = False
      compiles[r] = len(_EVENTS)

  monkeypatch.setattr(round_lib, "round_step", counted_step)
  setup = simulation.prepare(config)
  with no_host_reads(monkeypatch):
    summary = simulation.train(setup, workdir, progress=False)
  assert summary["rounds"] == 5
  assert compiles[1] > 0  # the listener hears compilations (round 1 builds the programs)
  assert {r: n for r, n in compiles.items() if r > 1} == {2: 0, 3: 0, 4: 0, 5: 0}


def test_the_guard_catches_a_host_read(config, workdir, monkeypatch):
  """The check above would fail if the round read a device value (e.g. `float(total)`)."""
  def reading_mean(sums, key, hparams):
    float(sums.weight_sum)
    return simulation.privacy_plan.plain_mean(sums, key, hparams)

  config.dp.level, config.num_rounds, config.eval_every = "none", 2, 2
  setup = simulation.prepare(config)
  object.__setattr__(setup, "privatize", reading_mean)
  state = round_lib.init_state(setup)
  with no_host_reads(monkeypatch), pytest.raises(RuntimeError, match="disallowed"):
    round_lib.round_step(setup, state, 1)


def test_donated_rounds_equal_rounds_that_keep_the_old_state(config):
  setup = simulation.prepare(config)
  kept = donated = round_lib.init_state(setup)
  donated = jax.tree.map(lambda x: x.copy(), donated)
  for r in (1, 2):
    kept, _ = round_lib.round_step(setup, kept, r)
    donated, _ = round_lib.round_step(setup, donated, r, donate=True)
  for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(donated)):
    np.testing.assert_array_equal(a, b)
