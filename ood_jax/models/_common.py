"""Pieces every convolutional backbone shares: He initialisation, convolutions, BatchNorm, input checks."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ood_jax import _checks
from ood_jax.models import batch_norm as batch_norm_lib

# torchvision, the WRN and DenseNet reference code all draw conv kernels from N(0, 2 / fan_out)
# (kaiming_normal_, mode='fan_out'), untruncated; 'normal' in JAX is the untruncated normal.
he_normal = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def conv(features: int, kernel_size: int, *, strides: int = 1, dtype: jnp.dtype,
         name: str) -> Callable[[jax.Array], jax.Array]:
  """Bias-free square convolution with PyTorch-style symmetric padding of kernel_size // 2.

  Flax's 'SAME' pads a stride-2 convolution on an even input by (0, 1), PyTorch by (1, 1): the
  output size agrees but the sampling grid is shifted by one pixel. Symmetric padding keeps the
  grid of the papers' code, so ported weights see the same pixels.

  Returns a function of the input that calls an `nn.Conv` named `name` (its parameter is
  `name/kernel`) on `materialize(input)`.
  """
  pad = kernel_size // 2
  layer = nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides),
                  padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=he_normal,
                  dtype=dtype, name=name)
  return lambda x: layer(materialize(x))


@jax.custom_jvp
def materialize(x: jax.Array) -> jax.Array:
  """x; under differentiation on CPU, computed once into memory: a fusion barrier for a conv input.

  XLA:CPU computes a convolution's filter gradient from a transposed copy of its input, and fuses into
  that transpose a recomputation of every elementwise op the input came from (BatchNorm, ReLU and the
  residual additions of up to four blocks), read in the transpose's cache-hostile order: half of a
  ResNet-20 training step on 2 cores. XLA does not duplicate an "expensive" op such as a division into a
  second consumer, so dividing by a one it cannot fold (computed at run time from x itself, 0 · x₀ + 1)
  makes the input a buffer the transpose only copies: with `batch_norm_lib.BatchNorm`, 1.4× (ResNet-20)
  and 1.9× (ResNet-18) faster steps, docs/benchmark_peers.md. `lax.optimization_barrier` would say this
  directly, but XLA:CPU removes it before fusion. x / 1 is x exactly (a non-finite x₀ would make the
  whole batch NaN, which an inf or NaN activation ruins anyway). The tangent is divided too, so the
  gradient reaching the input is a buffer as well, for the transposes of the previous convolution's
  filter gradient (without that, the ResNet-20 step is 1.35× slower). Without differentiation
  (inference: no filter gradient, the division would only cost time) and in a program lowered for another
  platform (chosen per lowering platform by `jax.lax.platform_dependent`, so a GPU or TPU program made on a
  CPU host has no division either), x is returned unchanged.
  """
  return x


@materialize.defjvp
def _materialize_jvp(primals, tangents):
  (x,), (tangent,) = primals, tangents

  def barrier(x, tangent):
    one = 1 + 0 * jax.lax.stop_gradient(x.reshape(-1)[0])
    return x / one, tangent / one

  return jax.lax.platform_dependent(x, tangent, cpu=barrier, default=lambda x, tangent: (x, tangent))


def batch_norm(*, train: bool, dtype: jnp.dtype, name: str) -> batch_norm_lib.BatchNorm:
  """BatchNorm with PyTorch's defaults: running averages keep 0.9 of the old value, eps 1e-5.

  `batch_norm_lib.BatchNorm` has nn.BatchNorm's variables and numbers, with reductions XLA:CPU runs
  faster.
  """
  return batch_norm_lib.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                                  name=name)


def images(x, dtype: jnp.dtype):
  """Checks a `[B, H, W, C]` floating batch and casts it to the computation dtype."""
  return _checks.floating('images', x, ndim=4).astype(dtype)
