r"""Launches a fedsim-dp run: flags -> config -> `fedsim.simulation.train`.

  python launch.py                                   # experiments/default.py
  python launch.py --config=experiments/default.py --config.num_rounds=50 \
      --config.num_clients=300 --workdir=runs/x
  python launch.py --workdir=runs/x --overwrite      # replace a run of another config

A mistake on the command line (a config file that does not exist, an unknown or
badly typed `--config.*` field, a workdir that cannot be written or that holds a
run of another config) stops with one line `error: ...`, before any compute.
"""

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = "experiments/default.py"
# No default here: ml_collections would load it, and apply --config.* overrides, at
# import time, outside any error handling; `parse_flags` supplies it instead.
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, f"Experiment config file (ml_collections); default {_DEFAULT_CONFIG}.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where the run record goes.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace a run of another config (or a finished one) in --workdir.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "One federation over several processes' devices (jax.distributed.initialize). The "
    "three flags below, or the cluster's environment (SLURM, Open MPI, TPU) when unset.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "--distributed: host:port of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "--distributed: processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "--distributed: this process, 0-based.")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with command-line mistakes as one `error:` line, no traceback."""
  argv, path = _with_config_file(argv)
  if not os.path.isfile(path):
    sys.exit(f"error: --config={path!r}: no such file")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # a bad value; an error in get_config comes with its traceback
    lines = [line for line in str(e).splitlines() if line.strip()]
    sys.exit(f"error: {lines[0]}" + (f" {lines[-1]}" if len(lines) > 1 else ""))
  except (AttributeError, KeyError) as e:  # ml_collections: an override names no field
    name = str(e).strip("\"'")
    pattern = rf"--?(no)?config\.([\w.]+\.)?{re.escape(name)}(\.[\w.]+)?(=.*)?"
    flag = next((a.split("=")[0] for a in argv if re.fullmatch(pattern, a)), "--config.*")
    sys.exit(f"error: {flag}: {path} has no field {name!r}")


def _with_config_file(argv: list[str]) -> tuple[list[str], str]:
  """`argv` with `--config=PATH` spelled out (the default when absent), and PATH's file."""
  given = [i for i, arg in enumerate(argv) if re.fullmatch(r"--?config(=.*)?", arg)]
  if not given:
    argv = [argv[0], f"--config={_DEFAULT_CONFIG}", *argv[1:]]
  elif "=" not in argv[given[-1]]:  # --config PATH
    i = given[-1]
    argv = [*argv[:i], "--config=" + "".join(argv[i + 1:i + 2]), *argv[i + 2:]]
  value = next(arg for arg in reversed(argv) if re.fullmatch(r"--?config=.*", arg))
  return argv, value.split("=", 1)[1].split(":", 1)[0]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and jax are chatty at INFO
  import jax  # after flag parsing, so --help is fast
  config, workdir, overwrite = _CONFIG.value, _WORKDIR.value, _OVERWRITE.value
  from fedsim import workdir as workdir_lib
  if _DISTRIBUTED.value:
    workdir, overwrite = _initialize_distributed(jax, workdir, config)
  if "sweep" in config:  # many runs, one table (fedsim/sweep.py)
    return _sweep(config, workdir)
  try:  # workdir, config, data and privacy parameters: one clear line, before any compute
    workdir_lib.check_writable(workdir, create=False)  # the run creates it
    workdir_lib.check_run(workdir, config, overwrite=overwrite)
    runner = _runner(config)
    setup = runner.prepare(config)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  summary = runner.train(setup, workdir, progress=_PROGRESS.value and jax.process_index() == 0,
                         overwrite=overwrite)
  logging.info("summary: %s", summary)
  print(runner.format_summary(summary, workdir))


def _initialize_distributed(jax, workdir: str, config) -> tuple[str, bool]:
  """Joins the processes of one federation; returns where this process writes (and
  whether it replaces what is there).

  Process 0 writes the run record (and the checkpoints) to --workdir; process i > 0
  writes its copy of the record, unread, to WORKDIR.process<i>. Resuming an unfinished
  distributed run is refused (every process must resume from one checkpoint: not yet).
  """
  from jax.experimental import multihost_utils

  from fedsim import workdir as workdir_lib
  # CPU devices talk over gloo (a rehearsal on one machine); GPUs use NCCL regardless.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  done = 0 if _OVERWRITE.value else workdir_lib.resume_round(workdir, config)
  multihost_utils.sync_global_devices("fedsim: resume checked")  # before process 0 writes
  if done:
    sys.exit(f"error: --workdir={workdir} holds an unfinished run (round {done}); resuming "
             "a --distributed run is not supported yet: pass --overwrite to start again")
  index = jax.process_index()
  if index == 0:
    return workdir, _OVERWRITE.value
  return f"{workdir.rstrip(os.sep)}.process{index}", True  # a scratch copy, replaced


def _runner(config):
  """What runs `config` (`prepare`, `train`, `format_summary`): the training loop, or
  the attack study `attack.kind` names."""
  if config.attack.kind == "inversion":
    from fedsim import inversion_study
    return inversion_study
  if config.attack.kind == "membership":
    from fedsim import membership_study
    return membership_study
  from fedsim import simulation
  return simulation


def _sweep(config, workdir):
  """A config with a `sweep` section: every configuration its own run, then the table."""
  from fedsim import sweep
  try:  # every axis and configuration checked (and calibrated) before any training
    configurations = sweep.plan(config, workdir, overwrite=_OVERWRITE.value)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  _, text = sweep.run(config, workdir, progress=_PROGRESS.value, overwrite=_OVERWRITE.value,
                      configurations=configurations)
  print(text)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
