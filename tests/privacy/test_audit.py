"""Epsilon lower bounds from canaries (privacy/attacks/audit.py), and canaries in a run.

Reference values were computed with jax-privacy 2.0.0's `jax_privacy/auditing.py`
(`_epsilon_one_run`, `_epsilon_one_run_fdp`, `CanaryScoreAuditor`), which is not a
dependency of this project.
"""

import json
import os

import numpy as np
import pytest
import scipy.special
import scipy.stats

from fedsim import canaries, privacy_plan, simulation
from fedsim import config as config_lib
from fedsim import round as round_lib
from privacy.attacks import audit
from tests.conftest import tiny_config

DELTA = 1e-5


@pytest.mark.parametrize("m,k,c,one_run,fdp", [
    (1000, 100, 90, 1.6261436787042223, 2.4564050672094146),
    (1000, 500, 400, 1.1979685996776859, 2.076806928840693),
    (200, 50, 50, 2.779048165354423, 5.120928625879961),
    (100, 10, 6, 0.0, 0.0),
])
def test_bounds_equal_jax_privacy(m, k, c, one_run, fdp):
  got = audit.epsilon_one_run(m, k, c, significance=0.05, delta=DELTA)
  got_fdp = audit.epsilon_one_run_fdp(m, k, c, significance=0.05, delta=DELTA)
  np.testing.assert_allclose([got, got_fdp], [one_run, fdp], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("k,c", [(100, 90), (40, 40), (500, 300)])
def test_pure_dp_bound_is_the_binomial_tail(k, c):
  """delta = 0: P[Binomial(k, e^eps / (1 + e^eps)) >= c] = significance (Theorem 7)."""
  q = scipy.stats.beta.ppf(0.05, c, k - c + 1)  # the q whose upper tail at c is 0.05
  got = audit.epsilon_one_run(1000, k, c, significance=0.05, delta=0.0)
  np.testing.assert_allclose(got, scipy.special.logit(q), rtol=1e-5)


def test_score_audits_equal_jax_privacy():
  rng = np.random.default_rng(0)
  inside, outside = rng.normal(1, 1, 300), rng.normal(0, 1, 307)
  np.testing.assert_allclose(
      [audit.audit_scores(inside, outside, delta=DELTA),
       audit.audit_scores(inside, outside, delta=DELTA, method="one_run_fdp"),
       audit.epsilon_clopper_pearson(inside, outside, delta=DELTA)],
      [1.5997540298580524, 2.2185736119113435, 1.1774778212938348], rtol=1e-5)


def test_bounds_grow_with_correct_guesses():
  for bound in (audit.epsilon_one_run, audit.epsilon_one_run_fdp):
    values = [bound(1000, 200, c, significance=0.05, delta=DELTA) for c in range(100, 201, 10)]
    assert np.all(np.diff(values) >= 0), values
    assert values[0] == 0.0 and values[-1] > 2.0, values


def test_random_guesses_give_about_zero():
  rng = np.random.default_rng(1)
  for _ in range(5):
    scores = rng.normal(size=1000)
    included = rng.random(1000) < 0.5
    for method in audit.METHODS:
      assert audit.audit_scores(scores[included], scores[~included], delta=DELTA,
                                method=method) < 0.2


def _randomized_response(rng, m: int, epsilon: float):
  """Each canary's inclusion bit, reported truthfully with prob e^eps / (1 + e^eps):
  an exactly eps-DP mechanism per canary; the report is the score."""
  included = rng.random(m) < 0.5
  truthful = rng.random(m) < scipy.special.expit(epsilon)
  report = np.where(truthful, included, ~included).astype(float)
  return report[included], report[~included]


def _gaussian(rng, m: int, mu: float):
  """Score = mu * included + N(0, 1): a Gaussian mechanism, mu-GDP per canary."""
  included = rng.random(m) < 0.5
  score = mu * included + rng.normal(size=m)
  return score[included], score[~included]


GAUSSIAN_EPSILON = 4.37717810002877  # mu = 1 at delta 1e-5 (dp_accounting PLD, 1e-4 grid)


def test_bound_stays_below_true_epsilon():
  """Each trial exceeds the true epsilon with probability <= 0.05 (the significance);
  10 independent trials show > 2 exceedances with probability < 1.2% for a correct
  bound (binomial tail). The f-DP bound tests a Gaussian trade-off, so it is held to
  the Gaussian mechanism only (randomised response is not Gaussian-f-DP at its eps).
  Both bounds are also not vacuous."""
  rng = np.random.default_rng(2)
  rr = [audit.audit_scores(*_randomized_response(rng, 1000, 1.0), delta=DELTA)
        for _ in range(10)]
  gauss = np.array([[audit.audit_scores(*_gaussian(rng, 1000, 1.0), delta=DELTA, method=method)
                     for method in audit.METHODS] for _ in range(10)])
  assert np.sum(np.array(rr) > 1.0) <= 2, rr
  assert np.all(np.sum(gauss > GAUSSIAN_EPSILON, axis=0) <= 2), gauss
  assert np.median(rr) > 0.5 and np.all(np.median(gauss, axis=0) > 0.7), (rr, gauss)


def test_audit_fails_a_broken_claim():
  """A mechanism claimed 1-DP that is really 3-DP is caught, and one claimed 1-GDP
  (eps 4.38) that is really 4-GDP is caught by the f-DP bound."""
  rng = np.random.default_rng(3)
  assert audit.audit_scores(*_randomized_response(rng, 1000, 3.0), delta=DELTA) > 1.5
  assert audit.audit_scores(*_gaussian(rng, 1000, 4.0), delta=DELTA,
                            method="one_run_fdp") > GAUSSIAN_EPSILON


def test_clopper_pearson_over_repeated_runs():
  """Clopper-Pearson: below the true eps for repeated runs of randomized response, and
  above a broken claim."""
  rng = np.random.default_rng(4)
  correct = audit.epsilon_clopper_pearson(*_randomized_response(rng, 4000, 1.0), delta=DELTA)
  broken = audit.epsilon_clopper_pearson(*_randomized_response(rng, 4000, 3.0), delta=DELTA)
  assert 0.5 < correct <= 1.0 < broken, (correct, broken)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="two_run"), "method='two_run' must be one of"),
    (dict(significance=0.0), "significance=0.0 must be in"),
    (dict(delta=1.0), "delta=1.0 must be in"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    audit.audit_scores([1.0], [0.0], **{"delta": DELTA, **kwargs})


def test_needs_both_groups():
  with pytest.raises(ValueError, match="included and excluded canaries"):
    audit.audit_scores([1.0, 2.0], [], delta=DELTA)


# --- canaries in a run (fedsim/canaries.py, audit.enabled) --------------------------------


def _audit_config():
  """One hospital (every round, its update is what the server sees), 800 gradient canaries,
  example-level DP-SGD at sigma 6 (claimed epsilon ~0.6)."""
  c = tiny_config()
  c.num_clients = c.clients_per_round = 1
  c.num_rounds = c.eval_every = 3
  c.client.batch_size = 100
  c.client.local_steps = 5
  c.dp.level = "example"
  c.dp.noise_multiplier = 6.0
  c.audit.enabled = True
  c.audit.kind = "gradient"
  c.audit.num_canaries = 800
  c.audit.num_hospitals = 1
  return c


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory):
  setup = simulation.prepare(_audit_config())
  workdir = os.fspath(tmp_path_factory.mktemp("audit") / "run")
  return setup, workdir, simulation.train(setup, workdir, progress=False)


def test_audited_run_writes_the_bound_beside_epsilon(audited_run):
  _, workdir, _ = audited_run
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert 0.0 <= summary["audit_epsilon_lower_bound"] < summary["epsilon"]
  assert 0.0 <= summary["audit_epsilon_lower_bound_fdp"] < summary["epsilon"]
  assert summary["audit"]["kind"] == "gradient" and summary["audit"]["num_canaries"] == 800
  line = simulation.format_summary(summary, workdir).splitlines()[2]
  assert line.startswith("audit: epsilon >= ") and "800 gradient canaries" in line
  # The canaries are patients of their hospital, so they change its sampling rate: the
  # ledger preview (compute_epsilon --config) must account the data the run trained on.
  assert privacy_plan.ledger_preview(_audit_config()).max_epsilon() == summary["epsilon"]


def test_audit_catches_dp_sgd_with_noise_scaled_down_tenfold(audited_run):
  """The same run with sigma / 10 in the compiled step (the accountant still charges sigma):
  the lower bound exceeds the claimed epsilon."""
  setup, _, summary = audited_run
  hparams = setup.hparams
  setup.hparams = {**hparams, "noise_multiplier": hparams["noise_multiplier"] / 10}
  try:
    state = round_lib.init_state(setup)
    initial = state.params
    for r in range(1, setup.config.num_rounds + 1):
      state, _ = round_lib.round_step(setup, state, r)
  finally:
    setup.hparams = hparams
  broken = canaries.audit_run(setup, setup.canaries, initial, state.params,
                              significance=0.05, delta=setup.config.dp.delta)
  assert broken["audit_epsilon_lower_bound"] > summary["epsilon"], (broken, summary["epsilon"])


def test_canaries_are_patients_in_the_data(tiny_fed):
  """Included canaries are appended as one-image patients (so sampled and accounted with
  the hospital's data); excluded ones are absent; input canaries have real labels."""
  c = tiny_config()
  c.audit.num_canaries, c.audit.num_hospitals = 40, 2
  made = canaries.make(c.audit, tiny_fed, c.seed)
  fed = canaries.insert(tiny_fed, made)
  added = np.bincount(made.hospitals[made.included], minlength=tiny_fed.num_clients)
  np.testing.assert_array_equal(fed.train.counts, tiny_fed.train.counts + added)
  np.testing.assert_array_equal(fed.train.num_patients, tiny_fed.train.num_patients + added)
  assert len(set(made.hospitals)) == 2 and 10 < made.included.sum() < 30
  for k in np.flatnonzero(added):
    new = slice(tiny_fed.train.counts[k], fed.train.counts[k])
    np.testing.assert_array_equal(fed.train.images[k, new], made.images[made.included
                                                                        & (made.hospitals == k)])
    assert set(fed.train.patients[k, new]) == set(
        range(tiny_fed.train.num_patients[k], fed.train.num_patients[k]))
  assert made.labels.min() >= 0 and made.labels.max() < tiny_fed.num_classes
  rates = privacy_plan.local_sampling(c, fed)[0]
  np.testing.assert_allclose(rates, np.minimum(1, c.client.batch_size / fed.train.counts))


@pytest.mark.parametrize("field,value,match", [
    ("kind", "label", "audit.kind='label' must be one of"),
    ("num_canaries", 1, "audit.num_canaries=1 must be an integer >= 2"),
    ("num_hospitals", 7, "audit.num_hospitals=7 must be <= num_clients=6"),
    ("significance", 1.0, "audit.significance=1.0 must be in"),
])
def test_bad_audit_fields(field, value, match):
  c = tiny_config()
  c.audit.enabled = True
  c.audit[field] = value
  with pytest.raises(ValueError, match=match):
    config_lib.validate(c)


def test_gradient_canaries_need_dp_sgd():
  c = tiny_config()
  c.audit.enabled, c.audit.kind, c.dp.level = True, "gradient", "client"
  with pytest.raises(ValueError, match="audit.kind='gradient' must be 'input' with "
                                       "dp.level='client'"):
    config_lib.validate(c)
