"""Encrypted inference as a service: a trained run diagnoses images under the protocol.

`run_service(workdir, ...)` loads the run's config and checkpoint, the chosen images
(the run's test split, or a .npz file), shares the model once (setup), then per batch
lets the dealer make the material (offline, timed) and the parties run the protocol
(online, timed), and compares with the plaintext model: agreement of the labels,
accuracy and AUROC both ways, the largest logit error, bytes and rounds per image.
The record goes to `<workdir>/encrypted_inference.json`.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from fedsim import io, models
from fedsim import workdir as workdir_lib
from fedsim.client import normalize
from fedsim.metrics import auroc
from privacy.encrypted_inference import channels, network, ring
from privacy.validation import check

RECORD = "encrypted_inference.json"
BATCH_SIZE = 64  # images per protocol call
SPLITS = ("test", "val", "unseen")
REVEALS = ("logits", "label")


def check_args(*, split: str, images: str, limit: int, batch_size: int, reveal: str,
               linear: str = "auto") -> None:
  """One ValueError naming the flag, before any compute."""
  check(split in SPLITS, "--split", split, f"one of {list(SPLITS)}")
  check(not images or os.path.isfile(images), "--images", images,
        "an existing .npz file with 'images' (uint8 [N, H, W, C]) and optionally 'labels'")
  check(limit >= 0, "--limit", limit, ">= 0 (0: all images)")
  check(batch_size >= 1, "--batch_size", batch_size, ">= 1")
  check(reveal in REVEALS, "--reveal", reveal, f"one of {list(REVEALS)}")
  check(linear in network.LINEAR, "--linear", linear, f"one of {list(network.LINEAR)}")


def load_run(workdir: str) -> tuple[ml_collections.ConfigDict, dict]:
  """The run's config and its evaluated params (the EMA when the run used one)."""
  path = os.path.join(workdir, workdir_lib.CONFIG)
  check(os.path.isfile(path), "--workdir", workdir, "a run folder with config.json "
        "(written by launch.py)")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f)["config"])
  task = config.get("task", "classification")
  check(task == "classification", "task", task, "'classification' for encrypted inference "
        "(the secure protocol reveals a label per image, not a mask)")
  network.check_model(config.model)
  from fedsim import checkpoint  # orbax is slow to import
  ckpt = workdir_lib.checkpoint_dir(workdir)
  check(os.path.isdir(ckpt) and checkpoint.latest_step(ckpt) is not None, "--workdir",
        workdir, "a run with a checkpoint (checkpoints/ is missing or empty)")
  state = checkpoint.restore(ckpt)
  params = state["params"]
  if config.server.ema_decay > 0:  # the debiased moving average is what was evaluated
    ema, count = state["average"]["ema"], int(state["average"]["count"])
    params = jax.tree.map(lambda e: e / (1 - config.server.ema_decay**count), ema)
  return config, params


def load_images(config, *, split: str, images: str, limit: int):
  """(uint8 images [N, H, W, C], int labels [N] or None, data set)."""
  from fedsim.data import make_federated_data
  fed = make_federated_data(config)
  if images:
    with np.load(images) as f:
      x, y = f["images"], (f["labels"] if "labels" in f else None)
  else:
    arrays = getattr(fed, split)
    check(arrays is not None, "--split", split, "a split this run has")
    x, y = arrays.images[arrays.mask], arrays.labels[arrays.mask]
  limit = limit or len(x)
  return x[:limit], (None if y is None else np.asarray(y[:limit])), fed


def _softmax(logits: np.ndarray) -> np.ndarray:
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _metrics(enc_label, enc_logits, plain_logits, labels) -> dict:
  plain_label = plain_logits.argmax(-1)
  out = {"agreement_percent": 100.0 * float(np.mean(enc_label == plain_label)),
         "disagreements": int(np.sum(enc_label != plain_label))}
  # A label flips only where the plaintext model nearly ties: its top-2 logit gap there
  # (the 20 largest, largest first: the first bounds them all).
  top2 = np.sort(plain_logits[enc_label != plain_label], -1)[:, -2:]
  out["disagreement_margins"] = sorted((float(g) for g in top2[:, 1] - top2[:, 0]),
                                       reverse=True)[:20]
  if enc_logits is not None:
    out["max_logit_error"] = float(np.abs(enc_logits - plain_logits).max())
  if labels is not None:
    out["accuracy_encrypted"] = float(np.mean(enc_label == labels))
    out["accuracy_plaintext"] = float(np.mean(plain_label == labels))
    out["auroc_plaintext"] = auroc.macro_auroc(_softmax(plain_logits), labels)
    out["auroc_encrypted"] = (None if enc_logits is None else
                              auroc.macro_auroc(_softmax(enc_logits), labels))
  return out


def encrypted_predict(model_name: str, params, images: np.ndarray, *, batch_size: int,
                      reveal: str, seed: int = 0, jit: bool = True, linear: str = "auto",
                      progress: bool = False) -> dict:
  """Runs the protocol on normalised float images `[N, H, W, C]`, a batch at a time
  (a progress bar over the batches with `progress`).

  Returns labels `[N]`, logits `[N, C]` (None for reveal="label"), the per-batch
  channel counts, setup counts and the timings. `jit=False` runs op by op: no
  compilation (quicker for one small batch), slower per image. `linear`: how linear
  layers are computed (network.use_limbs).
  """
  fn = network.inference_fn(network.forward_fn(model_name, linear), reveal)

  def with_input(ch, dealer, model, x):
    ch.send(channels.ring_bytes(x[0].size), "share_input")  # party 0 -> party 1
    return fn(ch, dealer, model, x)

  key = jax.random.key(seed)
  with ring.x64():
    setup_ch = channels.Channel()
    model, masks = network.setup(setup_ch, params, jax.random.fold_in(key, 0))
    n = len(images)
    batch = min(batch_size, n)
    share = jax.jit(lambda k, x: ring.share(k, ring.encode(x)))
    example = share(key, jnp.zeros((batch, *images.shape[1:]), jnp.float32))
    start = time.perf_counter()
    offline, online, counts = network.compile_protocol(with_input, masks, model, example,
                                                       jit=jit)
    compile_s = time.perf_counter() - start
    labels, logits, t_off, t_on = [], [], 0.0, 0.0
    bar = tqdm(range(0, n, batch), desc="encrypted batches", unit="batch", disable=not progress,
               leave=False)
    for b, lo in enumerate(bar):
      x = np.zeros((batch, *images.shape[1:]), np.float32)
      x[:min(batch, n - lo)] = images[lo:lo + batch]
      bkey = jax.random.fold_in(key, b + 1)
      start = time.perf_counter()
      mat = jax.block_until_ready(offline(jax.random.fold_in(bkey, 0)))
      t_off += time.perf_counter() - start
      start = time.perf_counter()
      one_hot, out = jax.block_until_ready(
          online(mat, model, share(jax.random.fold_in(bkey, 1), jnp.asarray(x))))
      t_on += time.perf_counter() - start
      bar.set_postfix(ms_per_image=f"{(t_off + t_on) * 1e3 / min(lo + batch, n):.1f}")
      labels.append(np.asarray(one_hot).argmax(-1))
      if out is not None:
        logits.append(np.asarray(ring.decode(out)))
  take = lambda parts: np.concatenate(parts)[:n] if parts else None
  return {"labels": take(labels), "logits": take(logits), "batch_counts": counts,
          "batch_size": batch, "batches": -(-n // batch), "setup": setup_ch.totals(),
          "compile_seconds": compile_s, "offline_seconds": t_off, "online_seconds": t_on}


def run_service(workdir: str, *, split: str = "test", images: str = "", limit: int = 0,
                batch_size: int = BATCH_SIZE, reveal: str = "logits", seed: int = 0,
                jit: bool = True, linear: str = "auto", progress: bool = False) -> dict:
  """Encrypted inference on a run's images; writes and returns the record."""
  check_args(split=split, images=images, limit=limit, batch_size=batch_size, reveal=reveal,
             linear=linear)
  start = time.perf_counter()
  config, params = load_run(workdir)
  raw, labels, fed = load_images(config, split=split, images=images, limit=limit)
  x = np.asarray(normalize(jnp.asarray(raw), fed.mean, fed.std))
  with jax.default_matmul_precision("highest"):  # the reference: no TF32 on GPUs
    plain = np.asarray(jax.jit(lambda p, v: _plaintext_logits(
        config.model, p, v, fed.num_classes))(params, x), np.float64)
  enc = encrypted_predict(config.model, params, x, batch_size=batch_size, reveal=reveal,
                          seed=seed, jit=jit, linear=linear, progress=progress)
  n = len(x)
  per_batch, size = enc["batch_counts"], enc["batch_size"]
  record = {
      "workdir": workdir, "model": config.model, "images": images or f"split:{split}",
      "num_images": n, "image_shape": list(x.shape[1:]), "reveal": reveal, "linear": linear,
      "limbs": {kind: network.use_limbs(linear, kind) for kind in ("conv", "dense")},
      "ring_bits": ring.RING_BITS, "frac_bits": ring.FRAC_BITS,
      **_metrics(enc["labels"], enc["logits"], plain, labels),
      "online_bytes_per_image": per_batch["online_bytes"] / size,
      "offline_bytes_per_image": per_batch["offline_bytes"] / size,
      "rounds": per_batch["rounds"],
      "online_bytes_by_step_per_image": {k: v / size for k, v in
                                         per_batch["online_bytes_by_step"].items()},
      "setup": enc["setup"], "batch_size": size, "batches": enc["batches"],
      "offline_seconds_per_image": enc["offline_seconds"] / n,
      "online_seconds_per_image": enc["online_seconds"] / n,
      "seconds_per_image": (enc["offline_seconds"] + enc["online_seconds"]) / n,
      "compile_seconds": enc["compile_seconds"],
      "wall_seconds": time.perf_counter() - start,
      "backend": jax.default_backend(), "versions": io.versions(),
  }
  io.write_json_atomic(os.path.join(workdir, RECORD), record)
  return record


def summary_line(record: dict) -> str:
  """The one line printed last."""
  fmt = lambda v, spec=".3f": "n/a" if v is None or v != v else format(v, spec)  # NaN too
  acc = ""
  if "accuracy_encrypted" in record:
    acc = (f"  accuracy {fmt(record['accuracy_encrypted'])} (plaintext "
           f"{fmt(record['accuracy_plaintext'])})  AUROC {fmt(record['auroc_encrypted'])} "
           f"(plaintext {fmt(record['auroc_plaintext'])})")
  err = record.get("max_logit_error")
  margins = record.get("disagreement_margins")
  flips = (f" ({record['disagreements']} flipped, plaintext top-2 gap <= "
           f"{margins[0]:.1e})" if margins else "")
  return (f"encrypted inference: {record['num_images']} images  agreement "
          f"{record['agreement_percent']:.2f}%{flips}{acc}  max logit error {fmt(err, '.1e')}  "
          f"{record['online_bytes_per_image'] / 1e6:.2f} MB online + "
          f"{record['offline_bytes_per_image'] / 1e6:.2f} MB offline per image, "
          f"{record['rounds']} rounds  {record['seconds_per_image'] * 1e3:.1f} ms per image  "
          f"record in {os.path.join(record['workdir'], RECORD)}")


def _plaintext_logits(model_name: str, params, images: jax.Array, num_classes: int) -> jax.Array:
  """The trained Flax model in float32 on normalised images `[B, H, W, C]` (the reference)."""
  return models.make_model(model_name, num_classes=num_classes).apply(params, images)
