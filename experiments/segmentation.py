"""Federated liver segmentation with patient-level DP-SGD (PriMIA's second study).

  python launch.py --config=experiments/segmentation.py --workdir=runs/segmentation
  python -m privacy.compute_epsilon --config=experiments/segmentation.py   # ledger first

Synthetic abdominal CT slices (fedsim/data/synthetic_segmentation.py: liver and
lesion masks, patients of 3-8 contiguous slices, each hospital its own scanner),
32x32, split by patient into 10 hospitals plus 2 unseen ones. A small U-Net with
GroupNorm (fedsim/models.py) is trained with per-pixel cross-entropy + soft Dice;
every hospital runs DP-SGD with the patient as the privacy unit (all slices of a
patient clipped together, ghost clipping), truncated Poisson batches, PLD
accounting. Prints Dice, IoU, Hausdorff-95, the worst hospital's and the unseen
hospitals' Dice and the largest epsilon over hospitals, and writes
segmentations.png (test slices, true masks and predictions side by side) beside
curves.png. Seed 0 printed `rounds 15  Dice 0.819 (liver 0.806, lesion 0.832)  IoU 0.759
HD95 5.195 px  worst hospital Dice 0.800  unseen hospitals Dice 0.814` and epsilon 3.79:
the liver is outlined, lesions are not found yet (the lesion Dice is slices with no lesion
in truth or prediction; README, reference table).
"""

from experiments import default


def get_config():
  c = default.get_config()
  c.task = "segmentation"
  c.model = "unet"
  c.num_clients = 10
  c.clients_per_round = 10
  c.num_rounds = 15
  c.eval_every = 5
  c.data.image_size = 32
  c.data.examples_per_client = 1200   # slices per hospital, ~270 patients
  c.data.num_unseen = 2
  c.data.partition = "iid"
  c.client.local_steps = 2
  c.client.batch_size = 120           # expected slices per Poisson step (~27 patients)
  c.client.optimizer = "sgd"
  c.client.learning_rate = 1.0
  c.server.optimizer = "fedavgm"
  c.dp.level = "patient"
  c.dp.noise_multiplier = 1.5
  c.dp.clip_norm = 1.0
  c.dp.max_batch_size = 40            # patients per step at most
  c.dp.clipping = "ghost"
  return c
