"""Membership inference from a model's outputs: loss threshold and LiRA.

* `loss_scores`: minus the per-example loss (Yeom et al. 2018): members are fit
  better.
* `lira_scores`: the likelihood-ratio attack of Carlini et al. 2022 ("Membership
  inference attacks from first principles"). Per example, the logit-scaled
  confidence phi = log p_y - log(1 - p_y) of shadow models trained with it (in)
  and without it (out) is fitted by Gaussians; the online score is
  log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out), the offline one
  log P[N(mu_out, s_out) <= phi] (out models only). With few shadows the
  variances are pooled over examples (the paper's "global variance").
* `roc`: AUC and TPR at fixed low FPRs (the paper's headline numbers).

Pure jax.numpy / numpy over `[models, examples]` arrays: usable without fedsim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats


def logit_confidence(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """phi = log p_y - log(1 - p_y) `[..., N]` from logits `[..., N, classes]`, stable."""
  true = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
  return true - jax.nn.logsumexp(others, axis=-1)


def loss_scores(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Minus the cross-entropy `[..., N]` (higher: more likely a member)."""
  return -(jax.nn.logsumexp(logits, axis=-1)
           - jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0])


def _gaussian_fit(phi: np.ndarray, mask: np.ndarray, global_variance: bool):
  """Per-example mean and std `[N]` of `phi [S, N]` over the shadows where `mask`."""
  count = mask.sum(axis=0)
  mean = np.where(mask, phi, 0.0).sum(axis=0) / np.maximum(count, 1)
  sq = np.where(mask, (phi - mean) ** 2, 0.0)
  if global_variance:
    std = np.full(mean.shape, np.sqrt(sq.sum() / max(count.sum() - 1, 1)))
  else:
    std = np.sqrt(sq.sum(axis=0) / np.maximum(count - 1, 1))
  return mean, np.maximum(std, 1e-6)


def lira_scores(target_phi, shadow_phi, shadow_in, *, online: bool = True,
                global_variance: bool = True) -> np.ndarray:
  """LiRA scores `[N]` of a target model (higher: more likely a member).

  Args:
    target_phi: `[N]` logit-scaled confidences of the target model.
    shadow_phi: `[S, N]` those of the shadow models.
    shadow_in: bool `[S, N]`, whether each shadow trained on each example.
    online: use the in-models too (else offline: out-models only).
    global_variance: one pooled std for all examples (recommended for < 64 shadows).
  """
  target_phi, shadow_phi = np.asarray(target_phi, float), np.asarray(shadow_phi, float)
  shadow_in = np.asarray(shadow_in, bool)
  mu_out, s_out = _gaussian_fit(shadow_phi, ~shadow_in, global_variance)
  if not online:
    return scipy.stats.norm.logcdf(target_phi, mu_out, s_out)
  mu_in, s_in = _gaussian_fit(shadow_phi, shadow_in, global_variance)
  return (scipy.stats.norm.logpdf(target_phi, mu_in, s_in)
          - scipy.stats.norm.logpdf(target_phi, mu_out, s_out))


def roc(scores, is_member, fprs=(0.001, 0.01)) -> dict:
  """ROC of "member iff score >= t": `auc`, `tpr_at_fpr` (one per `fprs`), `fpr`, `tpr`.

  AUC counts ties as one half (the Mann-Whitney statistic); TPR at a FPR is the
  best TPR among thresholds whose FPR does not exceed it.
  """
  scores, is_member = np.asarray(scores, float), np.asarray(is_member, bool)
  if is_member.all() or not is_member.any():
    raise ValueError("roc needs members and non-members, got "
                     f"{int(is_member.sum())} members of {is_member.size}")
  ranks = scipy.stats.rankdata(scores)
  n_in, n_out = is_member.sum(), (~is_member).sum()
  auc = (ranks[is_member].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out)
  order = np.argsort(-scores, kind="stable")
  last_of_tie = np.append(np.diff(scores[order]) != 0, True)
  tpr = np.concatenate([[0.0], np.cumsum(is_member[order])[last_of_tie] / n_in])
  fpr = np.concatenate([[0.0], np.cumsum(~is_member[order])[last_of_tie] / n_out])
  at = [float(tpr[fpr <= f].max()) for f in fprs]
  return {"auc": float(auc), "tpr_at_fpr": at, "fpr": fpr, "tpr": tpr}
