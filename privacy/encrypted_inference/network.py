"""A trained model as a list of layers, run on shares or in the clear.

Supported: the small CNNs of fedsim/models.py ("cnn", "cnn_tanh", "cnn_gap"):
3x3 SAME convolutions with bias, 2x2 average pooling, dense layers, ReLU or tanh,
global average pooling. ResNet-18 is refused: its GroupNorm needs a secure
inverse square root (and its stem a max pool) that this package does not have.

`compile_protocol` turns a protocol function into an offline part (the dealer's
material) and an online part (the parties' work), both jitted, with the messages
of one call counted while tracing.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from privacy.encrypted_inference import channels, protocol, ring
from privacy.encrypted_inference import dealer as dealer_lib
from privacy.validation import check

PLANS = {
    "cnn": ("conv1", "relu", "pool", "conv2", "relu", "pool", "flatten", "dense1", "relu",
            "head"),
    "cnn_tanh": ("conv1", "tanh", "pool", "conv2", "tanh", "pool", "flatten", "dense1",
                 "tanh", "head"),
    "cnn_gap": ("conv1", "relu", "pool", "conv2", "relu", "pool", "conv3", "relu", "mean",
                "head"),
}
SUPPORTED = tuple(PLANS)


def check_model(name: str) -> None:
  """Refuses a model this package cannot run securely (one ValueError line)."""
  check(name in PLANS, "model", name,
        f"one of {list(SUPPORTED)} for encrypted inference (resnet18 needs GroupNorm's "
        "inverse square root and a max pool, not implemented)")


def _conv(x: jax.Array, w: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  return x @ w


def _op(kernel) -> Callable:
  return _conv if kernel.ndim == 4 else _matmul


def linear_layers(params) -> dict:
  """{layer: {"kernel", "bias"}} of the model's conv and dense layers (float)."""
  return dict(params["params"])


def setup(ch: channels.Channel, params, key: jax.Array) -> tuple[dict, dict]:
  """Shares the model (the owner sends party 0 its share of every W and b), the
  dealer's masks B (offline), and opens F = W - B once. Returns (model, masks)."""
  layers = linear_layers(params)
  masks = dealer_lib.make_masks(jax.random.fold_in(key, 0),
                                {name: layer["kernel"].shape for name, layer in layers.items()})
  model = {}
  for i, (name, layer) in enumerate(sorted(layers.items())):
    kw, kb, kbm = jax.random.split(jax.random.fold_in(key, i + 1), 3)
    w = ring.share(kw, ring.encode(layer["kernel"]))
    b = ring.share(kb, ring.encode(layer["bias"]))
    ch.send(channels.ring_bytes(w[0].size + b[0].size), "share_model")
    ch.deal(channels.ring_bytes(w[0].size))
    f = protocol.open_shares(ch, w - ring.share(kbm, masks[name]), "open_masked_weights")
    model[name] = {"w": w, "b": b, "f": f}
  return model, masks


def secure_forward(ch, dealer, plan: tuple, model: dict, x: jax.Array) -> jax.Array:
  """Shares of the logits `[2, B, classes]` from shares of normalised images `[2, B, H, W, C]`."""
  for step in plan:
    if step in model:
      m = model[step]
      x = protocol.linear(ch, dealer, x, m["w"], m["f"], m["b"], _op(m["w"][0]), step)
    elif step == "relu":
      x = protocol.relu(ch, dealer, x)
    elif step == "tanh":
      x = protocol.tanh(ch, dealer, x)
    elif step == "pool":
      x = protocol.avg_pool(x)
    elif step == "mean":
      x = protocol.global_mean(x)
    elif step == "flatten":
      x = x.reshape(2, x.shape[1], -1)
    else:
      raise ValueError(f"layer {step!r} has no parameters in the checkpoint")
  return x


def compile_protocol(fn: Callable, masks: dict, *example_args,
                     jit: bool = True) -> tuple[Callable, Callable, dict]:
  """Splits `fn(ch, dealer, *args)` into offline and online parts (jitted if `jit`;
  op by op is quicker for a single small call, as in the tests).

  Returns `(offline(key) -> material, online(material, *args) -> out, counts)`,
  `counts` being the channel totals of one call (Channel.totals). Must be called,
  and its functions run, inside `ring.x64()`.
  """
  ch = channels.Channel()
  recorder = dealer_lib.Recorder(ch)
  jax.eval_shape(functools.partial(fn, ch, recorder), *example_args)
  requests = recorder.requests

  def offline(key):
    return dealer_lib.generate(requests, masks, key)

  def online(material, *args):
    return fn(channels.Channel(), dealer_lib.Replay(material), *args)

  if jit:
    offline, online = jax.jit(offline), jax.jit(online)
  return offline, online, ch.totals()


def inference_fn(plan: tuple, reveal: str) -> Callable:
  """The protocol of one batch: forward, secure argmax, outputs revealed to party 0.

  Returns `fn(ch, dealer, model, x) -> (one_hot [B, C], logits [B, C] ring or None)`;
  `reveal="label"` reveals the one-hot argmax only, `"logits"` the logits too.
  """

  def fn(ch, dealer, model, x):
    logits = secure_forward(ch, dealer, plan, model, x)
    one_hot = protocol.argmax(ch, dealer, logits)
    if reveal == "label":
      return protocol.reveal_to_hospital(ch, one_hot, "reveal"), None
    both = protocol.reveal_to_hospital(ch, jnp.concatenate([one_hot, logits], -1), "reveal")
    return both[:, :logits.shape[-1]], both[:, logits.shape[-1]:]

  return fn

