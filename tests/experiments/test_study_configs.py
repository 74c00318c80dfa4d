"""Study configs on real data: every config and variant validates, and runs end to end
on tiny files of the real formats (a MedMNIST .npz, a Kermany chest X-ray folder)."""

import json
import os

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from experiments import medmnist, pneumonia
from fedsim import config as config_lib
from fedsim import simulation

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STUDIES = [(pneumonia, v) for v in pneumonia.VARIANTS] + [
    (medmnist, v) for v in medmnist.VARIANTS]


@pytest.mark.parametrize("module,variant", STUDIES,
                         ids=[f"{m.__name__.split('.')[-1]}:{v}" for m, v in STUDIES])
def test_every_config_and_variant_validates(module, variant):
  config = module.get_config(variant)
  config_lib.validate(config)
  assert config.data.source in ("image_folder", "medmnist")
  assert config.dp.level != "none" and config.data.path


def test_config_files_load_with_the_launch_syntax():
  """`--config=experiments/pneumonia.py:hospitals100`, as launch.py parses it."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=values,
                                  lock_config=True)
  values(["prog", f"--config={ROOT}/experiments/pneumonia.py:hospitals100"])
  config = values.config
  assert (config.num_clients, config.model, config.data.image_size,
          config.data.partition) == (100, "cnn", 64, "dirichlet")
  base = pneumonia.get_config()
  assert (base.num_clients, base.model, base.data.image_size, base.dp.level,
          base.data.path) == (3, "resnet18", 224, "patient", "data/chest_xray")


@pytest.mark.parametrize("module", [pneumonia, medmnist])
def test_unknown_variant_names_the_allowed_ones(module):
  with pytest.raises(ValueError, match="must be one of"):
    module.get_config("hospitals1000")


def _shrink(config, *, image_size: int = 16):
  """A few tiny hospitals for two rounds, on the CPU."""
  config.num_clients = 3
  config.clients_per_round = 2
  config.num_rounds = 2
  config.eval_every = 1
  config.model = "cnn"
  config.data.image_size = image_size
  config.data.num_unseen = 1
  config.client.batch_size = 4
  config.engine.unroll = 1
  return config


def _check_record(workdir: str, unit: str) -> dict:
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["rounds"] == 2 and summary["privacy_unit"] == unit
  assert 0.0 < summary["epsilon"] < float("inf")
  assert os.path.exists(os.path.join(workdir, "privacy.json"))
  return summary


def test_medmnist_config_runs_end_to_end_on_a_real_format_npz(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in (("train", 48), ("val", 12), ("test", 18)):
    labels = rng.integers(0, 2, size=(n, 1)).astype(np.uint8)
    images = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
    images[labels[:, 0] == 1, 8:20, 8:20] = 255  # a visible "finding"
    arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
  path = tmp_path / "pneumoniamnist.npz"
  np.savez_compressed(path, **arrays)
  config = _shrink(medmnist.get_config())
  config.data.path = str(path)
  workdir = os.fspath(tmp_path / "run")
  simulation.run(config, workdir, progress=False)
  _check_record(workdir, "example")


def _write_kermany(root, rng):
  """root/{train,test}/{NORMAL,PNEUMONIA}/*.jpeg with Kermany file names."""
  files = {"NORMAL": [f"IM-{p:04d}-{k:04d}.jpeg" for p in range(1, 9) for k in (1, 2)]
           + ["NORMAL2-IM-0100-0001.jpeg"],
           "PNEUMONIA": [f"person{p}_bacteria_{k}.jpeg" for p in range(1, 9) for k in (1, 2)]
           + [f"person{p}_virus_{p + 2}.jpeg" for p in range(9, 17)]}
  for cls, names in files.items():
    for i, name in enumerate(names):
      split = "test" if i % 5 == 4 else "train"
      folder = root / split / cls
      folder.mkdir(parents=True, exist_ok=True)
      h, w = rng.integers(24, 48, size=2)
      pixels = rng.integers(0, 256, size=(h, w)).astype(np.uint8)
      Image.fromarray(pixels, mode="L").save(folder / name, format="JPEG")


def test_pneumonia_config_runs_end_to_end_on_a_kermany_folder(tmp_path):
  root = tmp_path / "chest_xray"
  _write_kermany(root, np.random.default_rng(0))
  config = _shrink(pneumonia.get_config())
  config.data.path = str(root)
  workdir = os.fspath(tmp_path / "run")
  simulation.run(config, workdir, progress=False)
  _check_record(workdir, "patient")
  privacy = json.load(open(os.path.join(workdir, "privacy.json")))
  assert "PoissonSampled" in json.dumps(privacy)
  report = json.dumps(json.load(open(os.path.join(workdir, "report.json"))))
  assert all(name in report for name in ("normal", "bacterial", "viral"))


def test_truncated_patient_batches_are_accounted_over_patients(tmp_path):
  config = _shrink(pneumonia.get_config())
  config.data.source = "synthetic"
  config.data.image_size = 12
  config.dp.max_batch_size = 2
  config.dp.accountant = "pld"
  setup = simulation.prepare(config)
  assert setup.plan.sampler.max_units == 2
  assert setup.plan.sampler.unit_images == setup.fed.train.max_patient_images
  ledger = setup.plan.new_ledger()
  ledger.record_round(np.ones(config.num_clients, bool))
  for k, event in enumerate(ledger.hospital_events()):
    step = event.event.event  # per hospital: rounds(steps(truncated step))
    assert step.truncated_batch_size == 2
    assert step.dataset_size == setup.fed.train.num_patients[k]
  summary = simulation.train(setup, os.fspath(tmp_path / "run"), progress=False)
  assert summary["privacy_unit"] == "patient" and summary["accountant"] == "pld"
  assert 0 < summary["epsilon"] < float("inf")


def test_secure_agg_study_sweeps_bits_and_dropouts():
  """experiments/secure_agg.py:bits / :dropout: one axis each, every configuration a valid
  secure-aggregation run; an unknown variant is refused."""
  from experiments import secure_agg as secure_agg_config
  from fedsim import sweep
  for variant, field in (("bits", "bits"), ("dropout", "dropout_before")):
    configurations = sweep.expand(secure_agg_config.get_config(variant))
    values = [c.config.secure_agg[field] for c in configurations]
    assert values == list(secure_agg_config.STUDIES[variant][1])
    for c in configurations:
      config_lib.validate(c.config)
      assert c.config.secure_agg.enabled and "sweep" not in c.config
  with pytest.raises(ValueError, match="the variant must be one of"):
    secure_agg_config.get_config("nope")
