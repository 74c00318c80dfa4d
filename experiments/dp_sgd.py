"""Example-level DP-SGD in every hospital: 100 synthetic hospitals.

  python launch.py --config=experiments/dp_sgd.py --workdir=runs/dp_sgd
  python -m privacy.compute_epsilon --config=experiments/dp_sgd.py   # ledger, before running

Like the default run, with each image (not each patient) as the privacy unit.
Prints accuracy, AUROC and the maximum epsilon over hospitals (RDP, delta 1e-5).
"""

from experiments import default


def get_config():
  c = default.get_config()
  c.dp.level = "example"
  return c
