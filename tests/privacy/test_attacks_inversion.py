"""Gradient inversion (privacy/attacks/inversion.py), image quality, and the study.

The attacks run on a tiny MLP over 8x8 images (a first dense layer with a bias makes
an unprotected gradient invertible to the pixel); the study runs end to end on a
tiny federation with two of its settings.
"""

import csv
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image
from scipy import ndimage

from privacy.attacks import image_quality, inversion

SHAPE = (1, 8, 8, 1)  # one image per update


class TinyMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(16)(x.reshape(x.shape[0], -1)))
    return nn.Dense(4, name="head")(x)


MODEL = TinyMLP()
PARAMS = MODEL.init(jax.random.key(0), jnp.zeros(SHAPE))


def loss_fn(params, x, y):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(MODEL.apply(params, x), y))


def smooth_images(n):
  """`[n, 1, 8, 8, 1]` images in [0, 1] with structure (blurred noise, rescaled)."""
  raw = ndimage.gaussian_filter(np.random.default_rng(0).random((n, 8, 8)), (0, 1.0, 1.0))
  lo, hi = raw.min((1, 2), keepdims=True), raw.max((1, 2), keepdims=True)
  return ((raw - lo) / (hi - lo)).reshape(n, *SHAPE).astype(np.float32)


IMAGES = smooth_images(2)
LABELS = np.array([[1], [3]], np.int32)
TARGETS = jax.vmap(inversion.gradient_update(loss_fn, PARAMS))(IMAGES, LABELS)


@functools.cache
def inverter(method, optimizer, steps, learning_rate):
  return inversion.make_inverter(
      lambda p: inversion.gradient_update(loss_fn, p), image_shape=SHAPE, bounds=(0.0, 1.0),
      method=method, optimizer=optimizer, steps=steps, learning_rate=learning_rate,
      restarts=2)


def attack(targets, method="ig", optimizer="adam", steps=300, learning_rate=0.05):
  """PSNR of the best restart for each of the two targets (one compilation per method)."""
  invert = inverter(method, optimizer, steps, learning_rate)
  out = invert(PARAMS, targets, jnp.asarray(LABELS), jax.random.key(1))
  assert out.images.shape == (2, 2) + SHAPE and out.loss.shape == (2, 2)
  psnr = image_quality.psnr(out.images, IMAGES[:, None])  # [targets, restarts, 1]
  return np.asarray(psnr).max(axis=(1, 2))  # best restart of each target


def test_label_recovery_is_exact_for_single_images():
  rng = np.random.default_rng(1)
  x = rng.random((12,) + SHAPE).astype(np.float32)
  y = rng.integers(0, 4, (12, 1)).astype(np.int32)
  grads = jax.vmap(inversion.gradient_update(loss_fn, PARAMS))(x, y)
  bias = grads["params"]["head"]["bias"]
  np.testing.assert_array_equal(inversion.recover_label(bias), y[:, 0])
  delta = inversion.local_sgd_update(loss_fn, PARAMS, steps=1, learning_rate=0.1)
  deltas = jax.vmap(delta)(x, y)  # a model difference: -lr * gradient
  np.testing.assert_array_equal(
      inversion.recover_label(-deltas["params"]["head"]["bias"]), y[:, 0])


def test_inverting_gradients_recovers_an_unprotected_image_and_fails_under_noise():
  assert (attack(TARGETS) > 30.0).all()  # dB; a random guess in the box is ~8-11 dB
  noise = jax.tree.map(lambda t: 30.0 * jax.random.normal(jax.random.key(2), t.shape),
                       TARGETS)  # far above the gradient's scale, as strong DP noise
  noisy = jax.tree.map(jnp.add, TARGETS, noise)
  assert (attack(noisy) < 15.0).all()


def test_dlg_recovers_an_unprotected_image():
  assert (attack(TARGETS, "dlg", "lbfgs", 100, 1.0) > 30.0).all()


def test_inverter_refuses_bad_arguments():
  with pytest.raises(ValueError, match=r"optimizer='lbfgs' must be 'adam' for method='ig'"):
    inversion.make_inverter(lambda p: None, image_shape=SHAPE, bounds=(0, 1),
                            optimizer="lbfgs", steps=1, learning_rate=1.0)


def test_psnr_and_ssim_known_values():
  x = np.zeros((16, 16, 1), np.float32)
  assert float(image_quality.psnr(x, x + 0.1)) == pytest.approx(20.0, abs=1e-4)
  assert float(image_quality.psnr(x, x + 0.01)) == pytest.approx(40.0, abs=1e-3)
  assert np.isinf(float(image_quality.psnr(x, x)))
  a, b = 0.2, 0.7  # constant images: SSIM is the luminance term alone
  c1 = (0.01 * 1.0) ** 2
  expected = (2 * a * b + c1) / (a * a + b * b + c1)
  assert float(image_quality.ssim(x + a, x + b)) == pytest.approx(expected, rel=1e-5)
  rng = np.random.default_rng(0)
  u = rng.random((2, 20, 18, 1)).astype(np.float32)
  np.testing.assert_allclose(image_quality.ssim(u, u), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="image size"):
    image_quality.ssim(np.zeros((8, 8, 1)), np.zeros((8, 8, 1)))


def test_ssim_matches_the_gaussian_window_formula():
  """Against scipy's Gaussian filter (sigma 1.5, truncate 3.5), borders cropped: the
  computation of scikit-image's structural_similarity(gaussian_weights=True,
  use_sample_covariance=False)."""
  rng = np.random.default_rng(3)
  x = rng.random((24, 20)).astype(np.float64)
  y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)
  f = lambda v: ndimage.gaussian_filter(v, 1.5, truncate=3.5)[5:-5, 5:-5]
  mx, my = f(x), f(y)
  vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
  c1, c2 = 0.01**2, 0.03**2
  expected = np.mean((2 * mx * my + c1) * (2 * cxy + c2)
                     / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
  got = float(image_quality.ssim(x[..., None], y[..., None]))
  assert got == pytest.approx(expected, abs=1e-5)


def tiny_study_config():
  from experiments import attack_inversion
  c = attack_inversion.get_config()
  c.num_clients, c.clients_per_round, c.num_rounds = 4, 2, 2
  c.data.image_size, c.data.examples_per_client, c.data.num_unseen = 12, 40, 0
  c.dp.max_batch_size, c.dp.accountant = 0, "rdp"  # exact Poisson: a cheaper compile
  a = c.attack.inversion
  a.settings = ("none", "example")  # example-level DP-SGD at the default's sigma 1.5
  a.steps, a.restarts, a.targets = 3, 2, 2
  return c


def test_study_runs_end_to_end_and_writes_the_table(tmp_path):
  from fedsim import inversion_study
  study = inversion_study.prepare(tiny_study_config())
  summary = inversion_study.train(study, str(tmp_path), progress=False)
  with open(tmp_path / "inversion.csv") as f:
    rows = list(csv.DictReader(f))
  assert tuple(rows[0]) == inversion_study.COLUMNS
  assert [r["setting"] for r in rows] == ["no defence", "DP-SGD example, sigma 1.5"]
  none, dp = rows
  assert none["epsilon"] == "" and none["noise_multiplier"] == ""
  assert float(dp["noise_multiplier"]) == 1.5 and 0 < float(dp["epsilon"]) < np.inf
  assert dp["privacy_unit"] == "example" and none["images_per_update"] == "1"
  assert float(none["label_accuracy"]) == 1.0  # recovered from the unprotected update
  for r in rows:
    assert float(r["psnr_best"]) >= float(r["psnr_mean"]) > 0
    assert -1 <= float(r["ssim_mean"]) <= float(r["ssim_best"]) <= 1
  assert Image.open(tmp_path / "inversion.png").size[0] > 100
  assert len(summary["settings"]) == 2
  assert "DP-SGD example" in inversion_study.format_summary(summary, str(tmp_path))


def test_engine_update_is_what_the_attacker_simulates(tiny_fed):
  """No defence, one local step: the server's view (the engine's client update) equals
  the attacker's replay `-lr * gradient` of the victim's image."""
  from fedsim import inversion_study, models
  from fedsim import round as round_lib
  c = tiny_study_config()
  setting = inversion_study.Setting("no defence")
  cfg = inversion_study.setting_config(c, setting)
  model = models.make_model(cfg.model, num_classes=tiny_fed.num_classes, conv="patches")
  params = model.init(jax.random.key(0), jnp.zeros((1,) + tiny_fed.image_shape))
  data = inversion_study.victim_data(tiny_fed, np.array([0]), 1)
  observe = inversion_study.make_observer(cfg, tiny_fed, model.apply, setting)
  observed, weights = observe(params, data, jax.random.key(0), round_lib.hyperparameters(cfg))
  x = (np.asarray(data.images, np.float32) / 255.0 - tiny_fed.mean) / tiny_fed.std
  replay = inversion.local_sgd_update(
      lambda p, x, y: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
          model.apply(p, x), y)), params, steps=1, learning_rate=cfg.client.learning_rate)
  expected = replay(x[0], data.labels[0])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, atol=1e-6), observed,
               expected)
  assert weights.tolist() == [[1.0]]


def test_missing_attack_workdir_is_one_clear_error(tmp_path):
  from fedsim import inversion_study
  c = tiny_study_config()
  c.attack.workdir = str(tmp_path / "no_run")
  with pytest.raises(ValueError, match=r"attack.workdir='.*no_run' holds no run"):
    inversion_study.prepare(c)
  (tmp_path / "no_run").mkdir()
  (tmp_path / "no_run" / "config.json").write_text("{}")
  with pytest.raises(ValueError, match="holds no checkpoint to attack"):
    inversion_study.prepare(c)
