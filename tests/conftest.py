"""Shared fixtures: a tiny run config and its federation (built once per session)."""

import os

import pytest

from experiments import default


def tiny_config():
  """A federation small enough for a test: 6 hospitals of 12x12 images."""
  c = default.get_config()
  c.num_clients = 6
  c.clients_per_round = 3
  c.num_rounds = 2
  c.eval_every = 1
  c.data.image_size = 12
  c.data.examples_per_client = 24
  c.data.num_unseen = 1
  c.model = "cnn"
  c.client.batch_size = 8
  c.client.local_steps = 3
  c.client.learning_rate = 0.5
  c.dp.noise_multiplier = 1.2
  c.dp.accountant = "rdp"
  c.dp.max_batch_size = 0  # exact Poisson; truncation has its own tests
  c.engine.client_chunk = 2
  c.engine.unroll = 1
  return c


@pytest.fixture
def config():
  return tiny_config()


@pytest.fixture(scope="session")
def tiny_fed():
  from fedsim.data import make_federated_data
  return make_federated_data(tiny_config())


@pytest.fixture
def workdir(tmp_path):
  return os.fspath(tmp_path / "run")
