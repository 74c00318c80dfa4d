"""Gradient inversion against the updates hospitals send (issue 13, items 1-3 and 6).

  python launch.py --config=experiments/attack_inversion.py --workdir=runs/inv
  python launch.py --config=experiments/attack_inversion.py --workdir=runs/inv_default \
      --config.attack.workdir=runs/default     # the late model: an earlier run's checkpoint

The federation is the default's at 28 px with 20 hospitals, 5 a round (each hospital is
drawn in a quarter of the rounds, as in the default, so its epsilon is the default's).
For each setting of fedsim/inversion_study.py `settings` (no defence with 1 image,
with 4 and 16 images over 4 local steps, DLG, clipping only, patient-level DP-SGD at
several sigmas including the default's 1.5, example-level DP-SGD, client-level DP,
a secure-aggregation sum over 4 hospitals, and the update of round 1 vs one after
`late_rounds` rounds of training) the engine computes the update the server would see,
Inverting Gradients inverts it (2 restarts), and a CSV row records
PSNR / SSIM and the setting's epsilon. Prints the table; writes inversion.csv,
inversion.png (originals beside reconstructions) and summary.json. README: the
measured table.
"""

import ml_collections

from experiments import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.num_clients = 20
  c.clients_per_round = 5
  c.data.num_unseen = 1
  c.attack.kind = "inversion"
  a = c.attack.inversion = ml_collections.ConfigDict()
  a.settings = ("none", "dlg", "batches", "clipping", "dp_sgd", "example", "client",
                "client_released", "secure_agg", "late")  # the rows to run, in order
  a.steps = 400                  # Inverting Gradients: signed-Adam steps (breaching: 24,000)
  a.learning_rate = 0.1          # / 10 at 3/8, 5/8 and 7/8 of the steps
  a.tv_weight = 0.01             # total-variation prior
  a.restarts = 2                 # random initialisations per victim
  a.targets = 1                  # victims (updates) attacked at once, vmapped
  a.first_hospital = 0           # victims are hospitals first_hospital, +1, ...
  a.dlg_steps = 300              # DLG: L2 gradient matching
  a.dlg_learning_rate = 1.0
  a.dlg_optimizer = "lbfgs"      # lbfgs | adam
  a.batch_sizes = (4, 16)        # images per update in the multi-image rows
  a.local_steps = 4              # local steps of those rows (model difference)
  a.noise_multipliers = (0.1, 0.5, 1.5)  # patient-level DP-SGD rows (1.5: the default's);
                                 # below ~0.05 the PLD accountant runs out of memory
  a.secure_agg_hospitals = 4     # k: the attacker sees only the sum of k updates
  a.late_rounds = 5              # rounds trained before the "late" update
  return c
