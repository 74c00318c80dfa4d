"""Gradient-inversion study: what a server reconstructs from a hospital's update.

  python launch.py --config=experiments/attack_inversion.py --workdir=runs/inv
  python launch.py --config=experiments/attack_inversion.py --workdir=runs/inv2 \
      --config.attack.workdir=runs/default       # attack an earlier run's checkpoint

`config.attack.kind = "inversion"` makes launch.py call `prepare` / `train` /
`format_summary` here instead of fedsim.simulation. Each setting of `settings(config)`
builds the update the server would see with the engine's own code: the privacy plan
of that setting (`privacy_plan.make_plan`: DP-SGD's sampler, per-unit clipping and
noise, or client-level clipping and the server's noise), the client update
(`client.make_client_update`, local steps in `lax.scan`), and the aggregation seam
(`aggregation.aggregate`: the sum over k hospitals that secure aggregation reveals).
The victims' data are the first images of real hospitals of the federation. The
attacker (privacy/attacks/inversion.py) knows the model, the learning rate and the
local steps, and inverts the observed update for `attack.inversion.targets` victims
at once. Quality is PSNR / SSIM (privacy/attacks/image_quality.py) of each
reconstruction against its best-matching original (Hungarian matching for batches),
the mean over the update's images; "best" is the best restart, "mean" the mean over
restarts. Each setting's epsilon is the accountant's for the victim hospitals over
the whole configured run (the largest of them), the guarantee their patients get.

Writes `inversion.csv`, `inversion.png` (originals beside reconstructions) and
`summary.json` to the workdir.
"""

from __future__ import annotations

import csv
import dataclasses
import io as _io
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy.optimize import linear_sum_assignment
from tqdm.auto import tqdm

from fedsim import aggregation, blocks, io, keys, models, privacy_plan, sampling
from fedsim import client as client_lib
from fedsim import config as config_lib
from fedsim import round as round_lib
from fedsim import workdir as workdir_lib
from fedsim.data import make_federated_data
from fedsim.data.base import FederatedData
from privacy import ledger as ledger_lib
from privacy.attacks import image_quality, inversion

NO_DP = {"level": "none"}
COLUMNS = ("setting", "attack", "stage", "images_per_update", "hospitals_summed",
           "local_steps", "privacy_unit", "noise_multiplier", "clip_norm", "epsilon",
           "delta", "psnr_best", "psnr_mean", "ssim_best", "ssim_mean", "label_accuracy",
           "seconds")


@dataclasses.dataclass(frozen=True)
class Setting:
  """One row of the table: what the hospital computes and what the attacker sees."""

  name: str
  images: int = 1        # images in each hospital's update
  hospitals: int = 1     # updates summed before the attacker sees them (secure aggregation)
  local_steps: int = 1   # 1: a gradient step; > 1: a model difference
  late: bool = False     # attack the late model instead of round 1's
  method: str = "ig"     # ig | dlg
  dp: tuple = tuple(NO_DP.items())  # overrides of config.dp
  released: bool = False  # client-level DP: the noised mean the server releases


def settings(config) -> list[Setting]:
  """The rows of issue 13's table named by `attack.inversion.settings`, in that order."""
  a, dp = config.attack.inversion, config.dp
  k, sigma = a.secure_agg_hospitals, dp.noise_multiplier
  patient = lambda z: (("level", "patient"), ("noise_multiplier", z))
  client = (("level", "client"),)
  rows = {
      "none": [Setting("no defence")],
      "dlg": [Setting("no defence, DLG", method="dlg")],
      "batches": [Setting(f"no defence, {b} images, {a.local_steps} local steps", images=b,
                          local_steps=a.local_steps) for b in a.batch_sizes],
      "clipping": [Setting("clipping only (patient, sigma 0)", dp=patient(0.0))],
      "dp_sgd": [Setting(f"DP-SGD patient, sigma {z:g}", dp=patient(z))
                 for z in a.noise_multipliers],
      "example": [Setting(f"DP-SGD example, sigma {sigma:g}",
                          dp=(("level", "example"), ("noise_multiplier", sigma)))],
      "client": [Setting("client-level DP, server's view (clipped update)", dp=client)],
      "client_released": [Setting(f"client-level DP, released noised mean of {k}",
                                  hospitals=k, dp=client, released=True)],
      "secure_agg": [Setting(f"secure aggregation, sum of {k} hospitals", hospitals=k)],
      "late": [Setting("no defence, late model", late=True)],
  }
  assert tuple(rows) == config_lib.INVERSION_SETTINGS
  return [row for name in a.settings for row in rows[name]]


def setting_config(base, setting: Setting):
  """The run config of `setting`: the base run with its DP and local steps."""
  cfg = ml_collections.ConfigDict(base.to_dict())
  cfg.client.local_steps = setting.local_steps
  for field, value in setting.dp:
    cfg.dp[field] = value
  if cfg.dp.level == "client" and cfg.client_sampling_rate == 0:
    cfg.client_sampling_rate = cfg.clients_per_round / cfg.num_clients
  return cfg


class Study(NamedTuple):
  """A prepared study (nothing trained yet): the attacked run and its federation."""

  config: Any    # the attack config
  base: Any      # the run whose updates are attacked: this config, or attack.workdir's
  fed: FederatedData
  setup: round_lib.Setup
  late_round: int  # rounds trained before the late model's update


def prepare(config) -> Study:
  """Validates `config`, reads `attack.workdir`'s run if named, builds the federation."""
  config_lib.validate(config)
  path = config.attack.workdir
  base, late = (workdir_lib.attacked_run(path) if path
                else (config, config.attack.inversion.late_rounds))
  fed = make_federated_data(base)
  config_lib.check_inversion_victims(config.attack.inversion, fed.train.counts)
  return Study(config, base, fed, round_lib.Setup(base, fed), late)


def models_to_attack(study: Study) -> dict:
  """{"round 1": the initial global params, "late": after `late_round` rounds}: the
  checkpoint of `attack.workdir`, or this config's run trained that far here."""
  from fedsim import simulation  # pylint: disable=import-outside-toplevel
  state = round_lib.init_state(study.setup)
  params = {"round 1": state.params}
  if "late" not in study.config.attack.inversion.settings:
    return params
  if study.config.attack.workdir:
    state = simulation.restore_state(study.config.attack.workdir, study.late_round, state)
  else:
    for r in range(1, study.late_round + 1):
      state, _ = round_lib.round_step(study.setup, state, r)
  params["late"] = state.params
  return params


def victims(config, setting: Setting, num_clients: int) -> np.ndarray:
  """Hospital ids `[T, k]`: target t sums hospitals `first + t * k + j` (mod clients)."""
  a = config.attack.inversion
  ids = a.first_hospital + np.arange(a.targets * setting.hospitals)
  return (ids % num_clients).reshape(a.targets, setting.hospitals)


def victim_data(fed: FederatedData, ids: np.ndarray, images: int) -> client_lib.ClientData:
  """The first `images` training images of each hospital in `ids` `[n]`, as ClientData."""
  train = fed.train
  patients = train.patients[ids, :images]
  renumbered = np.stack([np.unique(p, return_inverse=True)[1].reshape(p.shape)
                         for p in patients])
  return client_lib.ClientData(
      images=jnp.asarray(train.images[ids, :images]),
      labels=jnp.asarray(train.labels[ids, :images]),
      patients=jnp.asarray(renumbered, jnp.int32),
      count=jnp.full(len(ids), images, jnp.int32),
      num_patients=jnp.asarray([len(np.unique(p)) for p in patients], jnp.int32))


def setting_epsilon(cfg, fed: FederatedData, ids: np.ndarray) -> float | None:
  """The largest epsilon of hospitals `ids` over the whole run of `cfg` (None: no DP)."""
  level, sigma = cfg.dp.level, cfg.dp.noise_multiplier
  if level == "none":
    return None
  if sigma == 0:
    return float("inf")
  if level == "client":  # one event, the same for every hospital
    ledger = privacy_plan.make_plan(cfg, fed, apply_fn=None).new_ledger()
    privacy_plan.replay_ledger(ledger, cfg, cfg.num_rounds)
    return ledger.max_epsilon()
  # The plan's per-hospital ledger restricted to the victims (all hospitals: ~1 min).
  rates, steps, units = privacy_plan.local_sampling(cfg, fed)
  truncated = 0 < cfg.dp.max_batch_size < int(units.max())
  ledger = ledger_lib.PrivacyLedger.for_local_dp_sgd(
      sampling_rates=rates[ids], steps=steps[ids], noise_multiplier=sigma,
      delta=cfg.dp.delta, accountant=cfg.dp.accountant, unit=level,
      truncated_batch_size=cfg.dp.max_batch_size if truncated else None,
      dataset_sizes=units[ids] if truncated else None)
  for r in range(1, cfg.num_rounds + 1):
    ledger.record_round(sampling.participation(cfg, r)[ids])
  return ledger.max_epsilon()


def make_observer(cfg, fed: FederatedData, apply_fn, setting: Setting):
  """Jitted `(params, data [T*k], key, hparams) -> observed updates [T]`.

  The engine's client update under `cfg`'s privacy plan for every victim hospital, the
  plan's per-client transform (client-level clipping), the weighted sum over each
  target's k hospitals (the aggregation seam), and for `setting.released` the plan's
  server-side privatisation (noise on the sum, division by the expected cohort).
  """
  plan = privacy_plan.make_plan(cfg, fed, apply_fn)
  schedule = client_lib.LocalSchedule(max_examples=setting.images, batch_size=setting.images,
                                      steps=cfg.client.local_steps)
  update = client_lib.make_client_update(
      apply_fn, plan.grad_fn, schedule=schedule, optimizer=cfg.client.optimizer,
      mean=fed.mean, std=fed.std, sampler=plan.sampler)
  k = setting.hospitals

  def one(params, data, key, hparams):
    delta, _ = update(params, data, key, hparams)
    return delta if plan.transform is None else plan.transform(delta, hparams)[0]

  def observe(params, data, key, hparams):
    n = data.count.shape[0]
    deltas = jax.vmap(one, in_axes=(None, 0, 0, None))(
        params, data, jax.random.split(key, n), hparams)
    weights = aggregation.client_weights(data.count, jnp.ones(n, bool), plan.weighting)
    per_target = lambda x: x.reshape((n // k, k) + x.shape[1:])
    sums = jax.vmap(aggregation.aggregate)(jax.tree.map(per_target, deltas),
                                           per_target(weights))
    if not setting.released:
      return sums, per_target(weights)
    round_sums = blocks.RoundSums(sums, jnp.sum(per_target(weights), 1), {})
    noise_keys = jax.random.split(jax.random.fold_in(key, n), n // k)
    private = jax.vmap(lambda s, nk: plan.privatize(s, nk, hparams)[0])(round_sums, noise_keys)
    return private, per_target(weights)

  return jax.jit(observe)


def make_attack(config, model, fed: FederatedData, setting: Setting):
  """The jitted inverter of `setting`: context `(params, client lr, weights [k])`."""
  a = config.attack.inversion
  k, b = setting.hospitals, setting.images

  def loss_fn(p, x, y):
    return jnp.mean(client_lib.cross_entropy(model.apply(p, x), y))

  def make_update_fn(context):
    params, lr, weights = context
    local = inversion.local_sgd_update(loss_fn, params, steps=setting.local_steps,
                                       learning_rate=lr)

    def update_fn(x, y):  # the k hospitals' updates, summed as the server sums them
      ups = jax.vmap(local)(x.reshape((k, b) + x.shape[1:]), y.reshape(k, b))
      return aggregation.aggregate(ups, weights)
    return update_fn

  ig = setting.method == "ig"
  return inversion.make_inverter(
      make_update_fn, image_shape=(k * b,) + fed.image_shape, bounds=pixel_bounds(fed),
      method=setting.method, optimizer="adam" if ig else a.dlg_optimizer,
      steps=a.steps if ig else a.dlg_steps,
      learning_rate=a.learning_rate if ig else a.dlg_learning_rate,
      tv_weight=a.tv_weight if ig else 0.0, restarts=a.restarts)


def pixel_bounds(fed: FederatedData) -> tuple[float, float]:
  """The normalised values of pixels 0 and 255: the attacker's box."""
  return ((0.0 - fed.mean) / fed.std, (1.0 - fed.mean) / fed.std)


def quality(images: np.ndarray, originals: np.ndarray, fed: FederatedData):
  """PSNR, SSIM `[T, R]` (mean over an update's images) and the matching `[T, R, n]`.

  `images` `[T, R, n, H, W, C]` normalised; `originals` uint8 `[T, n, H, W, C]`. Each
  original is paired with one reconstruction (Hungarian matching on PSNR).
  """
  rec = np.clip(np.asarray(images) * fed.std + fed.mean, 0.0, 1.0)
  orig = np.asarray(originals, np.float32) / 255.0
  pairs = np.asarray(image_quality.psnr(rec[:, :, :, None], orig[:, None, None]))
  t, r, n = pairs.shape[:3]
  match = np.zeros((t, r, n), np.int64)  # match[t, r, j]: the reconstruction of original j
  for i in range(t):
    for j in range(r):
      rows, cols = linear_sum_assignment(-np.nan_to_num(pairs[i, j], posinf=1e3))
      match[i, j, cols] = rows
  matched = np.take_along_axis(rec, match[..., None, None, None], axis=2)
  psnr = np.asarray(image_quality.psnr(matched, orig[:, None])).mean(-1)
  ssim = np.asarray(image_quality.ssim(matched, orig[:, None])).mean(-1)
  return psnr, ssim, matched


class Row(NamedTuple):
  """One attacked setting: the CSV row and the images for the grid."""

  values: dict
  originals: np.ndarray  # uint8 [n, H, W, C] of target 0
  best: np.ndarray       # [n, H, W, C] in [0, 1]: target 0's best restart, matched


def attack_setting(study: Study, setting: Setting, params: dict, index: int,
                   cache: dict) -> Row:
  """Builds the observed updates of `setting`, inverts them, scores the reconstructions.

  `cache` keeps the compiled observer and inverter of each shape across settings
  (noise, clip norm and learning rate are traced: one compilation serves them all).
  """
  start = time.perf_counter()
  config, fed = study.config, study.fed
  cfg = setting_config(study.base, setting)
  ids = victims(config, setting, fed.num_clients)
  model = models.make_model(cfg.model, num_classes=fed.num_classes, conv="patches")
  data = victim_data(fed, ids.reshape(-1), setting.images)
  hparams = round_lib.hyperparameters(cfg)
  key = jax.random.fold_in(keys.attack_key(config.seed), index)
  model_params = params["late" if setting.late else "round 1"]
  shapes = (setting.images, setting.hospitals, setting.local_steps)
  observer_key = ("observe", cfg.dp.level, setting.released) + shapes
  if observer_key not in cache:
    cache[observer_key] = make_observer(cfg, fed, model.apply, setting)
  observed, weights = cache[observer_key](
      model_params, data, jax.random.fold_in(key, 0), hparams)
  shape = (ids.shape[0], setting.hospitals * setting.images)
  labels = data.labels.reshape(shape)
  label_accuracy = None
  if shape[1] == 1:  # one image: the attacker recovers the label from the last layer
    recovered = inversion.recover_label(-observed["params"]["head"]["bias"])[:, None]
    label_accuracy = float(jnp.mean(recovered == labels))
    labels = recovered
  invert_key = ("invert", setting.method) + shapes
  if invert_key not in cache:
    cache[invert_key] = make_attack(config, model, fed, setting)
  invert = cache[invert_key]
  recon = invert((model_params, hparams["client_lr"], weights[0]), observed, labels,
                 jax.random.fold_in(key, 1))
  originals = np.asarray(data.images).reshape(shape + fed.image_shape)
  psnr, ssim, matched = quality(recon.images, originals, fed)
  best = int(np.argmax(psnr[0]))
  epsilon = setting_epsilon(cfg, fed, ids.reshape(-1))
  values = {
      "setting": setting.name, "attack": setting.method,
      "stage": f"round {study.late_round + 1}" if setting.late else "round 1",
      "images_per_update": shape[1], "hospitals_summed": setting.hospitals,
      "local_steps": setting.local_steps,
      "privacy_unit": privacy_plan.UNITS[cfg.dp.level],
      "noise_multiplier": None if cfg.dp.level == "none" else cfg.dp.noise_multiplier,
      "clip_norm": None if cfg.dp.level == "none" else cfg.dp.clip_norm,
      "epsilon": epsilon, "delta": None if epsilon is None else cfg.dp.delta,
      "psnr_best": float(psnr.max(1).mean()), "psnr_mean": float(psnr.mean()),
      "ssim_best": float(ssim.max(1).mean()), "ssim_mean": float(ssim.mean()),
      "label_accuracy": label_accuracy, "seconds": time.perf_counter() - start}
  return Row(values, originals[0], matched[0, best])


def write_csv(path: str, rows: list[dict]) -> None:
  """The table, atomically; empty cells for None, numbers to 4 significant digits."""
  fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else v)
  out = _io.StringIO()
  writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
  writer.writeheader()
  writer.writerows({k: fmt(row[k]) for k in COLUMNS} for row in rows)
  io.write_atomic(path, out.getvalue())


def plot_grid(rows: list[Row], path: str, max_images: int = 4) -> None:
  """Originals beside reconstructions: one line per setting, up to `max_images` pairs."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  pairs = min(max_images, max(len(row.originals) for row in rows))
  label_width = 3.2  # inches left of the images for each setting's name
  width = 1.3 * 2 * pairs + label_width
  fig, axes = plt.subplots(len(rows), 2 * pairs, figsize=(width, 1.35 * len(rows) + 0.3),
                           squeeze=False)
  for line, row in zip(axes, rows):
    for ax in line:
      ax.axis("off")
    for j in range(min(pairs, len(row.originals))):
      for ax, image, what in ((line[2 * j], row.originals[j] / 255.0, "original"),
                              (line[2 * j + 1], row.best[j], "reconstruction")):
        ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray",
                  vmin=0.0, vmax=1.0)
        if row is rows[0]:
          ax.set_title(what, fontsize=7)
    v = row.values
    line[0].text(-0.15, 0.5, f"{v['setting']}\n{v['stage']}, PSNR {v['psnr_best']:.1f} dB",
                 transform=line[0].transAxes, ha="right", va="center", fontsize=7)
  fig.subplots_adjust(left=label_width / width, right=0.99, top=1 - 0.3 / fig.get_figheight(),
                      bottom=0.01, wspace=0.08, hspace=0.15)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def train(study: Study, workdir: str, *, progress: bool = True,
          overwrite: bool = False) -> dict:
  """Runs every setting; writes inversion.csv, inversion.png and summary.json."""
  start = time.perf_counter()
  workdir_lib.open_run(workdir, study.config, overwrite=overwrite)
  params = models_to_attack(study)
  rows, cache = [], {}
  for i, setting in enumerate(tqdm(settings(study.config), desc="settings",
                                   disable=not progress, dynamic_ncols=True)):
    rows.append(attack_setting(study, setting, params, i, cache))
  values = [row.values for row in rows]
  write_csv(os.path.join(workdir, "inversion.csv"), values)
  plot_grid(rows, os.path.join(workdir, "inversion.png"))
  summary = {"attack": "inversion", "attacked_run": study.config.attack.workdir or None,
             "late_round": study.late_round, "settings": values,
             "wall_seconds": time.perf_counter() - start}
  io.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  return io.to_json(summary)


def format_summary(summary: dict, workdir: str) -> str:
  """The table as a person reads it at the end of the study."""
  num = lambda v, f: "-" if v is None else format(v, f)
  lines = [f"{'setting':<48} {'stage':>9} {'imgs':>4} {'sigma':>6} {'epsilon':>8} "
           f"{'PSNR best/mean':>15} {'SSIM best/mean':>15}"]
  for v in summary["settings"]:
    lines.append(f"{v['setting'][:48]:<48} {v['stage']:>9} {v['images_per_update']:>4} "
                 f"{num(v['noise_multiplier'], 'g'):>6} {num(v['epsilon'], '.3g'):>8} "
                 f"{v['psnr_best']:>7.1f}/{v['psnr_mean']:<7.1f} "
                 f"{v['ssim_best']:>7.3f}/{v['ssim_mean']:<7.3f}")
  lines.append(f"{summary['wall_seconds']:.1f} s; record in {workdir}")
  return "\n".join(lines)
