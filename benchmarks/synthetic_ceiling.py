"""Centralised, non-private ceiling of the synthetic task: how far the small CNN gets.

Builds the federation of `experiments/default.py` (the same generator, partition,
acquisition shift and patient-disjoint splits a run gets), pools the seen hospitals'
training images and trains the model centrally with plain SGD or momentum on
uniformly shuffled batches. Every `--eval_every` steps it evaluates the default's
test split (every seen hospital's test patients, pooled) and its unseen hospitals:
accuracy, balanced accuracy and macro AUROC. This is what no federated or private
run on the same data can be expected to beat with the same model and step budget.

  python -m benchmarks.synthetic_ceiling                       # 300 steps, SGD, cnn_tanh
  python -m benchmarks.synthetic_ceiling --optimizer=momentum --learning_rate=0.02
  python -m benchmarks.synthetic_ceiling --model=cnn --steps=500 --num_clients=100

Prints one JSON object on stdout (also written to `--out` when set): the arguments,
the data sizes, the majority-class accuracy, the curve (one row per evaluation) and
the wall seconds (generation, training).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import default
from fedsim import data as data_lib
from fedsim import io, metrics, models
from fedsim.client import normalize


def _parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--eval_every", type=int, default=25)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--optimizer", choices=("sgd", "momentum"), default="sgd")
  p.add_argument("--learning_rate", type=float, default=0.1)
  p.add_argument("--momentum", type=float, default=0.9)
  p.add_argument("--model", choices=("cnn", "cnn_tanh"), default="cnn_tanh")
  p.add_argument("--image_size", type=int, default=28)
  p.add_argument("--num_clients", type=int, default=0, help="0: the default config's")
  p.add_argument("--examples_per_client", type=int, default=0, help="0: the default's")
  p.add_argument("--shift", type=float, default=-1.0, help="< 0: the default's data.shift")
  p.add_argument("--seed", type=int, default=0, help="data and federation seed")
  p.add_argument("--init_seed", type=int, default=0, help="model init and batch order")
  p.add_argument("--out", default="", help="also write the JSON here")
  return p.parse_args(argv)


def _config(args: argparse.Namespace):
  c = default.get_config()
  c.seed = args.seed
  c.data.image_size = args.image_size
  if args.num_clients:
    c.num_clients = c.clients_per_round = args.num_clients
  if args.examples_per_client:
    c.data.examples_per_client = args.examples_per_client
  if args.shift >= 0:
    c.data.shift = args.shift
  return c


def _pooled(split) -> tuple[np.ndarray, np.ndarray]:
  """Real (unpadded) images `[N, H, W, C]` uint8 and labels `[N]` of every hospital."""
  mask = split.mask
  return split.images[mask], split.labels[mask]


def _scores(probs: np.ndarray, labels: np.ndarray) -> dict:
  cm = metrics.confusion_matrix(labels, probs.argmax(-1), probs.shape[-1])
  sensitivity, _ = metrics.sensitivity_specificity(cm)
  return dict(accuracy=float(np.trace(cm) / cm.sum()),
              balanced_accuracy=float(metrics.balanced_accuracy(cm)),
              auroc=float(metrics.macro_auroc(probs, labels)),
              sensitivity=[round(float(v), 4) for v in sensitivity])


def run(args: argparse.Namespace) -> dict:
  """Generates the data, trains, evaluates; returns the result dict."""
  start = time.perf_counter()
  config = _config(args)
  fed = data_lib.make_federated_data(config)
  gen_s = time.perf_counter() - start
  train_x, train_y = _pooled(fed.train)
  evals = {"test": _pooled(fed.test)}
  if fed.unseen is not None:
    evals["unseen"] = _pooled(fed.unseen)

  model = models.make_model(args.model, num_classes=len(fed.class_names))
  params = model.init(jax.random.PRNGKey(args.init_seed),
                      jnp.zeros((1,) + fed.image_shape, jnp.float32))
  opt = (optax.sgd(args.learning_rate) if args.optimizer == "sgd"
         else optax.sgd(args.learning_rate, momentum=args.momentum))
  opt_state = opt.init(params)
  mean, std = fed.mean, fed.std

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply(p, normalize(x, mean, std))
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def predict(params, x):
    return jax.nn.softmax(model.apply(params, normalize(x, mean, std)), -1)

  def evaluate(params) -> dict:
    out = {}
    for name, (x, y) in evals.items():
      probs = np.concatenate([np.asarray(predict(params, x[i:i + 1024]))
                              for i in range(0, len(x), 1024)])
      out.update({f"{name}_{k}": v for k, v in _scores(probs, y).items()})
    return out

  rng = np.random.default_rng(args.init_seed)
  order = np.zeros(0, np.int64)
  curve = [dict(step=0, loss=None, **evaluate(params))]
  losses = []
  train_start = time.perf_counter()
  for s in range(1, args.steps + 1):
    if len(order) < args.batch_size:  # epochs of shuffled examples, no repeats within one
      order = np.concatenate([order, rng.permutation(len(train_y))])
    idx, order = order[:args.batch_size], order[args.batch_size:]
    params, opt_state, loss = step(params, opt_state, train_x[idx], train_y[idx])
    losses.append(loss)
    if s % args.eval_every == 0 or s == args.steps:
      mean_loss = float(np.mean([float(v) for v in losses]))
      losses = []
      curve.append(dict(step=s, loss=round(mean_loss, 4), **evaluate(params)))
  train_s = time.perf_counter() - train_start
  test_y = evals["test"][1]
  return dict(
      args=vars(args), device=str(jax.devices()[0].device_kind),
      num_train=int(len(train_y)), num_test=int(len(test_y)),
      num_unseen=int(len(evals["unseen"][1])) if "unseen" in evals else 0,
      train_prevalence=(np.bincount(train_y, minlength=3) / len(train_y)).round(3).tolist(),
      majority_test_accuracy=float(np.bincount(test_y).max() / len(test_y)),
      final=curve[-1], best_test_balanced_accuracy=max(
          r["test_balanced_accuracy"] for r in curve),
      curve=curve, generate_s=round(gen_s, 2), train_s=round(train_s, 2))


def main(argv=None) -> None:
  args = _parse(argv)
  result = run(args)
  if args.out:
    io.write_json_atomic(args.out, result)
  print(io.dumps(result))


if __name__ == "__main__":
  main()
