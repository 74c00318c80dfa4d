"""MedMNIST across 30 hospitals with label skew, DP per image (PneumoniaMNIST by default).

MedMNIST v2 (Yang et al. 2023, Scientific Data) is published at zenodo,
doi:10.5281/zenodo.10519652 (medmnist.com). Download one single-label 2D file,
`pneumoniamnist.npz` (28 px, 4 MB) or `pneumoniamnist_64.npz` (64 px), and put it at

  data/pneumoniamnist.npz        (the "64" variant reads data/pneumoniamnist_64.npz)

e.g. `curl -L -o data/pneumoniamnist.npz
"https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1"`.

Any other single-label 2D MedMNIST file works with `--config.data.path=...`
(bloodmnist, pathmnist, dermamnist, ...; chestmnist is multi-label and refused).

  python launch.py --config=experiments/medmnist.py --workdir=runs/medmnist
  python launch.py --config=experiments/medmnist.py:64 --workdir=runs/medmnist64
  python launch.py --config=experiments/medmnist.py \
      --config.data.path=data/bloodmnist.npz --workdir=runs/blood

MedMNIST carries no patient ids, so every image is its own patient and the
privacy unit here is the image (`dp.level=example`; for PneumoniaMNIST, whose
children may have several X-rays, this overstates the protection of a child:
use experiments/pneumonia.py on the original Kermany folder for patient-level
DP). The run prints a progress bar, then e.g.

  rounds 60  accuracy ...  AUROC ...  balanced accuracy ...  worst hospital ...
  privacy: (..., 1e-05)-DP per example, rdp accountant (max over hospitals)
  ... s; record in runs/medmnist

The reported epsilon is the largest over hospitals. For PneumoniaMNIST (5,856
images, Dirichlet(1.0) over 33 hospitals) the median hospital ends near 4.4 and
the largest near 13: the smallest hospitals hold ~10 training images, are
sampled at rate ~1 and get no amplification. The exact ledger, before training:

  python -m privacy.compute_epsilon --config=experiments/medmnist.py
"""

import ml_collections

from experiments import default

VARIANTS = ("", "64")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """The MedMNIST config; `variant` "64" reads the 64 px file (see the docstring)."""
  if variant not in VARIANTS:
    raise ValueError(f"experiments/medmnist.py variant {variant!r} must be one of "
                     f"{list(VARIANTS)}")
  c = default.get_config()
  c.num_clients = 30
  c.clients_per_round = 10
  c.num_rounds = 60
  c.eval_every = 5
  c.model = "cnn"

  c.data.source = "medmnist"
  c.data.path = "data/pneumoniamnist.npz"
  c.data.image_size = 28
  c.data.partition = "dirichlet"
  c.data.alpha = 1.0              # 0.5 leaves hospitals of a few images
  c.data.num_unseen = 3
  c.data.shift = 0.5               # mild simulated scanner differences between hospitals
  c.data.augment = True
  c.data.augment_crop_padding = 2
  c.data.augment_flip = False      # chest X-rays: see fedsim/augment.py
  c.data.augment_rotation = 10.0

  c.client.local_epochs = 1
  c.client.local_steps = 3
  c.client.batch_size = 16
  c.client.optimizer = "sgd"
  c.server.optimizer = "fedavg"
  c.client.learning_rate = 0.1

  c.dp.level = "example"           # MedMNIST: one image = one patient
  c.dp.noise_multiplier = 2.0
  c.dp.clip_norm = 1.0
  c.dp.delta = 1e-5
  c.dp.accountant = "rdp"
  c.dp.max_batch_size = 0          # exact Poisson

  if variant == "64":
    c.data.path = "data/pneumoniamnist_64.npz"
    c.data.image_size = 64
    c.data.augment_crop_padding = 4
  return c
