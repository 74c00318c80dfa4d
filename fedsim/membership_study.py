"""Membership-inference study: loss threshold and LiRA against federated models.

  python launch.py --config=experiments/membership.py --workdir=runs/mia

`config.attack.kind = "membership"` makes launch.py call `prepare` / `train` /
`format_summary` here. For each privacy setting of `attack.membership.settings`
(`none`; `example`: example-level DP-SGD at the config's sigma), the study trains
`num_models` federations of the config's hospitals as ONE compiled program
(`vmap` over federations of the engine's own client update, `lax.scan` over
rounds, every hospital in every round, FedAvg at the server). In federation s
each training example of every hospital is kept with probability 1/2, so every
model is a target whose members and non-members come from the same hospitals,
and the other models are its shadows (Carlini et al. 2022, leave-one-out). The
attacks (privacy/attacks/membership.py) are pooled over all targets: the loss
threshold, and LiRA online and offline with Gaussian fits of the logit-scaled
confidences. Each setting's epsilon is the accountant's for the hospitals of
federation 0 after the configured rounds.

With `attack.workdir=runs/x` the study attacks that earlier run's checkpointed
global model instead (`attack_checkpoint`): members are the training images of its
seen hospitals, non-members the test images of the same hospitals, and the attack is
the loss threshold (LiRA needs shadow models trained like the target, which a
finished run does not have); its epsilon is the one the run reported.

Writes `membership.csv`, `membership.png` (ROC curves, log-log) and `summary.json`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

from fedsim import client as client_lib
from fedsim import config as config_lib
from fedsim import io, keys, privacy_plan
from fedsim import round as round_lib
from fedsim import workdir as workdir_lib
from fedsim.data import make_federated_data
from fedsim.data.base import ClientArrays, FederatedData
from privacy.attacks import membership

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SETTINGS = ("none", "example")
ATTACKS = ("loss", "lira_online", "lira_offline")
COLUMNS = ("setting", "privacy_unit", "noise_multiplier", "epsilon", "delta", "attack", "auc",
           "tpr_at_0.1%_fpr", "tpr_at_1%_fpr", "models", "scores", "member_accuracy",
           "nonmember_accuracy")
# Purpose of the host (numpy) stream of the membership draws.
MEMBERSHIP = 4


@dataclasses.dataclass(frozen=True)
class Study:
  config: Any
  fed: FederatedData
  members: np.ndarray  # bool [models, hospitals, max_examples]


def prepare(config) -> Study:
  """Validates `config` (and `attack.workdir`'s run), builds the hospitals and draws
  every model's members."""
  config_lib.validate(config)
  if config.attack.workdir:
    workdir_lib.attacked_run(config.attack.workdir)  # one clear line before any compute
  fed = make_federated_data(config)
  rng = np.random.default_rng([config.seed, MEMBERSHIP])
  shape = (config.attack.membership.num_models,) + fed.train.mask.shape
  return Study(config, fed, (rng.random(shape) < 0.5) & fed.train.mask)


def setting_config(base, setting: str):
  """`base` with the setting's privacy level (DP at the config's sigma and clip norm)."""
  cfg = base.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.dp.level = setting
  return cfg


def member_data(train: ClientArrays, members: np.ndarray) -> client_lib.ClientData:
  """Each model's hospitals with only their members, first, each its own patient.

  `members` bool `[models, hospitals, N]` -> ClientData leaves `[models, hospitals, N, ...]`.
  """
  order = np.argsort(~members, axis=-1, kind="stable")
  take = lambda a: np.take_along_axis(
      np.broadcast_to(a, members.shape + a.shape[2:]),
      order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=2)
  counts = members.sum(-1).astype(np.int32)
  patients = np.where(np.arange(train.max_examples) < counts[..., None],
                      np.arange(train.max_examples), -1).astype(np.int32)
  return client_lib.ClientData(take(train.images), take(train.labels), patients, counts, counts)


def make_train_fn(setup: round_lib.Setup, num_rounds: int):
  """`train(init params [M, ...], data [M, K, ...], keys [M]) -> params [M, ...]`, jitted:
  `num_rounds` rounds of every hospital's client update and FedAvg, vmapped over models."""

  def train_one(params, data, key, hparams):
    num_clients = data.count.shape[0]

    def one_round(params, r):
      client_keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(key, r), k))(
          jnp.arange(num_clients))
      deltas, _ = jax.vmap(setup.client_update, in_axes=(None, 0, 0, None))(
          params, data, client_keys, hparams)
      return jax.tree.map(lambda p, d: p + hparams["server_lr"] * jnp.mean(d, axis=0),
                          params, deltas), None

    return jax.lax.scan(one_round, params, jnp.arange(num_rounds))[0]

  return jax.jit(jax.vmap(train_one, in_axes=(0, 0, 0, None)))


def train_models(setup: round_lib.Setup, members: np.ndarray, seed: int, num_rounds: int):
  """The trained params of every model `[M, ...]` (one program)."""
  m = members.shape[0]
  model_keys = jax.random.split(jax.random.fold_in(keys.seed_key(seed), MEMBERSHIP), m)
  init = jax.vmap(setup.init_params)(jax.vmap(lambda k: jax.random.fold_in(k, 0))(model_keys))
  data = jax.tree.map(jnp.asarray, member_data(setup.fed.train, members))
  return make_train_fn(setup, num_rounds)(init, data, model_keys, setup.hparams)


def split_logits(setup: round_lib.Setup, params, split: ClientArrays) -> np.ndarray:
  """Logits of every example of `split` (padding included) under every model
  `[M, hospitals * N, classes]`."""
  images = split.images.reshape((-1,) + setup.fed.image_shape)
  x = client_lib.normalize(jnp.asarray(images), setup.fed.mean, setup.fed.std)
  return np.asarray(jax.jit(jax.vmap(setup.apply_fn, in_axes=(0, None)))(params, x))


def attack_scores(logits: np.ndarray, labels: np.ndarray, members: np.ndarray,
                  real: np.ndarray) -> dict:
  """Every attack's scores and the membership labels, pooled over all targets."""
  phi = np.asarray(membership.logit_confidence(jnp.asarray(logits), jnp.asarray(labels)))
  loss = np.asarray(membership.loss_scores(jnp.asarray(logits), jnp.asarray(labels)))
  out = {name: [] for name in ATTACKS}
  for t in range(len(phi)):
    others = np.arange(len(phi)) != t
    out["loss"].append(loss[t][real])
    for name, online in (("lira_online", True), ("lira_offline", False)):
      out[name].append(membership.lira_scores(
          phi[t][real], phi[others][:, real], members[others][:, real], online=online))
  return ({k: np.concatenate(v) for k, v in out.items()},
          np.concatenate([members[t][real] for t in range(len(phi))]))


def setting_epsilon(cfg, fed: FederatedData, members: np.ndarray) -> float | None:
  """Epsilon of model 0's hospitals (its member counts) after every round (None: no DP)."""
  if cfg.dp.level == "none":
    return None
  counts = members.sum(-1).astype(np.int32)
  fed0 = dataclasses.replace(fed, train=dataclasses.replace(
      fed.train, counts=counts, num_patients=counts))
  ledger = privacy_plan.make_plan(cfg, fed0, apply_fn=None).new_ledger()
  for _ in range(cfg.num_rounds):
    ledger.record_round(np.ones(fed.num_clients, bool))
  return ledger.max_epsilon()


def fit_setting(study: Study, setting: str) -> tuple[round_lib.Setup, Any]:
  """The setting's engine setup and its trained models' params `[M, ...]`."""
  cfg = setting_config(study.config, setting)
  setup = round_lib.Setup(cfg, study.fed)
  return setup, train_models(setup, study.members, cfg.seed, cfg.num_rounds)


def attack_setting(study: Study, setup: round_lib.Setup, params) -> tuple[list[dict], dict]:
  """Attacks every model of a setting; its CSV rows and ROC curves `{attack: (fpr, tpr)}`."""
  cfg = setup.config
  setting = cfg.dp.level
  logits = split_logits(setup, params, study.fed.train)
  m = len(logits)
  labels = np.broadcast_to(study.fed.train.labels.reshape(-1), (m, logits.shape[1]))
  members = study.members.reshape(m, -1)
  real = study.fed.train.mask.reshape(-1)
  scores, is_member = attack_scores(logits, labels, members, real)
  hits = (logits.argmax(-1) == labels)[:, real]
  member_acc = float(hits[members[:, real]].mean())
  nonmember_acc = float(hits[~members[:, real]].mean())
  epsilon = setting_epsilon(cfg, study.fed, study.members[0])
  rows, curves = [], {}
  for name in ATTACKS:
    r = membership.roc(scores[name], is_member)
    curves[name] = (r["fpr"], r["tpr"])
    rows.append(dict(zip(COLUMNS, (
        setting, setup.plan.unit, cfg.dp.noise_multiplier if setting != "none" else None,
        epsilon, cfg.dp.delta if setting != "none" else None, name, r["auc"],
        r["tpr_at_fpr"][0], r["tpr_at_fpr"][1], m, len(is_member), member_acc,
        nonmember_acc))))
  return rows, curves


def plot_roc(curves: dict, path: str) -> None:
  """ROC curves of every setting and attack on log-log axes (low FPR is what matters)."""
  fig, ax = plt.subplots(figsize=(5.5, 5))
  for (setting, name), (fpr, tpr) in curves.items():
    ax.plot(np.maximum(fpr, 1e-4), np.maximum(tpr, 1e-4), label=f"{setting}: {name}",
            linestyle="-" if setting == "none" else "--")
  ax.plot([1e-4, 1], [1e-4, 1], color="grey", linewidth=0.8, label="chance")
  ax.set(xscale="log", yscale="log", xlim=(1e-4, 1), ylim=(1e-4, 1),
         xlabel="false positive rate", ylabel="true positive rate",
         title="membership inference (pooled over targets)")
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_csv(path: str, rows: list[dict]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(io.to_json(rows))


def attack_checkpoint(path: str) -> tuple[list[dict], dict]:
  """The loss attack on the global model checkpointed in `path` (an earlier run).

  Members: the run's training images of its seen hospitals; non-members: their test
  images (the same hospitals, never trained on). Returns the CSV row and ROC curve.
  """
  from fedsim import simulation  # pylint: disable=import-outside-toplevel
  base, step = workdir_lib.attacked_run(path)
  fed = make_federated_data(base)
  setup = round_lib.Setup(base, fed)
  params = simulation.restore_state(path, step, round_lib.init_state(setup)).params
  logits, labels, is_member = [], [], []
  for split, member in ((fed.train, True), (fed.test, False)):
    real = split.mask.reshape(-1)
    logits.append(split_logits(setup, jax.tree.map(lambda p: p[None], params), split)[0][real])
    labels.append(split.labels.reshape(-1)[real])
    is_member.append(np.full(int(real.sum()), member))
  logits, labels, is_member = map(np.concatenate, (logits, labels, is_member))
  r = membership.roc(np.asarray(membership.loss_scores(jnp.asarray(logits), jnp.asarray(labels))),
                     is_member)
  hits = logits.argmax(-1) == labels
  summary_path = os.path.join(path, workdir_lib.SUMMARY)
  epsilon = None
  if os.path.isfile(summary_path):
    with open(summary_path) as f:
      epsilon = json.load(f).get("epsilon")
  private = base.dp.level != "none"
  row = dict(zip(COLUMNS, (
      f"checkpoint round {step}", base.dp.level if private else None,
      base.dp.noise_multiplier if private else None, epsilon,
      base.dp.delta if private else None, "loss", r["auc"], r["tpr_at_fpr"][0],
      r["tpr_at_fpr"][1], 1, len(is_member), float(hits[is_member].mean()),
      float(hits[~is_member].mean()))))
  return [row], {("checkpoint", "loss"): (r["fpr"], r["tpr"])}


def train(study: Study, workdir: str, *, progress: bool = True,
          overwrite: bool = False) -> dict:
  """Runs every setting (or attacks `attack.workdir`'s model); writes membership.csv,
  membership.png and summary.json."""
  del progress  # one compiled program per setting
  start = time.perf_counter()
  workdir_lib.open_run(workdir, study.config, overwrite=overwrite)
  rows, curves = [], {}
  if study.config.attack.workdir:
    rows, curves = attack_checkpoint(study.config.attack.workdir)
  for setting in () if study.config.attack.workdir else study.config.attack.membership.settings:
    setting_rows, setting_curves = attack_setting(study, *fit_setting(study, setting))
    rows += setting_rows
    curves.update({(setting, k): v for k, v in setting_curves.items()})
  write_csv(os.path.join(workdir, "membership.csv"), rows)
  plot_roc(curves, os.path.join(workdir, "membership.png"))
  summary = {"attack": "membership", "attacked_run": study.config.attack.workdir or None,
             "settings": rows,
             "wall_seconds": time.perf_counter() - start}
  io.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  return io.to_json(summary)


def format_summary(summary: dict, workdir: str) -> str:
  """The table as a person reads it at the end of the study."""
  num = lambda v, f: "-" if v is None else format(v, f)
  w = max([8] + [len(v["setting"]) for v in summary["settings"]])
  lines = [f"{'setting':<{w}} {'epsilon':>8} {'attack':<13} {'AUC':>6} {'TPR@0.1%':>9} "
           f"{'TPR@1%':>7} {'acc in/out':>11}"]
  for v in summary["settings"]:
    lines.append(f"{v['setting']:<{w}} {num(v['epsilon'], '.3g'):>8} {v['attack']:<13} "
                 f"{v['auc']:>6.3f} {v['tpr_at_0.1%_fpr']:>9.4f} {v['tpr_at_1%_fpr']:>7.4f} "
                 f"{v['member_accuracy']:>5.2f}/{v['nonmember_accuracy']:<5.2f}")
  lines.append(f"{summary['wall_seconds']:.1f} s; record in {workdir}")
  return "\n".join(lines)
