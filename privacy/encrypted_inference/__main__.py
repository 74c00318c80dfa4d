"""python -m privacy.encrypted_inference --workdir=runs/x [--images=PATH|--split=test] [--limit=N]

Runs a trained run's model under the two-party protocol on its test split (or the
images of a .npz file) and prints agreement with plaintext, accuracy and AUROC both
ways, the largest logit error, bytes and rounds per image (online and offline), and
time per image; the last line is the summary; the record goes to the workdir.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from privacy.encrypted_inference import service

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run's folder (launch.py --workdir).")
_SPLIT = flags.DEFINE_string("split", "test", "The run's split: test | val | unseen.")
_IMAGES = flags.DEFINE_string("images", "", ".npz with 'images' uint8 [N, H, W, C] "
                              "(and optionally 'labels'); overrides --split.")
_LIMIT = flags.DEFINE_integer("limit", 0, "At most this many images (0: all).")
_BATCH = flags.DEFINE_integer("batch_size", service.BATCH_SIZE, "Images per protocol call "
                              "(memory: cnn_tanh at 28 px peaked at 4.7 GB with 64).")
_REVEAL = flags.DEFINE_string("reveal", "logits", "What party 0 learns: logits (and the "
                              "label) | label (only the argmax; no encrypted AUROC).")
_JIT = flags.DEFINE_bool("jit", True, "Compile the protocol (--nojit: op by op, no "
                         "compilation; quicker for a few images).")
_SEED = flags.DEFINE_integer("seed", 0, "Key of the shares and the dealer's randomness.")
_LINEAR = flags.DEFINE_string("linear", "auto", "Linear layers: auto (float64 limbs for dense "
                              "layers, and for convolutions off the CPU) | limbs (all; what "
                              "a GPU runs) | uint64 (native; CPU only).")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
  try:
    record = service.run_service(_WORKDIR.value, split=_SPLIT.value, images=_IMAGES.value,
                                 limit=_LIMIT.value, batch_size=_BATCH.value,
                                 reveal=_REVEAL.value, seed=_SEED.value, jit=_JIT.value,
                                 linear=_LINEAR.value, progress=True)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  steps = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in
                    record["online_bytes_by_step_per_image"].items())
  print(f"model {record['model']}  images {record['num_images']} {record['image_shape']}  "
        f"ring Z_2^{record['ring_bits']}, {record['frac_bits']} fraction bits")
  print(f"online per image: {steps}; setup (once): "
        f"{record['setup']['online_bytes'] / 1e6:.2f} MB, {record['setup']['rounds']} rounds")
  print(f"time per image: offline {record['offline_seconds_per_image'] * 1e3:.1f} ms, "
        f"online {record['online_seconds_per_image'] * 1e3:.1f} ms "
        f"(compile {record['compile_seconds']:.1f} s, batch {record['batch_size']})")
  print(service.summary_line(record))
  return 0


if __name__ == "__main__":
  app.run(main)
