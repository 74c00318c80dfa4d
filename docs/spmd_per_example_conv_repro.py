"""Minimal repro: GSPMD zeroes per-example conv weight gradients under a sharded vmap.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python docs/spmd_per_example_conv_repro.py

A vmap over clients (each with its own 3x3 conv weights) of vmap(grad) over each
client's examples, jitted with the client axis split over 8 (fake CPU) devices by
automatic partitioning, returns zero gradients for every client not on device 0
(jax/jaxlib 0.10.2, XLA:CPU). Per-client gradients (no inner vmap) are right, and
`jax.shard_map` over the same axis is right, which is why fedsim/blocks.py shards
the client axis with shard_map. Not yet checked on GPU; worth reporting upstream.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

CLIENTS, EXAMPLES, SIZE = 8, 4, 12


def loss(w, x):  # one example x [H, W, 1]
  y = jax.lax.conv_general_dilated(x[None], w, (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.sum(jnp.tanh(y) ** 2)


def per_example_grads(w, xs):
  return jax.vmap(jax.grad(loss), in_axes=(None, 0))(w, xs)


def main():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(CLIENTS, 3, 3, 1, 4)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(CLIENTS, EXAMPLES, SIZE, SIZE, 1)), jnp.float32)
  mesh = Mesh(np.array(jax.devices()), ("clients",))
  split = NamedSharding(mesh, PartitionSpec("clients"))
  f = jax.jit(jax.vmap(per_example_grads))
  reference = f(w, x)
  gspmd = f(jax.device_put(w, split), jax.device_put(x, split))
  manual = jax.jit(jax.shard_map(jax.vmap(per_example_grads), mesh=mesh,
                                 in_specs=PartitionSpec("clients"),
                                 out_specs=PartitionSpec("clients")))(
                                     jax.device_put(w, split), jax.device_put(x, split))
  norms = lambda g: np.linalg.norm(np.asarray(g).reshape(CLIENTS, -1), axis=1).round(2)
  print("jax", jax.__version__, "devices", jax.device_count())
  print("per-client gradient norms, unsharded:", norms(reference))
  print("per-client gradient norms, GSPMD:    ", norms(gspmd))
  print("per-client gradient norms, shard_map:", norms(manual))


if __name__ == "__main__":
  main()
