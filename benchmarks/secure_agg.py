"""What secure aggregation costs: round time and bytes sent, on vs off, on workload W1.

  python -m benchmarks.secure_agg                       # 100 hospitals, complete graph
  python -m benchmarks.secure_agg --hospitals=100,1000 --neighbours=0,16

Each row builds the engine exactly as a run of the config would (`round.Setup` from
experiments/default.py changed to W1: random 28x28 images, the small CNN, one local epoch at
batch 16, no DP; all hospitals train every round) once with `secure_agg.enabled` and once
without, and times `round.round_step` (min over `--reps` rounds after one warm-up round).
Bytes per hospital are those of the emulated protocol's messages relative to the float32
plaintext update: its masked input (bits x padded length / 8), its public key (8 bytes), the
Shamir shares of its two secrets to its K neighbours (8 limbs x 4 bytes each) and, at most,
one share per neighbour revealed to the server at unmasking (4 limbs x 4 bytes).
Writes JSON to `--out` and prints one line per row.
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
from absl import app, flags

from benchmarks import workload
from experiments import default as default_experiment
from fedsim import config as config_lib
from fedsim import round as round_lib
from privacy.secure_agg import graph

flags.DEFINE_list("hospitals", ["100"], "cohort sizes (every hospital trains every round)")
flags.DEFINE_list("neighbours", ["0"], "secure_agg.neighbours per row (0: complete graph)")
flags.DEFINE_integer("bits", 20, "secure_agg.bits")
flags.DEFINE_integer("examples", 64, "images per hospital")
flags.DEFINE_integer("reps", 2, "timed rounds per row")
flags.DEFINE_string("out", "benchmarks/results/secure_agg_cpu.json", "JSON output")
FLAGS = flags.FLAGS


def make_config(hospitals: int, secure: bool, neighbours: int, bits: int):
  c = default_experiment.get_config()
  c.num_clients = c.clients_per_round = hospitals
  c.model, c.data.image_size, c.data.num_unseen = "cnn", 28, 0
  c.client.local_epochs, c.client.local_steps, c.client.batch_size = 1, 0, 16
  c.client.optimizer, c.client.learning_rate = "sgd", 0.1
  c.server.optimizer, c.server.learning_rate = "fedavg", 1.0
  c.dp.level = "none"
  c.secure_agg.update(enabled=secure, bits=bits, clip_norm=10.0, neighbours=neighbours)
  config_lib.validate(c)
  return c


def time_round(setup: round_lib.Setup, reps: int) -> tuple[float, float, float]:
  """(first round's seconds, compilation included; min over `reps` later rounds of wall
  seconds, and of this process's CPU seconds: the figure to read on a shared machine)."""
  state = round_lib.init_state(setup)
  times, cpu = [], []
  for r in range(1, reps + 2):
    start, start_cpu = time.perf_counter(), time.process_time()
    state, _ = round_lib.round_step(setup, state, r)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return times[0], min(times[1:]), min(cpu[1:])


def bytes_ratio(setup: round_lib.Setup, hospitals: int, neighbours: int) -> float:
  spec = setup.secure_agg.spec
  k = graph.width(hospitals, neighbours)
  sent = spec.bits * spec.padded / 8 + 8 + 32 * k + 16 * k
  return sent / (4 * spec.size)


def main(argv):
  del argv
  rows = []
  for hospitals in map(int, FLAGS.hospitals):
    fed = workload.federation(hospitals, FLAGS.examples, 28, 3, 0)
    plain = round_lib.Setup(make_config(hospitals, False, 0, FLAGS.bits), fed)
    plain_first, plain_s, plain_cpu = time_round(plain, FLAGS.reps)
    for neighbours in map(int, FLAGS.neighbours):
      setup = round_lib.Setup(make_config(hospitals, True, neighbours, FLAGS.bits), fed)
      first, seconds, cpu = time_round(setup, FLAGS.reps)
      row = dict(hospitals=hospitals, neighbours=neighbours, bits=FLAGS.bits,
                 params=setup.secure_agg.spec.size, plain_round_s=plain_s,
                 secure_round_s=seconds, ratio=seconds / plain_s,
                 plain_first_round_s=plain_first, secure_first_round_s=first,
                 plain_round_cpu_s=plain_cpu, secure_round_cpu_s=cpu, cpu_ratio=cpu / plain_cpu,
                 bytes_ratio=bytes_ratio(setup, hospitals, neighbours))
      rows.append(row)
      print(f"{hospitals} hospitals, neighbours {neighbours or 'all'}: round "
            f"{seconds:.3f} s vs {plain_s:.3f} s plain ({row['ratio']:.2f}x; process CPU time "
            f"{row['cpu_ratio']:.2f}x); bytes per "
            f"hospital {row['bytes_ratio']:.2f}x the float32 update", flush=True)
      write(rows)


def write(rows: list) -> None:
  """The rows so far (rewritten after each: a run cut short keeps what it measured)."""
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump({"backend": jax.default_backend(), "device": str(jax.devices()[0]),
               "jax": jax.__version__, "machine": platform.processor() or platform.machine(),
               "rows": rows}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
