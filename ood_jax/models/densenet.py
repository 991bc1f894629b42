"""Densely connected networks for 32 × 32 inputs (Huang et al., "Densely Connected Convolutional
Networks", 2017).

Three dense blocks joined by transitions (BN–ReLU–conv1×1–avg-pool 2×2), then a final BN–ReLU.
Each layer adds `growth_rate` channels by BN–ReLU–conv3×3, or with `bottleneck` (DenseNet-B) by
BN–ReLU–conv1×1(4k)–BN–ReLU–conv3×3(k); `compression` θ < 1 (DenseNet-C) makes transitions
output ⌊θ·c⌋ channels. DenseNet-BC-100 (k = 12) is IsoMax's network, DenseNet-40-12 (plain) ICE's.
The paper's dropout is only for runs without augmentation and is left out.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from ood_jax.models import _common


class DenseLayer(nn.Module):
  """One composite layer; returns its input with `growth_rate` new channels appended.

  Attributes:
    growth_rate: channels added, k.
    bottleneck: put a 1×1 conv to 4k channels before the 3×3 conv.
    dtype: computation dtype.
  """

  growth_rate: int
  bottleneck: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    """`[B, H, W, C]` → `[B, H, W, C + growth_rate]`."""
    y = nn.relu(_common.batch_norm(train=train, dtype=self.dtype, name='bn1')(x))
    if self.bottleneck:
      y = _common.conv(4 * self.growth_rate, 1, dtype=self.dtype, name='bottleneck_conv')(y)
      y = nn.relu(_common.batch_norm(train=train, dtype=self.dtype, name='bn2')(y))
    y = _common.conv(self.growth_rate, 3, dtype=self.dtype, name='conv')(y)
    return jnp.concatenate([x, y], axis=-1)


class Transition(nn.Module):
  """BN–ReLU–conv1×1–avg-pool 2×2 between dense blocks.

  Attributes:
    features: output channels.
    dtype: computation dtype.
  """

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    """`[B, H, W, C]` → `[B, ⌊H / 2⌋, ⌊W / 2⌋, features]`."""
    x = nn.relu(_common.batch_norm(train=train, dtype=self.dtype, name='bn')(x))
    x = _common.conv(self.features, 1, dtype=self.dtype, name='conv')(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNet(nn.Module):
  """DenseNet(-BC) with three dense blocks.

  Attributes:
    depth: total depth L: 3n + 4 layers with n plain layers per block, or 6n + 4 with bottlenecks
      (each bottleneck layer has two convolutions).
    growth_rate: k.
    bottleneck: DenseNet-B layers. The stem then has 2k channels, else 16, as in the paper.
    compression: θ in (0, 1]; 1 keeps the channel count through transitions.
    dtype: computation dtype (e.g. jnp.bfloat16); parameters stay float32.
  """

  depth: int = 100
  growth_rate: int = 12
  bottleneck: bool = True
  compression: float = 0.5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    """Feature map before global pooling.

    Args:
      x: `[B, H, W, C]` float images, any C.
      train: use batch statistics (and update the running ones) instead of running averages.

    Returns:
      `[B, H / 4, W / 4, D]` after the final BN–ReLU, in `dtype` (D = 342 for DenseNet-BC-100,
      448 for DenseNet-40-12).
    """
    convs_per_layer = 2 if self.bottleneck else 1
    if (self.depth - 4) % (3 * convs_per_layer) or self.depth < 3 * convs_per_layer + 4:
      raise ValueError(f'DenseNet depth must be {3 * convs_per_layer}n + 4 with n >= 1 when '
                       f'bottleneck={self.bottleneck}, got {self.depth}.')
    if not 0 < self.compression <= 1:
      raise ValueError(f'compression must lie in (0, 1], got {self.compression}.')
    layers_per_block = (self.depth - 4) // (3 * convs_per_layer)
    channels = 2 * self.growth_rate if self.bottleneck else 16
    x = _common.images(x, self.dtype)
    x = _common.conv(channels, 3, dtype=self.dtype, name='stem_conv')(x)
    for block in range(3):
      for layer in range(layers_per_block):
        x = DenseLayer(self.growth_rate, self.bottleneck, dtype=self.dtype,
                       name=f'block{block + 1}_layer{layer + 1}')(x, train=train)
      if block < 2:
        channels = math.floor(x.shape[-1] * self.compression)
        x = Transition(channels, dtype=self.dtype, name=f'transition{block + 1}')(x, train=train)
    return nn.relu(_common.batch_norm(train=train, dtype=self.dtype, name='final_bn')(x))
