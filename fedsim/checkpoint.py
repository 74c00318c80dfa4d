"""Orbax checkpoints of the server state (params and optimiser state) per round."""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def _alone(**options) -> dict:
  """Manager options under several processes (launch.py --distributed): only process 0
  saves (the server state is the same in every process) and no process waits for another."""
  if jax.process_count() == 1:
    return {"options": ocp.CheckpointManagerOptions(**options)} if options else {}
  this = jax.process_index()
  alone = ocp.options.MultiprocessingOptions(primary_host=this, active_processes={this})
  return {"options": ocp.CheckpointManagerOptions(multiprocessing_options=alone, create=False,
                                                  **options)}


def save(directory: str, step: int, state) -> None:
  """Saves `state` (a pytree) as step `step` under `directory`, keeping the last 2."""
  if jax.process_count() > 1:
    os.makedirs(directory, exist_ok=True)  # orbax creates it only with one process
  with ocp.CheckpointManager(os.path.abspath(directory), **_alone(max_to_keep=2)) as mngr:
    mngr.save(step, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()


def restore(directory: str, like=None, step: int | None = None):
  """Restores step `step` (default: latest) shaped like the pytree `like`.

  `like` of numpy arrays restores to host memory, whatever devices saved it;
  `like=None` does that for the saved tree (e.g. to read a checkpoint written
  on 8 devices from a process that has one).
  """
  with ocp.CheckpointManager(os.path.abspath(directory), **_alone(),
                             item_handlers=ocp.StandardCheckpointHandler()) as mngr:
    step = mngr.latest_step() if step is None else step
    if like is None:
      metadata = mngr.item_metadata(step)
      metadata = getattr(metadata, "tree", metadata)
      like = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), metadata)
    return mngr.restore(step, args=ocp.args.StandardRestore(like))


def latest_step(directory: str) -> int | None:
  """The latest saved step under `directory` (None when there is none)."""
  with ocp.CheckpointManager(os.path.abspath(directory), **_alone()) as mngr:
    return mngr.latest_step()
