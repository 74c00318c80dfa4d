"""What the round-throughput benchmark measures: workload W1, its configs and its rows.

Workload W1 (shared/DESIGN.md, "Performance"): 100 hospitals x 64 random uint8 images
28x28x1, 3 classes, the small CNN, one local epoch at batch 16, client SGD, FedAvg. Every
engine and loop row runs a `round.Setup` built from experiments/default.py changed to W1
(`make_config`), so what is timed is what a run of that config executes.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools

import numpy as np

from experiments import default as default_experiment
from fedsim import config as config_lib
from fedsim import round as round_lib
from fedsim import strategy
from fedsim.data.base import ClientArrays, FederatedData


@dataclasses.dataclass(frozen=True)
class Settings:
  """The resolved flags of one run (after `--quick`): workload, privacy and timing.

  Attributes mirror the flags of benchmarks/round_throughput.py (`hospitals` is
  `--hospitals`, `examples` `--examples_per_client`, `convs` `--conv`, `patterns`
  `--rows`, ...), so every module below the entry point works without absl flags.
  """

  hospitals: int
  examples: int
  image_size: int
  classes: int
  batch_size: int
  epochs: int
  lr: float
  chunks: tuple[int, ...]
  convs: tuple[str, ...]
  unroll: int
  reps: int
  warmup: int
  stat: str
  central_batches: tuple[int, ...]
  dp_clipping: tuple[str, ...]
  noise_multiplier: float
  clip_norm: float
  dp_max_batch_size: int
  dp_microbatch_size: int
  memory_sizes: tuple[int, ...]
  memory_chunk: int
  patterns: tuple[str, ...]
  quick: bool
  seed: int

  @property
  def examples_per_round(self) -> int:
    return self.hospitals * self.examples


@functools.lru_cache(maxsize=None)
def federation(hospitals: int, examples: int, image_size: int, classes: int,
               seed: int) -> FederatedData:
  """W1's federation: random uint8 images `[hospitals, examples, H, W, 1]`, random labels.

  Every hospital is full (no padding) and every image its own patient, so the rows
  measure compute, not padding. Cached: rows of one run share one federation.
  """
  rng = np.random.default_rng(seed)
  shape = (hospitals, examples, image_size, image_size, 1)
  arrays = ClientArrays(
      images=rng.integers(0, 256, shape, dtype=np.uint8),
      labels=rng.integers(0, classes, (hospitals, examples)).astype(np.int32),
      patients=np.tile(np.arange(examples, dtype=np.int32), (hospitals, 1)),
      counts=np.full(hospitals, examples, np.int32),
      num_patients=np.full(hospitals, examples, np.int32))
  names = tuple(f"class{i}" for i in range(classes))
  return FederatedData(train=arrays, val=arrays, test=arrays, unseen=None,
                       class_names=names, name="w1_random", mean=0.5, std=0.25)


def make_config(s: Settings, *, hospitals: int, chunk: int = 0, block: int = 0,
                conv: str = "auto", dp: str = "none", clipping: str = "vmap"):
  """experiments/default.py changed to W1 and one engine / privacy choice (validated).

  `chunk`, `block` 0 and `conv` "auto" leave the choice to `strategy.resolve`;
  `dp="client"` makes cohorts Poisson with rate 1 (DP-FedAvg is accounted for
  Poisson cohorts), so every hospital still trains every round.
  """
  c = default_experiment.get_config()
  c.seed = s.seed
  c.num_clients = c.clients_per_round = hospitals
  c.client_sampling_rate = 1.0 if dp == "client" else 0.0
  c.model = "cnn"
  c.data.image_size, c.data.num_unseen = s.image_size, 0
  c.client.local_epochs, c.client.batch_size = s.epochs, s.batch_size
  c.client.local_steps = 0  # W1: epochs, not the default config's fixed DP steps
  c.client.optimizer, c.client.learning_rate = "sgd", s.lr
  c.server.optimizer, c.server.learning_rate = "fedavg", 1.0
  c.dp.level, c.dp.clipping = dp, clipping
  c.dp.noise_multiplier, c.dp.clip_norm = s.noise_multiplier, s.clip_norm
  c.dp.max_batch_size, c.dp.microbatch_size = s.dp_max_batch_size, s.dp_microbatch_size
  c.engine.client_chunk, c.engine.client_block = chunk, block
  c.engine.conv, c.engine.unroll = conv, s.unroll
  config_lib.validate(c)
  return c


def build_setup(s: Settings, *, hospitals: int, **config_kwargs) -> round_lib.Setup:
  """The engine exactly as a run of `make_config(s, hospitals=..., **config_kwargs)` builds it."""
  config = make_config(s, hospitals=hospitals, **config_kwargs)
  return round_lib.Setup(config, federation(hospitals, s.examples, s.image_size, s.classes,
                                            s.seed))


def default_strategy(s: Settings) -> strategy.Strategy:
  """The strategy a run of W1 gets without engine overrides (but `--unroll`).

  Read from the `round.Setup` itself, so it is the engine's choice by construction.
  """
  return build_setup(s, hospitals=s.hospitals).strategy


@dataclasses.dataclass(frozen=True)
class Row:
  """One measurement. `chunk`/`block` 0 and `conv` "auto": the default strategy.

  Attributes:
    name: the row's name in the table and the JSON (`engine/xla/c1/b1`, ...).
    kind: "engine" | "loop" | "central" | "memory".
    conv, chunk, block: the engine strategy (engine rows), or the conv of a loop
      or central row.
    dp, clipping: `dp.level` and `dp.clipping` of the row's config.
    hospitals: the federation size of a memory row.
    batch: the batch size of a central row.
  """

  name: str
  kind: str
  conv: str = "auto"
  chunk: int = 0
  block: int = 0
  dp: str = "none"
  clipping: str = "vmap"
  hospitals: int = 0
  batch: int = 0


def engine_row(conv: str, chunk: int, block: int) -> Row:
  return Row(f"engine/{conv}/c{chunk}/b{block}", "engine", conv, chunk, block)


def plan_rows(s: Settings, default: strategy.Strategy) -> list[Row]:
  """Every row `s.patterns` selects, in table order; the default engine row first, always.

  Every ratio of the report refers to the default engine row, so it runs even when
  no pattern names it.
  """
  k = s.hospitals
  rows = [engine_row(default.conv, default.chunk, default.block)]
  for conv in s.convs:
    for chunk in sorted({min(c, k) for c in s.chunks}):
      rows += [engine_row(conv, chunk, b) for b in sorted({chunk, k})]
  rows += [Row(f"loop/{conv}", "loop", conv, 1, 1) for conv in s.convs]
  rows += [Row(f"central/{conv}/b{b}", "central", conv, batch=b)
           for b in s.central_batches for conv in s.convs]
  for clip in s.dp_clipping:
    rows += [Row(f"dp_example_{clip}/{kind}", kind, dp="example", clipping=clip)
             for kind in ("engine", "loop")]
  rows += [Row(f"dp_client/{kind}", kind, dp="client") for kind in ("engine", "loop")]
  rows += [Row(f"memory/{h}", "memory", hospitals=h) for h in s.memory_sizes]
  unique = list(dict.fromkeys(rows))
  chosen = [r for r in unique[1:] if any(fnmatch.fnmatch(r.name, p) for p in s.patterns)]
  return [unique[0]] + [r for r in chosen if r.name != unique[0].name]
