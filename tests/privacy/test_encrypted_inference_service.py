"""The encrypted-inference service on a tiny trained run: CLI, record, agreement, errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags

from fedsim import checkpoint, models
from fedsim import workdir as workdir_lib
from fedsim.client import normalize
from fedsim.data import make_federated_data
from privacy.encrypted_inference import __main__ as cli
from privacy.encrypted_inference import service
from tests.conftest import tiny_config


def _config(model="cnn"):
  c = tiny_config()
  c.data.image_size = 8
  c.dp.level = "none"
  c.model = model
  return c


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A run folder whose checkpoint holds a small CNN trained on the tiny training split."""
  config = _config()
  fed = make_federated_data(config)
  x = normalize(jnp.asarray(fed.train.images[fed.train.mask]), fed.mean, fed.std)
  y = jnp.asarray(fed.train.labels[fed.train.mask])
  model = models.make_model(config.model, num_classes=fed.num_classes)
  params = model.init(jax.random.key(0), x[:1])
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()
  step = jax.jit(lambda p: jax.tree.map(lambda w, g: w - 0.3 * g, p, jax.grad(loss)(p)))
  for _ in range(20):
    params = step(params)
  workdir = os.fspath(tmp_path_factory.mktemp("ei") / "run")
  workdir_lib.open_run(workdir, config)
  checkpoint.save(workdir_lib.checkpoint_dir(workdir), 1, {"params": params})
  return workdir


def test_cli_agrees_with_plaintext_on_every_test_image(trained_run, capsys):
  try:
    flags.FLAGS(["encrypted_inference", f"--workdir={trained_run}",
                 "--batch_size=64"])
    assert cli.main([]) == 0
  finally:
    flags.FLAGS.unparse_flags()
  lines = capsys.readouterr().out.strip().splitlines()
  with open(os.path.join(trained_run, service.RECORD)) as f:
    record = json.load(f)
  assert lines[-1] == service.summary_line(record)
  assert lines[-1].startswith(f"encrypted inference: {record['num_images']} images  "
                              "agreement 100.00%")
  fed = make_federated_data(_config())
  assert record["num_images"] == int(fed.test.counts.sum()) > 10
  assert record["agreement_percent"] == 100.0
  assert record["accuracy_encrypted"] == record["accuracy_plaintext"]
  assert abs(record["auroc_encrypted"] - record["auroc_plaintext"]) < 0.02
  assert record["max_logit_error"] < 0.01
  # input, 3 x (linear, relu), head, argmax (comparisons, bits, product), reveal
  assert record["rounds"] == 1 + 3 * (1 + 8) + 1 + 8 + 1
  assert record["online_bytes_per_image"] > record["online_bytes_by_step_per_image"]["compare"]


def test_missing_workdir_is_one_clear_error(tmp_path, capsys):
  missing = os.fspath(tmp_path / "nothing")
  with pytest.raises(ValueError, match=r"--workdir='.*nothing' must be a run folder"):
    service.run_service(missing)
  try:
    flags.FLAGS(["encrypted_inference", f"--workdir={missing}"])
    assert cli.main([]) == 1
  finally:
    flags.FLAGS.unparse_flags()
  assert capsys.readouterr().err.startswith("error: --workdir=")


def test_unsupported_model_is_refused_before_any_compute(tmp_path):
  workdir = os.fspath(tmp_path / "vit")
  workdir_lib.open_run(workdir, _config("vit"))
  with pytest.raises(ValueError, match="model='vit' must be one of"):
    service.run_service(workdir)


def test_bad_flag_is_refused(trained_run):
  with pytest.raises(ValueError, match="--limit=-1 must be >= 0"):
    service.run_service(trained_run, limit=-1)
  with pytest.raises(ValueError, match="--linear='gpu' must be one of"):
    service.run_service(trained_run, linear="gpu")


def test_disagreement_margins_lead_with_the_largest_gap():
  # 30 flipped images with plaintext top-2 gaps 0.01 .. 0.30: the record keeps the 20
  # largest, largest first, so the summary's bound covers every flip.
  gaps = np.arange(1, 31) / 100
  plain = np.stack([gaps, np.zeros(30), np.full(30, -1.0)], -1)  # plaintext says class 0
  out = service._metrics(np.ones(30, int), None, plain, None)  # encrypted says class 1
  assert out["disagreements"] == 30
  np.testing.assert_allclose(out["disagreement_margins"], gaps[::-1][:20])
