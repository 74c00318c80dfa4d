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
