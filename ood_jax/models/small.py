"""Small backbones that train in minutes on a CPU: a CNN for 32 × 32 digits and an MLP for toy data."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from ood_jax import _checks
from ood_jax.models import _common


class DigitsCNN(nn.Module):
  """Stacked conv3×3–BN–ReLU–max-pool 2×2 blocks (93 K parameters for one input channel).

  Attributes:
    widths: channels per block; each block halves the resolution.
    dtype: computation dtype (e.g. jnp.bfloat16); parameters stay float32.
  """

  widths: Sequence[int] = (32, 64, 128)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    """Feature map before global pooling.

    Args:
      x: `[B, H, W, C]` float images, any C.
      train: use batch statistics (and update the running ones) instead of running averages.

    Returns:
      `[B, H / 2^n, W / 2^n, widths[-1]]` for n blocks: `[B, 4, 4, 128]` for 32 × 32 digits.
    """
    x = _common.images(x, self.dtype)
    for i, width in enumerate(self.widths):
      x = _common.conv(width, 3, dtype=self.dtype, name=f'conv{i + 1}')(x)
      x = nn.relu(_common.batch_norm(train=train, dtype=self.dtype, name=f'bn{i + 1}')(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return x


class MLP(nn.Module):
  """Dense–ReLU layers on the flattened input, for 2-D toy problems and other vector data.

  Attributes:
    hidden: widths of the hidden layers; the features are the last one's activations.
    dtype: computation dtype; parameters stay float32.
  """

  hidden: Sequence[int] = (128, 128)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    """Features of a batch.

    Args:
      x: `[B, ...]` floating inputs, flattened per example.
      train: unused (no BatchNorm or dropout); kept so every backbone is called the same way.

    Returns:
      `[B, hidden[-1]]` in `dtype`.
    """
    del train
    x = _checks.floating('inputs', x, min_ndim=2)
    x = x.reshape(x.shape[0], -1).astype(self.dtype)
    for i, width in enumerate(self.hidden):
      # He initialisation (fan-in) keeps the activation scale through ReLU layers.
      x = nn.Dense(width, kernel_init=nn.initializers.he_normal(), dtype=self.dtype,
                   name=f'dense{i + 1}')(x)
      x = nn.relu(x)
    return x
