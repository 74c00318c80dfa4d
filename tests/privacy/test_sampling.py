"""The samplers the DpEvents describe: Poisson over examples or whole patients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from privacy.sampling import PoissonSampler, poisson_rate


def test_poisson_rate_is_expected_batch_over_units_capped_at_one():
  np.testing.assert_allclose(poisson_rate(np.array([400, 100, 50, 0]), 100),
                             [0.25, 1.0, 1.0, 1.0])


def test_exact_draw_has_the_poisson_rate_and_ignores_padding():
  n, rate = 64, 0.25
  real = jnp.arange(n) < 40
  sampler = PoissonSampler("example")
  draws = np.stack([np.asarray(sampler.draw(jax.random.key(i), jnp.arange(n), real,
                                            jnp.float32(rate))[1]) for i in range(200)])
  assert not draws[:, 40:].any()  # padded examples are never drawn
  # 8,000 Bernoulli(0.25) draws: std of the mean 0.0048; 0.03 is > 6 std.
  assert abs(draws[:, :40].mean() - rate) < 0.03


def test_unknown_unit_is_refused():
  with pytest.raises(ValueError, match="unit='hospital' must be one of"):
    PoissonSampler("hospital")


def test_truncated_patient_draw_keeps_whole_patients_and_flags_truncation():
  images = np.array([1, 3, 2, 4, 1, 2, 3, 1, 4, 2, 1, 1])  # per patient
  patients = np.repeat(np.arange(len(images)), images)
  n = len(patients) + 5  # padded slots
  ids = jnp.asarray(np.pad(patients, (0, 5), constant_values=-1), jnp.int32)
  real = jnp.arange(n) < len(patients)
  exact = PoissonSampler("patient")
  capped = PoissonSampler("patient", max_units=3, unit_images=4)
  seen_truncated = seen_whole = 0
  for i in range(100):
    key, rate = jax.random.key(i), jnp.float32(0.4)
    all_sel = exact.draw(key, ids, real, rate).mask
    index, mask, _, truncated = capped.draw(key, ids, real, rate)
    assert index.shape == (12,)  # 3 patients x at most 4 images
    sampled = set(patients[np.asarray(all_sel)[:len(patients)]])
    kept_images = np.asarray(index)[np.asarray(mask)]
    kept = set(patients[kept_images])
    assert len(kept_images) == len(set(kept_images.tolist()))  # no image twice
    assert kept <= sampled and len(kept) == min(3, len(sampled))
    for p in kept:  # whole patients only
      assert set(np.flatnonzero(patients == p)) <= set(kept_images.tolist())
    assert bool(truncated) == (len(sampled) > 3)
    seen_truncated += bool(truncated)
    seen_whole += not bool(truncated)
  assert seen_truncated and seen_whole  # both branches exercised
