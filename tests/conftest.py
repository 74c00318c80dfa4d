"""Shared fixtures: a tiny run config and its federation (built once per session).

Each test process (one per xdist worker) keeps a JAX compilation cache in a fresh folder
of its own: a test that builds programs again (another run of a config, the same Setup
rebuilt, a launch.py subprocess, which inherits the folder) loads them instead of
compiling. One folder per process, so no two processes write one entry at once.
"""

import os
import shutil
import sys
import tempfile

import pytest

from experiments import default

_CACHE_KEY = pytest.StashKey[str]()


def pytest_configure(config):
  cache = tempfile.mkdtemp(prefix="fedsim-jax-cache-")
  config.stash[_CACHE_KEY] = cache
  settings = {"jax_compilation_cache_dir": cache,
              "jax_persistent_cache_min_compile_time_secs": 0,  # cache every program
              "jax_persistent_cache_min_entry_size_bytes": -1}
  for name, value in settings.items():
    os.environ[name.upper()] = str(value)  # read when jax is imported, here and in subprocesses
    if "jax" in sys.modules:
      sys.modules["jax"].config.update(name, value)


def pytest_unconfigure(config):
  shutil.rmtree(config.stash.get(_CACHE_KEY, ""), ignore_errors=True)


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
  # One program per run: the CPU's bucketed DP-SGD gathers compile once per batch size
  # (2-3 sizes a tiny run); they have their own tests (tests/fedsim/test_dp_gather.py),
  # and experiments/default.py's runs (launch, default-config tests) take them.
  c.engine.dp_gather = "fixed"
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
