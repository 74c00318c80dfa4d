"""Example-level DP-SGD in every hospital: 100 synthetic hospitals.

  python launch.py --config=experiments/dp_sgd.py --workdir=runs/dp_sgd
  python -m privacy.compute_epsilon --config=experiments/dp_sgd.py   # ledger, before running

Each image (not each patient) is the privacy unit. 100 hospitals of ~1,000 training
images, 10 a round; every local step Poisson-samples images at rate ~0.2 (200
expected), truncated at 240 (accounted by PLD, truncations counted), sigma 1.5.
Prints accuracy, AUROC and the maximum epsilon over hospitals (delta 1e-5); see
the README's reference table for what it reaches.
"""

from experiments import default


def get_config():
  c = default.get_config()
  c.num_clients = 100
  c.clients_per_round = 10
  c.eval_every = 10
  c.data.examples_per_client = 1400
  c.client.local_steps = 4
  c.client.batch_size = 200          # expected images per Poisson step
  c.client.learning_rate = 1.5
  c.server.optimizer = "fedavg"
  c.data.num_unseen = 5
  c.dp.level = "example"
  c.dp.noise_multiplier = 1.5
  c.dp.max_batch_size = 240        # examples per step at most (expected 200)
  c.dp.clipping = "ghost"          # per-example norms without per-example gradients
  return c
