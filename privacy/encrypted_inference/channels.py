"""Counted channels: every message of the protocol, its bytes and its round.

The parties run in one process, so nothing is sent; instead each protocol step
declares what it would send. Online messages go between the two parties: an
`exchange` (both send at once, one round) or a `send` (one way, one round).
Dealer messages (offline: they depend on no input and can be sent before the
image exists) go to the parties; each party expands its random material from a
16-byte seed it shares with the dealer, so only the corrections the dealer sends
party 1 are counted (dealer.py), plus the two seeds. Shapes are static under jit, so
counts are exact Python integers taken while the protocol is traced.

Steps that do not depend on each other run in `parallel`: their bytes add up and
their rounds overlap (the maximum counts).
"""

from __future__ import annotations

import collections
import math
from typing import Callable

SEED_BYTES = 16


def ring_bytes(num_elements: int, element_bits: int = 64) -> int:
  """Bytes of `num_elements` values of `element_bits` bits, packed."""
  return math.ceil(num_elements * element_bits / 8)


class Channel:
  """Message counter of one protocol run (or of one branch of it)."""

  def __init__(self):
    self.online_bytes = 0
    self.rounds = 0
    self.offline_bytes = 0
    self.by_step = collections.Counter()  # online bytes per protocol step

  def exchange(self, nbytes_each: int, step: str) -> None:
    """Both parties send `nbytes_each` to each other in one round."""
    self._online(2 * nbytes_each, step)

  def send(self, nbytes: int, step: str) -> None:
    """One party sends `nbytes` to the other in one round."""
    self._online(nbytes, step)

  def deal(self, nbytes: int) -> None:
    """The dealer sends party 1 `nbytes` of corrections (offline)."""
    self.offline_bytes += nbytes

  def parallel(self, *steps: Callable[["Channel"], object]) -> list:
    """Runs independent steps; bytes add, rounds overlap. Returns their results."""
    results, branches = [], []
    for step in steps:
      branch = Channel()
      results.append(step(branch))
      branches.append(branch)
    for branch in branches:
      self.online_bytes += branch.online_bytes
      self.offline_bytes += branch.offline_bytes
      self.by_step.update(branch.by_step)
    self.rounds += max(branch.rounds for branch in branches)
    return results

  def totals(self) -> dict:
    """The counts as a JSON-ready dict (the dealer's two seeds included)."""
    return {"online_bytes": self.online_bytes, "rounds": self.rounds,
            "offline_bytes": self.offline_bytes + 2 * SEED_BYTES,
            "online_bytes_by_step": dict(self.by_step)}

  def _online(self, nbytes: int, step: str) -> None:
    self.online_bytes += nbytes
    self.rounds += 1
    self.by_step[step] += nbytes
