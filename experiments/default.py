"""Default run: 100 synthetic hospitals (chest-X-ray-like, 3 classes), private by default.

  python launch.py                      # this config
  python launch.py --config=experiments/default.py --config.num_rounds=50 --workdir=runs/x
  python -m privacy.compute_epsilon --config=experiments/default.py   # ledger, before running

DP-SGD inside every hospital at the patient level (all images of a patient clipped
as one unit), delta 1e-5, PLD accountant. 100 hospitals of ~600 images (~170
training patients each; label skew and per-hospital acquisition shift), 25 of them
(a fixed-size cohort, drawn from (seed, round) only) train each of 30 rounds: 2 local
steps of Poisson-sampled patients (~40 expected, truncated at 64 whole patients,
accounted as such), sigma 1.5, C 1, client SGD lr 0.3, FedAvgM at the server. A
hospital is charged only for the rounds it takes part in; the largest epsilon over
hospitals is about 4.7. It prints accuracy, balanced accuracy, AUROC, the worst
hospital's and the unseen hospitals' accuracy, and that epsilon (README: reference
table, with the same federation without privacy). Field names follow
shared/DESIGN.md; every other config in experiments/ starts from this one.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "classification"     # classification | segmentation (experiments/segmentation.py)
  c.num_clients = 100            # seen hospitals (training population)
  c.num_rounds = 30
  c.clients_per_round = 25       # fixed-size cohort; ignored when client_sampling_rate > 0
  c.client_sampling_rate = 0.0   # > 0: Poisson cohort with this rate
  c.eval_every = 3
  c.model = "cnn_tanh"           # cnn | cnn_tanh | cnn_gap | resnet18
  c.checkpoint_every = 10        # rounds between checkpoints (0: only at the end); an
                                 # unfinished run resumes from the latest, bit for bit

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"    # synthetic | medmnist | image_folder | tfds | dicom | nifti
  c.data.path = ""               # file or folder; for tfds the data set name
  c.data.data_dir = ""           # tfds data_dir
  c.data.image_size = 28
  c.data.max_slices_per_patient = 0  # nifti: at most this many slices per volume (0: all)
  c.data.examples_per_client = 600  # synthetic: mean images per hospital (all splits)
  c.data.population = "in_memory"  # in_memory | on_demand: synthetic hospitals drawn from
                                 # (seed, hospital) when sampled; memory bounded by the cohort
  c.data.eval_hospitals = 100    # on_demand: seen hospitals whose test split is evaluated
  c.data.partition = "prevalence"  # iid | dirichlet | prevalence | quantity | natural
  c.data.alpha = 1.0             # dirichlet concentration (smaller: more label skew)
  c.data.quantity_power = 1.5    # quantity skew: power-law exponent of hospital sizes
  c.data.site_csv = ""           # natural partition of real data: CSV image-or-patient -> site
  c.data.labels_csv = ""         # dicom: CSV key (path|SOPInstanceUID|...) -> label[, site]
  c.data.site_field = ""         # dicom: header keyword giving the site, e.g. InstitutionName
  c.data.window_center = 0.0     # dicom: fixed VOI window (LINEAR) when window_width > 0;
  c.data.window_width = 0.0      # 0: each file's Window Center / Width
  c.data.skip_unreadable = False  # dicom: skip (warn) files that are not readable images
  c.data.num_unseen = 5          # hospitals held out entirely (evaluated only)
  c.data.val_fraction = 0.1      # of each hospital's patients
  c.data.test_fraction = 0.2
  c.data.shift = 0.5             # per-hospital acquisition-shift strength (0: none)
  c.data.augment = False         # in-graph random crop / flip / rotation per client
  c.data.augment_crop_padding = 2
  c.data.augment_flip = False    # a mirrored chest film puts the heart on the wrong side
  c.data.augment_rotation = 10.0  # degrees

  c.client = ml_collections.ConfigDict()
  c.client.local_epochs = 1
  c.client.local_steps = 2       # > 0 overrides local_epochs
  c.client.batch_size = 100      # DP: the expected images of each Poisson step
  c.client.optimizer = "sgd"     # sgd | momentum | adam
  c.client.learning_rate = 0.3   # of the noised mean of clipped per-patient gradients
  c.client.momentum = 0.9
  c.client.prox_mu = 0.0         # FedProx proximal term

  c.server = ml_collections.ConfigDict()
  c.server.optimizer = "fedavgm"  # fedavg | fedavgm | fedadam | fedyogi | fedadagrad
  c.server.learning_rate = 1.0
  c.server.momentum = 0.9
  c.server.beta2 = 0.99
  c.server.tau = 1e-3            # adaptive optimisers' epsilon
  c.server.weighting = "examples"  # examples | uniform
  c.server.ema_decay = 0.0       # > 0: evaluate an exponential moving average of the
                                 # global model over rounds (post-processing: no privacy cost)

  c.dp = ml_collections.ConfigDict()
  c.dp.level = "patient"         # none | example | patient | client
  c.dp.noise_multiplier = 1.5
  c.dp.clip_norm = 1.0
  c.dp.delta = 1e-5
  c.dp.accountant = "pld"        # rdp | pld (truncated batches need pld)
  c.dp.target_epsilon = 0.0      # > 0: stop before exceeding this budget
  c.dp.max_batch_size = 64       # > 0: at most this many units a step (truncated
                                 # Poisson, PLD); 0: exact Poisson over the local set
  c.dp.clipping = "ghost"        # ghost | vmap: per-unit norms from one backward pass (ghost,
                                 # 1.7x faster here) or per-unit gradients (vmap, any model)
  c.dp.microbatch_size = 0       # > 0: per-example gradients in slices (memory)
  c.dp.adaptive_clip = False     # client level: clip_norm tracks a private quantile of norms
  c.dp.target_quantile = 0.5     # adaptive: fraction of hospitals left unclipped, in (0, 1)
  c.dp.clip_learning_rate = 0.2  # adaptive: S *= exp(-lr * (unclipped fraction - quantile))
  c.dp.clipped_count_stddev = 0.0  # adaptive: noise std on the count (0: expected cohort / 20)

  c.audit = ml_collections.ConfigDict()  # empirical epsilon lower bound (fedsim/canaries.py)
  c.audit.enabled = False        # True: canaries in the data, bounds in summary.json
  c.audit.kind = "input"         # input (noise image, random label; black box) |
                                 # gradient (crafted gradient; white box, DP-SGD only)
  c.audit.num_canaries = 200     # each included with probability 1/2
  c.audit.num_hospitals = 4      # hospitals that hold the canaries
  c.audit.significance = 0.05    # the bound exceeds the true epsilon w.p. <= this

  c.secure_agg = ml_collections.ConfigDict()  # Bonawitz et al. 2017, emulated in the round
  c.secure_agg.enabled = False   # True: hospitals send masked fixed-point updates; the
                                 # server unmasks only their modular sum
  c.secure_agg.bits = 32         # ring Z_(2^bits), in [2, 32]
  c.secure_agg.scale = 0.0       # quantisation levels per unit (0: largest that cannot overflow)
  c.secure_agg.clip_norm = 0.0   # L2 range of each delta (0: dp.clip_norm, dp.level='client')
  c.secure_agg.threshold = 0     # Shamir t (0: a majority of each neighbourhood)
  c.secure_agg.neighbours = 0    # SecAgg+ (Bell et al. 2020): even k; 0: complete graph
  c.secure_agg.dropout_before = 0.0  # probability a hospital drops before sending its input
  c.secure_agg.dropout_after = 0.0   # probability a sender drops before the unmasking
  c.secure_agg.rotate = True     # randomised Hadamard rotation before quantising
  c.secure_agg.distributed_noise = "none"  # none | skellam | gaussian: dp.level='client''s
                                 # noise added by the hospitals in shares instead of the server

  c.attack = ml_collections.ConfigDict()  # attack studies, run by launch.py instead of training
  c.attack.kind = "none"         # none | inversion | membership (experiments/attack_inversion.py,
                                 # experiments/membership.py)
  c.attack.workdir = ""          # attack this earlier run's checkpoint ('' : this config's run)

  c.engine = ml_collections.ConfigDict()
  c.engine.client_chunk = 0      # clients vmapped at once (0: chosen per backend)
  c.engine.client_block = 0      # clients per jitted call, scanned in chunks (0: per backend)
  c.engine.conv = "auto"         # auto | xla | patches: convolution lowering
  c.engine.unroll = 0            # local-step scan unroll (0: chosen per backend)
  c.engine.dp_gather = "auto"     # auto | fixed | bucketed: DP-SGD batch rows per block
  c.engine.ghost_rows = 0        # ghost clipping's passes over blocks of this many rows
                                 # (0: per backend; at least the batch: the whole batch)
  c.engine.shard_clients = True  # split each block's clients over all local devices
  return c
