"""Invalid configs stop before any compute with one message naming the field."""

import pytest

from fedsim import config as config_lib
from tests.conftest import tiny_config


def test_default_config_is_valid():
  config_lib.validate(tiny_config())


@pytest.mark.parametrize("field, value, message", [
    ("num_clients", 0, "num_clients=0 must be an integer >= 1"),
    ("clients_per_round", 7, "clients_per_round=7 must be <= num_clients=6"),
    ("model", "vgg",
     "model='vgg' must be one of ['cnn', 'cnn_gap', 'cnn_tanh', 'resnet18', 'unet']"),
    ("client.optimizer", "lbfgs", "client.optimizer='lbfgs' must be one of"),
    ("server.optimizer", "fedsgd", "server.optimizer='fedsgd' must be one of"),
    ("data.partition", "random", "data.partition='random' must be one of"),
    ("data.source", "pacs", "data.source='pacs' must be one of"),
    ("client.learning_rate", -0.1, "client.learning_rate=-0.1 must be > 0"),
    ("server.learning_rate", 0.0, "server.learning_rate=0.0 must be > 0"),
    ("client_sampling_rate", 1.5, "client_sampling_rate=1.5 must be in [0, 1]"),
    ("dp.level", "user", "dp.level='user' must be one of"),
    ("engine.conv", "fft", "engine.conv='fft' must be one of"),
    ("engine.dp_gather", "dynamic", "engine.dp_gather='dynamic' must be one of"),
    ("engine.ghost_rows", -16, "engine.ghost_rows=-16 must be"),
    ("server.ema_decay", 1.0, "server.ema_decay=1.0 must be in [0, 1)"),
])
def test_invalid_field_is_named(field, value, message):
  config = tiny_config()
  node, *_, leaf = [config] + field.split(".")
  for part in field.split(".")[:-1]:
    node = node[part]
  node[leaf] = value
  with pytest.raises(ValueError) as error:
    config_lib.validate(config)
  assert message in str(error.value)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("field, value, message", [
    ("dp.noise_multiplier", -1.0, "dp.noise_multiplier=-1.0 must be >= 0"),
    ("dp.clip_norm", 0.0, "dp.clip_norm=0.0 must be > 0"),
    ("dp.delta", 1.0, "dp.delta=1.0 must be in (0, 1)"),
    ("dp.accountant", "moments", "dp.accountant='moments' must be one of"),
])
def test_invalid_dp_field_is_named(field, value, message):
  config = tiny_config()
  config.dp.level = "example"
  config.dp[field.split(".")[1]] = value
  with pytest.raises(ValueError, match=None) as error:
    config_lib.validate(config)
  assert message in str(error.value)
