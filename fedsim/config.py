"""Config validation: every field checked before any compute.

A bad field stops the run with one `ValueError` whose message names the field and
what is allowed, e.g. `client.learning_rate=-0.1 must be > 0`.
"""

from __future__ import annotations

import ml_collections

from fedsim import aggregation, models, partition, server
from fedsim.client import CLIENT_OPTIMIZERS
from privacy import adaptive_clipping, validation

DATA_SOURCES = ("synthetic", "medmnist", "image_folder", "tfds")
DP_LEVELS = ("none", "example", "patient", "client")
ACCOUNTANTS = ("rdp", "pld")
CONV_CHOICES = ("auto",) + models.CONV_IMPLS


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
                "engine.client_block", "engine.unroll", "data.num_unseen",
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
  _validate_dp(config)


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
