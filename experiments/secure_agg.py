"""Secure aggregation (Bonawitz et al. 2017) over DP-FedAvg: 100 synthetic hospitals, ~1 minute.

  python launch.py --config=experiments/secure_agg.py --workdir=runs/secagg
  python launch.py --config=experiments/secure_agg.py --config.secure_agg.bits=12   # coarser ring
  python launch.py --config=experiments/secure_agg.py --config.secure_agg.neighbours=6  # SecAgg+
  python launch.py --config=experiments/secure_agg.py --config.secure_agg.threshold=10 \
      --config.secure_agg.distributed_noise=skellam  # the hospitals add the noise

Each round ~20 hospitals (Poisson, q = 0.2) train, clip their update to S = dp.clip_norm,
encode it in Z_(2^20) after a randomised Hadamard rotation (scale: the largest at which the
planned cohort cannot overflow), and send it masked with pairwise and self masks; 5% of them
drop before sending and 5% after, and the server rebuilds the seeds it needs from Shamir
shares (threshold: a majority of the cohort) before it decodes the sum, adds the DP-FedAvg
noise to it and divides. metrics.jsonl reports per evaluated round the quantisation error
(relative to the plaintext sum of the senders' clipped updates), overflowed coordinates,
survivors and dropouts; summary.json the secure-aggregation parameters. With distributed
noise the server adds none: each sender adds a Skellam share sized so that any t - 1 others
carry DP-FedAvg's noise, and each round is charged the noise its senders actually carried
(`secagg_noise_multiplier`; 3 rounds, t = 10, 20% dropouts before sending: epsilon 1.85 vs
2.82 for the configured multiplier every round; docs/secure_aggregation.md).

What secure aggregation costs in utility, as sweeps (fedsim/sweep.py; a table and a plot of
balanced accuracy against the axis, README "Secure aggregation"):

  python launch.py --config=experiments/secure_agg.py:bits --workdir=runs/secagg_bits
  python launch.py --config=experiments/secure_agg.py:dropout --workdir=runs/secagg_dropout
"""

import ml_collections

from experiments import dp_fedavg

STUDIES = {
    "bits": ("bits", (8, 12, 16, 20, 32)),         # ring size, no dropouts
    "dropout": ("dropout_before", (0.0, 0.1, 0.2, 0.3)),  # at 20 bits, none after sending
}


def get_config(variant: str = ""):
  c = dp_fedavg.get_config()
  c.num_clients = 100
  c.num_rounds = 20
  c.eval_every = 5
  c.client_sampling_rate = 0.2
  c.data.num_unseen = 5
  c.secure_agg.enabled = True
  c.secure_agg.bits = 20
  c.secure_agg.dropout_before = 0.05
  c.secure_agg.dropout_after = 0.05
  if not variant:
    return c
  if variant not in STUDIES:
    raise ValueError(f"experiments/secure_agg.py:{variant}: the variant must be one of "
                     f"{sorted(STUDIES)} (or none: one run)")
  field, values = STUDIES[variant]
  c.secure_agg.dropout_before = c.secure_agg.dropout_after = 0.0
  c.sweep = ml_collections.ConfigDict()
  c.sweep.axes = ml_collections.ConfigDict()
  c.sweep.axes.secure_agg = ml_collections.ConfigDict()
  c.sweep.axes.secure_agg[field] = values
  c.sweep.metric = "balanced_accuracy"
  c.sweep.epsilon_bands = (8.0,)
  c.sweep.selection_eta = 1.0
  c.sweep.selection_mean = 0.0
  c.sweep.execution = "auto"       # fedsim/sweep.py (secure aggregation runs one after another)
  c.sweep.group_size = 0
  return c
