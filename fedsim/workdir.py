"""The run directory: can it be written, does it hold a run, may we start or resume one.

A workdir holds one run. `config.json` names its config; `checkpoints/` lets an
unfinished run resume; `summary.json` (written last) says it finished. Opening a
workdir for a config therefore means one of:

- empty, or a finished run of the same config: start fresh (old results removed);
- an unfinished run of the same config with a checkpoint: resume from it;
- a run of another config (finished or not), or results of no known config:
  refuse, naming the fields that differ, unless `overwrite` (then start fresh).

Errors are one `ValueError` line naming the `--workdir` flag, so launch.py can
print them as they are, before any compute.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import ml_collections

from fedsim import io, tensorboard

CONFIG = "config.json"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
# What a run writes besides config.json; removed before a fresh start.
RESULTS = (SUMMARY, "metrics.jsonl", "metrics.csv", "privacy.json", "report.json",
           "curves.png", tensorboard.FOLDER, CHECKPOINTS,
           "encrypted_inference.json")  # privacy/encrypted_inference: of the old model
_MAX_LISTED = 3  # differing fields named in a refusal


def checkpoint_dir(workdir: str) -> str:
  """Where the orbax checkpoints of the run in `workdir` live."""
  return os.path.join(workdir, CHECKPOINTS)


def check_writable(workdir: str, *, create: bool = True) -> None:
  """Checks that the run record can be written to `workdir`, creating it if `create`.

  With `create=False` nothing is written: a missing `workdir` passes when its nearest
  existing parent is a folder this process may write in (launch.py checks this before
  any compute, so an error found later leaves no empty folder behind).

  Raises:
    ValueError: one line naming `--workdir` and why (a part of the path is a
      file, permission denied, ...).
  """
  where = f"--workdir={workdir!r}"
  if not workdir:
    raise ValueError(f"{where} is empty; give a folder for the run record")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"{where} is a file, not a folder")
  if not os.path.isdir(workdir):
    parent = _nearest_existing(workdir)
    if not os.path.isdir(parent):
      raise ValueError(f"{where} cannot be created: {parent!r} is a file")
    if not create:
      if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{where} cannot be created: permission denied in {parent!r}")
      return
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise ValueError(f"{where} cannot be created: {_reason(e)}") from None
  try:
    with tempfile.TemporaryFile(dir=workdir, prefix=".write_test"):
      pass
  except OSError as e:
    raise ValueError(f"{where} is not writable: {_reason(e)}") from None


def _nearest_existing(path: str) -> str:
  """The deepest existing path on the way to `path` (`.` for a relative path's start)."""
  while path and not os.path.exists(path):
    path = os.path.dirname(os.path.normpath(path))
  return path or "."


def _reason(error: OSError) -> str:
  return (error.strerror or str(error)).lower()


def config_record(config: ml_collections.ConfigDict) -> dict:
  """`config` as config.json stores it (plain JSON values, NaN and inf -> None)."""
  return io.to_json(json.loads(config.to_json()))


def check_run(workdir: str, config: ml_collections.ConfigDict, *,
              overwrite: bool = False) -> None:
  """Refuses a workdir that holds a run `config` must not replace; writes nothing.

  A run of a different config (finished or not), or a record whose config cannot be
  read, is refused unless `overwrite`. A run of the same config is never refused.

  Raises:
    ValueError: one line naming `--workdir`, the differing fields and `--overwrite`.
  """
  if overwrite:
    return
  stored = _stored_config(workdir)
  if stored is None:
    if any(os.path.exists(os.path.join(workdir, name)) for name in RESULTS):
      raise ValueError(_refusal(workdir, "holds run results without a readable config.json"))
    return
  differences = _differences(stored, config_record(config))
  if differences:
    listed = ", ".join(differences[:_MAX_LISTED])
    more = len(differences) - _MAX_LISTED
    listed += f", and {more} more" if more > 0 else ""
    raise ValueError(_refusal(workdir, f"holds a run of a different config ({listed})"))


def open_run(workdir: str, config: ml_collections.ConfigDict, *,
             overwrite: bool = False) -> int:
  """Opens `workdir` for a run of `config`: the round to resume from (0: fresh start).

  An unfinished run of the same config (its config.json, a checkpoint, no
  summary.json) resumes from its latest checkpoint. Otherwise the old results are
  removed and config.json is written (config, versions, backend, devices).

  Raises:
    ValueError: the workdir cannot be written, or holds a run of another config and
      `overwrite` is False (see `check_run`).
  """
  check_writable(workdir)
  check_run(workdir, config, overwrite=overwrite)
  if not overwrite:
    done = resume_round(workdir, config)
    if done:
      return done
  _remove_results(workdir)
  io.write_json_atomic(os.path.join(workdir, CONFIG),
                       {"config": config.to_dict(), "versions": io.versions(),
                        "backend": jax.default_backend(),
                        "devices": [str(d) for d in jax.devices()]})
  return 0


def resume_round(workdir: str, config: ml_collections.ConfigDict) -> int:
  """The round an unfinished run of the same config in `workdir` can resume from (0: none)."""
  if (os.path.exists(os.path.join(workdir, SUMMARY))
      or not os.path.isdir(checkpoint_dir(workdir))
      or _stored_config(workdir) != config_record(config)):
    return 0
  from fedsim import checkpoint  # orbax is slow to import; only needed here
  return checkpoint.latest_step(checkpoint_dir(workdir)) or 0


def _stored_config(workdir: str) -> dict | None:
  """The config recorded in `workdir`'s config.json; None if absent or unreadable."""
  try:
    with open(os.path.join(workdir, CONFIG)) as f:
      stored = json.load(f).get("config")
  except (OSError, ValueError, AttributeError):
    return None
  return stored if isinstance(stored, dict) else None


def _differences(old: dict, new: dict) -> list[str]:
  """`field: old -> new` for every dotted field whose value differs, in `new`'s order."""
  old, new = _flatten(old), _flatten(new)
  show = lambda tree, key: repr(tree[key]) if key in tree else "(absent)"
  keys = list(new) + [k for k in old if k not in new]
  return [f"{k}: {show(old, k)} -> {show(new, k)}" for k in keys
          if k not in old or k not in new or old[k] != new[k]]


def _flatten(tree: dict, prefix: str = "") -> dict:
  """Nested dicts -> {"a.b": value}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _refusal(workdir: str, what: str) -> str:
  return (f"--workdir={workdir!r} {what}; use --overwrite to replace it, "
          "or another --workdir")


def _remove_results(workdir: str) -> None:
  """Removes what an earlier run wrote, summary.json first (so nothing looks complete)."""
  for name in RESULTS:
    path = os.path.join(workdir, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    elif os.path.lexists(path):
      os.remove(path)


def attacked_run(path: str) -> tuple[ml_collections.ConfigDict, int]:
  """The config of the earlier run in `path` and its latest checkpointed round.

  For `attack.workdir`: ValueError naming the field when `path` holds no run or no
  checkpoint.
  """
  from fedsim import checkpoint  # pylint: disable=import-outside-toplevel
  record = os.path.join(path, CONFIG)
  if not os.path.isfile(record):
    raise ValueError(f"attack.workdir={path!r} holds no run (no {CONFIG})")
  directory = checkpoint_dir(path)
  step = checkpoint.latest_step(directory) if os.path.isdir(directory) else None
  if step is None:
    raise ValueError(f"attack.workdir={path!r} holds no checkpoint to attack")
  with open(record) as f:
    return ml_collections.ConfigDict(json.load(f)["config"]), step
