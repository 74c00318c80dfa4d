"""Paediatric pneumonia across hospitals: the published federated set-up, with DP per patient.

Three hospitals train a ResNet-18 (GroupNorm) to tell normal, bacterial and viral
pneumonia apart on chest X-rays (Kermany et al. 2018), every hospital running
DP-SGD with the patient as the privacy unit (all images of one child clipped
together), the test split never used for model selection.

Data: "Labeled Optical Coherence Tomography (OCT) and Chest X-Ray Images for
Classification", Kermany, Zhang, Goldbaum (2018), Mendeley Data,
doi:10.17632/rscbjbr9sj.2 (ChestXRay2017.zip), or the Kaggle copy
"paultimothymooney/chest-xray-pneumonia". Unpack it so that

  data/chest_xray/{train,test}/{NORMAL,PNEUMONIA}/*.jpeg   (Kaggle adds val/)

(a `data/chest_xray/chest_xray/...` nesting, as in the Kaggle zip, is found too).
The first run decodes the 5,856 JPEGs (a minute or two) and caches them in
`data/chest_xray/.fedsim_cache`; later runs read the cache in seconds.

  python launch.py --config=experiments/pneumonia.py --workdir=runs/pneumonia
  python launch.py --config=experiments/pneumonia.py:hospitals100 --workdir=runs/p100
  python launch.py --config=experiments/pneumonia.py:natural \
      --config.data.site_csv=data/chest_xray_sites.csv --workdir=runs/pnat

Variants (the string after the colon):
  ""            3 hospitals, iid by patient, ResNet-18 at 224 px (needs a GPU; the
                ResNet at 224 px with per-patient clipping is hours on a CPU).
  natural       as "" but hospitals are your real sites: `data.site_csv` maps the
                loader's integer patient ids (the rank of the sorted patient keys,
                e.g. "IM-0115", "person123") to a site; one hospital per site.
  hospitals100  100 hospitals (+5 unseen), Dirichlet(1.0) label skew, small CNN at
                64 px, 20 hospitals per round: a scale study that runs on a CPU.

The run prints a progress bar (round, loss, accuracy, epsilon), then e.g.

  rounds 30  accuracy ...  AUROC ...  balanced accuracy ...  worst hospital ...
  privacy: (eps, 1e-05)-DP per patient, rdp accountant (max over hospitals)
  ... s; record in runs/pneumonia

The epsilon is the accountant's, the largest over hospitals (3 iid hospitals of
~1,370 training images, 43 exact Poisson steps of expected 32 images per round,
sigma 1.0, 30 rounds, RDP); print it before training with compute_epsilon below.
Exact Poisson computes per-patient gradients over the whole local set at every
step (microbatched, 32 at a time): budget an accelerator. For hospitals100 the
median hospital ends near 4.8 but the
largest epsilon is about 14: a Dirichlet split leaves some hospitals with ~10
training images, which are sampled at rate ~1 and so get no amplification. Print
the exact per-hospital ledger before training with

  python -m privacy.compute_epsilon --config=experiments/pneumonia.py:hospitals100
"""

import ml_collections

from experiments import default

VARIANTS = ("", "natural", "hospitals100")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """The pneumonia config; `variant` is one of VARIANTS (see the module docstring)."""
  if variant not in VARIANTS:
    raise ValueError(f"experiments/pneumonia.py variant {variant!r} must be one of "
                     f"{list(VARIANTS)}")
  c = default.get_config()
  c.num_clients = 3
  c.clients_per_round = 3          # every hospital, every round
  c.num_rounds = 30
  c.eval_every = 5
  c.model = "resnet18"             # GroupNorm: no batch statistics leak across patients

  c.data.source = "image_folder"
  c.data.path = "data/chest_xray"
  c.data.image_size = 224
  c.data.partition = "iid"         # by patient; "natural" needs data.site_csv
  c.data.num_unseen = 0
  c.data.shift = 0.0               # real scanners: no simulated acquisition shift
  c.data.augment = True
  c.data.augment_crop_padding = 12  # pixels at 224 (about 5 %)
  c.data.augment_flip = False      # mirrored chest X-rays are anatomically wrong
  c.data.augment_rotation = 10.0   # degrees

  c.client.local_epochs = 1
  c.client.local_steps = 3
  c.client.batch_size = 32         # expected images per Poisson step
  c.client.optimizer = "adam"
  c.server.optimizer = "fedavg"
  c.client.learning_rate = 1e-3

  c.dp.level = "patient"
  c.dp.noise_multiplier = 1.0
  c.dp.clip_norm = 1.0
  c.dp.delta = 1e-5                # well below 1 / patients per hospital (~1e-3)
  c.dp.accountant = "rdp"
  c.dp.max_batch_size = 0          # exact Poisson (RDP)
  c.dp.clipping = "vmap"
  c.dp.microbatch_size = 32        # per-example gradients 32 at a time (bounds memory)

  if variant == "natural":
    c.data.partition = "natural"
    c.data.site_csv = "data/chest_xray_sites.csv"
  elif variant == "hospitals100":
    _hospitals100(c)
  return c


def _hospitals100(c: ml_collections.ConfigDict) -> None:
  """100 small hospitals with label skew: small CNN, 64 px, Dirichlet split."""
  c.num_clients = 100
  c.clients_per_round = 20
  c.num_rounds = 100
  c.eval_every = 10
  c.model = "cnn"
  c.data.image_size = 64
  c.data.partition = "dirichlet"
  c.data.alpha = 1.0              # 0.5 leaves hospitals of 1 training image
  c.data.num_unseen = 5
  c.data.augment_crop_padding = 4
  c.client.batch_size = 8          # hospitals hold ~40 training images
  c.client.optimizer = "sgd"
  c.client.learning_rate = 0.1
  c.dp.noise_multiplier = 2.5      # small hospitals sample at rate ~1: see the docstring
  c.dp.accountant = "rdp"
  c.dp.max_batch_size = 0          # exact Poisson over the whole (small) local set
  c.dp.clipping = "vmap"
