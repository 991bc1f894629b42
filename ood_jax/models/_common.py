"""Pieces every convolutional backbone shares: He initialisation, BatchNorm defaults, input checks."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ood_jax import _checks

# torchvision, the WRN and DenseNet reference code all draw conv kernels from N(0, 2 / fan_out)
# (kaiming_normal_, mode='fan_out'), untruncated; 'normal' in JAX is the untruncated normal.
he_normal = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def conv(features: int, kernel_size: int, *, strides: int = 1, dtype: jnp.dtype,
         name: str) -> nn.Conv:
  """Bias-free square convolution with PyTorch-style symmetric padding of kernel_size // 2.

  Flax's 'SAME' pads a stride-2 convolution on an even input by (0, 1), PyTorch by (1, 1): the
  output size agrees but the sampling grid is shifted by one pixel. Symmetric padding keeps the
  grid of the papers' code, so ported weights see the same pixels.
  """
  pad = kernel_size // 2
  return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides),
                 padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=he_normal,
                 dtype=dtype, name=name)


def batch_norm(*, train: bool, dtype: jnp.dtype, name: str) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults: running averages keep 0.9 of the old value, eps 1e-5."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      name=name)


def images(x, dtype: jnp.dtype):
  """Checks a `[B, H, W, C]` floating batch and casts it to the computation dtype."""
  return _checks.floating('images', x, ndim=4).astype(dtype)
