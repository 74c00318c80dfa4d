"""Encrypted inference cost: time and bytes per image of the two-party protocol.

  python -m benchmarks.encrypted_inference                # cnn, cnn_tanh at 28 and 64 px
  python -m benchmarks.encrypted_inference --models=cnn --sizes=28 --images=256

For each model and image size: the protocol (privacy/encrypted_inference) on random
images with the model's initial weights (cost does not depend on the values), in
batches of --batch_size after one compilation; offline (dealer) and online seconds per
image, bytes per image (online: both parties; offline: what the dealer sends party 1),
rounds. Writes benchmarks/results/encrypted_inference_<backend>.json. ResNet-18 is not
run: its GroupNorm has no secure counterpart in this package (see network.py).
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from fedsim import io, models
from privacy.encrypted_inference import network, service


def _parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="cnn,cnn_tanh")
  p.add_argument("--sizes", default="28,64")
  p.add_argument("--images", type=int, default=16, help="images per (model, size)")
  p.add_argument("--batch_size", type=int, default=4,
                 help="memory: cnn_tanh at 64 px needs ~1 GB of dealer material per image")
  p.add_argument("--out", default="")
  return p.parse_args(argv)


def measure(model_name: str, size: int, *, images: int, batch_size: int) -> dict:
  """One row: seconds and bytes per image of `model_name` on `size` px images."""
  network.check_model(model_name)
  x = np.random.default_rng(0).normal(0, 1, (images, size, size, 1)).astype(np.float32)
  params = models.make_model(model_name, num_classes=3).init(jax.random.key(0), x[:1])
  enc = service.encrypted_predict(model_name, params, x, batch_size=batch_size,
                                  reveal="logits")
  counts, batch = enc["batch_counts"], enc["batch_size"]
  return {"model": model_name, "image_size": size, "images": images, "batch_size": batch,
          "offline_seconds_per_image": enc["offline_seconds"] / images,
          "online_seconds_per_image": enc["online_seconds"] / images,
          "seconds_per_image": (enc["offline_seconds"] + enc["online_seconds"]) / images,
          "compile_seconds": enc["compile_seconds"],
          "online_mb_per_image": counts["online_bytes"] / batch / 1e6,
          "offline_mb_per_image": counts["offline_bytes"] / batch / 1e6,
          "rounds": counts["rounds"], "setup_mb": enc["setup"]["online_bytes"] / 1e6}


def main(argv=None) -> dict:
  args = _parse(argv)
  rows = []
  for model_name in args.models.split(","):
    for size in (int(s) for s in args.sizes.split(",")):
      row = measure(model_name, size, images=args.images, batch_size=args.batch_size)
      rows.append(row)
      print(f"{model_name:9s} {size:4d} px  {row['seconds_per_image'] * 1e3:8.1f} ms/image "
            f"(offline {row['offline_seconds_per_image'] * 1e3:.1f}, online "
            f"{row['online_seconds_per_image'] * 1e3:.1f})  online "
            f"{row['online_mb_per_image']:.1f} MB  offline {row['offline_mb_per_image']:.1f} MB  "
            f"{row['rounds']} rounds  "
            f"compile {row['compile_seconds']:.1f} s", flush=True)
  record = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "versions": io.versions(), "rows": rows,
            "not_run": "resnet18: GroupNorm (secure inverse square root) not implemented"}
  out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                 f"encrypted_inference_{jax.default_backend()}.json")
  io.write_json_atomic(out, record)
  print(f"record in {out}")
  return record


if __name__ == "__main__":
  main()
