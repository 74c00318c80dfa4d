"""Orbax checkpoints of the server state (params and optimiser state) per round."""

from __future__ import annotations

import os

import orbax.checkpoint as ocp


def save(directory: str, step: int, state) -> None:
  """Saves `state` (a pytree) as step `step` under `directory`, keeping the last 2."""
  with ocp.CheckpointManager(os.path.abspath(directory),
                             options=ocp.CheckpointManagerOptions(max_to_keep=2)) as mngr:
    mngr.save(step, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()


def restore(directory: str, abstract_state, step: int | None = None):
  """Restores the step `step` (default: latest) shaped like `abstract_state`."""
  with ocp.CheckpointManager(os.path.abspath(directory)) as mngr:
    step = mngr.latest_step() if step is None else step
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))


def latest_step(directory: str) -> int | None:
  """The latest saved step under `directory` (None when there is none)."""
  with ocp.CheckpointManager(os.path.abspath(directory)) as mngr:
    return mngr.latest_step()
