"""The main job's config: a private federation of at least 100 hospitals, as documented."""

from experiments import default
from fedsim import config as config_lib
from fedsim import privacy_plan


def test_default_is_a_private_federation_of_hundreds_of_hospitals():
  config = default.get_config()
  config_lib.validate(config)
  assert config.num_clients >= 100
  assert config.dp.level == "patient"
  assert config.dp.accountant == "pld" and config.dp.delta == 1e-5
  assert config.data.source == "synthetic" and config.data.num_unseen > 0
  # Curves with a point every few rounds, not three.
  assert config.num_rounds // config.eval_every >= 8


def test_default_spends_a_single_digit_epsilon():
  """The ledger the default run ends with (replayed from its cohorts, no training)."""
  ledger = privacy_plan.ledger_preview(default.get_config())
  assert 1.0 < ledger.max_epsilon() < 10.0
  counts = ledger.composition_counts
  assert counts.min() < counts.max()  # a cohort per round: hospitals charged unequally
