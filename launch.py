"""Launches a fedsim-dp run: flags -> config -> `fedsim.simulation.run`.

  python launch.py                                   # experiments/default.py
  python launch.py --config=experiments/default.py --config.num_rounds=50 \
      --config.num_clients=300 --workdir=runs/x
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/default.py", "Experiment config file (ml_collections).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where the run record goes.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host clusters).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and jax are chatty at INFO
  import jax  # after flag parsing, so --help is fast
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from fedsim import simulation
  try:  # config, data and privacy parameters: one clear line, before any compute
    setup = simulation.prepare(_CONFIG.value)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  summary = simulation.train(setup, _WORKDIR.value, progress=_PROGRESS.value)
  logging.info("summary: %s", summary)
  print(simulation.format_summary(summary, _WORKDIR.value))


if __name__ == "__main__":
  app.run(main)
