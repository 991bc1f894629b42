"""Argument checks shared by the public functions of ood_jax.

Everything here inspects only what is known outside a trace (shapes, dtypes) unless the value is
concrete; value checks such as label ranges are skipped for tracers, because reading a traced value
would force a host sync or fail under `jax.jit`. Errors name the offending argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
  """True when `x` holds values we may read on the host (not a tracer)."""
  return not isinstance(x, jax.core.Tracer)


def host_value(x):
  """`x` as a NumPy array when concrete, else None.

  Reductions must run in NumPy: a jnp op on a concrete array inside a `jax.jit` trace (a closed-over
  constant) would itself return a tracer.
  """
  return np.asarray(x) if is_concrete(x) else None


def _typed(name, x, kind, kind_name, ndim, min_ndim):
  dtype = getattr(x, 'dtype', None)
  if dtype is None:
    x = np.asarray(x)
    dtype = x.dtype
  if not jnp.issubdtype(dtype, kind):
    raise TypeError(f'{name} must have {kind_name} dtype, got {dtype}.')
  _rank(name, x, ndim=ndim, min_ndim=min_ndim)
  return jnp.asarray(x)


def floating(name: str, x, *, ndim: int | tuple[int, ...] | None = None, min_ndim: int | None = None):
  """Checks that `x` is a floating array of the given rank; returns it as a jax array."""
  return _typed(name, x, jnp.floating, 'a floating', ndim, min_ndim)


def integer(name: str, x, *, ndim: int | tuple[int, ...] | None = None):
  """Checks that `x` is an integer array of the given rank; returns it as a jax array."""
  return _typed(name, x, jnp.integer, 'an integer', ndim, None)


def labels(name: str, x, num_classes: int, *, shape: tuple[int, ...] | None = None):
  """Checks integer labels of the given shape and, when concrete, that they lie in [0, num_classes)."""
  x = integer(name, x)
  if shape is not None and tuple(x.shape) != tuple(shape):
    raise ValueError(f'{name} must have shape {tuple(shape)} to match the logits, got {tuple(x.shape)}.')
  value = host_value(x)
  if value is not None and value.size:
    lo, hi = int(value.min()), int(value.max())
    if lo < 0 or hi >= num_classes:
      raise ValueError(f'{name} must lie in [0, {num_classes}), got values in [{lo}, {hi}].')
  return x


def nonempty(name: str, x, *, axis: int = 0):
  if x.shape[axis] == 0:
    raise ValueError(f'{name} is empty (size 0 along axis {axis}).')
  return x


def positive(name: str, value) -> float:
  if not np.isscalar(value) and np.ndim(value) != 0:
    raise TypeError(f'{name} must be a scalar, got shape {np.shape(value)}.')
  if is_concrete(value) and not float(value) > 0:
    raise ValueError(f'{name} must be > 0, got {value}.')
  return value


def _rank(name, x, *, ndim=None, min_ndim=None):
  rank = np.ndim(x)
  if ndim is not None:
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if rank not in allowed:
      want = ' or '.join(str(a) for a in allowed)
      raise ValueError(f'{name} must have rank {want}, got shape {tuple(np.shape(x))}.')
  if min_ndim is not None and rank < min_ndim:
    raise ValueError(f'{name} must have rank >= {min_ndim}, got shape {tuple(np.shape(x))}.')


def compute_dtype(*arrays):
  """The dtype losses and scores compute in: at least float32, so bfloat16 inputs stay stable."""
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def nonnegative(name: str, value) -> float:
  if not np.isscalar(value) and np.ndim(value) != 0:
    raise TypeError(f'{name} must be a scalar, got shape {np.shape(value)}.')
  if is_concrete(value) and not float(value) >= 0:
    raise ValueError(f'{name} must be >= 0, got {value}.')
  return value


def positive_int(name: str, value) -> int:
  """Checks a static (Python or NumPy) integer >= 1, such as a size or a count; returns an int."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be a Python int, got {type(value).__name__}.')
  if value < 1:
    raise ValueError(f'{name} must be >= 1, got {value}.')
  return int(value)
