"""BatchNorm (Ioffe & Szegedy 2015) with flax.linen.BatchNorm's variables and numbers, and a hand-written
training-mode gradient.

Why not `nn.BatchNorm`: on XLA:CPU its four per-channel reductions of a training step (mean and mean
square forward; Σg and Σg·x̂ backward) are lowered to `reduce-window`s that read a channels-last
activation once per channel group, about a fifth of a ResNet-20 CIFAR step on 2 cores
(docs/benchmark_peers.md). Here the training-mode forward and backward are one `jax.custom_vjp`
whose reductions are matrix products with a block of ones, which XLA:CPU hands to its GEMM: 2-6× faster
per reduction than the `reduce-window`, and within 3× of its tree-reduced sum's rounding (a single row of
ones would be a GEMV that adds each column serially, ~30×). The choice is made per lowering platform
(`jax.lax.platform_dependent`), not by the host that traces: a program lowered or exported for GPU or TPU, even
on a CPU host, reduces over the batch axes with `jnp.sum` (which their reduction emitters handle well), without
the ones block and without reshaping the activations to `[M, C]` rows.

Same variables as `nn.BatchNorm` (params `scale`, `bias`; batch_stats `mean`, `var`, all float32), same
running-average update (`momentum · old + (1 − momentum) · batch`, not during `init`), same formulas
(biased batch variance clipped at 0, statistics in float32, `(x − mean) · rsqrt(var + ε) · scale + bias`
cast to `dtype`; inference bitwise flax's), so checkpoints of either load into the other and training
outputs agree to float32 rounding (tests/test_batch_norm.py).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ood_jax import _checks

# Rows of the ones block: 8 makes a GEMM (blocked, accurate to ~1e-7 relative on 10^5 terms) at almost
# the cost of the GEMV that one row would be (serial, ~3e-5).
_ONES_ROWS = 8


def _gemm_sums(x2d: jax.Array) -> jax.Array:
  """Σ over rows of a float32 `[M, K]` array → `[K]`, as XLA:CPU's GEMM (the CPU branch)."""
  ones = jnp.ones((_ONES_ROWS, x2d.shape[0]), x2d.dtype)
  return jnp.dot(ones, x2d, precision=jax.lax.Precision.HIGHEST)[0]


def _axis_sums(x: jax.Array) -> jax.Array:
  """Σ over every axis but the last of a float32 `[..., K]` array → `[K]` (GPU, TPU)."""
  return jnp.sum(x, axis=tuple(range(x.ndim - 1)))


def _statistics(x, shift, sums):
  """Batch mean and fast variance (clipped at 0) over every axis but the last of a float32 array.

  The second moment is taken about `shift` (the running mean), which the variance does not depend on:
  about 0, E[x²] − E[x]² cancels most digits of activations whose mean is large against their spread.
  The squares are a new array either way, and the mean reads x itself.
  """
  count = x.size // x.shape[-1]
  mean = sums(x) / count
  mean_square = sums(jnp.square(x - shift)) / count
  return mean, jnp.maximum(0.0, mean_square - jnp.square(mean - shift))


def _normalize(x, mean, inv, scale, bias):
  """flax's `(x − mean) · (rsqrt(var + ε) · scale) + bias`, in that order (inference matches it bitwise)."""
  return (x - mean) * (inv * scale) + bias


def _per_platform(fn, *arrays):
  """`fn(*arrays, sums)` with the lowering platform's sums; its first output has the shape of `arrays[0]`.

  CPU: the arrays as `[M, C]` rows for the ones-block GEMM, the first output reshaped back. Elsewhere the
  arrays as they are, reduced over their leading axes. Both branches run the same arithmetic.
  """
  shape = arrays[0].shape

  def cpu(*arrays):
    first, *rest = fn(*(a.reshape(-1, shape[-1]) for a in arrays), _gemm_sums)
    return (first.reshape(shape), *rest)

  return jax.lax.platform_dependent(*arrays, cpu=cpu, default=lambda *arrays: fn(*arrays, _axis_sums))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _train_forward(x, scale, bias, shift, epsilon):
  """`(y, mean, var)` of a training-mode BatchNorm over every axis but the last; y is float32.

  `shift`: a `[C]` guess of the mean (only the rounding depends on it; its gradient is zero).
  """
  return _train_forward_with_residuals(x, scale, bias, shift, epsilon)[0]


def _train_forward_with_residuals(x, scale, bias, shift, epsilon):
  def forward(x, sums):
    x = x.astype(jnp.float32)
    mean, var = _statistics(x, shift, sums)
    inv = jax.lax.rsqrt(var + epsilon)
    return _normalize(x, mean, inv, scale, bias), mean, var, inv

  y, mean, var, inv = _per_platform(forward, x)
  return (y, mean, var), (x, mean, var, inv, scale, shift)


def _train_backward(epsilon, residuals, cotangents):
  del epsilon  # inv holds it
  x, mean, var, inv, scale, shift = residuals
  dy, dmean, dvar = cotangents

  def backward(x, dy, sums):
    x = x.astype(jnp.float32)
    count = x.size // x.shape[-1]
    centred = x - mean
    x_hat = centred * inv
    dbias = sums(dy)
    dscale = sums(dy * x_hat)
    # The usual BatchNorm gradient, plus the (normally zero) cotangents of the returned statistics:
    # ∂mean/∂x = 1/M and ∂var/∂x = 2(x − mean)/M where the variance was not clipped.
    dvar_kept = jnp.where(var > 0, dvar, 0.0)
    dx = (scale * inv) * (dy - (dbias + x_hat * dscale) / count) + (dmean + 2.0 * dvar_kept * centred) / count
    return dx, dscale, dbias

  dx, dscale, dbias = _per_platform(backward, x, dy)
  return dx.astype(x.dtype), dscale, dbias, jnp.zeros_like(shift)


_train_forward.defvjp(_train_forward_with_residuals, _train_backward)


class BatchNorm(nn.Module):
  """Batch normalisation over every axis but the last (channels-last images, features).

  Attributes:
    use_running_average: normalise with the running averages (inference) instead of the batch
      statistics (training, which also updates the averages outside `init`).
    momentum: weight of the old running average in its update (flax's convention: 0.9 is PyTorch's 0.1).
    epsilon: added to the variance.
    dtype: output dtype (None: the input's, promoted with float32 as flax does).
  """

  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    """`[..., C]` floating → `[..., C]`."""
    x = _checks.floating('BatchNorm input', x, min_ndim=1)
    features = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32))
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    dtype = self.dtype or jnp.promote_types(x.dtype, jnp.float32)
    if self.use_running_average:
      inv = jax.lax.rsqrt(ra_var.value + self.epsilon)
      return _normalize(x, ra_mean.value, inv, scale, bias).astype(dtype)
    y, mean, var = _train_forward(x, scale, bias, ra_mean.value, self.epsilon)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.astype(dtype)
