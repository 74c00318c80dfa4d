"""task=segmentation: data, loss, patient-level DP-SGD of a U-Net, an end-to-end run."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import segmentation as segmentation_config
from fedsim import client as client_lib
from fedsim import config as config_lib
from fedsim import dp_sgd, models, simulation, sweep
from fedsim import workdir as workdir_lib
from fedsim.data import synthetic_segmentation


def test_synthetic_patients_are_contiguous_slices_with_aligned_masks():
  d = synthetic_segmentation.generate(num_examples=60, image_size=16, seed=3)
  assert d.images.shape == (60, 16, 16, 1) and d.labels.shape == (60, 16, 16)
  assert set(np.unique(d.labels)) <= {0, 1, 2}
  sizes = np.bincount(d.patient_ids)
  assert np.all(np.diff(d.patient_ids) >= 0) and sizes[:-1].min() >= 3 and sizes.max() <= 8
  # The liver is brighter than the soft tissue around it: masks sit on the images.
  liver = d.images[..., 0][d.labels == 1].mean()
  body = d.images[..., 0][(d.labels == 0) & (d.images[..., 0] > 60)].mean()
  assert liver > body + 10
  again = synthetic_segmentation.generate(num_examples=60, image_size=16, seed=3)
  np.testing.assert_array_equal(d.images, again.images)


def test_segmentation_loss_is_one_scalar_per_image_hand_value():
  logits = jnp.zeros((2, 1, 2, 2))              # p = 1/2 everywhere
  masks = jnp.array([[[0, 1]], [[0, 0]]])
  loss = client_lib.example_loss(logits, masks)
  # CE log 2; image 0: Dice (2 * 0.5 + 1) / (1 + 1 + 1) = 2/3; image 1 has no
  # foreground: no Dice term (an absent class is the cross-entropy's).
  np.testing.assert_allclose(loss, [np.log(2) + 1 / 3, np.log(2)], rtol=1e-6)
  # Three classes, p = 1/3: only the classes present count (image 0: class 1 alone,
  # Dice (2/3 + 1) / (2/3 + 1 + 1) = 5/8; image 1: classes 1 and 2, 5/8 each).
  three = client_lib.example_loss(jnp.zeros((2, 1, 2, 3)), jnp.array([[[0, 1]], [[2, 1]]]))
  np.testing.assert_allclose(three, np.log(3) + 3 / 8, rtol=1e-6)
  perfect = 20.0 * jax.nn.one_hot(masks, 2)
  assert float(client_lib.example_loss(perfect, masks).max()) < 1e-6


@pytest.mark.parametrize("method,slots", [("ghost", 2)])
def test_patient_clipping_clips_each_patients_summed_gradient(method, slots):
  """3 patients x 2 slices (the last patient's second slot padding); C so small that
  every unit is clipped. The step's gradient is the sum over patients of the
  gradient of the patient's summed slice losses clipped to C, not a sum of
  clipped slices. Slots (truncated Poisson, ghost: the default) and patients
  found by id (exact Poisson)."""
  # The study's U-Net, initialised eagerly like a run's (the per-shape initialiser
  # programs are then shared with the run test below); numpy inputs compile nothing.
  model = models.make_model("unet", num_classes=3)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(6, 8, 8, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, (6, 8, 8)), jnp.int32)
  params = model.init(jax.random.key(2), x[:1])
  patients = jnp.array([0, 0, 1, 1, 2, 2])
  mask = jnp.array([True, True, True, True, True, False])
  clip = 1e-3
  grad_fn = dp_sgd.dp_sgd_gradient(model.apply, unit="patient", method=method,
                                   microbatch_size=0, patient_slots=slots)
  hparams = {"clip_norm": clip, "noise_multiplier": 0.0, "expected_units": 1.0}
  grad, stats = jax.jit(grad_fn)(params, client_lib.Batch(x, y, patients, mask),
                                 jax.random.key(3), hparams)

  @jax.jit
  @jax.vmap
  def clipped(weights):  # the gradient of the weighted slices' summed loss, clipped
    g = jax.grad(lambda p: jnp.sum(weights * client_lib.example_loss(model.apply(p, x), y)))(
        params)
    norm = jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree.leaves(g)))
    return jax.tree.map(lambda v: v * jnp.minimum(1.0, clip / norm), g)

  units = [[0, 1], [2, 3], [4], [0], [1], [2], [3], [4]]  # patients, then slices
  weights = np.array([np.isin(np.arange(6), u) for u in units], np.float32)
  each = clipped(jnp.asarray(weights))                   # one program for all units
  expected = jax.tree.map(lambda g: g[:3].sum(0), each)
  per_slice = jax.tree.map(lambda g: g[3:].sum(0), each)
  flat = lambda t: np.concatenate([np.ravel(v) for v in jax.tree.leaves(t)])
  np.testing.assert_allclose(flat(grad), flat(expected), rtol=2e-4, atol=1e-9)
  assert np.linalg.norm(flat(grad)) <= 3 * clip * (1 + 1e-4)
  assert not np.allclose(flat(grad), flat(per_slice), rtol=1e-2)
  assert float(stats["num_units"]) == 3 and float(stats["num_clipped"]) == 3


def _tiny_config():
  c = segmentation_config.get_config()
  c.num_clients, c.clients_per_round, c.num_rounds, c.eval_every = 2, 2, 1, 1
  c.data.image_size, c.data.examples_per_client, c.data.num_unseen = 16, 30, 1
  c.client.batch_size, c.client.local_steps = 10, 1
  c.dp.max_batch_size = 6
  c.engine.client_chunk = c.engine.unroll = 1
  return c


def test_private_segmentation_run_writes_dice_not_accuracy(tmp_path):
  workdir = os.fspath(tmp_path / "seg")
  summary = simulation.run(_tiny_config(), workdir, progress=False)
  assert summary["privacy_unit"] == "patient" and summary["epsilon"] > 0
  for key in ("dice", "iou", "hd95", "global_dice", "worst_hospital_dice", "unseen_dice",
              "dice_liver", "dice_lesion"):
    assert summary[key] is not None and np.isfinite(summary[key]), key
  assert not any("accuracy" in k or "auroc" in k for k in summary)
  row = json.loads(open(os.path.join(workdir, "metrics.jsonl")).readline())
  assert {"dice", "hd95", "unseen_dice", "train_pixel_accuracy"} <= set(row)
  assert not {"accuracy", "auroc", "train_accuracy"} & set(row)
  line = simulation.format_summary(summary, workdir).splitlines()[0]
  assert line.startswith("rounds 1  Dice ") and "(liver " in line and "HD95" in line
  assert os.path.getsize(os.path.join(workdir, "segmentations.png")) > 1000


@pytest.mark.parametrize("field,value,message", [
    ("model", "cnn", "model='cnn' must be one of ['unet'] for task='segmentation'"),
    ("data.augment", True, "data.augment=True must be False for task='segmentation'"),
    ("data.image_size", 30, "data.image_size=30 must be a multiple of 4"),
    ("data.source", "medmnist", "data.source='medmnist' must be one of ['synthetic', 'nifti']"),
])
def test_bad_segmentation_configs_are_refused_in_one_line(field, value, message):
  c = _tiny_config()
  c.data.path = "x"
  node, name = (c.data, field[5:]) if field.startswith("data.") else (c, field)
  node[name] = value
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
    config_lib.validate(c)


def test_a_sweep_over_a_segmentation_config_is_refused_in_one_line(tmp_path):
  c = _tiny_config()
  c.sweep = ml_collections.ConfigDict(dict(
      axes=dict(dp=dict(noise_multiplier=(1.0, 2.0))), metric="accuracy",
      epsilon_bands=(4.0,), selection_eta=1.0, selection_mean=0.0, execution="sequential",
      group_size=0))
  with pytest.raises(ValueError) as error:
    sweep.plan(c, os.fspath(tmp_path / "never"))
  assert str(error.value) == (
      "sweep configuration 000_dp.noise_multiplier=1.0: task='segmentation' must be "
      "'classification' in a sweep (its table, plot and private selection rank "
      "accuracy-type metrics; launch a segmentation study once per setting)")
  assert not os.path.exists(tmp_path / "never" / "runs")


def test_encrypted_inference_refuses_a_segmentation_run_in_one_line(tmp_path):
  from privacy.encrypted_inference import service
  workdir = os.fspath(tmp_path / "seg")
  workdir_lib.open_run(workdir, _tiny_config())  # config.json, as a run writes it
  with pytest.raises(ValueError) as error:
    service.run_service(workdir)
  assert str(error.value) == (
      "task='segmentation' must be 'classification' for encrypted inference (the secure "
      "protocol reveals a label per image, not a mask)")
