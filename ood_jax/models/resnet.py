"""ResNets for 32 × 32 inputs: ResNet-20 v1 and ResNet-18/34 with the CIFAR stem.

He et al., "Deep Residual Learning for Image Recognition" (2016): post-activation basic blocks
(conv3×3–BN–ReLU–conv3×3–BN, add, ReLU). ResNet-20 is the paper's CIFAR network (Section 4.2:
3 stages × 3 blocks, widths 16/32/64); ResNet-18/34 are the ImageNet stage layouts [2, 2, 2, 2] /
[3, 4, 6, 3] at widths 64–512 with the stem CIFAR code bases use (one 3×3 conv at stride 1, no
max-pool), so a 32 × 32 image ends as a 4 × 4 map.

Shortcuts: identity where shapes match, else a 1×1 strided conv + BN projection (the paper's
option B, as in torchvision and the CIFAR ResNet-18/34 of IsoMax, OpenOOD and SMOT). The paper's
ResNet-20 used option A (zero-padded identity, 0.27 M params); uncertainty-baselines' ResNet-20,
which the one-vs-all paper trains, projects with a 1×1 conv (with bias, no BN). Option B keeps one
block type for every depth and adds only 2.8 K parameters to ResNet-20.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from ood_jax.models import _common


class BasicBlock(nn.Module):
  """Post-activation basic block with an identity or 1×1 conv + BN shortcut.

  Attributes:
    features: output channels.
    strides: stride of the first conv and of the projection.
    dtype: computation dtype.
  """

  features: int
  strides: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    """`[B, H, W, C]` → `[B, H / strides, W / strides, features]`."""
    y = _common.conv(self.features, 3, strides=self.strides, dtype=self.dtype, name='conv1')(x)
    y = nn.relu(_common.batch_norm(train=train, dtype=self.dtype, name='bn1')(y))
    y = _common.conv(self.features, 3, dtype=self.dtype, name='conv2')(y)
    y = _common.batch_norm(train=train, dtype=self.dtype, name='bn2')(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = _common.conv(self.features, 1, strides=self.strides, dtype=self.dtype,
                       name='shortcut_conv')(x)
      x = _common.batch_norm(train=train, dtype=self.dtype, name='shortcut_bn')(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """CIFAR-style ResNet: 3×3 stem at stride 1, then stages of basic blocks.

  The first block of every stage after the first halves the resolution.

  Attributes:
    stage_sizes: blocks per stage, e.g. (3, 3, 3) for ResNet-20, (2, 2, 2, 2) for ResNet-18.
    widths: channels per stage; the stem has widths[0] channels.
    dtype: computation dtype (e.g. jnp.bfloat16); parameters stay float32.
  """

  stage_sizes: Sequence[int]
  widths: Sequence[int]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    """Feature map before global pooling.

    Args:
      x: `[B, H, W, C]` float images, any C.
      train: use batch statistics (and update the running ones) instead of running averages.

    Returns:
      `[B, H / 2^(S−1), W / 2^(S−1), widths[-1]]` with S stages, e.g. `[B, 4, 4, 512]` for
      ResNet-18 on 32 × 32 inputs, in `dtype`.
    """
    if len(self.stage_sizes) != len(self.widths):
      raise ValueError(f'stage_sizes {tuple(self.stage_sizes)} and widths {tuple(self.widths)} '
                       'must have the same length.')
    x = _common.images(x, self.dtype)
    x = _common.conv(self.widths[0], 3, dtype=self.dtype, name='stem_conv')(x)
    x = nn.relu(_common.batch_norm(train=train, dtype=self.dtype, name='stem_bn')(x))
    for stage, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(width, strides, dtype=self.dtype,
                       name=f'stage{stage + 1}_block{block + 1}')(x, train=train)
    return x
