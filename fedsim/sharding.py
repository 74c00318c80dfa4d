"""The client axis laid out over devices (`jax.sharding.Mesh`).

With several devices, each block of clients is placed with its leading (client)
axis split over a 1-D mesh named "clients"; params stay replicated. The block
program runs under `jax.shard_map` (fedsim/blocks.py): every device trains its
share of the block and the weighted sums are `psum`-ed across devices. Test on a CPU with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "clients"


def client_mesh(devices=None) -> Mesh:
  """A 1-D mesh over `devices` (default: all) with axis name "clients"."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (AXIS,))


def client_put(mesh: Mesh) -> Callable:
  """`put(tree)`: device_put with every leaf's leading axis split over the mesh."""
  sharding = NamedSharding(mesh, PartitionSpec(AXIS))
  return lambda tree: jax.device_put(tree, sharding)


class ProcessBlocks:
  """Blocks of clients over the devices of several processes (`jax.process_count() > 1`).

  The mesh spans every process's devices; each process gathers only the block rows
  its own devices hold (`rows`: only those hospitals are loaded or drawn, see
  fedsim/data/population.py), and `put` assembles the global block from the
  processes' rows. The server state stays process-local (every process steps it
  identically from the same replicated sums): `replicate` hands it to the block
  program, `local` brings the program's replicated sums back, on device.
  """

  def __init__(self, mesh: Mesh, block: int):
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    self._utils, self.mesh = multihost_utils, mesh
    index = NamedSharding(mesh, PartitionSpec(AXIS)).addressable_devices_indices_map((block,))
    starts = [s[0].indices(block)[0] for s in index.values()]
    stops = [s[0].indices(block)[1] for s in index.values()]
    if max(stops) - min(starts) != sum(b - a for a, b in zip(starts, stops)):
      raise ValueError("this process's devices hold non-contiguous rows of the client mesh")
    self.rows = slice(min(starts), max(stops))

  def put(self, tree):
    """This process's rows `[rows, ...]` -> global arrays split over the mesh."""
    return self._utils.host_local_array_to_global_array(tree, self.mesh, PartitionSpec(AXIS))

  def replicate(self, tree):
    """A process-local value (the same in every process) -> a replicated global one."""
    return self._utils.host_local_array_to_global_array(tree, self.mesh, PartitionSpec())

  def local(self, tree):
    """A replicated global value -> this process's copy (on its devices, no host read)."""
    return self._utils.global_array_to_host_local_array(tree, self.mesh, PartitionSpec())
