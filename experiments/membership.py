"""Membership inference (loss threshold, LiRA) against federated models (issue 13, item 4).

  python launch.py --config=experiments/membership.py --workdir=runs/mia

Four of the default's synthetic hospitals (16 px, ~55 training images each), every
one in each of 20 rounds of 4 local steps; 16 federations trained as one vmapped
program (fedsim/membership_study.py), each on a random half of every hospital's
training images; every model is attacked with the other 15 as shadows. Settings:
no privacy, and example-level DP-SGD at the default's sigma (1.5, C 1). Prints AUC
and TPR at 0.1% / 1% FPR per attack and setting; writes membership.csv,
membership.png (ROC curves) and summary.json. README: the measured table.
"""

import ml_collections

from experiments import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.num_clients = 4
  c.clients_per_round = 4        # every hospital, every round
  c.num_rounds = 20
  c.data.image_size = 16
  c.data.examples_per_client = 80
  c.data.num_unseen = 1
  c.client.local_steps = 4
  c.client.batch_size = 16       # DP: expected examples of a Poisson step
  c.client.learning_rate = 0.3
  c.server.optimizer = "fedavg"  # the study's server is plain FedAvg (server lr 1)
  c.dp.accountant = "rdp"
  c.dp.max_batch_size = 0        # exact Poisson (example level)
  c.attack.kind = "membership"
  a = c.attack.membership = ml_collections.ConfigDict()
  a.num_models = 16              # federations trained at once; each a target, the rest shadows
  a.settings = ("none", "example")  # none | example (DP-SGD at dp.noise_multiplier)
  return c
