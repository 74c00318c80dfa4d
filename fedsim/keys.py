"""Every PRNG stream of a run, named in one place (invariant 7 of shared/DESIGN.md).

Keys derive from (seed, round, client id, purpose) by `fold_in`, never from a
global generator, so the same config and seed give the same run bit for bit, also
after a resume. A purpose is folded in at one level of the tree below; numbers
only need to differ within a level:

  seed key -> INIT (model initialisation)
           -> ATTACK (attack studies: the victims' updates, the attacker's restarts)
           -> ROUND -> round r -> CLIENTS -> client id -> (batch, step) split
                               -> DELTA_NOISE (client-level DP noise on the sum)
                               -> COUNT_NOISE (adaptive clipping's noised count)
                               -> SECURE_AGG -> HOSPITALS -> hospital id (its
                                  secure-aggregation secrets); -> ROTATION (Hadamard signs)
  local step key -> AUGMENT (in-graph augmentation of the step's batch)
                 -> image i -> CROP, FLIP, ROTATE
  host numpy stream for (seed, round) -> COHORT (which hospitals train)
                                      -> DROPOUTS (secure aggregation: graph, dropouts)
  host numpy stream for (seed, AUDIT) -> an audit's canaries (fedsim/canaries.py)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax

# Folded into the seed key.
INIT, ROUND, ATTACK = 0, 1, 2
# Folded into a round key.
CLIENTS, DELTA_NOISE, COUNT_NOISE, SECURE_AGG = 0, 1, 2, 3
# Folded into a round's SECURE_AGG key.
HOSPITALS, ROTATION = 0, 1
# Folded into a local step key (after the draw / gradient split).
AUGMENT = 2
# Folded into one image's augmentation key.
CROP, FLIP, ROTATE = 0, 1, 2
# Purpose of the host (numpy) cohort stream of a round.
COHORT = 2
# Purpose of the host (numpy) stream of an audit's canaries (no round).
AUDIT = 3
# Purpose of the host (numpy) stream of a round's secure-aggregation graph and dropouts.
DROPOUTS = 4


def seed_key(seed: int) -> jax.Array:
  """The root key of a run."""
  return jax.random.key(seed)


def init_key(seed: int) -> jax.Array:
  """The key that initialises the global model."""
  return jax.random.fold_in(seed_key(seed), INIT)


def attack_key(seed: int) -> jax.Array:
  """The root key of an attack study (never used by training)."""
  return jax.random.fold_in(seed_key(seed), ATTACK)


class RoundKeys(NamedTuple):
  """The keys of one round, one per purpose."""

  clients: jax.Array      # fold_in(., client id) gives each client its key
  delta_noise: jax.Array
  count_noise: jax.Array


def _round_key(seed: int, round_index: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(seed_key(seed), ROUND), round_index)


def round_keys(seed: int, round_index: int) -> RoundKeys:
  """The keys of round `round_index` (1-based) of a run with `seed`."""
  return _round_keys(seed, round_index)


@functools.partial(jax.jit, static_argnums=0)
def _round_keys(seed: int, round_index) -> RoundKeys:
  # One compiled call: five eager fold_ins took as long as a small round's clients
  # (jax.profiler, XLA:CPU runs each eager op synchronously on the calling thread).
  key = _round_key(seed, round_index)
  return RoundKeys(*(jax.random.fold_in(key, p) for p in (CLIENTS, DELTA_NOISE, COUNT_NOISE)))


def secure_agg_key(seed: int, round_index: int) -> jax.Array:
  """Round `round_index`'s secure-aggregation key (not in `RoundKeys`: only runs with
  `secure_agg.enabled` draw it, so other runs' keys are untouched)."""
  return jax.random.fold_in(_round_key(seed, round_index), SECURE_AGG)
