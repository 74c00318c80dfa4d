"""Encrypted inference cost: time and bytes per image of the two-party protocol.

  python -m benchmarks.encrypted_inference            # the default rows (below)
  python -m benchmarks.encrypted_inference --rows=cnn_tanh:28:256:64,cnn_tanh:28:256:8
  python -m benchmarks.encrypted_inference --linear=limbs   # the GPU's linear layers, on any device

Each row is MODEL:PX:IMAGES[:BATCH] (BATCH defaults to min(IMAGES, 64)): the protocol
(privacy/encrypted_inference) runs MODEL (fedsim/models.py; its initial weights: the
cost does not depend on the values) on IMAGES random PX x PX x 1 images, BATCH images
per protocol call, after one compilation (reported apart). Per image: offline (dealer)
and online seconds, online bytes (both parties) and offline bytes (what the dealer
sends party 1), and the rounds of one call. Default rows: the small CNNs at 28 px
(256 images, batch 64) and 64 px (64, batch 16), ResNet-18 at 224 px (1 image; compiled in
pieces, 25 s on a 2-core CPU: it was 24 minutes as one program). "compile" includes tracing
the protocol (network.compile_protocol). --linear: how linear layers are computed
(network.use_limbs). Writes benchmarks/results/encrypted_inference_<backend>.json (--out
to override), with the device, the load average and versions.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from fedsim import io, models
from privacy.encrypted_inference import network, service

DEFAULT_ROWS = "cnn:28:256:64,cnn_tanh:28:256:64,cnn:64:64:16,cnn_tanh:64:64:16,resnet18:224:1"


def _parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="\n".join(__doc__.splitlines()[2:]))
  p.add_argument("--rows", default=DEFAULT_ROWS,
                 help="comma-separated MODEL:PX:IMAGES[:BATCH] (default: %(default)s)")
  p.add_argument("--out", default="", help="JSON path (default: benchmarks/results/"
                 "encrypted_inference_<backend>.json)")
  p.add_argument("--linear", default="auto", choices=network.LINEAR,
                 help="linear layers: auto | limbs | uint64 (default: %(default)s)")
  return p.parse_args(argv)


def parse_rows(text: str) -> list[tuple[str, int, int, int]]:
  """(model, px, images, batch) per row; one ValueError line for a bad row."""
  rows = []
  for row in text.split(","):
    parts = row.split(":")
    if len(parts) not in (3, 4) or not all(p.isdigit() for p in parts[1:]):
      raise ValueError(f"--rows entry {row!r} must be MODEL:PX:IMAGES[:BATCH]")
    network.check_model(parts[0])
    px, images = int(parts[1]), int(parts[2])
    rows.append((parts[0], px, images, int(parts[3]) if len(parts) == 4 else min(images, 64)))
  return rows


def measure(model_name: str, size: int, *, images: int, batch_size: int,
            linear: str = "auto") -> dict:
  """One row: seconds and bytes per image of `model_name` on `size` px images."""
  x = np.random.default_rng(0).normal(0, 1, (images, size, size, 1)).astype(np.float32)
  params = models.make_model(model_name, num_classes=3).init(jax.random.key(0), x[:1])
  enc = service.encrypted_predict(model_name, params, x, batch_size=batch_size,
                                  reveal="logits", linear=linear)
  counts, batch = enc["batch_counts"], enc["batch_size"]
  return {"model": model_name, "image_size": size, "images": images, "batch_size": batch,
          "linear": linear,
          "offline_seconds_per_image": enc["offline_seconds"] / images,
          "online_seconds_per_image": enc["online_seconds"] / images,
          "seconds_per_image": (enc["offline_seconds"] + enc["online_seconds"]) / images,
          "compile_seconds": enc["compile_seconds"],
          "online_mb_per_image": counts["online_bytes"] / batch / 1e6,
          "offline_mb_per_image": counts["offline_bytes"] / batch / 1e6,
          "rounds": counts["rounds"], "setup_mb": enc["setup"]["online_bytes"] / 1e6}


def main(argv=None) -> dict:
  args = _parse(argv)
  out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                 f"encrypted_inference_{jax.default_backend()}.json")
  record = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "cpu_count": os.cpu_count(), "versions": io.versions(), "complete": False,
            "rows": []}
  todo = parse_rows(args.rows)
  for i, (model_name, size, images, batch) in enumerate(todo):
    row = measure(model_name, size, images=images, batch_size=batch, linear=args.linear)
    row["load_average"] = os.getloadavg()[0]
    record["rows"].append(row)
    record["complete"] = i + 1 == len(todo)
    io.write_json_atomic(out, record)  # after every row: a run stopped early keeps its rows
    print(f"{model_name:9s} {size:4d} px  batch {row['batch_size']:3d}  "
          f"{row['seconds_per_image'] * 1e3:9.1f} ms/image "
          f"(offline {row['offline_seconds_per_image'] * 1e3:.1f}, online "
          f"{row['online_seconds_per_image'] * 1e3:.1f})  online "
          f"{row['online_mb_per_image']:.1f} MB  offline {row['offline_mb_per_image']:.1f} MB  "
          f"{row['rounds']} rounds  compile {row['compile_seconds']:.1f} s  "
          f"load {row['load_average']:.1f}", flush=True)
  print(f"record in {out}")
  return record


if __name__ == "__main__":
  main()
