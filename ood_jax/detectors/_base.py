"""The plumbing every detector family shares: training batches, host conversion, argument and state checks.

Training batches are dicts with 'logits', 'features', 'labels' and optionally 'feature_maps'; fits
iterate them (once, or twice for two-pass fits), convert them to float64 on the host (once: `host` is
the only conversion), and check their shapes; scoring functions check the fitted state and their
arguments.

Scoring functions are split in two: the public function checks its arguments on concrete values (shapes,
dtypes, hyperparameter ranges, with errors naming the argument) and calls one `jax.jit` kernel, whose
shape-setting hyperparameters are static and whose other hyperparameters are traced (`as_float`), so a
tuning grid over a traced value compiles once. Nothing on that path dispatches eager `jnp` operations,
each of which compiles an XLA computation of its own per shape: argument checks keep host arrays in NumPy
(`features_arg`), fits hand their float64 NumPy results to the device with `to_device`, and the kernel
promotes the inputs to the compute dtype (`compute`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import NamedTuple

import jax
from jax.experimental import checkify
import jax.numpy as jnp
import numpy as np

from ood_jax import _checks


class Head(NamedTuple):
  """The final affine layer, logits = features @ kernel + bias.

  Attributes:
    kernel: `[D, K]` weight, as a Flax `Dense` stores it (PyTorch's `fc.weight` transposed).
    bias: `[K]` bias.
  """

  kernel: jax.Array
  bias: jax.Array


def to_device(x, dtype=None) -> jax.Array:
  """A host array (a fit's float64 result) on the default device in `dtype` (default `out_dtype()`).

  `jax.device_put` copies; `jnp.asarray` on a NumPy array would compile a staging computation per shape.
  """
  return jax.device_put(np.asarray(x, out_dtype() if dtype is None else jax.dtypes.canonicalize_dtype(dtype)))


def as_float(value):
  """A concrete hyperparameter as a Python float (90 and 90.0 then share one compiled kernel); a tracer as is."""
  return float(value) if _checks.is_concrete(value) else value


def as_int(value):
  """A concrete integer hyperparameter as a Python int; a tracer as is."""
  return int(value) if _checks.is_concrete(value) else value


def compute(x):
  """`x` in the compute dtype, at least float32 (inside a kernel: bfloat16 inputs are promoted there)."""
  return x.astype(_checks.compute_dtype(x))


def floating_arg(name: str, x, *, ndim: int | None = None, min_ndim: int | None = None):
  """Checks a floating array's dtype and rank; a JAX array (or a tracer) is returned as it is, anything else as
  NumPy (a kernel takes either; `jnp.asarray` would compile a staging computation per shape)."""
  if isinstance(x, jax.Array):
    return _checks.floating(name, x, ndim=ndim, min_ndim=min_ndim)
  x = _checks.host_array(name, x, ndim=ndim)
  _checks._rank(name, x, min_ndim=min_ndim)  # pylint: disable=protected-access  (the checker's one rank message)
  return x


def as_head(head, *, detector: str) -> Head:
  """Validates a `(kernel [D, K], bias [K])` pair; returns it as a float32 (or wider) `Head` of device arrays."""
  if head is None:
    raise ValueError(f'detector {detector!r} needs the final layer: pass head=(kernel [D, K], bias [K]) '
                     f'(e.g. from ood_jax.detectors.adapter.head_weights).')
  try:
    kernel, bias = head
  except (TypeError, ValueError):
    raise TypeError(f'head must be a (kernel [D, K], bias [K]) pair, got {type(head).__name__}.') from None
  kernel = floating_arg('head kernel', kernel, ndim=2)
  bias = floating_arg('head bias', bias, ndim=1)
  if bias.shape[0] != kernel.shape[1]:
    raise ValueError(f'head bias has {bias.shape[0]} entries but the kernel {tuple(kernel.shape)} has '
                     f'{kernel.shape[1]} outputs (kernel must be [D, K], as flax.linen.Dense stores it).')
  dtype = jax.dtypes.canonicalize_dtype(_checks.compute_dtype(kernel, bias))
  cast = lambda x: x.astype(dtype) if isinstance(x, jax.Array) else to_device(x, dtype)
  return Head(cast(kernel), cast(bias))


def batch_source(batches, *, detector: str, passes: int = 1) -> Callable[[], Iterator]:
  """A function returning a fresh iterator over `batches` on every call.

  Args:
    batches: a callable returning an iterator, a list / tuple of batches, a single batch dict, or a
      one-shot iterable (a generator), which only detectors fitting in one pass accept.
    detector: name for error messages.
    passes: how many passes the detector makes over the data.
  """
  if batches is None:
    raise ValueError(f'detector {detector!r} must be fitted on training batches; got batches=None.')
  if isinstance(batches, Mapping):
    return lambda: iter((batches,))
  if isinstance(batches, (list, tuple)):
    return lambda: iter(batches)
  if callable(batches):
    return lambda: iter(batches())
  if not isinstance(batches, Iterable):
    raise TypeError(f'batches must be an iterable of dicts or a callable returning one, got '
                    f'{type(batches).__name__}.')
  if passes > 1:
    raise TypeError(f'detector {detector!r} makes {passes} passes over the batches; pass a list or a '
                    f'callable returning a fresh iterator, not a one-shot {type(batches).__name__}.')
  used = []

  def once():
    if used:
      raise TypeError(f'detector {detector!r} was given a one-shot iterator that is already consumed.')
    used.append(True)
    return iter(batches)

  return once


def host(batch: Mapping, key: str, index: int, *, detector: str, ndim: int | None = 2,
         dtype=np.float64) -> np.ndarray:
  """`batch[key]` as a host NumPy array (float64 by default), with errors naming what is missing."""
  if not isinstance(batch, Mapping):
    raise TypeError(f'batches must yield dicts with keys such as "logits", "features", "labels"; item '
                    f'{index} is a {type(batch).__name__}.')
  if key not in batch or batch[key] is None:
    raise ValueError(f'detector {detector!r} needs {key!r} in every batch; batch {index} has keys '
                     f'{sorted(batch)}.')
  value = batch[key]
  value_dtype = getattr(value, 'dtype', None)
  if value_dtype is None:
    value = np.asarray(value)
    value_dtype = value.dtype
  want = jnp.integer if np.issubdtype(dtype, np.integer) else jnp.floating
  if not jnp.issubdtype(value_dtype, want):
    raise TypeError(f'{key!r} (batch {index}) must have {"an integer" if want is jnp.integer else "a floating"}'
                    f' dtype, got {value_dtype}.')
  # bfloat16 (ml_dtypes) casts to float32 in NumPy; float32 to float64 is exact.
  value = np.asarray(value)
  value = (value.astype(np.float32) if value_dtype == jnp.bfloat16 else value).astype(dtype)
  if ndim is not None and value.ndim != ndim:
    raise ValueError(f'{key!r} (batch {index}) must have rank {ndim}, got shape {value.shape}.')
  if value.ndim >= 2 and 0 in value.shape[1:]:
    raise ValueError(f'{key!r} (batch {index}) has an empty dimension: shape {value.shape}.')
  if want is jnp.floating and not np.all(np.isfinite(value)):
    raise ValueError(f'{key!r} (batch {index}) contains NaN or inf.')
  return value


def host_labels(batch, index, num_classes, size, *, detector: str) -> np.ndarray:
  labels = host(batch, 'labels', index, detector=detector, ndim=1, dtype=np.int64)
  if labels.shape[0] != size:
    raise ValueError(f'labels (batch {index}) have {labels.shape[0]} entries for {size} examples.')
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'labels (batch {index}) must lie in [0, {num_classes}) (num_classes), got values in '
                     f'[{labels.min()}, {labels.max()}].')
  return labels


def host_logits(batch, index, head: Head | None, *, detector: str) -> np.ndarray:
  """The batch's logits; computed in float64 from its features and `head` when it has none."""
  if 'logits' in batch and batch['logits'] is not None:
    return host(batch, 'logits', index, detector=detector)
  if head is not None and 'features' in batch:
    features = host(batch, 'features', index, detector=detector)
    return features @ np.asarray(head.kernel, np.float64) + np.asarray(head.bias, np.float64)
  raise ValueError(f'detector {detector!r} needs "logits" in every batch (or "features" and head=); batch '
                   f'{index} has keys {sorted(batch)}.')


def labelled(batch, index, num_classes, *, detector: str, dim: int | None = None):
  """The batch's float64 'features' `[B, D]` (D checked against `dim`) and their int64 'labels'."""
  features = host(batch, 'features', index, detector=detector)
  check_dim('features', features, dim, index)
  return features, host_labels(batch, index, num_classes, features.shape[0], detector=detector)


def check_dim(name: str, value: np.ndarray, expected: int | None, index: int, axis: int = -1) -> int:
  if expected is not None and value.shape[axis] != expected:
    raise ValueError(f'{name} (batch {index}) have dimension {value.shape[axis]}, expected {expected} '
                     f'(earlier batches or the head).')
  return value.shape[axis]


def out_dtype():
  """The dtype fitted states are stored in: float32, float64 under `jax.enable_x64`."""
  return jax.dtypes.canonicalize_dtype(jnp.float64)


def check_state(state, cls, *, detector: str):
  """Raises a ValueError unless `state` is the fitted state `detector`'s fit returns."""
  if not isinstance(state, cls):
    raise ValueError(f'detector {detector!r} needs the state returned by its fit ({cls.__name__}); got '
                     f'{type(state).__name__}. Call fit(train_batches, ...) first.')
  return state


def features_arg(features, *, detector: str, dim: int | None = None, name: str = 'features'):
  """Validates scoring-time `[N, D]` features (`floating_arg`: NumPy stays NumPy); the kernel casts (`compute`)."""
  if features is None:
    raise ValueError(f'detector {detector!r} needs {name} [N, D]; got None (logits alone are not enough).')
  features = floating_arg(name, features, ndim=2)
  if features.shape[1] == 0:
    raise ValueError(f'{name} must have at least one dimension, got shape {features.shape}.')
  if dim is not None and features.shape[1] != dim:
    raise ValueError(f'{name} have dimension {features.shape[1]}, but detector {detector!r} was fitted '
                     f'on dimension {dim}.')
  return features


def any_logits(logits, name: str = 'logits'):
  """Validates `[..., K]` logits with K >= 1 (any leading shape), as `floating_arg` returns them."""
  dtype = getattr(logits, 'dtype', None)
  if dtype is None:
    logits = np.asarray(logits)
    dtype = logits.dtype
  if jnp.issubdtype(dtype, jnp.integer):
    # Integer arrays are labels: the usual mistake is an argument order copied from elsewhere.
    raise TypeError(f'{name} must have a floating dtype, got {dtype}: integer arrays look like labels, '
                    f'and scores take floating [..., num_classes] logits (model outputs).')
  logits = floating_arg(name, logits, min_ndim=1)
  _checks.nonempty(name, logits, axis=-1)
  return logits


def traced_hyperparameter(values, name, value, ok, requirement):
  """NaN scores (and a checkify check) when a traced hyperparameter breaks its range.

  Concrete values are checked eagerly with a ValueError and pass through unchanged; a traced one
  cannot be read, so a bad value makes every score NaN, which the metrics then reject loudly.
  `jax.experimental.checkify.checkify` turns it into an error message (the check is free
  otherwise).
  """
  if _checks.is_concrete(value):
    return values
  good = ok(jnp.asarray(value))
  checkify.check(good, f'{name} must be {requirement}, got {{value}}.', value=value, debug=True)
  return jnp.where(good, values, jnp.asarray(jnp.nan, values.dtype))


def logits_arg(logits, *, detector: str, num_classes: int | None = None):
  """Validates scoring-time `[N, K]` logits (`floating_arg`: NumPy stays NumPy); the kernel casts (`compute`)."""
  if logits is None:
    raise ValueError(f'detector {detector!r} needs logits [N, K]; got None.')
  logits = floating_arg('logits', logits, ndim=2)
  _checks.nonempty('logits', logits, axis=-1)
  if num_classes is not None and logits.shape[1] != num_classes:
    raise ValueError(f'logits have {logits.shape[1]} classes, but detector {detector!r} was fitted on '
                     f'{num_classes}.')
  return logits


def head_logits(features, head: Head):
  """features @ W + b at full float32 precision (TPU/GPU default matmuls round through bfloat16/TF32)."""
  return jnp.dot(features, head.kernel.astype(features.dtype),
                 precision=jax.lax.Precision.HIGHEST) + head.bias.astype(features.dtype)
