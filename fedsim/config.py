"""Config validation: every field checked before any compute.

A bad field stops the run with one `ValueError` whose message names the field and
what is allowed, e.g. `client.learning_rate=-0.1 must be > 0`.
"""

from __future__ import annotations

import ml_collections

from fedsim import aggregation, canaries, models, partition, server, strategy
from fedsim.client import CLIENT_OPTIMIZERS
from privacy import adaptive_clipping, validation
from privacy.secure_agg import protocol

DATA_SOURCES = ("synthetic", "medmnist", "image_folder", "tfds", "dicom", "nifti")
TASKS = ("classification", "segmentation")
SEGMENTATION_SOURCES = ("synthetic", "nifti")  # sources with masks
# data fields only the DICOM loader reads (fedsim/data/dicom.py); default: off
DICOM_FIELDS = ("labels_csv", "site_field", "window_center", "window_width",
                "skip_unreadable")
DP_LEVELS = ("none", "example", "patient", "client")
ACCOUNTANTS = ("rdp", "pld")
CONV_CHOICES = ("auto",) + models.CONV_IMPLS
POPULATIONS = ("in_memory", "on_demand")
ON_DEMAND_PARTITIONS = ("iid", "prevalence")  # fedsim/data/population.py


def _check(ok: bool, field: str, value, allowed: str) -> None:
  validation.check(ok, field, value, allowed)


def _one_of(config, field: str, choices) -> None:
  value = _get(config, field)
  _check(value in choices, field, value, f"one of {list(choices)}")


def _get(config, field: str):
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def _int_at_least(config, field: str, low: int) -> None:
  value = _get(config, field)
  _check(isinstance(value, int) and value >= low, field, value, f"an integer >= {low}")


def _positive(config, field: str) -> None:
  value = _get(config, field)
  _check(value > 0, field, value, "> 0")


def _non_negative(config, field: str) -> None:
  value = _get(config, field)
  _check(value >= 0, field, value, ">= 0")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid field; returns None if valid."""
  for field in ("num_clients", "num_rounds", "eval_every", "client.local_epochs",
                "client.batch_size"):
    _int_at_least(config, field, 1)
  for field in ("seed", "checkpoint_every", "client.local_steps", "engine.client_chunk",
                "engine.client_block", "engine.unroll", "engine.ghost_rows", "data.num_unseen",
                "data.augment_crop_padding"):
    _int_at_least(config, field, 0)
  rate = config.client_sampling_rate
  _check(0.0 <= rate <= 1.0, "client_sampling_rate", rate, "in [0, 1] (0: fixed cohort)")
  if rate == 0.0:
    _int_at_least(config, "clients_per_round", 1)
    _check(config.clients_per_round <= config.num_clients, "clients_per_round",
           config.clients_per_round, f"<= num_clients={config.num_clients}")
  _one_of(config, "model", sorted(models.MODELS))
  _one_of(config, "data.source", DATA_SOURCES)
  _one_of(config, "data.partition", sorted(partition.PARTITIONERS))
  _int_at_least(config, "data.image_size", 8)
  for field in ("data.alpha", "data.quantity_power", "client.learning_rate",
                "server.learning_rate", "server.tau"):
    _positive(config, field)
  for field in ("data.shift", "data.augment_rotation", "client.prox_mu", "client.momentum",
                "server.momentum"):
    _non_negative(config, field)
  if config.data.source == "synthetic":
    _int_at_least(config, "data.examples_per_client", 4)
  else:
    _check(bool(config.data.path), "data.path", config.data.path,
           f"set for data.source={config.data.source!r} (a file or folder)")
  _validate_dicom(config)
  _validate_task(config)
  fractions = config.data.val_fraction + config.data.test_fraction
  _check(0.0 <= config.data.val_fraction and 0.0 < config.data.test_fraction
         and fractions < 1.0, "data.test_fraction", config.data.test_fraction,
         "> 0 with data.val_fraction >= 0 and their sum < 1")
  _one_of(config, "client.optimizer", CLIENT_OPTIMIZERS)
  _one_of(config, "server.optimizer", server.SERVER_OPTIMIZERS)
  _one_of(config, "server.weighting", aggregation.WEIGHTINGS)
  _check(0.0 <= config.server.beta2 < 1.0, "server.beta2", config.server.beta2, "in [0, 1)")
  _check(0.0 <= config.server.ema_decay < 1.0, "server.ema_decay", config.server.ema_decay,
         "in [0, 1) (0: off)")
  _one_of(config, "engine.conv", CONV_CHOICES)
  _one_of(config, "engine.dp_gather", strategy.DP_GATHERS)
  _validate_population(config)
  _validate_dp(config)
  _validate_attack(config)
  _validate_secure_agg(config)
  _validate_audit(config)


def _validate_dicom(config) -> None:
  """DICOM-only fields are refused for other sources (they would not act)."""
  data = config.data
  if data.source != "dicom":
    for name in DICOM_FIELDS:
      _check(not data[name], f"data.{name}", data[name],
             f"left unset for data.source={data.source!r} (read only by 'dicom')")
    return
  width = data.window_width
  _check(width == 0 or width >= 1, "data.window_width", width,
         ">= 1 (a fixed LINEAR window), or 0 for each file's Window Center / Width")
  _check(width > 0 or data.window_center == 0, "data.window_center",
         data.window_center, "left 0 unless data.window_width > 0")


def _validate_task(config) -> None:
  """`task`: the model, data source and features must fit it (masks or classes)."""
  _one_of(config, "task", TASKS)
  _int_at_least(config, "data.max_slices_per_patient", 0)
  _check(config.data.source == "nifti" or not config.data.max_slices_per_patient,
         "data.max_slices_per_patient", config.data.max_slices_per_patient,
         f"0 for data.source={config.data.source!r} (read only by 'nifti')")
  seg = config.task == "segmentation"
  _check(seg == (config.model in models.SEGMENTATION_MODELS), "model", config.model,
         f"one of {list(models.SEGMENTATION_MODELS)} for task='segmentation'" if seg else
         f"not one of {list(models.SEGMENTATION_MODELS)} for task='classification'")
  _check(seg or config.data.source != "nifti", "data.source", config.data.source,
         "not 'nifti' for task='classification' (NIfTI volumes come with masks)")
  if not seg:
    return
  _check(config.data.source in SEGMENTATION_SOURCES, "data.source", config.data.source,
         f"one of {list(SEGMENTATION_SOURCES)} for task='segmentation'")
  _check(config.data.image_size % 4 == 0, "data.image_size", config.data.image_size,
         "a multiple of 4 for task='segmentation' (the U-Net pools twice)")
  _check(not config.data.augment, "data.augment", True,
         "False for task='segmentation' (augmentation would move images without their masks)")
  _check(not config.audit.enabled, "audit.enabled", True,
         "False for task='segmentation' (canaries are labelled images)")
  _check(config.attack.kind == "none", "attack.kind", config.attack.kind,
         "'none' for task='segmentation' (the attack studies are classification's)")


def _validate_population(config) -> None:
  """`data.population=on_demand` (fedsim/data/population.py): synthetic hospitals only."""
  _one_of(config, "data.population", POPULATIONS)
  if config.data.population == "in_memory":
    return
  _int_at_least(config, "data.eval_hospitals", 1)
  needs = {"data.source": ("synthetic",), "task": ("classification",),
           "data.partition": ON_DEMAND_PARTITIONS, "audit.enabled": (False,),
           "attack.kind": ("none",)}
  for field, allowed in needs.items():
    _check(_get(config, field) in allowed, field, _get(config, field),
           f"one of {list(allowed)} with data.population='on_demand'")


def _validate_dp(config) -> None:
  _one_of(config, "dp.level", DP_LEVELS)
  _validate_adaptive_clip(config)
  if config.dp.level == "none":
    return
  _one_of(config, "dp.accountant", ACCOUNTANTS)
  _non_negative(config, "dp.noise_multiplier")
  _positive(config, "dp.clip_norm")
  _check(0.0 < config.dp.delta < 1.0, "dp.delta", config.dp.delta, "in (0, 1)")
  _non_negative(config, "dp.target_epsilon")
  _int_at_least(config, "dp.max_batch_size", 0)
  _int_at_least(config, "dp.microbatch_size", 0)
  _one_of(config, "dp.clipping", ("vmap", "ghost"))


def _validate_audit(config) -> None:
  audit = config.audit
  _check(isinstance(audit.enabled, bool), "audit.enabled", audit.enabled, "True or False")
  if not audit.enabled:
    return
  _one_of(config, "audit.kind", canaries.KINDS)
  _int_at_least(config, "audit.num_canaries", 2)
  _int_at_least(config, "audit.num_hospitals", 1)
  _check(audit.num_hospitals <= config.num_clients, "audit.num_hospitals",
         audit.num_hospitals, f"<= num_clients={config.num_clients}")
  _check(0.0 < audit.significance < 1.0, "audit.significance", audit.significance, "in (0, 1)")
  _check(0.0 < config.dp.delta < 1.0, "dp.delta", config.dp.delta, "in (0, 1) (the audit's delta)")
  if audit.kind == "gradient":
    _check(config.dp.level in ("example", "patient"), "audit.kind", audit.kind,
           f"'input' with dp.level={config.dp.level!r} (gradient canaries are DP-SGD's: "
           "dp.level='example' or 'patient')")


def _validate_secure_agg(config) -> None:
  sa = config.secure_agg
  _check(isinstance(sa.enabled, bool), "secure_agg.enabled", sa.enabled, "True or False")
  if not sa.enabled:
    return
  _check(isinstance(sa.bits, int) and 2 <= sa.bits <= 32, "secure_agg.bits", sa.bits,
         "an integer in [2, 32]")
  _non_negative(config, "secure_agg.scale")
  _non_negative(config, "secure_agg.clip_norm")
  for field in ("secure_agg.dropout_before", "secure_agg.dropout_after"):
    value = _get(config, field)
    _check(0.0 <= value < 1.0, field, value, "in [0, 1)")
  _int_at_least(config, "secure_agg.threshold", 0)
  _int_at_least(config, "secure_agg.neighbours", 0)
  _check(sa.neighbours % 2 == 0, "secure_agg.neighbours", sa.neighbours,
         "even (a Harary graph: k/2 neighbours on each side), or 0 for the complete graph")
  fixed = config.client_sampling_rate == 0
  cohort = config.clients_per_round if fixed else config.num_clients
  holders = min(cohort, sa.neighbours + 1) if sa.neighbours else cohort
  _check(sa.threshold <= holders, "secure_agg.threshold", sa.threshold,
         f"<= {holders} (the shares of a secret: " + (
             f"the hospital and its secure_agg.neighbours={sa.neighbours})" if sa.neighbours
             else f"the cohort of {'clients_per_round' if fixed else 'num_clients'}={cohort})"))
  _check(cohort < 2**15, "secure_agg.enabled", True,
         f"False for cohorts of 2^15 hospitals or more (this one: up to {cohort})")
  bounded = config.dp.level == "client" and not config.dp.adaptive_clip
  _one_of(config, "secure_agg.distributed_noise", protocol.NOISES)
  if sa.distributed_noise != "none":
    _check(bounded and config.dp.noise_multiplier > 0, "secure_agg.distributed_noise",
           sa.distributed_noise, "'none' unless dp.level='client' with dp.noise_multiplier > 0 "
           "and dp.adaptive_clip=False (it replaces DP-FedAvg's server noise)")
    _check(sa.threshold >= 2, "secure_agg.threshold", sa.threshold,
           ">= 2 with distributed noise (each share is sized for t - 1 other senders)")
  _check(sa.clip_norm > 0 or bounded, "secure_agg.clip_norm", sa.clip_norm,
         f"> 0 with dp.level={config.dp.level!r}" + (
             " and dp.adaptive_clip=True" if config.dp.level == "client" else "") +
         " (the encoding needs a bound on each delta; 0 takes dp.clip_norm only for "
         "dp.level='client' with a fixed clip norm)")


ATTACK_KINDS = ("none", "inversion", "membership")
# Rows of the inversion study's table (fedsim/inversion_study.py `settings`).
INVERSION_SETTINGS = ("none", "dlg", "batches", "clipping", "dp_sgd", "example", "client",
                      "client_released", "secure_agg", "late")


def _validate_attack(config) -> None:
  """`attack.*`: which study launch.py runs instead of training (fedsim/inversion_study.py)."""
  _one_of(config, "attack.kind", ATTACK_KINDS)
  _check(isinstance(config.attack.workdir, str), "attack.workdir", config.attack.workdir,
         "a run directory, or '' to attack this config's own run")
  if config.attack.kind == "membership":
    _validate_membership(config)
  if config.attack.kind != "inversion":
    return
  _check("inversion" in config.attack, "attack.kind", "inversion",
         "set in a config with an attack.inversion section (experiments/attack_inversion.py)")
  _check(config.client.optimizer == "sgd", "client.optimizer", config.client.optimizer,
         "'sgd' for attack.kind='inversion' (the attacker replays local SGD)")
  a = "attack.inversion."
  for field in ("steps", "restarts", "targets", "dlg_steps", "local_steps",
                "secure_agg_hospitals"):
    _int_at_least(config, a + field, 1)
  for field in ("first_hospital", "late_rounds"):
    _int_at_least(config, a + field, 0)
  for field in ("learning_rate", "dlg_learning_rate"):
    _positive(config, a + field)
  _non_negative(config, a + "tv_weight")
  _one_of(config, a + "dlg_optimizer", ("adam", "lbfgs"))
  settings = config.attack.inversion.settings
  _check(len(settings) > 0 and set(settings) <= set(INVERSION_SETTINGS), a + "settings",
         settings, f"a non-empty subset of {list(INVERSION_SETTINGS)}")
  for field in ("batch_sizes", "noise_multipliers"):
    values = _get(config, a + field)
    _check(all(v > 0 for v in values), a + field, values, "positive numbers")


def _validate_membership(config) -> None:
  """`attack.membership.*` (fedsim/membership_study.py)."""
  _check("membership" in config.attack, "attack.kind", "membership",
         "set in a config with an attack.membership section (experiments/membership.py)")
  _int_at_least(config, "attack.membership.num_models", 4)
  settings = config.attack.membership.settings
  _check(len(settings) > 0 and all(s in ("none", "example") for s in settings),
         "attack.membership.settings", settings, "a non-empty list of 'none', 'example'")


def check_inversion_victims(inversion, counts) -> None:
  """Every attacked hospital must hold the largest batch attacked (ValueError otherwise)."""
  largest = max((1, *inversion.batch_sizes))
  _check(int(min(counts)) >= largest, "attack.inversion.batch_sizes", inversion.batch_sizes,
         f"<= the smallest hospital's training images ({int(min(counts))})")


def _validate_adaptive_clip(config) -> None:
  dp = config.dp
  _check(isinstance(dp.adaptive_clip, bool), "dp.adaptive_clip", dp.adaptive_clip,
         "True or False")
  _check(0.0 < dp.target_quantile < 1.0, "dp.target_quantile", dp.target_quantile,
         "in (0, 1)")
  _non_negative(config, "dp.clip_learning_rate")
  _non_negative(config, "dp.clipped_count_stddev")
  if not dp.adaptive_clip:
    return
  _check(dp.level == "client", "dp.adaptive_clip", True,
         f"False with dp.level={dp.level!r} (adaptive clipping is for dp.level='client')")
  if config.client_sampling_rate > 0:  # 0 is refused by the client-level plan
    adaptive_clip_count_stddev(config)


def adaptive_clip_count_stddev(config) -> float:
  """sigma_b of `dp.adaptive_clip` (default E / 20); ValueError if 2 sigma_b <= z."""
  expected = config.client_sampling_rate * config.num_clients
  stddev = (config.dp.clipped_count_stddev
            or adaptive_clipping.default_count_stddev(expected))
  z = config.dp.noise_multiplier
  if z > 0 and not 2 * stddev > z:
    raise ValueError(
        f"dp.clipped_count_stddev={config.dp.clipped_count_stddev} (sigma_b={stddev:g}) "
        f"must be > dp.noise_multiplier / 2 = {z / 2:g} for dp.adaptive_clip=True "
        "(set it explicitly, or raise client_sampling_rate * num_clients)")
  return stddev
