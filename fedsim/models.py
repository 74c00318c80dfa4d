"""Flax models, used functionally on params pytrees (no mutable state, no BatchNorm).

The classifiers take a normalised float image batch `[B, H, W, C]` and return
logits `[B, num_classes]`; the U-Net (task=segmentation) returns per-pixel logits
`[B, H, W, num_classes]`. `conv="patches"` lowers each convolution as image patches
followed by an einsum: the same parameters and the same function as `conv="xla"`
(`lax.conv`), but it batches far better when vmapped over clients whose weights
differ (XLA:CPU lowers a vmapped `lax.conv` with per-client weights poorly).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from privacy import ghost_layers

CONV_IMPLS = ("xla", "patches")


class PatchConv(nn.Module):
  """2-D convolution as patches + einsum; parameters named like `nn.Conv`."""

  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: str = "SAME"
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    cin = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (kh, kw, cin, self.features))
    patches = jax.lax.conv_general_dilated_patches(
        x, (kh, kw), tuple(self.strides), self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    # Patch channels are ordered (cin, kh, kw); reorder the kernel to match.
    w = kernel.transpose(2, 0, 1, 3).reshape(cin * kh * kw, self.features)
    y = jnp.einsum("bhwk,kf->bhwf", patches, w)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,))
    return y


# Computes lax.conv(x, kernel) + bias with nn.Conv's params: ghost clipping may unfold it.
ghost_layers.register_conv_layer(PatchConv)


def conv_module(impl: str) -> Callable[..., nn.Module]:
  """The convolution class for `impl` in CONV_IMPLS."""
  if impl == "xla":
    return nn.Conv
  if impl == "patches":
    return PatchConv
  raise ValueError(f"engine.conv={impl!r} must be one of {CONV_IMPLS + ('auto',)}")


ACTIVATIONS = {"relu": nn.relu, "tanh": jnp.tanh}


def _conv_stem(conv: Callable[..., nn.Module], x: jax.Array,
               act: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """conv16 3x3 - avgpool - conv32 3x3 - avgpool (called inside a compact method)."""
  x = act(conv(16, (3, 3), name="conv1")(x))
  x = nn.avg_pool(x, (2, 2), (2, 2))
  x = act(conv(32, (3, 3), name="conv2")(x))
  return nn.avg_pool(x, (2, 2), (2, 2))


class SmallCNN(nn.Module):
  """conv16 3x3 - avgpool - conv32 3x3 - avgpool - dense64 - dense(num_classes).

  `activation="tanh"` ("cnn_tanh") is the bounded activation that trains better
  under DP-SGD (Papernot et al. 2021, "Tempered sigmoid activations"). Without
  noise the two are close on the synthetic task (centralised, momentum, 400
  steps: 0.943 balanced accuracy each; benchmarks/README.md).
  """

  num_classes: int = 3
  conv: str = "xla"
  activation: str = "relu"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = ACTIVATIONS[self.activation]
    x = _conv_stem(conv_module(self.conv), x, act)
    x = x.reshape(x.shape[0], -1)
    x = act(nn.Dense(64, name="dense1")(x))
    return nn.Dense(self.num_classes, name="head")(x)


class SmallCNNGap(nn.Module):
  """conv16 - avgpool - conv32 - avgpool - conv32 - global average - dense(classes).

  About 14k parameters (SmallCNN: 107k, most in its dense layer): DP noise grows
  with the square root of the parameter count. It also learns more slowly: on the
  synthetic task it did not beat SmallCNN under DP-SGD.
  """

  num_classes: int = 3
  conv: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = conv_module(self.conv)
    x = nn.relu(conv(32, (3, 3), name="conv3")(_conv_stem(conv, x, nn.relu)))
    return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


class ResidualBlock(nn.Module):
  """Basic ResNet block with GroupNorm."""

  features: int
  strides: int = 1
  conv: str = "xla"
  groups: int = 8

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = conv_module(self.conv)
    s = (self.strides, self.strides)
    y = conv(self.features, (3, 3), strides=s, use_bias=False, name="conv1")(x)
    y = nn.relu(nn.GroupNorm(num_groups=self.groups, name="norm1")(y))
    y = conv(self.features, (3, 3), use_bias=False, name="conv2")(y)
    y = nn.GroupNorm(num_groups=self.groups, name="norm2")(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = conv(self.features, (1, 1), strides=s, use_bias=False, name="proj")(x)
      x = nn.GroupNorm(num_groups=self.groups, name="proj_norm")(x)
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """ResNet-18 with GroupNorm (DP-compatible: no batch statistics)."""

  num_classes: int = 3
  conv: str = "xla"
  width: int = 64
  groups: int = 8

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = conv_module(self.conv)
    small = x.shape[1] <= 64  # CIFAR-style stem for small images
    if small:
      x = conv(self.width, (3, 3), use_bias=False, name="stem")(x)
    else:
      x = conv(self.width, (7, 7), strides=(2, 2), use_bias=False, name="stem")(x)
    x = nn.relu(nn.GroupNorm(num_groups=self.groups, name="stem_norm")(x))
    if not small:
      x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
    for stage, blocks in enumerate((2, 2, 2, 2)):
      for b in range(blocks):
        strides = 2 if stage > 0 and b == 0 else 1
        x = ResidualBlock(self.width * 2**stage, strides, self.conv, self.groups,
                          name=f"stage{stage + 1}_block{b + 1}")(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


class UNet(nn.Module):
  """A small U-Net with GroupNorm (DP-compatible), for 2-D segmentation.

  Two poolings (H and W must be multiples of 4), widths w - 2w - 4w; the decoder
  upsamples by nearest-neighbour repetition and convolves (no transposed
  convolution), so every layer is a conv or a GroupNorm: ghost clipping handles
  it. Per-pixel logits `[B, H, W, num_classes]`. width 16, one channel in: about 58k parameters.
  """

  num_classes: int = 3
  conv: str = "xla"
  width: int = 16
  groups: int = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = conv_module(self.conv)

    def block(x, features, name):
      x = conv(features, (3, 3), use_bias=False, name=name)(x)
      return nn.relu(nn.GroupNorm(num_groups=self.groups, name=f"{name}_norm")(x))

    def up(x):  # nearest-neighbour x2
      return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)

    w = self.width
    e1 = block(x, w, "enc1")
    e2 = block(nn.avg_pool(e1, (2, 2), (2, 2)), 2 * w, "enc2")
    b = block(nn.avg_pool(e2, (2, 2), (2, 2)), 4 * w, "bottleneck")
    d2 = block(jnp.concatenate([up(b), e2], axis=-1), 2 * w, "dec2")
    d1 = block(jnp.concatenate([up(d2), e1], axis=-1), w, "dec1")
    return conv(self.num_classes, (1, 1), name="head")(d1)


SEGMENTATION_MODELS = ("unet",)
MODELS = {"cnn": SmallCNN, "cnn_tanh": functools.partial(SmallCNN, activation="tanh"),
          "cnn_gap": SmallCNNGap, "resnet18": ResNet18, "unet": UNet}


def make_model(name: str, *, num_classes: int, conv: str = "xla") -> nn.Module:
  """The Flax module registered as `name` (see MODELS)."""
  if name not in MODELS:
    raise ValueError(f"model={name!r} must be one of {sorted(MODELS)}")
  return MODELS[name](num_classes=num_classes, conv=conv)


def has_batch_norm(params) -> bool:
  """True if a params/variables tree holds BatchNorm or batch statistics."""
  names = jax.tree_util.tree_flatten_with_path(params)[0]
  return any(tag in jax.tree_util.keystr(path) for path, _ in names
             for tag in ("BatchNorm", "batch_stats"))
