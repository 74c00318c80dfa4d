"""Who masks with whom: the complete graph (Bonawitz et al. 2017) or SecAgg+ (Bell et al. 2020).

A round's cohort occupies slots 0..n-1 of `capacity` slots (the rest is padding). Each slot
gets `width` neighbour slots, `neighbours[i, j]` with `valid[i, j]`; the graph is undirected,
so the pair masks of an edge cancel in the sum. SecAgg+ uses a random Harary graph: the
cohort placed on a ring in a random order, each hospital joined to the k/2 nearest on either
side (k-regular, connected, with each hospital's secrets shared among its k neighbours only),
drawn afresh every round from the round's generator.

  >>> import numpy as np
  >>> g = neighbour_graph(np.random.default_rng(0), n=6, capacity=8, k=2)
  >>> g.neighbours.shape, int(g.valid.sum(1)[:6].min()), int(g.valid.sum())
  ((8, 2), 2, 12)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Graph(NamedTuple):
  neighbours: np.ndarray  # int32 [capacity, width]: neighbour slots (0 where invalid)
  valid: np.ndarray       # bool [capacity, width]


def width(capacity: int, k: int) -> int:
  """Neighbour slots per hospital: k for SecAgg+, capacity - 1 for the complete graph."""
  return k if 0 < k < capacity - 1 else max(capacity - 1, 1)


def neighbour_graph(rng: np.random.Generator, *, n: int, capacity: int, k: int) -> Graph:
  """The round's graph over slots 0..n-1 of `capacity`; k = 0 (or k >= capacity - 1): complete.

  Args:
    rng: the round's host generator (only used for SecAgg+).
    n: hospitals in the cohort (<= capacity).
    capacity: slots (the padded cohort).
    k: even number of neighbours for SecAgg+, or 0.
  """
  w = width(capacity, k)
  slots = np.arange(capacity)
  if w != k:  # complete graph: every other real slot
    others = np.array([np.delete(slots, i)[:w] for i in slots]) if capacity > 1 else (
        np.zeros((1, 1), np.int64))
    valid = (others < n) & (slots[:, None] < n) & (others != slots[:, None])
    return Graph(np.where(valid, others, 0).astype(np.int32), valid)
  order = rng.permutation(n)            # ring position -> slot
  where_on_ring = np.empty(n, np.int64)
  where_on_ring[order] = np.arange(n)
  offsets = np.concatenate([np.arange(1, k // 2 + 1), -np.arange(1, k // 2 + 1)])
  neighbours = np.zeros((capacity, k), np.int64)
  valid = np.zeros((capacity, k), bool)
  if n > 1:
    ring = order[(where_on_ring[:, None] + offsets[None]) % n]  # [n, k]
    neighbours[:n] = ring
    # On a ring shorter than k + 1, offsets repeat hospitals or reach oneself: keep each
    # neighbour once.
    for i in range(n):
      _, first = np.unique(ring[i], return_index=True)
      keep = np.zeros(k, bool)
      keep[first] = True
      valid[i] = keep & (ring[i] != i)
  return Graph(np.where(valid, neighbours, 0).astype(np.int32), valid)
