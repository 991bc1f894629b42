"""Wide residual networks (Zagoruyko & Komodakis, "Wide Residual Networks", 2016).

WRN-d-k: a 3×3 stem with 16 channels, then three groups of (d − 4) / 6 pre-activation basic blocks
with 16k, 32k, 64k channels (strides 1, 2, 2), and a final BN–ReLU, so the returned map is already
activated as the pooled features are in the paper. Each block is
BN–ReLU–conv3×3–BN–ReLU–dropout–conv3×3 plus a shortcut; where the shape changes, the shortcut is a
1×1 conv of the *pre-activated* input, as in the authors' code. Dropout between the convolutions is
the paper's "WRN with dropout" variant (0.3 on CIFAR); 0 by default, as in uncertainty-baselines.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ood_jax.models import _common


class WideBlock(nn.Module):
  """Pre-activation wide basic block.

  Attributes:
    features: output channels.
    strides: stride of the first conv and of the projection.
    dropout_rate: dropout between the two convolutions, train mode only.
    dtype: computation dtype.
  """

  features: int
  strides: int = 1
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    """`[B, H, W, C]` → `[B, H / strides, W / strides, features]`."""
    preact = nn.relu(_common.batch_norm(train=train, dtype=self.dtype, name='bn1')(x))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = _common.conv(self.features, 1, strides=self.strides, dtype=self.dtype,
                              name='shortcut_conv')(preact)
    y = _common.conv(self.features, 3, strides=self.strides, dtype=self.dtype, name='conv1')(preact)
    y = nn.relu(_common.batch_norm(train=train, dtype=self.dtype, name='bn2')(y))
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = _common.conv(self.features, 3, dtype=self.dtype, name='conv2')(y)
    return y + shortcut


class WideResNet(nn.Module):
  """WRN-depth-width.

  Attributes:
    depth: total depth d, with (d − 4) divisible by 6 (28 and 40 in the papers).
    width: widening factor k.
    dropout_rate: dropout inside every block in train mode; draws from the 'dropout' rng
      collection when train=True and dropout_rate > 0.
    dtype: computation dtype (e.g. jnp.bfloat16); parameters stay float32.
  """

  depth: int = 28
  width: int = 10
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    """Feature map before global pooling.

    Args:
      x: `[B, H, W, C]` float images, any C.
      train: batch statistics and dropout on.

    Returns:
      `[B, H / 4, W / 4, 64 · width]` after the final BN–ReLU, in `dtype`.
    """
    if self.depth < 10 or (self.depth - 4) % 6:
      raise ValueError(f'WideResNet depth must be 6n + 4 with n >= 1, got {self.depth}.')
    blocks_per_group = (self.depth - 4) // 6
    x = _common.images(x, self.dtype)
    x = _common.conv(16, 3, dtype=self.dtype, name='stem_conv')(x)
    for group, base in enumerate((16, 32, 64)):
      for block in range(blocks_per_group):
        strides = 2 if group > 0 and block == 0 else 1
        x = WideBlock(base * self.width, strides, self.dropout_rate, dtype=self.dtype,
                      name=f'group{group + 1}_block{block + 1}')(x, train=train)
    return nn.relu(_common.batch_norm(train=train, dtype=self.dtype, name='final_bn')(x))
