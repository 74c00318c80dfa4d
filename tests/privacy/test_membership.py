"""Membership inference: ROC metrics, LiRA, and the shadow-federation study end to end."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import membership as membership_config
from fedsim import membership_study, simulation
from fedsim.data import make_federated_data
from privacy.attacks import membership
from tests.conftest import tiny_config


def test_roc_on_hand_worked_scores():
  r = membership.roc([0.9, 0.8, 0.3, 0.7, 0.1, 0.2], [1, 1, 1, 0, 0, 0], fprs=(0.0, 0.34))
  # pairs (member > non-member): 0.9, 0.8 beat all 3; 0.3 beats 0.1 and 0.2 -> 8 / 9
  assert r["auc"] == pytest.approx(8 / 9)
  assert r["tpr_at_fpr"] == pytest.approx([2 / 3, 1.0])
  assert membership.roc([1.0, 1.0], [1, 0])["auc"] == 0.5  # a tie counts one half
  with pytest.raises(ValueError, match="members and non-members"):
    membership.roc([1.0, 2.0], [1, 1])


def test_logit_confidence_and_loss():
  logits = jnp.array([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
  labels = jnp.array([0, 2])
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  p_y = p[np.arange(2), labels]
  np.testing.assert_allclose(membership.logit_confidence(logits, labels),
                             np.log(p_y / (1 - p_y)), rtol=1e-5)
  np.testing.assert_allclose(membership.loss_scores(logits, labels), np.log(p_y), rtol=1e-5)


def test_lira_beats_a_global_threshold_on_per_example_difficulty():
  """Examples differ in difficulty (their out-mean); membership shifts phi by 1. A global
  threshold on phi barely sees it, LiRA's per-example fits do."""
  rng = np.random.default_rng(0)
  shadows, n = 32, 2000
  difficulty = rng.normal(0, 3, n)
  inside = rng.random((shadows + 1, n)) < 0.5
  phi = difficulty + 1.0 * inside + 0.5 * rng.normal(size=(shadows + 1, n))
  online = membership.lira_scores(phi[0], phi[1:], inside[1:])
  offline = membership.lira_scores(phi[0], phi[1:], inside[1:], online=False)
  global_auc = membership.roc(phi[0], inside[0])["auc"]
  assert membership.roc(online, inside[0])["auc"] > 0.85 > 0.65 > global_auc
  assert membership.roc(offline, inside[0])["auc"] > 0.85


@pytest.fixture(scope="module")
def tiny_study():
  """Two hospitals of ~17 training images at 8 px, 6 models, 10 rounds of 10 local steps
  (momentum SGD): small enough to memorise."""
  c = membership_config.get_config()
  c.num_clients = c.clients_per_round = 2
  c.num_rounds = 10
  c.data.image_size = 8
  c.data.examples_per_client = 24
  c.client.local_steps = 10
  c.client.batch_size = 8
  c.client.optimizer = "momentum"
  c.client.learning_rate = 0.05
  c.model = "cnn"
  c.engine.unroll = 1
  c.engine.conv = "patches"
  c.attack.membership.num_models = 6
  c.attack.membership.settings = ("none",)
  return membership_study.prepare(c)


@pytest.fixture(scope="module")
def trained(tiny_study):
  """The six non-private models, trained once (one compiled program)."""
  return membership_study.fit_setting(tiny_study, "none")


def test_overfitted_models_leak_membership(tiny_study, trained, tmp_path):
  rows, curves = membership_study.attack_setting(tiny_study, *trained)
  by_attack = {r["attack"]: r for r in rows}
  assert by_attack["loss"]["member_accuracy"] > by_attack["loss"]["nonmember_accuracy"]
  assert by_attack["loss"]["auc"] > 0.55 and by_attack["lira_online"]["auc"] > 0.6, rows
  membership_study.write_csv(os.fspath(tmp_path / "m.csv"), rows)
  membership_study.plot_roc({("none", k): v for k, v in curves.items()},
                            os.fspath(tmp_path / "m.png"))
  assert len(open(tmp_path / "m.csv").readlines()) == 1 + len(membership_study.ATTACKS)
  assert os.path.getsize(tmp_path / "m.png") > 0
  summary = {"settings": rows, "wall_seconds": 1.0}
  assert "lira_online" in membership_study.format_summary(summary, "x")


def test_models_that_never_saw_the_data_give_auc_near_one_half(tiny_study, trained):
  """Fresh images of 8 other hospitals (another seed), membership drawn at random: no model
  trained on any of them, so every attack is at chance. |AUC - 0.5| < 0.1 is about 3
  standard errors at the ~330 images a target (scores of one image are correlated over
  targets, so the images, not the pooled scores, set the error)."""
  setup, params = trained
  fresh_config = tiny_study.config.copy_and_resolve_references()
  fresh_config.seed, fresh_config.num_clients = 1, 8
  fresh_config.data.examples_per_client = 60
  fresh = make_federated_data(fresh_config).train
  logits = membership_study.split_logits(setup, params, fresh)
  real = fresh.mask.reshape(-1)
  fake = np.random.default_rng(5).random((len(logits), real.size)) < 0.5
  labels = np.broadcast_to(fresh.labels.reshape(-1), fake.shape)
  scores, is_member = membership_study.attack_scores(logits, labels, fake, real)
  for name, s in scores.items():
    assert abs(membership.roc(s, is_member)["auc"] - 0.5) < 0.1, name


@pytest.mark.parametrize("field,value,match", [
    ("num_models", 2, "attack.membership.num_models=2 must be an integer >= 4"),
    ("settings", ("client",), "attack.membership.settings=.* must be a non-empty list"),
])
def test_bad_membership_fields(field, value, match):
  c = membership_config.get_config()
  c.attack.membership[field] = value
  with pytest.raises(ValueError, match=match):
    membership_study.prepare(c)


def test_an_earlier_runs_checkpoint_is_attacked(tmp_path):
  """attack.workdir: the loss attack on a finished run's model, its members and non-members
  from the same hospitals, its epsilon the run's own; a path without a run is refused."""
  run_dir = os.fspath(tmp_path / "run")
  summary = simulation.run(tiny_config(), run_dir, progress=False)
  rows, curves = membership_study.attack_checkpoint(run_dir)
  (row,) = rows
  fed = make_federated_data(tiny_config())
  assert row["setting"] == "checkpoint round 2" and row["attack"] == "loss"
  assert row["scores"] == int(fed.train.mask.sum() + fed.test.mask.sum())
  assert row["epsilon"] == pytest.approx(summary["epsilon"]) and row["epsilon"] > 0
  assert 0.0 <= row["auc"] <= 1.0 and set(curves) == {("checkpoint", "loss")}
  c = membership_config.get_config()
  c.attack.workdir = os.fspath(tmp_path / "nothing")
  with pytest.raises(ValueError, match="attack.workdir=.* holds no run"):
    membership_study.prepare(c)
