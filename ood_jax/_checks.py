"""Argument checks shared by the public functions of ood_jax: the one place they are written.

Two kinds. Checks for jit-able functions (`floating`, `integer`, `labels`, `positive`, ...) inspect
only what is known outside a trace (shapes, dtypes) unless the value is concrete; value checks such
as label ranges are skipped for tracers, because reading a traced value would force a host sync or
fail under `jax.jit`. Host-side checks (`host_array`, `host_float64`, `host_labels`), for the metrics,
calibrators and fits that run in NumPy float64, refuse tracers and return validated NumPy copies.
Errors name the offending argument.
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


def dtype_of(x):
  """The dtype of an array or of what `np.asarray` makes of array-like input (lists, scalars)."""
  dtype = getattr(x, 'dtype', None)
  return np.asarray(x).dtype if dtype is None else dtype


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
    raise TypeError(f'{name} must be an int, got {value!r}.')
  if value < 1:
    raise ValueError(f'{name} must be >= 1, got {value}.')
  return int(value)


def positive_real(name: str, value) -> float:
  """Checks a finite real scalar > 0 (not a bool); returns a float."""
  if isinstance(value, (bool, np.bool_)) or isinstance(value, str) or np.ndim(value) != 0:
    raise TypeError(f'{name} must be a real scalar, got {value!r}.')
  value = float(value)
  if not (np.isfinite(value) and value > 0):
    raise ValueError(f'{name} must be a finite number > 0, got {value}.')
  return value


def boolean(name: str, value) -> bool:
  """Checks a Python or NumPy bool (an int 0/1 is refused: it is usually another argument's value)."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f'{name} must be a bool, got {value!r}.')
  return bool(value)


# ----------------------------------------------------------------------------------------------
# Host-side checks: arrays that metrics, calibrators and fits read in NumPy.

_KINDS = {'floating': jnp.floating, 'integer': jnp.integer}


def host_array(name: str, x, *, ndim: int, kinds: tuple[str, ...] = ('floating',)) -> np.ndarray:
  """Checks that `x` is concrete, of one of the dtype `kinds` and of rank `ndim`; returns it as NumPy.

  Args:
    name: argument name used in error messages.
    x: array-like (NumPy, JAX or nested lists); a tracer is a TypeError (these functions run on the host).
    ndim: required rank.
    kinds: accepted dtype kinds, a subset of ('floating', 'integer'). Booleans and complex numbers
      are never accepted: a boolean "score" or "probability" is almost always a caller bug.

  Returns:
    `x` as a NumPy array, dtype unchanged.
  """
  if not is_concrete(x):
    raise TypeError(f'{name} is a tracer; this function runs on the host in NumPy: call it outside jax.jit.')
  dtype = getattr(x, 'dtype', None)
  if dtype is None:
    x = np.asarray(x)
    dtype = x.dtype
  if not any(jnp.issubdtype(dtype, _KINDS[kind]) for kind in kinds):
    want = ' or '.join(kinds)
    article = 'an' if want[0] in 'aeiou' else 'a'
    raise TypeError(f'{name} must have {article} {want} dtype, got {dtype}.')
  _rank(name, x, ndim=ndim)
  # bfloat16 has no NumPy cast to float64 on every platform: go through float32.
  return np.asarray(jnp.asarray(x, jnp.float32) if dtype == jnp.bfloat16 else x)


def host_float64(name: str, x, *, ndim: int, allow_integer: bool = False, allow_inf: bool = False) -> np.ndarray:
  """A validated, non-empty float64 NumPy copy of `x`: no NaN, and no ±inf unless `allow_inf`.

  Float64 on the host whatever the input dtype: float32 or bfloat16 sums and counts would lose precision.
  """
  x = host_array(name, x, ndim=ndim, kinds=('floating', 'integer') if allow_integer else ('floating',))
  x = x.astype(np.float64)
  nonempty(name, x)
  if allow_inf:
    if np.isnan(x).any():
      raise ValueError(f'{name} contains NaN.')
  elif not np.isfinite(x).all():
    raise ValueError(f"{name} contains {'NaN' if np.isnan(x).any() else 'inf'}; every value must be finite.")
  return x


def host_labels(name: str, x, *, size: int, match: str, num_classes: int | None = None) -> np.ndarray:
  """Integer labels `[size]` as int64 NumPy; in [0, num_classes) when `num_classes` is given, else >= 0.

  Args:
    name: argument name used in error messages.
    x: the labels.
    size: the number of examples they must match.
    match: what they match, for the message ('logits', 'probs').
    num_classes: K, or None to check only that they are >= 0.
  """
  x = host_array(name, x, ndim=1, kinds=('integer',)).astype(np.int64)
  if x.shape[0] != size:
    raise ValueError(f'{name} must have shape ({size},) to match {match}, got {x.shape}.')
  if x.size:
    lo, hi = int(x.min()), int(x.max())
    if num_classes is not None and (lo < 0 or hi >= num_classes):
      raise ValueError(f'{name} must lie in [0, {num_classes}), got values in [{lo}, {hi}].')
    if lo < 0:
      raise ValueError(f'{name} must be >= 0, got minimum {lo}.')
  return x
