"""A trained model as a list of layers, run on shares or in the clear.

Supported: the models of fedsim/models.py: the small CNNs ("cnn", "cnn_tanh",
"cnn_gap": 3x3 SAME convolutions with bias, 2x2 average pooling, dense layers, ReLU
or tanh, global average pooling) and "resnet18" (strided convolutions without bias,
GroupNorm with a secure inverse square root, max pool, residual sums).

`compile_protocol` turns a protocol function into an offline part (the dealer's
material) and an online part (the parties' work), with the messages of one call counted
while tracing. The forwards mark their layers as pieces (`dealer.piece`): each is
compiled once per function and shapes and called from Python, so ResNet-18's repeated
blocks share programs and XLA never sees the whole protocol unrolled.
"""

from __future__ import annotations

import functools
import os
from concurrent import futures
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from privacy.encrypted_inference import channels, group_norm, protocol, ring
from privacy.encrypted_inference import dealer as dealer_lib
from privacy.validation import check

SEQUENTIAL = {
    "cnn": ("conv1", "relu", "pool", "conv2", "relu", "pool", "flatten", "dense1", "relu",
            "head"),
    "cnn_tanh": ("conv1", "tanh", "pool", "conv2", "tanh", "pool", "flatten", "dense1",
                 "tanh", "head"),
    "cnn_gap": ("conv1", "relu", "pool", "conv2", "relu", "pool", "conv3", "relu", "mean",
                "head"),
}
SUPPORTED = (*SEQUENTIAL, "resnet18")
RESNET_GROUPS = 8  # fedsim.models.ResNet18's GroupNorm groups


def check_model(name: str) -> None:
  """Refuses a model this package cannot run securely (one ValueError line)."""
  check(name in SUPPORTED, "model", name, f"one of {list(SUPPORTED)} for encrypted inference")


LINEAR = ("auto", "limbs", "uint64")


def check_linear(linear: str) -> None:
  """Refuses an unknown way to compute linear layers (one ValueError line)."""
  check(linear in LINEAR, "linear", linear, f"one of {list(LINEAR)}")


def use_limbs(linear: str, kind: str) -> bool:
  """Whether a "conv" or "dense" layer runs on float64 limbs (ring.bilinear) or natively
  on uint64. "auto": limbs for dense layers (faster than XLA:CPU's uint64 matmul) and, off
  the CPU, for convolutions too (XLA:GPU has no uint64 convolution); native uint64
  convolutions on the CPU (2.8-14x faster there than the 10 limb products)."""
  if linear == "auto":
    return kind == "dense" or jax.default_backend() != "cpu"
  return linear == "limbs"


@functools.lru_cache(maxsize=None)
def linear_op(kind: str, stride: int = 1, limbs: bool = False) -> Callable:
  """The ring-bilinear map of a layer: a SAME convolution with `stride` ("conv", NHWC x
  HWIO) or a matmul ("dense"), on uint64 or on float64 limbs. One function object per
  argument tuple (a static jit argument)."""
  if kind == "conv":
    op = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  else:
    op = lambda x, w: x @ w
  return functools.partial(ring.bilinear, op) if limbs else op


def layers(params) -> dict:
  """{"block/layer": {"kernel", "bias"?} or {"scale", "bias"}}: the model's linear layers
  (conv, dense) and norms, by their path in the params tree."""
  out = {}

  def walk(tree, path):
    if "kernel" in tree or "scale" in tree:
      out["/".join(path)] = dict(tree)
      return
    for name, sub in tree.items():
      walk(sub, (*path, name))

  walk(params["params"], ())
  return out


def setup(ch: channels.Channel, params, key: jax.Array) -> tuple[dict, dict]:
  """Shares the model (the owner sends party 0 its share of every parameter), the
  dealer's masks B (each party's share from its seed), and opens F = W - B once.
  Returns (model, masks)."""
  all_layers = layers(params)
  linear = {name: layer for name, layer in all_layers.items() if "kernel" in layer}
  masks = dealer_lib.make_masks(jax.random.fold_in(key, 0),
                                {name: layer["kernel"].shape for name, layer in linear.items()})
  for layer in all_layers.values():
    ch.send(channels.ring_bytes(sum(layer[k].size for k in ("kernel", "bias", "scale")
                                    if k in layer)), "share_model")
    if "kernel" in layer:  # B's shares are expanded from the seeds: nothing dealt
      ch.exchange(channels.ring_bytes(layer["kernel"].size), "open_masked_weights")
  return _share_model(key, all_layers, masks), masks


@jax.jit
def _share_model(key: jax.Array, all_layers: dict, masks: dict) -> dict:
  """Shares of every layer's parameters and, for a linear layer, F = W - B opened
  (one compilation for the whole model)."""
  arrays = [(name, k, layer[k]) for name, layer in sorted(all_layers.items())
            for k in ("kernel", "bias", "scale") if k in layer]
  sizes = [v.size for _, _, v in arrays] + [masks[name].size for name in sorted(masks)]
  rbg = jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")
  words = iter(jnp.split(ring.random_ring(rbg, (sum(sizes),)), np.cumsum(sizes)[:-1]))
  shared = {(name, k): _share(ring.encode(v), next(words)) for name, k, v in arrays}
  model = {}
  for name, layer in sorted(all_layers.items()):
    if "kernel" in layer:
      w = shared[(name, "kernel")]
      f = ring.reconstruct(w - _share(masks[name], next(words)))  # opened
      model[name] = {"w": w, "b": shared.get((name, "bias")), "f": f}
    else:
      model[name] = {"scale": shared[(name, "scale")], "b": shared[(name, "bias")]}
  return model


def _share(value: jax.Array, words: jax.Array) -> jax.Array:
  """Additive shares `[2, ...]` of `value`, masked by uniform `words` (value - r, r)."""
  r = words.reshape(value.shape)
  return jnp.stack([value - r, r])


@functools.lru_cache(maxsize=None)
def _linear_piece(op: Callable) -> Callable:
  """The piece of a linear layer `m` (setup's model entry) with bilinear map `op`: the
  layer's name (its mask) is given to the piece call, not baked into the program."""
  return lambda ch, dealer, m, x: protocol.linear(ch, dealer, x, m["w"], m["f"], m["b"], op,
                                                  "")


def _linear(ch, dealer, model, name, x, linear, stride=1):
  kind = "conv" if model[name]["w"].ndim == 5 else "dense"
  op = linear_op(kind, stride, use_limbs(linear, kind))
  return dealer.piece(ch, _linear_piece(op), model[name], x, layer=name)


# Pieces `fn(ch, dealer, *args)` of the layers without parameters (module-level: one
# function each, so same-shaped calls share a compiled program).
STEPS = {
    "relu": protocol.relu,
    "tanh": protocol.tanh,
    "pool": lambda ch, dealer, x: protocol.avg_pool(x),
    "mean": lambda ch, dealer, x: protocol.global_mean(x),
    "flatten": lambda ch, dealer, x: x.reshape(2, x.shape[1], -1),
    "max_pool": protocol.max_pool,
}


def sequential(steps: tuple, linear: str = "auto") -> Callable:
  """The secure forward of a chain of layers: `fn(ch, dealer, model, x) -> logits`, one
  piece per layer (compile_protocol)."""

  def forward(ch, dealer, model, x):
    for step in steps:
      if step in model:
        x = _linear(ch, dealer, model, step, x, linear)
      elif step in STEPS:
        x = dealer.piece(ch, STEPS[step], x)
      else:
        raise ValueError(f"layer {step!r} has no parameters in the checkpoint")
    return x

  return forward


def resnet18(ch, dealer, model, x, groups: int = RESNET_GROUPS, linear: str = "auto"):
  """fedsim.models.ResNet18 on shares: the stem (3x3, or 7x7 / 2 and a 3x3 / 2 max pool
  above 64 px), 4 stages of 2 basic blocks (conv, GroupNorm, ReLU; a 1x1 projection
  where the shape changes), global mean, head. One piece per layer and GroupNorm's three
  (compile_protocol): about 100 pieces share under 30 programs (one per kind and shape)."""
  norm = lambda name, v: group_norm.group_norm(ch, dealer, v, model[name]["scale"],
                                               model[name]["b"], groups)
  step = lambda name, *v: dealer.piece(ch, STEPS[name], *v)
  small = x.shape[2] <= 64
  lin = lambda name, v, stride=1: _linear(ch, dealer, model, name, v, linear, stride)
  x = step("relu", norm("stem_norm", lin("stem", x, 1 if small else 2)))
  if not small:
    x = step("max_pool", x)
  for stage in range(4):
    for block in range(2):
      name = f"stage{stage + 1}_block{block + 1}"
      stride = 2 if stage > 0 and block == 0 else 1
      y = lin(f"{name}/conv1", x, stride)
      y = step("relu", norm(f"{name}/norm1", y))
      y = norm(f"{name}/norm2", lin(f"{name}/conv2", y))
      if f"{name}/proj" in model:
        x = norm(f"{name}/proj_norm", lin(f"{name}/proj", x, stride))
      x = step("relu", x + y)  # the sum op by op: relu's program serves both
  return lin("head", step("mean", x))


def forward_fn(model_name: str, linear: str = "auto") -> Callable:
  """The secure forward of a supported model: `fn(ch, dealer, model, x) -> logits`;
  `linear` (LINEAR, use_limbs) says how its linear layers are computed."""
  check_model(model_name)
  check_linear(linear)
  if model_name == "resnet18":
    return functools.partial(resnet18, linear=linear)
  return sequential(SEQUENTIAL[model_name], linear)


class Phase(NamedTuple):
  """A protocol phase: `run` (called as the phase) calls the compiled `programs` from
  Python (jax.stages.Compiled; their HLO: `.as_text()`)."""
  run: Callable
  programs: list

  def __call__(self, *args):
    return self.run(*args)


def _run_piece(fn, material, *args):
  """A piece's program: `fn` on its own material (a fresh Channel: counted when recorded)."""
  return fn(channels.Channel(), dealer_lib.Replay(material), *args)


_run_piece_jit = jax.jit(_run_piece, static_argnums=0)
_party_words_jit = jax.jit(dealer_lib.party_words, static_argnums=(1, 3))
_INDEX = jax.ShapeDtypeStruct((), jnp.int32)


def _signature(tree) -> tuple:
  """What a program depends on in `tree`: its structure and the arrays' shapes and dtypes."""
  return jax.tree.structure(tree), tuple((v.shape, v.dtype) for v in jax.tree.leaves(tree))


class _Programs:
  """The distinct programs of a protocol: lowered as they are added (one per signature),
  then compiled together; `[i]` is the i-th compiled one."""

  def __init__(self):
    self.lowered, self.compiled = {}, []

  def add(self, signature, lower: Callable) -> int:
    if signature not in self.lowered:
      self.lowered[signature] = (len(self.lowered), lower())
    return self.lowered[signature][0]

  def compile(self) -> None:
    order = [lowered for _, lowered in sorted(self.lowered.values(), key=lambda v: v[0])]
    with futures.ThreadPoolExecutor(os.cpu_count()) as pool:  # XLA compiles without the GIL
      self.compiled = list(pool.map(lambda lowered: lowered.compile(), order))

  def __getitem__(self, i: int):
    return self.compiled[i]


def _offline(requests: list, masks: dict, pieces: list, programs: _Programs) -> Callable:
  """offline(key) -> material: the small requests' shared draws, then one program per group
  of requests (each piece's, and each run of requests between pieces: dealer.group)."""
  offsets, sizes = dealer_lib.draw_offsets(requests)
  key = jax.eval_shape(jax.random.key, 0)
  shared = [jax.ShapeDtypeStruct((n,), ring.DTYPE) for n in sizes]
  draws = [programs.add(("draw", j), lambda j=j: _party_words_jit.lower(key, j, _INDEX,
                                                                       sizes[j]))
           for j in (0, 1)]
  bounds = sorted({0, len(requests)} | {i for p in pieces for i in (p.start, p.stop)})
  groups = []
  for start, stop in zip(bounds[:-1], bounds[1:]):
    part = requests[start:stop]
    signature, part_masks = dealer_lib.signature(part), dealer_lib.group_masks(part, masks)
    base = next((at for at in offsets[start:stop] if at is not None), (0, 0))
    i = programs.add((signature, _signature(part_masks)), lambda: dealer_lib.group_jit.lower(
        signature, key, _INDEX, shared, jax.ShapeDtypeStruct((2,), jnp.int32), part_masks))
    groups.append((i, np.int32(start), np.asarray(base, np.int32), part_masks))
  count = np.int32(len(requests))

  def offline(key):
    words = [programs[i](key, count) for i in draws]
    return [m for i, start, base, part_masks in groups
            for m in programs[i](key, start, words, base, part_masks)]

  return offline


def _online(root: Callable, recorder: dealer_lib.Recorder, pieces: list,
            programs: _Programs) -> Callable:
  """online(material, *args): `root` run from Python, its pieces compiled."""
  calls = []
  for p in pieces:
    material = recorder.material[p.start:p.stop]
    calls.append((p.stop - p.start, programs.add(
        (p.fn, _signature((material, p.args))),
        lambda: _run_piece_jit.lower(p.fn, material, *p.args))))

  def online(material, *args):
    compiled = [(n, programs[i]) for n, i in calls]
    return root(channels.Channel(), dealer_lib.Pieces(material, compiled), *args)

  return online


def compile_protocol(fn: Callable, masks: dict, *example_args,
                     jit: bool = True) -> tuple[Callable, Callable, dict]:
  """Splits `fn(ch, dealer, *args)` into offline and online parts.

  `jit`: each piece (`dealer.piece(ch, piece_fn, *args)` calls, e.g. a layer; the whole
  protocol if it has none) is one compiled program, and so is each piece's material;
  pieces of the same function and shapes share one program (ResNet-18's blocks), so the
  programs are small and few: XLA compiles them in seconds, not the whole protocol
  unrolled in minutes. They are compiled here, in parallel threads, and called from
  Python (the few steps outside pieces run op by op). Without `jit`, op by op (quicker
  for a single small call).

  Returns `(offline(key) -> material, online(material, *args) -> out, counts)`,
  `counts` being the channel totals of one call (Channel.totals); with `jit` the two are
  `Phase`s. Must be called, and its functions run, inside `ring.x64()`.
  """
  ch = channels.Channel()
  recorder = dealer_lib.Recorder(ch)
  jax.eval_shape(functools.partial(fn, ch, recorder), *example_args)
  requests = recorder.requests
  if not jit:
    return (lambda key: dealer_lib.generate(requests, masks, key, op_by_op=True),
            lambda material, *args: fn(channels.Channel(), dealer_lib.Replay(material), *args),
            ch.totals())
  root, pieces = fn, recorder.pieces
  if not pieces:
    root = lambda ch, dealer, *args: dealer.piece(ch, fn, *args)
    pieces = [dealer_lib.Piece(fn, 0, len(requests), dealer_lib.shapes(example_args))]
  programs = _Programs()
  offline = _offline(requests, masks, pieces, programs)
  first_online = len(programs.lowered)
  online = _online(root, recorder, pieces, programs)
  programs.compile()
  return (Phase(offline, programs.compiled[:first_online]),
          Phase(online, programs.compiled[first_online:]), ch.totals())


def _output(reveal: str) -> Callable:
  """The output piece: secure argmax of the logits, revealed to party 0 (inference_fn)."""

  def fn(ch, dealer, logits):
    one_hot = protocol.argmax(ch, dealer, logits)
    if reveal == "label":
      return protocol.reveal_to_hospital(ch, one_hot, "reveal"), None
    both = protocol.reveal_to_hospital(ch, jnp.concatenate([one_hot, logits], -1), "reveal")
    return both[:, :logits.shape[-1]], both[:, logits.shape[-1]:]

  return fn


_OUTPUTS = {reveal: _output(reveal) for reveal in ("label", "logits")}


def inference_fn(forward: Callable, reveal: str) -> Callable:
  """The protocol of one batch: `forward` (forward_fn), secure argmax, outputs revealed
  to party 0 (one piece).

  Returns `fn(ch, dealer, model, x) -> (one_hot [B, C], logits [B, C] ring or None)`;
  `reveal="label"` reveals the one-hot argmax only, `"logits"` the logits too.
  """
  return lambda ch, dealer, model, x: dealer.piece(ch, _OUTPUTS[reveal],
                                                   forward(ch, dealer, model, x))
