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
curves.png. The soft Dice term averages over the classes present in a slice (absent
ones are the cross-entropy's), so lesions weigh as much as the liver where they are;
the server takes FedAvgM steps of 2 (at 1 the 15 rounds found almost no lesion pixel:
pooled lesion Dice 0.09). Seed 0 printed `rounds 15  Dice 0.555 (liver 0.858, lesion
0.253)  IoU 0.486  HD95 14.740 px  worst hospital Dice 0.508  unseen hospitals Dice 0.572`
and epsilon 3.79; pooled over the test pixels, lesion Dice 0.396, liver 0.867 (report.json
`global_dice_*`). The per-slice means count a slice with no lesion in truth or
prediction as Dice 1 and a false lesion pixel on a lesion-free slice as 0 (README).
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
  c.server.learning_rate = 2.0
  c.dp.level = "patient"
  c.dp.noise_multiplier = 1.5
  c.dp.clip_norm = 1.0
  c.dp.max_batch_size = 40            # patients per step at most
  c.dp.clipping = "ghost"
  return c
